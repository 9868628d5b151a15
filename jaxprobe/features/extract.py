"""Cached extraction: a pipeline's captures through the feature store, shared by every study.

`cached_capture` is `pipe.capture` with chunked, resumable, content-keyed storage; `extract_features`
runs text and sampled sites for several seeds; `image_features` is Revelio's real-image path;
`image_encoder_features` is the image-encoder baseline beside it (CLIP's vision tower or DINOv2, every layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.captures import Captures
from jaxprobe.errors import InputError
from jaxprobe.features.settings import RunSettings, SamplingSettings
from jaxprobe.features.store import FeatureStore
from jaxprobe.pipeline.images import ImageDataset, load_images
from jaxprobe.pipeline.sampling import TEXT_TOWERS, capture_description


@dataclass(frozen=True)
class PromptSet:
    """Rows of the experiment: prompt text, the concept it names, its template and sampling seed."""

    prompts: tuple[str, ...]      # one per (concept, template)
    concept_index: np.ndarray      # (n_prompts,) index into the norms' concepts
    template_index: np.ndarray


def build_prompts(concepts: Sequence[str], templates: Sequence[str]) -> PromptSet:
    rows = [(template.format(concept=c), ci, ti) for ci, c in enumerate(concepts) for ti, template in enumerate(templates)]
    return PromptSet(tuple(r[0] for r in rows), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))


def model_fingerprint(pipe: Any) -> dict[str, Any]:
    """What identifies the weights: the source, dtype, every component's config and the load's provenance
    (a single file's and every LoRA's SHA-256, the cache revision, the folder's weight-file sizes and mtimes)."""
    return {"source": pipe.source, "dtype": str(np.dtype(pipe.dtype)) if pipe.dtype is not None else None,
            "configs": {name: repr(c.config) for name, c in pipe.components.items()},
            "scheduler": repr(pipe.scheduler), "provenance": getattr(pipe, "provenance", None)}


def cached_capture(pipe: Any, prompts: Sequence[str], sites: Sequence[str] | str, *, cache: str | Path,
                   chunk_size: int = 64, force: bool = False, progress: bool = True, label: str = "features",
                   batch_size: int = 8, **options: Any) -> Captures:
    """`pipe.capture(prompts, sites, **options)` through the feature store under `cache`.

    Chunks of `chunk_size` prompts are committed as they finish, so a killed run resumes where it
    stopped, a changed setting never returns stale features, and the processes of a multi-process
    job share the chunks out. Text-only captures are keyed without the sampling options (they do not
    depend on them). batch_size is not part of the key: it changes results only within
    floating-point tolerance (README, Determinism). Returns `Captures` described by the prompts and
    options (the store holds only the arrays; the description is rebuilt from the call).
    """
    if options.get("interventions") or options.get("text_layer") is not None:
        raise InputError("the feature store caches unedited runs only: call pipe.capture(..., interventions=...) "
                         "or text_layer= directly (their arrays are not part of a cache key)")
    prompts = list(prompts)
    sites = pipe.select(sites)
    text_only = all(s.startswith(TEXT_TOWERS) for s in sites)
    key_options = {"reduce": options.get("reduce", "mean")} if text_only else options
    description = {"kind": "text" if text_only else "sampling", "model": model_fingerprint(pipe), "sites": sites,
                   "prompts": prompts, "options": key_options}
    arrays = FeatureStore(cache).compute(
        description, len(prompts),
        lambda part, bar: pipe.capture(prompts[part], sites, batch_size=batch_size, prompt_offset=part.start,
                                       progress=bar, **options),
        chunk_size=chunk_size, force=force, progress=progress, label=label)
    return Captures.from_arrays(arrays, prompts=prompts, **capture_description(pipe, sites, **options))


def extract_features(pipe: Any, prompts: Sequence[str], *, text_sites: Sequence[str] = (),
                     sampled_sites: Sequence[str] = (), token_reduce: str = "eos", spatial_reduce: str = "mean",
                     sampling: SamplingSettings = SamplingSettings(), run: RunSettings = RunSettings(),
                     progress: bool = True) -> Captures:
    """{site: (n_prompts x n_seeds rows, [steps,] dim)}, rows ordered seed-major, through the cache.

    Text sites are captured once (they do not depend on the sampling seed) and repeated per seed;
    sampled sites (UNet, sampler, image encoder) once per seed of `sampling.seeds`. The Captures'
    prompts are one per row (the prompts, once per seed); its seed is the seed when there is one
    (None with several: options["seeds"] lists them, row-block by row-block)."""
    prompts = list(prompts)
    common = {"cache": run.cache, "force": run.force, "progress": progress, "batch_size": run.batch_size,
              "chunk_size": run.chunk_size}
    features: dict[str, list[np.ndarray]] = {}
    parts: list[Captures] = []
    if text_sites:
        text = cached_capture(pipe, prompts, text_sites, reduce=token_reduce, label="text encoder", **common)
        parts.append(text)
        for site, value in text.items():
            features[site] = [value] * len(sampling.seeds)
    sampled = pipe.select(sampled_sites) if sampled_sites else []
    for seed in sampling.seeds if sampled else ():
        values = cached_capture(pipe, prompts, sampled, reduce=spatial_reduce,
                                num_inference_steps=sampling.num_inference_steps,
                                guidance_scale=sampling.guidance_scale, seed=seed, label=f"sampling (seed {seed})",
                                **common)
        parts.append(values)
        for site, value in values.items():
            features.setdefault(site, []).append(value)
    seeds = list(sampling.seeds)
    last = parts[-1] if sampled else None
    return Captures.from_arrays(
        {site: np.concatenate(chunks) for site, chunks in features.items()},
        timesteps=last.timesteps if last else None, steps=last.steps if last else None,
        reductions={site: how for part in parts for site, how in part.reductions.items()},
        prompts=prompts * len(seeds), seed=seeds[0] if sampled and len(seeds) == 1 else None,
        options={"seeds": seeds, "num_inference_steps": sampling.num_inference_steps,
                 "guidance_scale": sampling.guidance_scale, "token_reduce": token_reduce,
                 "spatial_reduce": spatial_reduce})


def image_features(pipe: Any, dataset: ImageDataset, sites: Sequence[str], t: int, *, cache: str | Path,
                   reduce: str = "mean", prompt: str = "", seed: int = 0, batch_size: int = 16,
                   size: int | None = None, force: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
    """{site: (n_images, dim)} (reduce="mean") or maps (n_images, h, w, c) (reduce="none") at step t,
    cached in the feature store (content-hashed on the model, the files, t and every setting)."""
    chosen = pipe.select(sites)
    denoiser = pipe.family.component if pipe.family is not None else "unet"   # DiT, PixArt: "transformer"
    other = [s for s in chosen if not s.startswith(f"{denoiser}.")]
    if other:
        raise InputError(f"real images are classified from the denoiser's ({denoiser}.*) sites only; drop "
                         f"{', '.join(other)} (e.g. sites=['{denoiser}.*'])")
    paths = [str(p) for p in dataset.paths]
    model = model_fingerprint(pipe)
    description = {"kind": "images", "model": model, "sites": chosen, "data": dataset.describe(), "t": t,
                   "reduce": reduce, "prompt": prompt, "seed": seed, "size": size}
    return FeatureStore(cache).compute(description, len(paths), lambda part, bar: pipe.capture_images(
        paths[part], chosen, t=t, prompt=prompt, seed=seed, reduce=reduce, batch_size=batch_size, size=size,
        offset=part.start, progress=bar), force=force, progress=progress, label=f"images at t={t}")


def image_encoder_features(source: Any, images: Any, *, sites: str | Sequence[str] = "image_encoder.*",
                           reductions: Sequence[str] = ("cls", "mean_patch"), batch_size: int = 8,
                           dtype: str = "float32", progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{reduction: {site: (n_images, dim)}}: an image encoder's features of every selected layer, the baseline that
    diffusion features are compared with. source: a Pipeline with an image encoder, or a DINOv2 or CLIP vision
    folder / cached model id. images: paths, PIL images, or an array (n, H, W, 3) in [0, 1] or 0..255.
    reductions: "cls" (the class token), "mean_patch" (mean of the patch tokens), "mean" (of all tokens).

    Files are read at the encoder's resize size (shortest side, centre crop) and an array goes in as it is; the
    encoder's own preprocessing (resize, centre crop, normalisation) then runs on device. One encoder pass per
    reduction: the encoder is cheap beside a denoiser, and each pass returns only its reduced features."""
    from jaxprobe.pipeline.load import load
    from jaxprobe.pipeline.pipeline import Pipeline

    pipe = source if isinstance(source, Pipeline) else load(source, dtype=dtype)
    if pipe.image_encoder is None:
        raise InputError(f"{pipe.source} has no image encoder; pass a DINOv2 or CLIP vision folder, or "
                         "jaxprobe.load(..., image_encoder=PATH)")
    if isinstance(reductions, str) or not reductions:
        raise InputError(f"reductions must be a list such as ['cls', 'mean_patch'], not {reductions!r}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        pixels = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    else:
        pixels = load_images(images, pipe.image_preprocess.size if pipe.image_preprocess else 224)
    return {how: pipe.embed_images(pixels, sites, reduce=how, batch_size=batch_size, progress=progress)
            for how in reductions}
