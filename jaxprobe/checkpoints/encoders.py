"""transformers encoder folders beyond CLIP -> Components: T5 (PixArt's text encoder) and DINOv2 (an image
feature baseline beside CLIP's vision tower).

Both are plain `config.json` + weights folders (safetensors or .bin, sharded or not, `variant="fp16"` files);
the Flax modules are named like the checkpoint keys, so loading is `weights.convert_state_dict` plus the few
keys a forward pass never reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints.component import Component
from jaxprobe.checkpoints.tokenizer import PromptTokenizer
from jaxprobe.checkpoints.weights import (
    abstract_params,
    convert_state_dict,
    find_weight_files,
    read_config,
    open_state_dict,
)
from jaxprobe.errors import CheckpointError
from jaxprobe.models import dinov2, t5
from jaxprobe.models.clip import ImagePreprocess
from jaxprobe.runtime.devices import ParamSharding

# T5 folders PixArt and SD3 ship are T5EncoderModel; a whole T5 holds the same encoder beside a decoder.
T5_ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")
DINOV2_ARCHITECTURES = ("Dinov2Model",)
# transformers ties encoder.embed_tokens to shared and may save both; a whole T5's decoder is not used here.
_T5_UNUSED = ("encoder.embed_tokens.weight", "decoder.*", "lm_head.*")


def architecture(folder: Path, config: Mapping[str, Any] | None = None) -> str:
    """The transformers class a folder's config.json names ("" when it names none)."""
    config = config if config is not None else read_config(Path(folder) / "config.json")
    return (config.get("architectures") or [""])[0]


def _check_architecture(folder: Path, config: Mapping[str, Any], accepted: tuple[str, ...], what: str) -> None:
    arch = architecture(folder, config)
    if arch and arch not in accepted:
        raise CheckpointError(f"{folder}: config.json names {arch}, not a {what} ({', '.join(accepted)}); "
                              f"point at the {what} folder itself (a pipeline's text_encoder/ or image_encoder/).")


def _state(folder: Path, variant: str | None, state: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(state) if state is not None else open_state_dict(find_weight_files(folder, variant=variant))


def load_t5_encoder(folder: str | Path, *, dtype: Any = jnp.float32, variant: str | None = None,
                    state: Mapping[str, Any] | None = None, name: str = "text_encoder",
                    sharding: ParamSharding | None = None) -> Component:
    """A transformers T5 folder (T5EncoderModel, or the encoder of a whole T5) -> its Component, whose sites
    are `{name}.encoder.block.{i}` and `{name}.encoder.final_layer_norm`. Half precision: prefer bfloat16;
    T5 v1.1's activations overflow float16 (transformers keeps its `wo` layers in float32 for that)."""
    folder = Path(folder)
    raw = read_config(folder / "config.json", "T5 encoder")
    _check_architecture(folder, raw, T5_ARCHITECTURES, "T5 encoder")
    config = t5.T5Config.from_dict(raw)
    module = t5.T5EncoderModel(config, dtype=dtype)
    weights = _state(folder, variant, state)
    if "shared.weight" not in weights and "encoder.embed_tokens.weight" in weights:  # saved from the tied copy
        weights["shared.weight"] = weights.pop("encoder.embed_tokens.weight")
    params = convert_state_dict(weights, abstract_params(module, t5.example_inputs(config)), ignore=_T5_UNUSED,
                                what=f"T5 encoder at {folder}", dtype=dtype, place=(sharding or ParamSharding()).put)
    return Component(name, module, params, config)


def load_t5_tokenizer(folder: str | Path, max_sequence_length: int = 120, lowercase: bool = False) -> PromptTokenizer:
    """The T5 tokenizer of a folder (tokenizer.json or spiece.model), padding and truncating every prompt to
    `max_sequence_length` tokens as PixArt pipelines do (PixArt-alpha: 120, PixArt-Sigma: 300); lowercase: as
    their prompt preprocessing does (without `clean_caption`)."""
    return PromptTokenizer.t5_from_dir(folder, max_sequence_length, lowercase)


def load_dinov2(folder: str | Path, *, dtype: Any = jnp.float32, variant: str | None = None,
                state: Mapping[str, Any] | None = None, name: str = "image_encoder",
                sharding: ParamSharding | None = None) -> Component:
    """A transformers Dinov2Model folder -> its Component, whose sites are `{name}.embeddings`,
    `{name}.encoder.layer.{i}` and `{name}.layernorm`."""
    folder = Path(folder)
    raw = read_config(folder / "config.json", "DINOv2")
    _check_architecture(folder, raw, DINOV2_ARCHITECTURES, "DINOv2 model")
    config = dinov2.Dinov2Config.from_dict(raw)
    module = dinov2.Dinov2Model(config, dtype=dtype)
    params = convert_state_dict(_state(folder, variant, state), abstract_params(module, dinov2.example_inputs(config)),
                                ignore=("embeddings.mask_token",), what=f"DINOv2 model at {folder}", dtype=dtype,
                                place=(sharding or ParamSharding()).put)
    return Component(name, module, params, config)


def dinov2_preprocess(folder: str | Path) -> ImagePreprocess:
    """What the folder's preprocessor_config.json (BitImageProcessor) says, else what DINOv2 was trained with:
    shortest side to 256, centre crop 224, ImageNet mean and std."""
    path = Path(folder) / "preprocessor_config.json"
    if path.is_file():
        return ImagePreprocess.from_dict(read_config(path, "image processor"))
    return ImagePreprocess(size=256, crop_size=224, mean=dinov2.IMAGENET_MEAN, std=dinov2.IMAGENET_STD)
