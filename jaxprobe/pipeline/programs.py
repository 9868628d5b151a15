"""The device programs: one jitted function per capture shape, from token ids to the reductions asked for.

`capture_program` runs, inside one XLA program: the text encoder (user text sites and the
conditioning from the same pass), the unconditional embedding broadcast on device, the initial noise
drawn from (seed, prompt index) with `fold_in`, the `lax.scan` over denoising steps with
classifier-free guidance, the requested steps selected, and optionally the VAE decode and the CLIP
image embedding of the result. Only the reduced activations that were asked for leave the device.

Everything that changes the program's structure (modules, sites, reductions, kept steps, branch,
what runs at all, the interventions' kinds, sites and steps) is static in `Plan`; values (parameters,
ids, seed, guidance scale, schedule arrays, intervention vectors, scales and sources) are traced, so a
second call of the same shape compiles nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxprobe.models import clip, encoders, schedulers
from jaxprobe.models.families import DenoiserFamily
from jaxprobe.pipeline.interventions import Spec, intervening, with_values
from jaxprobe.pipeline.reductions import reduce_spatial, reduce_tokens
# sowing_inputs is entered after intervening: flax runs the interceptor entered last innermost, so an
# intervention on `X.input` acts before X's input is sown, and captures show the intervened input.
from jaxprobe.pipeline.sites import flatten_intermediates, sowing_inputs, with_contributions

PROBS = ".probs"          # cross-attention probability sites: (b, h*w, tokens)


@dataclass(frozen=True)
class Models:
    """The Flax modules of a pipeline (static under jit) and how its denoiser family is driven."""

    text_encoder: Any = None
    text_encoder_2: Any = None                # SDXL's second text tower
    text_encoder_3: Any = None                # SD3's T5
    denoiser: Any = None
    family: DenoiserFamily | None = None
    vae: Any = None
    image_encoder: Any = None
    image_preprocess: clip.ImagePreprocess | None = None

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text towers present, by component name, in checkpoint order."""
        return tuple(name for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                     if getattr(self, name) is not None)


@dataclass(frozen=True)
class Plan:
    """What one program computes and returns (static). Site names are paths inside their component, but
    text sites keep their component ("text_encoder.…", "text_encoder_2.…"): a pipeline may have two."""

    text_sites: tuple[str, ...] = ()
    text_reductions: tuple[str, ...] = ()
    denoiser_sites: tuple[str, ...] = ()     # paths inside the denoiser, or the sampler's own sites
    denoiser_reductions: tuple[str, ...] = ()
    image_sites: tuple[str, ...] = ()        # CLIP image-encoder sites of the decoded images
    image_reductions: tuple[str, ...] = ()
    sample: bool = False                     # run the denoising loop at all
    guided: bool = False                     # classifier-free guidance (guidance_scale > 1)
    branch: str = "cond"                     # which CFG half the denoiser sites capture
    steps: tuple[int, ...] | None = None     # kept entries of the step axis; None keeps all
    latent_shape: tuple[int, int, int] = (0, 0, 0)   # (h, w, c)
    given_noise: bool = False                # inputs carry "noise" instead of drawing it
    return_latents: bool = False
    return_images: bool = False
    zero_uncond: bool = False                # SDXL's force_zeros_for_empty_prompt: the unconditional inputs are 0
    interventions: tuple[Spec, ...] = ()     # in list order (pipeline.interventions); values are in the inputs
    text_layer: tuple[tuple[str, str], ...] | None = None   # Diffusion Lens: (tower, the site read instead)
    token_grid: tuple[int, int] | None = None  # patch-token denoisers (DiT): (h, w) of their (b, h*w, d) tokens


