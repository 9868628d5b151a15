"""Flax Stable Diffusion 3 / 3.5 MMDiT: diffusers' SD3Transformer2DModel, numerically matching it.

Latents (b, H, W, 16) become patch tokens with sin-cos positions cropped from one `pos_embed_max_size` table
(`pos_embed`); the timestep and the pooled CLIP projections make one conditioning vector (`time_text_embed`);
the text tokens (CLIP-L and bigG penultimate states beside T5's) pass `context_embedder`. Every joint block
("MMDiT") keeps two streams, image and text, each with its own adaLN-Zero norms, projections and feed-forward,
and one attention over their concatenation (image tokens first); SD3.5 normalises queries and keys per head
(`qk_norm="rms_norm"`) and SD3.5-M's first blocks add a second, image-only attention (`attn2`, "dual
attention"). The last block updates the image stream only (`context_pre_only`). A continuous adaptive norm
(`norm_out`) and `proj_out` unpatchify. The prediction is a flow-matching velocity.

Sites (sown `output`s, tokens (b, n, d)): `pos_embed`, `context_embedder`, `time_text_embed.*`, and for each
block `transformer_blocks.{i}` (the image tokens it returns) and `transformer_blocks.{i}.context` (the text
tokens it returns; none for the last block), inside them `attn` / `attn.context` (the joint attention's image
and text outputs), `attn2`, `ff`, `ff_context`; `norm_out`. `transformer_blocks.{i}.context` has derived
`.input`/`.contribution` sites like any module: the block sows the text tokens it was given as `context.input`.
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
from jaxprobe.models.blocks import FeedForward
from jaxprobe.models.layers import SownDense, apply_rotary, multi_head_attention
from jaxprobe.models.patches import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    PatchEmbed,
    PatchTransformerShape,
    TimestepTextEmbedding,
    modulate,
    plain_layer_norm,
    unpatchify,
)

BLOCK_SITES = (r"pos_embed", r"context_embedder", r"transformer_blocks\.\d+", r"transformer_blocks\.\d+\.context",
               r"norm_out")
CLASS_NAMES = ("SD3Transformer2DModel",)
QK_NORMS = (None, "rms_norm")
# StableDiffusion3Pipeline's default max_sequence_length for its T5 tower (text_encoder_3), unmasked and cased,
# unlike PixArt's; also the token count of the zeros that stand in for T5 when a folder has none.
T5_SEQUENCE_LENGTH = 256


@dataclass(frozen=True)
class SD3Config(PatchTransformerShape):
    """The fields of diffusers' SD3Transformer2DModel config.json, with its defaults (SD3-Medium)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise CheckpointError(f"SD3 config: qk_norm {self.qk_norm!r} is not implemented; jaxprobe reads "
                                  f"{', '.join(map(repr, QK_NORMS))}")
        if self.caption_projection_dim != self.width:
            raise CheckpointError(f"SD3 config: caption_projection_dim {self.caption_projection_dim} must equal the "
                                  f"model width heads x head dim = {self.width}: the joint attention mixes both streams")
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "SD3Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names and (v is not None or k in ("qk_norm", "out_channels"))})


def _rms_norm(dtype: Any, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=1e-6, dtype=dtype, name=name)   # diffusers' RMSNorm(head_dim, eps=1e-6)


class JointAttention(nn.Module):
    """diffusers' Attention with JointAttnProcessor2_0: image tokens through to_q/to_k/to_v, text tokens through
    add_q_proj/add_k_proj/add_v_proj, per-head RMS norms of queries and keys where the config asks, one softmax
    over [image; text] keys, outputs split back through to_out.0 and (unless context_pre_only) to_add_out.

    Without `context` it is plain self-attention over the image tokens (SD3.5-M's `attn2`, FLUX's single-stream
    blocks). Sows the image output as `output` and the text output as `context`.

    FLUX's options: context_first orders the joint sequence [text; image], as its rotary positions (text ids
    first) are laid out; `rotary` (cos, sin) (tokens, head_dim) rotates queries and keys after their norms;
    pre_only (the single-stream blocks) returns the heads without `to_out.0`, the block projecting them."""

    num_heads: int
    head_dim: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    dtype: Any = jnp.float32
    context_first: bool = False
    pre_only: bool = False

    def _qkv(self, x: jax.Array, names: tuple[str, str, str], norms: tuple[str, str]) -> tuple[jax.Array, ...]:
        inner = self.num_heads * self.head_dim
        q, k, v = (nn.Dense(inner, dtype=self.dtype, name=name)(x) for name in names)
        if self.qk_norm is not None:
            b, n, _ = q.shape
            per_head = lambda t, name: _rms_norm(self.dtype, name)(  # noqa: E731
                t.reshape(b, n, self.num_heads, self.head_dim)).reshape(b, n, inner)
            q, k = per_head(q, norms[0]), per_head(k, norms[1])
        return q, k, v

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, rotary: tuple[Any, Any] | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        n = x.shape[1]
        m = 0 if context is None else context.shape[1]
        if context is not None:
            cq, ck, cv = self._qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            pairs = ((cq, q), (ck, k), (cv, v)) if self.context_first else ((q, cq), (k, ck), (v, cv))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in pairs)
        if rotary is not None:
            q, k = (apply_rotary(t, rotary, self.num_heads) for t in (q, k))
        out = multi_head_attention(q, k, v, num_heads=self.num_heads)
        image_part, text_part = (out[:, m:], out[:, :m]) if self.context_first else (out[:, :n], out[:, n:])
        image = image_part if self.pre_only else nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out.0")(image_part)
        self.sow("intermediates", "output", image)
        if context is None or self.context_pre_only:
            return image, None
        text = nn.Dense(context.shape[-1], dtype=self.dtype, name="to_add_out")(text_part)
        self.sow("intermediates", "context", text)
        return image, text


