"""Benchmark: full-size denoiser sampling, jaxprobe (jitted lax.scan, capture on/off, steering) vs diffusers.

The denoiser has SD 1.5's UNet (860M parameters, 64x64 latents), SDXL base's (2.6B, 128x128), DiT-XL/2 256's
class-conditional transformer (750M, 32x32), PixArt-Sigma 1024's (611M, 128x128, conditioned on given T5-XXL
states), SD3.5 Medium's MMDiT (2.2B, 128x128, given joint text states and pooled CLIP) or FLUX.1-schnell's
transformer (11.9B, 128x128 latents packed 2x2, no guidance) architecture with random weights; classifier-free
guidance (denoiser batch = 2 x batch) except for FLUX, the model's own sampler (PNDM, Euler, DDIM, DPM-Solver++,
flow-matching Euler).
Every row runs `--steps` denoising steps on the same inputs; rows are timed interleaved (`--repeats`
rounds of every row in turn, after one warm-up each) and reported as median ms per UNet evaluation
with the spread (min, max), so a shared machine's drift hits every row alike.

Rows: jaxprobe with capture off, with every block output captured (spatial or token mean) at every
step (for SDXL: the contributions of the four transformer blocks SDXL-Turbo's SAEs are trained on), and
with a Patch then a Steer on the bottleneck (`mid_block`, a transformer's middle block) at every step; diffusers' UNet eager, torch.compile, eager with
forward hooks capturing the same means (`diffusers_capture`), and eager with a hook doing the steering
row's two edits (`diffusers_hooks`).

Precision follows the device: float32 on CPU (both frameworks), bfloat16 for jaxprobe and float16 for
diffusers on GPU; `--dtype` overrides jaxprobe's.

    python scripts/bench_sampling.py --model sd15-random --json bench_sampling.json          # GPU
    python scripts/bench_sampling.py --model sd15-random --device cpu --steps 1 --batch 1 --repeats 3 \
        --rows capture_off capture_blocks diffusers_eager diffusers_capture                  # issue 21's CPU row
    python scripts/bench_sampling.py --model sdxl-random --batch 4 --steps 30 --json bench_sdxl.json    # GPU
    python scripts/bench_sampling.py --model sdxl-random --size 512 --dtype bfloat16 --steps 1 --batch 1 \
        --rows capture_off --no-peer                                                        # SDXL on a CPU
    python scripts/bench_sampling.py --model dit-random --batch 32 --steps 50 --json bench_dit.json     # GPU
    python scripts/bench_sampling.py --model pixart-random --batch 4 --steps 20 --json bench_pixart.json # GPU
    python scripts/bench_sampling.py --model dit-random --steps 1 --batch 1 \
        --rows capture_off capture_blocks diffusers_eager                                   # DiT on a CPU
    python scripts/bench_sampling.py --model flux-random --batch 1 --steps 4 --json bench_flux.json  # GPU
    python scripts/bench_sampling.py --model sd3-random --batch 2 --steps 28 --json bench_sd3.json    # GPU
    python scripts/bench_sampling.py --model toy --steps 3 --batch 1                         # a smoke run
    python scripts/bench_sampling.py --model flux-toy --steps 2 --batch 1                    # (also sd3-toy)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.random import (
    DIT_SCHEDULER,
    PIXART_SCHEDULER,
    RANDOM_MODELS,
    SD3_SCHEDULER,
    SD15_SCHEDULER,
    SDXL_SCHEDULER,
    random_params,
)
from jaxprobe.models import flux as flux_model
from jaxprobe.models import schedulers
from jaxprobe.models.dit import DiTConfig
from jaxprobe.models.flux import FluxConfig
from jaxprobe.models.sd3 import SD3Config
from jaxprobe.models.families import family_of_config
from jaxprobe.models.layers import attention_implementation
from jaxprobe.models.pixart import PixArtConfig
from jaxprobe.models.unet import UNetConfig
from jaxprobe.pipeline.interventions import Patch, Steer, module_outputs, plan_interventions
from jaxprobe.pipeline.programs import Models, Plan, denoise
from jaxprobe.pipeline.sites import block_sites_of, flatten_intermediates
from jaxprobe.runtime.xla_flags import add_half_precision_cpu_flags

ROWS = ("capture_off", "capture_blocks", "steering", "diffusers_eager", "diffusers_compiled", "diffusers_capture",
        "diffusers_hooks")
PEERS = ROWS[3:]

# (diffusers model kwargs, scheduler_config.json) of each model; jaxprobe's configs take the same (KINDS).
MODELS = {
    "sd15-random": (dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8), SD15_SCHEDULER),
    "sdxl-random": (dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                         transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2816), SDXL_SCHEDULER),
    "toy": (dict(sample_size=16, cross_attention_dim=64, block_out_channels=(32, 64), layers_per_block=1,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), SD15_SCHEDULER),
    "dit-random": (dict(sample_size=32, out_channels=8, num_embeds_ada_norm=1000), DIT_SCHEDULER),
    "pixart-random": (dict(sample_size=128, out_channels=8, caption_channels=4096, cross_attention_dim=1152,
                           interpolation_scale=2, use_additional_conditions=False), PIXART_SCHEDULER),
    # the random models' own transformer configs (SD3.5 Medium, FLUX.1-schnell); diffusers gets the fields it takes
    "sd3-random": (dataclasses.asdict(RANDOM_MODELS["sd3-random"](0)["transformer"]), SD3_SCHEDULER),
    "flux-random": (dataclasses.asdict(RANDOM_MODELS["flux-random"](0)["transformer"]), flux_model.FLUX_SCHNELL_SCHEDULER),
    "sd3-toy": (dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
                     pos_embed_max_size=16, qk_norm="rms_norm"), SD3_SCHEDULER),
    "flux-toy": (dict(sample_size=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
                 flux_model.FLUX_SCHNELL_SCHEDULER),
}
# Which jaxprobe config and diffusers class each model's kwargs build (the rest are UNets).
KINDS = {"dit-random": (DiTConfig, "DiTTransformer2DModel"), "pixart-random": (PixArtConfig, "PixArtTransformer2DModel"),
         "sd3-random": (SD3Config, "SD3Transformer2DModel"), "sd3-toy": (SD3Config, "SD3Transformer2DModel"),
         "flux-random": (FluxConfig, "FluxTransformer2DModel"), "flux-toy": (FluxConfig, "FluxTransformer2DModel")}
SD3_TOKENS = 77 + 256   # CLIP's tokens, then T5's, as StableDiffusion3Pipeline joins them
TEXT_TOKENS, POOLED_WIDTH = 77, 1280
T5_TOKENS, T5_REAL_TOKENS = 300, 24   # PixArt-Sigma's padded prompt length, and a short prompt's real tokens
# The capture row's sites (spatial mean at every step): every block output, or for SDXL the four hook points
# whose contributions SDXL-Turbo's SAEs are trained on (issue 13).
CAPTURES = {"sdxl-random": ("down_blocks.2.attentions.1.contribution", "mid_block.attentions.0.contribution",
                            "up_blocks.0.attentions.0.contribution", "up_blocks.0.attentions.1.contribution")}


@functools.partial(jax.jit, static_argnames=("models", "plan"))
def sample_program(models, params, schedule, plan, noise, conditioning, scale, inputs):
    """The sampling loop of jaxprobe's capture program, on given conditioning ([uncond; cond]);
    inputs: the values of the plan's interventions."""
    return denoise(models, params, schedule, plan, noise, conditioning, scale, inputs)


