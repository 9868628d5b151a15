"""On-device reductions of captured activations (pure, traced inside the jitted programs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOKEN_REDUCTIONS = ("eos", "mean", "last_content", "none")
SPATIAL_REDUCTIONS = ("mean", "max", "none")


def reduce_tokens(x: jax.Array, eos: jax.Array, how: str) -> jax.Array:
    """x: (b, tokens, d) or (b, d) (already pooled sites pass through); eos: (b,) EOS positions.

    eos: the EOS token; mean: over BOS..EOS (the tokenizer's attention mask, padding excluded);
    last_content: the token before EOS; none: every position.
    """
    if x.ndim == 2 or how == "none":
        return x
    rows = jnp.arange(x.shape[0])
    if how == "eos":
        return x[rows, eos]
    if how == "last_content":
        return x[rows, jnp.maximum(eos - 1, 0)]
    real = (jnp.arange(x.shape[1])[None, :] <= eos[:, None]).astype(jnp.float32)  # (b, tokens)
    return jnp.einsum("btd,bt->bd", x.astype(jnp.float32), real) / real.sum(axis=1, keepdims=True)


def reduce_spatial(x: jax.Array, how: str) -> jax.Array:
    """x: (b, h, w, c) -> (b, c) for mean/max, unchanged for none; (b, d) passes through."""
    if x.ndim != 4 or how == "none":
        return x
    x = x.astype(jnp.float32)
    return x.mean(axis=(1, 2)) if how == "mean" else x.max(axis=(1, 2))
