"""`variance_partition`: what a feature space B explains of each target beyond a reference space A.

For every pair (A, B) — e.g. CLIP's final text layer with every UNet site x step — three nested
cross-validated models on the same folds give held-out R²: A alone and B alone (single-space ridge,
`crossval.cross_validate_ridge`) and A+B (banded ridge, one penalty per space, `banded`). Then

    unique_a = r2_joint - r2_b     unique_b = r2_joint - r2_a     shared = r2_a + r2_b - r2_joint

(the usual set-theoretic partition; with finite data and regularisation the pieces are estimates and
can be slightly negative). Unique variance is relative to the other space of the pair: unique_b
against CLIP's last layer is not unique_b against another text layer.

Table columns, one row per (pair, target):
  pair             "<A feature set> + <B feature set>"
  feature_set_a    A's feature set; feature_set, site, step: B's (as in `probe_sweep`; step -1
                   without a step axis)
  target, group    the target name and its group (`target_groups`; missing when not given)
  r2_a, r2_b, r2_joint, unique_a, unique_b, shared   as above, out-of-fold over all observed rows
  <each of r2_joint, unique_a, unique_b, shared>_low/_high   percentile bootstrap interval over
                   concepts resampled with replacement, the same resamples for the three models
                   (NaN without n_bootstrap)
  p, q             one-sided permutation p-value of unique_b (below); q: Benjamini–Hochberg over
                   every row (NaN without permutations)
  null_mean, null_high   mean and 95th percentile of unique_b under that null (with permutations)

Two nulls for "B adds nothing beyond A", model selection rerun on every permutation:
  permute_b (default)  B's rows are permuted jointly across its columns, A and the targets stay
                   paired, and the joint model is refitted. Exact, but a permuted B is a new design,
                   not a new target column, so each permutation costs one joint fit per pair (the
                   permuted designs are extra feature sets of the same batched program).
  freedman_lane    the targets are replaced by A's out-of-fold fit plus its residuals permuted among
                   the observed rows (Freedman & Lane 1983), and A alone and A+B are refitted on them.
                   The permuted targets are extra target columns of the same decompositions, so 100
                   permutations cost the target-dependent part of the fits, not 100 fits (9.4x one
                   joint fit for a THINGS pair, BENCHMARKS.md). Approximate:
                   it treats A's fit as the truth under the null. With ridge and model selection it
                   is conservative: against noise spaces B its p-values pile up in the middle instead
                   of being uniform (false positives stay below the nominal rate, power drops;
                   tests/test_probes_banded.py), so prefer permute_b where its cost is affordable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from jaxprobe.captures import FeatureSet, feature_sets
from jaxprobe.errors import InputError
from jaxprobe.probes import stats
from jaxprobe.probes.banded import DEFAULT_RATIOS, cross_validate_banded
from jaxprobe.probes.crossval import DEFAULT_ALPHAS, cross_validate_ridge
from jaxprobe.probes.folds import nested_plan
from jaxprobe.probes.sweep import _align_to_concepts, _targets
from jaxprobe.runtime.progress import progress as progress_bar

INTERVALS = ("r2_joint", "unique_a", "unique_b", "shared")
NULLS = ("permute_b", "freedman_lane")


class JointDesigns(Sequence):
    """Joint designs [A | B] (n, d_a + d_b) of some pairs, built one at a time (never all stacked);
    with `perms` (P, n), one design per (pair, permutation) with B's rows in that order."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], perms: np.ndarray | None = None):
        self.pairs, self.perms = list(pairs), perms

    def __len__(self) -> int:
        return len(self.pairs) * (1 if self.perms is None else len(self.perms))

    def __getitem__(self, i: int) -> np.ndarray:
        if self.perms is None:
            a, b = self.pairs[i]
            return np.hstack([a, b])
        a, b = self.pairs[i // len(self.perms)]
        return np.hstack([a, np.asarray(b)[self.perms[i % len(self.perms)]]])


def variance_partition(
    features_a: Mapping[str, np.ndarray] | np.ndarray,
    features_b: Mapping[str, np.ndarray] | np.ndarray,
    targets: pd.DataFrame | np.ndarray,
    *,
    concepts: Sequence[str] | None = None,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    ratios: Sequence[float] | np.ndarray = DEFAULT_RATIOS,
    gammas: np.ndarray | None = None,
    outer_cv: int = 5,
    inner_cv: int | str = 5,
    groups: Sequence | np.ndarray | None = None,
    target_groups: Mapping[str, str] | None = None,
    n_permutations: int = 0,
    null: str = "permute_b",
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    standardize: bool = True,
    dtype: np.dtype | type = np.float32,
    batch_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Unique and shared held-out R² of every (A, B) pair of feature sets, per target (module docstring).

    features_a, features_b: an (n, d) array (one feature set, named "a" / "b"), a `Captures`, or a
        site -> (n, d) / (n, n_steps, d) mapping; every A set is paired with every B set.
    targets, concepts, groups, target_groups, outer_cv, inner_cv, seed, standardize, dtype,
        batch_size: as in `probe_sweep` (targets are aligned to the feature rows by concept with
        `align_by_concept` when `concepts` is given; alphas are chosen per target).
    alphas: overall ridge penalties, shared by the three models; ratios / gammas: the joint model's
        candidate weights of B relative to A (`banded.kernel_weights`), or the (G, 2) weights.
    n_permutations, null: permutations for the p-value of unique_b. null "permute_b": B's rows
        permuted (each permutation one more joint fit per pair); "freedman_lane": A's residuals
        permuted (the permuted targets are extra target columns of the same fits; module docstring).
    n_bootstrap: concept resamples for the intervals, at level `ci`. progress: a bar (or periodic lines)
    over the fitted designs: the single spaces, then every pair once per ordering of B's rows.
    """
    if null not in NULLS:
        raise InputError(f"null must be one of {NULLS}, got {null!r}")
    a_sets, b_sets = _sets(features_a, "a"), _sets(features_b, "b")
    n = len(a_sets[0].array)
    if any(len(s.array) != n for s in a_sets + b_sets):
        raise InputError(f"features_a and features_b must have one row per concept each, got row counts "
                         f"{sorted({len(s.array) for s in a_sets + b_sets})}")
    if concepts is not None:
        targets, groups = _align_to_concepts(targets, groups, concepts, n)
    target_names, Y = _targets(targets)
    if len(Y) != n:
        raise InputError(f"{len(Y)} targets rows for {n} feature rows: give one targets row per feature row, "
                         "or pass concepts= to match them by name")
    plan = nested_plan(n, outer_cv, inner_cv, groups=groups, seed=seed)
    pairs = [(i, j) for i in range(len(a_sets)) for j in range(len(b_sets))]
    designs = len(a_sets) + len(b_sets) + len(pairs) * (1 + (n_permutations if null == "permute_b" else 0))
    if n_permutations and null == "freedman_lane":
        designs += len(a_sets) + len(pairs)
    with progress_bar("variance partition (designs)", designs, progress) as bar:
        return _variance_partition(a_sets, b_sets, pairs, Y, target_names, plan, bar, alphas=alphas, ratios=ratios,
                                   gammas=gammas, target_groups=target_groups, n_permutations=n_permutations,
                                   null=null, n_bootstrap=n_bootstrap, ci=ci, seed=seed, standardize=standardize,
                                   dtype=dtype, batch_size=batch_size)


def _variance_partition(a_sets, b_sets, pairs, Y, target_names, plan, bar, *, alphas, ratios, gammas, target_groups,
                        n_permutations, null, n_bootstrap, ci, seed, standardize, dtype, batch_size) -> pd.DataFrame:
    n = len(Y)
    common = {"alphas": alphas, "standardize": standardize, "metric": "r2", "dtype": dtype, "batch_size": batch_size,
              "progress": bar}
    banded = {"ratios": ratios, "gammas": gammas}
    r2_a, pred_a = _single(a_sets, Y, plan, common)                       # (F_a, t), (F_a, n, t)
    r2_b, pred_b = _single(b_sets, Y, plan, common)
    rng = np.random.default_rng(seed)
    boot = stats.bootstrap_weights(rng, n_bootstrap, np.ones(n, bool))   # first: the same for either null

    t = Y.shape[1]
    r2_joint, pred_joint = _joint(a_sets, b_sets, pairs, Y, plan, common, banded, predictions=True)
    null_unique = None
    if n_permutations and null == "permute_b":
        perms = stats.permutations(rng, n_permutations, np.ones(n, bool))
        null_joint, _ = _joint(a_sets, b_sets, pairs, Y, plan, common, banded, perms=perms)
        null_unique = null_joint - r2_a[[i for i, _ in pairs]][:, None, :]   # (pairs, P, t)
    elif n_permutations:  # freedman_lane: the null's targets depend on A's fit, one set per A
        null_unique = np.empty((len(pairs), n_permutations, t))
        for i in range(len(a_sets)):
            y_null = _residual_permutations(rng, Y, pred_a[i], n_permutations)         # (n, P * t)
            null_a, _ = _single([a_sets[i]], y_null, plan, common, predictions=False)
            mine = [p for p, (a, _) in enumerate(pairs) if a == i]
            null_joint, _ = _joint(a_sets, b_sets, [pairs[p] for p in mine], y_null, plan, common, banded)
            null_unique[mine] = (null_joint - null_a).reshape(len(mine), n_permutations, t)

    ia, ib = np.array([i for i, _ in pairs]), np.array([j for _, j in pairs])
    parts = _partition(r2_a[ia], r2_b[ib], r2_joint)
    groups_of = np.array([None if target_groups is None else target_groups.get(name) for name in target_names],
                         object)
    table = pd.DataFrame({
        "pair": np.repeat([f"{a_sets[i].name} + {b_sets[j].name}" for i, j in pairs], t),
        "feature_set_a": np.repeat([a_sets[i].name for i in ia], t),
        "feature_set": np.repeat([b_sets[j].name for j in ib], t),
        "site": np.repeat([b_sets[j].site for j in ib], t),
        "step": np.repeat([b_sets[j].step for j in ib], t),
        "target": np.tile(target_names, len(pairs)),
        "group": np.tile(groups_of, len(pairs)),
        **{name: value.ravel() for name, value in parts.items()},
    })
    low, high = _intervals(Y, pred_a[ia], pred_b[ib], pred_joint, boot, ci)
    for name in INTERVALS:
        table[f"{name}_low"], table[f"{name}_high"] = low[name].ravel(), high[name].ravel()
    p = np.full((len(pairs), t), np.nan)
    if null_unique is not None:
        p = stats.permutation_pvalues(parts["unique_b"], null_unique, axis=1)
    table["p"] = p.ravel()
    table["q"] = stats.fdr_bh(table["p"].to_numpy())
    if null_unique is not None:
        table["null_mean"] = null_unique.mean(1).ravel()
        table["null_high"] = np.percentile(null_unique, 95, axis=1).ravel()
    return table


def _sets(features, name: str) -> list[FeatureSet]:
    if isinstance(features, np.ndarray) and features.ndim == 2:
        features = {name: features}
    return feature_sets(features)


def _single(sets: list[FeatureSet], Y: np.ndarray, plan, common: dict, *,
            predictions: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold R² (F, t) and predictions (F, n, t) of single-space ridge, one program per width."""
    r2 = np.empty((len(sets), Y.shape[1]))
    kept = np.empty((len(sets), *Y.shape)) if predictions else None
    for d in sorted({s.array.shape[1] for s in sets}):
        index = [i for i, s in enumerate(sets) if s.array.shape[1] == d]
        res = cross_validate_ridge([sets[i].array for i in index], Y, plan, return_predictions=predictions,
                                   **common)
        r2[index] = res.score
        if predictions:
            kept[index] = res.predictions
    return r2, kept


def _joint(a_sets, b_sets, pairs, Y, plan, common: dict, banded: dict, *, perms: np.ndarray | None = None,
           predictions: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold R² of the joint model of every pair (i, j): (pairs, t), or (pairs, P, t) with B's rows
    in each order of perms (P, n); predictions (pairs, n, t) on request. One program per pair of widths."""
    n_orders = 1 if perms is None else len(perms)
    r2 = np.empty((len(pairs), n_orders, Y.shape[1]))
    kept = np.empty((len(pairs), *Y.shape)) if predictions else None
    widths = [(a_sets[i].array.shape[1], b_sets[j].array.shape[1]) for i, j in pairs]
    for sizes in sorted(set(widths)):
        index = [p for p, w in enumerate(widths) if w == sizes]
        arrays = [(a_sets[pairs[p][0]].array, b_sets[pairs[p][1]].array) for p in index]
        res = cross_validate_banded(JointDesigns(arrays, perms), Y, plan, sizes, return_predictions=predictions,
                                    **banded, **common)
        r2[index] = res.score.reshape(len(index), n_orders, -1)
        if predictions:
            kept[index] = res.predictions
    return (r2[:, 0] if perms is None else r2), kept


def _residual_permutations(rng: np.random.Generator, Y: np.ndarray, fitted: np.ndarray,
                           n_permutations: int) -> np.ndarray:
    """(n, P * t) targets under "B adds nothing beyond A" (Freedman & Lane 1983): A's out-of-fold fit
    (n, t) plus its residuals permuted among each target's observed rows; column p * t + j is target j
    under permutation p, missing where Y is."""
    n, t = Y.shape
    out = np.empty((n, n_permutations, t))
    residual = Y - fitted
    for j in range(t):
        orders = stats.permutations(rng, n_permutations, ~np.isnan(Y[:, j]))          # (P, n)
        out[:, :, j] = fitted[:, j, None] + residual[orders, j].T
    return out.reshape(n, n_permutations * t)


def _partition(r2_a: np.ndarray, r2_b: np.ndarray, r2_joint: np.ndarray) -> dict[str, np.ndarray]:
    return {"r2_a": r2_a, "r2_b": r2_b, "r2_joint": r2_joint, "unique_a": r2_joint - r2_b,
            "unique_b": r2_joint - r2_a, "shared": r2_a + r2_b - r2_joint}


def _intervals(Y, pred_a, pred_b, pred_joint, boot, level) -> tuple[dict, dict]:
    """Percentile intervals (pairs, t) of INTERVALS over bootstrap resamples boot (B, n) of the rows,
    every model scored on the same resamples (the pieces are differences of paired R²)."""
    if not len(boot):
        nan = np.full(pred_joint.shape[::2], np.nan)
        return dict.fromkeys(INTERVALS, nan), dict.fromkeys(INTERVALS, nan)
    samples = _partition(*(np.stack([_bootstrap_r2(Y, p, boot) for p in preds], 1)
                           for preds in (pred_a, pred_b, pred_joint)))   # (B, pairs, t) each
    bounds = {name: stats.percentile_interval(samples[name], level, axis=0) for name in INTERVALS}
    return {k: v[0] for k, v in bounds.items()}, {k: v[1] for k, v in bounds.items()}


def _bootstrap_r2(Y: np.ndarray, pred: np.ndarray, boot: np.ndarray) -> np.ndarray:
    """(B, t) R² of pred (n, t) on each resample (counts boot (B, n)) over the observed rows of each
    target: `metrics.r2` with per-target weights, as matrix products over all resamples at once."""
    observed = ~np.isnan(Y) & ~np.isnan(pred)
    y, residual = np.where(observed, Y, 0.0), np.where(observed, Y - pred, 0.0)
    count, total, square = boot @ observed, boot @ y, boot @ y ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - (boot @ residual ** 2) / (square - total ** 2 / count)
