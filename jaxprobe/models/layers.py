"""Blocks shared by every model family: attention core, activations.

Model-specific modules (CLIP's attention with q_proj/k_proj, diffusers' Attention with to_q/to_k)
keep their own parameter names so loading stays a key mapping, but the maths lives here once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1's name for the tanh approximation
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(batch, length, heads*dim) -> (batch, length, heads, dim)."""
    b, n, hd = x.shape
    return x.reshape(b, n, num_heads, hd // num_heads)


def _fused_implementation(q: jax.Array) -> str | None:
    """cuDNN's fused kernel on NVIDIA GPUs for half-precision heads it supports; XLA elsewhere.

    `jax.nn.dot_product_attention` does not pick cuDNN by itself (implementation=None means XLA).
    """
    head_dim = q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 256:
        return "cudnn"
    return None


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int,
    is_causal: bool = False, key_mask: jax.Array | None = None, upcast: bool = False,
    bias: jax.Array | None = None, scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention over already-projected q (b, lq, h*d), k, v (b, lk, h*d).

    Goes through `jax.nn.dot_product_attention`, which picks the cuDNN fused kernel on GPU where it
    applies and XLA elsewhere. key_mask: (b, lk) booleans, True where a key may be attended.
    upcast: compute in float32 (SD 2.x's `upcast_attention`). bias: added to the logits, (b | 1, h, lq, lk)
    (T5's relative position bias). scale: of the logits, default 1/sqrt(head dim); T5 uses 1.0.
    Returns (b, lq, h*d).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    qh, kh, vh = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    try:
        out = jax.nn.dot_product_attention(qh, kh, vh, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                           implementation=_fused_implementation(qh))
    except (ValueError, NotImplementedError, TypeError):  # shapes or dtypes cuDNN refuses at trace time
        out = jax.nn.dot_product_attention(qh, kh, vh, bias=bias, mask=mask, scale=scale, is_causal=is_causal)
    b, n, h, d = out.shape
    return out.reshape(b, n, h * d).astype(dtype)


def attention_probs(q: jax.Array, k: jax.Array, *, num_heads: int) -> jax.Array:
    """Softmax attention probabilities averaged over heads: (b, lq, lk), in float32.

    Computed apart from the fused kernel (which never materialises them); under jit XLA drops this
    path entirely unless a capture asks for it.
    """
    qh = split_heads(q, num_heads).astype(jnp.float32)
    kh = split_heads(k, num_heads).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / jnp.sqrt(qh.shape[-1])
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)


class SownDense(nn.Dense):
    """A Dense layer that is itself a capture site (its output sown as `<path>.output`).

    A parent cannot sow under the name of one of its children, so layers that are sites in their
    own right (CLIP's projections) sow from inside.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        self.sow("intermediates", "output", y)
        return y


class SownLayerNorm(nn.LayerNorm):
    """A LayerNorm that is itself a capture site (CLIP's final/pre/post layer norms)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        self.sow("intermediates", "output", y)
        return y


class SownRMSNorm(nn.RMSNorm):
    """An RMSNorm that is itself a capture site (T5's final_layer_norm)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        self.sow("intermediates", "output", y)
        return y
