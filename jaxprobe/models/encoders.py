"""The encoder towers a pipeline holds beside its denoiser, looked up by config type: text (CLIP, T5) and
image (CLIP vision, DINOv2). The pipeline asks here, never a model file, how to trace a tower and which of
its sites wildcards reach, so a new tower is its model file and one entry in `_TOWERS`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax

from jaxprobe.errors import CheckpointError
from jaxprobe.models import clip, dinov2, t5

_TOWERS: tuple[tuple[type, ModuleType], ...] = (
    (clip.CLIPTextConfig, clip), (clip.CLIPVisionConfig, clip), (t5.T5Config, t5), (dinov2.Dinov2Config, dinov2))


def _model_file(config: Any) -> ModuleType:
    for cls, module in _TOWERS:
        if isinstance(config, cls):
            return module
    raise CheckpointError(f"no encoder tower reads a {type(config).__name__}; known: "
                          f"{', '.join(cls.__name__ for cls, _ in _TOWERS)}")


def example_inputs(config: Any, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zeros shaped like the tower's inputs, for shape tracing."""
    return _model_file(config).example_inputs(config, batch)


def block_sites(config: Any) -> tuple[str, ...]:
    """Regexes of the tower's block-level sites (what `text_encoder.*` or `image_encoder.*` reaches)."""
    return _model_file(config).BLOCK_SITES
