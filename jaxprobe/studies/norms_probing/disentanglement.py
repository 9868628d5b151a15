"""Do attributes become harder to tell apart along the pipeline? Two views of the probes' predictions.

(a) Correlation similarity: the attributes' correlation matrix over concepts as the probes predict
    them, against the same matrix of the human ratings. Spearman's rho between their upper triangles
    is 1 when the predictions keep the human structure of which attributes go together.
(b) Confusability: C[f, a, b] = corr(pred_a, y_b) / corr(pred_a, y_a), how well the probe for
    attribute a predicts attribute b relative to its own. A probe that reproduced the ratings exactly
    would give C = the human correlation matrix; a probe that has learnt a blend of attributes predicts
    the others nearly as well as its own, and C's off-diagonal grows. The *entanglement index* of a
    feature set is the mean off-diagonal |C| (averaged over b, then over a); entanglement growing
    along the reverse diffusion shows as this index rising with the denoising step.

Missing ratings (NaN) are handled pairwise: every correlation uses the concepts rated on both
attributes, and predictions are masked where their own rating is missing, so that the predicted and
the human matrix are computed on the same concepts.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from jaxprobe.errors import InputError

_MIN_ROWS = 3


def _standardize(x: jax.Array) -> jax.Array:
    """Columns of x (..., n, p) centred and scaled over their finite rows; constant columns NaN."""
    mean = jnp.nanmean(x, axis=-2, keepdims=True)
    sd = jnp.nanstd(x, axis=-2, keepdims=True)
    scale = jnp.nanmax(jnp.abs(x), axis=-2, keepdims=True)
    return jnp.where(sd > 1e-6 * scale, (x - mean) / sd, jnp.nan)


@jax.jit
def _pairwise_pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = _standardize(a), _standardize(b)
    in_a, in_b = jnp.isfinite(a).astype(a.dtype), jnp.isfinite(b).astype(b.dtype)
    a, b = jnp.nan_to_num(a), jnp.nan_to_num(b)

    def over_rows(x: jax.Array, y: jax.Array) -> jax.Array:  # (..., n, p), (..., n, q) -> (..., p, q)
        return jnp.einsum("...ni,...nj->...ij", x, y)

    # one-pass sums over each pair's shared rows; the columns are already unit-scale, so they do not cancel
    n = over_rows(in_a, in_b)
    sum_a, sum_b = over_rows(a, in_b), over_rows(in_a, b)
    size = jnp.maximum(n, 1)
    var_a = over_rows(a * a, in_b) - sum_a**2 / size
    var_b = over_rows(in_a, b * b) - sum_b**2 / size
    cov = over_rows(a, b) - sum_a * sum_b / size
    ok = (n >= _MIN_ROWS) & (var_a > 1e-6 * n) & (var_b > 1e-6 * n)
    return jnp.where(ok, cov / jnp.sqrt(jnp.where(ok, var_a * var_b, 1.0)), jnp.nan)


def pairwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of every column of a (..., n, p) with every column of b (..., n, q) -> (..., p, q).

    Each pair uses the rows where both are finite; NaN for a pair with fewer than 3 such rows or no
    variance over them. Leading axes broadcast (a stack of feature sets against one rating matrix).
    Computed in float32 under `jit` (one program per shape); returned as float64.
    """
    return np.asarray(_pairwise_pearson(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)), np.float64)


def _check(predictions: np.ndarray, Y: np.ndarray, feature_sets: Sequence[str] | None = None):
    predictions, Y = np.asarray(predictions, np.float64), np.asarray(Y, np.float64)
    if predictions.ndim != 3 or Y.ndim != 2 or predictions.shape[1:] != Y.shape:
        raise InputError(f"predictions must be (feature sets, concepts, targets) and Y (concepts, targets) with the "
                         f"same concepts and targets; got {predictions.shape} and {Y.shape}.")
    if feature_sets is not None and len(feature_sets) != len(predictions):
        raise InputError(f"{len(feature_sets)} feature set names for {len(predictions)} sets of predictions.")
    return predictions, Y


