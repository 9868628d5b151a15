"""`jaxprobe.load`: checkpoints as users have them on disk -> a Pipeline of Flax components.

Accepted sources:
- `"tiny"`: the bundled randomly initialised SD-1.x-shaped model (offline, for demos and tests);
- `"sd15-random"`: SD 1.5 at full size with random weights (speed and memory measurements);
- a diffusers pipeline folder (`model_index.json` with text_encoder/, tokenizer/, unet/, vae/,
  scheduler/, optionally image_encoder/ and feature_extractor/; `variant="fp16"` weight files); DiT folders
  (transformer/, vae/, scheduler/, the class names in `id2label`) and PixArt folders (a T5 text_encoder/ and
  its tokenizer/, transformer/) too;
- a transformers CLIP folder (`config.json` + safetensors/.bin, sharded or not): CLIPTextModel,
  CLIPTextModelWithProjection, CLIPVisionModel(WithProjection) or a full CLIPModel; or a Dinov2Model folder,
  an image encoder like CLIP's vision tower (T5 encoder folders load as components: `checkpoints.encoders`);
- a model id (`org/name`) already in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME), never
  downloaded;
- an original single-file checkpoint (`.safetensors`, `.ckpt`; SD 1.x, 2.x, SDXL base and refiner,
  `checkpoints.single_file`) with `config=` a diffusers folder or id of the same family for the configs,
  tokenizer and scheduler.
LoRA files (`checkpoints.lora`, kohya or diffusers/PEFT layout, SD 1.x/2.x or SDXL) merge into the UNet and
text encoders of a diffusers folder or a single file. Every load records what it read (`checkpoints.provenance`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprobe.checkpoints import encoders
from jaxprobe.checkpoints.component import Component
from jaxprobe.checkpoints.diffusers import load_denoiser, load_vae
from jaxprobe.checkpoints.provenance import describe_source
from jaxprobe.checkpoints.tokenizer import PromptTokenizer
from jaxprobe.checkpoints.weights import (
    abstract_params,
    convert_state_dict,
    find_weight_files,
    read_config,
    open_state_dict,
)
from jaxprobe.errors import CheckpointError
from jaxprobe.models import flux, sd3
from jaxprobe.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, ImagePreprocess
from jaxprobe.models.clip import example_inputs as clip_example_inputs
from jaxprobe.models.schedulers import scheduler_config
from jaxprobe.runtime.devices import ParamSharding

# The max_sequence_length T5-conditioned pipelines pad prompts to, by model_index.json's `_class_name`.
T5_SEQUENCE_LENGTHS = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Keys a checkpoint may hold that no forward pass reads.
_BUFFERS = ("*position_ids", "logit_scale")


def compute_dtype(dtype: str | Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it, read at call time (tests and users set env vars late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_source(source: str | Path) -> Path:
    """A local folder as is, or an `org/name` model id looked up in the local HF cache (no network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file but not a single-file checkpoint (.safetensors, .ckpt); pass it "
                              "or the checkpoint's folder (the one with config.json or model_index.json).")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):  # not an org/name id: a path the user mistyped
        near = path.parent if path.parent.is_dir() else None
        raise CheckpointError(
            f"no checkpoint folder {path}" + (f" (the folder {near} exists)" if near and str(near) != "." else "")
            + ": check the path, or pass 'tiny', 'sd15-random' or an org/name model id in the local Hugging Face "
            "cache (`jaxprobe info` lists them).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(str(source), cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as err:
        raise CheckpointError(
            f"{source!r} is neither a folder nor a model id in the local Hugging Face cache ({cache}). "
            "Pass the path of a downloaded checkpoint, set HF_HOME/HF_HUB_CACHE to the cache that holds "
            f"it, or download it where there is network (`hf download {source}`). "
            "`jaxprobe info` lists the models in the cache.") from err


def _with_prefix(state: dict[str, np.ndarray], prefix: str, tops: tuple[str, ...]) -> dict[str, np.ndarray]:
    """transformers >= 5 saves CLIPTextModel/CLIPVisionModel without the `text_model.`/`vision_model.`
    level that older checkpoints (all SD releases) have; put it back so one mapping serves both."""
    if any(k.startswith(prefix) for k in state):
        return state
    return {(prefix + k if k.startswith(tops) else k): v for k, v in state.items()}


@dataclass(frozen=True)
class _Tower:
    """How one CLIP tower sits in a checkpoint: its own architectures, its key prefix, its config."""

    component: str                        # the pipeline component (site prefix)
    architectures: dict[str, bool]        # transformers class -> has a projection layer
    config_key: str                       # where a full CLIPModel nests this tower's config
    prefix: str                           # key prefix that transformers >= 5 leaves out of single-tower files
    tops: tuple[str, ...]                 # top-level modules under that prefix
    other: tuple[str, ...]                # keys of the other tower in a CLIPModel, unused here
    config_cls: type
    module_cls: type


TEXT_TOWER = _Tower("text_encoder", {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}, "text_config",
                    "text_model.", ("embeddings.", "encoder.", "final_layer_norm."),
                    ("vision_model.*", "visual_projection.*"), CLIPTextConfig, CLIPTextModel)
VISION_TOWER = _Tower("image_encoder", {"CLIPVisionModel": False, "CLIPVisionModelWithProjection": True},
                      "vision_config", "vision_model.", ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."),
                      ("text_model.*", "text_projection.*"), CLIPVisionConfig, CLIPVisionModel)


def load_clip_tower(tower: _Tower, folder: Path, *, dtype: Any, variant: str | None = None,
                    state: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                    name: str | None = None, sharding: ParamSharding | None = None) -> Component:
    """One CLIP tower from a transformers folder holding it alone or inside a full CLIPModel. name: the
    pipeline component it becomes (default the tower's: "text_encoder"; SDXL's second is "text_encoder_2")."""
    config = config if config is not None else read_config(folder / "config.json", tower.component)
    arch = (config.get("architectures") or [next(iter(tower.architectures))])[0]
    full_clip = arch == "CLIPModel"
    if not full_clip and arch not in tower.architectures:
        raise CheckpointError(f"{folder}: architecture {arch} is not what jaxprobe reads as {tower.component} "
                              f"({', '.join([*tower.architectures, 'CLIPModel'])}).")
    tower_cfg = {**config.get(tower.config_key, {}), "projection_dim": config.get("projection_dim")} if full_clip else config
    cfg = tower.config_cls.from_dict(tower_cfg, with_projection=full_clip or tower.architectures[arch])
    module = tower.module_cls(cfg, dtype=dtype)
    state = state if state is not None else open_state_dict(find_weight_files(folder, variant=variant))
    state = _with_prefix(state, tower.prefix, tower.tops)
    ignore = (*_BUFFERS, *tower.other) if full_clip else _BUFFERS
    params = convert_state_dict(state, abstract_params(module, clip_example_inputs(cfg)), ignore=ignore,
                                what=f"{tower.component} at {folder}", dtype=dtype, place=(sharding or ParamSharding()).put)
    return Component(name or tower.component, module, params, cfg)


def _image_parts(folder: Path, *, dtype: Any, variant: str | None = None, sharding: ParamSharding | None = None,
                 **loaded: Any) -> dict[str, Any]:
    """The image encoder a folder holds, CLIP's vision tower or DINOv2, with the preprocessing it expects."""
    config = loaded.get("config") or read_config(folder / "config.json", "image encoder")
    if encoders.architecture(folder, config) in encoders.DINOV2_ARCHITECTURES:
        image = encoders.load_dinov2(folder, dtype=dtype, variant=variant, state=loaded.get("state"),
                                     sharding=sharding)
        return {"image_encoder": image, "image_preprocess": encoders.dinov2_preprocess(folder)}
    image = load_clip_tower(VISION_TOWER, folder, dtype=dtype, variant=variant, sharding=sharding, **loaded)
    return {"image_encoder": image, "image_preprocess": _image_preprocess(folder, image.config)}


def _image_preprocess(folder: Path, cfg: CLIPVisionConfig) -> ImagePreprocess:
    for candidate in (folder / "preprocessor_config.json", folder.parent / "feature_extractor" / "preprocessor_config.json"):
        if candidate.is_file():
            return ImagePreprocess.from_dict(read_config(candidate))
    return ImagePreprocess(size=cfg.image_size, crop_size=cfg.image_size)


def _load_transformers_dir(folder: Path, dtype: Any, variant: str | None,
                           sharding: ParamSharding | None = None) -> dict[str, Any]:
    config = read_config(folder / "config.json")
    arch = (config.get("architectures") or [""])[0]
    if arch in encoders.T5_ARCHITECTURES:  # its prompts need the padding mask the text programs do not pass yet
        raise CheckpointError(f"{folder} is a T5 encoder, a component of PixArt-style pipelines rather than a "
                              "pipeline: load it with jaxprobe.checkpoints.encoders.load_t5_encoder(folder) and "
                              "load_t5_tokenizer(folder, max_sequence_length).")
    parts: dict[str, Any] = {}
    state = open_state_dict(find_weight_files(folder, variant=variant))
    if arch in TEXT_TOWER.architectures or arch == "CLIPModel":
        parts["text_encoder"] = load_clip_tower(TEXT_TOWER, folder, dtype=dtype, state=state, config=config,
                                                sharding=sharding)
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            parts["tokenizer"] = PromptTokenizer.from_dir(folder, parts["text_encoder"].config.max_position_embeddings)
    if arch in VISION_TOWER.architectures or arch == "CLIPModel" or arch in encoders.DINOV2_ARCHITECTURES:
        parts.update(_image_parts(folder, dtype=dtype, state=state, config=config, sharding=sharding))
    if not parts:
        raise CheckpointError(f"{folder}: config.json names architecture {arch or '(none)'}; jaxprobe loads "
                              "CLIP text/vision models, DINOv2 models and Stable Diffusion pipelines "
                              "(model_index.json).")
    return parts


def _load_diffusers_dir(folder: Path, dtype: Any, variant: str | None,
                        weights: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                        loras: Sequence[tuple[str | Path, float]] = (),
                        sharding: ParamSharding | None = None) -> dict[str, Any]:
    """A diffusers pipeline folder's components. weights: {component: state dict} replacing the folder's
    weight files (a single file's, renamed), the folder then giving configs, tokenizer and scheduler;
    loras: (file, scale) merged into the UNet and text encoder weights first. The folder's own weights are
    opened, not read: each component's tensors stream onto the devices as it is converted."""
    from jaxprobe.models.schedulers import SchedulerConfig

    index = read_config(folder / "model_index.json", "pipeline")
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    if not listed & {"text_encoder", "text_encoder_2", "unet", "transformer"}:
        raise CheckpointError(f"{folder}/model_index.json lists no text_encoder, unet or transformer component "
                              f"({sorted(listed) or 'no components at all'}): it is incomplete or not a text-to-image "
                              "pipeline's; re-download the checkpoint.")
    absent = sorted(k for k in listed & {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                         "tokenizer_2", "tokenizer_3", "unet", "transformer", "vae", "scheduler"}
                    if not (folder / k).is_dir())
    if absent:
        raise CheckpointError(f"{folder}/model_index.json lists {', '.join(absent)} but the folder(s) are missing: "
                              "the download is partial. Re-download those components.")
    weighted = [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")
                if name in listed]
    states = {name: dict(weights[name]) if weights and name in weights else
              open_state_dict(find_weight_files(folder / name, variant=variant)) for name in weighted}
    if loras:
        from jaxprobe.checkpoints.lora import merge_loras

        for name in ("text_encoder", "text_encoder_2"):  # LoRA files name text modules with the text_model.
            if name in states:                          # level that transformers >= 5 drops from CLIPTextModel
                states[name] = _with_prefix(states[name], TEXT_TOWER.prefix, TEXT_TOWER.tops)
        states = merge_loras(states, loras, unet_config=_unet_config(folder) if "unet" in states else None)
    parts: dict[str, Any] = {}
    t5_text = "text_encoder" in listed and \
        encoders.architecture(folder / "text_encoder") in encoders.T5_ARCHITECTURES
    if t5_text:   # PixArt: a T5 encoder, prompts padded to the pipeline's max_sequence_length
        parts["text_encoder"] = encoders.load_t5_encoder(folder / "text_encoder", dtype=dtype,
                                                         state=states.pop("text_encoder"), sharding=sharding)
    elif "text_encoder" in listed:
        parts["text_encoder"] = load_clip_tower(TEXT_TOWER, folder / "text_encoder", dtype=dtype,
                                                state=states.pop("text_encoder"), sharding=sharding)
    if "tokenizer" in listed and t5_text:
        parts["tokenizer"] = encoders.load_t5_tokenizer(
            folder / "tokenizer", T5_SEQUENCE_LENGTHS.get(index.get("_class_name"), 120), lowercase=True)
    elif "tokenizer" in listed:
        length = parts["text_encoder"].config.max_position_embeddings if "text_encoder" in parts else None
        parts["tokenizer"] = PromptTokenizer.from_dir(folder / "tokenizer", length)
    t5_second = "text_encoder_2" in listed and \
        encoders.architecture(folder / "text_encoder_2") in encoders.T5_ARCHITECTURES
    if t5_second:   # FLUX: T5 beside CLIP-L, unmasked, padded to FluxPipeline's max_sequence_length
        parts["text_encoder_2"] = encoders.load_t5_encoder(folder / "text_encoder_2", dtype=dtype,
                                                           state=states["text_encoder_2"], name="text_encoder_2")
        if "tokenizer_2" in listed:
            parts["tokenizer_2"] = encoders.load_t5_tokenizer(folder / "tokenizer_2", flux.T5_SEQUENCE_LENGTH)
    elif "text_encoder_2" in listed:  # SDXL: OpenCLIP bigG with projection, its own tokenizer
        parts["text_encoder_2"] = load_clip_tower(TEXT_TOWER, folder / "text_encoder_2", dtype=dtype,
                                                  state=states.pop("text_encoder_2"), name="text_encoder_2",
                                                  sharding=sharding)
        if "tokenizer_2" in listed:
            parts["tokenizer_2"] = PromptTokenizer.from_dir(
                folder / "tokenizer_2", parts["text_encoder_2"].config.max_position_embeddings)
    if "text_encoder_3" in listed:  # SD3: T5, its states after the CLIP tokens
        parts["text_encoder_3"] = encoders.load_t5_encoder(folder / "text_encoder_3", dtype=dtype,
                                                           state=states.pop("text_encoder_3"), name="text_encoder_3",
                                                           sharding=sharding)
        if "tokenizer_3" in listed:
            parts["tokenizer_3"] = encoders.load_t5_tokenizer(folder / "tokenizer_3", sd3.T5_SEQUENCE_LENGTH)
    # SDXL pipelines' conditioning switches, with StableDiffusionXL(Img2Img)Pipeline's defaults
    options = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index}
    if "id2label" in index:   # DiT: the class names `capture` resolves, as DiTPipeline.get_label_ids
        options["id2label"] = _id2label(index["id2label"], folder)
    if options:
        parts["pipeline_options"] = options
    if "unet" in listed:
        parts["unet"] = load_denoiser(folder / "unet", component="unet", dtype=dtype, state=states.pop("unet"),
                                      sharding=sharding)
    if "transformer" in listed:  # DiT, PixArt: the denoiser, named as the checkpoint names it
        parts["unet"] = load_denoiser(folder / "transformer", component="transformer", dtype=dtype,
                                      state=states.pop("transformer"), sharding=sharding)
    if "vae" in listed:
        parts["vae"] = load_vae(folder / "vae", dtype=dtype, state=states.pop("vae"), sharding=sharding)
    if "scheduler" in listed:
        parts["scheduler"] = SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json")
    if "image_encoder" in listed and (folder / "image_encoder").is_dir():
        parts.update(_image_parts(folder / "image_encoder", dtype=dtype, variant=variant, sharding=sharding))
    return parts


