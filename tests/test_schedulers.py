"""jaxprobe.schedulers against diffusers' PyTorch schedulers, step by step, on the same inputs.

Both sides run the same sampling loop with the same deterministic stand-in for the UNet (a fixed smooth
function of the model input and the timestep), so every step's prev_sample and x0 must agree. jaxprobe
builds its tables in float64 where diffusers uses float32, hence a tolerance of 1e-5 relative to each
step's largest value rather than bitwise equality; timesteps must match exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxprobe.models import schedulers  # noqa: E402
from jaxprobe.errors import CheckpointError, InputError  # noqa: E402
from jaxprobe.models.schedulers import SchedulerConfig  # noqa: E402

DIFFUSERS = {kind: getattr(diffusers, name) for kind, name in schedulers.DIFFUSERS_CLASSES.items()}

# scheduler_config.json of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2 (768, v-prediction)
# and stabilityai/stable-diffusion-2-base, as published.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD2 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
       "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
       "trained_betas": None}
SD2_BASE = {**SD2, "_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0",
            "prediction_type": "epsilon"}
# A DPM-Solver++ 2M Karras config as community checkpoints ship it: every option spelled out.
DPMPP_KARRAS = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "dynamic_thresholding_ratio": 0.995,
                "euler_at_final": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
                "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 1,
                "thresholding": False, "timestep_spacing": "leading", "trained_betas": None,
                "use_karras_sigmas": True, "variance_type": None}

# The noise-prediction samplers, which share SD's beta schedules; flow matching has tests of its own below.
NOISE_KINDS = tuple(kind for kind in schedulers.KINDS if kind not in schedulers.FLOW_KINDS)
# scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers and of
# black-forest-labs/FLUX.1-dev (resolution-dependent shift), as published.
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}

STEPS = 12
LATENTS = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)  # (batch, c, h, w)
# Euler ancestral's fresh noise of every step, given to both sides (diffusers draws it inside `step`)
STEP_NOISE = np.random.default_rng(1).standard_normal((60, *LATENTS.shape)).astype(np.float32)


def pseudo_unet(xp, model_input, t):
    """A deterministic stand-in for the denoiser: smooth, bounded, and different at every timestep."""
    return 0.8 * xp.tanh(model_input) + 0.3 * xp.cos(1.7 * model_input + t / 150.0)


def diffusers_trajectory(kind: str, cfg: dict, num_steps: int, mu: float | None = None):
    """Diffusers' sampling loop: (timesteps, prev_sample per step, x0 per step), as NumPy arrays."""
    sched = DIFFUSERS[kind].from_config(cfg)
    sched.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
    x = torch.from_numpy(LATENTS) * getattr(sched, "init_noise_sigma", 1.0)  # flow matching: unscaled noise
    samples, x0s = [], []
    module = sys.modules[type(sched).__module__]
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        model_output = torch.from_numpy(pseudo_unet(np, model_input.numpy(), np.float32(t)))
        noise = (mock.patch.object(module, "randn_tensor", lambda *a, i=i, **k: torch.from_numpy(STEP_NOISE[i]))
                 if kind == "euler_ancestral" else contextlib.nullcontext())
        with noise:
            out = sched.step(model_output, t, x)
        if kind == "pndm":  # diffusers returns no x0 here: the DDIM-style x0 of this evaluation's output
            a = sched.alphas_cumprod[int(t)]
            x0 = ((x - (1 - a) ** 0.5 * model_output) / a**0.5 if sched.config.prediction_type == "epsilon"
                  else a**0.5 * x - (1 - a) ** 0.5 * model_output)
        elif kind == "flow_euler":  # diffusers returns no x0 either: the end of the velocity's straight path
            x0 = x - sched.sigmas[i] * model_output
        elif kind == "dpmpp_2m":
            x0 = sched.model_outputs[-1]  # the converted model output is DPM-Solver++'s x0
        else:
            x0 = out.pred_original_sample
        x = out.prev_sample
        samples.append(x.numpy())
        x0s.append(x0.numpy())
    return sched.timesteps.numpy(), np.stack(samples), np.stack(x0s)


def eager_trajectory(schedule: schedulers.Schedule, latents: jax.Array):
    """jaxprobe's loop step by step in Python, as diffusers runs it: (prev_sample, x0) per step."""
    x = latents * schedulers.init_noise_sigma(schedule)
    state = schedulers.init_state(schedule, x)
    samples, x0s = [], []
    for i in map(jnp.int32, range(len(schedule.timesteps))):  # an array index: one cached op, not one per i
        t = jnp.asarray(schedule.timesteps)[i].astype(jnp.float32)
        model_output = pseudo_unet(jnp, schedulers.scale_model_input(schedule, x, i), t)
        state, x, x0 = schedulers.step(schedule, state, model_output, i, x, noise=jnp.asarray(STEP_NOISE)[i])
        samples.append(x)
        x0s.append(x0)
    return jnp.stack(samples), jnp.stack(x0s)


