"""Directions in h-space from language, association scores with bootstrap intervals, k-means (Zeng, Chen &
Wong 2024): the maths, on arrays, jitted. `directions` drives it from prompts and writes reports.

Notation: n generations (prompt x seed), T denoising steps, d feature dimensions, C concepts, B bootstrap
samples, A association axes. Every concept statistic is a weighted average of generations, written as an
averaging matrix (C, n) whose rows sum to 1, so a bootstrap sample is just another averaging matrix.

Direction of concept c at step t (normalised to unit length):

    u_c(t) = P_t (mu_c(t) - mu_base(t)) / |P_t (mu_c(t) - mu_base(t))|

mu_c: mean h over c's generations; mu_base: the mean over the neutral prompts, or over all other concepts
(each weighted equally); P_t: the identity, or with whitening the inverse of the shrunk pooled
within-concept covariance (a Fisher-discriminant direction).

Association of a query concept q with an axis w (contrast weights over concepts: w_a = +1, w_b = -1 for
the pair a vs b; for one attribute of a larger family, +1 for it and -1/(k-1) for each other member):

    assoc(q, w, t) = 2 (mu_q - m) . Delta / (Delta . Delta)     with the dot product <x, y> = x' P_t y,
    Delta = sum_c w_c mu_c (the axis),  m = (pole_+ + pole_-) / 2 (its midpoint)

so assoc = +1 when q's mean projects exactly onto the positive pole (attribute a), -1 onto the negative one,
0 midway. It is scale-free (the same units in h-space and in CLIP text space, so the two compare directly)
and the baseline cancels out of it. Everything needed is the Gram matrix G = M P M' of the concept means
M (C, d): assoc = (2 (G w)_q - |w|' G w) / (w' G w).

Intervals: a stratified bootstrap that resamples generations (prompts x seeds) with replacement within
every concept, queries and attributes alike, so the uncertainty of the poles is counted too; percentile
intervals. With whitening, the metric P_t is estimated once from all generations and held fixed across
bootstrap samples (re-estimating a d x d inverse per sample and step is too costly), so those intervals
are conditional on the covariance and too narrow: in the synthetic test's setting (112 generations,
d = 24, shrinkage 0.1) they cover about 70% instead of 95%. Use whiten=False for inference. The same
resampling plan applied to paired feature sets (h-space and the CLIP text features of
the same prompts) gives paired intervals for their difference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import InputError
from jaxprobe.probes.stats import bootstrap_weights

__all__ = ["association_scores", "averaging_matrix", "baseline_matrix", "bootstrap_averaging", "contrast",
           "concept_directions", "generation_scores", "kmeans", "nearest_directions", "pooled_covariance",
           "principal_components", "project", "whitening_metric"]


# --- averaging plans (host side) -----------------------------------------------------------------------


def averaging_matrix(labels_n: np.ndarray, n_concepts: int, counts_n: np.ndarray | None = None) -> np.ndarray:
    """(C, n): row c averages concept c's generations, each weighted by counts_n (default 1)."""
    labels_n = np.asarray(labels_n)
    counts_n = np.ones(len(labels_n)) if counts_n is None else np.asarray(counts_n, np.float64)
    onehot = (labels_n[None, :] == np.arange(n_concepts)[:, None]) * counts_n[None, :]
    totals = onehot.sum(1, keepdims=True)
    if (totals == 0).any():
        raise InputError(f"concept(s) {np.flatnonzero(totals[:, 0] == 0).tolist()} have no generations")
    return onehot / totals


def bootstrap_averaging(rng: np.random.Generator, n_bootstrap: int, labels_n: np.ndarray,
                        n_concepts: int) -> np.ndarray:
    """(B, C, n) averaging matrices of a stratified bootstrap: generations resampled within each concept."""
    labels_n = np.asarray(labels_n)
    counts_bn = sum(bootstrap_weights(rng, n_bootstrap, labels_n == c) for c in range(n_concepts))
    onehot_cn = labels_n[None, :] == np.arange(n_concepts)[:, None]
    weights_bcn = onehot_cn[None] * counts_bn[:, None, :]
    return weights_bcn / weights_bcn.sum(-1, keepdims=True)  # each concept draws as many as it has: no zero rows


def baseline_matrix(averaging_cn: np.ndarray, mode: str, neutral: int | None = None,
                    groups_c: np.ndarray | None = None) -> np.ndarray:
    """(C, n) averaging rows of each concept's baseline: the `neutral` concept's mean ("neutral"), the
    equally weighted mean of all other concepts ("others"), or of the other concepts of its own group
    ("family"); the neutral concept, if any, is never among the others."""
    C = len(averaging_cn)
    if mode == "neutral":
        if neutral is None:
            raise InputError("baseline='neutral' needs neutral prompts; give some or use baseline='others'")
        return np.repeat(averaging_cn[neutral][None], C, axis=0)
    if mode not in ("others", "family"):
        raise InputError(f"baseline must be 'neutral', 'others' or 'family', not {mode!r}")
    pool_cc = ~np.eye(C, dtype=bool)
    if neutral is not None:
        pool_cc[:, neutral] = False
    if mode == "family":
        groups_c = np.asarray(groups_c)
        pool_cc &= groups_c[:, None] == groups_c[None, :]
    empty = [c for c in range(C) if c != neutral and not pool_cc[c].any()]
    if empty:
        raise InputError(f"baseline={mode!r}: concept(s) {empty} have no other concept to compare with; "
                         "give each family at least two concepts or use baseline='neutral'")
    pool_cc = pool_cc / np.maximum(pool_cc.sum(1, keepdims=True), 1)
    return pool_cc @ averaging_cn


