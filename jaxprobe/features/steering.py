"""Generations steered along one direction at several scales, with captures of the same runs: the causal
loop the studies share (an h-space direction in the directions study, a probe's direction in the norms one).

    runs = steered_generations(pipe, prompts, "unet.mid_block", vector, scales=(0, 4, 8), steps=[2],
                               sites=["image_encoder.visual_projection"], seeds=(0,), num_inference_steps=25)
    runs[i].features[site]    # (seeds x prompts, ...), seed-major, for scales[i]
    runs[i].images            # (prompts, H, W, 3): the first seed's images

Every scale runs the same compiled program: the scale is a traced input of the Steer, so a sweep over
scales compiles once. Nothing is cached: the feature store holds unedited runs only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxprobe.interventions import Steer


@dataclass(frozen=True)
class SteeredRun:
    scale: float
    features: dict[str, np.ndarray]   # {site: (seeds x prompts, ...)}, rows seed-major
    images: np.ndarray                # (prompts, H, W, 3) of the first seed


def generations(pipe: Any, prompts: Sequence[str], *, sites: Sequence[str], seeds: Sequence[int],
                interventions: Sequence[Any] = (), **sampling: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({site: (seeds x prompts, ...)} seed-major, the first seed's images (prompts, H, W, 3))."""
    parts: dict[str, list[np.ndarray]] = {}
    first = None
    for seed in seeds:
        images, feats = pipe.generate(list(prompts), sites=list(sites), seed=seed, interventions=interventions,
                                      **sampling)
        for site in sites:
            parts.setdefault(site, []).append(np.asarray(feats[site]))
        first = images if first is None else first
    return {site: np.concatenate(chunks) for site, chunks in parts.items()}, first


def steered_generations(pipe: Any, prompts: Sequence[str], site: str, vector: Any, *, scales: Sequence[float],
                        steps: Sequence[int] | None, sites: Sequence[str], seeds: Sequence[int],
                        log: Callable[[str], None] = print, **sampling: Any) -> list[SteeredRun]:
    """One SteeredRun per scale: `Steer(site, vector, scale, steps)` over the prompts for every seed, capturing
    `sites`. sampling: pipe.generate's options (num_inference_steps, guidance_scale, batch_size, reduce, ...)."""
    runs = []
    for scale in scales:
        log(f"steer: {site} x {scale:g}, steps {'all' if steps is None else list(steps)}")
        feats, images = generations(pipe, prompts, sites=sites, seeds=seeds,
                                    interventions=[Steer(site, vector, scale=float(scale), steps=steps)], **sampling)
        runs.append(SteeredRun(float(scale), feats, images))
    return runs