@jax.jit
def scanned_trajectory(schedule: schedulers.Schedule, latents: jax.Array):
    """The same loop as the sampling pipeline runs it: one jitted lax.scan over evaluation indices."""
    x = latents * schedulers.init_noise_sigma(schedule)

    def body(carry, i):
        state, x = carry
        t = jnp.asarray(schedule.timesteps)[i].astype(jnp.float32)
        model_output = pseudo_unet(jnp, schedulers.scale_model_input(schedule, x, i), t)
        state, x, x0 = schedulers.step(schedule, state, model_output, i, x, noise=jnp.asarray(STEP_NOISE)[i])
        return (state, x), (x, x0)

    _, (samples, x0s) = jax.lax.scan(body, (schedulers.init_state(schedule, x), x),
                                     jnp.arange(len(schedule.timesteps)))
    return samples, x0s


def assert_steps_close(actual, expected, what: str, rel: float = 1e-5):
    """Every step within `rel` of that step's largest magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).reshape(len(expected), -1).max(axis=1)
    scale = np.abs(expected).reshape(len(expected), -1).max(axis=1)
    worst = int(np.argmax(err / scale))
    assert (err <= rel * scale).all(), f"{what}: step {worst} off by {err[worst]:.3g} at scale {scale[worst]:.3g}"


def _cfg(kind: str, **options) -> dict:
    return {**SD15, "_class_name": schedulers.DIFFUSERS_CLASSES[kind], **options}


TRAJECTORY_CASES = {
    f"{kind}-{prediction}-{spacing}": (kind, dict(prediction_type=prediction, timestep_spacing=spacing), STEPS)
    for kind in NOISE_KINDS for prediction in ("epsilon", "v_prediction")
    for spacing in schedulers.TIMESTEP_SPACINGS
}
TRAJECTORY_CASES.update({
    "pndm-sd15-50-steps": ("pndm", {}, 50),
    "pndm-2-steps": ("pndm", {}, 2),  # warm-up cut short: the Heun pair then one 2nd-order step
    "pndm-3-steps-trailing": ("pndm", dict(timestep_spacing="trailing"), 3),
    "pndm-alpha-to-one": ("pndm", dict(set_alpha_to_one=True), STEPS),
    "pndm-linear-betas": ("pndm", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), STEPS),
    "ddim-clip-sample": ("ddim", dict(clip_sample=True), STEPS),
    "ddim-sample-prediction": ("ddim", dict(prediction_type="sample"), STEPS),
    "ddim-cosine-betas-alpha-to-one": ("ddim", dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True), STEPS),
    "euler-karras": ("euler", dict(use_karras_sigmas=True), STEPS),
    "euler-karras-leading": ("euler", dict(use_karras_sigmas=True, timestep_spacing="leading"), STEPS),
    "euler-sigma-min-final": ("euler", dict(final_sigmas_type="sigma_min"), STEPS),
    "euler-sample-prediction": ("euler", dict(prediction_type="sample"), STEPS),
    "dpmpp_2m-karras-v": ("dpmpp_2m", dict(use_karras_sigmas=True, prediction_type="v_prediction"), STEPS),
    "dpmpp_2m-sigma-min-final-25": ("dpmpp_2m", dict(final_sigmas_type="sigma_min"), 25),  # 2nd order to the end
    "dpmpp_2m-sigma-min-final-12": ("dpmpp_2m", dict(final_sigmas_type="sigma_min"), STEPS),  # < 15: 1st order
    "dpmpp_2m-no-lower-order-final": ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False), STEPS),
    "dpmpp_2m-euler-at-final": ("dpmpp_2m", dict(final_sigmas_type="sigma_min", euler_at_final=True), 25),
    "dpmpp_2m-sample-prediction": ("dpmpp_2m", dict(prediction_type="sample"), STEPS),
    "dpmpp_2m-2-steps": ("dpmpp_2m", {}, 2),
})


@pytest.mark.parametrize("case", sorted(TRAJECTORY_CASES))
def test_trajectory_matches_diffusers(case):
    kind, options, num_steps = TRAJECTORY_CASES[case]
    cfg = _cfg(kind, **options)
    timesteps, samples, x0s = diffusers_trajectory(kind, cfg, num_steps)
    schedule = schedulers.make_schedule(SchedulerConfig.from_dict(cfg), num_steps)
    if kind == "euler" and options.get("use_karras_sigmas"):  # fractional timesteps from float32 vs float64 logs
        np.testing.assert_allclose(schedule.timesteps, timesteps, rtol=1e-5, atol=1e-3)
    else:
        np.testing.assert_array_equal(schedule.timesteps, timesteps, strict=True)
    ours_samples, ours_x0s = eager_trajectory(schedule, jnp.asarray(LATENTS))
    assert_steps_close(ours_samples, samples, "prev_sample")
    assert_steps_close(ours_x0s, x0s, "pred_original_sample")


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("spacing", schedulers.TIMESTEP_SPACINGS)
def test_schedule_tables_match_diffusers(kind, spacing):
    """Timesteps, noise levels and the initial noise scale for many step counts, host side only.

    Noise levels get 5e-5: near t=0 diffusers' float32 `1 - alphas_cumprod` keeps only ~4 digits."""
    cfg = _cfg(kind, timestep_spacing=spacing)
    for num_steps in (1, 2, 3, 7, 10, 15, 30, 50, 100, 333):
        sched = DIFFUSERS[kind].from_config(cfg)
        sched.set_timesteps(num_steps)
        schedule = schedulers.make_schedule(SchedulerConfig.from_dict(cfg), num_steps)
        np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy(), strict=True)
        assert schedulers.init_noise_sigma(schedule) == pytest.approx(float(sched.init_noise_sigma), rel=5e-5)
        if kind in ("euler", "euler_ancestral", "dpmpp_2m"):
            np.testing.assert_allclose(schedule.update.sigma if kind.startswith("euler") else
                                       schedule.sigma / schedule.alpha, sched.sigmas[:-1].numpy(), rtol=5e-5)


