"""Flax FLUX.1 (schnell, dev): diffusers' FluxTransformer2DModel, numerically matching it.

The module takes latents (b, H, W, 16) and packs each 2x2 patch into one 64-wide token (`x_embedder`), as
FluxPipeline packs them before calling the transformer and unpacks after; the velocity comes back as latents.
The timestep (sigma in [0, 1], multiplied by 1000 inside, as diffusers), the pooled CLIP-L output and, for
FLUX.1-dev (`guidance_embeds`), the guidance scale make one conditioning vector (`time_text_embed`); T5's
states pass `context_embedder`. Positions are rotary, over three axes (`axes_dims_rope`): the text tokens'
ids are zeros, an image token's are (0, row, column) of its packed grid; the text tokens come first.

`num_layers` double-stream blocks (`transformer_blocks.{i}`, SD3's JointTransformerBlock with qk RMS-norm
and the text stream first) keep image and text apart; `num_single_layers` single-stream blocks
(`single_transformer_blocks.{i}`) run one attention and one MLP side by side over [text; image].
`norm_out` (continuous adaLN) and `proj_out` end it.

Sites (sown `output`s, tokens (b, n, d)): `x_embedder`, `context_embedder`, `time_text_embed.*`; for each
block, double or single, `{block}` (the image tokens it returns) and `{block}.context` (the text tokens it
returns: a single block's joint sequence split back), with `{block}.context.input` sown for the text stream's
derived sites; inside, `attn` / `attn.context` (a double block's attention outputs, per stream), `ff`,
`ff_context`, and a single block's `attn` (its joint heads before `proj_out`); `norm_out`, `proj_out`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.errors import CheckpointError
from jaxprobe.models.layers import SownDense, rotary_tables
from jaxprobe.models.patches import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    PatchTransformerShape,
    TimestepTextEmbedding,
    pack_patches,
    unpatchify,
)
from jaxprobe.models.sd3 import JointAttention, JointTransformerBlock

BLOCK_SITES = (r"x_embedder", r"context_embedder", r"transformer_blocks\.\d+", r"transformer_blocks\.\d+\.context",
               r"single_transformer_blocks\.\d+", r"single_transformer_blocks\.\d+\.context", r"norm_out")
CLASS_NAMES = ("FluxTransformer2DModel",)
PACK = 2            # FluxPipeline packs 2x2 latent patches into one token
ROPE_THETA = 10_000
# FluxPipeline's max_sequence_length default (dev and schnell alike; schnell was trained with 256 and its model
# card passes 256); also the T5 tokenizer's padded length when loading a FLUX folder.
T5_SEQUENCE_LENGTH = 512
DEFAULT_GUIDANCE_SCALE = 3.5   # FluxPipeline's guidance_scale default, what FLUX.1-dev embeds

# The public config.json field values of black-forest-labs/FLUX.1-schnell and FLUX.1-dev (transformer/,
# scheduler/, vae/), for a full-size random-weights model.
FLUX_SCHNELL_TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
FLUX_DEV_TRANSFORMER: dict[str, Any] = {**FLUX_SCHNELL_TRANSFORMER, "guidance_embeds": True}
FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
    "use_dynamic_shifting": False}
FLUX_DEV_SCHEDULER: dict[str, Any] = {**FLUX_SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3,
    "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


@dataclass(frozen=True)
class FluxConfig(PatchTransformerShape):
    """The fields of diffusers' FluxTransformer2DModel config.json, with its defaults (FLUX.1-schnell).

    sample_size is not in the checkpoint: FluxPipeline's default_sample_size, the latent side of a 1024 px image."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    sample_size: int = 128
    qk_norm: str = "rms_norm"   # every FLUX attention normalises queries and keys (JointAttention reads it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.patch_size != 1:
            raise CheckpointError(f"FLUX config: patch_size {self.patch_size} is not implemented; FluxPipeline packs "
                                  "2x2 latent patches itself and its transformers take patch_size 1")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise CheckpointError(f"FLUX config: axes_dims_rope {list(self.axes_dims_rope)} must add up to "
                                  f"attention_head_dim {self.attention_head_dim}: the rotary axes split each head")
        if self.in_channels % (PACK * PACK) or self.output_channels % (PACK * PACK):
            raise CheckpointError(f"FLUX config: in/out channels {self.in_channels}/{self.output_channels} must be "
                                  f"2x2 packed latents (multiples of {PACK * PACK})")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "FluxConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"qk_norm"}
        return cls(**{k: v for k, v in cfg.items() if k in names and (v is not None or k == "out_channels")})

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels: a packed token holds a 2x2 patch of them."""
        return self.in_channels // (PACK * PACK)



def bottleneck(config: FluxConfig) -> str:
    """The h-space site: the middle block of the whole stack, double then single (block 28 of FLUX.1's 19 + 38:
    single_transformer_blocks.9)."""
    middle = (config.num_layers + config.num_single_layers) // 2
    return (f"transformer_blocks.{middle}" if middle < config.num_layers
            else f"single_transformer_blocks.{middle - config.num_layers}")


def image_ids(height: int, width: int) -> np.ndarray:
    """(height*width, 3) rotary ids of a packed token grid, row-major: (0, row, column), FluxPipeline's
    `_prepare_latent_image_ids`."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


