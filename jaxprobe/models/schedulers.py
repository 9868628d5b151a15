"""Diffusion samplers in pure JAX with diffusers' numerics: PNDM (PLMS), DDIM, Euler, Euler ancestral,
DPM-Solver++ 2M, and flow-matching Euler (SD3, FLUX).

A sampler is split in two halves:

- `make_schedule` runs once on the host, in float64 NumPy. It turns a `SchedulerConfig` and a number of
  inference steps into per-evaluation scalars: the timestep the denoiser is conditioned on, the noise
  level of its input, and the solver's coefficients. Every branch diffusers takes on its step counter
  (PLMS's warm-up, DPM-Solver's first-order first and last steps, DDIM's off-grid "previous timestep")
  is resolved here, into numbers.
- `step` runs on the device inside the caller's jitted `lax.scan`. It gathers evaluation `i`'s scalars
  with a traced index and does a few multiply-adds, carrying the history a multistep solver needs
  (PLMS's past model outputs, DPM-Solver's previous x0) in a fixed-shape pytree. It has no control flow,
  so one compiled program serves every step.

The loop, as diffusers' pipelines run it (a `lax.scan` over `i` in practice)::

    schedule = make_schedule(config, num_inference_steps)
    latents = noise * init_noise_sigma(schedule)
    state = init_state(schedule, latents)
    for i in range(len(schedule.timesteps)):
        model_input = scale_model_input(schedule, latents, i)
        model_output = unet(model_input, schedule.timesteps[i])   # index with jnp when i is traced
        state, latents, x0 = step(schedule, state, model_output, i, latents, noise=...)  # ancestral only

Flow matching ("flow_euler", diffusers' FlowMatchEulerDiscreteScheduler) is the odd one out: the denoiser
predicts a velocity v = noise - x0 along the straight path x = (1 - sigma) * x0 + sigma * noise, timesteps
are sigma * num_train_timesteps (fractions), and x0 = x - sigma * v. Its noise levels may depend on the
image size (`use_dynamic_shifting`): then `make_schedule` needs `image_seq_len`, the denoiser's number of
image tokens, from which it computes the shift mu as diffusers' SD3 and FLUX pipelines do.

Euler ancestral (the Turbo models' sampler) is the one stochastic sampler: every step adds fresh noise, which
the caller draws and passes (`needs_noise`), so that runs stay a function of their seeds.

Numerics: diffusers builds its tables in float32 torch; jaxprobe builds them in float64 and rounds once to
float32, so the two agree to about 1e-6 relative and whole trajectories to about 1e-5 (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import CheckpointError, InputError

KINDS = ("pndm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "flow_euler")
# Samplers of velocity-predicting (rectified-flow) denoisers; the others take noise-prediction ones, and a
# checkpoint cannot be switched from one group to the other.
FLOW_KINDS = ("flow_euler",)
DIFFUSERS_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
# Names users may pass, matched case-insensitively: jaxprobe's short names and diffusers' class names.
SCHEDULERS: dict[str, str] = {**{kind: kind for kind in KINDS}, **{c: k for k, c in DIFFUSERS_CLASSES.items()}}
_NAME_TO_KIND = {name.lower(): kind for name, kind in SCHEDULERS.items()}

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIME_SHIFT_TYPES = ("exponential", "linear")

# What each diffusers class reads from scheduler_config.json, with that class's default for a missing key.
_DIFFUSERS_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         trained_betas=None, prediction_type="epsilon", steps_offset=0)
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "pndm": {**_DIFFUSERS_COMMON, "timestep_spacing": "leading", "skip_prk_steps": False,
             "set_alpha_to_one": False},
    "ddim": {**_DIFFUSERS_COMMON, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
             "clip_sample_range": 1.0},
    "euler": {**_DIFFUSERS_COMMON, "timestep_spacing": "linspace", "use_karras_sigmas": False,
              "final_sigmas_type": "zero"},
    "euler_ancestral": {**_DIFFUSERS_COMMON, "timestep_spacing": "linspace"},
    "dpmpp_2m": {**_DIFFUSERS_COMMON, "timestep_spacing": "linspace", "use_karras_sigmas": False,
                 "final_sigmas_type": "zero", "lower_order_final": True, "euler_at_final": False},
    "flow_euler": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift_terminal=None,
                       time_shift_type="exponential"),
}
# Options those classes also read that jaxprobe does not implement, with the one value it does implement.
_UNIMPLEMENTED: dict[str, dict[str, Any]] = {
    "pndm": {},
    "ddim": {"thresholding": False, "rescale_betas_zero_snr": False},
    "euler": {"interpolation_type": "linear", "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "sigma_min": None, "sigma_max": None, "timestep_type": "discrete", "rescale_betas_zero_snr": False},
    "euler_ancestral": {"rescale_betas_zero_snr": False},
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                 "thresholding": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None,
                 "lambda_min_clipped": -math.inf, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False},
    "flow_euler": {"invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                   "use_beta_sigmas": False, "stochastic_sampling": False},
}


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{field}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def _kind_of(name: str) -> str:
    kind = _NAME_TO_KIND.get(name.lower()) if isinstance(name, str) else None
    if kind is None:
        raise InputError(f"unknown scheduler {name!r}; known names: {', '.join(SCHEDULERS)}")
    return kind


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A sampler and its noise schedule: the fields of diffusers' scheduler_config.json that change numbers.

    The defaults are Stable Diffusion 1.x/2.x's noise schedule (scaled-linear betas, "leading" spacing,
    steps_offset=1), so `SchedulerConfig("euler")` is Euler on SD's schedule. `from_dict` instead fills a
    missing key with the default of the diffusers class, as diffusers itself does.
    """

    kind: str  # one of KINDS
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES; ignored when trained_betas is given
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"  # one of PREDICTION_TYPES ("sample" not for PNDM, as in diffusers)
    timestep_spacing: str = "leading"  # one of TIMESTEP_SPACINGS
    steps_offset: int = 1  # added to "leading" timesteps only, as in diffusers
    set_alpha_to_one: bool = False  # PNDM, DDIM: alpha_cumprod after the last step is 1, else alpha_cumprod[0]
    skip_prk_steps: bool = True  # PNDM: only True (PLMS with a two-evaluation warm-up, SD's setting) exists here
    clip_sample: bool = False  # DDIM: clip the predicted x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    use_karras_sigmas: bool = False  # Euler, DPM-Solver++: Karras et al. (2022) noise levels, rho=7
    final_sigmas_type: str = "zero"  # Euler, DPM-Solver++: noise level after the last step, FINAL_SIGMAS_TYPES
    lower_order_final: bool = True  # DPM-Solver++: first-order last step when there are fewer than 15 steps
    euler_at_final: bool = False  # DPM-Solver++: first-order last step always
    # Flow matching only (the beta and spacing fields above do not apply to it):
    shift: float = 1.0  # sigma -> shift * sigma / (1 + (shift - 1) * sigma); SD3's scheduler sets 3.0
    use_dynamic_shifting: bool = False  # shift by mu computed from the image size instead (FLUX, SD3.5 variants)
    base_shift: float = 0.5  # mu at base_image_seq_len image tokens, linear in the token count ...
    max_shift: float = 1.15  # ... up to mu at max_image_seq_len
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"  # TIME_SHIFT_TYPES: exp(mu) or mu takes the place of `shift`
    shift_terminal: float | None = None  # stretch the shifted sigmas so that the last one is this

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            hint = ""
            if isinstance(self.kind, str) and self.kind.lower() in _NAME_TO_KIND:
                hint = f" (scheduler_config({self.kind!r}) accepts any name in SCHEDULERS)"
            raise InputError(f"kind={self.kind!r} is not a scheduler kind; choose one of {', '.join(KINDS)}{hint}")
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("time_shift_type", self.time_shift_type, TIME_SHIFT_TYPES)
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise InputError(f"trained_betas has {len(self.trained_betas)} values for num_train_timesteps="
                             f"{self.num_train_timesteps}; give one beta per training timestep")
        if self.kind == "pndm" and not self.skip_prk_steps:
            raise InputError("PNDM with skip_prk_steps=False (Runge-Kutta warm-up) is not implemented; set "
                             "skip_prk_steps=True, as Stable Diffusion's scheduler_config.json does")
        if self.kind == "euler_ancestral" and (self.prediction_type == "sample" or self.use_karras_sigmas):
            raise InputError("Euler ancestral takes prediction_type 'epsilon' or 'v_prediction' and no Karras "
                             "sigmas (as diffusers' EulerAncestralDiscreteScheduler); use 'euler' for those")
        if self.kind == "pndm" and self.prediction_type == "sample":
            raise InputError("PNDM takes prediction_type 'epsilon' or 'v_prediction' (as in diffusers); for a "
                             "model that predicts x0 choose 'ddim', 'euler' or 'dpmpp_2m'")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], kind: str | None = None) -> SchedulerConfig:
        """Read a diffusers scheduler_config.json dict.

        `_class_name` picks the sampler unless `kind` (any name in SCHEDULERS) overrides it; the keys of the
        dict then configure the chosen sampler exactly as `<DiffusersClass>.from_config(cfg)` would: keys the
        class reads are taken, a missing one takes that class's default, others are ignored. Options the
        class reads with a value jaxprobe does not implement raise InputError.
        """
        if kind is None:
            if "_class_name" not in cfg:
                raise InputError(f"scheduler config has no _class_name; pass kind= one of {', '.join(SCHEDULERS)}")
            kind = cfg["_class_name"]
        kind = _kind_of(kind)
        for option, implemented in _UNIMPLEMENTED[kind].items():
            if option in cfg and cfg[option] != implemented:
                raise InputError(f"{DIFFUSERS_CLASSES[kind]} option {option}={cfg[option]!r} is not implemented "
                                 f"in jaxprobe (only {implemented!r}); drop it from the config or choose another "
                                 f"scheduler")
        values = {name: cfg.get(name, default) for name, default in _DIFFUSERS_DEFAULTS[kind].items()}
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(beta) for beta in values["trained_betas"])
        return cls(kind=kind, **values)

    @classmethod
    def from_file(cls, path: str | Path) -> SchedulerConfig:
        """Read scheduler_config.json, or the one inside a directory (a checkpoint's `scheduler/`)."""
        path = Path(path)
        if path.is_dir():
            path = path / "scheduler_config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read scheduler config {path}: {err}") from err
        return cls.from_dict(cfg)


