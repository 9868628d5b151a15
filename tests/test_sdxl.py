"""SDXL against diffusers: the UNet with its added text-time conditioning, every site (tiny layouts that
diffusers writes with save_pretrained)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
from jaxprobe.checkpoints.diffusers import load_unet  # noqa: E402
from jaxprobe.errors import CheckpointError, InputError  # noqa: E402
from jaxprobe.models.unet import UNetConfig  # noqa: E402
from jaxprobe.pipeline.sites import flatten_intermediates  # noqa: E402

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module", params=sorted(sd_reference.SDXL_STYLES))
def case(request, tmp_path_factory):
    model = sd_reference.make_unet(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    unet = load_unet(folder)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    context = rng.standard_normal((2, 7, sd_reference.SDXL_CONTEXT_DIM), dtype=np.float32)
    pooled = rng.standard_normal((2, sd_reference.POOLED_DIM), dtype=np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 896]], np.float32)
    timesteps = np.array([10, 999])
    apply = functools.partial(unet.module.apply, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": unet.params}, sample, timesteps, context, pooled, time_ids)
    sites = flatten_intermediates(state["intermediates"])
    hooked = [s for s in sites if not s.endswith(".probs")]
    ref, ref_sites = sd_reference.run_with_hooks(model, hooked, lambda: model(
        sd_reference.nchw(sample), torch.as_tensor(timesteps), torch.from_numpy(context),
        added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}).sample)
    return dict(model=model, out=np.asarray(out), sites=sites, ref=sd_reference.nhwc(ref), ref_sites=ref_sites)


def test_sdxl_unet_matches_diffusers_at_every_site(case):
    np.testing.assert_allclose(case["out"], case["ref"], atol=ATOL, rtol=RTOL)
    assert {"add_embedding", "time_embedding", "mid_block", "down_blocks.1.attentions.0"} <= set(case["sites"])
    for site, ref in case["ref_sites"].items():
        np.testing.assert_allclose(np.asarray(case["sites"][site], np.float32), ref, atol=ATOL, rtol=RTOL,
                                   err_msg=site)
    expected = {n for n, m in case["model"].named_modules()
                if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Attention",
                                        "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                        "CrossAttnUpBlock2D", "UpBlock2D", "TimestepEmbedding")}
    assert expected <= set(case["ref_sites"])


def test_added_conditioning_widths_are_checked():
    config = UNetConfig.from_dict(sd_reference.SDXL_STYLES["sdxl2"])
    config.check_added_conditioning(sd_reference.POOLED_DIM, 6)
    with pytest.raises(CheckpointError, match="requires_aesthetics_score"):
        config.check_added_conditioning(sd_reference.POOLED_DIM, 5)   # a refiner's ids on a base UNet
    with pytest.raises(CheckpointError, match="addition_embed_type"):
        UNetConfig.from_dict({**sd_reference.SDXL_STYLES["sdxl2"], "addition_embed_type": "image"})


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sdxl_folders_load_with_both_text_encoders(refiner, tmp_path):
    import jaxprobe

    sd_reference.save_sdxl_pipeline(tmp_path / "sdxl", refiner=refiner, force_zeros=not refiner)
    pipe = jaxprobe.load(tmp_path / "sdxl")
    assert list(pipe.text_encoders) == (["text_encoder_2"] if refiner else ["text_encoder", "text_encoder_2"])
    assert pipe.text_encoder_2.config.projection_dim == sd_reference.POOLED_DIM and pipe.tokenizer_2 is not None
    assert pipe.pipeline_options == {"force_zeros_for_empty_prompt": not refiner,
                                     **({"requires_aesthetics_score": True} if refiner else {})}
    assert pipe.scheduler.kind == "euler"
    sites = pipe.sites()
    assert "text_encoder_2.text_model.encoder.layers.1" in sites and "unet.mid_block" in sites


def test_sdxl_components_of_different_widths_are_refused(tmp_path):
    import json
    import shutil

    import jaxprobe

    sd_reference.save_sdxl_pipeline(tmp_path / "sdxl")
    config = tmp_path / "sdxl" / "unet" / "config.json"
    changed = {**json.loads(config.read_text()), "cross_attention_dim": 48}
    config.write_text(json.dumps(changed))
    shutil.rmtree(tmp_path / "sdxl" / "unet")  # a UNet of another width, saved by diffusers itself
    sd_reference.make_unet({**sd_reference.SDXL_STYLES["sdxl2"], "cross_attention_dim": 48}).save_pretrained(
        tmp_path / "sdxl" / "unet")
    with pytest.raises(CheckpointError, match="add up to 64"):
        jaxprobe.load(tmp_path / "sdxl")


PROMPTS = ["a photo of a zebra", "a drawing of a banana"]


def _latents(n: int = 2) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((n, 4, 16, 16)).astype(np.float32)  # diffusers' NCHW


def _close(ours: np.ndarray, theirs: np.ndarray, rel: float = 1e-3) -> None:
    assert np.abs(ours - theirs).max() <= rel * np.abs(theirs).max(), np.abs(ours - theirs).max()


@pytest.mark.slow
@pytest.mark.parametrize("force_zeros", [True, False], ids=["zeros-uncond", "encoded-uncond"])
def test_guided_euler_sampling_matches_the_diffusers_sdxl_pipeline(force_zeros, tmp_path):
    import jaxprobe

    reference = sd_reference.save_sdxl_pipeline(tmp_path / "sdxl", force_zeros=force_zeros)
    pipe = jaxprobe.load(tmp_path / "sdxl")
    latents = _latents()
    feats = pipe.capture(PROMPTS, ["latents", "text_encoder_2.text_projection", "text_encoder.text_model.encoder.layers.1"],
                         num_inference_steps=4, guidance_scale=5.0, latents=latents, timesteps=[-1],
                         reduce={"text_encoder*": "none", "*": "none"})
    with torch.no_grad():
        theirs = reference(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents),
                           output_type="latent").images.numpy()
        embeds, _, pooled, _ = reference.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    _close(feats["latents"][:, -1], theirs.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(feats["text_encoder_2.text_projection"], pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["text_encoder.text_model.encoder.layers.1"], embeds.numpy()[..., :32], atol=1e-5)


@pytest.mark.slow
def test_the_lens_reads_a_layer_of_both_towers_as_diffusers_clip_skip(tmp_path):
    """SDXL's Diffusion Lens: both CLIP towers' hidden state k, raw, where the penultimate one goes, so
    text_layer=-(s + 2) is diffusers' clip_skip=s (the pooled embedding stays the whole second tower's)."""
    import jaxprobe

    reference = sd_reference.save_sdxl_pipeline(tmp_path / "sdxl")
    pipe = jaxprobe.load(tmp_path / "sdxl")
    latents, kw = _latents(), dict(num_inference_steps=2, guidance_scale=5.0)
    feats = pipe.capture(PROMPTS, ["latents"], latents=latents, timesteps=[-1], reduce="none", text_layer=-3, **kw)
    with torch.no_grad():
        lens, normal = (reference(PROMPTS, latents=torch.from_numpy(latents), output_type="latent", clip_skip=skip,
                                  **kw).images.numpy() for skip in (1, None))
    assert not np.allclose(lens, normal, atol=1e-3)
    _close(feats["latents"][:, -1], lens.transpose(0, 2, 3, 1))
    for wrong in (4, -5, 1.5):
        with pytest.raises(InputError, match="text_layer must be a layer of text_encoder and text_encoder_2 in 0..3"):
            pipe.capture(PROMPTS, ["latents"], latents=latents, text_layer=wrong, **kw)


# Turbo's scheduler: SDXL-Turbo's scheduler_config is Euler ancestral with trailing spacing, epsilon prediction.
TURBO_SCHEDULER = {**{k: v for k, v in sd_reference.SDXL_SCHEDULER.items() if k != "use_karras_sigmas"},
                   "_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


def _hand_ancestral_noise(monkeypatch, seed: int, steps: int, n: int = len(PROMPTS)) -> None:
    """Make diffusers' Euler ancestral step draw jaxprobe's fresh noise: step i's of the (seed, prompt index)
    keys, so both samplers add the same noise."""
    import jax.numpy as jnp
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral

    from jaxprobe.pipeline.programs import prompt_keys, step_noise

    keys = prompt_keys(jnp.int32(seed), jnp.arange(n, dtype=jnp.int32))
    noises = iter([np.asarray(step_noise(keys, jnp.int32(i), (16, 16, 4))).transpose(0, 3, 1, 2)
                   for i in range(steps)])
    monkeypatch.setattr(ancestral, "randn_tensor", lambda *a, **k: torch.from_numpy(next(noises)))


@pytest.mark.slow
def test_turbo_style_ancestral_sampling_without_guidance_matches_diffusers(tmp_path, monkeypatch):
    """SDXL-Turbo's setting: Euler ancestral, trailing spacing, guidance 0 (one UNet pass per step); the
    fresh noise of each step is jaxprobe's (seed, prompt index) stream, handed to diffusers."""
    import jaxprobe

    reference = sd_reference.save_sdxl_pipeline(tmp_path / "turbo", scheduler=TURBO_SCHEDULER)
    pipe = jaxprobe.load(tmp_path / "turbo")
    assert pipe.scheduler.kind == "euler_ancestral"
    latents, seed, steps = _latents(), 3, 2
    feats = pipe.capture(PROMPTS, ["latents"], num_inference_steps=steps, guidance_scale=0.0, latents=latents,
                         seed=seed, timesteps=[-1], reduce="none")
    _hand_ancestral_noise(monkeypatch, seed, steps)
    with torch.no_grad():
        theirs = reference(PROMPTS, num_inference_steps=steps, guidance_scale=0.0, latents=torch.from_numpy(latents),
                           output_type="latent").images.numpy()
    _close(feats["latents"][:, -1], theirs.transpose(0, 2, 3, 1))


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "steps"), [("EulerAncestralDiscreteScheduler", 1),
                                              ("EulerAncestralDiscreteScheduler", 2), ("EulerDiscreteScheduler", 1)])
