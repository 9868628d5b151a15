"""FLUX.1 against diffusers on tiny FluxPipelines written with save_pretrained, schnell-style (no guidance
embedding, no shift) and dev-style (guidance embedding, resolution-dependent shift): every double- and
single-stream block in both streams, 4-step sampling, the scheduler's sigmas, sites and an intervention."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sd_reference  # noqa: E402
import transformer_reference  # noqa: E402
from transformer_reference import relative_error  # noqa: E402
from jaxprobe.models import schedulers  # noqa: E402
from jaxprobe.pipeline.sites import flatten_intermediates  # noqa: E402

# one process builds the tiny pipelines the tests share (`make test` runs pytest -n 2 --dist loadgroup)
pytestmark = pytest.mark.xdist_group("flux")
RTOL = 1e-4
PROMPTS = ["A photo of a Zebra", "a drawing of a banana and a knife beside a dog"]
T5_TOKENS = 512   # FluxPipeline's max_sequence_length default


@pytest.fixture(scope="session", params=sorted(transformer_reference.FLUX_STYLES))
def flux_pipeline(request, tmp_path_factory):
    import jaxprobe

    folder = tmp_path_factory.mktemp(f"flux-{request.param}")
    reference = transformer_reference.save_flux_pipeline(folder, request.param)
    return dict(style=request.param, folder=folder, reference=reference, pipe=jaxprobe.load(folder))


def _packed(reference, latents):
    """(b, c, h, w) numpy latents -> FluxPipeline's packed (b, h/2 * w/2, 4c) tokens."""
    b, c, h, w = latents.shape
    return reference._pack_latents(torch.from_numpy(latents), b, c, h, w)


def test_every_flux_block_matches_diffusers_in_both_streams(flux_pipeline):
    """Dev-style only: schnell-style has the same blocks, and only lacks the guidance embedder, which its
    sampling test covers."""
    if flux_pipeline["style"] != "dev":
        pytest.skip("one transformer suffices: schnell-style has the same blocks, less the guidance embedder")
    model, component = flux_pipeline["reference"].transformer, flux_pipeline["pipe"].unet
    dev = True
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 6, 10, 4), dtype=np.float32)   # a 3x5 packed grid: rows and columns differ
    context = rng.standard_normal((2, 7, transformer_reference.T5_WIDTH), dtype=np.float32)
    pooled = rng.standard_normal((2, 16), dtype=np.float32)
    timesteps = np.array([0.0125, 0.987], np.float32)   # sigma, as FluxPipeline passes t / 1000
    guidance = np.array([3.5, 1.0], np.float32) if dev else None
    apply = functools.partial(component.module.apply, mutable=["intermediates"])
    out, state = sd_reference.run_once(apply, {"params": component.params}, sample, timesteps, context, pooled,
                                       guidance)
    sites = flatten_intermediates(state["intermediates"])
    names = [n for n in dict(model.named_modules()) if n in sites]
    recorded, handles = transformer_reference.hooked_streams(model, names)
    image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    try:
        with sd_reference.single_threaded(), torch.no_grad():
            ref = model(_packed(diffusers.FluxPipeline, sample.transpose(0, 3, 1, 2).copy()),
                        encoder_hidden_states=torch.from_numpy(context), pooled_projections=torch.from_numpy(pooled),
                        timestep=torch.from_numpy(timesteps), img_ids=image_ids, txt_ids=torch.zeros(7, 3),
                        guidance=None if guidance is None else torch.from_numpy(guidance)).sample
    finally:
        for handle in handles:
            handle.remove()
    theirs = diffusers.FluxPipeline._unpack_latents(ref, 48, 80, 8).numpy().transpose(0, 2, 3, 1)
    assert relative_error(out, theirs) < RTOL
    double = [f"transformer_blocks.{i}{part}" for i in range(2)
              for part in ("", ".context", ".attn", ".attn.context", ".ff", ".ff_context")]
    single = [f"single_transformer_blocks.{i}{part}" for i in range(2) for part in ("", ".context", ".attn")]
    expected = {"x_embedder", "context_embedder", "norm_out", "proj_out", "time_text_embed.timestep_embedder",
                "time_text_embed.text_embedder", *double, *single}
    if dev:
        expected.add("time_text_embed.guidance_embedder")
    assert expected <= set(recorded) and expected <= set(sites)
    for site in sorted(expected):
        assert relative_error(sites[site], recorded[site]) < RTOL, site
    # the single blocks split the joint sequence back: 15 image tokens at the block, the 7 text tokens beside
    assert sites["single_transformer_blocks.0"].shape == (2, 15, 16)
    assert sites["single_transformer_blocks.0.context"].shape == (2, 7, 16)
    np.testing.assert_array_equal(sites["single_transformer_blocks.0.context.input"], sites["transformer_blocks.1.context"])