def contrast(n_concepts: int, positive: int, negatives: list[int]) -> np.ndarray:
    """(C,) axis weights: +1 on `positive`, -1 shared equally by `negatives`."""
    w = np.zeros(n_concepts)
    w[positive] = 1.0
    w[negatives] = -1.0 / len(negatives)
    return w


# --- directions ----------------------------------------------------------------------------------------


@jax.jit
def pooled_covariance(features_ntd: jax.Array, averaging_cn: jax.Array) -> jax.Array:
    """(T, d, d) within-concept covariance, pooled over concepts (each generation minus its concept's mean)."""
    member_cn = (averaging_cn > 0).astype(features_ntd.dtype)
    means_ctd = jnp.einsum("cn,ntd->ctd", averaging_cn, features_ntd)
    centred_ntd = features_ntd - jnp.einsum("cn,ctd->ntd", member_cn, means_ctd)
    dof = jnp.maximum(features_ntd.shape[0] - averaging_cn.shape[0], 1)
    return jnp.einsum("ntd,nte->tde", centred_ntd, centred_ntd) / dof


@jax.jit
def whitening_metric(covariance_tdd: jax.Array, shrinkage: float = 0.1) -> jax.Array:
    """(T, d, d) inverse of the covariance shrunk towards its mean variance: (1 - s) S + s tr(S)/d I.

    Shrinkage keeps the inverse stable when generations are fewer than dimensions (the usual case)."""
    d = covariance_tdd.shape[-1]
    scale = jnp.trace(covariance_tdd, axis1=1, axis2=2)[:, None, None] / d
    shrunk = (1 - shrinkage) * covariance_tdd + shrinkage * scale * jnp.eye(d)
    values, vectors = jnp.linalg.eigh(shrunk)
    return jnp.einsum("tij,tj,tkj->tik", vectors, 1.0 / values, vectors)


