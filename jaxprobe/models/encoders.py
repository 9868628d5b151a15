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


# The key under which a text pass hands a masked tower's attention mask to the conditioning, beside its sites.
ATTENTION_MASK = "attention_mask"
# ... and under which a CLIP text pass hands on its pooled output (the final states at EOS, unprojected: FLUX's).
POOLED_OUTPUT = "pooler_output"
# ... and, under the Diffusion Lens, the layer whose raw states stand in for the tower's penultimate ones.
LENS_OUTPUT = "lens_output"


def takes_attention_mask(config: Any) -> bool:
    """Whether the tower masks padding (T5: prompts padded to max_sequence_length) rather than attending it
    causally up to EOS and ignoring the rest (CLIP)."""
    return isinstance(config, t5.T5Config)


def text_inputs(config: Any, ids: jax.Array, eos: jax.Array | None) -> tuple[jax.Array, ...]:
    """The positional inputs of one text-tower pass: the ids, and for masked towers the mask of the real tokens
    (up to each prompt's EOS, `eos` (b,))."""
    if not takes_attention_mask(config):
        return (ids,)
    if eos is None:
        raise ValueError(f"a {type(config).__name__} tower masks its padding: its pass needs the EOS positions")
    return ids, t5.attention_mask_from_eos(eos, ids.shape[1])
