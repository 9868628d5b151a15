"""Iterative linear probes trained with optax: logistic (binary and multi-class) and L2 linear
regression, early-stopped on a validation split.

A probe is a pure function of its data, so many probes train at once under `vmap` (targets, outer
folds, feature sets); a `lax.while_loop` trains each until its validation loss has not improved for
`patience` evaluations, and vmap keeps a stopped probe's state frozen while others go on.
`ProbeConfig` is also a fold solver for `crossval.cross_validate`: the same fold plans, missing-target
masks, permutation nulls and bootstrap intervals as closed-form ridge. Its early-stopping split is
the plan's first inner fold of each outer training set, so the outer test rows stay unseen.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprobe.probes.ridge import OuterFold, standardizer

Params = dict[str, jax.Array]  # {"w": (d, n_out), "b": (n_out,)}


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """How to train an iterative linear probe (full-batch Adam).

    loss: "logistic" — y holds class labels 0..n_classes-1 (a sigmoid for two classes, a softmax
    for more); predictions are class labels. "squared" — linear regression; predictions are values.
    The objective is the mean training loss + l2/2·‖W‖² (the intercept is not penalised), on
    features standardized with the training rows' statistics (`standardize`).
    Every `eval_every` steps the validation loss (without penalty) is measured; training stops
    after `patience` evaluations without improvement, or `max_steps`, and keeps the best weights.
    """

    loss: Literal["logistic", "squared"] = "logistic"
    n_classes: int = 2
    l2: float = 1e-3
    learning_rate: float = 0.05
    max_steps: int = 2000
    eval_every: int = 10
    patience: int = 10
    standardize: bool = True

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.loss == "logistic" and self.n_classes > 2 else 1

    @property
    def choices(self) -> np.ndarray:
        return np.array([self.l2])

    def __call__(
        self, x: jax.Array, y: jax.Array, train: jax.Array, train_mask: jax.Array, test: jax.Array,
        val: jax.Array, val_mask: jax.Array, select_groups: jax.Array,
    ) -> OuterFold:
        """One outer fold (see `ridge.RidgeSolver`): one probe per target column of y (n, t)."""
        n = x.shape[0]
        # Row weights; padded slots point at row 0 with weight 0, so they add nothing.
        in_train = jnp.zeros(n, x.dtype).at[train].add(train_mask)
        val_w = jnp.zeros(n, x.dtype).at[train[val[0]]].add(val_mask[0])  # the first inner fold
        fit_w = in_train - val_w
        fit = jax.vmap(lambda yt: fit_probe(x, yt, fit_w, val_w, self), in_axes=1)
        params, _ = fit(y)                                               # w (t, d, n_out)
        logits = jnp.einsum("nd,tdo->tno", x[test], params["w"]) + params["b"][:, None, :]
        return OuterFold(predict(logits, self).T, jnp.zeros(y.shape[1], jnp.int32))

    def elements_per_set(self, n: int, d: int, plan_shape: tuple[int, ...], n_targets: int) -> int:
        """Rough peak memory of one feature set, in array elements: chunks are budgeted from it."""
        k = plan_shape[0]
        return k * (n * d + n_targets * (4 * d * self.n_outputs + 3 * n * self.n_outputs))


class _Train(NamedTuple):
    params: Params
    opt_state: optax.OptState
    best: Params
    best_loss: jax.Array
    best_step: jax.Array
    step: jax.Array
    since_best: jax.Array


def fit_probe(
    x: jax.Array, y: jax.Array, fit_weights: jax.Array, val_weights: jax.Array,
    config: ProbeConfig,
) -> tuple[Params, jax.Array]:
    """Train one probe on x (n, d), y (n,) over rows weighted by fit_weights (n,), early-stopped on
    the rows of val_weights (n,) (all zero: stopped when the training objective stops improving).
    Returns the best weights in x's own units and their step count."""
    both = fit_weights + val_weights
    mean, scale = standardizer(x, jnp.arange(len(x)), both > 0, standardize=config.standardize)
    z = (x - mean) / scale
    optimizer = optax.adam(config.learning_rate)

    def data_loss(params, weights):
        per_row = _row_loss(z @ params["w"] + params["b"], y, config)
        return (weights * per_row).sum() / weights.sum()

    def objective(params):
        return data_loss(params, fit_weights) + 0.5 * config.l2 * (params["w"] ** 2).sum()

    def step(_, carry):
        params, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(objective)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def monitored(params):  # without validation rows, the training objective decides
        return jax.lax.cond(val_weights.sum() > 0, lambda: data_loss(params, val_weights),
                            lambda: objective(params))

    def train_round(s: _Train) -> _Train:
        params, opt_state = jax.lax.fori_loop(0, config.eval_every, step, (s.params, s.opt_state))
        loss = monitored(params)
        better = loss < s.best_loss
        keep = lambda new, old: jnp.where(better, new, old)  # noqa: E731
        n_steps = s.step + config.eval_every
        return _Train(params, opt_state, jax.tree.map(keep, params, s.best), keep(loss, s.best_loss),
                      keep(n_steps, s.best_step), n_steps, jnp.where(better, 0, s.since_best + 1))

    def running(s: _Train) -> jax.Array:
        return (s.step < config.max_steps) & (s.since_best < config.patience)

    params = {"w": jnp.zeros((x.shape[1], config.n_outputs), x.dtype),
              "b": jnp.zeros(config.n_outputs, x.dtype)}
    start = _Train(params, optimizer.init(params), params, jnp.asarray(jnp.inf, x.dtype),
                   jnp.asarray(0), jnp.asarray(0), jnp.asarray(0))
    done = jax.lax.while_loop(running, train_round, start)
    w = done.best["w"] / scale[:, None]
    return {"w": w, "b": done.best["b"] - mean @ w}, done.best_step


def class_probabilities(logits: jax.Array) -> jax.Array:
    """(..., n_classes) probabilities from (..., n_outputs) logits (one logit: binary sigmoid)."""
    if logits.shape[-1] == 1:
        p = jax.nn.sigmoid(logits)
        return jnp.concatenate([1 - p, p], axis=-1)
    return jax.nn.softmax(logits, axis=-1)


def predict(logits: jax.Array, config: ProbeConfig) -> jax.Array:
    """(...) predicted class labels (logistic) or values (squared) from (..., n_outputs) logits."""
    if config.loss == "squared":
        return logits[..., 0]
    return class_probabilities(logits).argmax(-1).astype(logits.dtype)


def _row_loss(logits: jax.Array, y: jax.Array, config: ProbeConfig) -> jax.Array:
    if config.loss == "squared":
        return (logits[:, 0] - y) ** 2
    labels = y.astype(jnp.int32)
    if config.n_outputs == 1:
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
