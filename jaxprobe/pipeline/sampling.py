"""The sampling loop: one jitted `lax.scan` over denoising steps with classifier-free guidance that
returns, besides the final latents, the reduced activations of every requested site at every step.

Also the two other ways into the UNet: `generate` (decode, optionally embed with CLIP vision) and
`capture_images` (Revelio: encode real images, noise them to step t, one UNet pass).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.models import schedulers
from jaxprobe.pipeline.reductions import SPATIAL_REDUCTIONS, reduce_spatial
from jaxprobe.pipeline.sites import flatten_intermediates
from jaxprobe.errors import InputError, SiteError
from jaxprobe.models import unet as unet_model
from jaxprobe.pipeline.images import load_images

if TYPE_CHECKING:
    from jaxprobe.checkpoints.component import Component
    from jaxprobe.pipeline.pipeline import Pipeline

_PROBS = ".probs"


def _example_unet_inputs(config: unet_model.UNetConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    side = config.sample_size
    return (jnp.zeros((batch, side, side, config.in_channels)), jnp.zeros(()),
            jnp.zeros((batch, 77, config.cross_attention_dim)))


def unet_site_names(unet: "Component") -> list[str]:
    def trace():
        _, state = unet.module.apply({"params": unet.params}, *_example_unet_inputs(unet.config),
                                     mutable=["intermediates"])
        return state["intermediates"]

    return list(flatten_intermediates(jax.eval_shape(trace)))


def unet_block_sites(sites: Iterable[str]) -> list[str]:
    regex = re.compile("|".join(f"(?:{p})" for p in unet_model.BLOCK_SITES))
    return [s for s in sites if regex.fullmatch(s.removeprefix("unet."))]


def _allowed_reductions(site: str) -> tuple[str, ...]:
    return ("mean", "none") if site.endswith(_PROBS) else SPATIAL_REDUCTIONS


@dataclass(frozen=True)
class CapturePlan:
    """What one sampling program returns besides the latents (static under jit)."""

    sites: tuple[str, ...]        # paths inside the UNet, or SAMPLER_SITES
    reductions: tuple[str, ...]
    branch: str                   # "cond" | "uncond": which CFG half is captured
    guided: bool                  # classifier-free guidance on (guidance_scale > 1)


def _reduce_site(site: str, x: jax.Array, how: str) -> jax.Array:
    if site.endswith(_PROBS):  # (b, h*w, tokens) cross-attention probabilities
        return x.mean(axis=1) if how == "mean" else jnp.swapaxes(x, 1, 2)
    return reduce_spatial(x, how)


def _capture_step(plan: CapturePlan, acts: dict[str, jax.Array], batch: int) -> dict[str, jax.Array]:
    """Keep the requested CFG half of each UNet activation (the batch is [uncond; cond]) and reduce it."""
    half = slice(batch, None) if plan.branch == "cond" else slice(0, batch)
    out = {}
    for site, how in zip(plan.sites, plan.reductions):
        if site in acts:
            x = acts[site][half] if plan.guided else acts[site]
            out[site] = _reduce_site(site, x, how).astype(jnp.float32)
    return out


@functools.partial(jax.jit, static_argnames=("module", "plan"))
def sample_program(module: unet_model.UNet2DConditionModel, params: Any, schedule: schedulers.Schedule,
                   plan: CapturePlan, inputs: dict[str, jax.Array], guidance_scale: jax.Array,
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoise `inputs["noise"]` (b, h, w, c) conditioned on `inputs["cond"]` (b, tokens, d) (and
    `inputs["uncond"]` when guided). Returns final latents (b, h, w, c) and {site: (b, steps, ...)}."""
    noise, cond = inputs["noise"], inputs["cond"]
    batch = noise.shape[0]
    context = jnp.concatenate([inputs["uncond"], cond]) if plan.guided else cond
    latents = noise * schedulers.init_noise_sigma(schedule)

    def denoise(carry, i):
        latents, state = carry
        model_in = schedulers.scale_model_input(schedule, latents, i)
        model_in = jnp.concatenate([model_in, model_in]) if plan.guided else model_in
        t = jnp.asarray(schedule.timesteps)[i]
        eps, inter = module.apply({"params": params}, model_in.astype(module.dtype), t, context,
                                  mutable=["intermediates"])
        eps = eps.astype(jnp.float32)
        if plan.guided:
            eps_uncond, eps_cond = eps[:batch], eps[batch:]
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        state, latents, x0 = schedulers.step(schedule, state, eps, i, latents)
        captured = _capture_step(plan, flatten_intermediates(inter["intermediates"]), batch)
        sampler = {"latents": latents, "pred_original_sample": x0}
        for site, how in zip(plan.sites, plan.reductions):
            if site in sampler:
                captured[site] = reduce_spatial(sampler[site], how).astype(jnp.float32)
        return (latents, state), captured

    init = (latents, schedulers.init_state(schedule, latents))
    (latents, _), captured = jax.lax.scan(denoise, init, jnp.arange(len(schedule.timesteps)))
    return latents, {site: jnp.moveaxis(v, 0, 1) for site, v in captured.items()}  # (b, steps, ...)