def test_sampling_matches_the_diffusers_flux_pipeline(flux_pipeline):
    reference, pipe = flux_pipeline["reference"], flux_pipeline["pipe"]
    assert pipe.family.name == "flux" and pipe.scheduler.kind == "flow_euler"
    assert pipe.unet.config.guidance_embeds == (flux_pipeline["style"] == "dev")
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with sd_reference.single_threaded(), torch.no_grad():
        theirs = reference(PROMPTS, num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
                           latents=_packed(reference, latents), output_type="latent").images
        embeds, pooled, _ = reference.encode_prompt(PROMPTS, PROMPTS)
        projected = reference.transformer.context_embedder(embeds).numpy()
    theirs = reference._unpack_latents(theirs, 16, 16, reference.vae_scale_factor).numpy()
    sites = ["latents", "pred_original_sample", "transformer.transformer_blocks.1.context",
             "transformer.single_transformer_blocks.0", "transformer.single_transformer_blocks.1.context",
             "transformer.single_transformer_blocks.1.contribution",
             "transformer.single_transformer_blocks.1.context.contribution", "transformer.context_embedder"]
    feats = pipe.capture(PROMPTS, sites, num_inference_steps=4, guidance_scale=3.5, latents=latents, height=16,
                         width=16, reduce={"transformer.context_embedder": "none", "latents": "none",
                                           "pred_original_sample": "none", "*": "mean"})
    assert relative_error(feats["latents"][:, -1], theirs.transpose(0, 2, 3, 1)) < 1e-3
    assert feats["transformer.single_transformer_blocks.1.context"].shape == (2, 4, 16)
    for stream in ("", ".context"):   # what the block writes into each stream: neither nothing nor its output
        contribution = np.asarray(feats[f"transformer.single_transformer_blocks.1{stream}.contribution"])
        assert np.abs(contribution).max() > 0
    assert not np.allclose(feats["transformer.single_transformer_blocks.1.context.contribution"],
                           feats["transformer.single_transformer_blocks.1.context"])
    # the flow-matching step axis: FluxPipeline's timesteps, and x0 = x - sigma * v ends at the sample
    sigmas = np.linspace(1.0, 1 / 4, 4)
    mu = schedulers.flow_shift_mu(pipe.scheduler, 16)   # 4x4 packed tokens
    reference.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    np.testing.assert_array_equal(feats.timesteps, reference.scheduler.timesteps.numpy())
    np.testing.assert_allclose(feats["pred_original_sample"][:, -1], feats["latents"][:, -1], rtol=1e-5, atol=1e-5)
    # the conditioning the transformer read: T5's 512 states through context_embedder, CLIP's pooled output
    assert feats["transformer.context_embedder"].shape == (2, 4, T5_TOKENS, 16)
    assert relative_error(feats["transformer.context_embedder"][:, 0], projected) < RTOL
    assert pooled.shape == (2, 16)


@pytest.mark.parametrize("image_seq_len", [16, 1024, 4096])
@pytest.mark.parametrize("dynamic", [False, True])
def test_flux_schedule_matches_diffusers_set_timesteps(image_seq_len, dynamic):
    """FluxPipeline's sigmas, shifted by the resolution-dependent mu (dev) or not (schnell): diffusers' exactly."""
    options = transformer_reference.FLUX_SCHEDULERS["dev" if dynamic else "schnell"]
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    ours = schedulers.SchedulerConfig.from_dict({"_class_name": "FlowMatchEulerDiscreteScheduler", **options})
    from jaxprobe.models.families import FAMILIES

    for steps in (1, 4, 28):
        sigmas = FAMILIES["flux"].flow_sigmas(steps)
        mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
        theirs.set_timesteps(sigmas=sigmas, mu=mu)
        schedule = schedulers.make_schedule(ours, steps, image_seq_len=image_seq_len, sigmas=sigmas)
        np.testing.assert_array_equal(schedule.timesteps, theirs.timesteps.numpy())
        np.testing.assert_array_equal(np.append(schedule.update.sigma, 0.0).astype(np.float32),
                                      theirs.sigmas.numpy())


