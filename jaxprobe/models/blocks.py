"""Blocks that diffusers' UNet2DConditionModel and AutoencoderKL share, in Flax.

Each module carries the name of the PyTorch module it mirrors (`resnets.0`, `attentions.1`,
`transformer_blocks.0.attn2`, `to_out.0`, `downsamplers.0`), so a parameter's path joined by dots is
its checkpoint key and a sown activation's path is its capture site.

Layout and numerics:
- Channels last throughout: images (batch, height, width, channels), tokens (batch, tokens, dim).
- PyTorch's 1x1 convolutions (resnet `conv_shortcut`, SD 1.x's Transformer2DModel `proj_in`/`proj_out`,
  the VAE's quant convs) are `nn.Dense` over the channel axis: on NHWC the same maths, one matmul, and
  `weights.convert_state_dict` squeezes their (out, in, 1, 1) kernels. That is also why SD 2.x's
  `use_linear_projection` needs no branch here.
- `dtype` is the compute dtype. Group/layer norm statistics are reduced in float32 whatever it is
  (flax's default), as diffusers' half-precision numerics need; timestep embeddings are computed in
  float32 before the cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.models.layers import ACTIVATIONS, attention_probs, multi_head_attention

Dtype = Any
FEED_FORWARD_ACTIVATIONS = ("geglu", "gelu-approximate", "gelu")   # diffusers' activation_fn names


@dataclass(frozen=True)
class ResnetSpec:
    """What every ResnetBlock2D of one block shares (diffusers' resnet_groups/_eps/_act_fn)."""

    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0


@dataclass(frozen=True)
class TransformerSpec:
    """The Transformer2DModel of one cross-attention block.

    num_heads: heads per attention layer (what diffusers' UNet configs call `attention_head_dim`);
    the head size is channels // num_heads.
    """

    num_heads: int
    num_layers: int = 1            # transformer_layers_per_block
    groups: int = 32               # GroupNorm before proj_in
    only_cross_attention: bool = False
    upcast_attention: bool = False


def conv(features: int, kernel: int, dtype: Dtype, name: str, *, stride: int = 1,
         padding: tuple[int, int] | None = None) -> nn.Conv:
    """A square conv padded like PyTorch's `padding=(kernel - 1) // 2`, or by (before, after) per side."""
    pad = ((kernel - 1) // 2,) * 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=(pad, pad), dtype=dtype, name=name)


class SownConv(nn.Conv):
    """A Conv that is itself a capture site (the UNet's conv_in and conv_out)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        self.sow("intermediates", "output", y)
        return y


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding (b,) -> (b, dim), float32, as diffusers' `get_timestep_embedding`.

    Timesteps may be fractional. flip_sin_to_cos puts the cosines first; freq_shift is diffusers'
    `downscale_freq_shift`.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]  # (b, half)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 on the sinusoidal embedding."""

    features: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:  # (b, c0) -> (b, features)
        h = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(t_emb)
        h = nn.Dense(self.features, dtype=self.dtype, name="linear_2")(ACTIVATIONS[self.act_fn](h))
        self.sow("intermediates", "output", h)
        return h


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(b, h, w, c) -> (b, H, W, c) as torch's `F.interpolate(mode="nearest")`.

    Output row i reads input row floor(i * h / H) (the ratio in float32, as torch computes it).
    """
    b, h, w, c = x.shape
    if tuple(size) == (2 * h, 2 * w):  # the usual case: a broadcast, fused into the conv that follows
        return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)

    def source(n_out: int, n_in: int) -> np.ndarray:
        idx = np.floor(np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(np.int32)
        return np.minimum(idx, n_in - 1)

    return x[:, source(size[0], h)][:, :, source(size[1], w)]


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, the time embedding added in between, a residual (1x1 projected
    when the channel count changes). Without `temb` (the VAE) there is no time_emb_proj."""

    out_channels: int
    spec: ResnetSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        spec, act = self.spec, ACTIVATIONS[self.spec.act_fn]
        h = act(group_norm(spec.groups, spec.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))  # (b, c)
            h = h + t[:, None, None, :]
        h = act(group_norm(spec.groups, spec.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Dense(self.out_channels, dtype=self.dtype, name="conv_shortcut")(x)
        out = (x + h) / spec.output_scale_factor
        self.sow("intermediates", "output", out)
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=1 pads every side (UNet); padding=0 pads only bottom and right,
    as diffusers does for the VAE encoder."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = (self.padding, self.padding) if self.padding else (0, 1)
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size` when the skip connection is odd-sized), 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


class Attention(nn.Module):
    """diffusers' `Attention`: to_q/to_k/to_v, fused multi-head attention, to_out.0.

    Self-attention when `context` is None, cross-attention over `context` (b, tokens, d) otherwise;
    cross-attention also sows its softmax probabilities averaged over heads, (b, queries, tokens).
    The VAE's variant adds a GroupNorm in front (`norm_groups`) and a residual connection.
    """

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-5
    residual: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None
                 ) -> jax.Array:  # (b, n, c); context_mask (b, tokens), True where a token may be attended
        inner = self.num_heads * self.head_dim
        h = x if self.norm_groups is None else group_norm(self.norm_groups, self.norm_eps, self.dtype, "group_norm")(x)
        source = h if context is None else context
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("to_q", self.qkv_bias)(h)       # (b, n, inner)
        k = dense("to_k", self.qkv_bias)(source)  # (b, tokens, inner)
        v = dense("to_v", self.qkv_bias)(source)
        out = multi_head_attention(q, k, v, num_heads=self.num_heads, upcast=self.upcast, key_mask=context_mask)
        out = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out.0")(out)
        if self.residual:
            out = out + x
        self.sow("intermediates", "output", out)
        if context is not None and self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "probs", attention_probs(q, k, num_heads=self.num_heads, key_mask=context_mask))
        return out


class FeedForward(nn.Module):
    """diffusers' FeedForward: net.0.proj, the activation, net.2.

    activation_fn as diffusers names it: "geglu" (the UNets: net.0.proj to 2 x inner, x * gelu(gate)),
    "gelu-approximate" (DiT, PixArt: tanh GELU) or "gelu"."""

    mult: int = 4
    activation_fn: str = "geglu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        if self.activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"FeedForward activation_fn {self.activation_fn!r} is not one of "
                             f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
        if self.activation_fn == "geglu":
            h, gate = jnp.split(nn.Dense(2 * self.mult * dim, dtype=self.dtype, name="net.0.proj")(x), 2, axis=-1)
            h = h * jax.nn.gelu(gate, approximate=False)
        else:
            h = nn.Dense(self.mult * dim, dtype=self.dtype, name="net.0.proj")(x)
            h = jax.nn.gelu(h, approximate=self.activation_fn == "gelu-approximate")
        out = nn.Dense(dim, dtype=self.dtype, name="net.2")(h)
        self.sow("intermediates", "output", out)
        return out


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (attn1), cross-attention (attn2), GEGLU feed-forward, each residual.
    With only_cross_attention, attn1 attends to the context too."""

    num_heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # (b, n, c), (b, tokens, d)
        norm = lambda name: nn.LayerNorm(1e-5, dtype=self.dtype, name=name)  # noqa: E731
        attn = lambda name: Attention(self.num_heads, self.head_dim, upcast=self.upcast_attention,  # noqa: E731
                                      dtype=self.dtype, name=name)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(norm("norm2")(x), context)
        x = x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))
        self.sow("intermediates", "output", x)
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the h*w tokens, proj_out, residual."""

    spec: TransformerSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # (b, h, w, c), (b, tokens, d)
        b, height, width, c = x.shape
        spec = self.spec
        head_dim = c // spec.num_heads
        inner = spec.num_heads * head_dim
        h = group_norm(spec.groups, 1e-6, self.dtype, "norm")(x)
        h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h).reshape(b, height * width, inner)
        for j in range(spec.num_layers):
            h = BasicTransformerBlock(spec.num_heads, head_dim, spec.only_cross_attention, spec.upcast_attention,
                                      self.dtype, name=f"transformer_blocks.{j}")(h, context)
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, height, width, c)
        out = h + x
        self.sow("intermediates", "output", out)
        return out


class DownBlock2D(nn.Module):
    """diffusers' DownBlock2D; CrossAttnDownBlock2D when `transformer` is set; the VAE's
    DownEncoderBlock2D when called without `temb` (and downsample_padding=0).

    Returns the block output and the skip connections it contributes to the UNet's up path.
    """

    out_channels: int
    num_layers: int
    resnet: ResnetSpec
    transformer: TransformerSpec | None = None
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, context: jax.Array | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.resnet, self.dtype, name=f"resnets.{i}")(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.dtype, name=f"attentions.{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers.0")(x)
            skips.append(x)
        self.sow("intermediates", "output", x)
        return x, tuple(skips)


class UpBlock2D(nn.Module):
    """diffusers' UpBlock2D; CrossAttnUpBlock2D when `transformer` is set; the VAE's UpDecoderBlock2D
    when called without `skips` and `temb`.

    skips: the down path's outputs this block consumes, the last one first (concatenated on channels
    before each resnet). upsample_size: the spatial size to upsample to (the next skip's), when the
    input was odd-sized.
    """

    out_channels: int
    num_layers: int
    resnet: ResnetSpec
    transformer: TransformerSpec | None = None
    add_upsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array] | None = None, temb: jax.Array | None = None,
                 context: jax.Array | None = None, upsample_size: tuple[int, int] | None = None) -> jax.Array:
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.resnet, self.dtype, name=f"resnets.{i}")(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.dtype, name=f"attentions.{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers.0")(x, upsample_size)
        self.sow("intermediates", "output", x)
        return x