def make_config(model: str, kwargs: dict):
    config_cls, _ = KINDS.get(model, (UNetConfig, "UNet2DConditionModel"))
    return config_cls(**kwargs) if config_cls is UNetConfig else config_cls.from_dict(kwargs)


def make_inputs(config, batch: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Initial noise (batch, h, w, latent channels) and the CFG pair's conditioning (2 x batch rows, [uncond; cond]),
    channels last: text states (UNets), null class and classes (DiT), padded T5 states and their mask (PixArt),
    joint text states and pooled CLIP (SD3; FLUX with one row per prompt, as it runs unguided)."""
    rng = np.random.default_rng(seed)
    side = config.sample_size
    channels = config.latent_channels if isinstance(config, FluxConfig) else config.in_channels
    noise = rng.standard_normal((batch, side, side, channels)).astype(np.float32)
    if isinstance(config, (SD3Config, FluxConfig)):   # FLUX has no CFG pair: one row per prompt
        rows, tokens = (batch, flux_model.T5_SEQUENCE_LENGTH) if isinstance(config, FluxConfig) else (2 * batch, SD3_TOKENS)
        return noise, {"encoder_hidden_states": rng.standard_normal((rows, tokens, config.joint_attention_dim)
                                                                    ).astype(np.float32),
                       "pooled_projections": rng.standard_normal((rows, config.pooled_projection_dim)).astype(np.float32)}
    if isinstance(config, DiTConfig):
        labels = np.concatenate([np.full(batch, config.null_class), rng.integers(0, config.null_class, batch)])
        return noise, {"class_labels": labels.astype(np.int32)}
    if isinstance(config, PixArtConfig):
        mask = (np.arange(T5_TOKENS)[None] < T5_REAL_TOKENS).repeat(2 * batch, 0).astype(np.int32)
        states = rng.standard_normal((2 * batch, T5_TOKENS, config.text_width)).astype(np.float32)
        return noise, {"encoder_hidden_states": states, "encoder_attention_mask": mask}
    conditioning = {"encoder_hidden_states": rng.standard_normal((2 * batch, TEXT_TOKENS, config.cross_attention_dim))}
    if config.addition_embed_type == "text_time":
        conditioning["text_embeds"] = rng.standard_normal((2 * batch, POOLED_WIDTH))
        conditioning["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]]), (2 * batch, 1))
    return noise, {k: v.astype(np.float32) for k, v in conditioning.items()}


def jax_runner(module, params, schedule, plan, noise, conditioning, inputs=None) -> tuple[Callable[[], None], dict]:
    """A function running the whole sampling loop once, and its compile time and memory figures."""
    models = Models(denoiser=module, family=family_of_config(module.config))
    params, inputs, scale = {"denoiser": params}, jax.device_put(inputs or {}), jnp.float32(7.5)
    noise, conditioning = jnp.asarray(noise), {k: jnp.asarray(v) for k, v in conditioning.items()}
    start = time.perf_counter()
    compiled = sample_program.lower(models, params, schedule, plan, noise, conditioning, scale, inputs).compile()
    figures = {"compile_s": time.perf_counter() - start}
    memory = compiled.memory_analysis()
    if memory is not None:
        figures["temp_bytes"] = int(memory.temp_size_in_bytes)
    return lambda: jax.block_until_ready(compiled(params, schedule, noise, conditioning, scale, inputs)), figures
def guided_model(model: str) -> bool:
    """Whether the model samples with classifier-free guidance (FLUX embeds its guidance or has none)."""
    return KINDS.get(model, (None,))[0] is not FluxConfig


def bottleneck(config) -> str:
    return family_of_config(config).bottleneck(config)


def steering(module, params, config, batch: int, evals: int, guided: bool = True
             ) -> tuple[Plan, dict, np.ndarray, np.ndarray]:
    """The steering row: Patch then Steer on the bottleneck at every step. Returns the plan, its inputs, and the
    vector (c,) and patch source (batch, evals, h, w, c) or (batch, evals, tokens, c) for the diffusers hook."""
    family = family_of_config(config)
    outputs = jax.eval_shape(lambda: module.apply({"params": params}, *family.example_inputs(config),
                                                  mutable=["intermediates"])[1]["intermediates"])
    shapes = {path: tuple(v.shape[1:]) for path, v in module_outputs(outputs).items()}
    site, prefix = bottleneck(config), f"{family.component}."
    mid = shapes[site]
    rng = np.random.default_rng(1)
    vector = rng.standard_normal(mid[-1]).astype(np.float32)
    source = rng.standard_normal((batch, evals, *mid)).astype(np.float32)
    specs, rows, shared = plan_interventions(
        [Patch(prefix + site, source), Steer(prefix + site, vector, scale=2.0)],
        {"prefix:denoiser": prefix, "denoiser": shapes}, n_prompts=batch, n_steps=evals, guided=guided)
    plan = Plan(sample=True, guided=guided, interventions=specs)
    return plan, {"interventions": rows, "intervention_values": shared}, vector, source


def torch_runner(model: str, kwargs: dict, noise: np.ndarray, conditioning: dict[str, np.ndarray], evals: int, *,
                 compile_: bool = False, capture: tuple[str, ...] = (), hook: tuple[np.ndarray, np.ndarray] | None = None,
                 hook_site: str = "mid_block") -> tuple[Callable[[], None], dict]:
    """diffusers' denoiser doing the same `evals` guided evaluations (the CFG combination, no sampler update:
    diffusers' schedulers are a few elementwise ops per step). capture: block names whose spatial (or token)
    mean a forward hook keeps at every step, as jaxprobe's capture row; hook: the steering row's (vector, patch)
    on `hook_site`."""
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch_cls = getattr(diffusers, KINDS.get(model, (None, "UNet2DConditionModel"))[1])
    accepted = inspect.signature(torch_cls.__init__).parameters   # our configs add derived fields (sample_size)
    unet = torch_cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
                        if k in accepted}).to(device, dtype).eval()
    if compile_:
        unet = torch.compile(unet, mode="max-autotune" if device == "cuda" else "default", fullgraph=True)
    as_torch = lambda a: torch.from_numpy(a).to(device, dtype)
    guided = guided_model(model)
    x = as_torch(np.concatenate([noise, noise]) if guided else noise).permute(0, 3, 1, 2).contiguous()
    if KINDS.get(model, (None,))[0] is FluxConfig:   # FluxPipeline's packed 2x2 tokens, rotary ids, sigma as t
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.from_numpy(flux_model.image_ids(h // 2, w // 2)).to(device, dtype)
        context, pooled = as_torch(conditioning["encoder_hidden_states"]), as_torch(conditioning["pooled_projections"])
        txt_ids = torch.zeros(context.shape[1], 3, device=device, dtype=dtype)
        call = lambda t: unet(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,  # noqa: E731
                              timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=None)
    elif "pooled_projections" in conditioning:   # SD3
        context, pooled = as_torch(conditioning["encoder_hidden_states"]), as_torch(conditioning["pooled_projections"])
        call = lambda t: unet(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,  # noqa: E731
                              timestep=t)
    elif "class_labels" in conditioning:       # DiT
        labels = torch.from_numpy(conditioning["class_labels"]).long().to(device)
        call = lambda t: unet(x, timestep=t, class_labels=labels)  # noqa: E731
    elif "encoder_attention_mask" in conditioning:   # PixArt
        context, mask = as_torch(conditioning["encoder_hidden_states"]), as_torch(conditioning["encoder_attention_mask"])
        call = lambda t: unet(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t,  # noqa: E731
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        context = as_torch(conditioning["encoder_hidden_states"])
        added = ({"text_embeds": as_torch(conditioning["text_embeds"]), "time_ids": as_torch(conditioning["time_ids"])}
                 if "time_ids" in conditioning else None)
        call = lambda t: unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)  # noqa: E731
    step, kept = [0], []
    joint = "pooled_projections" in conditioning   # SD3's and FLUX's blocks return (text, image) streams
    for name in capture:
        module_name, _, kind = name.rpartition(".") if name.endswith((".contribution", ".context")) else (name, "", "")

        def keep(module, args, kwargs, output, kind=kind):
            out = output
            if isinstance(output, tuple):   # jaxprobe's X.context is a joint block's text stream
                out = output[1] if joint and kind != "context" else output[0]
            if kind == "contribution":   # jaxprobe's X.contribution: output minus input
                out = out - (args[0] if args else kwargs["hidden_states"])
            kept.append(out.mean(dim=(2, 3)) if out.ndim == 4 else out.mean(dim=1))   # maps or tokens
        unet.get_submodule(module_name).register_forward_hook(keep, with_kwargs=True)
    if hook is not None:   # a hand-written hook doing what the steering row does: patch, then add the vector
        source = torch.from_numpy(hook[1]).to(device, dtype)
        vector = torch.from_numpy(2.0 * hook[0]).to(device, dtype)
        if source.ndim == 5:   # maps (b, T, h, w, c) -> (b, T, c, h, w); tokens (b, T, n, c) stay
            source, vector = source.permute(0, 1, 4, 2, 3), vector[:, None, None]

        def edit(module, args, output):   # both CFG halves, as branch="both"
            now = source[:, step[0] % source.shape[1]]
            new = (now.repeat(2, *(1,) * (now.ndim - 1)) if guided else now) + vector
            if isinstance(output, tuple):   # a joint block's (text, image) streams; the image one is edited
                return tuple(new if o is not None and o.shape == new.shape else o for o in output)
            return new
        unet.get_submodule(hook_site).register_forward_hook(edit)

    @torch.no_grad()
    def loop():
        kept.clear()
        for t in range(evals):
            eps = call(torch.full((x.shape[0],), 999 - t, device=device, dtype=dtype)).sample
            step[0] += 1
            if guided:
                uncond, cond = eps.chunk(2)
                _ = uncond + 7.5 * (cond - uncond)
        if device == "cuda":
            torch.cuda.synchronize()

    return loop, {"torch_threads": torch.get_num_threads(), "torch_dtype": str(dtype)}


def interleaved(runners: dict[str, Callable[[], None]], repeats: int, evals: int) -> dict[str, dict[str, float]]:
    """Warm every runner up once, then time `repeats` rounds of all of them in turn: ms per UNet evaluation."""
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / evals * 1e3)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "all": t} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="sd15-random")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: JAX's default backend")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="jaxprobe's compute dtype")
    parser.add_argument("--batch", type=int, default=8, help="prompts; the denoiser sees twice as many (CFG)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's); latents are 1/8")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which measurements to run")
    parser.add_argument("--no-peer", action="store_true", help="skip every diffusers row")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds of every row (interleaved)")
    parser.add_argument("--max-batch", action="store_true", help="then double the capture row's batch until it no "
                        "longer fits")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.device:
        jax.config.update("jax_platforms", args.device.replace("gpu", "cuda"))
    if args.dtype in ("bfloat16", "float16"):
        add_half_precision_cpu_flags()   # as jaxprobe.load does, before the first JAX call
    device = jax.devices()[0]
    rows = [r for r in args.rows if not (args.no_peer and r in PEERS)]
    dtype = jnp.dtype(args.dtype or ("float32" if device.platform == "cpu" else "bfloat16"))

    kwargs, scheduler = MODELS[args.model]
    if args.size:
        kwargs = {**kwargs, "sample_size": args.size // 8}
    config = make_config(args.model, kwargs)
    family = family_of_config(config)
    module = family.module(config, dtype)
    params = jax.tree.map(jnp.asarray, random_params(module, *family.example_inputs(config), dtype=dtype))
    schedule = schedulers.make_schedule(schedulers.SchedulerConfig.from_dict(scheduler), args.steps)
    evals = len(schedule.timesteps)
    noise, conditioning = make_inputs(config, args.batch)

    names = jax.eval_shape(lambda: module.apply({"params": params}, *family.example_inputs(config),
                                                mutable=["intermediates"])[1]["intermediates"])
    prefix = f"{family.component}."
    blocks = CAPTURES.get(args.model) or tuple(
        s.removeprefix(prefix) for s in block_sites_of([prefix + n for n in flatten_intermediates(names)],
                                                       family.component, family.block_sites))
    grid = (config.sample_size // config.patch_size,) * 2 if family.patch_tokens else None
    guided = guided_model(args.model)
    steer_plan, steer_inputs, vector, source = steering(module, params, config, args.batch, evals, guided)
    plans = {"capture_off": (Plan(sample=True, guided=guided), None),
             "capture_blocks": (Plan(denoiser_sites=blocks, denoiser_reductions=("mean",) * len(blocks), sample=True,
                                     guided=guided, token_grid=grid), None),
             "steering": (steer_plan, steer_inputs)}
    figures: dict = {"model": args.model, "device": device.device_kind, "platform": device.platform,
                     "dtype": str(dtype), "attention": attention_implementation(device.platform),
                     "unet_parameters": int(sum(x.size for x in jax.tree.leaves(params))), "batch": args.batch,
                     "cfg_unet_batch": 2 * args.batch if guided else args.batch, "steps": args.steps, "unet_evaluations": evals,
                     "repeats": args.repeats, "captured_sites": list(blocks), "rows": rows, "jax": jax.__version__,
                     "python": platform.python_version()}
    runners: dict[str, Callable[[], None]] = {}
    for name in rows:
        if name in plans:
            plan, inputs = plans[name]
            runners[name], extra = jax_runner(module, params, schedule, plan, noise, conditioning, inputs)
            figures.update({f"jaxprobe_{name}_{k}": v for k, v in extra.items()})
    if any(r in PEERS for r in rows):
        import diffusers
        import torch

        figures["torch"], figures["diffusers"] = torch.__version__, diffusers.__version__
        peers = {"diffusers_eager": {}, "diffusers_compiled": {"compile_": True},
                 "diffusers_capture": {"capture": blocks},
                 "diffusers_hooks": {"hook": (vector, source), "hook_site": bottleneck(config)}}
        for name in (r for r in rows if r in PEERS):
            try:
                runners[name], extra = torch_runner(args.model, kwargs, noise, conditioning, evals, **peers[name])
                figures.update(extra)
            except Exception as err:  # noqa: BLE001 - record why a peer could not run, keep the rest
                figures[f"{name}_error"] = repr(err)[:300]
    timed = interleaved(runners, args.repeats, evals)
    for name, t in timed.items():
        figures[f"{name}_ms_per_step"] = t["median"]
        figures[f"{name}_ms_spread"] = [t["min"], t["max"]]
        figures[f"{name}_ms_all"] = t["all"]
        if name in plans:
            figures[f"jaxprobe_{name}_images_per_s"] = args.batch / (t["median"] * evals / 1e3)
    ms = {name: t["median"] for name, t in timed.items()}
    for name, key in (("capture_blocks", "capture_overhead"), ("steering", "steering_overhead")):
        if "capture_off" in ms and name in ms:
            figures[key] = ms[name] / ms["capture_off"] - 1
    for jax_row, peer in (("capture_off", "diffusers_eager"), ("capture_blocks", "diffusers_eager"),
                          ("capture_blocks", "diffusers_capture"), ("capture_blocks", "diffusers_compiled"),
                          ("steering", "diffusers_hooks")):
        if jax_row in ms and peer in ms:
            figures[f"speedup_{jax_row}_vs_{peer}"] = ms[peer] / ms[jax_row]
    if args.max_batch:
        batch, fits = args.batch, args.batch
        while batch <= 1024:
            try:
                batch_noise, batch_conditioning = make_inputs(config, batch)
                run, _ = jax_runner(module, params, schedule, plans["capture_blocks"][0], batch_noise, batch_conditioning)
                run()
                fits, batch = batch, batch * 2
            except Exception:  # noqa: BLE001 - out of memory ends the search
                break
        figures["largest_batch_that_fits"] = fits
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({k: v for k, v in figures.items() if not k.endswith("_ms_all")}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