def test_flux_sites_name_both_streams_of_every_block(flux_pipeline):
    pipe = flux_pipeline["pipe"]
    blocks = pipe.select("transformer.*")
    streams = [f"transformer.{kind}.{i}{part}" for kind in ("transformer_blocks", "single_transformer_blocks")
               for i in range(2) for part in ("", ".context")]
    assert blocks == ["transformer.x_embedder", "transformer.context_embedder", *streams, "transformer.norm_out"]
    inner = set(pipe.select("transformer.single_transformer_blocks.0.**"))
    assert "transformer.single_transformer_blocks.0.attn" in inner
    assert {s.split(".")[0] for s in pipe.select("text_encoder*.*")} == {"text_encoder", "text_encoder_2"}
    assert pipe.bottleneck_site == "transformer.single_transformer_blocks.0"   # the middle of 2 + 2 blocks
    assert pipe.summary_text_site == "text_encoder.text_model.final_layer_norm"   # CLIP's, the first tower
    from jaxprobe.errors import InputError
    with pytest.raises(InputError, match="flux takes its context from a T5 encoder"):   # before anything compiles
        pipe.generate(["a cat"], num_inference_steps=1, text_layer=1)


@pytest.mark.parametrize("stream", ["", pytest.param(".context", marks=pytest.mark.slow)])
def test_steering_a_single_block_matches_a_diffusers_forward_hook(flux_pipeline, stream):
    """Steer single_transformer_blocks.0's image tokens (or its text tokens, `.context`) over steps 1-2, as a
    forward hook on diffusers' block; dev-style only (schnell runs the same blocks). One compiled program: the
    unsteered run it must differ from is diffusers'."""
    from jaxprobe.interventions import Steer

    if flux_pipeline["style"] != "dev":
        pytest.skip("one pipeline suffices: schnell-style runs the same blocks")
    reference, pipe = flux_pipeline["reference"], flux_pipeline["pipe"]
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vector, steps, scale = np.random.default_rng(1).standard_normal(16).astype(np.float32), range(1, 3), 2.0
    hook = transformer_reference.steering_hook(vector, scale, steps, text=bool(stream))

    def run_theirs():
        with sd_reference.single_threaded(), torch.no_grad():
            out = reference(PROMPTS, num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
                            latents=_packed(reference, latents), output_type="latent").images
        return reference._unpack_latents(out, 16, 16, reference.vae_scale_factor).numpy().transpose(0, 2, 3, 1)

    plain = run_theirs()
    handle = reference.transformer.single_transformer_blocks[0].register_forward_hook(hook)
    try:
        theirs = run_theirs()
    finally:
        handle.remove()
    steer = Steer(f"transformer.single_transformer_blocks.0{stream}", vector, scale=scale, steps=steps)
    ours = pipe.capture(PROMPTS, ["latents"], interventions=[steer], num_inference_steps=4, guidance_scale=3.5,
                        latents=latents, height=16, width=16, timesteps=[-1], reduce="none")["latents"][:, -1]
    assert relative_error(ours, theirs) < 1e-3 and relative_error(plain, theirs) > 1e-2


@pytest.mark.slow
def test_images_decode_with_the_flux_vae_shift(flux_pipeline):
    reference, pipe = flux_pipeline["reference"], flux_pipeline["pipe"]
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with sd_reference.single_threaded(), torch.no_grad():
        theirs = reference(PROMPTS[:1], num_inference_steps=2, guidance_scale=3.5, height=16, width=16,
                           latents=_packed(reference, latents), output_type="np").images
    ours = pipe.generate(PROMPTS[:1], num_inference_steps=2, guidance_scale=3.5, latents=latents, height=16, width=16)
    assert relative_error(ours, theirs) < 1e-3


def test_every_intervention_kind_on_both_streams(flux_pipeline):
    if flux_pipeline["style"] != "schnell":
        pytest.skip("one style suffices: the interventions act on the same blocks")
    transformer_reference.check_every_intervention_kind(
        flux_pipeline["pipe"], ("transformer.transformer_blocks.0", "transformer.transformer_blocks.1",
                                "transformer.single_transformer_blocks.0"), height=16, width=16)


def test_flux_random_is_flux_schnell_at_full_size_and_draws_nothing_to_be_listed():
    """FLUX.1-schnell's 11.9B-parameter transformer and T5-XXL, from their shapes alone (nothing is drawn)."""
    import jax
    import jaxprobe

    pipe = jaxprobe.load("flux-random", dtype="bfloat16")
    count = lambda c: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(c.abstract_params))  # noqa: E731
    assert pipe.family.name == "flux" and round(count(pipe.unet) / 1e8) == 119
    assert round(count(pipe.text_encoder_2) / 1e8) == 48 and pipe.scheduler.kind == "flow_euler"
    assert pipe.bottleneck_site == "transformer.single_transformer_blocks.9"
    assert "transformer.single_transformer_blocks.37.context" in pipe.sites()
