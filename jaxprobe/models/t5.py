"""Flax T5 encoder (T5 v1.1, as PixArt and SD3 condition on it), mirroring transformers' T5EncoderModel.

Parameter paths equal the checkpoint keys (`shared`, `encoder.block.3.layer.0.SelfAttention.q`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias`, `encoder.block.3.layer.1.DenseReluDense.wi_0`,
`encoder.final_layer_norm`), so weights load by `jaxprobe.checkpoints.weights.convert_state_dict`. Each block
and the final norm sow their output: as a pipeline's `text_encoder` the sites are `text_encoder.encoder.block.{i}`
and `text_encoder.encoder.final_layer_norm`.

What differs from CLIP, and why it is here rather than in the shared layers: RMS norm without mean or bias
(flax's RMSNorm computes it the same way, variance in float32); no 1/sqrt(d) on the attention logits (T5 folds
it into the initialisation); a bucketed relative position bias that only the first block owns and every block
adds; and a padding mask, since T5 pipelines pad prompts to `max_sequence_length` and mask the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import CheckpointError
from jaxprobe.models.layers import ACTIVATIONS, SownRMSNorm, multi_head_attention

BLOCK_SITES = (r"encoder\.(block\.\d+|final_layer_norm)",)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> T5Config:
        """From transformers' config.json. Configs older than transformers' `dense_act_fn`/`is_gated_act`
        fields (the original t5-v1_1 releases) only name `feed_forward_proj` ("gated-gelu", "relu")."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in cfg.items() if k in names and v is not None}
        proj = str(cfg.get("feed_forward_proj", "relu"))
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise CheckpointError(f"feed_forward_proj {proj!r} in the T5 config is neither 'ACT' nor 'gated-ACT'")
        values.setdefault("is_gated_act", parts[0] == "gated")
        values.setdefault("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])  # as transformers maps it
        config = cls(**values)
        if config.dense_act_fn not in ACTIVATIONS:
            raise CheckpointError(f"unsupported dense_act_fn {config.dense_act_fn!r} in the T5 config; "
                                  f"jaxprobe knows {sorted(ACTIVATIONS)}")
        return config

    # The names the pipeline reads off any text encoder (widths, depth), as CLIP's configs spell them.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(lq, lk) bucket of every (query, key) offset, bidirectional, as transformers' `_relative_position_bucket`.

    Host numpy on static lengths: the buckets are constants of the compiled program. The logarithmic part
    is computed in float32 in transformers' order of operations, so truncation lands in the same bucket."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    far = np.maximum(distance, max_exact).astype(np.float32)  # the log only counts where distance >= max_exact
    large = max_exact + (np.log(far / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Owns `relative_attention_bias` when called without a position bias (the first block's)."""

    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None,
                 position_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        q, k, v = (nn.Dense(inner, use_bias=False, dtype=self.dtype, name=n)(x) for n in ("q", "k", "v"))
        if position_bias is None:  # the first block (T5Stack hands the others its bias)
            buckets = relative_position_buckets(x.shape[1], x.shape[1], cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=self.dtype,
                             name="relative_attention_bias")
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]   # (1, h, lq, lk)
        out = multi_head_attention(q, k, v, num_heads=cfg.num_heads, key_mask=key_mask, bias=position_bias, scale=1.0)
        return nn.Dense(cfg.d_model, use_bias=False, dtype=self.dtype, name="o")(out), position_bias


class T5DenseReluDense(nn.Module):
    """Gated (`wi_0`, `wi_1`: act(x W0) * x W1) or plain (`wi`) feed-forward, then `wo`; no biases."""

    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(dense(cfg.d_ff, "wi_0")(x)) * dense(cfg.d_ff, "wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, "wi")(x))
        return dense(cfg.d_model, "wo")(h)


class T5Block(nn.Module):
    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None,
                 position_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        norm = lambda name: nn.RMSNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name=name)
        h, position_bias = T5Attention(cfg, self.dtype, name="layer.0.SelfAttention")(
            norm("layer.0.layer_norm")(x), key_mask, position_bias)
        x = x + h
        x = x + T5DenseReluDense(cfg, self.dtype, name="layer.1.DenseReluDense")(norm("layer.1.layer_norm")(x))
        self.sow("intermediates", "output", x)
        return x, position_bias


class T5Stack(nn.Module):
    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        position_bias = None  # made by block 0 (the only one with relative_attention_bias), shared by the rest
        for i in range(self.config.num_layers):
            x, position_bias = T5Block(self.config, self.dtype, name=f"block.{i}")(x, key_mask, position_bias)
        return SownRMSNorm(self.config.layer_norm_epsilon, dtype=self.dtype, name="final_layer_norm")(x)


class T5EncoderModel(nn.Module):
    """transformers' T5EncoderModel: token ids (b, n) and their attention mask -> hidden states (b, n, d_model)."""

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """attention_mask: (b, n), nonzero at real tokens (the tokenizer's); None attends every position,
        as transformers does without one."""
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, name="shared")(input_ids)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        return {"last_hidden_state": T5Stack(cfg, self.dtype, name="encoder")(x, key_mask)}


def attention_mask_from_eos(eos: jax.Array, length: int) -> jax.Array:
    """(b,) EOS positions -> (b, length) mask of the real tokens: T5's tokenizer ends every prompt with EOS and
    pads after it, so the mask is what the token reductions already use (`pipeline.reductions`)."""
    return (jnp.arange(length)[None, :] <= eos[:, None]).astype(jnp.int32)


def example_inputs(config: T5Config, batch: int = 1, length: int = 8) -> tuple[jax.Array, jax.Array]:
    """Token ids and an all-ones mask (b, length) for shape tracing; T5's parameters do not depend on length."""
    return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)
