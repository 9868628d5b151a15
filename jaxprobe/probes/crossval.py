"""Nested cross-validation of many feature sets at once: batching, sharding, missing targets, nulls.

`cross_validate` runs a fold solver (closed-form ridge, `ridge.RidgeSolver`, or an optax probe,
`linear.ProbeConfig`) on stacked feature sets X (F, n, d) against targets Y (n, t) under a FoldPlan,
and returns out-of-fold predictions, the model chosen in every outer fold and per-target scores,
with permutation p-values and bootstrap intervals on request. `cross_validate_ridge` is its ridge
face and the engine under `probe_sweep`.

One compiled program handles a chunk of feature sets: vmapped over feature sets and outer folds,
the chunk's feature-set axis sharded over every visible device; chunks are sized from free memory.
Permutation nulls are extra target columns (the whole pipeline, model selection included, reruns on
each shuffle); bootstrap samples are row weights of the scores. Missing targets (NaN) are masked per
target, never dropped globally: targets are grouped by their pattern of missing rows and each
pattern runs the same program with those rows masked out of every training, validation and test
set — exact, at one extra decomposition per distinct pattern.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprobe.errors import InputError
from jaxprobe.probes import stats
from jaxprobe.probes.folds import FoldPlan
from jaxprobe.probes.metrics import METRICS, Metric
from jaxprobe.probes.ridge import RidgeSolver, Scoring
from jaxprobe.runtime.progress import Bar

DEFAULT_ALPHAS = np.logspace(-2, 6, 20)

FoldSolver = Callable  # (x, y, train, train_mask, test, val, val_mask, select_groups) -> OuterFold


@dataclasses.dataclass(frozen=True)
class CVResult:
    """Nested cross-validation of F feature sets against t targets over k outer folds.

    predictions: (F, n, t) out-of-fold predictions (each row predicted by the model of the outer
        fold that tested it), NaN where the target is missing; None unless asked for.
    alphas: (F, k, t) penalty chosen by inner cross-validation in each outer fold (ridge), or the
        fixed L2 penalty (optax probes).
    score: (F, t) the chosen metric of the out-of-fold predictions over all observed rows.
    metrics: further metrics of the same predictions, name -> (F, t) (ridge: "r2", and
        "pairwise_acc" on request).
    null: (F, n_permutations, t) the metric with shuffled targets, or None; p: (F, t) one-sided
        permutation p-values (NaN without permutations).
    ci_low, ci_high: (F, t) percentile bootstrap interval of the metric over concepts resampled
        with replacement (predictions fixed); NaN without bootstrap.
    """

    predictions: np.ndarray | None
    alphas: np.ndarray
    score: np.ndarray
    metrics: dict[str, np.ndarray]
    null: np.ndarray | None
    p: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def cross_validate_ridge(
    X: np.ndarray | Sequence[np.ndarray], Y: np.ndarray, plan: FoldPlan,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS, *, standardize: bool = True,
    scoring: Scoring | None = None, metric: Metric = "pearson", pairwise_acc: bool = False,
    **options,
) -> CVResult:
    """Nested cross-validated ridge of every feature set X[f] (n, d) against Y (n, t).

    Per outer fold: features centred (and with `standardize` scaled to unit variance) on the
    training rows; alpha chosen per target (or shared, alpha_per_target=False) by the plan's inner
    folds, scored with `scoring` ("r2": mean over folds of R², the default for K-fold; "neg_mse":
    minus the mean squared error, the default for leave-one-out); the test rows predicted by the
    refit on all training rows. `score` is `metric` of the out-of-fold predictions; `metrics`
    holds "r2" (and "pairwise_acc" if asked). Other options: see `cross_validate`.
    """
    solver = RidgeSolver(tuple(float(a) for a in np.ravel(alphas)), standardize=standardize,
                         scoring=scoring or ("neg_mse" if plan.leave_one_out else "r2"))
    extra = ("r2",) + (("pairwise_acc",) if pairwise_acc and metric != "pairwise_acc" else ())
    return cross_validate(X, Y, plan, solver, metric=metric, extra_metrics=extra, **options)


def cross_validate(
    X: np.ndarray | Sequence[np.ndarray], Y: np.ndarray, plan: FoldPlan, solver: FoldSolver, *,
    metric: str = "pearson", extra_metrics: tuple[str, ...] = (), alpha_per_target: bool = True,
    n_permutations: int = 0, n_bootstrap: int = 0, ci: float = 0.95, seed: int = 0,
    return_predictions: bool = True, dtype: np.dtype | type = np.float32,
    batch_size: int | None = None,
    progress: Bar | None = None,
) -> CVResult:
    """Run `solver` on every outer fold of `plan` for every feature set.

    X: (F, n, d) array or a sequence of F (n, d) arrays (stacked chunk by chunk, never whole).
    Y: (n, t), NaN = missing. alpha_per_target=False shares one choice among all targets (and
    among each permutation's shuffled copies). seed draws the permutations and bootstrap samples.
    dtype: float32, or float64 (computed with JAX's 64-bit mode on for the call).
    batch_size: feature sets per compiled call (default: what fits in half the free memory, and at most an
        eighth of the sets, so a progress bar moves).
    progress: a `jaxprobe.runtime.progress.Bar` advanced by the feature sets of each finished call.
    """
    Y = np.asarray(Y, float)
    if Y.ndim != 2:
        raise InputError(f"targets must be (n, t), got shape {Y.shape}")
    n, t = Y.shape
    n_sets = len(X)
    if n_sets == 0:
        raise InputError("no feature sets to probe")
    d = np.shape(X[0])[-1]
    if np.shape(X[0]) != (n, d):
        raise InputError(f"feature sets must be (n={n}, d), got {np.shape(X[0])}: one row per target row")
    for name in (metric, *extra_metrics):
        if name not in METRICS:
            raise InputError(f"unknown metric {name!r}: use one of {sorted(METRICS)}")
    rng = np.random.default_rng(seed)
    patterns = [_pattern_inputs(Y, cols, plan, rng, n_permutations, n_bootstrap, alpha_per_target)
                for cols in _missing_patterns(Y)]

    devices = jax.local_devices()  # other processes take other feature sets (jaxprobe.runtime.distributed)
    with jax.enable_x64(np.dtype(dtype) == np.float64), host_lapack_single_threaded():
        if batch_size is None:
            widest = max(p.y.shape[1] for p in patterns)
            batch_size = _fitting_batch(solver, n, d, plan, widest, np.dtype(dtype).itemsize,
                                        "pairwise_acc" in (metric, *extra_metrics), devices)
            batch_size = min(batch_size, -(-n_sets // 8))
        batch_size = -(-min(batch_size, n_sets) // len(devices)) * len(devices)
        mesh = Mesh(np.array(devices), ("fs",))
        program = functools.partial(_chunk_program, solver=solver, metric=metric,
                                    extra_metrics=extra_metrics,
                                    return_predictions=return_predictions, mesh=mesh)
        parts = _run_chunks(X, patterns, program, batch_size, np.dtype(dtype), mesh, progress or Bar())
    return _assemble(parts, patterns, n_sets, n, t, plan.n_outer, solver.choices, ci)


@contextlib.contextmanager
def host_lapack_single_threaded() -> Iterator[None]:
    """On the CPU backend, run OpenBLAS single-threaded for the duration of the block.

    jaxlib's CPU LAPACK kernels (scipy's OpenBLAS) already spread a batch of matrices over XLA's
    threads; OpenBLAS's own threads inside each call then oversubscribe the cores, and on a busy
    2-core host eigh(428) went from 19 ms to 2.6 s. The limit is lifted on exit. Without
    threadpoolctl (a scikit-learn dependency) set OPENBLAS_NUM_THREADS=1 instead.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    if jax.default_backend() != "cpu":
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclasses.dataclass(frozen=True)
class _Pattern:
    """Targets sharing one pattern of missing rows, with their resampling plans."""

    cols: np.ndarray           # (t_p,) target columns
    plan: FoldPlan             # the plan with missing rows masked out
    y: np.ndarray              # (n, t_p * (1 + n_permutations)) real targets, then shuffled copies
    weights: np.ndarray        # (n,) 1 on rows scored (observed and tested)
    boot: np.ndarray           # (n_bootstrap, n) resampling counts
    select_groups: np.ndarray  # (t_aug,) targets with one id share their model choice


def _missing_patterns(Y: np.ndarray) -> list[np.ndarray]:
    _, which = np.unique(np.isnan(Y).T, axis=0, return_inverse=True)
    which = which.ravel()
    return [np.flatnonzero(which == k) for k in range(which.max() + 1)]


def _pattern_inputs(Y, cols, plan, rng, n_permutations, n_bootstrap, alpha_per_target) -> _Pattern:
    rows = ~np.isnan(Y[:, cols[0]])
    plan = plan.restrict(rows)
    tested = np.zeros(len(Y), bool)
    tested[plan.test[plan.test_mask]] = True
    if not plan.train_mask.any(1).all() or not tested.any():
        raise InputError(f"targets {cols.tolist()} have too few observed rows for the fold plan")
    y = np.nan_to_num(Y[:, cols])
    perms = stats.permutations(rng, n_permutations, rows)
    y_aug = np.concatenate([y] + [y[p] for p in perms], axis=1)
    width = y_aug.shape[1]
    groups = np.arange(width) if alpha_per_target else np.repeat(np.arange(1 + n_permutations), len(cols))
    return _Pattern(cols, plan, y_aug, tested.astype(float),
                    stats.bootstrap_weights(rng, n_bootstrap, tested), groups)


def _run_chunks(X, patterns, program, batch_size, dtype, mesh, bar: Bar) -> list[list[dict]]:
    """Per chunk, per pattern: the program's outputs as numpy, one chunk in flight ahead."""
    sharded = NamedSharding(mesh, PartitionSpec("fs"))
    parts, pending = [], None
    for start in range(0, len(X), batch_size):
        chunk = np.stack([np.asarray(X[i], dtype) for i in range(start, min(start + batch_size, len(X)))])
        n_real = len(chunk)
        chunk = np.pad(chunk, ((0, batch_size - n_real), (0, 0), (0, 0)))  # one compiled shape
        x = jax.device_put(chunk, sharded)
        launched = [program(x, p.y.astype(dtype), p.plan, p.select_groups, p.weights.astype(dtype),
                            p.boot.astype(dtype), n_targets=len(p.cols))
                    for p in patterns]
        if pending is not None:
            parts.append(jax.device_get(pending[0]))
            bar.advance(pending[1])
        pending = (launched, n_real)
    parts.append(jax.device_get(pending[0]))
    bar.advance(pending[1])
    return parts


@functools.partial(jax.jit, static_argnames=("n_targets", "solver", "metric", "extra_metrics",
                                             "return_predictions", "mesh"))
def _chunk_program(
    x: jax.Array, y: jax.Array, plan: FoldPlan, select_groups: jax.Array, weights: jax.Array,
    boot: jax.Array, *, n_targets: int, solver: FoldSolver, metric: str,
    extra_metrics: tuple[str, ...], return_predictions: bool, mesh: Mesh,
) -> dict[str, jax.Array]:
    """x (c, n, d) sharded over the mesh; every device runs its own feature sets, no collectives
    (a partitioner left to shard LAPACK custom calls would gather them instead)."""
    local = functools.partial(_local_chunk, n_targets=n_targets, solver=solver, metric=metric,
                              extra_metrics=extra_metrics, return_predictions=return_predictions)
    every, split = PartitionSpec(), PartitionSpec("fs")
    # check_vma=False: devices never communicate here, so there is no replication to track (and
    # the optax probes' while_loop carries start replicated, then vary per device).
    return jax.shard_map(local, mesh=mesh, in_specs=(split, every, every, every, every, every),
                         out_specs=split, check_vma=False)(x, y, plan, select_groups, weights, boot)


def _local_chunk(
    x: jax.Array, y: jax.Array, plan: FoldPlan, select_groups: jax.Array, weights: jax.Array,
    boot: jax.Array, *, n_targets: int, solver: FoldSolver, metric: str,
    extra_metrics: tuple[str, ...], return_predictions: bool,
) -> dict[str, jax.Array]:
    """x (c, n, d); y (n, t_aug): the n_targets real targets, then their shuffled copies."""
    n = y.shape[0]
    folds = jax.vmap(solver, in_axes=(None, None, 0, 0, 0, 0, 0, None))

    def one_set(xf):  # (n, d) -> out-of-fold predictions (n, t_aug), choices (k, t_aug)
        out = folds(xf, y, plan.train, plan.train_mask, plan.test, plan.val, plan.val_mask,
                    select_groups)
        rows = jnp.where(plan.test_mask, plan.test, n).reshape(-1)   # padded slots dropped
        oof = jnp.zeros_like(y).at[rows].set(out.predictions.reshape(rows.size, -1), mode="drop")
        return oof, out.choice

    oof, choice = jax.vmap(one_set)(x)
    score_fn = METRICS[metric]
    scores = jax.vmap(score_fn, in_axes=(None, 0, None))(y, oof, weights)    # (c, t_aug)
    real_y, real_oof = y[:, :n_targets], oof[:, :, :n_targets]
    out = {
        "score": scores[:, :n_targets],
        "null": scores[:, n_targets:].reshape(len(x), y.shape[1] // n_targets - 1, n_targets),
        "choice": choice[:, :, :n_targets],
        "boot": jax.vmap(lambda p: jax.vmap(lambda w: score_fn(real_y, p, w))(boot * weights))(real_oof),
    }
    for name in extra_metrics:
        out[name] = jax.vmap(METRICS[name], in_axes=(None, 0, None))(real_y, real_oof, weights)
    if return_predictions:
        out["predictions"] = real_oof
    return out


def _assemble(parts, patterns, n_sets, n, t, k, choices, level) -> CVResult:
    """Per-chunk, per-pattern outputs -> (n_sets, ...) arrays with targets in their own columns."""
    def gather(key, shape):
        full = np.full((n_sets, *shape), np.nan)
        for p, pattern in enumerate(patterns):
            full[..., pattern.cols] = np.concatenate([chunk[p][key] for chunk in parts])[:n_sets]
        return full

    first = parts[0][0]
    score = gather("score", (t,))
    n_permutations, n_bootstrap = first["null"].shape[1], first["boot"].shape[1]
    null, p = None, np.full((n_sets, t), np.nan)
    if n_permutations:
        null = gather("null", (n_permutations, t))
        p = stats.permutation_pvalues(score, null, axis=1)
    ci_low, ci_high = np.full((n_sets, t), np.nan), np.full((n_sets, t), np.nan)
    if n_bootstrap:
        ci_low, ci_high = stats.percentile_interval(gather("boot", (n_bootstrap, t)), level, axis=1)
    predictions = None
    if "predictions" in first:
        predictions = gather("predictions", (n, t))
        for pattern in patterns:  # rows a target misses get no prediction
            unscored = np.flatnonzero(pattern.weights == 0)
            predictions[np.ix_(np.arange(n_sets), unscored, pattern.cols)] = np.nan
    reserved = {"score", "null", "choice", "boot", "predictions"}
    return CVResult(
        predictions=predictions, alphas=choices[gather("choice", (k, t)).astype(int)], score=score,
        metrics={key: gather(key, (t,)) for key in first if key not in reserved},
        null=null, p=p, ci_low=ci_low, ci_high=ci_high)


def _fitting_batch(solver, n, d, plan, n_targets, itemsize, pairwise, devices) -> int:
    """Feature sets per call that fit in half of the free memory of every device."""
    plan_shape = (*plan.train.shape, *plan.val.shape[1:])
    per_set = solver.elements_per_set(n, d, plan_shape, n_targets) + n * d + 2 * n * n_targets
    per_set = 2 * itemsize * (per_set + (2 * n * n if pairwise else 0))  # 2x: XLA temporaries
    device_stats = devices[0].memory_stats() or {}
    if "bytes_limit" in device_stats:
        free = device_stats["bytes_limit"] - device_stats.get("bytes_in_use", 0)
    else:  # host memory, shared with other processes
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return max(1, int(free // 2 // per_set)) * len(devices)
