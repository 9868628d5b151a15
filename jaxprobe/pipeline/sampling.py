"""Host-side drivers of the device programs (`pipeline.programs`): validate, tokenize, plan, run in batches.

Three ways in: `capture` (prompts -> text, denoiser, sampler and image-encoder sites, one program per
shape), `generate` (the same program returning decoded images), and `capture_images` (Revelio: real
images encoded, noised to step t, one denoiser pass).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from jaxprobe.captures import Captures
from jaxprobe.errors import InputError, InterventionError, SiteError
from jaxprobe.models import flux, schedulers, sd3
from jaxprobe.pipeline.images import load_images
from jaxprobe.pipeline.interventions import Intervention, describe, plan_interventions, step_indices
from jaxprobe.pipeline.labels import class_label_ids
from jaxprobe.pipeline.programs import PROBS, Models, Plan, capture_program, real_image_program
from jaxprobe.pipeline.reductions import SPATIAL_REDUCTIONS, TOKEN_REDUCTIONS
from jaxprobe.pipeline.sites import SAMPLER_SITES
from jaxprobe.runtime.batching import run_batched
from jaxprobe.runtime.devices import replicate

if TYPE_CHECKING:
    from jaxprobe.pipeline.pipeline import Pipeline

Reduce = str | Mapping[str, str]
IMAGE_REDUCTIONS = ("cls", "mean", "mean_patch", "none")
KNOWN_REDUCTIONS = tuple(dict.fromkeys((*TOKEN_REDUCTIONS, *SPATIAL_REDUCTIONS, *IMAGE_REDUCTIONS)))


def resolve_reductions(sites: Sequence[str], reduce: Reduce, allowed_for: callable) -> tuple[str, ...]:
    """One reduction per site. `reduce` is a name for all sites, or {glob: name}, first match winning."""
    chosen = []
    for site in sites:
        if isinstance(reduce, str):
            how = reduce
        else:
            how = next((r for pattern, r in reduce.items() if fnmatch.fnmatchcase(site, pattern)), None)
            if how is None:
                raise InputError(f"no reduction given for site {site!r}: add a pattern such as '*': 'mean'")
        allowed = allowed_for(site)
        if how not in KNOWN_REDUCTIONS:
            raise InputError(f"unknown reduction {how!r}; choose one of {', '.join(KNOWN_REDUCTIONS)}")
        if how not in allowed:
            raise InputError(f"reduction {how!r} does not apply to {site!r} (it allows {', '.join(allowed)}); "
                             "pass reduce as a mapping, e.g. {'text_encoder.*': 'eos', '*': 'mean'}")
        chosen.append(how)
    return tuple(chosen)


def _denoiser_reductions(site: str) -> tuple[str, ...]:
    return ("mean", "none") if site.endswith(PROBS) else SPATIAL_REDUCTIONS


def _require(pipe: "Pipeline", *names: str) -> None:
    missing = [n for n in names if getattr(pipe, n) is None]
    if missing:
        raise SiteError(f"{pipe.source} has no {', '.join(missing)}: UNet capture needs a full Stable Diffusion "
                        "pipeline folder (model_index.json) or the bundled 'tiny' model")


def latent_shape(pipe: "Pipeline", height: int | None, width: int | None) -> tuple[int, int, int]:
    """(h, w, c) of the latents for an image of height x width pixels (default: the UNet's sample size)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 8
    side = pipe.unet.config.sample_size
    multiple = pipe.family.latent_multiple(pipe.unet.config)
    for name, pixels in (("height", height), ("width", width)):
        if pixels is not None and (pixels < 1 or pixels % factor):   # it would be floored to a size nobody asked for
            step = multiple * factor
            raise InputError(f"{name} {pixels} px is not a multiple of the VAE's {factor}x downsampling; pick a "
                             f"multiple of {step} px (e.g. {max(1, round(pixels / step)) * step})")
    h = side if height is None else height // factor
    w = side if width is None else width // factor
    if h % multiple or w % multiple:
        raise InputError(f"latent size {h}x{w} must be divisible by {multiple}; pick height/width multiples of "
                         f"{multiple * factor} pixels")
    return h, w, pipe.family.latent_channels(pipe.unet.config)


def token_grid(pipe: "Pipeline", latent: tuple[int, int, int]) -> tuple[int, int] | None:
    """(h, w) of a patch-token denoiser's tokens for latents (h, w, c); None for the UNets."""
    if not pipe.family.patch_tokens:
        return None
    patch = pipe.family.latent_multiple(pipe.unet.config)
    return latent[0] // patch, latent[1] // patch


def class_labels(pipe: "Pipeline", prompts: Sequence[Any]) -> np.ndarray:
    """A class-conditional denoiser's (n,) labels for class names or integer labels ("" the null class)."""
    config = pipe.unet.config
    return class_label_ids(prompts, (pipe.pipeline_options or {}).get("id2label"), config.null_class)


def make_schedule(pipe: "Pipeline", num_inference_steps: int, latent: tuple[int, int, int] | None = None
                  ) -> schedulers.Schedule:
    """The schedule of a run on latents (h, w, c) (default: the denoiser's sample size), whose size a
    resolution-dependent flow-matching shift reads as patch tokens, as the SD3 and FLUX pipelines count them."""
    if num_inference_steps < 1:
        raise InputError("num_inference_steps must be at least 1")
    image_seq_len = None
    if pipe.unet is not None and getattr(pipe.scheduler, "use_dynamic_shifting", False):
        side = pipe.unet.config.sample_size
        h, w = (side, side) if latent is None else latent[:2]
        patch = pipe.family.latent_multiple(pipe.unet.config) if pipe.family.patch_tokens else 1
        image_seq_len = (h // patch) * (w // patch)
    flow_sigmas = pipe.family.flow_sigmas if pipe.family is not None else None
    sigmas = flow_sigmas(num_inference_steps) if flow_sigmas and pipe.scheduler.kind in schedulers.FLOW_KINDS else None
    return schedulers.make_schedule(pipe.scheduler, num_inference_steps, image_seq_len=image_seq_len, sigmas=sigmas)


def sampling_timesteps(pipe: "Pipeline", num_inference_steps: int) -> np.ndarray:
    """The training timestep of each UNet evaluation, i.e. of each entry on captures' step axis."""
    return np.asarray(make_schedule(pipe, num_inference_steps).timesteps)


def _step_indices(timesteps: str | Sequence[int], n_steps: int) -> tuple[int, ...] | None:
    """None for "all", else the kept step indices (negative ones counted from the end)."""
    if isinstance(timesteps, str):
        if timesteps != "all":
            raise InputError(f"timesteps must be 'all' or a list of step indices, not {timesteps!r}")
        return None
    return step_indices(timesteps, n_steps)


def _given_noise(latents: np.ndarray, n: int, channels: int) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[0] != n or latents.shape[1] != channels:
        raise InputError(f"latents must be (n_prompts={n}, {channels}, h, w) like diffusers' (NCHW); "
                         f"got {latents.shape}")
    return latents.transpose(0, 2, 3, 1)


def models_of(pipe: "Pipeline") -> Models:
    return Models(
        text_encoder=pipe.text_encoder.module if pipe.text_encoder else None,
        text_encoder_2=pipe.text_encoder_2.module if pipe.text_encoder_2 else None,
        text_encoder_3=pipe.text_encoder_3.module if pipe.text_encoder_3 else None,
        denoiser=pipe.unet.module if pipe.unet else None, family=pipe.family,
        vae=pipe.vae.module if pipe.vae else None,
        image_encoder=pipe.image_encoder.module if pipe.image_encoder else None,
        image_preprocess=pipe.image_preprocess)


def program_components(pipe: "Pipeline") -> dict[str, Any]:
    """The components a program holds, under the program's names."""
    names = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2,
             "text_encoder_3": pipe.text_encoder_3, "denoiser": pipe.unet,
             "vae": pipe.vae, "image_encoder": pipe.image_encoder}
    return {name: c for name, c in names.items() if c is not None}


def params_of(pipe: "Pipeline") -> dict[str, Any]:
    """Every component's (already placed) parameters under the program's names (lazy ones drawn now)."""
    return {name: c.params for name, c in program_components(pipe).items()}


CAPTURE_DEFAULTS = dict(timesteps="all", num_inference_steps=50, guidance_scale=7.5, seed=0, reduce="mean",
                        latents=None, branch="cond", negative_prompt="", height=None, width=None, prompt_offset=0,
                        original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                        aesthetic_score=6.0, negative_aesthetic_score=2.5)
TEXT_TOWERS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def tokenized(pipe: "Pipeline", prompts: Sequence[str], allow_empty: bool = False) -> tuple[dict, dict]:
    """({text tower: ids (n, tokens)}, {text tower: EOS positions (n,)}), each tower with its own tokenizer."""
    ids, eos = {}, {}
    unmasked = pipe.family.unmasked_towers if pipe.family is not None else ()
    for name in pipe.text_encoders:
        tokenizer = getattr(pipe, _TOKENIZERS[name])
        if tokenizer is None:
            raise SiteError(f"{pipe.source} has no tokenizer for {name}; its folder is incomplete")
        ids[name] = tokenizer(prompts, allow_empty=allow_empty)
        eos[name] = tokenizer.eos_positions(ids[name])
        if name in unmasked:   # SD3, FLUX run T5 without a padding mask: every token is real
            eos[name] = np.full_like(eos[name], ids[name].shape[1] - 1)
    return ids, eos


def sdxl_extras(pipe: "Pipeline", plan: Plan, o: Mapping[str, Any]) -> tuple[dict, dict]:
    """SDXL's micro-conditioning as diffusers builds it, (cond, uncond) {"time_ids": (1, n)}: original size,
    crop top-left and target size (both default the image's size), or for a refiner (requires_aesthetics_score)
    original size, crop and the (negative) aesthetic score. Empty for other families."""
    if pipe.unet is None or getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        return {}, {}
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 8
    size = (plan.latent_shape[0] * factor, plan.latent_shape[1] * factor)
    original, target = tuple(o["original_size"] or size), tuple(o["target_size"] or size)
    crop = tuple(o["crops_coords_top_left"])
    if (pipe.pipeline_options or {}).get("requires_aesthetics_score"):
        cond, uncond = (*original, *crop, o["aesthetic_score"]), (*original, *crop, o["negative_aesthetic_score"])
    else:
        cond = uncond = (*original, *crop, *target)
    def ids(values):
        return {"time_ids": np.asarray([values], np.float32)}
    return ids(cond), ids(uncond)


def pixart_extras(pipe: "Pipeline", plan: Plan) -> dict:
    """PixArt-alpha 1024's micro-conditions as its pipeline builds them (without resolution binning): the image's
    (height, width) in pixels and height / width, {"resolution": (1, 2), "aspect_ratio": (1, 1)}; cond and uncond
    alike. Empty for other models."""
    if pipe.unet is None or not getattr(pipe.unet.config, "use_additional_conditions", False):
        return {}
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 8
    height, width = plan.latent_shape[0] * factor, plan.latent_shape[1] * factor
    return {"resolution": np.asarray([[height, width]], np.float32),
            "aspect_ratio": np.asarray([[height / width]], np.float32)}


def sd3_extras(pipe: "Pipeline") -> dict:
    """SD3 without its T5 tower: the zeros StableDiffusion3Pipeline conditions on instead, {"t5_context":
    (1, 256, joint_attention_dim)}, cond and uncond alike. Empty for other models."""
    if pipe.family is None or pipe.family.name != "stable-diffusion-3" or pipe.text_encoder_3 is not None:
        return {}
    return {"t5_context": np.zeros((1, sd3.T5_SEQUENCE_LENGTH, pipe.unet.config.joint_attention_dim), np.float32)}


def flux_extras(pipe: "Pipeline", guidance_scale: float) -> dict:
    """FLUX.1-dev's guidance scale, which its transformer embeds (guidance_embeds), {"guidance": (1,)}; empty for
    other models (FLUX.1-schnell ignores guidance, as FluxPipeline does)."""
    if pipe.family is None or pipe.family.name != "flux" or not pipe.unet.config.guidance_embeds:
        return {}
    return {"guidance": np.full((1,), guidance_scale, np.float32)}


def plan_capture(pipe: "Pipeline", sites: Sequence[str], *, return_images: bool = False,
                 **options: Any) -> tuple[Plan, schedulers.Schedule | None]:
    """The static plan (and the schedule) of `pipe.capture(prompts, sites, **options)`, validated
    before anything runs. Options not given take `CAPTURE_DEFAULTS`; others (batch_size, progress) are
    ignored here."""
    o = {**CAPTURE_DEFAULTS, **{k: v for k, v in options.items() if k in CAPTURE_DEFAULTS}}
    text_sites = [s for s in sites if s.startswith(TEXT_TOWERS)]
    image_sites = [s for s in sites if s.startswith("image_encoder.")]
    loop_sites = [s for s in sites if s not in text_sites and s not in image_sites]
    class_conditioned = pipe.family is not None and pipe.family.class_conditioned
    if not pipe.text_encoders and not class_conditioned:
        raise SiteError(f"{pipe.source} has no text encoder")
    if class_conditioned and text_sites:
        raise SiteError(f"{pipe.source} is class-conditional ({pipe.family.name}): it has no text encoder, so no "
                        f"{text_sites[0]}; capture its {pipe.unet.name}.* sites")
    text = dict(text_sites=tuple(text_sites),
                text_reductions=resolve_reductions(text_sites, o["reduce"], lambda s: TOKEN_REDUCTIONS))
    if not (loop_sites or image_sites or return_images):
        return Plan(**text), None
    _require(pipe, "unet", "scheduler")
    if image_sites or return_images:
        _require(pipe, "vae")
    if image_sites and pipe.image_encoder is None:
        raise SiteError("this pipeline has no image encoder; pass image_encoder=PATH to jaxprobe.load "
                        "(or --image-encoder PATH) with a CLIP vision or DINOv2 checkpoint")
    branch, guided = o["branch"], o["guidance_scale"] > 1.0 and pipe.family.classifier_free
    if branch not in ("cond", "uncond"):
        raise InputError(f"branch must be 'cond' or 'uncond', not {branch!r}")
    if branch == "uncond" and not guided:
        raise InputError("branch='uncond' needs classifier-free guidance (guidance_scale > 1)")
    schedule = make_schedule(pipe, o["num_inference_steps"], latent_shape(pipe, o["height"], o["width"]))
    reductions = resolve_reductions(loop_sites, o["reduce"], _denoiser_reductions)
    plan = Plan(**text, denoiser_sites=tuple(s.removeprefix(f"{pipe.unet.name}.") for s in loop_sites),
                denoiser_reductions=reductions, image_sites=tuple(s.removeprefix("image_encoder.") for s in image_sites),
                image_reductions=("cls",) * len(image_sites), sample=True, guided=guided, branch=branch,
                steps=_step_indices(o["timesteps"], len(schedule.timesteps)),
                latent_shape=latent_shape(pipe, o["height"], o["width"]), given_noise=o["latents"] is not None,
                return_images=return_images, token_grid=token_grid(pipe, latent_shape(pipe, o["height"], o["width"])),
                # diffusers' SDXL pipelines default force_zeros_for_empty_prompt to True
                zero_uncond=guided and pipe.family.name == "stable-diffusion-xl" and not o["negative_prompt"]
                and (pipe.pipeline_options or {}).get("force_zeros_for_empty_prompt", True))
    return plan, schedule


def _lens_layers(pipe: "Pipeline", text_layer: Any) -> tuple[tuple[str, str], ...]:
    """The Diffusion Lens' (tower, site read instead) pairs for `text_layer`, counted as transformers'
    `hidden_states[k]` in every CLIP tower the context comes from: SD feeds it to the final layer norm, SDXL
    and SD3 read it raw in place of `hidden_states[-2]` (so -(s + 2) is diffusers' `clip_skip=s`)."""
    family = pipe.family
    if not family.text_encoders:
        raise InputError(f"text_layer (the Diffusion Lens) swaps a text-encoder layer; {pipe.source} has no text "
                         "encoder")
    towers = tuple(t for t in family.lens_towers if getattr(pipe, t, None) is not None)
    if not towers:
        raise InputError(f"text_layer (the Diffusion Lens) swaps the CLIP layer a denoiser is conditioned on; "
                         f"{family.name} takes its context from a T5 encoder (CLIP gives it at most a pooled vector), "
                         "so there is no CLIP layer to swap")
    depths = [getattr(pipe, t).config.num_hidden_layers for t in towers]
    n = min(depths)
    normal = (f"{n}: the normal run" if family.context_site else
              "-2: the normal run (the penultimate layer); -(s + 2): diffusers' clip_skip=s")
    if isinstance(text_layer, bool) or not isinstance(text_layer, (int, np.integer)) or not -n - 1 <= text_layer <= n:
        raise InputError(f"text_layer must be a layer of {' and '.join(towers)} in 0..{n} (0: the token "
                         f"embeddings, k: the output of the k-th layer; negative ones count from each tower's end; "
                         f"{normal}), not {text_layer!r}")
    pairs = []
    for tower, depth in zip(towers, depths):
        k = int(text_layer) % (depth + 1)
        pairs.append((tower, "text_model.embeddings" if k == 0 else f"text_model.encoder.layers.{k - 1}"))
    return tuple(pairs)


def _with_interventions(pipe: "Pipeline", plan: Plan, schedule: schedulers.Schedule | None,
                        interventions: Sequence[Intervention], text_layer: int | None, n_prompts: int
                        ) -> tuple[Plan, dict[str, Any], dict[str, Any]]:
    """The plan with its interventions' static specs and the Diffusion Lens layer, and the interventions'
    (per-prompt, shared) values, all validated before anything runs."""
    if text_layer is not None:
        if not plan.sample:
            raise InputError("text_layer changes what conditions the denoiser: generate, or capture a denoiser site")
        plan = dataclasses.replace(plan, text_layer=_lens_layers(pipe, text_layer))
    if not interventions:
        return plan, {}, {}
    if isinstance(interventions, (str, bytes)) or not isinstance(interventions, Sequence):
        raise InterventionError("interventions must be a list of Steer/Patch/Ablate/Scale/ClampSAE")
    shapes: dict[str, Any] = {"prefix:text": "text_encoder.",
                              "text": pipe.output_shapes("text_encoder") if pipe.text_encoder is not None else {}}
    if pipe.unet is not None:
        shapes.update({"prefix:denoiser": f"{pipe.unet.name}.",
                       "denoiser": pipe.output_shapes(pipe.unet.name, plan.latent_shape if plan.sample else None)})
    specs, batched, shared = plan_interventions(
        interventions, shapes, n_prompts=n_prompts, n_steps=len(schedule.timesteps) if plan.sample else 0,
        guided=plan.guided, examples=pipe.sites())
    return dataclasses.replace(plan, interventions=specs), batched, shared


def run_capture(pipe: "Pipeline", prompts: Sequence[str], sites: Sequence[str], *, batch_size: int = 8,
                progress: bool = False, return_images: bool = False, interventions: Sequence[Intervention] = (),
                text_layer: int | None = None, **options: Any) -> Captures | tuple[Captures, np.ndarray]:
    """A Captures of `sites` (already selected), and the decoded images when asked: one program.

    options: those of `Pipeline.capture` (`CAPTURE_DEFAULTS` for any not given). Text sites (n, ...);
    denoiser and sampler sites (n, kept steps, ...); image-encoder sites embed the decoded images (n, dim).
    interventions: `jaxprobe.interventions` in the order they apply; text_layer: the Diffusion Lens'
    text-encoder layer (see `generate`)."""
    unknown = set(options) - set(CAPTURE_DEFAULTS)
    if unknown:
        raise InputError(f"unknown capture option(s) {sorted(unknown)}; known: {', '.join(CAPTURE_DEFAULTS)}")
    o = {**CAPTURE_DEFAULTS, **options}
    prompts = list(prompts)
    plan, schedule = plan_capture(pipe, sites, return_images=return_images, **o)
    plan, iv_rows, iv_shared = _with_interventions(pipe, plan, schedule, interventions, text_layer, len(prompts))
    for site, how in zip(plan.denoiser_sites, plan.denoiser_reductions):
        if how == "none" and not site.endswith(PROBS):
            warnings.warn(f"reduce='none' keeps full maps of {site} at every step: memory grows with "
                          "prompts x steps x h x w x channels", stacklevel=4)
    inputs, shared = program_inputs(pipe, prompts, plan, o, iv_rows, iv_shared)
    shared = replicate(shared)
    on_device = replicate(schedule) if schedule is not None else None
    models, params = models_of(pipe), params_of(pipe)
    seed, scale = jnp.int32(o["seed"]), jnp.float32(o["guidance_scale"])

    def run(batch):
        return capture_program(models, params, on_device, plan, {**batch, **shared}, seed, scale)

    out = run_batched(run, inputs, batch_size, progress=progress,
                      label="sampling" if plan.sample else "text encoder")
    named = {s: out[f"text:{s}"] for s in plan.text_sites}
    named.update({s if s in SAMPLER_SITES else f"{pipe.unet.name}.{s}": out[f"denoiser:{s}"]
                  for s in plan.denoiser_sites})
    named.update({f"image_encoder.{s}": out[f"image:{s}"] for s in plan.image_sites})
    description = describe_capture(pipe, sites, plan, schedule, o)
    if interventions or text_layer is not None:
        description["options"] = {**description["options"], "interventions": [describe(iv) for iv in interventions],
                                  "text_layer": text_layer}
    captures = Captures.from_arrays({s: named[s] for s in sites}, prompts=tuple(prompts), **description)
    return (captures, out["images"]) if return_images else captures


def program_inputs(pipe: "Pipeline", prompts: Sequence[Any], plan: Plan, o: Mapping[str, Any],
                   iv_rows: Mapping[str, Any] | None = None, iv_shared: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-prompt inputs, inputs every batch shares) of `capture_program` on the host, for `prompts` under `plan`
    and the complete options `o`; iv_rows, iv_shared: the interventions' per-prompt and shared values."""
    offset = o["prompt_offset"]
    ids, eos = tokenized(pipe, prompts, allow_empty=not plan.text_sites)
    inputs = {"ids": ids, "eos": eos, "prompt_index": np.arange(offset, offset + len(prompts), dtype=np.int32)}
    if plan.given_noise:
        inputs["noise"] = _given_noise(o["latents"], len(prompts), plan.latent_shape[2])
    if iv_rows:
        inputs["interventions"] = iv_rows        # per-prompt vectors and patch sources travel with their prompts
    # What every batch shares goes to the devices once, so a batch uploads only its own rows.
    shared = {}
    if plan.guided:
        shared["uncond_ids"], shared["uncond_eos"] = tokenized(pipe, [o["negative_prompt"]], allow_empty=True)
    if plan.sample:
        shared["extras"], shared["uncond_extras"] = sdxl_extras(pipe, plan, o)
        if pixart_extras(pipe, plan):
            shared["extras"] = shared["uncond_extras"] = pixart_extras(pipe, plan)
        if sd3_extras(pipe):
            shared["extras"] = shared["uncond_extras"] = sd3_extras(pipe)
        if flux_extras(pipe, o["guidance_scale"]):
            shared["extras"] = flux_extras(pipe, o["guidance_scale"])
        if pipe.family.class_conditioned:   # per-prompt labels travel with their prompts; the negative is shared
            inputs["prompt_extras"] = {"class_labels": class_labels(pipe, prompts)}
            shared["uncond_extras"] = {"class_labels": class_labels(pipe, [o["negative_prompt"]])}
    if iv_shared:
        shared["intervention_values"] = iv_shared
    return inputs, shared


_DESCRIBED = ("num_inference_steps", "guidance_scale", "branch", "negative_prompt", "height", "width", "timesteps")
_MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                       "negative_aesthetic_score")