@jax.jit
def concept_directions(features_ntd: jax.Array, averaging_cn: jax.Array, baseline_cn: jax.Array,
                       metric_tdd: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Unit directions (C, T, d) and the length of each mean difference |mu_c - mu_base| (C, T)."""
    diff_ctd = jnp.einsum("cn,ntd->ctd", averaging_cn - baseline_cn, features_ntd)
    raw_ctd = diff_ctd if metric_tdd is None else jnp.einsum("tde,cte->ctd", metric_tdd, diff_ctd)
    norm_ct = jnp.linalg.norm(raw_ctd, axis=-1, keepdims=True)
    return raw_ctd / jnp.maximum(norm_ct, 1e-12), jnp.linalg.norm(diff_ctd, axis=-1)


@jax.jit
def project(features_ntd: jax.Array, directions_ctd: jax.Array) -> jax.Array:
    """(n, T, C): every generation's projection onto every direction at its own step."""
    return jnp.einsum("ntd,ctd->ntc", features_ntd, directions_ctd)


@jax.jit
def generation_scores(features_ntd: jax.Array, averaging_cn: jax.Array, axes_ac: jax.Array,
                      metric_tdd: jax.Array | None = None) -> jax.Array:
    """(n, T, A): each generation's position on each axis, 2 (h_i - m) . Delta / (Delta . Delta); the mean
    over a query's generations is its association score."""
    means_ctd = jnp.einsum("cn,ntd->ctd", averaging_cn, features_ntd)
    delta_atd = jnp.einsum("ac,ctd->atd", axes_ac, means_ctd)
    mid_atd = jnp.einsum("ac,ctd->atd", jnp.abs(axes_ac), means_ctd) / 2
    delta_atd_m = delta_atd if metric_tdd is None else jnp.einsum("tde,ate->atd", metric_tdd, delta_atd)
    length_at = jnp.einsum("atd,atd->at", delta_atd_m, delta_atd)
    offset_at = jnp.einsum("atd,atd->at", mid_atd, delta_atd_m)
    return (2 * jnp.einsum("ntd,atd->nta", features_ntd, delta_atd_m) - 2 * offset_at.T) / length_at.T


# --- associations --------------------------------------------------------------------------------------


def _association_from_gram(gram_cc: jax.Array, axes_ac: jax.Array) -> jax.Array:
    """(A, C) assoc of every concept (as query) with every axis, from the Gram matrix of concept means."""
    g_w = axes_ac @ gram_cc                              # (A, C): (G w)_q
    spread = jnp.einsum("ac,ac->a", jnp.abs(axes_ac), g_w)  # |w|' G w
    length = jnp.einsum("ac,ac->a", axes_ac, g_w)           # w' G w
    return (2 * g_w - spread[:, None]) / length[:, None]


@functools.partial(jax.jit, static_argnames=("step_chunk",))
def association_scores(features_ntd: jax.Array, averaging_bcn: jax.Array, axes_ac: jax.Array,
                       metric_tdd: jax.Array | None = None, step_chunk: int = 1) -> jax.Array:
    """(B, T, A, C): assoc(q, w_a, t) (module docstring) for every averaging plan b, step, axis and query.

    averaging_bcn: plan 0 may be the plain means, the rest bootstrap samples. Steps run one chunk at a
    time (lax.map), so memory holds (B, C, d) concept means per step, never (n, T, d) copies."""
    features_tnd = jnp.moveaxis(features_ntd, 1, 0)

    def at_step(args):
        x_nd, metric_dd = args
        means_bcd = jnp.einsum("bcn,nd->bcd", averaging_bcn, x_nd)
        whitened_bcd = means_bcd if metric_dd is None else means_bcd @ metric_dd
        gram_bcc = jnp.einsum("bcd,bed->bce", whitened_bcd, means_bcd)
        return jax.vmap(_association_from_gram, in_axes=(0, None))(gram_bcc, axes_ac)

    out_tbac = jax.lax.map(at_step, (features_tnd, metric_tdd), batch_size=step_chunk)
    return jnp.moveaxis(out_tbac, 0, 1)


# --- clustering ----------------------------------------------------------------------------------------


def _kmeans_once(x_nd: jax.Array, key: jax.Array, k: int, n_iter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    n = x_nd.shape[0]

    x_sq_n = jnp.sum(x_nd**2, axis=1)

    def sq_dist(centroids_kd):  # (n, k), without an (n, k, d) intermediate
        d2 = x_sq_n[:, None] - 2 * x_nd @ centroids_kd.T + jnp.sum(centroids_kd**2, axis=1)[None]
        return jnp.maximum(d2, 0.0)

    # k-means++: each new seed drawn with probability proportional to its squared distance to the chosen ones
    # (Gumbel-max: argmax(log p + g) is a draw from p; one batch of noise keeps the program small)
    gumbel_kn = jax.random.gumbel(key, (k, n))
    centroids = jnp.zeros((k, x_nd.shape[1]), x_nd.dtype).at[0].set(x_nd[jnp.argmax(gumbel_kn[0])])

    def seed(i, centroids):
        d2 = jnp.where(jnp.arange(k)[None] < i, sq_dist(centroids), jnp.inf).min(1)
        return centroids.at[i].set(x_nd[jnp.argmax(jnp.log(d2) + gumbel_kn[i])])

    centroids = jax.lax.fori_loop(1, k, seed, centroids)

    def lloyd(_, centroids):
        assign_nk = jax.nn.one_hot(jnp.argmin(sq_dist(centroids), 1), k, dtype=x_nd.dtype)
        sizes_k = assign_nk.sum(0)
        updated = assign_nk.T @ x_nd / jnp.maximum(sizes_k, 1)[:, None]
        return jnp.where(sizes_k[:, None] > 0, updated, centroids)  # an emptied cluster keeps its centroid

    centroids = jax.lax.fori_loop(0, n_iter, lloyd, centroids)
    d2 = sq_dist(centroids)
    return centroids, jnp.argmin(d2, 1), d2.min(1).sum()


@functools.partial(jax.jit, static_argnames=("k", "n_iter", "n_init"))
def kmeans(x_nd: jax.Array, key: jax.Array, k: int, n_iter: int = 50, n_init: int = 8
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lloyd's k-means with k-means++ seeding, n_init restarts vmapped, the lowest inertia kept.

    Returns centroids (k, d), labels (n,), inertia (sum of squared distances to the centroids)."""
    centroids, labels, inertia = jax.vmap(_kmeans_once, in_axes=(None, 0, None, None))(
        x_nd, jax.random.split(key, n_init), k, n_iter)
    best = jnp.argmin(inertia)
    return centroids[best], labels[best], inertia[best]


@functools.partial(jax.jit, static_argnames=("k",))
def principal_components(x_nd: jax.Array, k: int = 2) -> jax.Array:
    """(n, k) scores of the rows of x on its first k principal axes."""
    centred = x_nd - x_nd.mean(0)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    return u[:, :k] * s[:k]


@jax.jit
def nearest_directions(centroids_kd: jax.Array, centre_d: jax.Array, directions_cd: jax.Array) -> jax.Array:
    """(k, C) cosine between each centroid's offset from `centre_d` and each direction."""
    offsets = centroids_kd - centre_d
    offsets = offsets / jnp.maximum(jnp.linalg.norm(offsets, axis=-1, keepdims=True), 1e-12)
    return offsets @ directions_cd.T
