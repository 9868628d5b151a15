"""Stable Diffusion 3 / 3.5 against diffusers: every joint block of a tiny SD3Transformer2DModel, both streams
(image tokens and text tokens), with SD3.5's qk RMS-norm and dual attention; loading errors."""

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


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache_writes():
    """This module's programs are not written to the suite's persistent XLA cache: XLA:CPU has aborted a
    worker inside `executable.serialize()` while caching one of them (upstream; conftest's rerun-once also
    covers it). jax decides once per process whether the cache is on, so only the write threshold can
    turn writes off for one module."""
    import jax

    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


@pytest.fixture(scope="session", params=sorted(transformer_reference.SD3_STYLES))
def sd3_case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"sd3-{request.param}")
    model = transformer_reference.make_sd3(request.param, seed=2)
    model.save_pretrained(folder / "transformer")
    return dict(style=request.param, folder=folder, model=model,
                component=load_denoiser(folder / "transformer", component="transformer"))


def test_every_sd3_block_matches_diffusers_in_both_streams(sd3_case):
    model, component = sd3_case["model"], sd3_case["component"]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 6, 10, 4), dtype=np.float32)   # 3x5 patches: a cropped, off-centre grid
    context = rng.standard_normal((2, 7, transformer_reference.T5_WIDTH), dtype=np.float32)
    pooled = rng.standard_normal((2, 64), dtype=np.float32)
    timesteps = np.array([12.5, 987.0], np.float32)   # flow matching: fractional sigma x 1000
    apply = functools.partial(component.module.apply, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": component.params}, sample, timesteps, context, pooled)
    sites = flatten_intermediates(state["intermediates"])
    names = [n for n in dict(model.named_modules()) if n in sites or n.endswith(("attn", "attn2"))]
    recorded, handles = transformer_reference.hooked_streams(model, names)
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            ref = model(sd_reference.nchw(sample), encoder_hidden_states=torch.from_numpy(context),
                        pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(timesteps)).sample
    finally:
        for handle in handles:
            handle.remove()
    assert relative_error(out, sd_reference.nhwc(ref)) < RTOL
    blocks = [f"transformer_blocks.{i}{part}" for i in range(3) for part in ("", ".attn", ".ff")]
    text = [f"transformer_blocks.{i}{part}" for i in range(2) for part in (".context", ".attn.context", ".ff_context")]
    dual = [f"transformer_blocks.{i}.attn2" for i in range(2)] if sd3_case["style"] == "sd3.5" else []
    expected = {"pos_embed", "context_embedder", "norm_out", "time_text_embed.timestep_embedder",
                "time_text_embed.text_embedder", "transformer_blocks.2.norm1_context", *blocks, *text, *dual}
    assert expected <= set(recorded) and expected <= set(sites)
    assert "transformer_blocks.2.context" not in sites   # the last block updates the image stream only
    for site in sorted(expected):
        assert relative_error(sites[site], recorded[site]) < RTOL, site
    np.testing.assert_array_equal(sites["transformer_blocks.1.context.input"], sites["transformer_blocks.0.context"])


def test_sd3_loading_errors_are_named(tmp_path, sd3_case):
    config = json.loads((sd3_case["folder"] / "transformer" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "qk_norm": "layer_norm"}))
    with pytest.raises(CheckpointError, match="qk_norm 'layer_norm' is not implemented"):
        load_denoiser(tmp_path, component="transformer")
    (tmp_path / "config.json").write_text(json.dumps({**config, "caption_projection_dim": 24}))
    with pytest.raises(CheckpointError, match="caption_projection_dim 24 must equal"):
        load_denoiser(tmp_path, component="transformer")


PROMPTS = ["A photo of a Zebra", "a drawing of a banana and a knife beside a dog"]


