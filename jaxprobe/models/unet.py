"""Flax UNet2DConditionModel for Stable Diffusion 1.x, 2.x and SDXL, numerically matching diffusers.

SDXL is the same module with `addition_embed_type="text_time"`: the pooled text embedding and the six
micro-conditioning time ids (original size, crop top-left, target size) are embedded (`add_embedding`)
and added to the timestep embedding; its block layout (no attention in the first block, several
transformer layers per block, linear projections) is configuration the SD blocks already take.

The module tree mirrors diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`), so
`unet_state_dict_to_params` is `weights.convert_state_dict` against the expected parameter tree.
Latents are NHWC. Capture sites (sown `output`s): conv_in, time_embedding, every down block (after
its downsampler), mid_block, every up block (after its upsampler), conv_out, and inside them every
resnet, Transformer2DModel, transformer block and attn1/attn2 (attn2 also sows `probs`).
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
from jaxprobe.models.blocks import (
    DownBlock2D,
    ResnetBlock2D,
    ResnetSpec,
    SownConv,
    TimestepEmbedding,
    Transformer2DModel,
    TransformerSpec,
    UpBlock2D,
    group_norm,
    timestep_embedding,
)
from jaxprobe.models.layers import ACTIVATIONS

# Sites a wildcard reaches without naming a deeper path (see jaxprobe.pipeline.sites).
BLOCK_SITES = (r"down_blocks\.\d+", r"mid_block", r"up_blocks\.\d+")

_CROSS_DOWN, _CROSS_UP, _CROSS_MID = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"
_DOWN_TYPES, _UP_TYPES = (_CROSS_DOWN, "DownBlock2D"), (_CROSS_UP, "UpBlock2D")

# diffusers options that SD 1.x/2.x/SDXL leave at these values and jaxprobe does not implement otherwise
# (class conditioning, Fourier time, dual/gated attention, image-hint embeddings, ...).
_ONLY_SUPPORTED = {
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "dual_cross_attention": False, "attention_type": "default", "cross_attention_norm": None,
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    "timestep_post_act": None, "time_embedding_act_fn": None, "reverse_transformer_layers_per_block": None,
}


_PER_BLOCK = ("down_block_types", "up_block_types", "block_out_channels", "only_cross_attention", "layers_per_block",
              "transformer_layers_per_block", "attention_head_dim", "num_attention_heads")


@dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' unet/config.json that SD 1.x/2.x use, with diffusers' defaults.

    Per-block options (layers_per_block, attention_head_dim, num_attention_heads,
    transformer_layers_per_block, only_cross_attention) take one value for all blocks or one per
    down block; the config stores one per down block. As in diffusers, `attention_head_dim` is the
    number of heads unless `num_attention_heads` is given (see `heads`). `use_linear_projection`
    only changes the checkpoint's kernel shapes (see jaxprobe.models.blocks).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, "DownBlock2D")
    mid_block_type: str = _CROSS_MID
    up_block_types: tuple[str, ...] = ("UpBlock2D", _CROSS_UP, _CROSS_UP, _CROSS_UP)
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None              # "text_time": SDXL's pooled text + time ids
    addition_time_embed_dim: int | None = None          # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None   # pooled width + 6 x addition_time_embed_dim

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in _PER_BLOCK:
            value = getattr(self, name)
            if value is None:
                continue
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
            if len(values) != n:
                raise CheckpointError(f"UNet config: {name} has {len(values)} entries for {n} blocks")
            object.__setattr__(self, name, values)
        if isinstance(self.cross_attention_dim, (list, tuple)):
            if len(set(self.cross_attention_dim)) != 1:
                raise CheckpointError("UNet config: per-block cross_attention_dim values differ "
                                      f"({self.cross_attention_dim}); SD 1.x/2.x UNets use one context width")
            object.__setattr__(self, "cross_attention_dim", self.cross_attention_dim[0])
        bad = ([t for t in self.down_block_types if t not in _DOWN_TYPES]
               + [t for t in self.up_block_types if t not in _UP_TYPES]
               + ([self.mid_block_type] if self.mid_block_type != _CROSS_MID else []))
        if bad:
            raise CheckpointError(f"UNet config: unsupported block type(s) {bad}; jaxprobe implements "
                                  f"{_DOWN_TYPES + _UP_TYPES + (_CROSS_MID,)} (SD 1.x/2.x)")
        if any(isinstance(k, (list, tuple)) for k in self.transformer_layers_per_block):
            raise CheckpointError("UNet config: nested transformer_layers_per_block is not supported")
        if self.act_fn not in ACTIVATIONS:
            raise CheckpointError(f"UNet config: unsupported act_fn {self.act_fn!r}; known: {sorted(ACTIVATIONS)}")
        if self.norm_num_groups is None:
            raise CheckpointError("UNet config: norm_num_groups=None (no output norm) is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise CheckpointError(f"UNet config: addition_embed_type={self.addition_embed_type!r} is not supported "
                                  "(jaxprobe implements None and SDXL's 'text_time')")
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim
                                                            and self.projection_class_embeddings_input_dim):
            raise CheckpointError("UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                                  "projection_class_embeddings_input_dim")

    def check_added_conditioning(self, pooled_dim: int, n_time_ids: int) -> None:
        """SDXL: the pooled text width and the time-id count must fill add_embedding's input exactly."""
        width = pooled_dim + n_time_ids * self.addition_time_embed_dim
        if width != self.projection_class_embeddings_input_dim:
            raise CheckpointError(
                f"the UNet's add_embedding takes {self.projection_class_embeddings_input_dim} features, but a pooled "
                f"text embedding of {pooled_dim} and {n_time_ids} time ids x {self.addition_time_embed_dim} make "
                f"{width}: text_encoder_2's projection_dim or the pipeline's requires_aesthetics_score does not match "
                "this UNet (mixed checkpoints?)")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "UNetConfig":
        """From diffusers' unet/config.json. Keys neither side knows are ignored, as diffusers does."""
        unsupported = {k: cfg[k] for k, v in _ONLY_SUPPORTED.items() if k in cfg and cfg[k] != v}
        if unsupported:
            raise CheckpointError(
                "UNet config sets option(s) jaxprobe does not implement: "
                + ", ".join(f"{k}={v!r} (supported: {_ONLY_SUPPORTED[k]!r})" for k, v in unsupported.items())
                + ". jaxprobe runs SD 1.x/2.x-style UNet2DConditionModels.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers' historical naming: attention_head_dim holds them)."""
        return self.num_attention_heads or self.attention_head_dim

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnets.0, attentions.0, resnets.1 (diffusers' num_layers, 1 in every UNet2DConditionModel)."""

    resnet: ResnetSpec
    transformer: TransformerSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = ResnetBlock2D(channels, self.resnet, self.dtype, name="resnets.0")(x, temb)
        x = Transformer2DModel(self.transformer, self.dtype, name="attentions.0")(x, context)
        x = ResnetBlock2D(channels, self.resnet, self.dtype, name="resnets.1")(x, temb)
        self.sow("intermediates", "output", x)
        return x


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel (SD 1.x/2.x configurations), channels last.

    dtype is the compute dtype (bfloat16 for speed); normalisation statistics and the sinusoidal
    timestep embedding stay float32. Parameters may be stored in either dtype.
    """

    config: UNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
        """sample: (b, h, w, in_channels) latents; timesteps: scalar or (b,); encoder_hidden_states:
        (b, tokens, cross_attention_dim); with addition_embed_type="text_time" (SDXL) also text_embeds
        (b, pooled_text_dim) and time_ids (b, n_ids). Returns (b, h, w, out_channels) in the dtype of `sample`."""
        cfg, dtype = self.config, self.dtype
        n_blocks = len(cfg.block_out_channels)
        resnet = ResnetSpec(cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn)

        def transformer(j: int) -> TransformerSpec:  # down block j's attention, shared by its mirror up block
            return TransformerSpec(cfg.heads[j], cfg.transformer_layers_per_block[j], cfg.norm_num_groups,
                                   cfg.only_cross_attention[j], cfg.upcast_attention)

        x = 2 * sample - 1.0 if cfg.center_input_sample else sample
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), sample.shape[:1])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype, name="time_embedding")(t_emb.astype(dtype))
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs text_embeds and time_ids")
            ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                     flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
            added = jnp.concatenate([text_embeds.astype(jnp.float32), ids.reshape(sample.shape[0], -1)], axis=-1)
            # diffusers builds add_embedding with TimestepEmbedding's default activation, whatever act_fn says
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, "silu", dtype, name="add_embedding")(added.astype(dtype))
        context = encoder_hidden_states.astype(dtype)

        x = SownConv(cfg.block_out_channels[0], (cfg.conv_in_kernel,) * 2, padding=(cfg.conv_in_kernel - 1) // 2,
                     dtype=dtype, name="conv_in")(x)
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock2D(
                cfg.block_out_channels[i], cfg.layers_per_block[i], resnet,
                transformer(i) if kind == _CROSS_DOWN else None,
                add_downsample=i < n_blocks - 1, downsample_padding=cfg.downsample_padding, dtype=dtype,
                name=f"down_blocks.{i}")(x, temb, context)
            skips.extend(block_skips)

        mid_resnet = dataclasses.replace(resnet, output_scale_factor=cfg.mid_block_scale_factor)
        # diffusers' UNetMidBlock2DCrossAttn is never only-cross-attention
        mid_attention = dataclasses.replace(transformer(n_blocks - 1), only_cross_attention=False)
        x = UNetMidBlock2DCrossAttn(mid_resnet, mid_attention, dtype, name="mid_block")(x, temb, context)

        for i, kind in enumerate(cfg.up_block_types):
            j = n_blocks - 1 - i  # the down block this up block mirrors
            n_layers = cfg.layers_per_block[j] + 1
            block_skips, skips = skips[-n_layers:], skips[:-n_layers]
            is_last = i == n_blocks - 1
            x = UpBlock2D(cfg.block_out_channels[j], n_layers, resnet, transformer(j) if kind == _CROSS_UP else None,
                          add_upsample=not is_last, dtype=dtype, name=f"up_blocks.{i}")(
                x, block_skips, temb, context, upsample_size=None if is_last else skips[-1].shape[1:3])

        x = ACTIVATIONS[cfg.act_fn](group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(x))
        x = SownConv(cfg.out_channels, (cfg.conv_out_kernel,) * 2, padding=(cfg.conv_out_kernel - 1) // 2,
                     dtype=dtype, name="conv_out")(x)
        return x.astype(sample.dtype)


def example_inputs(config: UNetConfig, batch: int = 1, tokens: int = 77) -> tuple[jax.Array, ...]:
    """Zeros shaped like one evaluation's inputs: latents (b, side, side, c), a timestep, context (b, tokens, d),
    and for SDXL a pooled text embedding and 6 time ids (only their total width shapes the parameters)."""
    side = config.sample_size
    inputs = (jnp.zeros((batch, side, side, config.in_channels)), jnp.zeros(()),
              jnp.zeros((batch, tokens, config.cross_attention_dim)))
    if config.addition_embed_type != "text_time":
        return inputs
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return (*inputs, jnp.zeros((batch, pooled)), jnp.zeros((batch, 6)))