# ---------------------------------------------------------------------------------------------
# Host-side drivers


def _require(pipe: "Pipeline", *names: str) -> None:
    missing = [n for n in names if getattr(pipe, n) is None]
    if missing:
        raise SiteError(f"{pipe.source} has no {', '.join(missing)}: UNet capture needs a full Stable Diffusion "
                        "pipeline folder (model_index.json) or the bundled 'tiny' model")


def latent_shape(pipe: "Pipeline", height: int | None, width: int | None) -> tuple[int, int, int]:
    """(h, w, c) of the latents for an image of height x width pixels (default: the UNet's sample size)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 8
    side = pipe.unet.config.sample_size
    h = side if height is None else height // factor
    w = side if width is None else width // factor
    multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if h % multiple or w % multiple:
        raise InputError(f"latent size {h}x{w} must be divisible by {multiple}; pick height/width multiples of "
                         f"{multiple * factor} pixels")
    return h, w, pipe.unet.config.in_channels


def make_schedule(pipe: "Pipeline", num_inference_steps: int) -> schedulers.Schedule:
    if num_inference_steps < 1:
        raise InputError("num_inference_steps must be at least 1")
    return schedulers.make_schedule(pipe.scheduler, num_inference_steps)


def _initial_noise(pipe: "Pipeline", n: int, seed: int, latents: np.ndarray | None,
                   shape: tuple[int, int, int], offset: int = 0) -> np.ndarray:
    """(n, h, w, c) float32. Prompt i's noise depends only on (seed, offset + i), never on batching,
    so a list extracted in chunks (or shards on several hosts) gets the noise of one whole run."""
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 4 or latents.shape[0] != n or latents.shape[1] != shape[2]:
            raise InputError(f"latents must be (n_prompts={n}, {shape[2]}, h, w) like diffusers' (NCHW); "
                             f"got {latents.shape}")
        return latents.transpose(0, 2, 3, 1)
    padded = 1 << max(0, (n - 1).bit_length())  # one compile per power of two, not per chunk length
    return np.asarray(_noise_program(seed, np.arange(offset, offset + padded), shape))[:n]


@functools.partial(jax.jit, static_argnames="shape")
def _noise_program(seed: int, indices: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


def _text_context(pipe: "Pipeline", prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> the text encoder's last hidden state (n, tokens, d), what SD conditions on."""
    site = "text_encoder.text_model.final_layer_norm"
    return pipe._capture_text(prompts, [site], "none", batch_size=64, progress=False, allow_empty=True)[site]


def _step_indices(timesteps: str | Sequence[int], n_steps: int) -> np.ndarray:
    if isinstance(timesteps, str):
        if timesteps != "all":
            raise InputError(f"timesteps must be 'all' or a list of step indices, not {timesteps!r}")
        return np.arange(n_steps)
    idx = np.asarray(list(timesteps), dtype=int)
    bad = idx[(idx < -n_steps) | (idx >= n_steps)]
    if bad.size:
        raise InputError(f"step indices {bad.tolist()} are outside 0..{n_steps - 1} "
                         f"(this sampler makes {n_steps} UNet evaluations)")
    return idx % n_steps


