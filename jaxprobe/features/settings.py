"""The settings every study shares, as frozen dataclasses: which model, how to sample, how to run.

A study's config (`StudyConfig`) keeps these as flat fields (`config.num_inference_steps`) and offers
them as views (`config.model_settings`, `config.sampling`, `config.run`). In its TOML file they may
stand flat with its other fields or in the tables `[model]`, `[sampling]` and `[run]` (`SECTIONS`,
read and written by `jaxprobe.runtime.configfile`), so one such table can serve several studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from jaxprobe.errors import InputError
from jaxprobe.runtime.configfile import config_from_mapping, config_from_toml, config_part, config_to_toml


SHARD_CHOICES = (None, "fsdp", "tensor")   # `runtime.devices.ParamSharding`'s named layouts


@dataclass(frozen=True)
class ModelSettings:
    model: str = "tiny"              # 'tiny', 'sd15-random', a checkpoint folder, a cached model id or a single file
    dtype: str = "float32"
    scheduler: str | None = None     # override the checkpoint's sampler, keeping its noise schedule
    model_config: str | None = None  # a single file's configs and tokenizer: a diffusers folder or cached id
    lora: tuple[str, ...] = ()       # LoRA files merged at load, "FILE" or "FILE:SCALE"
    shard: str | None = None         # params over the devices: None (replicas), "fsdp" or "tensor"

    def __post_init__(self) -> None:
        check_model(self)

    def load_kwargs(self) -> dict:
        """The `jaxprobe.load` options these settings give (besides the source)."""
        return {"dtype": self.dtype, "scheduler": self.scheduler, "config": self.model_config, "lora": self.lora,
                "shard": self.shard}


@dataclass(frozen=True)
class SamplingSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 7.5      # <= 1: no classifier-free guidance (one denoiser pass per step)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        check_sampling(self)


@dataclass(frozen=True)
class RunSettings:
    batch_size: int = 16
    chunk_size: int = 64             # prompts per committed feature-store chunk (the unit of resume)
    cache: str = "jaxprobe-runs/cache"
    force: bool = False

    def __post_init__(self) -> None:
        check_run(self)


def check_model(settings: ModelSettings) -> None:
    if settings.shard not in SHARD_CHOICES:
        raise InputError(f"shard must be fsdp or tensor (or unset: a replica of the params on each device), "
                         f"not {settings.shard!r}")


def check_sampling(settings: SamplingSettings) -> None:
    """Refuse sampling settings that would only fail (or silently mean nothing) after the model has loaded."""
    if settings.num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be at least 1, not {settings.num_inference_steps}")
    if settings.guidance_scale < 0:
        raise InputError(f"guidance_scale must be >= 0 (<= 1 turns classifier-free guidance off), "
                         f"not {settings.guidance_scale}")
    if not settings.seeds:
        raise InputError("give at least one seed")


def check_run(settings: RunSettings) -> None:
    for name in ("batch_size", "chunk_size"):
        if getattr(settings, name) < 1:
            raise InputError(f"{name} must be at least 1, not {getattr(settings, name)}")


SECTIONS = {"model": ModelSettings, "sampling": SamplingSettings, "run": RunSettings}


class StudyConfig:
    """What every study's config (a frozen dataclass deriving from this) shares: one TOML reader and
    writer, and views of the shared settings. A config with every field of a settings class can simply
    derive from it too (`ExperimentConfig(StudyConfig, RunSettings, SamplingSettings, ModelSettings)`).

    TABLE: the config's own TOML table ("experiment"). FILE_PATHS: fields holding a path (or a mapping
    of paths) that a TOML file gives relative to itself."""

    TABLE: ClassVar[str] = ""
    FILE_PATHS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        """The shared settings' checks; a study config's own `__post_init__` calls this first."""
        if isinstance(self, ModelSettings):
            check_model(self)
        if isinstance(self, SamplingSettings):
            check_sampling(self)
        if isinstance(self, RunSettings):
            check_run(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Self:
        """Fields from a TOML file (its [TABLE] or its top level, and [model], [sampling], [run]), then
        `overrides` (None ignored)."""
        return config_from_toml(cls, path, cls.TABLE, sections=SECTIONS, relative_paths=cls.FILE_PATHS, **overrides)

    @classmethod
    def from_mapping(cls, data: Any, source: str = "options") -> Self:
        return config_from_mapping(cls, data, source, sections=SECTIONS)

    def to_toml(self) -> str:
        """The whole config as TOML (own fields under [TABLE], shared ones under their section)."""
        return config_to_toml(self, self.TABLE, sections=SECTIONS)

    @property
    def model_settings(self) -> ModelSettings:
        return config_part(self, ModelSettings)

    @property
    def sampling(self) -> SamplingSettings:
        return config_part(self, SamplingSettings)

    @property
    def run(self) -> RunSettings:
        return config_part(self, RunSettings)