@pytest.fixture(scope="session", params=["t5", "no-t5"])
def sd3_pipeline(request, tmp_path_factory):
    """A tiny StableDiffusion3Pipeline folder (SD3.5-style transformer), with T5 or without (zeros instead)."""
    import jaxprobe

    folder = tmp_path_factory.mktemp(f"sd3-pipeline-{request.param}")
    reference = transformer_reference.save_sd3_pipeline(folder, "sd3.5", t5=request.param == "t5")
    return dict(folder=folder, reference=reference, pipe=jaxprobe.load(folder), t5=request.param == "t5")


@pytest.mark.filterwarnings("ignore:reduce='none' keeps full maps")
def test_guided_sampling_matches_the_diffusers_sd3_pipeline(sd3_pipeline):
    reference, pipe = sd3_pipeline["reference"], sd3_pipeline["pipe"]
    assert pipe.family.name == "stable-diffusion-3" and pipe.scheduler.kind == "flow_euler"
    assert (pipe.text_encoder_3 is not None) == sd3_pipeline["t5"]
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with sd_reference.single_threaded(), torch.no_grad():
        theirs = reference(PROMPTS, negative_prompt="", num_inference_steps=4, guidance_scale=4.5, height=16,
                           width=16, latents=torch.from_numpy(latents), output_type="latent").images.numpy()
        embeds, _, pooled, _ = reference.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    sites = ["latents", "pred_original_sample", "transformer.transformer_blocks.1",
             "transformer.transformer_blocks.1.context", "transformer.transformer_blocks.1.context.contribution",
             "transformer.context_embedder"]
    feats = pipe.capture(PROMPTS, sites, num_inference_steps=4, guidance_scale=4.5, latents=latents, height=16,
                         width=16, reduce="none")
    assert relative_error(feats["latents"][:, -1], theirs.transpose(0, 2, 3, 1)) < 1e-3
    tokens = 77 + 256
    assert feats["transformer.transformer_blocks.1"].shape == (2, 4, 4, 4, 16)   # image tokens as (h, w) maps
    assert feats["transformer.transformer_blocks.1.context"].shape == (2, 4, tokens, 16)
    context = np.asarray(feats["transformer.transformer_blocks.1.context"])
    contribution = np.asarray(feats["transformer.transformer_blocks.1.context.contribution"])
    assert np.abs(contribution).max() > 0 and not np.allclose(contribution, context)
    # the flow-matching step axis: diffusers' timesteps, and x0 = x - sigma * v ends the last step at the sample
    reference.scheduler.set_timesteps(4)
    np.testing.assert_array_equal(feats.timesteps, reference.scheduler.timesteps.numpy())
    np.testing.assert_allclose(feats["pred_original_sample"][:, -1], feats["latents"][:, -1], rtol=1e-5, atol=1e-5)
    # the conditioning the transformer read: diffusers' prompt embeddings through its context_embedder
    with torch.no_grad():
        projected = reference.transformer.context_embedder(embeds).numpy()
    assert relative_error(feats["transformer.context_embedder"][:, 0], projected) < RTOL
    assert pooled.shape == (2, 64)


def test_the_lens_reads_a_layer_of_both_clip_towers_as_diffusers_clip_skip(sd3_pipeline):
    """SD3's Diffusion Lens: both CLIP towers' hidden state k, raw, in place of the penultimate one (T5's part
    unchanged), so text_layer=-(s + 2) is diffusers' clip_skip=s."""
    if not sd3_pipeline["t5"]:
        pytest.skip("one pipeline suffices: the T5-less one reads the same CLIP towers")
    reference, pipe = sd3_pipeline["reference"], sd3_pipeline["pipe"]
    feats = pipe.capture(PROMPTS, ["transformer.context_embedder"], num_inference_steps=1, guidance_scale=1.0,
                         height=16, width=16, text_layer=-3, reduce="none")
    with torch.no_grad():
        embeds, _, _, _ = reference.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                  clip_skip=1)
        projected = reference.transformer.context_embedder(embeds).numpy()
    assert relative_error(feats["transformer.context_embedder"][:, 0], projected) < RTOL


