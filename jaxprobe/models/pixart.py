"""Flax PixArt-alpha and PixArt-Sigma: diffusers' PixArtTransformer2DModel, numerically matching it.

PixArt-alpha folders still name the legacy `Transformer2DModel` with `norm_type="ada_norm_single"`; both read as
this model. Latents become patch tokens with sin-cos positions (`pos_embed`, stretched by `interpolation_scale`
for the 512-2048 px models); one adaLN-single timestep embedding (`adaln_single`, plus alpha's resolution and
aspect-ratio micro-conditions) modulates every block through the block's own `scale_shift_table`; T5 token
states pass `caption_projection` and are attended by every block's `attn2`, the padding masked out; a final
modulated layer (`norm_out`, `proj_out`) unpatchifies. Learned sigma: 2 x in_channels outputs, the first half
is the noise prediction.

Sites (sown `output`s, tokens (b, h*w, d)): `pos_embed`, `caption_projection`, `transformer_blocks.{i}` and
inside them `attn1`, `attn2` (also `attn2.probs`, (b, h*w, tokens)), `ff`, the timestep embedders, `norm_out`.
The family's bottleneck ("h-space") site is the middle block, `transformer_blocks.{num_layers // 2}` (14 of 28).
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
    AdaLayerNormSingle,
    CaptionProjection,
    PatchEmbed,
    PatchTransformerShape,
    modulate,
    unpatchify,
)

BLOCK_SITES = (r"pos_embed", r"caption_projection", r"transformer_blocks\.\d+", r"norm_out")
CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")

_ONLY_SUPPORTED = {"norm_type": "ada_norm_single", "attention_type": "default", "num_vector_embeds": None,
                   "only_cross_attention": False, "double_self_attention": False}
# Fields whose null in config.json means something (diffusers' "same as the input", "derive it", "none").
_NULLABLE = ("out_channels", "cross_attention_dim", "interpolation_scale", "use_additional_conditions",
             "caption_channels")
# What the legacy Transformer2DModel defaults differently from PixArtTransformer2DModel.
_LEGACY_DEFAULTS = {"norm_eps": 1e-5, "out_channels": None}


@dataclass(frozen=True)
class PixArtConfig(PatchTransformerShape):
    """The fields of diffusers' PixArt transformer config.json, with PixArtTransformer2DModel's defaults."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    cross_attention_dim: int | None = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    upcast_attention: bool = False
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None

    def __post_init__(self) -> None:
        if self.activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise CheckpointError(f"PixArt config: activation_fn {self.activation_fn!r} is not one of "
                                  f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
        if self.cross_attention_dim is None:
            raise CheckpointError("PixArt config: cross_attention_dim is None, so the blocks would not attend to "
                                  "the text; this is not a PixArt transformer")
        if self.caption_channels is None and self.cross_attention_dim != self.width:
            raise CheckpointError(f"PixArt config: without caption_channels the text must already be {self.width} "
                                  f"wide, but cross_attention_dim is {self.cross_attention_dim}")
        # diffusers' own defaults, resolved once: micro-conditions for the 1024 px alpha, stretched positions
        if self.use_additional_conditions is None:
            object.__setattr__(self, "use_additional_conditions", self.sample_size == 128)
        if self.interpolation_scale is None:
            object.__setattr__(self, "interpolation_scale", max(self.sample_size // 64, 1))

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "PixArtConfig":
        """From diffusers' transformer/config.json (PixArtTransformer2DModel or the legacy Transformer2DModel)."""
        bad = {k: cfg[k] for k, v in _ONLY_SUPPORTED.items() if k in cfg and cfg[k] not in (v, None)}
        if bad:
            raise CheckpointError("PixArt config sets option(s) jaxprobe does not implement: "
                                  + ", ".join(f"{k}={v!r} (supported: {_ONLY_SUPPORTED[k]!r})" for k, v in bad.items()))
        if cfg.get("_class_name") == "Transformer2DModel" and cfg.get("patch_size") is None:
            raise CheckpointError("PixArt config needs patch_size; this Transformer2DModel is not a PixArt")
        values = dict(_LEGACY_DEFAULTS) if cfg.get("_class_name") == "Transformer2DModel" else {}
        names = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in cfg.items() if k in names and (v is not None or k in _NULLABLE)})
        return cls(**values)

    @property
    def text_width(self) -> int:
        """The width of the text states it reads (T5 XXL: 4096)."""
        return self.caption_channels or self.cross_attention_dim


class PixArtBlock(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type="ada_norm_single": modulated, gated self-attention;
    unnormalised cross-attention to the caption; modulated, gated feed-forward."""

    config: PixArtConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, modulation: jax.Array, context: jax.Array, context_mask: jax.Array | None
                 ) -> jax.Array:   # x (b, n, d), modulation (b, 6*d) from adaln_single, context (b, tokens, d)
        cfg = self.config
        dim = x.shape[-1]
        table = self.param("scale_shift_table", nn.initializers.normal(dim ** -0.5), (6, dim))
        mods = table[None].astype(jnp.float32) + modulation.reshape(-1, 6, dim).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m.astype(self.dtype) for m in jnp.split(mods, 6, axis=1))          # each (b, 1, d)
        affine = cfg.norm_elementwise_affine
        norm = lambda name: nn.LayerNorm(cfg.norm_eps, dtype=self.dtype, use_scale=affine,  # noqa: E731
                                         use_bias=affine, name=name)
        attn = lambda name: Attention(cfg.num_attention_heads, cfg.attention_head_dim,  # noqa: E731
                                      qkv_bias=cfg.attention_bias, upcast=cfg.upcast_attention, dtype=self.dtype,
                                      name=name)
        x = x + gate_msa * attn("attn1")(modulate(norm("norm1")(x), shift_msa, scale_msa))
        # PixArt applies no norm before its cross-attention (diffusers' norm2 serves the feed-forward)
        x = x + attn("attn2")(x, context, context_mask)
        h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * FeedForward(activation_fn=cfg.activation_fn, dtype=self.dtype, name="ff")(h)
        self.sow("intermediates", "output", x)
        return x


class PixArtTransformer2DModel(nn.Module):
    """diffusers' PixArtTransformer2DModel, channels last. dtype: the compute dtype."""

    config: PixArtConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 encoder_attention_mask: jax.Array | None = None, resolution: jax.Array | None = None,
                 aspect_ratio: jax.Array | None = None) -> jax.Array:
        """sample (b, H, W, in_channels); timesteps scalar or (b,); encoder_hidden_states (b, tokens, text_width)
        T5 states; encoder_attention_mask (b, tokens), nonzero at real tokens; with use_additional_conditions
        (PixArt-alpha 1024) resolution (b, 2) image (height, width) in pixels and aspect_ratio (b, 1) height/width.
        Returns (b, H, W, output_channels) in the dtype of `sample`."""
        cfg, dtype = self.config, self.dtype
        b, height, width, _ = sample.shape
        p = cfg.patch_size
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        x = PatchEmbed(cfg.width, p, cfg.sample_size // p, cfg.interpolation_scale, dtype, name="pos_embed")(
            sample.astype(dtype))
        modulation, emb = AdaLayerNormSingle(cfg.width, cfg.use_additional_conditions, dtype, name="adaln_single")(
            t, resolution, aspect_ratio)
        context = encoder_hidden_states.astype(dtype)
        if cfg.caption_channels is not None:
            context = CaptionProjection(cfg.width, dtype, name="caption_projection")(context)
        mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
        for i in range(cfg.num_layers):
            x = PixArtBlock(cfg, dtype, name=f"transformer_blocks.{i}")(x, modulation, context, mask)
        table = self.param("scale_shift_table", nn.initializers.normal(cfg.width ** -0.5), (2, cfg.width))
        shift, scale = jnp.split(table[None].astype(jnp.float32) + emb[:, None].astype(jnp.float32), 2, axis=1)
        h = SownLayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name="norm_out")(x)
        h = modulate(h, shift.astype(dtype), scale.astype(dtype))
        h = nn.Dense(p * p * cfg.output_channels, dtype=dtype, name="proj_out")(h)
        return unpatchify(h, height // p, width // p, p).astype(sample.dtype)


def example_inputs(config: PixArtConfig, batch: int = 1, tokens: int = 8) -> tuple[jax.Array, ...]:
    """Zeros shaped like one evaluation's inputs: latents, a timestep, T5 states and their mask, and for
    micro-conditioned models a resolution and an aspect ratio."""
    side = config.sample_size
    inputs = (jnp.zeros((batch, side, side, config.in_channels)), jnp.zeros(()),
              jnp.zeros((batch, tokens, config.text_width)), jnp.ones((batch, tokens), jnp.int32))
    if not config.use_additional_conditions:
        return inputs
    return (*inputs, jnp.zeros((batch, 2)), jnp.zeros((batch, 1)))
