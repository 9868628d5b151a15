"""PixArt-Sigma and PixArt-alpha against diffusers: every transformer block of a tiny PixArtTransformer2DModel
(cross-attention to padded T5 tokens, alpha's micro-conditions), guided DPM-Solver++ sampling against the
diffusers pipelines on the same initial latents, T5 sites and loading."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
import transformer_reference  # noqa: E402
from transformer_reference import relative_error  # noqa: E402
from jaxprobe.checkpoints.diffusers import load_denoiser  # noqa: E402
from jaxprobe.errors import CheckpointError  # noqa: E402
from jaxprobe.pipeline.sites import flatten_intermediates  # noqa: E402

RTOL = 1e-4
PROMPTS = ["A photo of a Zebra", "a drawing of a banana and a knife beside a dog"]


@pytest.fixture(scope="session", params=["sigma", "alpha"])
def pixart_case(request, tmp_path_factory):
    import jaxprobe

    folder = tmp_path_factory.mktemp(f"pixart-{request.param}")
    reference = transformer_reference.save_pixart_pipeline(folder, request.param)
    return dict(kind=request.param, folder=folder, reference=reference, pipe=jaxprobe.load(folder))


def test_every_pixart_block_matches_diffusers(pixart_case):
    model = pixart_case["reference"].transformer
    component = pixart_case["pipe"].unet
    alpha = pixart_case["kind"] == "alpha"
    assert component.config.use_additional_conditions == alpha
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 12, 12, 4), dtype=np.float32)   # not the trained size: stretched positions
    context = rng.standard_normal((2, 6, transformer_reference.T5_WIDTH), dtype=np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    timesteps = np.array([10, 999])
    resolution = np.array([[1024.0, 1024.0], [768.0, 512.0]], np.float32)
    ratio = resolution[:, :1] / resolution[:, 1:]
    apply = functools.partial(component.module.apply, mutable=["intermediates"])
    args = (sample, timesteps, context, mask) + ((resolution, ratio) if alpha else ())
    out, state = sd_reference.run_once(apply, {"params": component.params}, *args)
    sites = flatten_intermediates(state["intermediates"])
    names = dict(model.named_modules())
    added = {"resolution": torch.from_numpy(resolution), "aspect_ratio": torch.from_numpy(ratio)} if alpha else \
        {"resolution": None, "aspect_ratio": None}
    ref, ref_sites = sd_reference.run_with_hooks(model, [s for s in sites if s in names], lambda: model(
        sd_reference.nchw(sample), encoder_hidden_states=torch.from_numpy(context), timestep=torch.as_tensor(timesteps),
        encoder_attention_mask=torch.as_tensor(mask), added_cond_kwargs=added).sample)
    assert relative_error(out, sd_reference.nhwc(ref)) < RTOL
    expected = {"pos_embed", "caption_projection", "norm_out", "adaln_single.emb.timestep_embedder",
                *(f"transformer_blocks.{i}{part}" for i in range(2) for part in ("", ".attn1", ".attn2", ".ff"))}
    if alpha:
        expected |= {"adaln_single.emb.resolution_embedder", "adaln_single.emb.aspect_ratio_embedder"}
    assert expected <= set(ref_sites)
    for site, value in ref_sites.items():
        assert relative_error(sites[site], value) < RTOL, site
    probs = np.asarray(sites["transformer_blocks.0.attn2.probs"])     # (b, h*w, tokens): no weight on padding
    assert probs.shape == (2, 36, 6) and not probs[0, :, 3:].any() and np.allclose(probs.sum(-1), 1, atol=1e-5)


@pytest.mark.filterwarnings("ignore:reduce='none' keeps full maps")
def test_guided_sampling_matches_the_diffusers_pixart_pipeline(pixart_case):
    reference, pipe = pixart_case["reference"], pixart_case["pipe"]
    length = 300 if pixart_case["kind"] == "sigma" else 120
    assert pipe.tokenizer.max_length == length and pipe.family.name == "pixart"
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    # PixArtAlphaPipeline passes the micro-conditions to 1024 px models only, which it knows by sample_size 128
    # (the model's use_additional_conditions default says the same); the tiny model is told it is one.
    size = reference.transformer.config.sample_size
    if pixart_case["kind"] == "alpha":
        reference.transformer.register_to_config(sample_size=128)
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            theirs = reference(PROMPTS, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, height=16,
                               width=16, latents=torch.from_numpy(latents), output_type="latent",
                               use_resolution_binning=False, clean_caption=False,
                               max_sequence_length=length).images.numpy()
    finally:
        reference.transformer.register_to_config(sample_size=size)
    with torch.no_grad():
        embeds, mask, _, _ = reference.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                     clean_caption=False, max_sequence_length=length)
    feats = pipe.capture(PROMPTS, ["latents", "text_encoder.encoder.final_layer_norm", "text_encoder.encoder.block.0",
                                   "transformer.transformer_blocks.1"],
                         num_inference_steps=4, guidance_scale=4.5, latents=latents, timesteps=[-1],
                         reduce={"text_encoder.encoder.final_layer_norm": "none", "text_encoder.*": "mean",
                                 "*": "none"})
    assert relative_error(feats["latents"][:, -1], theirs.transpose(0, 2, 3, 1)) < 1e-3
    np.testing.assert_allclose(feats["text_encoder.encoder.final_layer_norm"], embeds.numpy(), atol=1e-5)
    assert feats["text_encoder.encoder.block.0"].shape == (2, transformer_reference.T5_WIDTH)
    assert feats["transformer.transformer_blocks.1"].shape == (2, 1, 4, 4, 24)     # tokens as (h, w) maps
    np.testing.assert_array_equal(pipe.tokenizer.attention_mask(pipe.tokenize(PROMPTS)), mask.numpy())


def test_legacy_transformer2d_folders_load_as_pixart(tmp_path):
    transformer_reference.save_pixart_pipeline(tmp_path / "legacy", "alpha", legacy=True)
    legacy = load_denoiser(tmp_path / "legacy" / "transformer", component="transformer")
    assert type(legacy.module).__name__ == "PixArtTransformer2DModel" and legacy.config.num_layers == 2


def test_pixart_loading_errors_are_named(tmp_path, pixart_case):
    config = json.loads((pixart_case["folder"] / "transformer" / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "attention_type": "gated"}))
    with pytest.raises(CheckpointError, match="attention_type='gated'"):
        load_denoiser(bad, component="transformer")
    (bad / "config.json").write_text(json.dumps({**config, "cross_attention_dim": None}))
    with pytest.raises(CheckpointError, match="not a PixArt transformer"):
        load_denoiser(bad, component="transformer")


def _parameters(component: str, config) -> float:
    import jax

    from jaxprobe.checkpoints import random as random_models
    from jaxprobe.checkpoints.weights import abstract_params

    module_cls, example = random_models._BY_CONFIG.get(type(config)) or random_models._BUILDERS[component]
    shapes = abstract_params(module_cls(config), example(config))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) / 1e6


def test_pixart_random_is_pixart_sigma_at_full_size():
    from jaxprobe.checkpoints.random import RANDOM_MODELS

    configs = RANDOM_MODELS["pixart-random"](100)
    assert round(_parameters("transformer", configs["transformer"])) == 611       # PixArt-Sigma XL/2
    assert round(_parameters("text_encoder", configs["text_encoder"])) == 4762    # T5 v1.1 XXL's encoder


@pytest.mark.filterwarnings("ignore:reduce='none' keeps full maps")
def test_pixart_random_plumbing_on_a_small_copy(monkeypatch):
    """The random build's parts (T5 with a 300-token tokenizer, DPM-Solver++, the transformer) at toy widths."""
    import dataclasses

    import jaxprobe
    from jaxprobe.checkpoints import random as random_models
    from jaxprobe.models.t5 import T5Config

    full = random_models.pixart_configs

    def small(vocab_size):
        configs = full(vocab_size)
        return {"text_encoder": T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                "transformer": dataclasses.replace(configs["transformer"], **transformer_reference.PIXART_KWARGS),
                "vae": random_models.tiny_configs(vocab_size)[2]}

    monkeypatch.setitem(random_models.RANDOM_MODELS, "pixart-random", small)
    pipe = jaxprobe.load("pixart-random")
    assert pipe.family.name == "pixart" and pipe.tokenizer.max_length == 300
    assert pipe.scheduler.kind == "dpmpp_2m"
    feats = pipe.capture(["a cat"], ["transformer.transformer_blocks.1", "text_encoder.encoder.block.1"],
                         num_inference_steps=2)
    assert feats["transformer.transformer_blocks.1"].shape == (1, 2, 24)
    assert np.isfinite(feats["text_encoder.encoder.block.1"]).all()


def test_real_image_features_of_pixart(pixart_case):
    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    feats = pixart_case["pipe"].capture_images(images, ["transformer.transformer_blocks.1"], t=25, prompt="a dog")
    assert feats["transformer.transformer_blocks.1"].shape == (2, 24)
    assert np.isfinite(feats["transformer.transformer_blocks.1"]).all()
    # the studies' text-side comparison is T5's last layer here, and h-space the middle block
    assert pixart_case["pipe"].summary_text_site == "text_encoder.encoder.final_layer_norm"
    assert pixart_case["pipe"].bottleneck_site == "transformer.transformer_blocks.1"