def scheduler_config(name_or_config: str | SchedulerConfig | Mapping[str, Any],
                     base: SchedulerConfig | Mapping[str, Any] | None = None) -> SchedulerConfig:
    """The sampler a user asked for, on the noise schedule of `base` (usually the checkpoint's).

    A name (any key of SCHEDULERS, case-insensitive) switches the sampler of `base`: a SchedulerConfig keeps
    every other field, a scheduler_config.json dict is read for the named sampler (`from_dict(base, kind=)`),
    and no base means Stable Diffusion's schedule. A SchedulerConfig or a config dict is taken as it is.
    """
    if isinstance(name_or_config, SchedulerConfig):
        return name_or_config
    if isinstance(name_or_config, Mapping):
        return SchedulerConfig.from_dict(name_or_config)
    kind = _kind_of(name_or_config)
    if base is None:
        return SchedulerConfig(kind)
    base_kind = base.kind if isinstance(base, SchedulerConfig) else _kind_of(base.get("_class_name", kind))
    if (kind in FLOW_KINDS) != (base_kind in FLOW_KINDS):
        flow, other = (kind, base_kind) if kind in FLOW_KINDS else (base_kind, kind)
        raise InputError(f"cannot switch a {base_kind!r} checkpoint to {kind!r}: {flow!r} samples velocity-"
                         f"predicting (flow-matching) denoisers and {other!r} noise-predicting ones; choose a "
                         f"sampler of the same group ({', '.join(FLOW_KINDS)} for flow matching)")
    if isinstance(base, SchedulerConfig):
        return dataclasses.replace(base, kind=kind)
    return SchedulerConfig.from_dict(base, kind=kind)


