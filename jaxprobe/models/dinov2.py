"""Flax DINOv2 image encoder, mirroring the checkpoints of transformers' Dinov2Model.

Parameter paths equal the keys Dinov2Model checkpoints hold on disk (`embeddings.cls_token`,
`embeddings.patch_embeddings.projection`, `encoder.layer.3.attention.attention.query`,
`encoder.layer.3.attention.output.dense`, `encoder.layer.3.layer_scale1.lambda1`, `encoder.layer.3.mlp.fc1`
or, with SwiGLU, the fused `mlp.weights_in`/`mlp.weights_out`, `layernorm`), so weights load by
`jaxprobe.checkpoints.weights.convert_state_dict`. The embeddings, every layer and the final layernorm sow
their output (b, 1 + patches, d): as a pipeline's `image_encoder` the sites are `image_encoder.encoder.layer.{i}`,
reduced to the CLS token ("cls") or the mean of the patch tokens ("mean_patch").

The checkpoint's `mask_token` (iBOT's masked-patch training) never enters a forward pass and is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import CheckpointError
from jaxprobe.models.layers import ACTIVATIONS, SownLayerNorm, multi_head_attention

BLOCK_SITES = (r"(embeddings|encoder\.layer\.\d+|layernorm)",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> Dinov2Config:
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in cfg.items() if k in names})
        if config.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"unsupported hidden_act {config.hidden_act!r} in the DINOv2 config; "
                                  f"jaxprobe knows {sorted(ACTIVATIONS)}")
        return config

    @property
    def mlp_features(self) -> int:
        """Hidden width of the MLP, or of each SwiGLU half (two thirds of it, rounded up to a multiple of 8)."""
        width = int(self.hidden_size * self.mlp_ratio)
        return (int(width * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else width

    @property
    def grid(self) -> int:
        """Patches per side at the configured image size: the grid the position embeddings were trained on."""
        return self.image_size // self.patch_size


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PyTorch's `interpolate(mode="bicubic", align_corners=False)` along one axis.

    transformers resizes DINOv2's position embeddings with it; jax.image.resize's bicubic is Keys' a=-0.5 with
    renormalised borders, PyTorch's is a=-0.75 with clamped indices, which differ by far more than 1e-5.
    Built on the host from static sizes, so it is a constant of the compiled program."""
    a = -0.75

    def cubic(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5   # no clamping for cubic, as torch does
    left = np.floor(source).astype(np.int64)
    frac = source - left
    weights = np.zeros((out_size, in_size))
    for tap in range(-1, 3):
        index = np.clip(left + tap, 0, in_size - 1)
        np.add.at(weights, (np.arange(out_size), index), cubic(frac - tap))
    return weights.astype(np.float32)


def interpolate_positions(positions: jax.Array, grid: int, height: int, width: int) -> jax.Array:
    """Patch position embeddings (1, grid*grid, d) -> (1, height*width, d), resized as transformers'
    `interpolate_pos_encoding` does (bicubic, in float32)."""
    d = positions.shape[-1]
    table = positions.reshape(grid, grid, d).astype(jnp.float32)
    rows, cols = torch_bicubic_matrix(grid, height), torch_bicubic_matrix(grid, width)
    resized = jnp.einsum("hi,ijd,wj->hwd", rows, table, cols, precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(1, height * width, d).astype(positions.dtype)


class Dinov2Embeddings(nn.Module):
    config: Dinov2Config
    dtype: Any

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:  # (b, H, W, c) -> (b, 1 + patches, d)
        cfg = self.config
        p, d = cfg.patch_size, cfg.hidden_size
        patches = nn.Conv(d, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                          name="patch_embeddings.projection")(pixels)
        b, h, w, _ = patches.shape
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
        positions = self.param("position_embeddings", nn.initializers.normal(0.02), (1, cfg.grid ** 2 + 1, d))
        patch_positions = positions[:, 1:]
        if (h, w) != (cfg.grid, cfg.grid):  # another image size: the trained grid, resized
            patch_positions = interpolate_positions(patch_positions, cfg.grid, h, w)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(patches.dtype),
                                  patches.reshape(b, h * w, d)], axis=1)
        x = tokens + jnp.concatenate([positions[:, :1], patch_positions], axis=1).astype(patches.dtype)
        self.sow("intermediates", "output", x)
        return x


class Dinov2SelfAttention(nn.Module):
    config: Dinov2Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda name, bias=cfg.qkv_bias: nn.Dense(cfg.hidden_size, use_bias=bias, dtype=self.dtype,
                                                         name=name)
        q, k, v = (dense(f"attention.{n}")(x) for n in ("query", "key", "value"))
        out = multi_head_attention(q, k, v, num_heads=cfg.num_attention_heads)
        return dense("output.dense", True)(out)


class Dinov2MLP(nn.Module):
    """fc1 -> act -> fc2, or SwiGLU: `weights_in` holds gate and value side by side, silu(gate) * value."""

    config: Dinov2Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if cfg.use_swiglu_ffn:
            gate, value = jnp.split(nn.Dense(2 * cfg.mlp_features, dtype=self.dtype, name="weights_in")(x), 2, axis=-1)
            return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="weights_out")(jax.nn.silu(gate) * value)
        h = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.mlp_features, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class Dinov2Layer(nn.Module):
    """Pre-norm block; LayerScale multiplies each residual branch by a learned per-channel `lambda1`."""

    config: Dinov2Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name=name)
        scale = lambda name: self.param(name, nn.initializers.ones, (cfg.hidden_size,)).astype(self.dtype)
        x = x + Dinov2SelfAttention(cfg, self.dtype, name="attention")(norm("norm1")(x)) * scale("layer_scale1.lambda1")
        x = x + Dinov2MLP(cfg, self.dtype, name="mlp")(norm("norm2")(x)) * scale("layer_scale2.lambda1")
        self.sow("intermediates", "output", x)
        return x


class Dinov2Model(nn.Module):
    """transformers' Dinov2Model: normalised pixels (b, H, W, 3) -> {"last_hidden_state", "pooler_output"}.

    Any H, W: the position embeddings are resized when the patch grid differs from the configured one."""

    config: Dinov2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        cfg = self.config
        x = Dinov2Embeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        for i in range(cfg.num_hidden_layers):
            x = Dinov2Layer(cfg, self.dtype, name=f"encoder.layer.{i}")(x)
        last = SownLayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
        return {"last_hidden_state": last, "pooler_output": last[:, 0]}


def example_inputs(config: Dinov2Config, batch: int = 1) -> tuple[jax.Array]:
    """Zeros shaped like images at the configured size (b, size, size, channels)."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels)),)
