"""Permutation nulls, Benjamini–Hochberg FDR, bootstrap intervals and dose-response tables.

Resampling plans are drawn here, on the host, from a seeded generator; the statistics themselves
are computed inside the batched probe program (a permutation is just more target columns, a
bootstrap sample is a row-weight vector), so nulls and intervals cost no extra decomposition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def permutations(rng: np.random.Generator, n_permutations: int, rows: np.ndarray) -> np.ndarray:
    """(n_permutations, n) row orders that shuffle the rows where `rows` (n,) is True among
    themselves and leave the others in place (missing targets stay missing)."""
    n = len(rows)
    idx = np.flatnonzero(rows)
    perms = np.tile(np.arange(n), (n_permutations, 1))
    for p in perms:
        p[idx] = rng.permutation(idx)
    return perms


def bootstrap_weights(rng: np.random.Generator, n_bootstrap: int, rows: np.ndarray) -> np.ndarray:
    """(n_bootstrap, n) resampling counts: each sample draws as many rows as `rows` (n,) holds,
    with replacement, from those rows."""
    idx = np.flatnonzero(rows)
    counts = np.zeros((n_bootstrap, len(rows)))
    counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_bootstrap)
    return counts


def permutation_pvalues(observed: np.ndarray, null: np.ndarray, axis: int = 0) -> np.ndarray:
    """One-sided p = (1 + #{null >= observed}) / (1 + n_null); null stacks replicates on `axis`.

    NaN where the observed score is NaN."""
    null = np.moveaxis(null, axis, 0)
    exceed = (null >= observed).sum(0)
    p = (1 + exceed) / (1 + null.shape[0])
    return np.where(np.isnan(observed), np.nan, p)


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values over all non-NaN entries of p (any shape); NaN stays NaN."""
    p = np.asarray(p, float)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    flat = p[ok]
    m = flat.size
    if m == 0:
        return q
    order = np.argsort(flat)
    ranked = flat[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]   # step-up: q_i = min over j >= i
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def percentile_interval(samples: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of `samples` along `axis` (NaN samples ignored)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail], axis=axis)
    return lo, hi


def dose_response(scores_sn: np.ndarray, scales: Sequence[float], n_bootstrap: int, level: float, seed: int,
                  value: str = "association") -> pd.DataFrame:
    """scores (scales, n generations) -> one row per scale: the mean (column `value`), its bootstrap
    interval, and the change from the first scale with a paired interval (each resample draws the same
    generations at every scale, so what every generation shares does not widen the change's interval).

    The causal loops of the studies (an h-space direction, a probe's direction) report through this one
    table, so their columns read the same."""
    rng = np.random.default_rng(seed)
    n = scores_sn.shape[1]
    rows = rng.integers(0, n, size=(n_bootstrap, n))
    boot = scores_sn[:, rows].mean(axis=2)                        # (scales, B)
    lo, hi = percentile_interval(boot, level, axis=1)
    delta = boot - boot[:1]
    dlo, dhi = percentile_interval(delta, level, axis=1)
    mean = scores_sn.mean(axis=1)
    return pd.DataFrame({"scale": np.asarray(scales, float), "n": n, value: mean, "ci_low": lo,
                         "ci_high": hi, "change": mean - mean[0], "change_ci_low": dlo, "change_ci_high": dhi})
