"""Blocks shared by every model family: attention core, activations.

Model-specific modules (CLIP's attention with q_proj/k_proj, diffusers' Attention with to_q/to_k)
keep their own parameter names so loading stays a key mapping, but the maths lives here once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# What `multi_head_attention` runs on each backend. XLA's CPU backend materialises the whole
# (batch, heads, queries, keys) score tensor and streams it through memory several times: at SD's
# 4096 latent tokens that is 1 GiB per layer, and 3-4x slower than one (batch, head, query-chunk) tile
# at a time whose scores stay in cache ("blocked"). GPUs keep cuDNN's fused kernel where it applies.
ATTENTION_BY_BACKEND = {"cpu": "blocked", "gpu": "fused"}
ATTENTION_IMPLEMENTATIONS = ("xla", "fused", "blocked")
_SCORE_TILE = 1 << 21   # float32 scores per blocked tile (8 MiB): 512 queries x 4096 keys


def attention_implementation(backend: str | None = None) -> str:
    """The implementation for `backend` (the default backend when None): $JAXPROBE_ATTENTION when set
    (one of ATTENTION_IMPLEMENTATIONS, e.g. to compare them), else ATTENTION_BY_BACKEND, else "xla"."""
    chosen = os.environ.get("JAXPROBE_ATTENTION") or ATTENTION_BY_BACKEND.get(backend or jax.default_backend(), "xla")
    if chosen not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"JAXPROBE_ATTENTION={chosen!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    return chosen


def _cudnn_applies(q: jax.Array) -> bool:
    """cuDNN's fused kernel takes half-precision heads up to 256 wide, in multiples of 8, on NVIDIA GPUs."""
    head_dim = q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 256


def _xla_attention(qh, kh, vh, *, bias, mask, scale, is_causal, fused):
    """`jax.nn.dot_product_attention` on (b, l, h, d) heads; cuDNN when `fused` and it applies."""
    kwargs = dict(bias=bias, mask=mask, scale=scale, is_causal=is_causal)
    if fused and _cudnn_applies(qh):
        try:
            return jax.nn.dot_product_attention(qh, kh, vh, implementation="cudnn", **kwargs)
        except (ValueError, NotImplementedError, TypeError):  # shapes or dtypes cuDNN refuses at trace time
            pass
    return jax.nn.dot_product_attention(qh, kh, vh, **kwargs)