def test_sd3_sites_name_both_streams(sd3_pipeline):
    pipe = sd3_pipeline["pipe"]
    blocks = pipe.select("transformer.transformer_blocks.*")
    assert sorted(blocks) == ["transformer.transformer_blocks.0", "transformer.transformer_blocks.0.context",
                              "transformer.transformer_blocks.1", "transformer.transformer_blocks.1.context",
                              "transformer.transformer_blocks.2"]
    inner = set(pipe.select("transformer.transformer_blocks.0.**"))
    assert {"transformer.transformer_blocks.0.attn", "transformer.transformer_blocks.0.attn.context",
            "transformer.transformer_blocks.0.attn2", "transformer.transformer_blocks.0.ff_context"} <= inner
    towers = ("text_encoder.", "text_encoder_2.") + (("text_encoder_3.",) if sd3_pipeline["t5"] else ())
    assert {s.split(".")[0] + "." for s in pipe.select("text_encoder*.*")} == set(towers)


def test_images_decode_with_the_sd3_vae_shift(sd3_pipeline):
    reference, pipe = sd3_pipeline["reference"], sd3_pipeline["pipe"]
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with sd_reference.single_threaded(), torch.no_grad():
        theirs = reference(PROMPTS[:1], num_inference_steps=2, guidance_scale=4.5, height=16, width=16,
                           latents=torch.from_numpy(latents), output_type="np").images
    ours = pipe.generate(PROMPTS[:1], num_inference_steps=2, guidance_scale=4.5, latents=latents, height=16, width=16)
    assert relative_error(ours, theirs) < 1e-3


@pytest.mark.parametrize("stream", ["", ".context", ".context.input"])
def test_steering_either_stream_matches_a_diffusers_forward_hook(sd3_pipeline, stream):
    """Steer on transformer_blocks.1 (image tokens), transformer_blocks.1.context (the text tokens it returns) or
    transformer_blocks.1.context.input (those it is given) over two steps, both CFG halves, as a forward
    (pre-)hook on the diffusers block."""
    from jaxprobe.interventions import Steer

    if not sd3_pipeline["t5"]:
        pytest.skip("one pipeline suffices: the T5-less one conditions the same blocks")
    reference, pipe = sd3_pipeline["reference"], sd3_pipeline["pipe"]
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vector, steps, scale = np.random.default_rng(1).standard_normal(16).astype(np.float32), range(1, 3), 2.0
    calls = []
    hook = transformer_reference.steering_hook(vector, scale, steps, text=bool(stream))

    def pre_hook(module, args, kwargs):
        calls.append(None)
        if len(calls) - 1 in steps:
            kwargs = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] + torch.from_numpy(
                scale * vector)}
        return args, kwargs

    block = reference.transformer.transformer_blocks[1]
    handle = (block.register_forward_pre_hook(pre_hook, with_kwargs=True) if stream.endswith(".input")
              else block.register_forward_hook(hook))
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            theirs = reference(PROMPTS, num_inference_steps=4, guidance_scale=4.5, height=16, width=16,
                               latents=torch.from_numpy(latents), output_type="latent").images.numpy()
    finally:
        handle.remove()
    steer = Steer(f"transformer.transformer_blocks.1{stream}", vector, scale=scale, steps=steps)
    options = dict(num_inference_steps=4, guidance_scale=4.5, latents=latents, height=16, width=16, timesteps=[-1],
                   reduce="none")
    ours = pipe.capture(PROMPTS, ["latents"], interventions=[steer], **options)["latents"][:, -1]
    plain = pipe.capture(PROMPTS, ["latents"], **options)["latents"][:, -1]
    theirs = theirs.transpose(0, 2, 3, 1)
    assert relative_error(ours, theirs) < 1e-3 and relative_error(plain, theirs) > 1e-2


def test_every_intervention_kind_on_both_streams(sd3_pipeline):
    if not sd3_pipeline["t5"]:
        pytest.skip("one pipeline suffices: the interventions act on the same blocks")
    transformer_reference.check_every_intervention_kind(
        sd3_pipeline["pipe"], tuple(f"transformer.transformer_blocks.{i}" for i in range(3)), height=16, width=16)
