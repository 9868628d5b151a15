"""Closed-form ridge regression with cross-validated alphas: one decomposition per training set.

Every function here handles one feature set and one training set; callers vmap them over outer
folds and feature sets. A training set is decomposed once — `eigh` of XᵀX (primal, d <= n) or of
XXᵀ (dual, d > n), whichever is smaller — and that decomposition serves every alpha, every target
and every inner validation fold:

* the fit on the whole training set for any alpha is a diagonal rescaling in the eigenbasis;
* an inner fold v is scored by exact deletion: the residuals on v of the fit *without* v are
  e_v = (I - H_vv)⁻¹ r_v, with H the hat matrix and r the residuals of the fit on the whole
  training set. For a partition of the training rows this is identical to refitting on each inner
  training set (it is the K-fold generalisation of the leave-one-out shortcut), so inner K-fold and
  leave-one-out cost one small (n_val x n_val) solve per fold and alpha instead of a decomposition.

The intercept is an unpenalised constant column, which makes every fit — inner ones included —
exactly equivalent to centring on its own training rows. Features are optionally scaled to unit
variance with statistics of the outer training set (the penalty metric is fixed per outer fold and
never sees a test row). Eigenvalues below max(s)·max(n, d)·eps are treated as exact zeros (the
minimum-norm solution), which makes the solver robust to rank deficiency, constant columns and
slightly negative float32 eigenvalues.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

Scoring = Literal["r2", "neg_mse"]


class Decomposition(NamedTuple):
    """A training set's eigendecomposition, from which the fit of every alpha and target follows."""

    mean: jax.Array     # (d,) training mean of the features (zeros without an intercept)
    scale: jax.Array    # (d,) training standard deviation (ones without standardization)
    eigvals: jax.Array  # (r,) eigenvalues of the training Gram matrix, r = min(d, n_train)
    basis: jax.Array    # (d, r) right singular vectors V of the (standardized) training design
    proj: jax.Array     # (n, r) every row, standardized, projected on the basis: z @ V


class TrainingTargets(NamedTuple):
    """Targets of the training slots, centred, with their projections on the eigenbasis."""

    mean: jax.Array     # (t,) training mean (zeros without an intercept)
    centred: jax.Array  # (n_train, t) zero on padded slots
    proj: jax.Array     # (n_train, r) training rows of Decomposition.proj, zero on padded slots
    coords: jax.Array   # (r, t) projᵀ @ centred: the targets in the eigenbasis
    count: jax.Array    # () number of real training rows