def describe_capture(pipe: "Pipeline", sites: Sequence[str], plan: Plan, schedule: schedulers.Schedule | None,
                     options: Mapping[str, Any]) -> dict[str, Any]:
    """The `Captures.from_arrays` keywords (all but arrays and prompts) of a capture run with `plan` and
    `options` (complete: `CAPTURE_DEFAULTS` filled in)."""
    if not plan.sample:
        return {"reductions": dict(zip(sites, plan.text_reductions)), "seed": None,
                "prompt_offset": options["prompt_offset"], "options": {}}
    steps = np.asarray(plan.steps if plan.steps is not None else range(len(schedule.timesteps)))
    text = [s for s in sites if s.startswith(TEXT_TOWERS)]
    image = [s for s in sites if s.startswith("image_encoder.")]
    loop = [s for s in sites if s not in text and s not in image]
    reductions = dict(zip(text, plan.text_reductions)) | dict(zip(loop, plan.denoiser_reductions)) \
        | dict(zip(image, plan.image_reductions))
    return {"steps": steps, "timesteps": np.asarray(schedule.timesteps)[steps], "reductions": reductions,
            "seed": options["seed"], "prompt_offset": options["prompt_offset"],
            "options": {k: options[k] for k in _DESCRIBED + (_MICRO_CONDITIONING if sdxl_extras(pipe, plan, options)[0]
                                                             else ())}}


