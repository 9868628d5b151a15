"""The directions study's causal loop: add a found h-space direction over chosen steps at several scales
and measure whether the attribute moves in the images, not only in h-space.

    edit(config, direction="woman", scales=(0, 4, 8, 16), steps=range(0, 20), image_encoder=PATH)

The direction is the one `build` saved for `direction` at the config's focus step (a unit vector in
h-space units). The attribute axis lives in CLIP image space: the mean image embedding of the
direction concept's own generations minus that of the other concepts of its family. Every edited
generation of the query prompts (the families associated with it, else the neutral prompts) gets the
cosine of its image embedding with that axis; per scale, the mean over generations with a bootstrap
interval, and the change from scale 0 with a paired bootstrap interval (the same rows resampled).
Every scale runs the same compiled program: the scale is a traced input of the Steer.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jaxprobe
from jaxprobe.checkpoints.random import is_random_weights
from jaxprobe.errors import InputError
from jaxprobe.features.steering import generations, steered_generations
from jaxprobe.probes.stats import dose_response
from jaxprobe.reporting.figures import dose_response_figure, image_grid, save_figures
from jaxprobe.reporting.html import figure_html, page, png_bytes, settings_html, table_html
from jaxprobe.runtime.files import atomic_write_text, write_table
from jaxprobe.studies.decoding_diffusion.directions import (
    DirectionsConfig,
    concept_prompts,
    hspace_sites,
    read_directions,
)

IMAGE_SITE = "image_encoder.visual_projection"
EDIT_PAGE = "edit.html"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _query_prompts(config: DirectionsConfig, family: str) -> list[str]:
    """The prompts of the families associated with `family` as an attribute, else the neutral prompts."""
    prompts = concept_prompts(config)
    queries = [q for q, a in config.associations if a == family]
    chosen = [p for q in queries for c in config.families[q] for p in prompts[c]]
    return chosen or list(config.neutral_prompts)


def _embed(pipe: Any, prompts: Sequence[str], config: DirectionsConfig) -> np.ndarray:
    """Image embeddings (seeds * n, d) of the prompts' unedited generations."""
    feats, _ = generations(pipe, prompts, sites=[IMAGE_SITE], seeds=config.seeds, **_sampling(config))
    return feats[IMAGE_SITE]


def _sampling(config: DirectionsConfig) -> dict[str, Any]:
    return {"num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
            "batch_size": config.batch_size}


def edit(config: DirectionsConfig, *, direction: str, scales: Sequence[float] = (0.0, 4.0, 8.0, 16.0),
         steps: Sequence[int] | None = None, prompts: Sequence[str] | None = None, pipe: Any = None,
         image_encoder: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Steer the query prompts' generations along `direction` at each scale; write OUT/edit/<direction>/
    (edit.parquet/.csv, figures/dose_response.png and grid.png, edit.html). Returns the page's path.

    steps: the steps the direction is added at (None: all). prompts: instead of the query families'.
    image_encoder: a CLIP vision checkpoint, unless `pipe` already has one."""
    family = next((f for f, cs in config.families.items() if direction in cs), None)
    if family is None:
        raise InputError(f"direction {direction!r} is no concept of the config's families "
                         f"({', '.join(c for cs in config.families.values() for c in cs)})")
    if len(config.families[family]) < 2:
        raise InputError(f"family {family!r} has one concept: its image axis needs another to compare with")
    scales = [float(s) for s in scales]
    if not scales:
        raise InputError("give at least one scale, e.g. 0 4 8 16 (0 first: the unedited baseline)")
    dirs = read_directions(config.out)
    if pipe is None:
        pipe = jaxprobe.load(config.model, dtype=config.dtype, scheduler=config.scheduler, image_encoder=image_encoder)
    site = hspace_sites(config, pipe)[0]
    concepts = [str(c) for c in dirs["concepts"]]
    vector = dirs[f"site/{site}"][concepts.index(direction), config.focus_step]      # (c,) or (h, w, c)
    if pipe.image_encoder is None:
        raise InputError("directions edit measures the attribute with the CLIP image tower: pass --image-encoder "
                         "PATH (a CLIP vision checkpoint)")
    queries = list(prompts) if prompts is not None else _query_prompts(config, family)

    pole_prompts = concept_prompts(config)
    embeds = {c: _embed(pipe, pole_prompts[c], config) for c in config.families[family]}
    others = [c for c in config.families[family] if c != direction]
    axis = _unit(_unit(embeds[direction]).mean(0) - np.mean([_unit(embeds[c]).mean(0) for c in others], axis=0))
    axis_name = f"{direction} vs {' + '.join(others)}"
    runs = steered_generations(pipe, queries, site, vector, scales=scales, steps=steps, sites=[IMAGE_SITE],
                               seeds=config.seeds, log=log, **_sampling(config))
    scores = np.stack([_unit(run.features[IMAGE_SITE]) @ axis for run in runs])
    grid = [run.images for run in runs]
    table = dose_response(scores, scales, config.n_bootstrap, config.level, config.seed)
    table.insert(0, "direction", direction)
    table.insert(1, "site", site)

    out = Path(config.out) / "edit" / direction
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out, "edit")
    curve = dose_response_figure({f"CLIP image association ({axis_name})": table},
                                 xlabel=f"scale of the {direction!r} direction added to h-space")
    shown = min(len(queries), 8)
    grid_figure = image_grid(np.stack(grid, axis=1)[:shown], queries[:shown], [f"scale {s:g}" for s in scales])
    save_figures(out, {"dose_response": curve, "grid": grid_figure})
    notice = "Random weights: the images and scores show the plumbing, not a bias." if is_random_weights(pipe.source) \
        else None
    body = [
        (f"<p>The {html.escape(direction)} direction (h-space, {html.escape(site)}, focus step "
         f"{config.focus_step}) added to the query prompts' generations at each scale; the association is the "
         f"cosine of each generated image's CLIP embedding with the image-space axis {html.escape(axis_name)}, "
         f"with {config.level:.0%} bootstrap intervals over {table['n'].iloc[0]} generations.</p>"),
        settings_html({"model": pipe.source, "direction": direction, "scales": scales,
                       "steps": "all" if steps is None else list(steps), "seeds": list(config.seeds),
                       "prompts": len(queries)}),
        figure_html(png_bytes(curve), "dose-response", "association with the attribute axis vs scale"),
        figure_html(png_bytes(grid_figure), "edited generations", "first seed; rows: prompts, columns: scales"),
        table_html(table, "Dose-response"),
    ]
    path = out / EDIT_PAGE
    atomic_write_text(path, page(f"Directions edit: {direction}", body, notice=notice))
    log(f"edit: {path}")
    return path
