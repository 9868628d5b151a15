"""Banded ridge: one penalty per feature space, chosen per target by the single-space ridge's nested CV.

A model over k feature spaces X_1..X_k (columns of one design, space j of width d_j) with penalty
sum_j alpha_j |w_j|² is ordinary ridge with penalty alpha on the columns of space j multiplied by
sqrt(gamma_j), where alpha_j = alpha / gamma_j: its kernel is sum_j gamma_j X_j X_jᵀ. The candidate
kernel weights gamma (G, k) lie on the simplex (himalaya's parameterisation; deltas = log(gamma / alpha)),
so each candidate is a single-space ridge of the rescaled design and `ridge.py` does the rest exactly as
for one space: one decomposition per (outer fold, gamma) — primal or dual by n vs total d — serves every
alpha, every target and every inner fold (scored by exact deletion). What does not depend on gamma is
computed once per training set: the per-space kernels z_j z_jᵀ (dual) or the Gram zᵀz (primal), which
each gamma combines in O(n²) or O(d²) before its eigh. The (gamma, alpha) with the best inner score wins
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
    drop_negligible,
    fitted_coords,
    group_totals,
    inner_cv_scores,
    standardizer,
    training_targets,
)

# Weight of every space relative to the first; 2 spaces: 9 candidates, 1e-2 .. 1e2.
DEFAULT_RATIOS = np.logspace(-2, 2, 9)

Refit = Callable[[Decomposition, TrainingTargets, jax.Array], Any]


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
    x: jax.Array, y: jax.Array, train: jax.Array, train_mask: jax.Array, rows: jax.Array, val: jax.Array,
    val_mask: jax.Array, select_groups: jax.Array, alphas: jax.Array, gammas: jax.Array,
    sizes: tuple[int, ...], refit: Refit, *, fit_intercept: bool = True, standardize: bool = True,
    scoring: Scoring = "r2",
) -> tuple[jax.Array, Any, jax.Array]:
    """Inner-CV search over kernel weights gammas (G, k) x alphas (A,) on one training set of x (n, d).

    sizes: (static) the width of each feature space, in column order. refit(dec, tt, alpha (t,))
    returns a pytree whose leaves end in a target axis (t,): what the caller keeps of the fit at each
    target's best alpha for one gamma. dec describes that gamma's design in x's own units (its
    `coefficients` are x's weights) except that dec.proj holds only the rows `rows` (n_rows,).
    Returns (choice (t,) index g * A + a, the kept refit of the chosen candidate, inner scores (G, A, t)).
    """
    n_alphas = alphas.shape[0]
    decomposition = _joint_decompositions(x, train, train_mask, rows, sizes, fit_intercept=fit_intercept,
                                          standardize=standardize)

    def candidate(g, gamma):
        dec, train_proj = decomposition(gamma)
        tt = training_targets(train_proj, y, train, train_mask, fit_intercept=fit_intercept)
        scores = inner_cv_scores(dec, tt, val, val_mask, alphas, fit_intercept=fit_intercept,
                                 scoring=scoring)                           # (A, t)
        totals = group_totals(scores, select_groups)                       # (t, A)
        best = jnp.argmax(totals, axis=1)
        return totals.max(1), g * n_alphas + best, refit(dec, tt, alphas[best]), scores

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


def _joint_decompositions(
    x: jax.Array, train: jax.Array, train_mask: jax.Array, rows: jax.Array, sizes: tuple[int, ...], *,
    fit_intercept: bool, standardize: bool,
) -> Callable[[jax.Array], tuple[Decomposition, jax.Array]]:
    """gamma (k,) -> (the decomposition of the design with space j scaled by sqrt(gamma_j), the training
    slots' projections (n_train, r)): `ridge.decompose` of that design, sharing the work that
    does not depend on gamma.

    The centred, standardized training design z splits by space, and the scaled design's Gram is
    sum_j gamma_j z_j z_jᵀ (dual) or z's Gram with entry (i, l) scaled by sqrt(gamma_i gamma_l)
    (primal): one product per training set, then O(n²) or O(d²) per gamma before its eigh. The
    training slots' dual projections are U sqrt(S) (K U = U S), so only `rows` need a product.
    """
    mean, scale = standardizer(x, train, train_mask, fit_intercept=fit_intercept, standardize=standardize)
    w = train_mask.astype(x.dtype)
    z = (x - mean) / scale                                               # (n, d)
    zt, zr = z[train] * w[:, None], z[rows]                              # (n_train, d), (n_rows, d)
    space = np.repeat(np.arange(len(sizes)), sizes)                      # (d,) static
    n_train, d = zt.shape

    def in_units(gamma, eigvals, basis, proj):
        # With scale / sqrt(gamma_j) `coefficients` gives x's weights; a left-out space gets weight 0.
        return Decomposition(mean, scale / jnp.sqrt(gamma)[space], eigvals, basis, proj)

    if d <= n_train:
        gram = zt.T @ zt                                                 # (d, d)

        def primal(gamma):
            root = jnp.sqrt(gamma)[space]
            eigvals, basis = jnp.linalg.eigh(gram * root[:, None] * root)
            eigvals = drop_negligible(eigvals, n_train)
            return in_units(gamma, eigvals, basis, (zr * root) @ basis), (zt * root) @ basis
        return primal

    bounds = np.cumsum((0, *sizes))
    blocks = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    kernels = jnp.stack([zt[:, b] @ zt[:, b].T for b in blocks])         # (k, n_train, n_train)
    kernels_rows = jnp.stack([zr[:, b] @ zt[:, b].T for b in blocks])    # (k, n_rows, n_train)

    def dual(gamma):
        eigvals, u = jnp.linalg.eigh(jnp.tensordot(gamma, kernels, 1))
        eigvals = drop_negligible(eigvals, d)
        positive = eigvals > 0
        root = jnp.sqrt(eigvals)
        u_scaled = u * jnp.where(positive, 1.0 / jnp.where(positive, root, 1.0), 0.0)   # (n_train, r)
        basis = (zt * jnp.sqrt(gamma)[space]).T @ u_scaled               # (d, r) only refits that ask for it
        return in_units(gamma, eigvals, basis, jnp.tensordot(gamma, kernels_rows, 1) @ u_scaled), u * root
    return dual


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
        def predict(dec, tt, alpha):
            return tt.mean + dec.proj @ fitted_coords(dec, tt, alpha)        # (n_test, t)

        choice, predictions, _ = search(
            x, y, train, train_mask, test, val, val_mask, select_groups, jnp.asarray(self.alphas, x.dtype),
            jnp.asarray(self.gammas, x.dtype), self.sizes, predict, standardize=self.standardize,
            scoring=self.scoring)
        return OuterFold(predictions, choice)

    def elements_per_set(self, n: int, d: int, plan_shape: tuple[int, ...], n_targets: int) -> int:
        """One candidate is live at a time: a single-space fit of the joint design, the carry, and
        the per-space kernels (or the Gram) shared by every candidate."""
        single = RidgeSolver(self.alphas).elements_per_set(n, d, plan_shape, n_targets)
        k, n_train, _, _ = plan_shape
        shared = d * d if d <= n_train else len(self.sizes) * n * n_train
        return single + k * (2 * n * n_targets + shared)


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
