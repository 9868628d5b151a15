"""The settings every study shares, as frozen dataclasses: which model, how to sample, how to run.

Each study's config holds these as TOML tables `[model]`, `[sampling]` and `[run]` beside its own
(see `jaxprobe.runtime.configfile.read_config`); its flat fields stay accepted at the top level.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSettings:
    model: str = "tiny"              # 'tiny', 'sd15-random', a checkpoint folder or a cached model id
    dtype: str = "float32"
    scheduler: str | None = None     # override the checkpoint's sampler, keeping its noise schedule


@dataclass(frozen=True)
class SamplingSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class RunSettings:
    batch_size: int = 16
    chunk_size: int = 64             # prompts per committed feature-store chunk (the unit of resume)
    cache: str = "jaxprobe-runs/cache"
    force: bool = False
