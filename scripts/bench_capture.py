"""What one `pipe.capture` costs: compiles, wall time, and parameter bytes held on each device.

Uses only the public API, so the same script measures any checkout (run it with PYTHONPATH pointing
at the tree to measure). Prints one JSON object.

    python scripts/bench_capture.py --model tiny --steps 10 --prompts 4
    python scripts/bench_capture.py --model sd15-random --steps 2 --prompts 2 --batch 2
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/bench_capture.py --model tiny --steps 2
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from jax._src import dispatch, monitoring

import jaxprobe

DEFAULT_SITES = ["text_encoder.*", "unet.down_blocks.*", "unet.mid_block", "unet.up_blocks.*", "latents",
                 "pred_original_sample"]


def bytes_per_device() -> dict[str, int]:
    """Bytes of distinct device buffers held, per device (arrays that share a buffer count once)."""
    seen: set[tuple[str, int]] = set()
    held: dict[str, int] = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            key = (str(shard.device), shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                held[key[0]] = held.get(key[0], 0) + shard.data.nbytes
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timesteps", default="all", help="'all' or comma-separated step indices")
    args = parser.parse_args()

    compiles: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    pipe = jaxprobe.load(args.model)
    jax.block_until_ready(jax.tree.leaves(pipe.unet.params))
    load_s = time.perf_counter() - start
    pipe.select(DEFAULT_SITES)                                  # site tracing (abstract), outside the timings
    after_load = bytes_per_device()
    prompts = [f"a photo of a thing number {i}" for i in range(args.prompts)]
    timesteps = "all" if args.timesteps == "all" else [int(s) for s in args.timesteps.split(",")]
    calls = []
    for _ in range(2):
        before = len(compiles)
        start = time.perf_counter()
        feats = pipe.capture(prompts, DEFAULT_SITES, num_inference_steps=args.steps, timesteps=timesteps,
                             batch_size=args.batch)
        calls.append({"wall_s": round(time.perf_counter() - start, 3), "compiles": len(compiles) - before,
                      "compile_s": round(sum(compiles[before:]), 3)})
    params_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for c in pipe.components.values()
                       for a in jax.tree.leaves(c.params))
    print(json.dumps({
        "model": args.model, "steps": args.steps, "prompts": args.prompts, "batch": args.batch,
        "devices": jax.local_device_count(), "backend": jax.default_backend(), "jax": jax.__version__,
        "load_s": round(load_s, 3), "params_bytes": params_bytes,
        "device_bytes_after_load": after_load, "device_bytes_after_capture": bytes_per_device(),
        "first_call": calls[0], "second_call": calls[1],
        "returned_bytes": int(sum(v.nbytes for v in feats.values())),
    }, indent=1))


if __name__ == "__main__":
    main()
