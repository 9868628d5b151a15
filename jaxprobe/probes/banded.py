"""Banded ridge: one penalty per feature space, chosen per target by the single-space ridge's nested CV.

A model over k feature spaces X_1..X_k (columns of one design, space j of width d_j) with penalty
sum_j alpha_j |w_j|² is ordinary ridge with penalty alpha on the columns of space j multiplied by
sqrt(gamma_j), where alpha_j = alpha / gamma_j: its kernel is sum_j gamma_j X_j X_jᵀ. The candidate
kernel weights gamma (G, k) lie on the simplex (himalaya's parameterisation; deltas = log(gamma / alpha)),
so for each candidate the design is rescaled once and `ridge.py` does the rest exactly as for one space:
one decomposition per (outer fold, gamma) — primal or dual by n vs total d — serves every alpha, every
target and every inner fold (scored by exact deletion). The (gamma, alpha) with the best inner score wins
per target (or per selection group); ties go to the first gamma, then the first alpha.

Candidates run in sequence (`lax.scan`) carrying only the best choice so far and its refit, so memory is
that of one single-space fit of the joint design, whatever G. `BandedSolver` is a fold solver for
`crossval.cross_validate`, so many (A, B) pairs batch, shard and chunk like `probe_sweep`'s feature sets,
and permuted targets are extra target columns of the same decompositions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import InputError
from jaxprobe.probes.crossval import DEFAULT_ALPHAS, CVResult, cross_validate
from jaxprobe.probes.folds import FoldPlan
from jaxprobe.probes.ridge import (
    Decomposition,
    OuterFold,
    RidgeSolver,
    Scoring,
    TrainingTargets,
    decompose,
    fitted_coords,
    group_totals,
    inner_cv_scores,
    standardizer,
    training_targets,
)

# Weight of every space relative to the first; 2 spaces: 9 candidates, 1e-2 .. 1e2.
DEFAULT_RATIOS = np.logspace(-2, 2, 9)

Refit = Callable[[Decomposition, TrainingTargets, jax.Array, jax.Array], Any]


def kernel_weights(n_spaces: int, ratios: Sequence[float] | np.ndarray = DEFAULT_RATIOS) -> np.ndarray:
    """(G, k) candidate kernel weights on the simplex: every combination of the weight of spaces
    1..k-1 relative to space 0 taken from `ratios`, normalised to sum to 1 (G = len(ratios)^(k-1))."""
    ratios = np.asarray(ratios, float).ravel()
    if n_spaces < 1 or not len(ratios) or (ratios <= 0).any():
        raise InputError("kernel_weights needs at least one feature space and positive ratios")
    grids = np.meshgrid(*([ratios] * (n_spaces - 1)), indexing="ij")
    relative = np.stack([np.ones(ratios.size ** (n_spaces - 1))] + [g.ravel() for g in grids], 1)
    return relative / relative.sum(1, keepdims=True)


def check_kernel_weights(gammas: np.ndarray | Sequence, n_spaces: int) -> np.ndarray:
    """gammas as a validated (G, n_spaces) float array: non-negative, each row with a positive weight."""
    gammas = np.asarray(gammas, float)
    if gammas.ndim != 2 or gammas.shape[1] != n_spaces:
        raise InputError(f"gammas must be (n_candidates, n_spaces={n_spaces}), got shape {gammas.shape}")
    if (gammas < 0).any() or not (gammas.sum(1) > 0).all() or not np.isfinite(gammas).all():
        raise InputError("gammas must be finite and non-negative, with a positive weight in every row")
    return gammas


def search(
    x: jax.Array, y: jax.Array, train: jax.Array, train_mask: jax.Array, val: jax.Array,
    val_mask: jax.Array, select_groups: jax.Array, alphas: jax.Array, gammas: jax.Array,
    space: np.ndarray, refit: Refit, *, fit_intercept: bool = True, standardize: bool = True,
    scoring: Scoring = "r2",
) -> tuple[jax.Array, Any, jax.Array]:
    """Inner-CV search over kernel weights gammas (G, k) x alphas (A,) on one training set of x (n, d).

    space: (d,) static index of each column's feature space. refit(dec, tt, alpha (t,), c (d,))
    returns a pytree whose leaves end in a target axis (t,): what the caller keeps of the fit at each
    target's best alpha for one gamma, with c the column scaling of that gamma (x * c is the design
    `dec` decomposes). Returns (choice (t,) index g * A + a, the kept refit of the chosen candidate,
    inner scores (G, A, t)).
    """
    # Only the scale: decompose centres the rescaled design itself.
    _, scale = standardizer(x, train, train_mask, fit_intercept=fit_intercept, standardize=standardize)
    n_alphas = alphas.shape[0]

    def candidate(g, gamma):
        c = jnp.sqrt(gamma)[space] / scale                                 # (d,)
        dec = decompose(x * c, train, train_mask, fit_intercept=fit_intercept)
        tt = training_targets(dec, y, train, train_mask, fit_intercept=fit_intercept)
        scores = inner_cv_scores(dec, tt, val, val_mask, alphas, fit_intercept=fit_intercept,
                                 scoring=scoring)                           # (A, t)
        totals = group_totals(scores, select_groups)                       # (t, A)
        best = jnp.argmax(totals, axis=1)
        return totals.max(1), g * n_alphas + best, refit(dec, tt, alphas[best], c), scores

    def step(carry, item):
        g, gamma = item
        total, choice, kept, scores = candidate(g, gamma)
        better = (total > carry[0]) | (g == 0)                              # (t,) strict: ties stay
        keep = jax.tree.map(lambda new, old: jnp.where(better, new, old), (total, choice, kept), carry)
        return keep, scores

    first = jax.eval_shape(lambda: candidate(0, gammas[0])[:3])
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    (_, choice, kept), scores = jax.lax.scan(step, init, (jnp.arange(gammas.shape[0]), gammas))
    return choice, kept, scores


@dataclasses.dataclass(frozen=True)
class BandedSolver:
    """One outer fold of nested cross-validated banded ridge (a fold solver for `cross_validate`).

    sizes: the width of each feature space, in column order of the joint design. gammas: (G, k)
    candidate kernel weights (rows of a tuple). The chosen (gamma, alpha) per target refits on all
    training rows and predicts the test rows.
    """

    alphas: tuple[float, ...]
    gammas: tuple[tuple[float, ...], ...]
    sizes: tuple[int, ...]
    standardize: bool = True
    scoring: Scoring = "r2"

    @property
    def choices(self) -> np.ndarray:
        """(G * A, k) per-space penalties alpha / gamma_j of every candidate, in choice order."""
        gammas, alphas = np.asarray(self.gammas), np.asarray(self.alphas)
        with np.errstate(divide="ignore"):  # gamma 0: the space is left out (infinite penalty)
            return (alphas[None, :, None] / gammas[:, None, :]).reshape(-1, gammas.shape[1])

    def __call__(
        self, x: jax.Array, y: jax.Array, train: jax.Array, train_mask: jax.Array, test: jax.Array,
        val: jax.Array, val_mask: jax.Array, select_groups: jax.Array,
    ) -> OuterFold:
        """x (n, sum(sizes)), y (n, t); slots as in FoldPlan, one outer fold."""
        def predict(dec, tt, alpha, c):
            return tt.mean + dec.proj[test] @ fitted_coords(dec, tt, alpha)   # (n_test, t)

        choice, predictions, _ = search(
            x, y, train, train_mask, val, val_mask, select_groups, jnp.asarray(self.alphas, x.dtype),
            jnp.asarray(self.gammas, x.dtype), np.repeat(np.arange(len(self.sizes)), self.sizes), predict,
            standardize=self.standardize, scoring=self.scoring)
        return OuterFold(predictions, choice)

    def elements_per_set(self, n: int, d: int, plan_shape: tuple[int, ...], n_targets: int) -> int:
        """One candidate is live at a time: a single-space fit of the joint design plus the carry."""
        single = RidgeSolver(self.alphas).elements_per_set(n, d, plan_shape, n_targets)
        k, _, _, _ = plan_shape
        return single + k * 2 * n * n_targets


def cross_validate_banded(
    X: np.ndarray | Sequence[np.ndarray], Y: np.ndarray, plan: FoldPlan, sizes: Sequence[int],
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS, gammas: np.ndarray | None = None, *,
    ratios: Sequence[float] | np.ndarray = DEFAULT_RATIOS, standardize: bool = True,
    scoring: Scoring | None = None, metric: str = "r2", **options,
) -> CVResult:
    """Nested cross-validated banded ridge of every joint design X[f] (n, sum(sizes)) against Y (n, t).

    Each X[f] is its feature spaces side by side (space j: the next sizes[j] columns), e.g. a
    reference space A and one of many spaces B as np.hstack([A, B]). gammas: (G, k) candidate kernel
    weights (default `kernel_weights(k, ratios)`); alphas: the overall penalties. Selection, scoring
    and options as in `crossval.cross_validate_ridge`, except that `alphas` of the result is
    (F, k_outer, t, k): the per-space penalties alpha / gamma_j chosen in each outer fold, and
    `metrics` holds "r2" only when metric is not "r2".
    """
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise InputError(f"sizes must give the width of every feature space (positive), got {sizes}")
    width = np.shape(X[0])[-1] if len(X) else sum(sizes)
    if width != sum(sizes):
        raise InputError(f"the joint designs have {width} columns but the spaces' sizes {sizes} add up to "
                         f"{sum(sizes)}: give one size per space, in column order")
    gammas = kernel_weights(len(sizes), ratios) if gammas is None else check_kernel_weights(gammas, len(sizes))
    alphas = np.asarray(alphas, float).ravel()
    if not len(alphas) or (alphas <= 0).any():
        raise InputError("alphas must be positive")
    solver = BandedSolver(tuple(alphas.tolist()), tuple(map(tuple, gammas.tolist())), sizes,
                          standardize=standardize,
                          scoring=scoring or ("neg_mse" if plan.leave_one_out else "r2"))
    return cross_validate(X, Y, plan, solver, metric=metric,
                          extra_metrics=() if metric == "r2" else ("r2",), **options)
