"""Benchmark: SD-1.5-sized sampling, jaxprobe (bf16, jitted lax.scan, capture on/off) vs diffusers.

The UNet has SD-1.5's architecture (860M parameters) with random weights; 512x512 images (64x64
latents), classifier-free guidance (UNet batch = 2 x batch), PNDM. Reports ms per denoising step and
images/s for jaxprobe with every down/mid/up block output captured (spatial mean) at every step and
with capture off, the compile time, and diffusers' UNet fp16 eager and torch.compile on the same
inputs in the same process; optionally the largest batch that fits (--max-batch).

The steering row runs one Patch and then one Steer on `unet.mid_block` at every step (no capture; in
this order neither edit is dead code) against capture off, and diffusers eager with the same two
edits as a forward hook on its mid block.

    python scripts/bench_sampling.py --json bench_sampling.json                  # GPU
    python scripts/bench_sampling.py --small --steps 3 --batch 1                 # a CPU smoke run
    python scripts/bench_sampling.py --steps 2 --batch 1 --rows capture_off steering diffusers_eager diffusers_hooks
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.random import SD15_SCHEDULER, random_params
from jaxprobe.models import schedulers
from jaxprobe.models.families import STABLE_DIFFUSION
from jaxprobe.models.unet import BLOCK_SITES, UNet2DConditionModel, UNetConfig, example_inputs
from jaxprobe.pipeline.interventions import Patch, Steer, module_outputs, plan_interventions
from jaxprobe.pipeline.programs import Models, Plan, denoise
from jaxprobe.pipeline.sites import block_sites_of, flatten_intermediates

ROWS = ("capture_off", "capture_blocks", "steering", "diffusers_eager", "diffusers_compiled", "diffusers_hooks")

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SMALL_UNET = dict(sample_size=16, cross_attention_dim=64, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@functools.partial(jax.jit, static_argnames=("models", "plan"))
def sample_program(models, params, schedule, plan, noise, context, scale, inputs):
    """The sampling loop of jaxprobe's capture program, on given conditioning ([uncond; cond]);
    inputs: the values of the plan's interventions."""
    return denoise(models, params, schedule, plan, noise, {"encoder_hidden_states": context}, scale, inputs)


def jax_step_ms(module, params, schedule, plan, batch, latent, width, steps, inputs=None,
                repeats: int = 1) -> tuple[float, float]:
    """(best ms per UNet evaluation over `repeats` timed runs after a warm-up, compile seconds)."""
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((batch, latent, latent, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2 * batch, 77, width)), jnp.float32)
    models, scale = Models(denoiser=module, family=STABLE_DIFFUSION), jnp.float32(7.5)
    params, inputs = {"denoiser": params}, jax.device_put(inputs or {})
    start = time.perf_counter()
    compiled = sample_program.lower(models, params, schedule, plan, noise, context, scale, inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, schedule, noise, context, scale, inputs))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, schedule, noise, context, scale, inputs))
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e3, compile_s


def steering(module, params, config, batch: int, evals: int) -> tuple[Plan, dict, np.ndarray, np.ndarray]:
    """The steering row: Patch then Steer on mid_block at every step. Returns the plan, its inputs, and the
    vector (c,) and patch source (batch, evals, h, w, c) for the diffusers hook."""
    outputs = jax.eval_shape(lambda: module.apply({"params": params}, *example_inputs(config),
                                                  mutable=["intermediates"])[1]["intermediates"])
    shapes = {path: tuple(v.shape[1:]) for path, v in module_outputs(outputs).items()}
    mid = shapes["mid_block"]
    rng = np.random.default_rng(1)
    vector = rng.standard_normal(mid[-1]).astype(np.float32)
    source = rng.standard_normal((batch, evals, *mid)).astype(np.float32)
    specs, rows, shared = plan_interventions(
        [Patch("unet.mid_block", source), Steer("unet.mid_block", vector, scale=2.0)],
        {"prefix:denoiser": "unet.", "denoiser": shapes}, n_prompts=batch, n_steps=evals, guided=True)
    plan = Plan(sample=True, guided=True, interventions=specs)
    return plan, {"interventions": rows, "intervention_values": shared}, vector, source


