"""The Pipeline: loaded components plus the capture API (`capture`, `generate`, `capture_images`).

Every public method is a thin host-side driver (`pipeline.sampling`) around one jitted program
(`pipeline.programs`): tokenize, shard the batch over all visible devices, run, pull back only the
reduced activations that were asked for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxprobe.captures import Captures
from jaxprobe.checkpoints.component import Component
from jaxprobe.errors import CheckpointError, SiteError
from jaxprobe.models import clip, encoders
from jaxprobe.models.families import DenoiserFamily, family_of_config
from jaxprobe.pipeline import sampling
from jaxprobe.pipeline.interventions import Intervention, module_outputs
from jaxprobe.pipeline.programs import Plan, image_program
from jaxprobe.pipeline.sampling import IMAGE_REDUCTIONS, Reduce, resolve_reductions
from jaxprobe.pipeline.sites import (
    SAMPLER_SITES,
    TEXT_TOWER_SITES,
    block_sites_of,
    flatten_intermediates,
    select_sites,
    sowing_inputs,
    split_derived,
)
from jaxprobe.runtime.batching import run_batched


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
    provenance: dict[str, Any] | None = None   # what was loaded (checkpoints.provenance.describe_source)
    text_encoder_2: Component | None = None    # SDXL's second text encoder (OpenCLIP bigG, with projection)
    tokenizer_2: Any = None
    text_encoder_3: Component | None = None    # SD3's T5 encoder (optional there: zeros stand in for it)
    tokenizer_3: Any = None
    pipeline_options: dict[str, Any] | None = None   # model_index.json switches, e.g. force_zeros_for_empty_prompt

    # ------------------------------------------------------------------ structure

    @property
    def components(self) -> dict[str, Component]:
        return {c.name: c for c in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.unet, self.vae,
                                    self.image_encoder) if c is not None}

    @property
    def text_encoders(self) -> dict[str, Component]:
        """The text encoders the denoiser is conditioned on, in checkpoint order."""
        return {c.name: c for c in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if c is not None}

    def check_compatible(self) -> None:
        """Refuse pairings that would fail deep inside a jitted program."""
        if self.family is not None and self.family.name == "stable-diffusion-3":
            self._check_sd3()
            return
        if self.family is not None and self.family.name == "flux":
            self._check_flux()
            return
        if self.text_encoder_2 is not None and self.unet is not None:  # SDXL: widths add up, pooled fills add_embedding
            widths = {name: c.config.hidden_size for name, c in self.text_encoders.items()}
            cross = self.unet.config.cross_attention_dim
            if sum(widths.values()) != cross:
                raise CheckpointError(f"the text encoders' widths {widths} add up to {sum(widths.values())}, but the UNet's "
                                      f"cross_attention_dim is {cross}: components of different SDXL-family models?")
            if self.unet.config.addition_embed_type == "text_time":
                n_ids = 5 if (self.pipeline_options or {}).get("requires_aesthetics_score") else 6
                self.unet.config.check_added_conditioning(self.text_encoder_2.config.projection_dim or 0, n_ids)
            return
        if self.text_encoder is not None and self.unet is not None:
            # PixArt projects T5's states (text_width) to its own cross-attention width
            width = self.text_encoder.config.hidden_size
            cross = getattr(self.unet.config, "text_width", None) or self.unet.config.cross_attention_dim
            if width != cross:
                raise CheckpointError(
                    f"the text encoder's width ({width}) differs from the UNet's cross_attention_dim ({cross}): "
                    "these components come from different model families (SD 1.x uses 768, SD 2.x 1024).")
        if self.text_encoder is not None and self.tokenizer is not None:
            if self.tokenizer.vocab_size > self.text_encoder.config.vocab_size:
                raise CheckpointError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the text encoder "
                                      f"only {self.text_encoder.config.vocab_size} embeddings; mismatched folders?")

    def _check_sd3(self) -> None:
        """SD3: both CLIP towers with projections (pooled widths add up), T5 (or the zeros for it) as wide as the
        transformer's joint_attention_dim, the CLIP states no wider."""
        config = self.unet.config
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise CheckpointError("an SD3 pipeline needs text_encoder and text_encoder_2 (CLIP-L and OpenCLIP bigG); "
                                  "this folder lacks one")
        pooled = sum(c.config.projection_dim or 0 for c in (self.text_encoder, self.text_encoder_2))
        if pooled != config.pooled_projection_dim:
            raise CheckpointError(f"the CLIP projections add up to {pooled}, but the transformer's "
                                  f"pooled_projection_dim is {config.pooled_projection_dim}: mismatched components?")
        clip = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        t5 = self.text_encoder_3.config.hidden_size if self.text_encoder_3 is not None else config.joint_attention_dim
        if t5 != config.joint_attention_dim or clip > t5:
            raise CheckpointError(f"the T5 width {t5} and CLIP widths {clip} do not fit the transformer's "
                                  f"joint_attention_dim {config.joint_attention_dim}: mismatched components?")

    def _check_flux(self) -> None:
        """FLUX: CLIP-L (text_encoder) as wide as pooled_projection_dim, T5 (text_encoder_2) as joint_attention_dim."""
        config = self.unet.config
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise CheckpointError("a FLUX pipeline needs text_encoder (CLIP-L) and text_encoder_2 (T5); this folder "
                                  "lacks one")
        clip, t5 = self.text_encoder.config.hidden_size, self.text_encoder_2.config.hidden_size
        if clip != config.pooled_projection_dim or t5 != config.joint_attention_dim:
            raise CheckpointError(f"the CLIP width {clip} and T5 width {t5} do not fit the transformer's "
                                  f"pooled_projection_dim {config.pooled_projection_dim} and joint_attention_dim "
                                  f"{config.joint_attention_dim}: mismatched components?")

    def replace(self, **changes: Any) -> "Pipeline":
        return dataclasses.replace(self, **changes)

    @property
    def family(self) -> DenoiserFamily | None:
        """The denoiser's family (how it is conditioned, its block and bottleneck sites), if there is one."""
        return family_of_config(self.unet.config) if self.unet is not None else None

    @property
    def bottleneck_site(self) -> str | None:
        """The denoiser's h-space site as the family places it for this depth ("unet.mid_block",
        "transformer.transformer_blocks.14" of 28): where the directions live and the classifiers start."""
        family = self.family
        return None if family is None else f"{self.unet.name}.{family.bottleneck(self.unet.config)}"

    @property
    def summary_text_site(self) -> str | None:
        """The first text tower's last layer (CLIP's final norm; T5's for PixArt): the text-side comparison
        the studies draw beside the denoiser's sites. None when the pipeline reads no text (DiT)."""
        family = self.family
        towers = family.text_encoders if family is not None else ("text_encoder",)
        if not towers or self.components.get(towers[0]) is None:
            return None
        return f"{towers[0]}.{family.summary_text_site if family is not None else 'text_model.final_layer_norm'}"

    @functools.cached_property
    def _site_table(self) -> tuple[list[str], list[str]]:
        """(every site, block-level sites), found by tracing each component once, abstractly."""
        every: list[str] = []
        blocks: list[str] = []

        def tower(c: Component | None) -> tuple[Component | None, Any, tuple[str, ...]]:
            return c, encoders.example_inputs, encoders.block_sites(c.config) if c is not None else ()

        for component, example, patterns in (
                tower(self.text_encoder), tower(self.text_encoder_2), tower(self.text_encoder_3),
                (self.unet, self.family.example_inputs if self.family else None,
                 self.family.block_sites if self.family else ()),
                tower(self.image_encoder)):
            if component is None:
                continue
            names = [f"{component.name}.{n}" for n in traced_sites(component, example(component.config))]
            every += names
            blocks += block_sites_of(names, component.name, patterns)
            if component is self.unet:
                every += list(SAMPLER_SITES)
                blocks += list(SAMPLER_SITES)
        return every, blocks

    @functools.cached_property
    def _output_shapes(self) -> dict[tuple[str, Any], dict[str, tuple[int, ...]]]:
        return {}

    def output_shapes(self, component: str, latent_shape: tuple[int, int, int] | None = None
                      ) -> dict[str, tuple[int, ...]]:
        """{site: per-example shape} of the sites interventions act on: the component's modules that sow
        their output (by module path) and what each was given (`path.input`). latent_shape (h, w, c): the
        denoiser's input (default: sample size)."""
        key = (component, latent_shape)
        if key not in self._output_shapes:
            c = self.components[component]
            if c is self.unet:
                example = self.family.example_inputs(c.config)
                if latent_shape is not None:
                    example = (jax.ShapeDtypeStruct((1, *latent_shape), example[0].dtype), *example[1:])
            else:
                example = encoders.example_inputs(c.config)

            def trace(params, *xs):
                with sowing_inputs((), every=True):
                    _, state = c.module.apply({"params": params}, *xs, mutable=["intermediates"])
                return state["intermediates"]

            sown = jax.eval_shape(trace, c.abstract_params, *example)
            outputs = module_outputs(sown)
            given = {site: v for site, v in flatten_intermediates(sown).items()
                     if split_derived(site)[1] == "input" and split_derived(site)[0] in outputs}
            self._output_shapes[key] = {path: tuple(v.shape[1:]) for path, v in {**outputs, **given}.items()}
        return self._output_shapes[key]

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

    def capture(self, prompts: Sequence[str], sites: str | Iterable[str] = (TEXT_TOWER_SITES,), *,
                timesteps: str | Sequence[int] = "all", num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int = 0, reduce: Reduce = "mean",
                latents: np.ndarray | None = None, batch_size: int = 8, branch: str = "cond",
                negative_prompt: str = "", height: int | None = None, width: int | None = None,
                prompt_offset: int = 0, progress: bool = False,
                interventions: Sequence[Intervention] = (), text_layer: int | None = None,
                **micro_conditioning: Any) -> Captures:
        """Run the prompts and return a `Captures` ({site: array}) for every site the patterns select.

        Text sites: (n_prompts, dim) after the token reduction, (n_prompts, tokens, dim) with "none".
        UNet, `latents` and `pred_original_sample` sites: (n_prompts, n_timesteps, dim) after the
        spatial reduction ("mean", "max", or "none": (n, T, h, w, c)); `...attn2.probs` sites give
        cross-attention maps (n, T, tokens, h, w). `image_encoder.*` sites embed the decoded images.
        timesteps: "all" or step indices (0 = first denoising step) to keep. `branch`: "cond" or
        "uncond" (the classifier-free-guidance half captured). `latents`: initial noise (n, 4, h, w);
        otherwise prompt i gets the noise of (seed, prompt_offset + i), whatever the batching.
        One compiled program per shape runs all of it (`jaxprobe.pipeline.programs`). The result is a
        Mapping that also knows its steps, timesteps, reductions, prompts and options, and yields
        feature sets (`site@step`) for `probe_sweep`, the SAE trainer and the directions maths.
        interventions: `jaxprobe.interventions` (Steer, Patch, Ablate, Scale, ClampSAE) applied inside
        the same program, in list order; captured sites show the intervened activations. text_layer:
        the Diffusion Lens (see `generate`). micro_conditioning: SDXL's `original_size`, `target_size`
        (default: the image's size), `crops_coords_top_left` ((0, 0)), and a refiner's `aesthetic_score` (6.0)
        and `negative_aesthetic_score` (2.5).
        """
        chosen = self.select(sites)
        return sampling.run_capture(
            self, prompts, chosen, batch_size=batch_size, progress=progress, timesteps=timesteps,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, reduce=reduce,
            latents=latents, branch=branch, negative_prompt=negative_prompt, height=height, width=width,
            prompt_offset=prompt_offset, interventions=interventions, text_layer=text_layer, **micro_conditioning)

    def embed_images(self, images: np.ndarray, sites: str | Iterable[str] = ("image_encoder.visual_projection",),
                     *, reduce: Reduce = "cls", batch_size: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
        """images (n, H, W, 3) floats in [0, 1] -> {image_encoder site: (n, dim)}: the class token ("cls"), the
        mean over all tokens ("mean") or over the patch tokens alone ("mean_patch"), or every token ("none")."""
        if self.image_encoder is None:
            raise SiteError("this pipeline has no image encoder; pass image_encoder=PATH to jaxprobe.load "
                            "(or --image-encoder PATH) with a CLIP vision or DINOv2 checkpoint")
        chosen = [s for s in self.select(sites) if s.startswith("image_encoder.")]
        plan = Plan(image_sites=tuple(s.removeprefix("image_encoder.") for s in chosen),
                    image_reductions=resolve_reductions(chosen, reduce, lambda s: IMAGE_REDUCTIONS))
        models, params = sampling.models_of(self), sampling.params_of(self)
        out = run_batched(lambda batch: image_program(models, params, batch, plan), np.asarray(images, np.float32),
                          batch_size, progress=progress, label="image encoder")
        return {site: out[f"image:{local}"] for site, local in zip(chosen, plan.image_sites)}

    def generate(self, prompts: Sequence[str], **options: Any):
        """Decoded images for the prompts (see `jaxprobe.pipeline.sampling.generate`)."""
        return sampling.generate(self, list(prompts), **options)

    def capture_images(self, images: Any, sites: str | Iterable[str] = ("unet.mid_block",), **options: Any):
        """Revelio's setting: VAE-encode real images, noise them to step t, one UNet pass, capture."""
        return sampling.capture_images(self, images, sites, **options)


def traced_sites(component: Component, example: tuple[jax.Array, ...]) -> list[str]:
    """Every site a component sows, in call order, from one abstract trace (nothing is computed).

    The order is read inside the trace: the pytree eval_shape returns has its dict keys sorted, which puts
    `layers.10` before `layers.2` and a DiT's `norm_out` before its blocks."""
    order: list[str] = []

    def trace(params):
        _, state = component.module.apply({"params": params}, *example, mutable=["intermediates"])
        order.extend(flatten_intermediates(state["intermediates"]))

    jax.eval_shape(trace, component.abstract_params)   # shapes only: lazy weights stay undrawn
    return order
