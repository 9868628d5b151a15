"""The Pipeline: loaded components plus the capture API (`capture`, `generate`, `capture_images`).

Every public method is a thin host-side driver around a jitted program: tokenize, shard the batch
over all visible devices, run, pull back only the reduced activations that were asked for.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxprobe.pipeline.reductions import SPATIAL_REDUCTIONS, TOKEN_REDUCTIONS, reduce_tokens
from jaxprobe.pipeline.sites import SAMPLER_SITES, block_sites_of, flatten_intermediates, select_sites
from jaxprobe.errors import CheckpointError, InputError, SiteError
from jaxprobe.models import clip
from jaxprobe.checkpoints.component import Component
from jaxprobe.runtime.batching import run_batched
from jaxprobe.runtime.devices import data_mesh

Reduce = str | Mapping[str, str]
KNOWN_REDUCTIONS = tuple(dict.fromkeys((*TOKEN_REDUCTIONS, *SPATIAL_REDUCTIONS, "cls")))


def resolve_reductions(sites: Sequence[str], reduce: Reduce, allowed_for: callable) -> tuple[str, ...]:
    """One reduction per site. `reduce` is a name for all sites, or {glob: name}, first match winning."""
    chosen = []
    for site in sites:
        if isinstance(reduce, str):
            how = reduce
        else:
            how = next((r for pattern, r in reduce.items() if fnmatch.fnmatchcase(site, pattern)), None)
            if how is None:
                raise InputError(f"no reduction given for site {site!r}: add a pattern such as '*': 'mean'")
        allowed = allowed_for(site)
        if how not in KNOWN_REDUCTIONS:
            raise InputError(f"unknown reduction {how!r}; choose one of {', '.join(KNOWN_REDUCTIONS)}")
        if how not in allowed:
            raise InputError(f"reduction {how!r} does not apply to {site!r} (it allows {', '.join(allowed)}); "
                             "pass reduce as a mapping, e.g. {'text_encoder.*': 'eos', '*': 'mean'}")
        chosen.append(how)
    return tuple(chosen)


@functools.partial(jax.jit, static_argnames=("module", "sites", "reductions"))
def _text_program(module: clip.CLIPTextModel, params: Any, tokens: tuple[jax.Array, jax.Array],
                  sites: tuple[str, ...], reductions: tuple[str, ...]) -> dict[str, jax.Array]:
    """tokens: ids (b, n) and EOS positions (b,) -> {site: reduced activation} (paths inside the encoder)."""
    input_ids, eos = tokens
    _, state = module.apply({"params": params}, input_ids, mutable=["intermediates"])
    acts = flatten_intermediates(state["intermediates"])
    return {s: reduce_tokens(acts[s], eos, r).astype(jnp.float32) for s, r in zip(sites, reductions)}


@functools.partial(jax.jit, static_argnames=("module", "preprocess", "sites", "reductions"))
def _image_program(module: clip.CLIPVisionModel, params: Any, images: jax.Array, preprocess: clip.ImagePreprocess,
                   sites: tuple[str, ...], reductions: tuple[str, ...]) -> dict[str, jax.Array]:
    """images (b, H, W, 3) in [0, 1] -> {site: reduced activation}; `cls` pools the class token."""
    pixels = clip.preprocess_images(images, preprocess).astype(module.dtype)
    _, state = module.apply({"params": params}, pixels, mutable=["intermediates"])
    acts = flatten_intermediates(state["intermediates"])
    out = {}
    for site, how in zip(sites, reductions):
        x = acts[site]
        if x.ndim == 3:
            x = x[:, 0] if how == "cls" else (x.mean(axis=1) if how == "mean" else x)
        out[site] = x.astype(jnp.float32)
    return out


@dataclass(frozen=True)
class Pipeline:
    """Whatever components a checkpoint has. Built by `jaxprobe.load`; immutable."""

    source: str
    dtype: Any
    text_encoder: Component | None = None
    tokenizer: Any = None
    unet: Component | None = None
    vae: Component | None = None
    scheduler: Any = None
    image_encoder: Component | None = None
    image_preprocess: clip.ImagePreprocess | None = None

    # ------------------------------------------------------------------ structure

    @property
    def components(self) -> dict[str, Component]:
        return {c.name: c for c in (self.text_encoder, self.unet, self.vae, self.image_encoder) if c is not None}

    def check_compatible(self) -> None:
        """Refuse pairings that would fail deep inside a jitted program."""
        if self.text_encoder is not None and self.unet is not None:
            width, cross = self.text_encoder.config.hidden_size, self.unet.config.cross_attention_dim
            if width != cross:
                raise CheckpointError(
                    f"the text encoder's width ({width}) differs from the UNet's cross_attention_dim ({cross}): "
                    "these components come from different model families (SD 1.x uses 768, SD 2.x 1024).")
        if self.text_encoder is not None and self.tokenizer is not None:
            if self.tokenizer.vocab_size > self.text_encoder.config.vocab_size:
                raise CheckpointError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the text encoder "
                                      f"only {self.text_encoder.config.vocab_size} embeddings; mismatched folders?")

    def replace(self, **changes: Any) -> "Pipeline":
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def _site_table(self) -> tuple[list[str], list[str]]:
        """(every site, block-level sites), found by tracing each component once, abstractly."""
        every: list[str] = []
        blocks: list[str] = []
        if self.text_encoder is not None:
            cfg = self.text_encoder.config
            names = _sown_names(self.text_encoder, jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))
            every += [f"text_encoder.{n}" for n in names]
            blocks += block_sites_of(every, "text_encoder", clip.BLOCK_SITES)
        if self.unet is not None:
            from jaxprobe.pipeline import sampling

            unet_sites = [f"unet.{n}" for n in sampling.unet_site_names(self.unet)]
            every += unet_sites + list(SAMPLER_SITES)
            blocks += sampling.unet_block_sites(unet_sites) + list(SAMPLER_SITES)
        if self.image_encoder is not None:
            cfg = self.image_encoder.config
            names = _sown_names(self.image_encoder, jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels)))
            image_sites = [f"image_encoder.{n}" for n in names]
            every += image_sites
            blocks += block_sites_of(image_sites, "image_encoder", clip.BLOCK_SITES)
        return every, blocks

    def sites(self, all: bool = False) -> list[str]:  # noqa: A002 - mirrors the CLI flag
        """Capture sites: block-level ones by default, every sown site with `all=True`."""
        every, blocks = self._site_table
        return list(every if all else [s for s in every if s in set(blocks)])

    def select(self, patterns: str | Iterable[str]) -> list[str]:
        every, blocks = self._site_table
        return select_sites(patterns, every, blocks)

    # ------------------------------------------------------------------ capture

    def tokenize(self, prompts: Sequence[str], allow_empty: bool = False) -> np.ndarray:
        if self.tokenizer is None:
            raise CheckpointError(f"{self.source} has no tokenizer folder; text capture needs one.")
        return self.tokenizer(prompts, allow_empty=allow_empty)

    def capture(self, prompts: Sequence[str], sites: str | Iterable[str] = ("text_encoder.*",), *,
                timesteps: str | Sequence[int] = "all", num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int = 0, reduce: Reduce = "mean",
                latents: np.ndarray | None = None, batch_size: int = 8, branch: str = "cond",
                negative_prompt: str = "", height: int | None = None, width: int | None = None,
                prompt_offset: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
        """Run the prompts and return {site: array} for every site the patterns select.

        Text sites: (n_prompts, dim) after the token reduction, (n_prompts, tokens, dim) with "none".
        UNet, `latents` and `pred_original_sample` sites: (n_prompts, n_timesteps, dim) after the
        spatial reduction ("mean", "max", or "none": (n, T, h, w, c)); `...attn2.probs` sites give
        cross-attention maps (n, T, tokens, h, w). `image_encoder.*` sites embed the decoded images.
        timesteps: "all" or step indices (0 = first denoising step) to keep. `branch`: "cond" or
        "uncond" (the classifier-free-guidance half captured). `latents`: initial noise (n, 4, h, w);
        otherwise prompt i gets the noise of (seed, prompt_offset + i), whatever the batching.
        """
        prompts = list(prompts)
        chosen = self.select(sites)
        text_sites = [s for s in chosen if s.startswith("text_encoder.")]
        sampling_sites = [s for s in chosen if not s.startswith("text_encoder.")]
        out: dict[str, np.ndarray] = {}
        if text_sites:
            out.update(self._capture_text(prompts, text_sites, reduce, batch_size, progress))
        if sampling_sites:
            from jaxprobe.pipeline import sampling

            out.update(sampling.capture_sampling(
                self, prompts, sampling_sites, timesteps=timesteps, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, seed=seed, reduce=reduce, latents=latents,
                batch_size=batch_size, branch=branch, negative_prompt=negative_prompt,
                height=height, width=width, prompt_offset=prompt_offset, progress=progress))
        return {s: out[s] for s in chosen}

    def _capture_text(self, prompts: Sequence[str], sites: Sequence[str], reduce: Reduce,
                      batch_size: int, progress: bool, allow_empty: bool = False) -> dict[str, np.ndarray]:
        if self.text_encoder is None:
            raise SiteError(f"{self.source} has no text encoder")
        ids = self.tokenize(prompts, allow_empty=allow_empty)
        eos = self.tokenizer.eos_positions(ids)
        reductions = resolve_reductions(sites, reduce, lambda s: TOKEN_REDUCTIONS)
        local = tuple(s.removeprefix("text_encoder.") for s in sites)
        run = lambda batch: _text_program(self.text_encoder.module, self._replicated("text_encoder"),  # noqa: E731
                                          batch, local, reductions)
        chunks = run_batched(run, (ids, eos), batch_size, progress=progress, label="text encoder")
        return {site: chunks[name] for site, name in zip(sites, local)}

    def embed_images(self, images: np.ndarray, sites: str | Iterable[str] = ("image_encoder.visual_projection",),
                     *, reduce: Reduce = "cls", batch_size: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
        """images (n, H, W, 3) floats in [0, 1] -> {image_encoder site: (n, dim)} ("cls", "mean", "none")."""
        if self.image_encoder is None:
            raise SiteError("this pipeline has no image encoder; pass image_encoder=PATH to jaxprobe.load "
                            "(or --image-encoder PATH) with a CLIP vision checkpoint")
        chosen = [s for s in self.select(sites) if s.startswith("image_encoder.")]
        reductions = resolve_reductions(chosen, reduce, lambda s: ("cls", "mean", "none"))
        local = tuple(s.removeprefix("image_encoder.") for s in chosen)
        preprocess = self.image_preprocess or clip.ImagePreprocess()
        run = lambda batch: _image_program(self.image_encoder.module, self._replicated("image_encoder"),  # noqa: E731
                                           batch, preprocess, local, reductions)
        chunks = run_batched(run, np.asarray(images, np.float32), batch_size, progress=progress, label="image encoder")
        return {site: chunks[name] for site, name in zip(chosen, local)}

    def generate(self, prompts: Sequence[str], **options: Any):
        """Decoded images for the prompts (see `jaxprobe.pipeline.sampling.generate`)."""
        from jaxprobe.pipeline import sampling

        return sampling.generate(self, list(prompts), **options)

    def capture_images(self, images: Any, sites: str | Iterable[str] = ("unet.mid_block",), **options: Any):
        """Revelio's setting: VAE-encode real images, noise them to step t, one UNet pass, capture."""
        from jaxprobe.pipeline import sampling

        return sampling.capture_images(self, images, sites, **options)

    # ------------------------------------------------------------------ devices

    def _replicated(self, name: str) -> Any:
        """A component's parameters replicated over the data mesh, computed once per pipeline."""
        cache = self.__dict__.setdefault("_replicated_params", {})
        if name not in cache:
            sharding = NamedSharding(data_mesh(), PartitionSpec())
            cache[name] = jax.device_put(self.components[name].params, sharding)
        return cache[name]


def _sown_names(component: Component, example: jax.Array) -> list[str]:
    def trace():
        _, state = component.module.apply({"params": component.params}, example, mutable=["intermediates"])
        return state["intermediates"]

    return list(flatten_intermediates(jax.eval_shape(trace)))