def test_sd_turbo_without_guidance_matches_diffusers(sampler, steps, tmp_path, monkeypatch):
    """SD-Turbo: the SD 2.1 architecture (linear projections, per-block heads, upcast attention) distilled to
    1-4 steps without guidance. Its scheduler is taken as SDXL-Turbo's (Euler ancestral, trailing spacing,
    epsilon prediction); plain Euler is checked too, in case a checkpoint ships that instead. One ancestral
    step ends at sigma 0 and adds no noise; two steps check the noise handed over as well."""
    import jaxprobe

    config = {**TURBO_SCHEDULER, "_class_name": sampler}
    reference = sd_reference.save_pipeline(tmp_path / "sd-turbo", "sd2", scheduler=config)
    pipe = jaxprobe.load(tmp_path / "sd-turbo")
    assert pipe.family.name == "stable-diffusion" and pipe.scheduler.kind == {
        "EulerAncestralDiscreteScheduler": "euler_ancestral", "EulerDiscreteScheduler": "euler"}[sampler]
    latents, seed = _latents(), 7
    ours = pipe.capture(PROMPTS, ["latents"], num_inference_steps=steps, guidance_scale=0.0, latents=latents,
                        seed=seed, timesteps=[-1], reduce="none")["latents"][:, -1]
    _hand_ancestral_noise(monkeypatch, seed, steps)
    with sd_reference.single_threaded(), torch.no_grad():
        theirs = reference(PROMPTS, num_inference_steps=steps, guidance_scale=0.0, latents=torch.from_numpy(latents),
                           output_type="latent").images.numpy()
    _close(ours, theirs.transpose(0, 2, 3, 1))