# ---------------------------------------------------------------------------------------------------------
# Host side: the schedule of one num_inference_steps, in float64, rounded once to float32.


class DDIMUpdate(NamedTuple):
    """x_prev = alpha_prev * x0 + sigma_prev * eps (deterministic DDIM, eta=0)."""

    alpha_prev: np.ndarray  # (E,) sqrt(alpha_cumprod) at diffusers' previous timestep
    sigma_prev: np.ndarray  # (E,) sqrt(1 - alpha_cumprod) there


class PNDMUpdate(NamedTuple):
    """PLMS (Liu et al. 2022, eq. 9) on eps_hat = weights . (model_output, 3 past model outputs)."""

    weights: np.ndarray  # (E, 4) over (current output, past outputs newest first)
    push: np.ndarray  # (E,) bool: the current output joins the history
    restart: np.ndarray  # (E,) bool: step from the sample of evaluation 0 instead of the current one
    alpha_from: np.ndarray  # (E,) sqrt(alpha_cumprod) at the timestep stepped from (turns v into eps)
    sigma_from: np.ndarray  # (E,)
    sample_coeff: np.ndarray  # (E,) x_prev = sample_coeff * x - eps_coeff * eps_hat
    eps_coeff: np.ndarray  # (E,)


class EulerUpdate(NamedTuple):
    """x_prev = x + (x - x0) / sigma * (sigma_next - sigma) + sigma_up * noise, on the variance-exploding
    x = x_vp / alpha. Ancestral sampling steps down below the next level and adds fresh noise back up to it."""

    sigma: np.ndarray  # (E,) noise level of evaluation i, sqrt((1 - alpha_cumprod) / alpha_cumprod)
    sigma_next: np.ndarray  # (E,) the level the ODE step goes to (0 after the last step by default)
    sigma_up: np.ndarray  # (E,) the scale of the fresh noise added after it (0 for deterministic Euler)