def _id2label(raw: Any, folder: Path) -> dict[int, str]:
    """model_index.json's `id2label` ({"0": "tench, Tinca tinca", ...}) with integer keys."""
    try:
        return {int(k): str(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/model_index.json: id2label must map class ids to names, like "
                              "{\"0\": \"tench, Tinca tinca\"}") from err


def _load_single_file(path: Path, config: str | Path | None, dtype: Any, variant: str | None,
                      loras: Sequence[tuple[str | Path, float]], sharding: ParamSharding | None = None) -> dict[str, Any]:
    """An original-layout single file: weights from it, configs, tokenizer and scheduler from `config`."""
    from jaxprobe.checkpoints import single_file
    from jaxprobe.models.vae import VAEConfig

    state = single_file.read_single_file(path)
    family = single_file.infer_family(state)
    if config is None:
        raise CheckpointError(
            f"{path} is a single-file {family.upper()} checkpoint: it holds weights but no configs or tokenizer. "
            "Pass config= (CLI: --model-config) a diffusers folder or cached model id of the same family, e.g. a local "
            f"copy of {_CONFIG_EXAMPLES[family]}")
    folder = resolve_source(config)
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"config={config!r} is not a diffusers pipeline folder (no model_index.json)")
    index = read_config(folder / "model_index.json", "pipeline")
    listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    configs: dict[str, Any] = {name: _text_config(folder / name) for name in ("text_encoder", "text_encoder_2")
                               if name in listed}
    if "unet" in listed:
        configs["unet"] = _unet_config(folder)
    if "vae" in listed:
        configs["vae"] = VAEConfig.from_dict(read_config(folder / "vae" / "config.json", "VAE"))
    return _load_diffusers_dir(folder, dtype, variant, weights=single_file.component_states(state, configs),
                               loras=loras, sharding=sharding)