def run_sampling(pipe: "Pipeline", prompts: Sequence[str], sites: Sequence[str], *, num_inference_steps: int,
                 guidance_scale: float, seed: int, reduce: Any, latents: np.ndarray | None, batch_size: int,
                 branch: str, negative_prompt: str, height: int | None, width: int | None,
                 progress: bool, prompt_offset: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Final latents (n, h, w, c) and {site: (n, steps, ...)} for UNet/sampler sites (full names)."""
    from jaxprobe.pipeline.pipeline import resolve_reductions
    from jaxprobe.runtime.batching import run_batched

    _require(pipe, "unet", "scheduler", "text_encoder", "tokenizer")
    if branch not in ("cond", "uncond"):
        raise InputError(f"branch must be 'cond' or 'uncond', not {branch!r}")
    guided = guidance_scale > 1.0
    if branch == "uncond" and not guided:
        raise InputError("branch='uncond' needs classifier-free guidance (guidance_scale > 1)")
    reductions = resolve_reductions(sites, reduce, _allowed_reductions)
    for site, how in zip(sites, reductions):
        if how == "none" and not site.endswith(_PROBS):
            warnings.warn(f"reduce='none' keeps full maps of {site} at every step: memory grows with "
                          "prompts x steps x h x w x channels", stacklevel=3)
    plan = CapturePlan(tuple(s.removeprefix("unet.") for s in sites), reductions, branch, guided)
    schedule = make_schedule(pipe, num_inference_steps)
    shape = latent_shape(pipe, height, width)
    inputs = {"noise": _initial_noise(pipe, len(prompts), seed, latents, shape, prompt_offset),
              "cond": _text_context(pipe, prompts)}
    if guided:
        uncond = _text_context(pipe, [negative_prompt])
        inputs["uncond"] = np.repeat(uncond, len(prompts), axis=0)
    params = pipe._replicated("unet")
    scale = jnp.float32(guidance_scale)
    final: list[np.ndarray] = []

    def run(batch):
        out_latents, captured = sample_program(pipe.unet.module, params, schedule, plan, batch, scale)
        final.append(out_latents)
        return captured

    captured = run_batched(run, inputs, batch_size, progress=progress, label="sampling")
    out_latents = np.concatenate([np.asarray(x) for x in final])[: len(prompts)]
    names = dict(zip(plan.sites, sites))
    return out_latents, {names[k]: v for k, v in captured.items()}


def capture_sampling(pipe: "Pipeline", prompts: Sequence[str], sites: Sequence[str], *,
                     timesteps: str | Sequence[int] = "all", **options: Any) -> dict[str, np.ndarray]:
    """Pipeline.capture for everything that is not a text site (UNet, sampler, image-encoder sites)."""
    image_sites = [s for s in sites if s.startswith("image_encoder.")]
    loop_sites = [s for s in sites if not s.startswith("image_encoder.")]
    final, captured = run_sampling(pipe, prompts, loop_sites or ["latents"], **options)
    if loop_sites:
        n_steps = next(iter(captured.values())).shape[1]
        keep = _step_indices(timesteps, n_steps)
        captured = {s: v[:, keep] for s, v in captured.items()}
    else:
        captured = {}
    if image_sites:
        images = decode_latents(pipe, final, batch_size=options.get("batch_size", 8))
        captured.update(pipe.embed_images(images, image_sites, reduce="cls", batch_size=options.get("batch_size", 8)))
    return captured


@functools.partial(jax.jit, static_argnames=("module",))
def _decode_program(module: Any, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (b, h, w, c) -> images (b, H, W, 3) in [0, 1]."""
    images = module.apply({"params": params}, latents / module.config.scaling_factor, method="decode")
    return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def decode_latents(pipe: "Pipeline", latents: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    from jaxprobe.runtime.batching import run_batched

    _require(pipe, "vae")
    params = pipe._replicated("vae")
    out = run_batched(lambda b: {"images": _decode_program(pipe.vae.module, params, b)}, latents, batch_size)
    return out["images"]


def generate(pipe: "Pipeline", prompts: Sequence[str], *, sites: Sequence[str] | str | None = None,
             output_type: str = "np", num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
             reduce: Any = "mean", latents: np.ndarray | None = None, batch_size: int = 8, branch: str = "cond",
             negative_prompt: str = "", height: int | None = None, width: int | None = None,
             timesteps: str | Sequence[int] = "all", progress: bool = False):
    """Images for the prompts: (n, H, W, 3) floats in [0, 1] ("np") or PIL images ("pil").

    With `sites`, returns (images, {site: array}) from the same run (shapes as in Pipeline.capture).
    """
    if output_type not in ("np", "pil"):
        raise InputError(f"output_type must be 'np' or 'pil', not {output_type!r}")
    chosen = pipe.select(sites) if sites is not None else []
    loop_sites = [s for s in chosen if not s.startswith(("text_encoder.", "image_encoder."))]
    options = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, reduce=reduce,
                   latents=latents, batch_size=batch_size, branch=branch, negative_prompt=negative_prompt,
                   height=height, width=width, progress=progress)
    final, captured = run_sampling(pipe, prompts, loop_sites or ["latents"], **options)
    if loop_sites:
        keep = _step_indices(timesteps, next(iter(captured.values())).shape[1])
        captured = {s: v[:, keep] for s, v in captured.items()}
    images = decode_latents(pipe, final, batch_size=batch_size)
    feats: dict[str, np.ndarray] = {}
    text_sites = [s for s in chosen if s.startswith("text_encoder.")]
    if text_sites:
        feats.update(pipe._capture_text(prompts, text_sites, reduce, batch_size, progress))
    feats.update({s: captured[s] for s in loop_sites})
    image_sites = [s for s in chosen if s.startswith("image_encoder.")]
    if image_sites:
        feats.update(pipe.embed_images(images, image_sites, reduce="cls", batch_size=batch_size))
    result = images if output_type == "np" else _to_pil(images)
    return (result, {s: feats[s] for s in chosen}) if sites is not None else result


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8)) for im in images]


