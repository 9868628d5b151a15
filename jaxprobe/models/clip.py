"""Flax CLIP text and vision towers, mirroring transformers' module tree.

Parameter paths equal the PyTorch keys of ordinary CLIP checkpoints (`text_model.encoder.layers.3.
self_attn.q_proj`, `vision_model.embeddings.class_embedding`, `text_projection`), so weights load by
`jaxprobe.checkpoints.weights.convert_state_dict`. Every layer sows its output into the `intermediates`
collection; a site's name is its module path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import CheckpointError
from jaxprobe.models.layers import ACTIVATIONS, SownDense, SownLayerNorm, multi_head_attention

# Sites a wildcard reaches without naming a deeper path (see jaxprobe.pipeline.sites).
BLOCK_SITES = (
    r"(text|vision)_model\.(embeddings|pre_layrnorm|encoder\.layers\.\d+|final_layer_norm|post_layernorm)",
    r"text_projection", r"visual_projection",
)


def _tower_config(cls, cfg: dict[str, Any], with_projection: bool):
    """A text or vision config from transformers' config.json; projection_dim only when the
    checkpoint has the projection layer (transformers writes the field either way)."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in cfg.items() if k in names}
    fields["projection_dim"] = (fields.get("projection_dim") or 512) if with_projection else None
    config = cls(**fields)
    if config.hidden_act not in ACTIVATIONS:
        raise CheckpointError(f"unsupported hidden_act {config.hidden_act!r} in the CLIP config; "
                              f"jaxprobe knows {sorted(ACTIVATIONS)}")
    return config


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None  # None: no text_projection in the checkpoint

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, with_projection: bool = False) -> "CLIPTextConfig":
        return _tower_config(cls, cfg, with_projection)


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, with_projection: bool = False) -> "CLIPVisionConfig":
        return _tower_config(cls, cfg, with_projection)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPAttention(nn.Module):
    num_heads: int
    causal: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (b, n, d) -> (b, n, d)
        dim = x.shape[-1]
        q, k, v = (nn.Dense(dim, dtype=self.dtype, name=n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        out = multi_head_attention(q, k, v, num_heads=self.num_heads, is_causal=self.causal)
        out = nn.Dense(dim, dtype=self.dtype, name="out_proj")(out)
        self.sow("intermediates", "output", out)
        return out


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        h = CLIPAttention(cfg.num_attention_heads, self.causal, self.dtype, name="self_attn")(norm("layer_norm1")(x))
        x = x + h
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="mlp.fc1")(norm("layer_norm2")(x))
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="mlp.fc2")(ACTIVATIONS[cfg.hidden_act](h))
        self.sow("intermediates", "mlp", h)
        x = x + h
        self.sow("intermediates", "output", x)
        return x


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.causal, self.dtype, name=f"layers.{i}")(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:  # (b, n) -> (b, n, d)
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        x = tokens + positions[None]
        self.sow("intermediates", "output", x)
        return x


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(b, n) -> (b,): where transformers pools. Legacy configs (eos_token_id == 2, e.g. SD 1.x's text
    encoder) take the argmax id, which is EOS because it is the last entry of CLIP's vocabulary."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    """The `text_model` (+ optional `text_projection`) of CLIPTextModel[WithProjection] or CLIPModel."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        cfg = self.config
        x = CLIPTextEmbeddings(cfg, self.dtype, name="text_model.embeddings")(input_ids)
        x = CLIPEncoder(cfg, True, self.dtype, name="text_model.encoder")(x)
        last = SownLayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="text_model.final_layer_norm")(x)
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]  # (b, d)
        out = {"last_hidden_state": last, "pooler_output": pooled}
        if cfg.projection_dim is not None:
            embeds = SownDense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
            out["text_embeds"] = embeds
        return out


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:  # (b, H, W, 3) -> (b, 1 + patches, d)
        cfg = self.config
        patches = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                          padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding")(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5), (cfg.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, cfg.hidden_size))
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(cfg.num_positions))
        x = jnp.concatenate([cls, patches], axis=1) + positions[None]
        self.sow("intermediates", "output", x)
        return x


class CLIPVisionModel(nn.Module):
    """The `vision_model` (+ optional `visual_projection`) of CLIPVisionModel[WithProjection] or CLIPModel."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        """pixel_values: (b, H, W, 3), already normalised (see `preprocess_images`)."""
        cfg = self.config
        norm = lambda name: SownLayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="vision_model.embeddings")(pixel_values)
        last = CLIPEncoder(cfg, False, self.dtype, name="vision_model.encoder")(norm("vision_model.pre_layrnorm")(x))
        pooled = norm("vision_model.post_layernorm")(last[:, 0])
        out = {"last_hidden_state": last, "pooler_output": pooled}
        if cfg.projection_dim is not None:
            embeds = SownDense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
            out["image_embeds"] = embeds
        return out


# ---------------------------------------------------------------------------------------------
# Image preprocessing, as CLIPImageProcessor does it but in JAX (so it can sit inside a jitted
# generate -> embed program).

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    size: int = 224          # shortest side after resizing
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ImagePreprocess":
        """From a preprocessor_config.json (CLIPImageProcessor)."""
        size = cfg.get("size", 224)
        crop = cfg.get("crop_size", size)
        size = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size
        crop = crop.get("height", 224) if isinstance(crop, dict) else crop
        return cls(size=int(size), crop_size=int(crop),
                   mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)))


def preprocess_images(images: jax.Array, spec: ImagePreprocess = ImagePreprocess()) -> jax.Array:
    """(b, H, W, 3) floats in [0, 1] -> (b, crop, crop, 3) CLIP pixel values.

    Bicubic, antialiased resize of the shortest side to `spec.size`, centre crop, normalisation.
    Differs from PIL's resampling in the last bits; CLIP embeddings agree to ~1e-3.
    """
    b, h, w, c = images.shape
    scale = spec.size / min(h, w)
    nh, nw = max(spec.size, round(h * scale)), max(spec.size, round(w * scale))
    resized = jax.image.resize(images.astype(jnp.float32), (b, nh, nw, c), method="bicubic", antialias=True)
    top, left = (nh - spec.crop_size) // 2, (nw - spec.crop_size) // 2
    crop = resized[:, top:top + spec.crop_size, left:left + spec.crop_size]
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    return (jnp.clip(crop, 0.0, 1.0) - mean) / std


def example_inputs(config: CLIPTextConfig | CLIPVisionConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zeros shaped like a tower's inputs: token ids (b, positions) or images (b, size, size, channels)."""
    if isinstance(config, CLIPTextConfig):
        return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels)),)