def capture_description(pipe: "Pipeline", sites: Sequence[str], **options: Any) -> dict[str, Any]:
    """What `pipe.capture(prompts, sites, **options)` would say about itself, without running it (the
    feature store keeps only arrays; a cached capture is described again from its call)."""
    o = {**CAPTURE_DEFAULTS, **{k: v for k, v in options.items() if k in CAPTURE_DEFAULTS}}
    plan, schedule = plan_capture(pipe, sites, **o)
    return describe_capture(pipe, sites, plan, schedule, o)


def generate(pipe: "Pipeline", prompts: Sequence[str], *, sites: Sequence[str] | str | None = None,
             output_type: str = "np", num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
             reduce: Any = "mean", latents: np.ndarray | None = None, batch_size: int = 8, branch: str = "cond",
             negative_prompt: str = "", height: int | None = None, width: int | None = None,
             timesteps: str | Sequence[int] = "all", progress: bool = False,
             interventions: Sequence[Intervention] = (), text_layer: int | None = None, **micro_conditioning: Any):
    """Images for the prompts: (n, H, W, 3) floats in [0, 1] ("np") or PIL images ("pil").

    With `sites`, returns (images, {site: array}) from the same run (shapes as in Pipeline.capture).
    interventions: as in `Pipeline.capture`. text_layer: the Diffusion Lens (Toker et al. 2024): the
    denoiser is conditioned on the text encoder's hidden state k (counted as transformers'
    `hidden_states[k]`: 0 the token embeddings, k the output of `text_model.encoder.layers.{k-1}`, the
    number of layers the normal run) passed through the final layer norm. SDXL and SD3 read both CLIP
    towers' state k raw where they normally read the penultimate one (-2 is the normal run, -(s + 2)
    diffusers' `clip_skip=s`); FLUX, PixArt and DiT are refused. micro_conditioning: SDXL's
    time-id options, as in `Pipeline.capture`.
    """
    if output_type not in ("np", "pil"):
        raise InputError(f"output_type must be 'np' or 'pil', not {output_type!r}")
    chosen = pipe.select(sites) if sites is not None else []
    out = run_capture(pipe, prompts, chosen, batch_size=batch_size, progress=progress, return_images=True,
                      timesteps=timesteps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      seed=seed, reduce=reduce, latents=latents, branch=branch, negative_prompt=negative_prompt,
                      height=height, width=width, interventions=interventions, text_layer=text_layer,
                      **micro_conditioning)
    captures, images = out
    result = images if output_type == "np" else _to_pil(images)
    return (result, captures) if sites is not None else result


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8)) for im in images]