class FluxSingleTransformerBlock(nn.Module):
    """diffusers' FluxSingleTransformerBlock: one adaLN-Zero (`norm`, shift/scale/gate) of the joint sequence
    [text; image], attention (heads only, `attn`) beside a tanh-GELU MLP (`proj_mlp`), both through one gated
    `proj_out`, residual. Takes and returns (image, text) tokens like a double block, so its sites split the
    same way."""

    config: FluxConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, emb: jax.Array, rotary: tuple[Any, Any] | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        cfg, dtype = self.config, self.dtype
        self.sow("intermediates", "context.input", context)   # for the text stream's derived sites
        m, dim = context.shape[1], x.shape[-1]
        joint = jnp.concatenate([context, x], axis=1)          # (b, text + image, d), text first as diffusers
        h, gate = AdaLayerNormZero(dtype=dtype, single=True, name="norm")(joint, emb=emb)
        mlp = jax.nn.gelu(nn.Dense(4 * dim, dtype=dtype, name="proj_mlp")(h), approximate=True)
        attn, _ = JointAttention(cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm, dtype=dtype,
                                 pre_only=True, name="attn")(h, rotary=rotary)
        out = nn.Dense(dim, dtype=dtype, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        joint = joint + gate[:, None] * out
        context, x = joint[:, :m], joint[:, m:]
        self.sow("intermediates", "output", x)
        self.sow("intermediates", "context", context)
        return x, context


class FluxTransformer2DModel(nn.Module):
    """diffusers' FluxTransformer2DModel, channels last, the 2x2 packing inside. dtype: the compute dtype."""

    config: FluxConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, guidance: jax.Array | float | None = None) -> jax.Array:
        """sample (b, H, W, latent_channels), H and W even; timesteps scalar or (b,), sigma in [0, 1] (FluxPipeline
        passes t / 1000); encoder_hidden_states (b, tokens, joint_attention_dim), T5's; pooled_projections (b,
        pooled_projection_dim), CLIP's pooled output; guidance scalar or (b,), the guidance scale (FLUX.1-dev only).
        Returns the velocity (b, H, W, output_channels / 4) in the dtype of `sample`."""
        cfg, dtype = self.config, self.dtype
        b, height, width, _ = sample.shape
        if height % PACK or width % PACK:
            raise ValueError(f"latents of {height}x{width} do not pack into 2x2 patches")
        grid = (height // PACK, width // PACK)
        # diffusers scales by 1000 in the model dtype, after the pipeline's division
        t = jnp.broadcast_to(jnp.asarray(timesteps, dtype), (b,)) * 1000
        g = None if guidance is None else jnp.broadcast_to(jnp.asarray(guidance, dtype), (b,)) * 1000
        x = SownDense(cfg.width, dtype=dtype, name="x_embedder")(pack_patches(sample.astype(dtype), PACK))
        emb = TimestepTextEmbedding(cfg.width, dtype, cfg.guidance_embeds, name="time_text_embed")(
            t, pooled_projections, g)
        context = SownDense(cfg.width, dtype=dtype, name="context_embedder")(encoder_hidden_states.astype(dtype))
        ids = np.concatenate([np.zeros((context.shape[1], 3), np.float32), image_ids(*grid)])   # text ids first
        rotary = rotary_tables(ids, cfg.axes_dims_rope, ROPE_THETA)
        for i in range(cfg.num_layers):
            x, context = JointTransformerBlock(cfg, dtype=dtype, context_first=True,
                                               name=f"transformer_blocks.{i}")(x, context, emb, rotary)
        for i in range(cfg.num_single_layers):
            x, context = FluxSingleTransformerBlock(cfg, dtype, name=f"single_transformer_blocks.{i}")(
                x, context, emb, rotary)
        h = AdaLayerNormContinuous(1e-6, dtype, name="norm_out")(x, emb)
        h = SownDense(cfg.output_channels, dtype=dtype, name="proj_out")(h)
        return unpatchify(h, *grid, PACK, channels_first=True).astype(sample.dtype)


def example_inputs(config: FluxConfig, batch: int = 1, tokens: int = T5_SEQUENCE_LENGTH) -> tuple[jax.Array, ...]:
    """Zeros shaped like one evaluation's inputs: latents, a timestep, the pipeline's 512 T5 tokens (what the
    text-stream sites' shapes are checked against), the pooled CLIP output and (dev) a guidance scale."""
    side = config.sample_size
    inputs = (jnp.zeros((batch, side, side, config.latent_channels)), jnp.zeros(()),
              jnp.zeros((batch, tokens, config.joint_attention_dim)), jnp.zeros((batch, config.pooled_projection_dim)))
    return (*inputs, jnp.zeros(())) if config.guidance_embeds else inputs
