"""`jaxprobe.load`: a checkpoint as users have it on disk -> a Pipeline (see `checkpoints.loading`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxprobe.checkpoints.loading import compute_dtype, load_parts
from jaxprobe.pipeline.pipeline import Pipeline


def load(source: str | Path = "tiny", *, dtype: str | Any = "float32", variant: str | None = None,
         image_encoder: str | Path | None = None, scheduler: str | None = None) -> Pipeline:
    """Load a pipeline (or just CLIP towers) from `source`: "tiny", "sd15-random", a diffusers or
    transformers folder, or an `org/name` model id already in the local Hugging Face cache.

    dtype: compute and parameter dtype ("float32", "bfloat16"). variant: weight-file variant such as
    "fp16" (falls back to plain files). image_encoder: a CLIP vision checkpoint (folder or id) used to
    embed generated images (`image_encoder.*` sites). scheduler: sampler name overriding the
    checkpoint's ("pndm", "ddim", "euler", "dpmpp_2m"), keeping its noise schedule.
    """
    dtype = compute_dtype(dtype)
    label, parts = load_parts(source, dtype=dtype, variant=variant, image_encoder=image_encoder, scheduler=scheduler)
    pipe = Pipeline(source=label, dtype=dtype, **parts)
    pipe.check_compatible()
    return pipe