def capture_images(pipe: "Pipeline", images: Any, sites: Sequence[str] | str = ("unet.mid_block",), *,
                   t: int = 25, prompt: str = "", seed: int = 0, reduce: Any = "mean", batch_size: int = 8,
                   size: int | None = None, offset: int = 0, progress: bool = False,
                   interventions: Sequence[Intervention] = ()) -> dict[str, np.ndarray]:
    """Diffusion features of real images: {site: (n, dim)} (or unreduced maps with reduce="none").

    Each image is VAE-encoded (the posterior mean), noised to training timestep `t` with noise that
    depends only on (seed, offset + image index), and passed once through the UNet conditioned on
    `prompt`; `offset` lets a dataset extracted in chunks get the noise of one whole run.
    interventions: on UNet sites, in list order, during that one pass (its step axis has one entry, 0;
    per-image vectors and Patch sources have one row per image).
    """
    _require(pipe, "unet", "vae", "scheduler")
    if not 0 <= t < pipe.scheduler.num_train_timesteps:
        raise InputError(f"t must be a training timestep in 0..{pipe.scheduler.num_train_timesteps - 1}, got {t}")
    prefix = f"{pipe.unet.name}."
    chosen = [s for s in pipe.select(sites) if s.startswith(prefix)]
    if not chosen:
        raise SiteError(f"capture_images captures denoiser sites (e.g. '{pipe.bottleneck_site}')")
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = size or pipe.unet.config.sample_size * factor
    arr = load_images(images, size)
    latent = (size // factor, size // factor, pipe.family.latent_channels(pipe.unet.config))
    plan = Plan(denoiser_sites=tuple(s.removeprefix(prefix) for s in chosen),
                denoiser_reductions=resolve_reductions(chosen, reduce, _denoiser_reductions), branch="cond",
                token_grid=token_grid(pipe, latent))
    inputs = {"images": arr, "prompt_index": np.arange(offset, offset + len(arr), dtype=np.int32)}
    plan_extras, _ = sdxl_extras(pipe, dataclasses.replace(plan, latent_shape=latent), CAPTURE_DEFAULTS)
    if pipe.family.class_conditioned:   # `prompt` is the class ("": the null class, unconditional features)
        plan_extras = {"class_labels": class_labels(pipe, [prompt])}
    plan_extras = {**plan_extras, **pixart_extras(pipe, dataclasses.replace(plan, latent_shape=latent)),
                   **flux_extras(pipe, flux.DEFAULT_GUIDANCE_SCALE)}
    prompt_ids, prompt_eos = tokenized(pipe, [prompt], allow_empty=True)
    shared = {"prompt_ids": prompt_ids, "prompt_eos": prompt_eos, "extras": plan_extras}
    if interventions:
        text = [iv.site for iv in interventions if not iv.site.startswith(f"{pipe.unet.name}.")]
        if text:
            raise InterventionError(f"capture_images conditions every image on one prompt and intervenes on UNet "
                                    f"sites only; {', '.join(text)} is not one (change `prompt` instead)")
        shapes = {"prefix:denoiser": f"{pipe.unet.name}.", "denoiser": pipe.output_shapes(pipe.unet.name, latent)}
        specs, rows, values = plan_interventions(interventions, shapes, n_prompts=len(arr), n_steps=1, guided=False,
                                                 examples=pipe.sites())
        plan = dataclasses.replace(plan, interventions=specs)
        if rows:
            inputs["interventions"] = rows
        if values:
            shared["intervention_values"] = values
    shared = replicate(shared)
    models, params = models_of(pipe), params_of(pipe)
    seed_, t_ = jnp.int32(seed), jnp.int32(t)
    out = run_batched(lambda batch: real_image_program(models, params, pipe.scheduler, plan, {**batch, **shared},
                                                       seed_, t_), inputs, batch_size, progress=progress,
                      label="images")
    return {site: out[f"denoiser:{local}"] for site, local in zip(chosen, plan.denoiser_sites)}
