"""Flax AutoencoderKL (Stable Diffusion's VAE), numerically matching diffusers.

Images and latents are NHWC; images in [-1, 1]; latents *unscaled* (multiply by
`config.scaling_factor` before the UNet, divide before `decode`, as diffusers' pipelines do).
Capture sites (sown `output`s): encoder.down_blocks.{i}, encoder.mid_block, decoder.mid_block,
decoder.up_blocks.{i}, and inside them every resnet and the mid-block attention.

Old checkpoints name the mid-block attention `query/key/value/proj_attn` (sometimes with 1x1-conv
kernels); `vae_state_dict_to_params` renames them as diffusers does on load.
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
    Attention,
    DownBlock2D,
    ResnetBlock2D,
    ResnetSpec,
    UpBlock2D,
    conv,
    group_norm,
)
from jaxprobe.models.layers import ACTIVATIONS

# Sites a wildcard reaches without naming a deeper path (see jaxprobe.pipeline.sites).
BLOCK_SITES = (r"encoder\.(down_blocks\.\d+|mid_block)", r"decoder\.(mid_block|up_blocks\.\d+)")

_EPS = 1e-6  # every norm of diffusers' VAE Encoder/Decoder, whatever the config says


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' vae/config.json that SD 1.x/2.x use, with diffusers' defaults.

    scaling_factor and shift_factor are for the pipeline (latents = (mean - shift) * scale); the
    model itself never applies them.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        bad = ([t for t in self.down_block_types if t != "DownEncoderBlock2D"]
               + [t for t in self.up_block_types if t != "UpDecoderBlock2D"])
        if bad:
            raise CheckpointError(f"VAE config: unsupported block type(s) {bad}; jaxprobe implements "
                                  "DownEncoderBlock2D and UpDecoderBlock2D (SD 1.x/2.x)")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise CheckpointError(f"VAE config: {len(self.down_block_types)} down and {len(self.up_block_types)} "
                                  f"up block types for {n} block_out_channels")
        if self.act_fn not in ACTIVATIONS:
            raise CheckpointError(f"VAE config: unsupported act_fn {self.act_fn!r}; known: {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """From diffusers' vae/config.json. Keys neither side knows are ignored, as diffusers does."""
        per_channel = [k for k in ("latents_mean", "latents_std") if cfg.get(k) is not None]
        if per_channel:
            raise CheckpointError(f"VAE config sets {per_channel}: per-channel latent normalisation "
                                  "(SDXL-era VAEs) is not supported; jaxprobe runs SD 1.x/2.x VAEs")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})


class UNetMidBlock2D(nn.Module):
    """resnets.0, attentions.0 (one head over all channels, GroupNorm in front, residual), resnets.1."""

    resnet: ResnetSpec
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = ResnetBlock2D(c, self.resnet, self.dtype, name="resnets.0")(x)
        if self.add_attention:
            attention = Attention(1, c, qkv_bias=True, norm_groups=self.resnet.groups, norm_eps=self.resnet.eps,
                                  residual=True, dtype=self.dtype, name="attentions.0")
            x = attention(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        x = ResnetBlock2D(c, self.resnet, self.dtype, name="resnets.1")(x)
        self.sow("intermediates", "output", x)
        return x


class Encoder(nn.Module):
    """conv_in, down blocks (stride-2 convs between them), mid block, norm-act-conv to 2 x latent channels."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:  # (b, H, W, in) -> (b, h, w, 2 * latent)
        cfg, channels = self.config, self.config.block_out_channels
        resnet = ResnetSpec(cfg.norm_num_groups, _EPS, cfg.act_fn)
        x = conv(channels[0], 3, self.dtype, "conv_in")(images)
        for i, c in enumerate(channels):
            x, _ = DownBlock2D(c, cfg.layers_per_block, resnet, add_downsample=i < len(channels) - 1,
                               downsample_padding=0, dtype=self.dtype, name=f"down_blocks.{i}")(x)
        x = UNetMidBlock2D(resnet, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = ACTIVATIONS[cfg.act_fn](group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (nearest x2 + conv between them), norm-act-conv to image channels."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:  # (b, h, w, latent) -> (b, H, W, out)
        cfg, channels = self.config, self.config.block_out_channels[::-1]
        resnet = ResnetSpec(cfg.norm_num_groups, _EPS, cfg.act_fn)
        x = conv(channels[0], 3, self.dtype, "conv_in")(z)
        x = UNetMidBlock2D(resnet, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, c in enumerate(channels):
            x = UpBlock2D(c, cfg.layers_per_block + 1, resnet, add_upsample=i < len(channels) - 1,
                          dtype=self.dtype, name=f"up_blocks.{i}")(x)
        x = ACTIVATIONS[cfg.act_fn](group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """`encode` and `decode` are the entry points (`model.apply(params, x, method="decode")`);
    `__call__` (encode, then decode the mean) exists to initialise every parameter."""

    config: VAEConfig
    dtype: Any = jnp.float32  # compute dtype; normalisation statistics stay float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        # 1x1 convs in the checkpoint (see jaxprobe.models.blocks)
        self.quant_conv = nn.Dense(2 * cfg.latent_channels, dtype=self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Dense(cfg.latent_channels, dtype=self.dtype) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(b, H, W, 3) in [-1, 1] -> the posterior's mean and log-variance, each (b, h, w, latent),
        in the dtype of `images`; log-variance clipped to [-30, 20] as diffusers does."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(images.dtype), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (b, h, w, latent) -> images (b, H, W, 3), in the dtype of `latents`."""
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z).astype(latents.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


def example_inputs(config: VAEConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zeros shaped like an image batch (b, sample_size, sample_size, in_channels)."""
    side = config.sample_size
    return (jnp.zeros((batch, side, side, config.in_channels)),)