def _text_pass(models: Models, params: Any, ids: jax.Array, component: str = "text_encoder", plan: Plan = Plan(),
               inputs: Mapping[str, Any] | None = None, branch: str = "cond", eos: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """{site: activation} of one pass of a text tower, with the plan's text interventions of `branch`
    ("cond": the prompts, "uncond": the negative prompt; they act on the first tower, `text_encoder`) and the
    Diffusion Lens on the towers the plan names. eos (b,): where each prompt's real tokens end; a tower that
    masks its padding (T5) is given that mask, and hands it on under `encoders.ATTENTION_MASK` for the
    conditioning."""
    first = component == "text_encoder"
    specs = [(s, v) for s, v in with_values(plan.interventions, "text", inputs or {})
             if s.branch in (branch, "both")] if first else []
    lens = dict(plan.text_layer or ()).get(component)
    # the lens layer is fed to the context site (SD), or read raw where the penultimate one was (SDXL, SD3)
    context_site = models.family.context_site if lens else ""
    prefix = f"{component}."
    module = getattr(models, component)
    args = encoders.text_inputs(module.config, ids, eos)
    with intervening(specs, feed={context_site: lens} if context_site else None), \
            sowing_inputs(plan.text_sites, prefix):
        out, state = module.apply({"params": params[component]}, *args, mutable=["intermediates"])
    acts = with_contributions(flatten_intermediates(state["intermediates"]),
                              [s for s in plan.text_sites if s.startswith(prefix)], prefix)
    if lens and not context_site:
        acts[encoders.LENS_OUTPUT] = acts[lens]
    if len(args) > 1:
        acts[encoders.ATTENTION_MASK] = args[1]
    if isinstance(out, Mapping) and encoders.POOLED_OUTPUT in out:   # CLIP: pooled at its own EOS rule
        acts[encoders.POOLED_OUTPUT] = out[encoders.POOLED_OUTPUT]
    return acts


def _text_passes(models: Models, params: Any, ids: Mapping[str, jax.Array], plan: Plan = Plan(),
                 inputs: Mapping[str, Any] | None = None, branch: str = "cond",
                 eos: Mapping[str, jax.Array] | None = None) -> dict[str, dict[str, jax.Array]]:
    """{text tower: {site: activation}} for every tower's token ids (and EOS positions, for masked towers)."""
    return {name: _text_pass(models, params, ids[name], name, plan, inputs, branch, (eos or {}).get(name))
            for name in models.text_encoders}


def conditioning_of(models: Models, params: Any, plan: Plan, inputs: Mapping[str, Any],
                    acts: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """The denoiser's conditioning inputs for the batch, [uncond; cond] along it when guided: the family
    reads them from the text towers' activations and the per-run extras ("time_ids" for SDXL)."""
    batch = inputs["prompt_index"].shape[0]
    # shared extras (1, ...) and per-prompt ones ("prompt_extras", DiT's class labels) (b, ...)
    given = {**inputs.get("extras", {}), **inputs.get("prompt_extras", {})}
    extras = {k: jnp.broadcast_to(v, (batch, *v.shape[1:])) for k, v in given.items()}
    cond = models.family.conditioning(acts, extras)
    if not plan.guided:
        return cond
    uncond_extras = {k: jnp.broadcast_to(v, (batch, *v.shape[1:])) for k, v in inputs.get("uncond_extras", {}).items()}
    if plan.zero_uncond:  # the text parts are zeros; the micro-conditioning stays
        uncond = {k: (uncond_extras[k] if k in uncond_extras else jnp.zeros_like(v)) for k, v in cond.items()}
    else:
        # One negative-prompt row, unless per-prompt text interventions act on it: then one per prompt.
        per_prompt = any(s.component == "text" and s.branch != "cond" and s.per_prompt for s in plan.interventions)
        uncond_ids = {name: jnp.broadcast_to(ids, inputs["ids"][name].shape) if per_prompt else ids
                      for name, ids in inputs["uncond_ids"].items()}
        uncond_eos = {name: jnp.broadcast_to(e, (uncond_ids[name].shape[0],))
                      for name, e in inputs.get("uncond_eos", {}).items()}
        uncond = models.family.conditioning(
            _text_passes(models, params, uncond_ids, plan, inputs, "uncond", uncond_eos), uncond_extras)
    return {k: jnp.concatenate([jnp.broadcast_to(uncond[k], v.shape), v]) for k, v in cond.items()}


def reduce_denoiser_site(site: str, x: jax.Array, how: str) -> jax.Array:
    if site.endswith(PROBS):  # (b, h*w, tokens) -> mean over positions, or maps (b, tokens, h*w)
        return x.mean(axis=1) if how == "mean" else jnp.swapaxes(x, 1, 2)
    if x.ndim == 3 and how != "none":  # a UNet transformer block's tokens (b, h*w, c): its map's positions
        x = x.astype(jnp.float32)
        return x.mean(axis=1) if how == "mean" else x.max(axis=1)
    return reduce_spatial(x, how)


def tokens_as_map(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Patch tokens (b, h*w, d) -> (b, h, w, d), so they reduce like a UNet's spatial maps; others unchanged."""
    h, w = grid
    if x.ndim == 3 and x.shape[1] == h * w:
        return x.reshape(x.shape[0], h, w, x.shape[2])
    return x


def evaluation(models: Models, params: Any, plan: Plan, latents: jax.Array, t: jax.Array,
               conditioning: Mapping[str, jax.Array], specs: Sequence[tuple[Spec, Any]] = (),
               step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One denoiser evaluation of the sampling loop on the whole ([uncond; cond] when guided) batch: the prediction
    (float32) and the plan's captured denoiser sites, with the interventions `specs` at `step`. Memory plans
    compile it alone: it is what one step of `denoise` holds at once."""
    batch = latents.shape[0] // 2 if plan.guided else latents.shape[0]
    with intervening(specs, half=batch if plan.guided else None, step=step), sowing_inputs(plan.denoiser_sites):
        eps, inter = models.family.apply(models.denoiser, params["denoiser"], latents.astype(models.denoiser.dtype),
                                         t, conditioning)
    return eps.astype(jnp.float32), capture_denoiser_sites(plan, flatten_intermediates(inter), batch)


def capture_denoiser_sites(plan: Plan, acts: Mapping[str, jax.Array], batch: int) -> dict[str, jax.Array]:
    """Keep the requested CFG half of each denoiser activation (the batch is [uncond; cond]) and reduce it."""
    half = slice(batch, None) if plan.branch == "cond" else slice(0, batch)
    acts = with_contributions(acts, plan.denoiser_sites)
    out = {}
    for site, how in zip(plan.denoiser_sites, plan.denoiser_reductions):
        if site in acts:
            x = acts[site][half] if plan.guided else acts[site]
            if plan.token_grid is not None and not site.endswith(PROBS):
                x = tokens_as_map(x, plan.token_grid)
            out[site] = reduce_denoiser_site(site, x, how).astype(jnp.float32)
    return out


def initial_noise(seed: jax.Array, prompt_index: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """(b, h, w, c): prompt i's noise depends only on (seed, i), whatever the batching or the host."""
    return jax.vmap(lambda key: jax.random.normal(key, shape))(prompt_keys(seed, prompt_index))


def step_noise(keys: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(b, *shape): an ancestral sampler's fresh noise at step i, from each prompt's own key, so it too
    depends only on (seed, prompt index)."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i + 1), shape))(keys)


def prompt_keys(seed: jax.Array, prompt_index: jax.Array) -> jax.Array:
    """(b,) keys: prompt i's is fold_in(key(seed), i), the key of its initial noise too."""
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(prompt_index)


def denoise(models: Models, params: Any, schedule: schedulers.Schedule, plan: Plan, noise: jax.Array,
            conditioning: Mapping[str, jax.Array], guidance_scale: jax.Array, inputs: Mapping[str, Any] | None = None,
            noise_keys: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sampling loop: final latents (b, h, w, c) and {site: (steps, b, ...)} captured at every step.

    conditioning: the family's inputs, already [uncond; cond] along the batch when guided. inputs: the
    program's inputs, for the values of the plan's denoiser interventions. noise_keys: (b,) per-prompt
    keys of an ancestral sampler's fresh noise (`prompt_keys`)."""
    batch = noise.shape[0]
    specs = with_values(plan.interventions, "denoiser", inputs or {})
    latents = noise * schedulers.init_noise_sigma(schedule)
    stochastic = schedulers.needs_noise(schedule)

    def step(carry, i):
        latents, state = carry
        model_in = schedulers.scale_model_input(schedule, latents, i)
        model_in = jnp.concatenate([model_in, model_in]) if plan.guided else model_in
        t = jnp.asarray(schedule.timesteps)[i]
        eps, captured = evaluation(models, params, plan, model_in, t, conditioning, specs, i)
        if plan.guided:
            eps_uncond, eps_cond = eps[:batch], eps[batch:]
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        fresh = step_noise(noise_keys, i, latents.shape[1:]) if stochastic else None
        state, latents, x0 = schedulers.step(schedule, state, eps, i, latents, noise=fresh)
        sampler = {"latents": latents, "pred_original_sample": x0}
        for site, how in zip(plan.denoiser_sites, plan.denoiser_reductions):
            if site in sampler:
                captured[site] = reduce_spatial(sampler[site], how).astype(jnp.float32)
        return (latents, state), captured

    init = (latents, schedulers.init_state(schedule, latents))
    (latents, _), captured = jax.lax.scan(step, init, jnp.arange(len(schedule.timesteps)))
    return latents, captured


def decode(vae: Any, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (b, h, w, c) -> images (b, H, W, 3) in [0, 1]; SD3's VAE also shifts them (shift_factor)."""
    shift = vae.config.shift_factor or 0.0
    images = vae.apply({"params": params}, latents / vae.config.scaling_factor + shift, method="decode")
    return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def embed_images(models: Models, params: Any, images: jax.Array, sites: tuple[str, ...],
                 reductions: tuple[str, ...]) -> dict[str, jax.Array]:
    """images (b, H, W, 3) in [0, 1] -> {image-encoder site: reduced activation}: `cls` the class token, `mean`
    every token, `mean_patch` the patch tokens (DINOv2's linear-probe features beside the class token)."""
    module = models.image_encoder
    pixels = clip.preprocess_images(images, models.image_preprocess or clip.ImagePreprocess()).astype(module.dtype)
    with sowing_inputs(sites):
        _, state = module.apply({"params": params["image_encoder"]}, pixels, mutable=["intermediates"])
    acts = with_contributions(flatten_intermediates(state["intermediates"]), sites)
    out = {}
    for site, how in zip(sites, reductions):
        x = acts[site]
        if x.ndim == 3 and how != "none":
            x = x[:, 0] if how == "cls" else (x[:, 1:] if how == "mean_patch" else x).mean(axis=1)
        out[site] = x.astype(jnp.float32)
    return out


@functools.partial(jax.jit, static_argnames=("models", "plan"))
def capture_program(models: Models, params: dict[str, Any], schedule: schedulers.Schedule | None, plan: Plan,
                    inputs: dict[str, jax.Array], seed: jax.Array, guidance_scale: jax.Array) -> dict[str, jax.Array]:
    """inputs: "ids" and "eos" {text tower: (b, tokens) | (b,)}, "prompt_index" (b,), "uncond_ids" {tower:
    (1, tokens)} when guided, "extras"/"uncond_extras" {name: (1, ...)} the family's per-run conditioning
    (SDXL's time ids), "noise" (b, h, w, c) when given. Returns {"text:SITE": (b, ...), "denoiser:SITE":
    (b, kept steps, ...), "image:SITE": (b, ...), "latents": (b, h, w, c), "images": (b, H, W, 3)}, as the
    plan asks."""
    out, conditioning = text_stage(models, params, plan, inputs)
    if not plan.sample:
        return out
    return {**out, **sampling_stage(models, params, schedule, plan, inputs, seed, guidance_scale, conditioning)}


def text_stage(models: Models, params: dict[str, Any], plan: Plan, inputs: dict[str, jax.Array]
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
    """capture_program's first half: ({"text:SITE": reduced}, the denoiser's conditioning, None when the plan does
    not sample). Apart so that memory plans trace the text towers once for both."""
    out: dict[str, jax.Array] = {}
    acts = _text_passes(models, params, inputs["ids"], plan, inputs, eos=inputs["eos"])
    for site, how in zip(plan.text_sites, plan.text_reductions):
        component, local = site.split(".", 1)
        out[f"text:{site}"] = reduce_tokens(acts[component][local], inputs["eos"][component], how).astype(jnp.float32)
    return out, (conditioning_of(models, params, plan, inputs, acts) if plan.sample else None)


def sampling_stage(models: Models, params: dict[str, Any], schedule: schedulers.Schedule, plan: Plan,
                   inputs: dict[str, jax.Array], seed: jax.Array, guidance_scale: jax.Array,
                   conditioning: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """capture_program's second half: the sampling loop from the conditioning, and what the plan keeps of it."""
    out: dict[str, jax.Array] = {}
    shape = plan.latent_shape
    noise = inputs["noise"] if plan.given_noise else initial_noise(seed, inputs["prompt_index"], shape)
    latents, captured = denoise(models, params, schedule, plan, noise, conditioning, guidance_scale, inputs,
                                prompt_keys(seed, inputs["prompt_index"]))
    keep = slice(None) if plan.steps is None else jnp.asarray(plan.steps)
    for site, value in captured.items():
        out[f"denoiser:{site}"] = jnp.moveaxis(value[keep], 0, 1)                  # (b, kept steps, ...)
    if plan.return_latents:
        out["latents"] = latents
    if plan.return_images or plan.image_sites:
        images = decode(models.vae, params["vae"], latents)
        if plan.return_images:
            out["images"] = images
        if plan.image_sites:
            for site, value in embed_images(models, params, images, plan.image_sites, plan.image_reductions).items():
                out[f"image:{site}"] = value
    return out


@functools.partial(jax.jit, static_argnames=("models", "plan"))
def image_program(models: Models, params: dict[str, Any], images: jax.Array, plan: Plan) -> dict[str, jax.Array]:
    """images (b, H, W, 3) in [0, 1] -> {"image:SITE": reduced activation} of the CLIP image encoder."""
    return {f"image:{s}": v for s, v in embed_images(models, params, images, plan.image_sites,
                                                      plan.image_reductions).items()}


@functools.partial(jax.jit, static_argnames=("models", "sched_config", "plan"))
def real_image_program(models: Models, params: dict[str, Any], sched_config: schedulers.SchedulerConfig, plan: Plan,
                       inputs: dict[str, jax.Array], seed: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
    """Revelio: images (b, H, W, 3) in [0, 1] -> VAE posterior mean -> noised to training timestep t with
    the noise of (seed, image index) -> one denoiser pass conditioned on one prompt -> captures."""
    vae = models.vae
    images = inputs["images"] * 2.0 - 1.0
    mean, _ = vae.apply({"params": params["vae"]}, images.astype(vae.dtype), method="encode")
    x0 = (mean.astype(jnp.float32) - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    batch = x0.shape[0]
    noise = initial_noise(seed, inputs["prompt_index"], x0.shape[1:])
    noisy = schedulers.add_noise(sched_config, x0, noise, jnp.full((batch,), t))
    prompt = models.family.conditioning(_text_passes(models, params, inputs["prompt_ids"], eos=inputs.get("prompt_eos")),
                                        inputs.get("extras", {}))
    conditioning = {k: jnp.broadcast_to(v, (batch, *v.shape[1:])) for k, v in prompt.items()}
    specs = with_values(plan.interventions, "denoiser", inputs)
    _, captured = evaluation(models, params, plan, noisy, t, conditioning, specs, jnp.int32(0))
    return {f"denoiser:{site}": value for site, value in captured.items()}