def correlation_matrices(predictions: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(human (t, t), predicted (F, t, t)) attribute correlation matrices over concepts.

    predictions: (F, n, t) out-of-fold predictions; Y: (n, t) ratings, NaN = missing.
    """
    predictions, Y = _check(predictions, Y)
    masked = np.where(np.isnan(Y), np.nan, predictions)  # same concepts as the human matrix, pair by pair
    return pairwise_pearson(Y, Y), pairwise_pearson(masked, masked)


def similarity_table(human: np.ndarray, predicted: np.ndarray, feature_sets: Sequence[str]) -> pd.DataFrame:
    """Per feature set: similarity (Spearman rho between the upper triangles of its predicted and the
    human correlation matrix, over attribute pairs finite in both), n_pairs, and mean_abs_corr (mean
    |r| between predicted attributes: how much the predictions move together)."""
    upper = np.triu_indices(human.shape[-1], k=1)
    h, p = human[upper], predicted[:, upper[0], upper[1]]  # (m,), (F, m)
    valid = np.isfinite(h) & np.isfinite(p)
    ranks_h = rankdata(np.where(valid, h, np.nan), axis=-1, nan_policy="omit")
    ranks_p = rankdata(np.where(valid, p, np.nan), axis=-1, nan_policy="omit")
    rho = pairwise_pearson(ranks_p[..., None], ranks_h[..., None])[:, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_abs = np.nanmean(np.abs(p), axis=-1)
    return pd.DataFrame({"feature_set": list(feature_sets), "similarity": rho, "n_pairs": valid.sum(-1),
                         "mean_abs_corr": mean_abs})


def correlation_similarity(predictions: np.ndarray, Y: np.ndarray, feature_sets: Sequence[str]) -> pd.DataFrame:
    """How closely each feature set's predicted attribute correlations follow the human ones.

    predictions: (F, n, t), F in the order of `feature_sets`; Y: (n, t), NaN = missing. Columns as in
    `similarity_table`; the matrices themselves come from `correlation_matrices`.
    """
    _check(predictions, Y, feature_sets)
    return similarity_table(*correlation_matrices(predictions, Y), feature_sets)


def entanglement_index(C: np.ndarray) -> np.ndarray:
    """Mean off-diagonal |C[..., a, b]| over b, then over the attributes a with a finite row -> (...,).

    For the human correlation matrix, this is what a probe that reproduced the ratings would score."""
    off = ~np.eye(C.shape[-1], dtype=bool)
    with warnings.catch_warnings():  # a feature set with no reliable attribute: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.nanmean(np.where(off, np.abs(C), np.nan), axis=-1), axis=-1)


def confusability(
    predictions: np.ndarray, Y: np.ndarray, feature_sets: Sequence[str], *, min_score: float = 0.2,
) -> tuple[pd.DataFrame, np.ndarray]:
    """How well each attribute's probe predicts the other attributes, relative to its own.

    predictions: (F, n, t), F in the order of `feature_sets`; Y: (n, t), NaN = missing.
    Returns (summary, C). C: (F, t, t), C[f, a, b] = corr(pred_a, y_b) / corr(pred_a, y_a); rows of
    attributes whose own score corr(pred_a, y_a) is below `min_score` are NaN, as the ratio is noise
    there (and still inflates as the own score nears min_score: read the index beside the decoding).
    Summary, per feature set: entanglement (`entanglement_index` of C), frac_confused (share of the
    reliable attributes whose probe predicts some other attribute at least as well as its own,
    max_b C[a, b] >= 1), n_reliable (attributes with own score >= min_score).
    """
    predictions, Y = _check(predictions, Y, feature_sets)
    cross = pairwise_pearson(predictions, Y)  # (F, t, t): [f, a, b] = corr(pred_a, y_b)
    own = np.diagonal(cross, axis1=-2, axis2=-1)  # (F, t)
    reliable = own >= min_score  # NaN own scores compare False
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.where(reliable[..., None], cross / own[..., None], np.nan)
    others = np.where(np.eye(C.shape[-1], dtype=bool), -np.inf, np.nan_to_num(C, nan=-np.inf))
    confused = (others.max(-1) >= 1) & reliable
    n_reliable = reliable.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n_reliable > 0, confused.sum(-1) / n_reliable, np.nan)
    summary = pd.DataFrame({"feature_set": list(feature_sets), "entanglement": entanglement_index(C),
                            "frac_confused": frac, "n_reliable": n_reliable})
    return summary, C