def _text_config(folder: Path) -> CLIPTextConfig:
    """A text encoder's config as `load_clip_tower` reads it (with the projection of
    CLIPTextModelWithProjection, SDXL's text_encoder_2)."""
    config = read_config(folder / "config.json", "text encoder")
    arch = (config.get("architectures") or [next(iter(TEXT_TOWER.architectures))])[0]
    return CLIPTextConfig.from_dict(config, with_projection=TEXT_TOWER.architectures.get(arch, False))


def _unet_config(folder: Path) -> Any:
    from jaxprobe.models.unet import UNetConfig

    return UNetConfig.from_dict(read_config(folder / "unet" / "config.json", "unet"))


_CONFIG_EXAMPLES = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "sd2": "stabilityai/stable-diffusion-2-1 (v-prediction) or -2-1-base (epsilon)",
                    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0"}


def load_parts(source: str | Path = "tiny", *, dtype: Any = jnp.float32, variant: str | None = None,
               image_encoder: str | Path | None = None, scheduler: str | None = None,
               config: str | Path | None = None, prediction_type: str | None = None,
               loras: Sequence[tuple[str | Path, float]] = (),
               sharding: ParamSharding | None = None) -> tuple[str, dict[str, Any]]:
    """(label, {component name: Component, "tokenizer": ..., "scheduler": ...}) for `source`; see the
    module docstring for what it accepts. `jaxprobe.load` makes a Pipeline of them. sharding: how every
    component's parameters lie over the devices (default: replicated)."""
    from jaxprobe.checkpoints.random import is_random_weights, random_parts
    from jaxprobe.checkpoints.single_file import is_single_file

    if loras and (is_random_weights(source) or not (is_single_file(source) or
                                                     (resolve_source(source) / "model_index.json").is_file())):
        raise CheckpointError("LoRA adapters merge into a Stable Diffusion pipeline's UNet and text encoders: load a "
                              "diffusers folder or a single file with them")
    if is_random_weights(source):
        parts, label = random_parts(str(source), dtype, sharding), str(source)   # placed as drawn, on first use
    elif is_single_file(source):
        parts, label = _load_single_file(Path(source).expanduser(), config, dtype, variant, loras,
                                         sharding), str(source)
    else:
        folder = resolve_source(source)
        label = str(source)
        if (folder / "model_index.json").is_file():
            parts = _load_diffusers_dir(folder, dtype, variant, loras=loras, sharding=sharding)
        elif (folder / "config.json").is_file():
            parts = _load_transformers_dir(folder, dtype, variant, sharding)
        else:
            raise CheckpointError(f"{folder} holds neither model_index.json (a diffusers pipeline) nor "
                                  "config.json (a transformers model); point --model at the checkpoint's root folder.")
    if image_encoder is not None:
        parts.update(_image_parts(resolve_source(image_encoder), dtype=dtype, variant=variant, sharding=sharding))
    if scheduler is not None:
        parts["scheduler"] = scheduler_config(scheduler, parts.get("scheduler"))
    parts["provenance"] = describe_source(
        source, None if is_random_weights(source) or is_single_file(source) else resolve_source(source),
        dtype=np.dtype(dtype).name, config=config, loras=loras)
    if prediction_type is not None:
        parts["provenance"]["prediction_type"] = prediction_type
        if parts.get("scheduler") is None:
            raise CheckpointError("prediction_type= sets the sampler's, but this checkpoint has no scheduler")
        parts["scheduler"] = dataclasses.replace(parts["scheduler"], prediction_type=prediction_type)
    return label, parts