class DPMUpdate(NamedTuple):
    """DPM-Solver++ 2M (Lu et al. 2022, midpoint): x_prev = sample_coeff * x + x0_coeff * (D0 + d1_weight * D1)."""

    sample_coeff: np.ndarray  # (E,) sigma_t / sigma_s
    x0_coeff: np.ndarray  # (E,) alpha_t * (1 - exp(-h))
    d1_weight: np.ndarray  # (E,) 0.5 / r0 on second-order steps, 0 on first-order ones; D1 = x0 - x0_prev


class FlowUpdate(NamedTuple):
    """x_prev = x + (sigma_next - sigma) * v on x = (1 - sigma) * x0 + sigma * noise, v = noise - x0."""

    sigma: np.ndarray  # (E,) the noise level of evaluation i's sample
    sigma_next: np.ndarray  # (E,) the level after its step, 0 after the last


Update = DDIMUpdate | PNDMUpdate | EulerUpdate | DPMUpdate | FlowUpdate


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["timesteps", "alpha", "sigma", "update"],
                   meta_fields=["config", "init_noise_sigma"])
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Everything `step` needs for one num_inference_steps, precomputed on the host.

    A pytree: the arrays are leaves (pass the schedule to `jax.jit` as an argument or close over it), the
    config is static. E = len(timesteps) model evaluations: num_inference_steps, or one more for PNDM,
    whose warm-up evaluates its second timestep twice. Evaluation i conditions the denoiser on
    timesteps[i] and feeds it `scale_model_input(schedule, sample, i)` = alpha[i] * x0 + sigma[i] * noise.
    """

    config: SchedulerConfig
    init_noise_sigma: float  # the scale of the initial noise; read it through init_noise_sigma(schedule)
    # (E,) diffusers' `scheduler.timesteps` exactly: int64, float32 for Euler and flow matching (fractions)
    timesteps: np.ndarray
    alpha: np.ndarray  # (E,) float32 signal scale of the model input at evaluation i
    sigma: np.ndarray  # (E,) float32 noise scale of the model input at evaluation i
    update: Update  # the sampler's per-evaluation coefficients, float32


def _schedule(config: SchedulerConfig, timesteps: np.ndarray, alpha: np.ndarray, sigma: np.ndarray,
              update: Update, init_noise_sigma: float = 1.0) -> Schedule:
    """Round the float64 tables once, to the float32 that `step` runs in."""
    def to_f32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) if a.dtype == np.float64 else a

    return Schedule(config=config, init_noise_sigma=float(init_noise_sigma), timesteps=timesteps,
                    alpha=to_f32(alpha), sigma=to_f32(sigma), update=jax.tree.map(to_f32, update))


def _alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """(num_train_timesteps,) float64: the fraction of signal variance left at each training timestep."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal's (2021) cosine schedule, betas capped at 0.999
        alpha_bar = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    return np.cumprod(1.0 - betas)


