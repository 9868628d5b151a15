"""The whole pipeline against diffusers' StableDiffusionPipeline, loaded from a diffusers folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jaxprobe  # noqa: E402
from jaxprobe.errors import CheckpointError, InputError, SiteError  # noqa: E402
from jaxprobe.pipeline.sampling import sampling_timesteps  # noqa: E402

from sd_reference import CROSS_ATTENTION_DIM, count_compiles, nchw, run_with_hooks, save_pipeline  # noqa: E402

PROMPTS = ["a photo of a airplane", "a photo of a zebra", "a drawing of a banana"]
STEPS = 10


_BUILT: dict[str, tuple] = {}


def _pipeline(style: str, tmp_path_factory) -> tuple:
    if style not in _BUILT:
        path = tmp_path_factory.mktemp(f"pipeline_{style}")
        reference = save_pipeline(path, style)
        _BUILT[style] = (path, reference, jaxprobe.load(path))
    return _BUILT[style]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd_both(request, tmp_path_factory):
    """Parity runs on both families; the API tests below need only one."""
    return _pipeline(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _pipeline("sd1", tmp_path_factory)


def _noise(pipe, n):
    side = pipe.unet.config.sample_size
    return np.random.default_rng(0).standard_normal((n, 4, side, side)).astype(np.float32)


def test_loop_matches_diffusers_and_mid_block_hook(sd_both):
    path, reference, pipe = sd_both
    latents = _noise(pipe, len(PROMPTS))
    captured = pipe.capture(PROMPTS, ["unet.mid_block", "latents"], num_inference_steps=STEPS, guidance_scale=7.5,
                            latents=latents, reduce="none")
    mids = []
    hook = reference.unet.mid_block.register_forward_hook(lambda m, a, out: mids.append(out.detach().numpy()))
    try:
        with torch.no_grad():
            ref = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(latents),
                            output_type="latent").images.numpy()
    finally:
        hook.remove()
    ours = captured["latents"][:, -1].transpose(0, 3, 1, 2)  # (n, steps, h, w, c) -> final NCHW
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-3)
    # diffusers runs [uncond; cond] in one batch: the conditional half is what we capture by default
    ref_mid = np.stack([m[len(PROMPTS):] for m in mids], axis=1).transpose(0, 1, 3, 4, 2)
    assert captured["unet.mid_block"].shape == ref_mid.shape
    np.testing.assert_allclose(captured["unet.mid_block"], ref_mid, atol=1e-3, rtol=1e-3)


def test_capture_shapes_reductions_and_branches(sd):
    _, _, pipe = sd
    kw = dict(num_inference_steps=4, latents=_noise(pipe, 2))
    inner = "unet.mid_block.attentions.0.transformer_blocks.0"   # tokens (b, h*w, c), not a map: reduced the same
    sites = ["text_encoder.*", "unet.down_blocks.*", "unet.mid_block", inner, "latents", "pred_original_sample"]
    feats = pipe.capture(PROMPTS[:2], sites, reduce={"text_encoder.*": "eos", "*": "mean"}, **kw)
    n_evals = len(sampling_timesteps(pipe, 4))
    assert n_evals == 5  # PNDM evaluates its warm-up step twice
    width = pipe.unet.config.block_out_channels[-1]
    assert feats["unet.mid_block"].shape == (2, n_evals, width) and feats[inner].shape == (2, n_evals, width)
    assert feats["latents"].shape == (2, n_evals, 4)
    assert feats["text_encoder.text_model.final_layer_norm"].shape == (2, CROSS_ATTENTION_DIM)
    # one program keeps every map whole (a compile per capture is most of this test's time)
    full = pipe.capture(PROMPTS[:2], ["unet.mid_block", inner, "unet.*.attn2.probs"], reduce="none", **kw)
    np.testing.assert_allclose(feats["unet.mid_block"], full["unet.mid_block"].mean(axis=(2, 3)), atol=1e-5)
    tokens = full[inner]
    assert tokens.ndim == 4
    np.testing.assert_allclose(feats[inner], tokens.mean(axis=2), atol=1e-5)
    maps = {site: value for site, value in full.items() if site.endswith("attn2.probs")}
    assert maps
    for site, value in maps.items():
        assert value.shape[:3] == (2, n_evals, 77)
        np.testing.assert_allclose(value.sum(axis=2), 1.0, atol=1e-4)  # softmax over tokens
    peak = pipe.capture(PROMPTS[:2], ["unet.mid_block"], reduce="max", timesteps=[0, -1], **kw)["unet.mid_block"]
    np.testing.assert_allclose(peak, full["unet.mid_block"].max(axis=(2, 3))[:, [0, -1]], atol=1e-5)
    uncond = pipe.capture(PROMPTS[:2], ["unet.mid_block"], branch="uncond", **kw)["unet.mid_block"]
    assert not np.allclose(uncond, feats["unet.mid_block"])


def test_generate_returns_images_and_captures(sd):
    _, _, pipe = sd
    images, feats = pipe.generate(PROMPTS[:2], sites=["unet.mid_block"], num_inference_steps=3,
                                  latents=_noise(pipe, 2))
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert images.shape == (2, pipe.unet.config.sample_size * factor, pipe.unet.config.sample_size * factor, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert feats["unet.mid_block"].shape[:2] == (2, 4)
    pil = pipe.generate(PROMPTS[:1], num_inference_steps=2, output_type="pil")
    assert pil[0].size == images.shape[1:3]


def _real_images(pipe, n=2):
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return np.random.default_rng(0).uniform(size=(n, size, size, 3)).astype(np.float32)


def _reference_unet_pass(reference, images, t, seed, names, hook=None):
    """diffusers' UNet once on the VAE means of `images` noised with jaxprobe's (seed, index) noise, the
    empty prompt as context; {name: NHWC output} of the named blocks, `hook` on mid_block if given."""
    import jax

    with torch.no_grad():
        mean = reference.vae.encode(nchw(images * 2 - 1)).latent_dist.mean * reference.vae.config.scaling_factor
        ids = reference.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = reference.text_encoder(ids)[0].repeat(len(images), 1, 1)
        key = jax.random.key(seed)
        noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), mean.shape[2:] + (4,)))
                          for i in range(len(images))]).transpose(0, 3, 1, 2)
        noisy = reference.scheduler.add_noise(mean, torch.from_numpy(noise), torch.tensor([t] * len(images)))
    handle = reference.unet.mid_block.register_forward_hook(hook) if hook else None
    try:
        _, hooked = run_with_hooks(reference.unet, names, lambda: reference.unet(noisy, t, encoder_hidden_states=context))
    finally:
        if handle:
            handle.remove()
    return hooked


def test_capture_images_matches_manual_unet_pass(sd):
    _, reference, pipe = sd
    images = _real_images(pipe)
    feats = pipe.capture_images(images, ["unet.mid_block"], t=25, seed=3)
    again = pipe.capture_images(images, ["unet.mid_block"], t=25, seed=3)
    np.testing.assert_array_equal(feats["unet.mid_block"], again["unet.mid_block"])
    assert feats["unet.mid_block"].shape == (2, pipe.unet.config.block_out_channels[-1])
    hooked = _reference_unet_pass(reference, images, 25, 3, ["mid_block"])
    np.testing.assert_allclose(feats["unet.mid_block"], hooked["mid_block"].mean(axis=(1, 2)), atol=1e-3)


def test_capture_images_with_a_steer_matches_a_diffusers_forward_hook(sd):
    from jaxprobe.errors import InterventionError
    from jaxprobe.interventions import Steer

    _, reference, pipe = sd
    images = _real_images(pipe)
    vector = np.random.default_rng(2).standard_normal(pipe.unet.config.block_out_channels[-1]).astype(np.float32)
    sites = ["unet.mid_block", "unet.up_blocks.0"]
    plain = pipe.capture_images(images, sites, t=25, seed=3)
    steered = pipe.capture_images(images, sites, t=25, seed=3, interventions=[Steer("unet.mid_block", vector, 2.0)])
    np.testing.assert_allclose(steered["unet.mid_block"], plain["unet.mid_block"] + 2.0 * vector, atol=1e-4)
    hooked = _reference_unet_pass(reference, images, 25, 3, ["up_blocks.0"],
                                  hook=lambda m, a, out: out + torch.from_numpy(2.0 * vector)[None, :, None, None])
    np.testing.assert_allclose(steered["unet.up_blocks.0"], hooked["up_blocks.0"].mean(axis=(1, 2)), atol=1e-3)
    with pytest.raises(InterventionError, match="UNet sites only"):
        pipe.capture_images(images, sites, interventions=[Steer("text_encoder.text_model.encoder.layers.0",
                                                                np.zeros(pipe.text_encoder.config.hidden_size))])


def test_bad_inputs_are_named(sd, tmp_path):
    path, _, pipe = sd
    with pytest.raises(InputError, match="unknown|choose"):
        pipe.capture(PROMPTS[:1], ["unet.mid_block"], reduce="median", num_inference_steps=2)
    with pytest.raises(InputError, match="does not apply"):
        pipe.capture(PROMPTS[:1], ["unet.mid_block"], reduce="eos", num_inference_steps=2)
    with pytest.raises(InputError, match="outside"):
        pipe.capture(PROMPTS[:1], ["unet.mid_block"], timesteps=[99], num_inference_steps=2)
    with pytest.raises(InputError, match="latents must be"):
        pipe.capture(PROMPTS[:1], ["unet.mid_block"], latents=np.zeros((2, 4, 8, 8)), num_inference_steps=2)
    with pytest.raises(SiteError, match="matches no site"):
        pipe.capture(PROMPTS[:1], ["unet.nonexistent_block"])
    partial = tmp_path / "partial"
    shutil.copytree(path, partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(CheckpointError, match="missing"):
        jaxprobe.load(partial)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(path, mismatched)
    cfg = json.loads((mismatched / "text_encoder" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (mismatched / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size|shape"):  # config and weights disagree
        jaxprobe.load(mismatched)
    other_family = transformers.CLIPTextConfig(**{**reference_text_config(path), "hidden_size": 48})
    transformers.CLIPTextModel(other_family).save_pretrained(mismatched / "text_encoder")
    with pytest.raises(CheckpointError, match=r"width \(48\) differs from the UNet's cross_attention_dim"):
        jaxprobe.load(mismatched)
    with pytest.raises(InputError, match="unknown scheduler|known"):
        jaxprobe.load(path, scheduler="heun_magic")


def reference_text_config(path) -> dict:
    keep = ("vocab_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
            "hidden_act", "eos_token_id", "bos_token_id", "pad_token_id")
    cfg = json.loads((path / "text_encoder" / "config.json").read_text())
    return {k: cfg[k] for k in keep if k in cfg}


def test_fp16_variant_files_are_preferred(sd, tmp_path):
    path, reference, _ = sd
    variant = tmp_path / "variant"
    reference.to(torch.float16).save_pretrained(variant, variant="fp16")
    reference.to(torch.float32)
    pipe = jaxprobe.load(variant, variant="fp16")
    assert pipe.unet is not None and any(p.name.endswith(".fp16.safetensors") for p in (variant / "unet").iterdir())


def test_image_encoder_embeds_the_generated_images(tmp_path):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(tmp_path / "vision")
    pipe = jaxprobe.load("tiny", image_encoder=tmp_path / "vision")
    prompts = ["a photo of a cat", "a photo of a dog"]
    feats = pipe.capture(prompts, ["image_encoder.visual_projection", "unet.mid_block"], num_inference_steps=2)
    assert feats["image_encoder.visual_projection"].shape == (2, 16)
    assert feats["unet.mid_block"].shape[:2] == (2, 3)
    images = pipe.generate(prompts, num_inference_steps=2)
    again = pipe.embed_images(images)["image_encoder.visual_projection"]
    np.testing.assert_allclose(feats["image_encoder.visual_projection"], again, atol=1e-5)


def test_one_compile_per_capture_and_none_on_a_second_call(sd):
    _, _, pipe = sd
    prompts = ["a red cube", "a blue sphere", "a cat"]
    options = dict(sites=["text_encoder.*", "unet.mid_block", "latents"], num_inference_steps=3,
                   timesteps=[0, 2], batch_size=2)
    pipe.select(options["sites"])  # site tracing is abstract and happens once per pipeline
    seen, stop = count_compiles()
    try:
        first = pipe.capture(prompts, **options)
        compiles_first = len(seen)
        second = pipe.capture(prompts, **options)
    finally:
        stop()
    assert compiles_first == 1
    assert len(seen) == 1
    assert first["unet.mid_block"].shape[:2] == (3, 2)
    for site in first:
        np.testing.assert_array_equal(first[site], second[site])
