"""Pieces every patch-token ("DiT-style") denoiser shares, in Flax: the patch embedding with fixed 2-D
sin-cos positions, unpatchifying, adaptive layer norms (adaLN-Zero, adaLN-single) and their timestep,
class and size embeddings, and the caption projection.

DiT, PixArt and the later SD3/FLUX families build on these; attention, feed-forward and the sinusoidal
timestep embedding come from `blocks` and `layers`, which the UNets share. Module names mirror diffusers'
(`pos_embed.proj`, `norm1.emb.timestep_embedder.linear_1`, `adaln_single.linear`), so a parameter path is
its checkpoint key. Tokens are (batch, h*w, dim) in row-major patch order, as diffusers flattens them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.models.blocks import TimestepEmbedding, timestep_embedding
from jaxprobe.models.layers import ACTIVATIONS

Dtype = Any
# Every adaptive-norm family embeds its timestep with 256 sinusoids, cosines first.
TIME_PROJ_DIM = 256


class PatchTransformerShape:
    """What every patch-token transformer's frozen Config derives from its diffusers fields (num_attention_heads,
    attention_head_dim, in_channels, out_channels, num_layers); a mixin of DiTConfig and PixArtConfig."""

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """2 x in_channels with learned sigma (noise, then variance); out_channels None means in_channels."""
        return self.in_channels if self.out_channels is None else self.out_channels


def sincos_positions(dim: int, height: int, width: int, *, base_size: int, interpolation_scale: float = 1.0
                     ) -> np.ndarray:
    """(height*width, dim) fixed 2-D positions as diffusers' `get_2d_sincos_pos_embed`.

    Host numpy on static sizes (constants of the compiled program). The grid is built in float32 and the
    sinusoids in float64, in diffusers' order of operations, so the table matches its buffer to rounding.
    The first half of the channels encodes the column, the second the row; a grid other than base_size
    patches wide is stretched onto it (PixArt's multi-resolution positions)."""
    return _sincos_crop(dim, height, width, (0, height), (0, width), base_size, interpolation_scale)


def _sincos_crop(dim: int, height: int, width: int, row_span: tuple[int, int], col_span: tuple[int, int],
                 base_size: int, interpolation_scale: float) -> np.ndarray:
    """The rows row_span x columns col_span of the height x width table, computed alone: every entry depends only
    on its own position, so the crop equals the whole table's bitwise (SD3.5's 384x384x1536 table is 0.9 GB)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, not {dim}")
    rows = np.arange(height, dtype=np.float32) / np.float32(height / base_size) / np.float32(interpolation_scale)
    cols = np.arange(width, dtype=np.float32) / np.float32(width / base_size) / np.float32(interpolation_scale)
    col_grid, row_grid = np.meshgrid(cols[slice(*col_span)], rows[slice(*row_span)])   # (rows, cols) each

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(col_grid), one_axis(row_grid)], axis=1).astype(np.float32)


def cropped_positions(dim: int, height: int, width: int, max_size: int, *, base_size: int,
                      interpolation_scale: float = 1.0) -> np.ndarray:
    """(height*width, dim): the centred height x width crop of the max_size x max_size position table."""
    if height > max_size or width > max_size:
        raise ValueError(f"a {height}x{width} patch grid exceeds the {max_size}x{max_size} position table "
                         f"(pos_embed_max_size); use latents of at most {max_size} patches a side")
    top, left = (max_size - height) // 2, (max_size - width) // 2
    return _sincos_crop(dim, max_size, max_size, (top, top + height), (left, left + width), base_size,
                        interpolation_scale)


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed: a patch_size-strided conv (`proj`), flattened to tokens, plus sin-cos positions.

    Sows its output (b, h*w, dim): the `pos_embed` site. base_size: the grid width the positions were
    trained at (sample_size // patch_size); other latent sizes get stretched positions, as diffusers.
    max_size (SD3's `pos_embed_max_size`): positions come from one max_size x max_size table instead, of which
    each latent size takes the centred crop, so every resolution sees the positions it was trained on."""

    dim: int
    patch_size: int
    base_size: int
    interpolation_scale: float = 1.0
    dtype: Dtype = jnp.float32
    max_size: int | None = None

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:   # (b, H, W, c)
        p = self.patch_size
        b, height, width, _ = latents.shape
        if height % p or width % p:
            raise ValueError(f"latents of {height}x{width} do not split into {p}x{p} patches")
        x = nn.Conv(self.dim, (p, p), strides=p, padding="VALID", dtype=self.dtype, name="proj")(latents)
        x = x.reshape(b, (height // p) * (width // p), self.dim)
        if self.max_size is None:
            positions = sincos_positions(self.dim, height // p, width // p, base_size=self.base_size,
                                         interpolation_scale=self.interpolation_scale)
        else:
            positions = cropped_positions(self.dim, height // p, width // p, self.max_size, base_size=self.base_size,
                                          interpolation_scale=self.interpolation_scale)
        out = (x.astype(jnp.float32) + positions[None]).astype(x.dtype)
        self.sow("intermediates", "output", out)
        return out


def unpatchify(x: jax.Array, height: int, width: int, patch_size: int, channels_first: bool = False) -> jax.Array:
    """(b, h*w, p*p*c) tokens -> (b, h*p, w*p, c) latents (NHWC), inverting PatchEmbed's layout: each token's
    features ordered (row in patch, column in patch, channel), or with channels_first (channel, row, column)
    as FluxPipeline's `_pack_latents` orders them."""
    b, _, d = x.shape
    p = patch_size
    c = d // (p * p)
    if channels_first:
        return x.reshape(b, height, width, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(b, height * p, width * p, c)
    return x.reshape(b, height, width, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, height * p, width * p, c)


def pack_patches(latents: jax.Array, patch_size: int) -> jax.Array:
    """(b, H, W, c) latents -> (b, H/p * W/p, c*p*p) tokens with channels first, FluxPipeline's `_pack_latents`;
    `unpatchify(..., channels_first=True)` inverts it."""
    b, height, width, c = latents.shape
    p = patch_size
    x = latents.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 5, 2, 4)   # (b, h, w, c, p, p)
    return x.reshape(b, (height // p) * (width // p), c * p * p)


def plain_layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """A LayerNorm without scale or bias (elementwise_affine=False), as every adaptive norm wraps."""
    return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=dtype, name=name)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift, the adaptive norms' modulation; shift/scale (b, d) or (b, 1, d)."""
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def sinusoids(values: jax.Array) -> jax.Array:
    """(b,) timesteps (or sizes) -> (b, 256) sinusoids, cosines first, float32, with PixArt's (and SD3's)
    downscale_freq_shift of 0."""
    return timestep_embedding(values, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=0)


class TimestepLabelEmbedding(nn.Module):
    """diffusers' CombinedTimestepLabelEmbeddings (DiT): timestep_embedder(sinusoids(t)) + class_embedder(label).

    The class table has num_classes + 1 rows: the last is the null class that classifier-free guidance uses."""

    dim: int
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jax.Array, class_labels: jax.Array) -> jax.Array:   # (b,), (b,) -> (b, dim)
        # DiT trained with diffusers' downscale_freq_shift=1 here, unlike PixArt's 0
        t = timestep_embedding(timesteps, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=1)
        t_emb = TimestepEmbedding(self.dim, "silu", self.dtype, name="timestep_embedder")(t.astype(self.dtype))
        table = nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype, name="class_embedder.embedding_table")
        return t_emb + table(class_labels)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (DiT): from the conditioning embedding, six modulations; returns the first one applied
    to norm(x) and the other five (gate_msa, shift_mlp, scale_mlp, gate_mlp), each (b, dim).

    With num_classes the norm owns its embedding (`emb`, DiT: every block has one) and takes (t, labels);
    without, it takes an embedding computed elsewhere (`emb=`). dual (SD3.5's SD35AdaLayerNormZeroX): three
    more modulations for a second attention over the same input; then the returns add (norm(x) under them,
    gate_msa2) after the embedding. single (FLUX's AdaLayerNormZeroSingle): only the attention's three
    modulations; returns (norm(x) under them, gate_msa)."""

    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    dual: bool = False
    single: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array | None = None, class_labels: jax.Array | None = None,
                 emb: jax.Array | None = None) -> tuple[jax.Array, ...]:
        dim = x.shape[-1]
        if self.num_classes is not None:
            emb = TimestepLabelEmbedding(dim, self.num_classes, self.dtype, name="emb")(timesteps, class_labels)
        n = 3 if self.single else 9 if self.dual else 6
        mods = jnp.split(nn.Dense(n * dim, dtype=self.dtype, name="linear")(jax.nn.silu(emb)), n, axis=-1)
        normed = plain_layer_norm(1e-6, self.dtype)(x)
        if self.single:
            return modulate(normed, mods[0], mods[1]), mods[2]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        out = (modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp, emb)
        if not self.dual:
            return out
        shift_msa2, scale_msa2, gate_msa2 = mods[6:]
        return (*out, modulate(normed, shift_msa2, scale_msa2), gate_msa2)


class AdaLayerNormContinuous(nn.Module):
    """diffusers' AdaLayerNormContinuous (SD3's, FLUX's output norm and last context norm): a plain layer norm
    modulated by (scale, shift) = linear(silu(conditioning)), scale first, unlike adaLN-Zero. Sows its output."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:   # (b, n, d), (b, c)
        mods = nn.Dense(2 * x.shape[-1], dtype=self.dtype, name="linear")(jax.nn.silu(conditioning).astype(self.dtype))
        scale, shift = jnp.split(mods, 2, axis=-1)
        out = modulate(plain_layer_norm(self.eps, self.dtype)(x), shift, scale)
        self.sow("intermediates", "output", out)
        return out


class TimestepSizeEmbedding(nn.Module):
    """diffusers' PixArtAlphaCombinedTimestepSizeEmbeddings: the timestep embedding, plus (PixArt-alpha's
    micro-conditions) embeddings of the resolution (h, w) and aspect ratio side by side, dim // 3 each."""

    dim: int
    use_additional_conditions: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jax.Array, resolution: jax.Array | None = None,
                 aspect_ratio: jax.Array | None = None) -> jax.Array:
        emb = TimestepEmbedding(self.dim, "silu", self.dtype, name="timestep_embedder")(
            sinusoids(timesteps).astype(self.dtype))
        if not self.use_additional_conditions:
            return emb
        if resolution is None or aspect_ratio is None:
            raise ValueError("this PixArt transformer uses resolution and aspect-ratio micro-conditions: pass both")
        b, size = timesteps.shape[0], self.dim // 3
        res = TimestepEmbedding(size, "silu", self.dtype, name="resolution_embedder")(
            sinusoids(resolution.reshape(-1)).astype(self.dtype)).reshape(b, -1)
        ratio = TimestepEmbedding(size, "silu", self.dtype, name="aspect_ratio_embedder")(
            sinusoids(aspect_ratio.reshape(-1)).astype(self.dtype)).reshape(b, -1)
        return emb + jnp.concatenate([res, ratio], axis=-1)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt): one timestep embedding for the whole network (`emb`) and its six modulations
    (`linear`), (b, 6*dim); each block adds its own learned `scale_shift_table`. Returns (modulations,
    the embedding), the second for the output layer."""

    dim: int
    use_additional_conditions: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jax.Array, resolution: jax.Array | None = None,
                 aspect_ratio: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        emb = TimestepSizeEmbedding(self.dim, self.use_additional_conditions, self.dtype, name="emb")(
            timesteps, resolution, aspect_ratio)
        return nn.Dense(6 * self.dim, dtype=self.dtype, name="linear")(jax.nn.silu(emb)), emb


class CaptionProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection: linear_1, tanh GELU (SiLU for SD3's pooled text), linear_2 (text
    width -> model width)."""

    dim: int
    dtype: Dtype = jnp.float32
    act_fn: str = "gelu_pytorch_tanh"   # an ACTIVATIONS name

    @nn.compact
    def __call__(self, caption: jax.Array) -> jax.Array:
        h = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(caption)
        out = nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(ACTIVATIONS[self.act_fn](h))
        self.sow("intermediates", "output", out)
        return out


class TimestepTextEmbedding(nn.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings (SD3, FLUX.1-schnell): timestep_embedder(sinusoids(t)) plus
    text_embedder(the pooled text projections), the one conditioning vector of every adaptive norm.

    guidance_embeds (FLUX.1-dev, CombinedTimestepGuidanceTextProjEmbeddings): plus guidance_embedder(sinusoids(
    guidance)), the guidance scale (x 1000) the model was distilled to follow, in place of classifier-free guidance."""

    dim: int
    dtype: Dtype = jnp.float32
    guidance_embeds: bool = False

    @nn.compact
    def __call__(self, timesteps: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None
                 ) -> jax.Array:   # (b,), (b, pooled), (b,) -> (b, dim)
        embed = lambda values, name: TimestepEmbedding(self.dim, "silu", self.dtype, name=name)(  # noqa: E731
            sinusoids(values).astype(self.dtype))
        emb = embed(timesteps, "timestep_embedder")
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this transformer embeds the guidance scale (guidance_embeds): pass guidance")
            emb = emb + embed(guidance, "guidance_embedder")
        return emb + CaptionProjection(self.dim, self.dtype, "silu", name="text_embedder")(pooled.astype(self.dtype))