def _spaced_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """Diffusers' `timestep_spacing` (Lin et al. 2024, table 2): (num_steps,) float64, descending, unrounded."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps)[::-1]
    if config.timestep_spacing == "leading":
        return (np.arange(num_steps) * (n // num_steps) + config.steps_offset)[::-1].astype(np.float64)
    return np.round(np.arange(n, 0, -n / num_steps)) - 1  # trailing


def _previous_alphas_cumprod(config: SchedulerConfig, alphas_cumprod: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """alpha_cumprod at diffusers' "previous timestep" t - n_train // n_steps, which is off the schedule's grid
    for trailing and linspace spacing; past t=0 it is 1 or alpha_cumprod[0] (`set_alpha_to_one`)."""
    final = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
    return np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)


def _ddim_schedule(config: SchedulerConfig, num_steps: int, alphas_cumprod: np.ndarray) -> Schedule:
    timesteps = _spaced_timesteps(config, num_steps).round().astype(np.int64)
    a = alphas_cumprod[timesteps]
    a_prev = _previous_alphas_cumprod(config, alphas_cumprod, timesteps - config.num_train_timesteps // num_steps)
    return _schedule(config, timesteps, np.sqrt(a), np.sqrt(1 - a), DDIMUpdate(np.sqrt(a_prev), np.sqrt(1 - a_prev)))


# PLMS weights on (current output, past outputs newest first) by evaluation: diffusers' counter 0 steps
# with the current output alone and counter 1 redoes that step with the average of both (a Heun warm-up),
# then 2nd-, 3rd- and 4th-order Adams-Bashforth.
_PLMS_WEIGHTS = np.array([[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [3 / 2, -1 / 2, 0, 0],
                          [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]])


def _pndm_schedule(config: SchedulerConfig, num_steps: int, alphas_cumprod: np.ndarray) -> Schedule:
    ascending = _spaced_timesteps(config, num_steps)[::-1].round().astype(np.int64)
    timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]  # repeats the 2nd
    evaluation = np.arange(len(timesteps))
    jump = config.num_train_timesteps // num_steps
    t_from, t_to = timesteps.copy(), timesteps - jump
    if len(timesteps) > 1:  # evaluation 1 redoes the step of evaluation 0, from timesteps[1] + jump
        t_from[1], t_to[1] = timesteps[1] + jump, timesteps[1]
    a_from = alphas_cumprod[t_from]
    a_to = _previous_alphas_cumprod(config, alphas_cumprod, t_to)
    eps_coeff = (a_to - a_from) / (a_from * np.sqrt(1 - a_to) + np.sqrt(a_from * (1 - a_from) * a_to))
    a = alphas_cumprod[timesteps]
    update = PNDMUpdate(weights=_PLMS_WEIGHTS[np.minimum(evaluation, len(_PLMS_WEIGHTS) - 1)],
                        push=evaluation != 1, restart=evaluation == 1,
                        alpha_from=np.sqrt(a_from), sigma_from=np.sqrt(1 - a_from),
                        sample_coeff=np.sqrt(a_to / a_from), eps_coeff=eps_coeff)
    return _schedule(config, timesteps, np.sqrt(a), np.sqrt(1 - a), update)


def _karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: noise levels evenly spaced in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, num_steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose noise level is `sigmas`, interpolating log sigma linearly."""
    log_train = np.log(train_sigmas)  # ascending in t
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return low + w


def _final_sigma(config: SchedulerConfig, train_sigmas: np.ndarray) -> float:
    return 0.0 if config.final_sigmas_type == "zero" else float(train_sigmas[0])