# ---------------------------------------------------------------------------------------------
# Real images in (Revelio)


@functools.partial(jax.jit, static_argnames=("unet", "vae", "sched_config", "plan"))
def _image_program(unet: Any, vae: Any, params: dict[str, Any], sched_config: schedulers.SchedulerConfig,
                   plan: CapturePlan, inputs: dict[str, jax.Array], t: jax.Array) -> dict[str, jax.Array]:
    """images (b, H, W, 3) in [0, 1] -> VAE mean latents -> noised to t -> one UNet pass -> captures."""
    images = inputs["images"] * 2.0 - 1.0
    mean, _ = vae.apply({"params": params["vae"]}, images.astype(vae.dtype), method="encode")
    x0 = mean.astype(jnp.float32) * vae.config.scaling_factor
    timesteps = jnp.full((x0.shape[0],), t)
    noisy = schedulers.add_noise(sched_config, x0, inputs["noise"], timesteps)
    _, inter = unet.apply({"params": params["unet"]}, noisy.astype(unet.dtype), t, inputs["context"],
                          mutable=["intermediates"])
    return _capture_step(plan, flatten_intermediates(inter["intermediates"]), x0.shape[0])


def capture_images(pipe: "Pipeline", images: Any, sites: Sequence[str] | str = ("unet.mid_block",), *,
                   t: int = 25, prompt: str = "", seed: int = 0, reduce: Any = "mean", batch_size: int = 8,
                   size: int | None = None, offset: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
    """Diffusion features of real images: {site: (n, dim)} (or unreduced maps with reduce="none").

    Each image is VAE-encoded (the posterior mean), noised to training timestep `t` with noise that
    depends only on (seed, offset + image index), and passed once through the UNet conditioned on
    `prompt`; `offset` lets a dataset extracted in chunks get the noise of one whole run.
    """
    from jaxprobe.pipeline.pipeline import resolve_reductions
    from jaxprobe.runtime.batching import run_batched

    _require(pipe, "unet", "vae", "scheduler", "text_encoder", "tokenizer")
    if not 0 <= t < pipe.scheduler.num_train_timesteps:
        raise InputError(f"t must be a training timestep in 0..{pipe.scheduler.num_train_timesteps - 1}, got {t}")
    chosen = [s for s in pipe.select(sites) if s.startswith("unet.")]
    if not chosen:
        raise SiteError("capture_images captures UNet sites (e.g. 'unet.mid_block', 'unet.up_blocks.*')")
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = size or pipe.unet.config.sample_size * factor
    arr = load_images(images, size)
    reductions = resolve_reductions(chosen, reduce, _allowed_reductions)
    plan = CapturePlan(tuple(s.removeprefix("unet.") for s in chosen), reductions, "cond", guided=False)
    shape = (size // factor, size // factor, pipe.unet.config.in_channels)
    context = _text_context(pipe, [prompt])
    inputs = {"images": arr, "noise": _initial_noise(pipe, len(arr), seed, None, shape, offset),
              "context": np.repeat(context, len(arr), axis=0)}
    params = {"unet": pipe._replicated("unet"), "vae": pipe._replicated("vae")}
    run = lambda batch: _image_program(pipe.unet.module, pipe.vae.module, params, pipe.scheduler, plan,  # noqa: E731
                                       batch, jnp.int32(t))
    out = run_batched(run, inputs, batch_size, progress=progress, label="images")
    return {site: out[local] for site, local in zip(chosen, plan.sites)}


def sampling_timesteps(pipe: "Pipeline", num_inference_steps: int) -> np.ndarray:
    """The training timestep of each UNet evaluation, i.e. of each entry on captures' step axis."""
    return np.asarray(make_schedule(pipe, num_inference_steps).timesteps)
