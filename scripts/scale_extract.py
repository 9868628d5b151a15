"""How extraction time and memory grow with prompts, denoising steps and captured sites.

One factor at a time around a base point, each timed on a warm (compiled) program; writes the rows,
the fitted ms per prompt-evaluation (the cost model's extraction rate, `jaxprobe.probes.costs.Rates`), a
figure and a JSON file.

    python scripts/scale_extract.py --model sd15-random --dtype bfloat16 --batch 16 --out scale/gpu   # GPU
    python scripts/scale_extract.py --out scale/cpu                                                  # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import jax
import numpy as np

import jaxprobe
from jaxprobe.pipeline.sampling import sampling_timesteps

SITE_SETS = {"mid_block": ["unet.mid_block"],
             "blocks": ["unet.down_blocks.*", "unet.mid_block", "unet.up_blocks.*"],
             "blocks+attentions": ["unet.down_blocks.*", "unet.mid_block", "unet.up_blocks.*", "unet.**.attentions.*"]}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20 or None


def measure(pipe, n_prompts: int, steps: int, sites: str, batch: int) -> dict:
    prompts = [f"a photo of object number {i}" for i in range(n_prompts)]
    run = lambda: pipe.capture(prompts, SITE_SETS[sites], num_inference_steps=steps, batch_size=batch)  # noqa: E731
    run()  # compile
    start = time.perf_counter()
    feats = run()
    seconds = time.perf_counter() - start
    evaluations = feats["unet.mid_block"].shape[1]
    return {"prompts": n_prompts, "steps": steps, "evaluations": evaluations, "sites": sites,
            "n_sites": len(feats), "seconds": seconds, "feature_mib": sum(v.nbytes for v in feats.values()) / 2**20,
            "ms_per_prompt_evaluation": 1e3 * seconds / (n_prompts * evaluations),
            "peak_rss_mib": peak_rss_mib(), "device_peak_mib": device_peak_mib()}


def figure(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, factor, label in zip(axes, ("prompts", "steps", "n_sites"), ("prompts", "denoising steps", "sites captured")):
        chosen = sorted((r for r in rows if r["vary"] == factor), key=lambda r: r[factor])
        ax.plot([r[factor] for r in chosen], [r["seconds"] for r in chosen], "o-", label="time (s)")
        ax.set_xlabel(label), ax.set_ylabel("seconds")
        twin = ax.twinx()
        twin.plot([r[factor] for r in chosen], [r["feature_mib"] for r in chosen], "s--", color="tab:orange")
        twin.set_ylabel("features (MiB)", color="tab:orange")
    fig.suptitle("extraction: time (blue) and captured feature size (orange), one factor at a time")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--out", type=Path, default=Path("scale"))
    args = parser.parse_args()

    pipe = jaxprobe.load(args.model, dtype=args.dtype)
    base = {"n_prompts": args.prompts[0], "steps": args.steps[0], "sites": "blocks"}
    rows = []
    for vary, values in (("prompts", args.prompts), ("steps", args.steps), ("n_sites", list(SITE_SETS))):
        for value in values:
            point = {**base, {"prompts": "n_prompts", "steps": "steps", "n_sites": "sites"}[vary]: value}
            row = measure(pipe, point["n_prompts"], point["steps"], point["sites"], args.batch) | {"vary": vary}
            rows.append(row)
            print(json.dumps(row))
    blocks = [r for r in rows if r["sites"] == "blocks"]
    work = np.array([r["prompts"] * r["evaluations"] for r in blocks], float)
    seconds = np.array([r["seconds"] for r in blocks])
    slope, intercept = np.polyfit(work, seconds, 1)
    result = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "device": str(jax.local_devices()[0]),
              "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
              "unet_ms_per_prompt_evaluation": 1e3 * slope, "fixed_overhead_s": intercept,
              "timesteps_example": sampling_timesteps(pipe, args.steps[0]).tolist(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_extract.json").write_text(json.dumps(result, indent=2))
    figure(rows, args.out / "scale_extract.png")
    print(f"fitted: {1e3 * slope:.3f} ms per prompt-evaluation (+{intercept:.2f} s fixed) -> {args.out}")


if __name__ == "__main__":
    main()
