"""How probe-sweep time grows with feature sets, concepts (n), width (d) and permutations.

Synthetic features and targets (time does not depend on their values); one factor at a time around
a base point, each timed after a warm-up. Fits the cost model's probe coefficients
(`jaxprobe.probes.costs.Rates`: time per set = overhead + a x decomposition flops + b x prediction flops)
by least squares and writes rows, fit, figure and JSON.

    python scripts/scale_probes.py --out scale/gpu           # on the GPU
    python scripts/scale_probes.py --small --out scale/cpu   # a few minutes on a laptop CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from scipy.optimize import nnls

from jaxprobe.probes import probe_sweep


def flops(n: int, d: int, t: int, permutations: int, outer: int = 5, inner: int = 5) -> tuple[float, float]:
    fits, k = outer * (1 + inner), min(n, d)
    return fits * n * d * k, fits * n * k * t * (1 + permutations)


def measure(n_sets: int, n: int, d: int, t: int, permutations: int) -> dict:
    rng = np.random.default_rng(0)
    features = {"site": rng.standard_normal((n, n_sets, d)).astype(np.float32)}
    targets = rng.standard_normal((n, t))
    run = lambda: probe_sweep(features, targets, n_permutations=permutations)  # noqa: E731
    run()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    dec, pred = flops(n, d, t, permutations)
    return {"feature_sets": n_sets, "n": n, "d": d, "targets": t, "permutations": permutations,
            "seconds": seconds, "ms_per_set": 1e3 * seconds / n_sets, "decomposition_flops": dec,
            "prediction_flops": pred}


def figure(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    factors = ("feature_sets", "n", "d", "permutations")
    fig = Figure(figsize=(14, 3.4), layout="constrained")
    for ax, factor in zip(fig.subplots(1, len(factors)), factors):
        chosen = sorted((r for r in rows if r["vary"] == factor), key=lambda r: r[factor])
        ax.plot([r[factor] for r in chosen], [r["seconds"] for r in chosen], "o-")
        ax.set_xlabel(factor), ax.set_ylabel("seconds")
    fig.suptitle("probe sweep time (5x5 nested CV, 20 alphas), one factor at a time")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized grid")
    parser.add_argument("--targets", type=int, default=65)
    parser.add_argument("--out", type=Path, default=Path("scale"))
    args = parser.parse_args()
    if args.small:
        base, grid = dict(n_sets=8, n=200, d=128, permutations=0), dict(
            feature_sets=[4, 8, 16], n=[100, 200, 400], d=[64, 128, 256], permutations=[0, 10, 20])
    else:
        base, grid = dict(n_sets=64, n=535, d=768, permutations=0), dict(
            feature_sets=[32, 64, 128, 256], n=[535, 1000, 1854], d=[320, 640, 768, 1280], permutations=[0, 20, 100])
    key = {"feature_sets": "n_sets", "n": "n", "d": "d", "permutations": "permutations"}
    rows = []
    for vary, values in grid.items():
        for value in values:
            row = measure(**{**base, key[vary]: value, "t": args.targets}) | {"vary": vary}
            rows.append(row)
            print(json.dumps(row))
    design = np.array([[1.0, r["decomposition_flops"], r["prediction_flops"]] for r in rows])
    scale = design.max(axis=0)
    coef, _ = nnls(design / scale, np.array([r["ms_per_set"] for r in rows]))
    overhead, a, b = coef / scale
    fit = {"probe_ms_per_set_overhead": overhead, "probe_ns_per_decomposition_flop": a * 1e6,
           "probe_ns_per_prediction_flop": b * 1e6}
    predicted = design @ (coef / scale)
    worst = float(np.max(np.abs(predicted - [r["ms_per_set"] for r in rows]) / [r["ms_per_set"] for r in rows]))
    result = {"device": str(jax.local_devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
              "fit": fit, "worst_relative_error_of_fit": worst, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_probes.json").write_text(json.dumps(result, indent=2))
    figure(rows, args.out / "scale_probes.png")
    print(f"fit {fit}; worst relative error {worst:.0%} -> {args.out}")


if __name__ == "__main__":
    main()
