"""Flax DiT (Peebles & Xie 2023): diffusers' DiTTransformer2DModel, class-conditional, numerically matching it.

facebook/DiT-XL-2-256 and -512 still name the legacy `Transformer2DModel` with `norm_type="ada_norm_zero"`;
diffusers reads both as this model, and so does `DiTConfig.from_dict`. Latents (b, H, W, 4) become
(H/p)*(W/p) patch tokens with fixed sin-cos positions (`pos_embed`), pass `num_layers` adaLN-Zero blocks
conditioned on the timestep plus a class embedding (each block owns its embedding, as the checkpoint does),
and a final adaptively-modulated layer (`norm_out`, `proj_out_1`, `proj_out_2`) unpatchifies them. With
learned sigma the output has 2 x in_channels: noise prediction then variance; samplers read the first half.

Sites (sown `output`s, tokens (b, h*w, d)): `pos_embed`, `transformer_blocks.{i}` and inside them `attn1`, `ff`
and the timestep embedders, `norm_out`. The family's bottleneck ("h-space") site is the middle block,
`transformer_blocks.{num_layers // 2}` (14 for DiT-XL/2's 28).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprobe.errors import CheckpointError
from jaxprobe.models.blocks import FEED_FORWARD_ACTIVATIONS, Attention, FeedForward
from jaxprobe.models.layers import SownLayerNorm
from jaxprobe.models.patches import (
    AdaLayerNormZero,
    PatchEmbed,
    PatchTransformerShape,
    modulate,
    plain_layer_norm,
    unpatchify,
)

BLOCK_SITES = (r"pos_embed", r"transformer_blocks\.\d+", r"norm_out")
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")

# Options of (legacy) Transformer2DModel configs that a DiT leaves at these values.
_ONLY_SUPPORTED = {"norm_type": "ada_norm_zero", "cross_attention_dim": None, "num_vector_embeds": None,
                   "only_cross_attention": False, "double_self_attention": False, "use_linear_projection": False}


@dataclass(frozen=True)
class DiTConfig(PatchTransformerShape):
    """The fields of diffusers' DiT transformer config.json, with diffusers' defaults (DiT-XL/2 256)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int = 1000
    upcast_attention: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise CheckpointError(f"DiT config: activation_fn {self.activation_fn!r} is not one of "
                                  f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
        if self.sample_size % self.patch_size:
            raise CheckpointError(f"DiT config: sample_size {self.sample_size} is not a multiple of patch_size "
                                  f"{self.patch_size}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "DiTConfig":
        """From diffusers' transformer/config.json (DiTTransformer2DModel or the legacy Transformer2DModel)."""
        bad = {k: cfg[k] for k, v in _ONLY_SUPPORTED.items() if k in cfg and cfg[k] != v}
        if bad:
            raise CheckpointError("DiT config sets option(s) a class-conditional DiT does not have: "
                                  + ", ".join(f"{k}={v!r} (DiT: {_ONLY_SUPPORTED[k]!r})" for k, v in bad.items()))
        legacy = cfg.get("_class_name") == "Transformer2DModel"   # where a null patch_size means pixels, not patches
        if (legacy and cfg.get("patch_size") is None) or ("num_embeds_ada_norm" in cfg and cfg["num_embeds_ada_norm"] is None):
            raise CheckpointError("DiT config needs patch_size and num_embeds_ada_norm (the class count); this "
                                  "Transformer2DModel is not a DiT")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    @property
    def null_class(self) -> int:
        """The label of the unconditional ("null") class that classifier-free guidance uses."""
        return self.num_embeds_ada_norm


class DiTBlock(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type="ada_norm_zero": adaLN-Zero self-attention and
    feed-forward, each gated. Returns (tokens, the block's conditioning embedding); sows the tokens."""

    config: DiTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, class_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp, emb = AdaLayerNormZero(
            cfg.num_embeds_ada_norm, self.dtype, name="norm1")(x, timesteps, class_labels)
        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, qkv_bias=cfg.attention_bias,
                         upcast=cfg.upcast_attention, dtype=self.dtype, name="attn1")
        x = x + gate_msa[:, None] * attn(h)
        h = modulate(plain_layer_norm(cfg.norm_eps, self.dtype, "norm3")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(activation_fn=cfg.activation_fn, dtype=self.dtype, name="ff")(h)
        self.sow("intermediates", "output", x)
        return x, emb


class DiTTransformer2DModel(nn.Module):
    """diffusers' DiTTransformer2DModel, channels last. dtype: the compute dtype; norms' statistics and the
    sinusoids stay float32."""

    config: DiTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, class_labels: jax.Array) -> jax.Array:
        """sample (b, H, W, in_channels), timesteps scalar or (b,), class_labels (b,) integers (the null class
        is `config.null_class`). Returns (b, H, W, output_channels) in the dtype of `sample`."""
        cfg, dtype = self.config, self.dtype
        b, height, width, _ = sample.shape
        p = cfg.patch_size
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (b,))
        x = PatchEmbed(cfg.width, p, cfg.sample_size // p, dtype=dtype, name="pos_embed")(sample.astype(dtype))
        emb = None
        for i in range(cfg.num_layers):
            x, block_emb = DiTBlock(cfg, dtype, name=f"transformer_blocks.{i}")(x, t, labels)
            emb = block_emb if emb is None else emb   # the output layer reuses block 0's embedding, as diffusers
        shift, scale = jnp.split(nn.Dense(2 * cfg.width, dtype=dtype, name="proj_out_1")(jax.nn.silu(emb)), 2, axis=-1)
        h = SownLayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name="norm_out")(x)
        h = nn.Dense(p * p * cfg.output_channels, dtype=dtype, name="proj_out_2")(modulate(h, shift, scale))
        return unpatchify(h, height // p, width // p, p).astype(sample.dtype)


def example_inputs(config: DiTConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zeros shaped like one evaluation's inputs: latents (b, side, side, c), a timestep, class labels (b,)."""
    side = config.sample_size
    return (jnp.zeros((batch, side, side, config.in_channels)), jnp.zeros(()), jnp.zeros((batch,), jnp.int32))