@pytest.mark.slow
def test_guided_refiner_sampling_matches_diffusers_img2img_at_full_strength(tmp_path):
    """The refiner layout (text_encoder_2 alone, aesthetic-score time ids, its negative prompt encoded): at
    strength 1 diffusers' img2img denoises from the latents it is given over every step, which is
    text-to-image sampling from those latents; they are handed over already scaled by init_noise_sigma,
    as img2img takes them as they are."""
    import copy

    import jaxprobe

    reference = sd_reference.save_sdxl_pipeline(tmp_path / "refiner", refiner=True, force_zeros=False)
    pipe = jaxprobe.load(tmp_path / "refiner")
    latents, steps = _latents(), 3
    ours = pipe.capture(PROMPTS, ["latents"], num_inference_steps=steps, guidance_scale=5.0, latents=latents,
                        timesteps=[-1], reduce="none", aesthetic_score=7.0)["latents"][:, -1]
    scheduler = copy.deepcopy(reference.scheduler)
    scheduler.set_timesteps(steps)          # init_noise_sigma is the first inference step's
    start = torch.from_numpy(latents) * scheduler.init_noise_sigma
    with sd_reference.single_threaded(), torch.no_grad():
        theirs = reference(PROMPTS, image=torch.zeros(len(PROMPTS), 3, 32, 32), strength=1.0,
                           num_inference_steps=steps, guidance_scale=5.0, latents=start, aesthetic_score=7.0,
                           output_type="latent").images.numpy()
    _close(ours, theirs.transpose(0, 2, 3, 1))


