"""Benchmark: nested cross-validated ridge probes, jaxprobe vs himalaya vs scikit-learn.

The workload of the developers' brief: F feature sets of n=535 concepts x d features, the 65 Binder
attributes as targets, 20 alphas, 5 outer x 5 inner folds (alpha chosen per target by inner
K-fold, test folds predicted by the refit). All three run the same folds on the same float32
arrays in this process; per feature set times are the best of --repeats runs after a warm-up
(jaxprobe's warm-up includes compilation).

  himalaya: RidgeCV(cv=inner splits, fit_intercept=True) per outer fold; backend numpy on CPU,
            torch_cuda on GPU. Alpha per target, selected by mean squared error, like jaxprobe
            here (scoring="neg_mse").
  scikit-learn: RidgeCV(cv=inner splits) per outer fold (GridSearchCV over Ridge: one shared
            alpha, the only K-fold mode it has), always on the CPU.

BLAS threads: the peers run with OpenBLAS limited to --blas-threads (default 1). On a small
shared host, multi-threaded OpenBLAS is pathologically slow (a himalaya outer fold took 27 s with
2 threads, 0.7 s with 1), so 1 is each peer's best setting there; on a quiet host 2 can be faster
(banded: himalaya 348 s with 2, 399 s with 1), so measure both. jaxprobe runs LAPACK single-threaded
on the CPU backend (see crossval.host_lapack_single_threaded); its matmuls use XLA's threads.

  python scripts/bench_probes.py --device cpu --dims 768 1280 --json bench_probes.json
  python scripts/bench_probes.py --device gpu --feature-sets 10000 --peer-sets 0   # the sweep

--banded: the variance-partitioning pair workload of issue 16 instead. THINGS (n=1,854 concepts, the
66 SPoSE dimensions as targets), a reference space A (768) and a space B (1,280) built from the
targets like the sets above, 20 alphas x 9 kernel weights (`banded.kernel_weights(2)`), 5x5 nested
CV, selection by mean squared error. jaxprobe: `cross_validate_banded` on --feature-sets pairs at
once, then the same pairs with --banded-permutations permutations of B's rows (each a refit of the
joint model: a permuted design, so it is an extra feature set of the program, not a target column),
and with --banded-freedman-lane P the pair once with 66 x P permuted target columns (the Freedman-Lane
null's joint fit: extra targets of the same decompositions).
himalaya: MultipleKernelRidgeCV on precomputed linear kernels (its fast path for n < d; the kernels
are computed inside the timing) with the same inner splits, grid and score, per outer fold.

  python scripts/bench_probes.py --banded --feature-sets 1 --banded-permutations 1 --banded-freedman-lane 100 \
      --repeats 1 --json bench_banded.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

BINDER = Path(__file__).resolve().parents[1] / "jaxprobe/norms/data/binder2016/WordSet1_Ratings.xlsx"
SPOSE = Path(__file__).resolve().parents[1] / "jaxprobe/norms/data/things/spose_embedding_66d_sorted.txt"
ALPHAS = np.logspace(-2, 6, 20)


class SyntheticFeatures(Sequence):
    """F feature sets (n, d) built on demand from a small bank (no F x n x d array in memory):
    ratings through random projections plus noise, scaled per index so no two are equal."""

    def __init__(self, ratings: np.ndarray, n_sets: int, d: int, bank: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = len(ratings)
        self.bank = [(ratings @ rng.normal(size=(ratings.shape[1], d)) / 8
                      + rng.normal(size=(n, d)) * 2).astype(np.float32) for _ in range(bank)]
        self.n_sets = n_sets

    def __len__(self) -> int:
        return self.n_sets

    def __getitem__(self, i: int) -> np.ndarray:
        return self.bank[i % len(self.bank)] * np.float32(1 + 0.01 * (i // len(self.bank)))


def binder_targets() -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sheet = pd.read_excel(BINDER)
    ratings = sheet.iloc[:, 5:70].replace("na", np.nan).astype(float)
    return ratings.fillna(ratings.mean()).to_numpy(np.float32)  # the peers take no missing values


def outer_splits(plan) -> list[tuple[np.ndarray, np.ndarray, list]]:
    """(train rows, test rows, inner (train, val) position pairs) of every outer fold."""
    folds = []
    for k in range(plan.n_outer):
        train = plan.train[k][plan.train_mask[k]]
        inner = [(np.setdiff1d(np.arange(len(train)), v[m]), v[m]) for v, m in zip(plan.val[k], plan.val_mask[k])]
        folds.append((train, plan.test[k][plan.test_mask[k]], inner))
    return folds


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_jaxprobe(X, Y, plan, repeats: int) -> tuple[float, np.ndarray]:
    from jaxprobe.probes import cross_validate_ridge

    def run():
        return cross_validate_ridge(X, Y, plan, ALPHAS, standardize=False, scoring="neg_mse",
                                    return_predictions=False)

    warm = run()  # compiles
    return best_of(repeats, run) / len(X), warm.alphas


def bench_himalaya(X, Y, folds, backend: str, repeats: int) -> tuple[float, np.ndarray]:
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV

    set_backend(backend, on_error="raise")
    chosen = np.zeros((len(X), len(folds), Y.shape[1]))

    def run():
        for f in range(len(X)):
            for k, (train, test, inner) in enumerate(folds):
                model = RidgeCV(ALPHAS, cv=inner, fit_intercept=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # n < d: "kernel ridge would be faster"
                    model.fit(X[f][train], Y[train])
                model.predict(X[f][test])
                chosen[f, k] = np.asarray(model.best_alphas_.cpu() if hasattr(model.best_alphas_, "cpu")
                                          else model.best_alphas_)

    run()  # warm-up (CUDA context, kernels)
    return best_of(repeats, run) / len(X), chosen


def bench_sklearn(X, Y, folds, repeats: int) -> float:
    from sklearn.linear_model import RidgeCV

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LinAlgWarning: ill-conditioned kernels at small alphas
            for f in range(len(X)):
                for train, test, inner in folds:
                    RidgeCV(ALPHAS, cv=inner).fit(X[f][train], Y[train]).predict(X[f][test])

    return best_of(repeats, run) / len(X)


def bench_banded(args) -> None:
    import himalaya
    import jax
    import sklearn
    from threadpoolctl import threadpool_limits

    from jaxprobe.probes import cross_validate_banded, kernel_weights, nested_plan
    from jaxprobe.probes.partition import JointDesigns

    Y = np.loadtxt(SPOSE, dtype=np.float32)                      # (1854, 66)
    n = len(Y)
    A, B = SyntheticFeatures(Y, args.feature_sets, 768, seed=1), SyntheticFeatures(Y, args.feature_sets, 1280, seed=2)
    pairs = [(A[i], B[i]) for i in range(args.feature_sets)]
    plan = nested_plan(n, outer=5, inner=5, seed=0)
    gammas = kernel_weights(2)
    perms = np.array([np.random.default_rng(p).permutation(n) for p in range(args.banded_permutations)], int).reshape(-1, n)

    def ours(designs):
        return cross_validate_banded(designs, Y, plan, (768, 1280), ALPHAS, gammas, standardize=False,
                                     scoring="neg_mse", return_predictions=False)

    start = time.perf_counter()
    chosen = ours(JointDesigns(pairs[:1])).alphas[0]             # compiles; (k, t, 2) per-space penalties
    compile_s = time.perf_counter() - start
    base_s = best_of(args.repeats, lambda: ours(JointDesigns(pairs))) / len(pairs)
    perm_s = float("nan")
    if args.banded_permutations:  # pairs x permutations designs; with one of each nothing compiles again
        perm_s = best_of(1, lambda: ours(JointDesigns(pairs, perms))) / (len(pairs) * len(perms))
    lane_s = float("nan")
    if args.banded_freedman_lane:  # the timing does not depend on the columns' values: rows of Y permuted
        rng = np.random.default_rng(0)
        y_null = np.hstack([Y[rng.permutation(n)] for _ in range(args.banded_freedman_lane)])
        start = time.perf_counter()
        cross_validate_banded(JointDesigns(pairs[:1]), y_null, plan, (768, 1280), ALPHAS, gammas, standardize=False,
                              scoring="neg_mse", return_predictions=False)
        lane_s = time.perf_counter() - start                    # compilation included: a new target count
    row = {"n": n, "d_a": 768, "d_b": 1280, "targets": Y.shape[1], "alphas": len(ALPHAS), "gammas": len(gammas),
           "pairs": len(pairs), "jaxprobe_first_call_s": compile_s, "jaxprobe_s_per_pair": base_s,
           "jaxprobe_s_per_permutation": perm_s, "permutation_over_base": perm_s / base_s,
           "projected_100_permutations_over_base": 100 * perm_s / base_s,
           "freedman_lane_permutations": args.banded_freedman_lane, "jaxprobe_freedman_lane_s": lane_s,
           "freedman_lane_over_base": lane_s / base_s}
    print(json.dumps(row), flush=True)
    if args.peer_sets:
        with threadpool_limits(limits=args.blas_threads, user_api="blas"):
            him_s, him_penalties = bench_himalaya_banded(pairs[0], Y, outer_splits(plan), gammas, args.repeats)
        row.update(himalaya_s_per_pair=him_s, himalaya_ratio=him_s / base_s,
                   same_choice=float(np.isclose(him_penalties, chosen, rtol=1e-4).all(-1).mean()))
    meta = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "himalaya": himalaya.__version__,
            "sklearn": sklearn.__version__, "folds": "5x5", "peer_blas_threads": args.blas_threads,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}  # Linux: KiB
    print(json.dumps(row))
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": [row]}, indent=1))


def bench_himalaya_banded(pair, Y, folds, gammas, repeats: int) -> tuple[float, np.ndarray]:
    """himalaya's multiple-kernel ridge per outer fold; returns s per pair and the per-space
    penalties alpha / gamma_j it chose (k, t, 2), comparable with jaxprobe's."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import MultipleKernelRidgeCV

    set_backend("numpy", on_error="raise")
    a, b = pair
    chosen = np.zeros((len(folds), Y.shape[1], 2))

    def run():
        for k, (train, test, inner) in enumerate(folds):
            ks = np.stack([a[train] @ a[train].T, b[train] @ b[train].T])
            ks_test = np.stack([a[test] @ a[train].T, b[test] @ b[train].T])
            model = MultipleKernelRidgeCV(kernels="precomputed", fit_intercept=True, cv=inner,
                                          solver_params={"n_iter": gammas, "alphas": ALPHAS, "progress_bar": False})
            model.fit(ks, Y[train])
            model.predict(ks_test)
            chosen[k] = np.exp(-np.asarray(model.deltas_)).T

    return best_of(repeats, run), chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1280])
    parser.add_argument("--feature-sets", type=int, default=8, help="F for jaxprobe")
    parser.add_argument("--peer-sets", type=int, default=1, help="F for himalaya and scikit-learn (0: skip)")
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS threads for the peers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--banded", action="store_true", help="the banded-ridge pair workload (module docstring)")
    parser.add_argument("--banded-permutations", type=int, default=1,
                        help="B-row permutations timed per pair (their cost is linear in the count)")
    parser.add_argument("--banded-freedman-lane", type=int, default=0,
                        help="Freedman-Lane permutations timed once, as 66 x P extra target columns (0: skip)")
    args = parser.parse_args()

    import jax
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
    if args.banded:
        bench_banded(args)
        return
    import himalaya
    import sklearn
    from threadpoolctl import threadpool_limits

    from jaxprobe.probes import nested_plan

    Y = binder_targets()
    n = len(Y)
    plan = nested_plan(n, outer=5, inner=5, seed=0)
    folds = outer_splits(plan)
    rows = []
    for d in args.dims:
        X = SyntheticFeatures(Y, args.feature_sets, d)
        ours_s, ours_alphas = bench_jaxprobe(X, Y, plan, args.repeats)
        row = {"d": d, "jaxprobe_ms": 1e3 * ours_s, "feature_sets": args.feature_sets}
        if args.peer_sets:
            peers = [X[i] for i in range(min(args.peer_sets, args.feature_sets))]
            backend = "torch_cuda" if args.device == "gpu" else "numpy"
            with threadpool_limits(limits=args.blas_threads, user_api="blas"):
                him_s, him_alphas = bench_himalaya(peers, Y, folds, backend, args.repeats)
                row.update(himalaya_backend=backend, himalaya_ms=1e3 * him_s, himalaya_ratio=him_s / ours_s,
                           same_alpha=float(np.isclose(him_alphas, ours_alphas[:len(peers)], rtol=1e-4).mean()))
                if not args.no_sklearn:
                    sk_s = bench_sklearn(peers, Y, folds, args.repeats)
                    row.update(sklearn_ms=1e3 * sk_s, sklearn_ratio=sk_s / ours_s)
        rows.append(row)
        print(json.dumps(row))

    meta = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "himalaya": himalaya.__version__, "sklearn": sklearn.__version__, "n": n,
            "targets": Y.shape[1], "alphas": len(ALPHAS), "folds": "5x5",
            "peer_blas_threads": args.blas_threads}
    print(json.dumps(meta))
    print("\n| d | jaxprobe ms/set | himalaya ms/set | x | scikit-learn ms/set | x | same alpha |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['d']} | {r['jaxprobe_ms']:.1f} | {r.get('himalaya_ms', float('nan')):.0f} | "
              f"{r.get('himalaya_ratio', float('nan')):.1f} | {r.get('sklearn_ms', float('nan')):.0f} | "
              f"{r.get('sklearn_ratio', float('nan')):.1f} | {r.get('same_alpha', float('nan')):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
