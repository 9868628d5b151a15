"""Benchmark: SD-1.5-sized sampling, jaxprobe (bf16, jitted lax.scan, capture on/off) vs diffusers.

The UNet has SD-1.5's architecture (860M parameters) with random weights; 512x512 images (64x64
latents), classifier-free guidance (UNet batch = 2 x batch), PNDM. Reports ms per denoising step and
images/s for jaxprobe with every down/mid/up block output captured (spatial mean) at every step and
with capture off, the compile time, and diffusers' UNet fp16 eager and torch.compile on the same
inputs in the same process; optionally the largest batch that fits (--max-batch).

    python scripts/bench_sampling.py --json bench_sampling.json                  # GPU
    python scripts/bench_sampling.py --small --steps 3 --batch 1                 # a CPU smoke run
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
from jaxprobe.pipeline.programs import Models, Plan, denoise
from jaxprobe.pipeline.sites import block_sites_of, flatten_intermediates

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SMALL_UNET = dict(sample_size=16, cross_attention_dim=64, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@functools.partial(jax.jit, static_argnames=("models", "plan"))
def sample_program(models, params, schedule, plan, noise, context, scale):
    """The sampling loop of jaxprobe's capture program, on given conditioning ([uncond; cond])."""
    return denoise(models, params, schedule, plan, noise, {"encoder_hidden_states": context}, scale)


def jax_step_ms(module, params, schedule, plan, batch, latent, width, steps) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((batch, latent, latent, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2 * batch, 77, width)), jnp.float32)
    models, scale = Models(denoiser=module, family=STABLE_DIFFUSION), jnp.float32(7.5)
    params = {"denoiser": params}
    start = time.perf_counter()
    compiled = sample_program.lower(models, params, schedule, plan, noise, context, scale).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, schedule, noise, context, scale))
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, schedule, noise, context, scale))
    return (time.perf_counter() - start) / steps * 1e3, compile_s


def torch_step_ms(config: dict, batch: int, latent: int, width: int, steps: int, compile_: bool) -> float:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = TorchUNet(**config).to(device, dtype).eval()
    if compile_:
        unet = torch.compile(unet, mode="max-autotune" if device == "cuda" else "default", fullgraph=True)
    x = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2 * batch, 77, width, device=device, dtype=dtype)

    @torch.no_grad()
    def loop(n):
        for t in range(n):
            noise = unet(x, 999 - t, encoder_hidden_states=context).sample
            uncond, cond = noise.chunk(2)
            _ = uncond + 7.5 * (cond - uncond)
        if device == "cuda":
            torch.cuda.synchronize()

    loop(3)
    start = time.perf_counter()
    loop(steps)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--small", action="store_true", help="a toy UNet, for a CPU smoke run")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--max-batch", action="store_true", help="double the batch until it no longer fits")
    parser.add_argument("--json")
    args = parser.parse_args()

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
    plans = {"capture_off": Plan(sample=True, guided=True),
             "capture_blocks": Plan(denoiser_sites=blocks, denoiser_reductions=("mean",) * len(blocks), sample=True,
                                    guided=True)}
    figures: dict = {"device": jax.devices()[0].device_kind, "unet_parameters": int(n_params), "batch": args.batch,
                     "cfg_unet_batch": 2 * args.batch, "steps": args.steps, "unet_evaluations": evals,
                     "captured_sites": list(blocks), "jax": jax.__version__, "python": platform.python_version()}
    for name, plan in plans.items():
        ms, compile_s = jax_step_ms(module, params, schedule, plan, args.batch, latent, width, evals)
        figures[f"jaxprobe_{name}_ms_per_step"] = ms
        figures[f"jaxprobe_{name}_images_per_s"] = args.batch / (ms * evals / 1e3)
        figures[f"jaxprobe_{name}_compile_s"] = compile_s
    figures["capture_overhead"] = figures["jaxprobe_capture_blocks_ms_per_step"] / figures["jaxprobe_capture_off_ms_per_step"] - 1
    if not args.no_peer:
        import diffusers
        import torch

        torch_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        figures["torch"], figures["diffusers"] = torch.__version__, diffusers.__version__
        for compile_ in (False, True):
            key = "diffusers_compiled" if compile_ else "diffusers_eager"
            try:
                figures[f"{key}_ms_per_step"] = torch_step_ms(torch_kwargs, args.batch, latent, width, args.steps, compile_)
            except Exception as err:  # noqa: BLE001 - record why a peer could not run, keep the rest
                figures[f"{key}_error"] = repr(err)[:300]
        for key in ("diffusers_eager", "diffusers_compiled"):
            if f"{key}_ms_per_step" in figures:
                figures[f"speedup_vs_{key}"] = figures[f"{key}_ms_per_step"] / figures["jaxprobe_capture_blocks_ms_per_step"]
    if args.max_batch:
        batch, fits = args.batch, args.batch
        while batch <= 1024:
            try:
                jax_step_ms(module, params, schedule, plans["capture_blocks"], batch, latent, width, evals)
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