@pytest.mark.slow
def test_steering_sdxl_mid_block_matches_a_diffusers_forward_hook(tmp_path):
    """Interventions on the SDXL family: Steer on unet.mid_block over two steps, both CFG halves."""
    import jaxprobe
    from jaxprobe.interventions import Steer

    reference = sd_reference.save_sdxl_pipeline(tmp_path / "sdxl")
    pipe = jaxprobe.load(tmp_path / "sdxl")
    latents, steps, scale = _latents(), range(1, 3), 2.0
    vector = np.random.default_rng(1).standard_normal(64).astype(np.float32)   # mid_block's width in sdxl2
    ours = pipe.capture(PROMPTS, ["latents"], num_inference_steps=4, guidance_scale=5.0, latents=latents,
                        timesteps=[-1], reduce="none", interventions=[Steer("unet.mid_block", vector, scale=scale,
                                                                             steps=steps)])["latents"][:, -1]
    calls = []

    def hook(module, args, output):
        calls.append(None)
        return output + torch.from_numpy(scale * vector)[None, :, None, None] if len(calls) - 1 in steps else output

    handle = reference.unet.mid_block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            theirs = reference(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents),
                               output_type="latent").images.numpy()
    finally:
        handle.remove()
    _close(ours, theirs.transpose(0, 2, 3, 1))


@pytest.mark.slow
def test_sae_hook_point_contributions_match_diffusers_forward_hooks(tmp_path):
    """What SDXL-Turbo SAEs train on: a transformer block's output minus its input, one step, no guidance."""
    import jaxprobe

    reference = sd_reference.save_sdxl_pipeline(tmp_path / "sdxl")
    pipe = jaxprobe.load(tmp_path / "sdxl")
    modules = ["mid_block.attentions.0", "down_blocks.1.attentions.0"]
    latents = _latents()
    ours = pipe.capture(PROMPTS, [f"unet.{m}.contribution" for m in modules], num_inference_steps=1,
                        guidance_scale=0.0, latents=latents, reduce="none")
    seen = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            seen[name] = sd_reference.nhwc(output[0] - (args[0] if args else kwargs["hidden_states"]))
        return hook

    handles = [reference.unet.get_submodule(m).register_forward_hook(keep(m), with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            reference(PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents),
                      output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    for m in modules:
        np.testing.assert_allclose(ours[f"unet.{m}.contribution"][:, 0], seen[m], atol=ATOL, rtol=RTOL, err_msg=m)