def _tiling(heads: int, lq: int, lk: int) -> tuple[int, int]:
    """(heads per tile, queries per tile) keeping a tile's scores near _SCORE_TILE floats: long self-attention
    splits each head's queries; short keys (cross-attention, small latents) group heads instead."""
    if lq * lk >= _SCORE_TILE:
        return 1, max(1, min(lq, _SCORE_TILE // lk))
    fit = max(1, _SCORE_TILE // (lq * lk))
    return max(g for g in range(1, min(heads, fit) + 1) if heads % g == 0), lq


def _blocked_attention(qh, kh, vh, *, key_mask, is_causal, scale=None):
    """Exact softmax attention one tile (a few heads, or a chunk of one head's queries) at a time, under `lax.map`.

    Same numerics as `jax.nn.dot_product_attention`'s XLA path: logits and softmax in float32, the
    probabilities cast to v's dtype for the second matmul; normalising after it (one division per
    output instead of per score) is exact up to rounding. qh (b, lq, h, d), kh/vh (b, lk, h, d).
    """
    b, lq, h, d = qh.shape
    lk = kh.shape[1]
    # Heads grouped within one example only, so tiles (and their rounding) do not depend on the batch size.
    group, chunk = _tiling(h, lq, lk)
    n_groups, n_chunks = b * h // group, -(-lq // chunk)
    pad = n_chunks * chunk - lq
    q_tiles = jnp.pad(qh, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)      # (b, h, lq', d)
    q_tiles = q_tiles.reshape(n_groups, group, n_chunks, chunk, d).transpose(0, 2, 1, 3, 4)
    q_tiles = q_tiles.reshape(n_groups * n_chunks, group, chunk, d)
    k_heads = kh.transpose(0, 2, 3, 1).reshape(n_groups, group, d, lk)   # keys transposed once, for q @ k^T
    v_heads = vh.transpose(0, 2, 1, 3).reshape(n_groups, group, lk, d)
    keep = None if key_mask is None else jnp.repeat(key_mask, h, axis=0).reshape(n_groups, group, 1, lk)
    scale = jnp.float32(d ** -0.5 if scale is None else scale)
    precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(qh.dtype))

    def tile(index_and_q):
        index, q = index_and_q                              # q (group, chunk, d)
        heads = index // n_chunks
        logits = jnp.matmul(q, k_heads[heads], precision=precision, preferred_element_type=jnp.float32) * scale
        allowed = None if keep is None else jnp.broadcast_to(keep[heads], logits.shape)
        if is_causal:
            rows = (index % n_chunks) * chunk + jnp.arange(chunk)[:, None]
            causal = rows >= jnp.arange(lk)[None, :]
            allowed = causal if allowed is None else allowed & causal
        if allowed is not None:
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        probs = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = jnp.matmul(probs.astype(vh.dtype), v_heads[heads], preferred_element_type=jnp.float32)
        return (out / probs.sum(axis=-1, keepdims=True)).astype(vh.dtype)

    out = jax.lax.map(tile, (jnp.arange(n_groups * n_chunks), q_tiles))   # (tiles, group, chunk, d)
    out = out.reshape(n_groups, n_chunks, group, chunk, d).transpose(0, 2, 1, 3, 4)
    out = out.reshape(b, h, n_chunks * chunk, d)[:, :, :lq]
    return out.transpose(0, 2, 1, 3)


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int,
    is_causal: bool = False, key_mask: jax.Array | None = None, upcast: bool = False,
    bias: jax.Array | None = None, scale: float | None = None, implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention over already-projected q (b, lq, h*d), k, v (b, lk, h*d).

    key_mask: (b, lk) booleans, True where a key may be attended. upcast: compute in float32 (SD 2.x's
    `upcast_attention`). bias: added to the logits, (b | 1, h, lq, lk) (T5's relative position bias).
    scale: of the logits, default 1/sqrt(head dim); T5 uses 1.0. implementation: one of
    ATTENTION_IMPLEMENTATIONS, by default the backend's (`attention_implementation`); all agree to
    float32 rounding, and a bias (short T5 sequences only) always takes XLA's path. Returns (b, lq, h*d).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    qh, kh, vh = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    implementation = implementation or attention_implementation()
    if implementation == "blocked" and bias is None:
        out = _blocked_attention(qh, kh, vh, key_mask=key_mask, is_causal=is_causal, scale=scale)
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = _xla_attention(qh, kh, vh, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                             fused=implementation == "fused")
    b, n, h, d = out.shape
    return out.reshape(b, n, h * d).astype(dtype)


def attention_probs(q: jax.Array, k: jax.Array, *, num_heads: int, key_mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention probabilities averaged over heads: (b, lq, lk), in float32; masked keys (key_mask
    (b, lk) False: T5 padding) get none.

    Computed apart from the fused kernel (which never materialises them); under jit XLA drops this
    path entirely unless a capture asks for it.
    """
    qh = split_heads(q, num_heads).astype(jnp.float32)
    kh = split_heads(k, num_heads).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / jnp.sqrt(qh.shape[-1])
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
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


def rotary_tables(ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10_000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (tokens, sum(axes_dims)) float32, of multi-axis rotary positions (FLUX's `FluxPosEmbed`):
    axis a of ids (tokens, len(axes_dims)) rotates its own axes_dims[a] channels, each frequency repeated for
    the (real, imaginary) pair it turns. Host numpy on static ids, in float64 as diffusers computes them, so the
    tables are constants of the compiled program."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[:dim // 2] / dim)
        angles = np.outer(ids[:, axis].astype(np.float32).astype(np.float64), freqs)   # (tokens, dim / 2)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return np.concatenate(cos, axis=1).astype(np.float32), np.concatenate(sin, axis=1).astype(np.float32)


def apply_rotary(x: jax.Array, rotary: tuple[Any, Any], num_heads: int) -> jax.Array:
    """Rotate each head of x (b, n, heads*d) by (cos, sin) (n, d): adjacent channel pairs are (real, imaginary)
    parts, as diffusers' apply_rotary_emb(use_real_unbind_dim=-1). In float32, cast back to x's dtype."""
    cos, sin = (jnp.asarray(t)[None, :, None, :] for t in rotary)
    heads = split_heads(x, num_heads).astype(jnp.float32)                  # (b, n, h, d)
    pairs = heads.reshape(*heads.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(heads.shape)
    out = heads * cos + rotated * sin
    return out.reshape(x.shape).astype(x.dtype)