def torch_step_ms(config: dict, batch: int, latent: int, width: int, steps: int, compile_: bool,
                  hook: tuple[np.ndarray, np.ndarray] | None = None, repeats: int = 1) -> float:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = TorchUNet(**config).to(device, dtype).eval()
    if compile_:
        unet = torch.compile(unet, mode="max-autotune" if device == "cuda" else "default", fullgraph=True)
    x = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2 * batch, 77, width, device=device, dtype=dtype)
    step = [0]
    if hook is not None:   # a hand-written hook doing what the steering row does: patch, then add the vector
        vector = torch.from_numpy(2.0 * hook[0]).to(device, dtype)[None, :, None, None]
        source = torch.from_numpy(hook[1]).to(device, dtype).permute(0, 1, 4, 2, 3)   # (b, T, c, h, w)

        def edit(module, args, output):   # both CFG halves, as branch="both"
            return source[:, step[0] % source.shape[1]].repeat(2, 1, 1, 1) + vector
        unet.mid_block.register_forward_hook(edit)

    @torch.no_grad()
    def loop(n):
        for t in range(n):
            noise = unet(x, 999 - t, encoder_hidden_states=context).sample
            step[0] += 1
            uncond, cond = noise.chunk(2)
            _ = uncond + 7.5 * (cond - uncond)
        if device == "cuda":
            torch.cuda.synchronize()

    loop(min(3, steps))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loop(steps)
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--small", action="store_true", help="a toy UNet, for a CPU smoke run")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--max-batch", action="store_true", help="double the batch until it no longer fits")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which measurements to run")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (the best is kept)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = set(args.rows) - ({"diffusers_eager", "diffusers_compiled", "diffusers_hooks"} if args.no_peer else set())

    kwargs = SMALL_UNET if args.small else SD15_UNET
    config = UNetConfig(**kwargs)
    module = UNet2DConditionModel(config, dtype=jnp.bfloat16)
    latent, width = config.sample_size, config.cross_attention_dim
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_params(module, *example_inputs(config)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = schedulers.make_schedule(schedulers.SchedulerConfig.from_dict(SD15_SCHEDULER), args.steps)
    evals = len(schedule.timesteps)

    names = jax.eval_shape(lambda: module.apply({"params": params}, *example_inputs(config),
                                                mutable=["intermediates"])[1]["intermediates"])
    blocks = tuple(s.removeprefix("unet.") for s in
                   block_sites_of([f"unet.{n}" for n in flatten_intermediates(names)], "unet", BLOCK_SITES))
    plans = {"capture_off": (Plan(sample=True, guided=True), None),
             "capture_blocks": (Plan(denoiser_sites=blocks, denoiser_reductions=("mean",) * len(blocks), sample=True,
                                     guided=True), None)}
    steer_plan, steer_inputs, vector, source = steering(module, params, config, args.batch, evals)
    plans["steering"] = (steer_plan, steer_inputs)
    figures: dict = {"device": jax.devices()[0].device_kind, "unet_parameters": int(n_params), "batch": args.batch,
                     "cfg_unet_batch": 2 * args.batch, "steps": args.steps, "unet_evaluations": evals,
                     "captured_sites": list(blocks), "jax": jax.__version__, "python": platform.python_version()}
    figures["rows"] = [r for r in ROWS if r in rows]
    for name, (plan, inputs) in plans.items():
        if name not in rows:
            continue
        ms, compile_s = jax_step_ms(module, params, schedule, plan, args.batch, latent, width, evals, inputs,
                                    args.repeats)
        figures[f"jaxprobe_{name}_ms_per_step"] = ms
        figures[f"jaxprobe_{name}_images_per_s"] = args.batch / (ms * evals / 1e3)
        figures[f"jaxprobe_{name}_compile_s"] = compile_s
    off = figures.get("jaxprobe_capture_off_ms_per_step")
    for name, key in (("capture_blocks", "capture_overhead"), ("steering", "steering_overhead")):
        if off and f"jaxprobe_{name}_ms_per_step" in figures:
            figures[key] = figures[f"jaxprobe_{name}_ms_per_step"] / off - 1
    if rows & {"diffusers_eager", "diffusers_compiled", "diffusers_hooks"}:
        import diffusers
        import torch

        torch_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        figures["torch"], figures["diffusers"] = torch.__version__, diffusers.__version__
        peers = {"diffusers_eager": (False, None), "diffusers_compiled": (True, None),
                 "diffusers_hooks": (False, (vector, source))}
        for key, (compile_, hook) in peers.items():
            if key not in rows:
                continue
            try:
                figures[f"{key}_ms_per_step"] = torch_step_ms(torch_kwargs, args.batch, latent, width, evals, compile_,
                                                              hook, args.repeats)
            except Exception as err:  # noqa: BLE001 - record why a peer could not run, keep the rest
                figures[f"{key}_error"] = repr(err)[:300]
        for key in ("diffusers_eager", "diffusers_compiled"):
            if f"{key}_ms_per_step" in figures and "jaxprobe_capture_blocks_ms_per_step" in figures:
                figures[f"speedup_vs_{key}"] = figures[f"{key}_ms_per_step"] / figures["jaxprobe_capture_blocks_ms_per_step"]
        if "diffusers_hooks_ms_per_step" in figures and "diffusers_eager_ms_per_step" in figures:
            figures["diffusers_hooks_overhead"] = figures["diffusers_hooks_ms_per_step"] / figures["diffusers_eager_ms_per_step"] - 1
        if "diffusers_hooks_ms_per_step" in figures and "jaxprobe_steering_ms_per_step" in figures:
            figures["speedup_vs_diffusers_hooks"] = figures["diffusers_hooks_ms_per_step"] / figures["jaxprobe_steering_ms_per_step"]
    if args.max_batch:
        batch, fits = args.batch, args.batch
        while batch <= 1024:
            try:
                jax_step_ms(module, params, schedule, plans["capture_blocks"][0], batch, latent, width, evals)
                fits, batch = batch, batch * 2
            except Exception:  # noqa: BLE001 - out of memory ends the search
                break
        figures["largest_batch_that_fits"] = fits
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