class JointTransformerBlock(nn.Module):
    """diffusers' JointTransformerBlock: adaLN-Zero norms for both streams, joint attention, gated feed-forwards.
    Returns (image tokens, text tokens or None after a context_pre_only block).

    FLUX's double-stream FluxTransformerBlock is the same block (config a FluxConfig: qk RMS-norm) with its
    joint sequence text first and rotary positions (`context_first`, `rotary`: see JointAttention)."""

    config: Any   # SD3Config or FluxConfig: num_attention_heads, attention_head_dim, qk_norm
    context_pre_only: bool = False
    dual_attention: bool = False
    dtype: Any = jnp.float32
    context_first: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, emb: jax.Array, rotary: tuple[Any, Any] | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        cfg, dtype = self.config, self.dtype
        self.sow("intermediates", "context.input", context)   # for the text stream's derived sites
        norm1 = AdaLayerNormZero(dual=self.dual_attention, dtype=dtype, name="norm1")(x, emb=emb)
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1[:5]
        if self.context_pre_only:
            c = AdaLayerNormContinuous(1e-6, dtype, name="norm1_context")(context, emb)
        else:
            c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp, _ = AdaLayerNormZero(
                dtype=dtype, name="norm1_context")(context, emb=emb)
        attn = lambda name, pre_only: JointAttention(cfg.num_attention_heads, cfg.attention_head_dim,  # noqa: E731
                                                     cfg.qk_norm, pre_only, dtype, self.context_first, name=name)
        image_attn, text_attn = attn("attn", self.context_pre_only)(h, c, rotary)
        x = x + gate_msa[:, None] * image_attn
        if self.dual_attention:
            h2, gate_msa2 = norm1[6:]
            x = x + gate_msa2[:, None] * attn("attn2", False)(h2)[0]
        h = modulate(plain_layer_norm(1e-6, dtype, "norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(activation_fn="gelu-approximate", dtype=dtype, name="ff")(h)
        self.sow("intermediates", "output", x)
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * text_attn
        c = modulate(plain_layer_norm(1e-6, dtype, "norm2_context")(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * FeedForward(activation_fn="gelu-approximate", dtype=dtype,
                                                              name="ff_context")(c)
        self.sow("intermediates", "context", context)
        return x, context


class SD3Transformer2DModel(nn.Module):
    """diffusers' SD3Transformer2DModel, channels last. dtype: the compute dtype."""

    config: SD3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array) -> jax.Array:
        """sample (b, H, W, in_channels); timesteps scalar or (b,), sigma x 1000; encoder_hidden_states
        (b, tokens, joint_attention_dim); pooled_projections (b, pooled_projection_dim). Returns the velocity
        (b, H, W, output_channels) in the dtype of `sample`."""
        cfg, dtype = self.config, self.dtype
        b, height, width, _ = sample.shape
        p = cfg.patch_size
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        x = PatchEmbed(cfg.width, p, cfg.sample_size // p, max_size=cfg.pos_embed_max_size, dtype=dtype,
                       name="pos_embed")(sample.astype(dtype))
        emb = TimestepTextEmbedding(cfg.width, dtype, name="time_text_embed")(t, pooled_projections)
        context = SownDense(cfg.caption_projection_dim, dtype=dtype, name="context_embedder")(
            encoder_hidden_states.astype(dtype))
        for i in range(cfg.num_layers):
            x, context = JointTransformerBlock(cfg, i == cfg.num_layers - 1, i in cfg.dual_attention_layers, dtype,
                                               name=f"transformer_blocks.{i}")(x, context, emb)
        h = AdaLayerNormContinuous(1e-6, dtype, name="norm_out")(x, emb)
        h = nn.Dense(p * p * cfg.output_channels, dtype=dtype, name="proj_out")(h)
        return unpatchify(h, height // p, width // p, p).astype(sample.dtype)


def rename_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the position table diffusers stores as a buffer: jaxprobe computes the same table."""
    return {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}


def example_inputs(config: SD3Config, batch: int = 1, tokens: int = 77 + T5_SEQUENCE_LENGTH) -> tuple[jax.Array, ...]:
    """Zeros shaped like one evaluation's inputs: latents, a timestep, the pipeline's 333 text tokens (77 CLIP,
    256 T5: what the text-stream sites' shapes are checked against) and pooled projections."""
    side = config.sample_size
    return (jnp.zeros((batch, side, side, config.in_channels)), jnp.zeros(()),
            jnp.zeros((batch, tokens, config.joint_attention_dim)), jnp.zeros((batch, config.pooled_projection_dim)))
