"""TopK sparse autoencoders (Gao et al. 2024; Revelio's setting) as pure functions over a params pytree.

    pre   = (x - b_dec) W_enc + b_enc          (B, m)     x (B, d) already normalised (see `TrainState.scale`)
    code  = ReLU(top_k(pre, k))                (B, k) values and latent indices; every other latent is 0
    x_hat = code W_dec + b_dec                 (B, d)     W_dec rows have unit norm
    loss  = |x - x_hat|^2 / |x - mean(x)|^2    normalised MSE = fraction of variance unexplained (FVU)

One SAE is a dict of arrays; a stack of S SAEs of one width is the same dict with a leading S axis, and
`make_train_step` vmaps one SAE's update over it inside a single jitted program. After each Adam step the
decoder rows are put back on the unit sphere, and the gradient component parallel to each row is removed
before the step, so Adam does not spend its step on a norm change that is undone at once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprobe.errors import InputError

Params = dict[str, jax.Array]  # W_enc (d, m), b_enc (m,), W_dec (m, d), b_dec (d,); (S, ...) when stacked


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """How to train TopK SAEs. Defaults are Revelio's (Kim et al. 2025), which follow Gao et al. (2024).

    k: latents kept per input. expansion: latents per input dimension (m = expansion * d).
    learning_rate, warmup_steps: Adam with a linear warm-up from 0, then constant.
    batch_size: rows per step (clamped to the number of rows); steps: optimizer steps.
    aux_k: the AuxK loss reconstructs the residual from the aux_k most active dead latents, weighted by
    aux_coef (Gao et al.: k_aux = 512, 1/32); 0 turns it off (the default, as in Revelio).
    dead_tokens: a latent is dead when it has not fired in this many training rows (`train_saes` caps it at
    the rows of the data, one pass: see `train.dead_window`).
    decoder: "dense" multiplies the dense (B, m) code by W_dec; "sparse" gathers the k rows of W_dec
    each input uses (its gradient is a scatter-add). Same maths; which is faster depends on the device.
    topk_chunk: how `top_k` splits rows (None: its default for the backend; 0: whole rows).
    saes_at_once: how many SAEs of a stack the step vectorises together (0: all); the others run in turn
    inside the same compiled step (lax.map), bounding memory: one SAE's step holds ~3 (batch_size, m) arrays.
    seed: initialisation and data order. log_every, checkpoint_every: in steps (0: only at the end).
    """

    k: int = 32
    expansion: int = 64
    learning_rate: float = 4e-4
    warmup_steps: int = 500
    batch_size: int = 8192
    steps: int = 10_000
    aux_k: int = 0
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000
    decoder: Literal["dense", "sparse"] = "dense"
    topk_chunk: int | None = None
    saes_at_once: int = 0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        for name in ("k", "expansion", "batch_size", "steps", "dead_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"SAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.aux_k, self.warmup_steps, self.saes_at_once, self.topk_chunk or 0) < 0 or self.learning_rate <= 0:
            raise InputError("SAEConfig: aux_k, warmup_steps, saes_at_once, topk_chunk must be >= 0 and "
                             "learning_rate > 0")
        if self.decoder not in ("dense", "sparse"):
            raise InputError(f"SAEConfig.decoder must be 'dense' or 'sparse', got {self.decoder!r}")

    def n_latents(self, d: int) -> int:
        m = self.expansion * d
        if self.k > m or self.aux_k > m:
            raise InputError(f"k={self.k} and aux_k={self.aux_k} must not exceed the {m} latents "
                             f"(expansion {self.expansion} x width {d}): lower k or raise the expansion")
        return m

    def program_key(self) -> SAEConfig:
        """This config with the fields that do not change the compiled step (steps, seed, logging) fixed,
        so that runs differing only in those share one compiled program."""
        return dataclasses.replace(self, batch_size=1, steps=1, seed=0, log_every=1, checkpoint_every=1)

    def optimizer(self) -> optax.GradientTransformation:
        warmup = optax.linear_schedule(0.0, self.learning_rate, max(self.warmup_steps, 1))
        schedule = optax.join_schedules([warmup, optax.constant_schedule(self.learning_rate)],
                                        [self.warmup_steps])
        return optax.adam(schedule)


class TrainState(NamedTuple):
    """One SAE's training state (a stack's has a leading S axis on every leaf).

    scale: inputs are divided by it before encoding (fixed before training; see train.input_stats).
    since_fired: (m,) rows seen since each latent last fired: the dead-latent clock.
    """

    params: Params
    opt_state: optax.OptState
    since_fired: jax.Array
    scale: jax.Array


class Metrics(NamedTuple):
    loss: jax.Array
    fvu: jax.Array               # fraction of variance unexplained = 1 - explained variance
    aux_loss: jax.Array
    l0: jax.Array                # mean number of latents > 0 per input (<= k)
    dead_fraction: jax.Array     # latents silent for config.dead_tokens rows


def unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def init_params(key: jax.Array, d: int, m: int, mean: jax.Array) -> Params:
    """Random unit decoder rows, encoder = decoder transpose (Gao et al.), b_dec = the data mean."""
    w_dec = unit_rows(jax.random.normal(key, (m, d), jnp.float32))
    return {"W_enc": w_dec.T, "b_enc": jnp.zeros(m, jnp.float32), "W_dec": w_dec,
            "b_dec": jnp.asarray(mean, jnp.float32)}


def pre_activations(params: Params, x: jax.Array) -> jax.Array:
    """(B, d) -> (B, m)."""
    return (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


TOPK_CHUNK = 2048


def top_k(pre: jax.Array, k: int, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, m) -> values (B, k) after ReLU, latent indices (B, k), largest first (ties: lower index).

    With a chunk, rows go in two exact stages: the top k of each chunk of `chunk` latents, then the top
    k of those candidates (every global winner is a winner of its chunk). XLA's GPU TopK kernel stops
    at k = 16 and beyond it sorts whole rows, so on GPUs wide rows are chunked by default (None:
    TOPK_CHUNK on GPU, whole rows elsewhere, where XLA's partial sort is faster); 0: whole rows.
    """
    m = pre.shape[-1]
    if chunk is None:
        chunk = TOPK_CHUNK if jax.default_backend() == "gpu" and m > 2 * TOPK_CHUNK else 0
    chunk = chunk or m
    if chunk >= m or m % chunk or chunk < k:
        values, indices = jax.lax.top_k(pre, k)
        return jax.nn.relu(values), indices
    local_values, local = jax.lax.top_k(pre.reshape(*pre.shape[:-1], m // chunk, chunk), k)  # (B, C, k)
    offsets = (jnp.arange(m // chunk) * chunk)[:, None]
    candidates = (local + offsets).reshape(*pre.shape[:-1], -1)                                 # (B, C*k)
    values, where = jax.lax.top_k(local_values.reshape(*pre.shape[:-1], -1), k)
    return jax.nn.relu(values), jnp.take_along_axis(candidates, where, axis=-1)


def dense_code(values: jax.Array, indices: jax.Array, m: int) -> jax.Array:
    """(B, k) values at (B, k) indices -> (B, m) with zeros elsewhere."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], m), values.dtype).at[rows, indices].set(values)


def decode_code(w_dec: jax.Array, values: jax.Array, indices: jax.Array,
                decoder: Literal["dense", "sparse"] = "dense") -> jax.Array:
    """sum_j values[:, j] W_dec[indices[:, j]] -> (B, d), without the bias."""
    if decoder == "sparse":
        return jnp.einsum("bk,bkd->bd", values, w_dec[indices])
    return dense_code(values, indices, w_dec.shape[0]) @ w_dec


def encode(params: Params, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Normalised inputs (B, d) -> the TopK code: values (B, k), indices (B, k)."""
    return top_k(pre_activations(params, x), k)


def reconstruct(params: Params, x: jax.Array, k: int) -> jax.Array:
    values, indices = encode(params, x, k)
    return decode_code(params["W_dec"], values, indices) + params["b_dec"]


def _fvu(target: jax.Array, estimate: jax.Array) -> jax.Array:
    total = jnp.sum(jnp.square(target - target.mean(axis=0)))
    return jnp.sum(jnp.square(target - estimate)) / jnp.maximum(total, 1e-12)


def loss_fn(params: Params, x: jax.Array, dead: jax.Array, config: SAEConfig
            ) -> tuple[jax.Array, tuple[Metrics, jax.Array]]:
    """Normalised MSE (+ aux_coef * AuxK); also the metrics and which latents fired, (m,) bool."""
    pre = pre_activations(params, x)
    values, indices = top_k(pre, config.k, config.topk_chunk)
    x_hat = decode_code(params["W_dec"], values, indices, config.decoder) + params["b_dec"]
    fvu = _fvu(x, x_hat)
    aux = jnp.zeros(())
    if config.aux_k:
        # Dead latents learn to explain what the live ones leave; ReLU zeroes the -inf of live ones.
        aux_values, aux_indices = top_k(jnp.where(dead, pre, -jnp.inf), config.aux_k, config.topk_chunk)
        residual = jax.lax.stop_gradient(x - x_hat)
        aux = _fvu(residual, decode_code(params["W_dec"], aux_values, aux_indices, config.decoder))
        aux = jnp.where(dead.any(), aux, 0.0)
    active = values > 0
    fired = jnp.zeros(pre.shape[1], bool).at[indices.ravel()].max(active.ravel())
    metrics = Metrics(fvu + config.aux_coef * aux, fvu, aux, active.sum(axis=1).mean(), dead.mean())
    return metrics.loss, (metrics, fired)


def remove_parallel(grad_w_dec: jax.Array, w_dec: jax.Array) -> jax.Array:
    """The gradient of unit-norm rows with its component along each row removed."""
    return grad_w_dec - jnp.sum(grad_w_dec * w_dec, axis=-1, keepdims=True) * w_dec


def init_state(key: jax.Array, mean: jax.Array, scale: jax.Array, config: SAEConfig) -> TrainState:
    """One SAE for raw inputs of mean `mean` (d,) and scale `scale` ()."""
    d = mean.shape[-1]
    params = init_params(key, d, config.n_latents(d), mean / scale)
    return TrainState(params, config.optimizer().init(params),
                      jnp.zeros(config.n_latents(d), jnp.int32), jnp.asarray(scale, jnp.float32))


def sae_update(state: TrainState, x: jax.Array, config: SAEConfig) -> tuple[TrainState, Metrics]:
    """One Adam step of one SAE on raw inputs x (B, d)."""
    dead = state.since_fired >= config.dead_tokens
    grads, (metrics, fired) = jax.grad(loss_fn, has_aux=True)(state.params, x / state.scale, dead, config)
    grads = {**grads, "W_dec": remove_parallel(grads["W_dec"], state.params["W_dec"])}
    updates, opt_state = config.optimizer().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = {**params, "W_dec": unit_rows(params["W_dec"])}
    clock = jnp.minimum(state.since_fired + x.shape[0], jnp.iinfo(jnp.int32).max - x.shape[0])
    since_fired = jnp.where(fired, 0, clock)
    return TrainState(params, opt_state, since_fired, state.scale), metrics


def make_train_step(config: SAEConfig):
    """jit(vmap(sae_update)): (stacked TrainState, x (S, B, d)) -> (TrainState, Metrics of (S,) arrays).

    With config.saes_at_once = c < S, lax.map runs the stack c SAEs at a time in the same program.
    The state is donated: its buffers are reused for the new one."""
    return _train_step(config.program_key())


@functools.lru_cache(maxsize=16)
def _train_step(config: SAEConfig):
    def step(state: TrainState, x: jax.Array) -> tuple[TrainState, Metrics]:
        update = functools.partial(sae_update, config=config)
        if 0 < config.saes_at_once < x.shape[0]:
            return jax.lax.map(lambda args: update(*args), (state, x), batch_size=config.saes_at_once)
        return jax.vmap(update)(state, x)

    return jax.jit(step, donate_argnums=0)


def init_stack(key: jax.Array, means: jax.Array, scales: jax.Array, config: SAEConfig) -> TrainState:
    """S SAEs at once, for raw inputs of means (S, d) and scales (S,)."""
    # Initial values depend on the width and the optimizer only: one compiled init for any other settings.
    init_key = SAEConfig(k=1, expansion=config.expansion, learning_rate=config.learning_rate,
                         warmup_steps=config.warmup_steps)
    return _init_stack(key, means, scales, init_key)


@functools.partial(jax.jit, static_argnames="config")
def _init_stack(key: jax.Array, means: jax.Array, scales: jax.Array, config: SAEConfig) -> TrainState:
    keys = jax.random.split(key, means.shape[0])
    return jax.vmap(lambda k, mean, scale: init_state(k, mean, scale, config))(keys, means, scales)


class LatentStats(NamedTuple):
    """Sums over a pass through the data, for one SAE with m latents, d inputs, A norms attributes.

    top_values/top_rows (m, N): each latent's N largest activations and the rows they came from (-1:
    none yet). For the norms correlations, y holds the attribute of each row (NaN: not rated), `a` the
    activations: a_y = sum a*y, a_rated = sum a*[y rated], a2_rated = sum a^2*[y rated], each (m, A).
    """

    top_values: jax.Array
    top_rows: jax.Array
    activation_sum: jax.Array    # (m,)
    fire_count: jax.Array        # (m,)
    sse: jax.Array               # squared reconstruction error, normalised units
    x_sum: jax.Array             # (d,)
    x_square_sum: jax.Array
    l0_sum: jax.Array
    n_rows: jax.Array
    a_y: jax.Array
    a_rated: jax.Array
    a2_rated: jax.Array


def init_stats(m: int, d: int, n_top: int, n_attributes: int) -> LatentStats:
    zeros = jnp.zeros
    return LatentStats(jnp.full((m, n_top), -1.0), jnp.full((m, n_top), -1, jnp.int32), zeros(m), zeros(m),
                       zeros(()), zeros(d), zeros(()), zeros(()), zeros(()), zeros((m, n_attributes)),
                       zeros((m, n_attributes)), zeros((m, n_attributes)))


def accumulate_stats(stats: LatentStats, state: TrainState, x: jax.Array, rows: jax.Array, y: jax.Array,
                     k: int) -> LatentStats:
    """Add a batch: raw x (B, d), rows (B,) their row numbers (-1 for padding), y (B, A) attributes."""
    valid = (rows >= 0).astype(x.dtype)[:, None]
    xn = x / state.scale
    values, indices = encode(state.params, xn, k)
    a = dense_code(values, indices, state.params["W_dec"].shape[0]) * valid          # (B, m)
    x_hat = decode_code(state.params["W_dec"], values, indices) + state.params["b_dec"]
    n_top = stats.top_values.shape[1]
    candidates = jnp.concatenate([stats.top_values, jnp.where(valid > 0, a, -1.0).T], axis=1)
    candidate_rows = jnp.concatenate([stats.top_rows, jnp.broadcast_to(rows, (a.shape[1], rows.shape[0]))], axis=1)
    top_values, where = jax.lax.top_k(candidates, n_top)
    rated = jnp.isfinite(y).astype(x.dtype)
    y0 = jnp.where(rated > 0, y, 0.0)
    return LatentStats(
        top_values, jnp.take_along_axis(candidate_rows, where, axis=1),
        stats.activation_sum + a.sum(0), stats.fire_count + (a > 0).sum(0),
        stats.sse + jnp.sum(jnp.square(xn - x_hat) * valid), stats.x_sum + (xn * valid).sum(0),
        stats.x_square_sum + jnp.sum(jnp.square(xn) * valid), stats.l0_sum + (a > 0).sum(),
        stats.n_rows + valid.sum(),
        stats.a_y + a.T @ y0, stats.a_rated + a.T @ rated, stats.a2_rated + jnp.square(a).T @ rated)