def test_published_configs_read_as_diffusers_reads_them():
    assert SchedulerConfig.from_dict(SD15) == SchedulerConfig("pndm")  # SD's schedule is the default
    assert SchedulerConfig.from_dict(SD2) == SchedulerConfig("ddim", prediction_type="v_prediction")
    assert SchedulerConfig.from_dict(SD2_BASE) == SchedulerConfig("pndm")
    karras = SchedulerConfig.from_dict(DPMPP_KARRAS)
    assert (karras.kind, karras.use_karras_sigmas, karras.timestep_spacing) == ("dpmpp_2m", True, "leading")
    # a missing key takes the default of the diffusers class, not SD's: DDIM clips x0 unless told otherwise
    assert SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"}) == SchedulerConfig(
        "ddim", beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0, set_alpha_to_one=True,
        clip_sample=True)


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("base", [SD15, SD2, DPMPP_KARRAS], ids=["sd15", "sd2", "dpmpp_karras"])
def test_switching_sampler_by_name_matches_diffusers_from_config(kind, base):
    """`scheduler_config(name, base=checkpoint config)` is diffusers' `Class.from_config(pipe.scheduler.config)`."""
    if kind == "pndm" and base is DPMPP_KARRAS:
        pytest.skip("a DPM config has no skip_prk_steps, and PNDM's Runge-Kutta warm-up is not implemented")
    pipe_scheduler = getattr(diffusers, base["_class_name"]).from_config(base)
    sched = DIFFUSERS[kind].from_config(pipe_scheduler.config)
    sched.set_timesteps(30)
    config = schedulers.scheduler_config(kind, base=base)
    schedule = schedulers.make_schedule(config, 30)
    np.testing.assert_allclose(schedule.timesteps, sched.timesteps.numpy(), rtol=1e-5, atol=1e-3)
    assert config.prediction_type == sched.config.prediction_type
    assert schedulers.init_noise_sigma(schedule) == pytest.approx(float(sched.init_noise_sigma), rel=1e-5)


FLOW_CASES = {
    "sd3-shift-3": (SD3, 28, {}),
    "sd3-4-steps": (SD3, 4, {}),
    "no-shift-1-step": ({**SD3, "shift": 1.0}, 1, {}),
    "flux-dynamic-1024": (FLUX, 12, dict(image_seq_len=4096)),  # 1024x1024: 128x128 latents, 2x2 patches
    "flux-dynamic-512": (FLUX, 4, dict(image_seq_len=1024)),
    "dynamic-linear-shift-terminal": ({**FLUX, "time_shift_type": "linear", "shift_terminal": 0.02}, 12,
                                      dict(image_seq_len=2000)),
    "shift-terminal-500-train-steps": ({**SD3, "shift_terminal": 0.1, "num_train_timesteps": 500}, 7, {}),
}