def standardizer(
    x: jax.Array, train: jax.Array, train_mask: jax.Array, *,
    fit_intercept: bool = True, standardize: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mean and scale (d,) of the training rows of x (n, d): (x - mean) / scale is what models see."""
    w = train_mask.astype(x.dtype)                        # (n_train,)
    count = w.sum()
    xt = x[train]                                         # (n_train, d)
    mean = (w @ xt) / count if fit_intercept else jnp.zeros(x.shape[1], x.dtype)
    if not standardize:
        return mean, jnp.ones(x.shape[1], x.dtype)
    std = jnp.sqrt((w @ (xt - mean) ** 2) / count)
    # A constant training column keeps scale 1: it is zero after centring and drops out.
    return mean, jnp.where(std > 10 * jnp.finfo(x.dtype).eps * jnp.abs(mean), std, 1.0)


def decompose(
    x: jax.Array, train: jax.Array, train_mask: jax.Array, *,
    fit_intercept: bool = True, standardize: bool = False,
) -> Decomposition:
    """Decompose the training rows `train` (n_train,) of x (n, d); padded slots are masked out."""
    mean, scale = standardizer(x, train, train_mask, fit_intercept=fit_intercept,
                               standardize=standardize)
    w = train_mask.astype(x.dtype)
    z = (x - mean) / scale                                # (n, d)
    zt = z[train] * w[:, None]                            # (n_train, d)
    n_train, d = zt.shape
    if d <= n_train:
        eigvals, basis = jnp.linalg.eigh(zt.T @ zt)       # (d,), (d, d)
        eigvals = drop_negligible(eigvals, n_train)
        return Decomposition(mean, scale, eigvals, basis, z @ basis)
    gram = z @ zt.T                                       # (n, n_train)
    eigvals, u = jnp.linalg.eigh(gram[train] * w[:, None])
    eigvals = drop_negligible(eigvals, d)
    u = u * jnp.where(eigvals > 0, jax.lax.rsqrt(jnp.where(eigvals > 0, eigvals, 1.0)), 0.0)
    return Decomposition(mean, scale, eigvals, zt.T @ u, gram @ u)


def training_targets(
    train_proj: jax.Array, y: jax.Array, train: jax.Array, train_mask: jax.Array, *,
    fit_intercept: bool = True,
) -> TrainingTargets:
    """Centre the training targets of y (n, t) and express them in the eigenbasis, given the
    training slots' projections train_proj (n_train, r) (`Decomposition.proj[train]`)."""
    w = train_mask.astype(y.dtype)[:, None]
    count = w.sum()
    yt = y[train] * w                                     # (n_train, t)
    mean = yt.sum(0) / count if fit_intercept else jnp.zeros(y.shape[1], y.dtype)
    centred = (yt - mean) * w
    proj = train_proj * w                                 # (n_train, r)
    return TrainingTargets(mean, centred, proj, proj.T @ centred, count)


def gains(eigvals: jax.Array, alphas: jax.Array) -> jax.Array:
    """(..., r) shrinkage 1 / (s + alpha) per eigen-direction, 0 on null directions."""
    return jnp.where(eigvals > 0, 1.0 / (eigvals + alphas[..., None]), 0.0)


def inner_cv_scores(
    dec: Decomposition, tt: TrainingTargets, val: jax.Array, val_mask: jax.Array,
    alphas: jax.Array, *, fit_intercept: bool = True, scoring: Scoring = "r2",
) -> jax.Array:
    """(n_alphas, t) inner cross-validation score of every alpha and target, higher is better.

    val: (k_inner, n_val) positions into the training slots (a partition; padded slots masked).
    scoring "r2": mean over folds of R² on the fold (scikit-learn's GridSearchCV default for
    ridge); "neg_mse": mean over folds of minus the fold's mean squared error (scikit-learn's
    leave-one-out criterion, himalaya's default). Alphas whose deletion system is not numerically
    positive definite score -inf, so they are never selected.

    I - H and the residuals are split into their least-squares limit (alpha -> 0) and a part
    proportional to alpha/(s(s+alpha)): near interpolation (d > n, small alpha) the direct
    I - H cancels catastrophically in float32, this split does not. When the training rows are
    interpolated exactly the least-squares residual part is zero and is not computed from noise.
    """
    inv = jnp.where(dec.eigvals > 0, 1.0 / jnp.where(dec.eigvals > 0, dec.eigvals, 1.0), 0.0)
    interpolated = (dec.eigvals > 0).sum() >= tt.count - fit_intercept
    ls_resid = tt.centred - tt.proj @ (inv[:, None] * tt.coords)     # (n_train, t)
    pv = tt.proj[val]                                                 # (k_in, n_val, r)
    ls_resid = jnp.where(interpolated, 0.0, ls_resid[val])            # (k_in, n_val, t)
    both = val_mask[:, :, None] & val_mask[:, None, :]
    eye = jnp.eye(val.shape[-1], dtype=pv.dtype)
    ls_lhs = eye - (pv * inv) @ jnp.swapaxes(pv, -1, -2)              # (k_in, n_val, n_val)
    if fit_intercept:
        ls_lhs = ls_lhs - 1.0 / tt.count
    ls_lhs = jnp.where(interpolated, 0.0, ls_lhs)
    count = val_mask.sum(-1)[:, None]                                 # (k_in, 1)
    if scoring == "r2":
        yv = tt.centred[val] * val_mask[..., None]                    # (k_in, n_val, t)
        dev = (yv - yv.sum(-2, keepdims=True) / jnp.maximum(count, 1)[..., None]) * val_mask[..., None]
        sst = (dev ** 2).sum(-2)                                      # (k_in, t)
    used = (count > 0).astype(pv.dtype)                               # (k_in, 1)

    def score(alpha):                                                 # () -> (t,)
        excess = alpha * inv * gains(dec.eigvals, alpha)              # (r,) 1/s - 1/(s+a)
        resid = ls_resid + pv @ (excess[:, None] * tt.coords)         # (k_in, n_val, t)
        lhs = ls_lhs + (pv * excess) @ jnp.swapaxes(pv, -1, -2)       # (k_in, n_val, n_val)
        lhs = jnp.where(both, lhs, eye)                               # padded slots decouple
        err = _solve_spd(lhs, resid * val_mask[..., None])           # (k_in, n_val, t)
        sse = (err ** 2).sum(-2)                                      # (k_in, t)
        if scoring == "r2":
            # scikit-learn's r2_score on a constant fold: 1 if predicted exactly, else 0.
            fold_score = jnp.where(sst > 0, 1 - sse / jnp.where(sst > 0, sst, 1),
                                   jnp.where(sse == 0, 1.0, 0.0))
        else:
            fold_score = -sse / jnp.maximum(count, 1)
        return (fold_score * used).sum(-2) / used.sum()

    n_train, t = tt.centred.shape
    scores = jax.lax.map(score, alphas, batch_size=alpha_block(alphas.shape[0], n_train, t))   # (A, t)
    return jnp.where(jnp.isfinite(scores), scores, -jnp.inf)


# Alphas scored at once hold (alphas, n_train, t) residuals. With 100 permutations as target columns
# (a THINGS pair, 6,666 columns) scoring all 20 at once was memory-bound: 17.6 GB resident and 16.9x
# the base fit; in blocks under this many elements, 2.8 GB and 9.4x (BENCHMARKS.md).
ALPHA_BLOCK_ELEMENTS = 2 ** 24


def alpha_block(n_alphas: int, n_train: int, n_targets: int) -> int:
    """How many alphas inner_cv_scores scores at once for n_train training slots and n_targets targets."""
    return max(1, min(n_alphas, ALPHA_BLOCK_ELEMENTS // max(1, n_train * n_targets)))


def group_totals(scores: jax.Array, groups: jax.Array) -> jax.Array:
    """(t, A) total of scores (A, t) over the selection group of each target; group ids (t,) in
    [0, t) (arange(t): every target on its own)."""
    return jax.ops.segment_sum(scores.T, groups, len(groups))[groups]


def select_alphas(scores: jax.Array, groups: jax.Array) -> jax.Array:
    """(t,) index of the best alpha for each target of scores (A, t); targets with the same group
    id (t,) in [0, t) share the alpha with the best total score (arange(t): one alpha per target).
    Ties go to the first alpha."""
    return jnp.argmax(group_totals(scores, groups), axis=1)


def fitted_coords(dec: Decomposition, tt: TrainingTargets, alpha: jax.Array) -> jax.Array:
    """(r, t) ridge weights in the eigenbasis for one alpha per target, alpha (t,)."""
    return gains(dec.eigvals, alpha).T * tt.coords


def coefficients(
    dec: Decomposition, tt: TrainingTargets, alpha: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Weights (d, t) and intercepts (t,) in the original feature units, alpha (t,)."""
    coef = (dec.basis @ fitted_coords(dec, tt, alpha)) / dec.scale[:, None]
    return coef, tt.mean - dec.mean @ coef


class OuterFold(NamedTuple):
    predictions: jax.Array  # (n_test, t) predictions for the outer test slots
    choice: jax.Array       # (t,) index of the model chosen by inner validation


@dataclasses.dataclass(frozen=True)
class RidgeSolver:
    """One outer fold of nested cross-validated ridge (a fold solver for `crossval.cross_validate`).

    Inner cross-validation over `alphas` on the training rows; the chosen alpha per target (or per
    selection group) refits on all training rows and predicts the test rows.
    """

    alphas: tuple[float, ...]
    standardize: bool = True
    scoring: Scoring = "r2"

    @property
    def choices(self) -> np.ndarray:
        return np.asarray(self.alphas)

    def __call__(
        self, x: jax.Array, y: jax.Array, train: jax.Array, train_mask: jax.Array, test: jax.Array,
        val: jax.Array, val_mask: jax.Array, select_groups: jax.Array,
    ) -> OuterFold:
        """x (n, d), y (n, t); train/test slots and val positions as in FoldPlan, one outer fold."""
        alphas = jnp.asarray(self.alphas, x.dtype)
        dec = decompose(x, train, train_mask, standardize=self.standardize)
        tt = training_targets(dec.proj[train], y, train, train_mask)
        scores = inner_cv_scores(dec, tt, val, val_mask, alphas, scoring=self.scoring)
        best = select_alphas(scores, select_groups)
        predictions = tt.mean + dec.proj[test] @ fitted_coords(dec, tt, alphas[best])
        return OuterFold(predictions, best)

    def elements_per_set(self, n: int, d: int, plan_shape: tuple[int, ...], n_targets: int) -> int:
        """Rough peak memory of one feature set, in array elements: chunks are budgeted from it."""
        k, n_train, k_inner, n_val = plan_shape
        r = min(d, n_train)
        a = alpha_block(len(self.alphas), n_train, n_targets)
        per_fold = (n * d + n * n_train + 3 * n_train ** 2 + n * r + d * r
                    + 3 * a * n_train * n_targets + a * k_inner * n_val * (3 * n_val + r))
        return k * per_fold


def drop_negligible(eigvals: jax.Array, size: int) -> jax.Array:
    """Eigenvalues of a Gram matrix of `size` summed terms with those below max·size·eps set to 0."""
    tol = eigvals.max() * size * jnp.finfo(eigvals.dtype).eps
    return jnp.where(eigvals > tol, eigvals, 0.0)


def _solve_spd(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solve batched symmetric positive definite systems (..., m, m) x = (..., m, t)."""
    m, t = rhs.shape[-2:]
    if m == 1:  # leave-one-out: a division, not a batch of 1x1 factorizations
        return rhs / lhs
    factor = (jnp.linalg.cholesky(lhs), True)
    if t <= 4 * m:
        return cho_solve(factor, rhs)
    # Many columns (permuted targets): the inverse (2m³) and a matmul, which XLA spreads over its
    # threads, instead of 2m²t of triangular solves in single-threaded LAPACK.
    return cho_solve(factor, jnp.broadcast_to(jnp.eye(m, dtype=lhs.dtype), lhs.shape)) @ rhs


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: np.ndarray, *, standardize: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge on every row of x (n, d) for targets y (n, t) at one alpha per target (t,), the way the sweep fits:
    features centred and (standardize) scaled to unit variance on these rows, the intercept unpenalised.

    Returns (coef (d, t) in x's own units — the standardized weights divided by the feature std —, intercept (t,),
    the feature std (d,) that was divided by; ones without standardize): x @ coef + intercept predicts y."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    rows, mask = jnp.arange(len(x)), jnp.ones(len(x), bool)
    dec = decompose(x, rows, mask, standardize=standardize)
    coef, intercept = coefficients(dec, training_targets(dec.proj, y, rows, mask), jnp.asarray(alpha, jnp.float32))
    return np.asarray(coef), np.asarray(intercept), np.asarray(dec.scale)
