"""`jaxprobe.load`: a checkpoint as users have it on disk -> a Pipeline (see `checkpoints.loading`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxprobe.checkpoints.lora import parse_lora_spec
from jaxprobe.checkpoints.loading import compute_dtype, load_parts
from jaxprobe.pipeline.pipeline import Pipeline
from jaxprobe.runtime.devices import ParamSharding
from jaxprobe.runtime.xla_flags import add_half_precision_cpu_flags


def load(source: str | Path = "tiny", *, dtype: str | Any = "float32", variant: str | None = None,
         image_encoder: str | Path | None = None, scheduler: str | None = None, config: str | Path | None = None,
         prediction_type: str | None = None, lora: Sequence[tuple[str | Path, float] | str] = (),
         shard: str | ParamSharding | None = None, mesh: Mesh | None = None) -> Pipeline:
    """Load a pipeline (or just CLIP towers) from `source`: "tiny", "sd15-random" (or "sdxl-random", "dit-random",
    "pixart-random", "sd3-random", "flux-random": full-size random weights, drawn on first use), a diffusers (SD, SDXL, DiT,
    PixArt, SD3) or
    transformers folder, an `org/name` model id already in the local Hugging Face cache, or an original
    single-file checkpoint (`.safetensors`/`.ckpt`, SD 1.x/2.x) with `config=` the diffusers folder or id
    whose configs, tokenizer and scheduler to use (`prediction_type=` overrides the scheduler's).
    lora: LoRA files merged into the UNet and text encoder, as (file, scale) or "FILE[:SCALE]".

    dtype: compute and parameter dtype ("float32", "bfloat16"). variant: weight-file variant such as
    "fp16" (falls back to plain files). image_encoder: a CLIP vision or DINOv2 checkpoint (folder or id)
    used to embed images (`image_encoder.*` sites). scheduler: sampler name overriding the
    checkpoint's ("pndm", "ddim", "euler", "dpmpp_2m"), keeping its noise schedule.

    shard: how parameters lie over the devices when one cannot hold them all: None (every device holds a
    replica), "fsdp" (each large leaf split along its largest evenly divisible dimension) or "tensor"
    (attention and MLP kernels split on their feature axes), or a `runtime.devices.ParamSharding` saying more
    (which leaves are too small to split). mesh: the devices to split over (default: this process's, as
    prompts are). Checkpoint folders stream onto the
    devices one tensor at a time, so the host never holds a whole component.
    """
    dtype = compute_dtype(dtype)
    if jnp.dtype(dtype).itemsize < 4:
        add_half_precision_cpu_flags()   # memory-lean CPU scheduling, before placing weights starts JAX
    loras = [parse_lora_spec(str(item)) if isinstance(item, (str, os.PathLike)) else (item[0], float(item[1]))
             for item in lora]
    label, parts = load_parts(source, dtype=dtype, variant=variant, image_encoder=image_encoder, scheduler=scheduler,
                              config=config, prediction_type=prediction_type, loras=loras,
                              sharding=shard if isinstance(shard, ParamSharding) else ParamSharding(shard, mesh))
    pipe = Pipeline(source=label, dtype=dtype, **parts)
    pipe.check_compatible()
    return pipe
