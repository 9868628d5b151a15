"""Scores of predictions against targets, per target, with row weights.

Weights (n,) carry both the mask of rows to score (0/1: observed targets, tested rows) and
bootstrap resampling counts, so one definition serves the point estimate and its confidence
interval. Every function takes y, pred (n, t) and returns (t,).

* pearson: Pearson correlation of predictions with targets.
* r2: 1 - sum w (y - pred)² / sum w (y - ȳ)², ȳ the weighted mean of y over the scored rows (the
  out-of-fold R² of all rows pooled; it can be negative).
* pairwise_acc: the 2-vs-2 test on every pair of rows with different targets: a pair is correct
  when matching each prediction to its own target is closer (squared Euclidean distance) than the
  swapped matching, which is (pred_i - pred_j)·(y_i - y_j) > 0; ties in the predictions count one
  half. With `joint=True` the vectors are all targets together (one score); per target it is the
  concordance of the predicted and true order of each pair.
* accuracy: weighted fraction of rows whose predicted class label equals the target.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Metric = Literal["pearson", "r2", "pairwise_acc", "accuracy"]


def pearson(y: jax.Array, pred: jax.Array, weights: jax.Array) -> jax.Array:
    w = weights[:, None] / weights.sum()
    yc = y - (w * y).sum(0)
    pc = pred - (w * pred).sum(0)
    cov = (w * yc * pc).sum(0)
    return cov / jnp.sqrt((w * yc ** 2).sum(0) * (w * pc ** 2).sum(0))


def r2(y: jax.Array, pred: jax.Array, weights: jax.Array) -> jax.Array:
    w = weights[:, None]
    ybar = (w * y).sum(0) / w.sum()
    return 1 - (w * (y - pred) ** 2).sum(0) / (w * (y - ybar) ** 2).sum(0)


def pairwise_acc(y: jax.Array, pred: jax.Array, weights: jax.Array, *, joint: bool = False) -> jax.Array:
    """2-vs-2 accuracy, (t,) or () with joint=True. Memory O(n²) per target (targets in sequence)."""
    pair_w = weights[:, None] * weights[None, :]          # (n, n), each unordered pair twice

    def accuracy(yk: jax.Array, pk: jax.Array) -> jax.Array:  # (n, k) -> ()
        dy = yk[:, None, :] - yk[None, :, :]              # (n, n, k)
        dp = pk[:, None, :] - pk[None, :, :]
        agree = jnp.sign((dy * dp).sum(-1))               # +1 right, -1 swapped, 0 tie
        counted = pair_w * jnp.any(dy != 0, axis=-1)
        return 0.5 + 0.5 * (counted * agree).sum() / counted.sum()

    if joint:
        return accuracy(y, pred)
    return jax.lax.map(lambda yp: accuracy(yp[0][:, None], yp[1][:, None]), (y.T, pred.T))


def accuracy(y: jax.Array, pred: jax.Array, weights: jax.Array) -> jax.Array:
    return (weights[:, None] * (pred == y)).sum(0) / weights.sum()


METRICS = {"pearson": pearson, "r2": r2, "pairwise_acc": pairwise_acc, "accuracy": accuracy}