@pytest.mark.parametrize("case", sorted(FLOW_CASES))
def test_flow_matching_matches_diffusers(case):
    """Sigmas and timesteps exactly diffusers' (same float32 roundings); every step's sample and x0 close."""
    cfg, num_steps, options = FLOW_CASES[case]
    config = SchedulerConfig.from_dict(cfg)
    mu = schedulers.flow_shift_mu(config, options["image_seq_len"]) if config.use_dynamic_shifting else None
    timesteps, samples, x0s = diffusers_trajectory("flow_euler", cfg, num_steps, mu=mu)
    schedule = schedulers.make_schedule(config, num_steps, **options)
    np.testing.assert_array_equal(schedule.timesteps, timesteps, strict=True)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
    np.testing.assert_array_equal(schedule.update.sigma, sched.sigmas[:-1].numpy(), strict=True)
    np.testing.assert_array_equal(schedule.update.sigma_next, sched.sigmas[1:].numpy(), strict=True)
    assert schedulers.init_noise_sigma(schedule) == 1.0  # the SD3 and FLUX pipelines start from plain noise
    ours_samples, ours_x0s = eager_trajectory(schedule, jnp.asarray(LATENTS))
    assert_steps_close(ours_samples, samples, "prev_sample")
    assert_steps_close(ours_x0s, x0s, "pred_original_sample")
    scanned = scanned_trajectory(schedule, jnp.asarray(LATENTS))
    np.testing.assert_allclose(scanned[0], ours_samples, rtol=1e-6, atol=1e-6)


def test_flow_shift_mu_is_the_pipelines_calculate_shift():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
    config = SchedulerConfig.from_dict({**FLUX, "max_shift": 1.3, "max_image_seq_len": 3000})
    for tokens in (64, 256, 1024, 4096, 9000):
        assert schedulers.flow_shift_mu(config, tokens) == pytest.approx(
            calculate_shift(tokens, 256, 3000, 0.5, 1.3), rel=1e-12)


def test_flow_matching_configs_name_the_fix():
    with pytest.raises(InputError, match="pass image_seq_len="):
        schedulers.make_schedule(SchedulerConfig.from_dict(FLUX), 4)
    with pytest.raises(InputError, match="stochastic_sampling=True is not implemented"):
        SchedulerConfig.from_dict({**SD3, "stochastic_sampling": True})
    with pytest.raises(InputError, match="time_shift_type='cubic'"):
        SchedulerConfig.from_dict({**FLUX, "time_shift_type": "cubic"})
    with pytest.raises(InputError, match="cannot switch a 'flow_euler' checkpoint to 'ddim'.*same group"):
        schedulers.scheduler_config("ddim", base=SD3)
    with pytest.raises(InputError, match="cannot switch a 'pndm' checkpoint to 'flow_euler'"):
        schedulers.scheduler_config("FlowMatchEulerDiscreteScheduler", base=SchedulerConfig("pndm"))
    assert schedulers.scheduler_config("flow_euler", base=SD3).shift == 3.0