def _vp_scales(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance-exploding noise level -> (alpha, sigma) of the matching variance-preserving sample."""
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    return alpha, sigmas * alpha


def _euler_schedule(config: SchedulerConfig, num_steps: int, alphas_cumprod: np.ndarray) -> Schedule:
    train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    timesteps = _spaced_timesteps(config, num_steps).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if config.use_karras_sigmas:
        sigmas = _karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        timesteps = _sigma_to_t(sigmas, train_sigmas).astype(np.float32)
    max_sigma = sigmas.max()
    init_noise_sigma = max_sigma if config.timestep_spacing != "leading" else math.sqrt(max_sigma**2 + 1)
    if config.kind == "euler_ancestral":  # diffusers' EulerAncestralDiscreteScheduler always ends at sigma 0
        sigma_to = np.append(sigmas[1:], 0.0)
        sigma_up = np.sqrt(sigma_to**2 * (sigmas**2 - sigma_to**2) / sigmas**2)
        update = EulerUpdate(sigmas, np.sqrt(sigma_to**2 - sigma_up**2), sigma_up)
    else:
        update = EulerUpdate(sigmas, np.append(sigmas[1:], _final_sigma(config, train_sigmas)), np.zeros_like(sigmas))
    return _schedule(config, timesteps, *_vp_scales(sigmas), update, init_noise_sigma)


def _dpm_schedule(config: SchedulerConfig, num_steps: int, alphas_cumprod: np.ndarray) -> Schedule:
    train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    if config.use_karras_sigmas:
        sigmas = _karras_sigmas(train_sigmas[0], train_sigmas[-1], num_steps)
        t = _sigma_to_t(sigmas, train_sigmas)
        timesteps = (t if config.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
    else:
        # DPM-Solver never evaluates t=0: it spaces num_steps + 1 points and drops the last (except "trailing")
        spaced = (_spaced_timesteps(config, num_steps) if config.timestep_spacing == "trailing"
                  else _spaced_timesteps(config, num_steps + 1)[:-1])
        timesteps = spaced.round().astype(np.int64)
        sigmas = train_sigmas[timesteps]
    sigma_next = np.append(sigmas[1:], _final_sigma(config, train_sigmas))
    alpha_s, sigma_s = _vp_scales(sigmas)
    alpha_t, sigma_t = _vp_scales(sigma_next)
    # lambda = log(alpha / sigma) = -log(variance-exploding sigma), so exp(-h) = sigma_next / sigma
    x0_coeff = alpha_t * (1 - sigma_next / sigmas)
    evaluation = np.arange(num_steps)
    first_order_final = config.euler_at_final or config.final_sigmas_type == "zero" or (
        config.lower_order_final and num_steps < 15)
    second_order = (evaluation >= 1) & ~((evaluation == num_steps - 1) & first_order_final)
    d1_weight = np.zeros(num_steps)
    i = evaluation[second_order]
    h, h_before = np.log(sigmas[i] / sigma_next[i]), np.log(sigmas[i - 1] / sigmas[i])
    d1_weight[i] = 0.5 * h / h_before  # 0.5 / r0 with r0 = h_before / h
    return _schedule(config, timesteps, alpha_s, sigma_s, DPMUpdate(sigma_t / sigma_s, x0_coeff, d1_weight))


def flow_shift_mu(config: SchedulerConfig, image_seq_len: int) -> float:
    """The resolution-dependent shift of `use_dynamic_shifting`, as SD3's and FLUX's pipelines compute it:
    linear in the number of image tokens through (base_image_seq_len, base_shift), (max_image_seq_len,
    max_shift)."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return image_seq_len * slope + config.base_shift - slope * config.base_image_seq_len


def _shifted(config: SchedulerConfig, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
    if mu is None:  # a larger shift spends more of the steps at high noise, where large images need them
        return config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    scale = math.exp(mu) if config.time_shift_type == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1))


def _flow_schedule(config: SchedulerConfig, num_steps: int, mu: float | None,
                   sigmas: np.ndarray | None = None) -> Schedule:
    n = config.num_train_timesteps
    if sigmas is not None:   # a pipeline's own (FLUX's), shifted in float32 as diffusers casts them first
        sigmas = np.asarray(sigmas).astype(np.float32)
    else:
        # diffusers' end points are its float32 training sigmas, the last one shifted unless shifting is dynamic
        train_min = np.float32(1.0) / np.float32(n)
        if not config.use_dynamic_shifting:
            train_min = np.float32(config.shift) * train_min / (1 + np.float32(config.shift - 1) * train_min)
        sigmas = np.linspace(n * 1.0, n * float(train_min), num_steps) / n
    sigmas = _shifted(config, sigmas, mu)
    if config.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(n)  # in float32, as diffusers multiplies its float32 sigmas
    sigma_next = np.append(sigmas[1:], np.float32(0))
    return _schedule(config, timesteps, 1 - sigmas, sigmas, FlowUpdate(sigmas, sigma_next))


_SCHEDULE_BUILDERS: dict[str, Callable[[SchedulerConfig, int, np.ndarray], Schedule]] = {
    "pndm": _pndm_schedule, "ddim": _ddim_schedule, "euler": _euler_schedule, "euler_ancestral": _euler_schedule,
    "dpmpp_2m": _dpm_schedule,
}


def make_schedule(config: SchedulerConfig, num_inference_steps: int, image_seq_len: int | None = None,
                  sigmas: np.ndarray | None = None) -> Schedule:
    """Timesteps and solver coefficients for `num_inference_steps`, as diffusers' `set_timesteps` makes them.

    image_seq_len: the denoiser's number of image tokens, which flow matching with `use_dynamic_shifting`
    needs (the pipelines' (latent height / patch) * (latent width / patch)); the other samplers ignore it.
    sigmas: flow matching's unshifted noise levels, one per step, as `set_timesteps(sigmas=)` takes them
    (FluxPipeline passes linspace(1, 1 / steps, steps)); None: the scheduler's own."""
    if not 1 <= num_inference_steps <= config.num_train_timesteps:
        raise InputError(f"num_inference_steps={num_inference_steps} must lie in [1, num_train_timesteps="
                         f"{config.num_train_timesteps}]")
    if config.kind in FLOW_KINDS:
        if config.use_dynamic_shifting and image_seq_len is None:
            raise InputError("this flow-matching schedule shifts by image size (use_dynamic_shifting=True): pass "
                             "image_seq_len=, the denoiser's number of image tokens")
        mu = flow_shift_mu(config, image_seq_len) if config.use_dynamic_shifting else None
        if sigmas is not None and len(sigmas) != num_inference_steps:
            raise InputError(f"{len(sigmas)} sigmas for {num_inference_steps} steps: pass one per step")
        return _flow_schedule(config, int(num_inference_steps), mu, sigmas)
    return _SCHEDULE_BUILDERS[config.kind](config, int(num_inference_steps), _alphas_cumprod(config))