def test_flow_add_noise_matches_diffusers_scale_noise():
    noise = np.random.default_rng(1).standard_normal(LATENTS.shape).astype(np.float32)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3)
    sched.set_timesteps(10)
    t = sched.timesteps[[2, 7]]
    expected = sched.scale_noise(torch.from_numpy(LATENTS), t, torch.from_numpy(noise))
    noisy = schedulers.add_noise(SchedulerConfig.from_dict(SD3), LATENTS, noise, t.numpy())
    np.testing.assert_allclose(noisy, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_names_and_bases():
    assert schedulers.scheduler_config("DDIM").kind == "ddim"
    assert schedulers.scheduler_config("EulerDiscreteScheduler").kind == "euler"
    assert schedulers.scheduler_config("dpmpp_2m") == SchedulerConfig("dpmpp_2m")
    custom = SchedulerConfig("pndm", beta_end=0.02, prediction_type="v_prediction")
    assert schedulers.scheduler_config("euler", base=custom) == SchedulerConfig(
        "euler", beta_end=0.02, prediction_type="v_prediction")
    assert schedulers.scheduler_config(custom) is custom
    assert schedulers.scheduler_config(SD2) == SchedulerConfig.from_dict(SD2)
    with pytest.raises(InputError, match="unknown scheduler .heun.*pndm, ddim, euler, euler_ancestral, dpmpp_2m"):
        schedulers.scheduler_config("heun")
    with pytest.raises(InputError, match="unknown scheduler 'LMSDiscreteScheduler'"):
        SchedulerConfig.from_dict({**SD15, "_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(InputError, match="scheduler_config\\('DDIM'\\)"):
        SchedulerConfig("DDIM")


@pytest.mark.parametrize("cfg, kind, message", [
    ({**DPMPP_KARRAS, "algorithm_type": "sde-dpmsolver++"}, None, "algorithm_type='sde-dpmsolver\\+\\+'"),
    ({**DPMPP_KARRAS, "solver_order": 3}, None, "solver_order=3"),
    ({**SD2, "thresholding": True}, None, "thresholding=True"),
    ({**SD15, "interpolation_type": "log_linear"}, "euler", "interpolation_type='log_linear'"),
    ({**SD15, "skip_prk_steps": False}, None, "skip_prk_steps=True"),
    ({"_class_name": "PNDMScheduler"}, None, "skip_prk_steps=True"),  # diffusers' PNDM default is the PRK warm-up
    ({**SD2, "prediction_type": "sample"}, "pndm", "PNDM takes prediction_type"),
    ({**SD15, "timestep_spacing": "uniform"}, None, "timestep_spacing='uniform'"),
    ({**SD15, "trained_betas": [0.1, 0.2]}, None, "trained_betas has 2 values"),
    ({key: value for key, value in SD15.items() if key != "_class_name"}, None, "no _class_name"),
])
def test_unsupported_configs_name_the_fix(cfg, kind, message):
    with pytest.raises(InputError, match=message):
        SchedulerConfig.from_dict(cfg, kind=kind)


def test_options_of_other_classes_are_ignored_like_diffusers():
    """A DPM-only option cannot block switching that checkpoint to Euler."""
    config = SchedulerConfig.from_dict({**DPMPP_KARRAS, "solver_order": 3}, kind="euler")
    assert config.kind == "euler" and config.use_karras_sigmas


def test_from_file_reads_a_file_or_a_scheduler_directory(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD2))
    assert SchedulerConfig.from_file(tmp_path / "scheduler_config.json") == SchedulerConfig.from_dict(SD2)
    assert SchedulerConfig.from_file(tmp_path) == SchedulerConfig.from_dict(SD2)
    with pytest.raises(CheckpointError, match="cannot read scheduler config"):
        SchedulerConfig.from_file(tmp_path / "missing")


def test_num_inference_steps_is_checked():
    with pytest.raises(InputError, match="num_inference_steps=0"):
        schedulers.make_schedule(SchedulerConfig("ddim"), 0)
    with pytest.raises(InputError, match="num_inference_steps=1001"):
        schedulers.make_schedule(SchedulerConfig("ddim"), 1001)


@pytest.mark.parametrize("kind", schedulers.KINDS)
def test_jitted_scan_equals_step_by_step(kind):
    """`step` under jit + lax.scan (traced index, state in the carry) is the function the parity tests check."""
    schedule = schedulers.make_schedule(SchedulerConfig(kind, prediction_type="v_prediction"), 12)
    scanned = scanned_trajectory(schedule, jnp.asarray(LATENTS))
    for got, expected in zip(scanned, eager_trajectory(schedule, jnp.asarray(LATENTS)), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", schedulers.KINDS)
def test_half_precision_samples_keep_their_dtype(kind):
    """bfloat16 latents stay bfloat16 through the scan carry while the update itself runs in float32."""
    schedule = schedulers.make_schedule(SchedulerConfig(kind, prediction_type="v_prediction"), 12)  # as above
    samples, x0s = scanned_trajectory(schedule, jnp.asarray(LATENTS, jnp.bfloat16))
    assert samples.dtype == x0s.dtype == jnp.bfloat16
    reference, _ = scanned_trajectory(schedule, jnp.asarray(LATENTS))
    assert_steps_close(samples, reference, "bfloat16 prev_sample", rel=0.05)


def test_add_noise_matches_diffusers_forward_process():
    noise = np.random.default_rng(1).standard_normal(LATENTS.shape).astype(np.float32)
    timesteps = np.array([25, 981])
    expected = diffusers.DDIMScheduler.from_config(SD2).add_noise(
        torch.from_numpy(LATENTS), torch.from_numpy(noise), torch.from_numpy(timesteps))
    config = SchedulerConfig.from_dict(SD2)
    noisy = jax.jit(schedulers.add_noise, static_argnums=0)(config, LATENTS, noise, timesteps)
    np.testing.assert_allclose(noisy, expected.numpy(), rtol=1e-5, atol=1e-6)
    single = schedulers.add_noise(config, LATENTS[:1], noise[:1], 25)  # a scalar timestep broadcasts too
    np.testing.assert_allclose(single, expected.numpy()[:1], rtol=1e-5, atol=1e-6)