def init_noise_sigma(schedule: Schedule) -> float:
    """The scale of the initial noise: latents = standard normal noise * init_noise_sigma(schedule)."""
    return schedule.init_noise_sigma


# ---------------------------------------------------------------------------------------------------------
# Device side: pure functions of a traced evaluation index, fit for lax.scan.


class PNDMState(NamedTuple):
    history: jax.Array  # (3, *sample.shape) past model outputs, newest first
    start: jax.Array  # (*sample.shape) the sample of evaluation 0, which evaluation 1 steps from again


class DPMState(NamedTuple):
    x0_prev: jax.Array  # (*sample.shape) the previous evaluation's x0 prediction


State = PNDMState | DPMState | tuple[()]


def _compute_dtype(sample: jax.Array) -> jnp.dtype:
    return jnp.promote_types(sample.dtype, jnp.float32)  # diffusers upcasts half-precision samples to step


def _at(tree: Any, i: jax.Array | int) -> Any:
    """Evaluation i's entries of every array in `tree`; i may be traced."""
    return jax.tree.map(lambda a: jnp.asarray(a)[i], tree)


def _denoise(model_output: jax.Array, sample: jax.Array, alpha: jax.Array, sigma: jax.Array,
             prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from the model output at sample = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * x0 (Salimans & Ho 2022)
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    return model_output, (sample - alpha * model_output) / sigma


def init_state(schedule: Schedule, sample: jax.Array) -> State:
    """The solver history before evaluation 0: zeros shaped like `sample`; `()` for one-step solvers."""
    zeros = jnp.zeros(sample.shape, _compute_dtype(sample))
    if schedule.config.kind == "pndm":
        return PNDMState(history=jnp.zeros((3, *sample.shape), zeros.dtype), start=zeros)
    if schedule.config.kind == "dpmpp_2m":
        return DPMState(x0_prev=zeros)
    return ()


def scale_model_input(schedule: Schedule, sample: jax.Array, i: jax.Array | int) -> jax.Array:
    """The denoiser's input at evaluation i: Euler's variance-exploding sample scaled back to unit variance."""
    if schedule.config.kind not in ("euler", "euler_ancestral"):
        return sample
    return (sample * _at(schedule.alpha, i)).astype(sample.dtype)


def _ddim_step(schedule, state, model_output, i, sample):
    config, update = schedule.config, _at(schedule.update, i)
    x0, eps = _denoise(model_output, sample, _at(schedule.alpha, i), _at(schedule.sigma, i), config.prediction_type)
    if config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return state, update.alpha_prev * x0 + update.sigma_prev * eps, x0


def _pndm_step(schedule, state, model_output, i, sample):
    update = _at(schedule.update, i)
    eps_hat = update.weights[0] * model_output + jnp.tensordot(update.weights[1:], state.history, axes=1)
    start = jnp.where(i == 0, sample, state.start)
    from_sample = jnp.where(update.restart, start, sample)
    if schedule.config.prediction_type == "v_prediction":  # PLMS combines raw outputs, then turns v into eps
        eps_hat = update.alpha_from * eps_hat + update.sigma_from * from_sample
    prev = update.sample_coeff * from_sample - update.eps_coeff * eps_hat
    pushed = jnp.concatenate([model_output[None], state.history[:-1]])
    history = jnp.where(update.push, pushed, state.history)
    # diffusers returns no x0 for PNDM: report the denoiser's own, as DDIM computes it at this evaluation
    x0, _ = _denoise(model_output, sample, _at(schedule.alpha, i), _at(schedule.sigma, i),
                     schedule.config.prediction_type)
    return PNDMState(history=history, start=start), prev, x0


def _euler_step(schedule, state, model_output, i, sample, noise=None):
    update, alpha = _at(schedule.update, i), _at(schedule.alpha, i)
    x0, _ = _denoise(model_output, sample * alpha, alpha, _at(schedule.sigma, i), schedule.config.prediction_type)
    derivative = (sample - x0) / update.sigma
    prev = sample + derivative * (update.sigma_next - update.sigma)
    return state, prev if noise is None else prev + noise.astype(prev.dtype) * update.sigma_up, x0


def _flow_step(schedule, state, model_output, i, sample):
    update = _at(schedule.update, i)
    x0 = sample - update.sigma * model_output
    return state, sample + (update.sigma_next - update.sigma) * model_output, x0


def _dpm_step(schedule, state, model_output, i, sample):
    update = _at(schedule.update, i)
    x0, _ = _denoise(model_output, sample, _at(schedule.alpha, i), _at(schedule.sigma, i),
                     schedule.config.prediction_type)
    prev = update.sample_coeff * sample + update.x0_coeff * (x0 + update.d1_weight * (x0 - state.x0_prev))
    return DPMState(x0_prev=x0), prev, x0


_STEPS = {"pndm": _pndm_step, "ddim": _ddim_step, "euler": _euler_step, "euler_ancestral": _euler_step,
          "dpmpp_2m": _dpm_step, "flow_euler": _flow_step}


def needs_noise(schedule: Schedule) -> bool:
    """Whether `step` takes fresh noise (standard normal, shaped like the sample) at every evaluation."""
    return schedule.config.kind == "euler_ancestral"


def step(schedule: Schedule, state: State, model_output: jax.Array, i: jax.Array | int,
         sample: jax.Array, noise: jax.Array | None = None) -> tuple[State, jax.Array, jax.Array]:
    """One sampler update after model evaluation i (traceable in i): (state, prev_sample, pred_original_sample).

    `sample` is what evaluation i started from (before `scale_model_input`); `model_output` what the
    denoiser returned for it. Evaluations run in order from i=0: the solvers' warm-up is tied to i.
    pred_original_sample is the x0 the sampler used (DDIM's clipped one); for PNDM, which has none in
    diffusers, it is the DDIM-style x0 of this evaluation's own model output; for flow matching, which has
    none either, it is x - sigma * v, the end of the straight path the velocity points along. Both outputs have
    `sample`'s dtype; the update runs in at least float32. noise: the ancestral sampler's fresh standard
    normal noise for this step (`needs_noise`), ignored by the others.
    """
    dtype = _compute_dtype(sample)
    kind = schedule.config.kind
    if needs_noise(schedule) and noise is None:
        raise InputError("Euler ancestral adds fresh noise at every step: pass noise= (standard normal, "
                         "shaped like the sample)")
    extra = (noise,) if needs_noise(schedule) else ()
    state, prev, x0 = _STEPS[kind](schedule, state, model_output.astype(dtype), i, sample.astype(dtype), *extra)
    return state, prev.astype(sample.dtype), x0.astype(sample.dtype)


def add_noise(config: SchedulerConfig, original: jax.Array, noise: jax.Array, timesteps: jax.Array | int) -> jax.Array:
    """The forward process at training timesteps t: sqrt(alpha_cumprod[t]) * x0 + sqrt(1 - alpha_cumprod[t]) * noise.

    original, noise: (batch, ...); timesteps: (batch,) or a scalar, integers, may be traced. This is the
    denoiser's input at t for every sampler (diffusers' DDPM/DDIM/PNDM `add_noise`); Euler's own sample at
    that noise level is this times sqrt(1 + sigma**2). For flow matching, t is a (fractional) timestep
    sigma * num_train_timesteps and the sample (1 - sigma) * x0 + sigma * noise (diffusers' `scale_noise`).
    """
    broadcast = (-1,) + (1,) * (original.ndim - 1)
    if config.kind in FLOW_KINDS:
        sigma = (jnp.asarray(timesteps, jnp.float32) / config.num_train_timesteps).reshape(broadcast)
        return ((1 - sigma) * original + sigma * noise).astype(original.dtype)
    alphas_cumprod = _alphas_cumprod(config)
    t = jnp.asarray(timesteps)
    signal = jnp.asarray(np.sqrt(alphas_cumprod), jnp.float32)[t]
    noise_scale = jnp.asarray(np.sqrt(1 - alphas_cumprod), jnp.float32)[t]
    noisy = signal.reshape(broadcast) * original + noise_scale.reshape(broadcast) * noise
    return noisy.astype(original.dtype)
