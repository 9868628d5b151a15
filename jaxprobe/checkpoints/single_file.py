"""Single-file Stable Diffusion checkpoints (`v1-5-pruned-emaonly.safetensors`, an SD 2.1 `.ckpt`): the
original (CompVis/Stability "LDM") key layout renamed to diffusers' and transformers' component state dicts.

A single file holds weights only, so the configs, tokenizer and scheduler come from `config=` (a diffusers
folder or cached id of the same family); the family is inferred from the keys and checked against it.
Layout of the original files, by component:

- UNet `model.diffusion_model.*`: `input_blocks.k.{0: resnet, 1: attention}` numbered across the down
  blocks (each block's layers, then its downsampler `op`), `middle_block.{0,1,2}`, `output_blocks.k`
  numbered across the up blocks (layers_per_block + 1 each, the upsampler after the last one's
  attention), `time_embed.{0,2}`, `label_emb.0.{0,2}` (SDXL), `out.{0,2}`; resnets as `in_layers`,
  `emb_layers`, `out_layers`, `skip_connection`; attentions already in diffusers' names;
- VAE `first_stage_model.*`: `encoder.down.i.block.j`, `mid.block_1|attn_1|block_2`, `decoder.up.i`
  numbered from the bottom (diffusers' up_blocks from the top), attention `q|k|v|proj_out` as 1x1 convs;
- text encoder `cond_stage_model.transformer.*` (SD 1.x: transformers' CLIPTextModel names) or
  `cond_stage_model.model.*` (SD 2.x: OpenCLIP, fused `in_proj` attention, one layer more than the
  checkpoint's diffusers text_encoder keeps);
- SDXL base (`sd_xl_base_1.0.safetensors`): `conditioner.embedders.0.transformer.*` (CLIP ViT-L in
  transformers' names) -> text_encoder, `conditioner.embedders.1.model.*` (OpenCLIP bigG, its
  `text_projection` an (width, projection) matrix applied as `x @ P`) -> text_encoder_2; the refiner has
  only `conditioner.embedders.0.model.*` (OpenCLIP) -> text_encoder_2.

EMA weights (`model_ema.<key without dots>`) replace the UNet's when the file holds them, as diffusers'
`extract_ema=True` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.checkpoints.weights import read_state_dict, read_torch_pickle, tensors_to_numpy
from jaxprobe.errors import CheckpointError, preview

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_HF, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_EMBEDDERS = "conditioner.embedders."
# Where each family's file keeps its text towers: component -> (key prefix, "clip" | "open_clip" layout)
TEXT_TOWERS = {
    "sd1": {"text_encoder": (CLIP_HF, "clip")},
    "sd2": {"text_encoder": (OPEN_CLIP, "open_clip")},
    "sdxl": {"text_encoder": (SDXL_EMBEDDERS + "0.transformer.", "clip"),
             "text_encoder_2": (SDXL_EMBEDDERS + "1.model.", "open_clip")},
    "sdxl-refiner": {"text_encoder_2": (SDXL_EMBEDDERS + "0.model.", "open_clip")},
}
# Key groups of other model families' single files, to name what a file is when it is not Stable Diffusion
_OTHER_FAMILIES = {"joint_blocks.": "SD3 (MMDiT)", "double_blocks.": "FLUX", "x_embedder.": "a DiT / PixArt",
                   "t5xxl.": "a T5 text encoder", "lora_": "a LoRA adapter (pass it as lora=, not as the model)"}

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def is_single_file(source: str | Path) -> bool:
    path = Path(source).expanduser()
    return path.is_file() and path.suffix.lower() in SUFFIXES


def read_single_file(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors or a torch pickle (.ckpt/.pt, read with `weights_only=True`)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".safetensors":
        try:
            return read_state_dict([path])
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise CheckpointError(f"cannot read {path} as safetensors ({err}): the file is truncated or not a "
                                  "checkpoint; download it again") from None
    data = read_torch_pickle(path)
    data = data.get("state_dict", data) if isinstance(data, dict) else data   # the original releases nest it
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    return tensors_to_numpy(data)


def infer_family(state: Mapping[str, np.ndarray]) -> str:
    """"sd1", "sd2", "sdxl" or "sdxl-refiner" from the keys, by the text towers diffusers' single-file loader
    tells them apart by (`conditioner.embedders.1.model.*`: SDXL base's OpenCLIP bigG; `.0.model.*` alone: the
    refiner's); a file without text towers by its UNet (SDXL's has `label_emb`, the added conditioning)."""
    keys = state.keys()
    if any(k.startswith(SDXL_EMBEDDERS + "1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith(SDXL_EMBEDDERS + "0.model.") for k in keys):
        return "sdxl-refiner"
    if any(k.startswith(OPEN_CLIP) for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_HF) for k in keys):
        return "sd1"
    if any(k.startswith(UNET + "input_blocks.") for k in keys):
        return "sdxl" if UNET + "label_emb.0.0.weight" in keys else "sd1"
    raise CheckpointError(f"no Stable Diffusion layout in this file: it holds {_key_groups(list(keys))}"
                          f"{_other_family(keys)}. jaxprobe reads the original SD 1.x/2.x/XL single files "
                          "(model.diffusion_model.input_blocks.*, cond_stage_model.* or conditioner.embedders.*) and "
                          "diffusers folders")


def _key_groups(keys: Sequence[str], depth: int = 2, limit: int = 6) -> str:
    """`'model.diffusion_model' (120 keys), 'encoder.weight' (1 key)`: what a file holds, by key prefix."""
    counts: dict[str, int] = {}
    for key in keys:
        group = ".".join(key.split(".")[:depth])
        counts[group] = counts.get(group, 0) + 1
    groups = sorted(counts, key=lambda g: -counts[g])
    shown = ", ".join(f"{g!r} ({counts[g]} key{'s' if counts[g] > 1 else ''})" for g in groups[:limit])
    return shown + (f" and {len(groups) - limit} more groups" if len(groups) > limit else "") if groups else "no keys"


def _other_family(keys: Iterable[str]) -> str:
    names = {family for key in keys for marker, family in _OTHER_FAMILIES.items()
             if key.startswith(marker) or f".{marker}" in key}
    return f" (these look like {' or '.join(sorted(names))})" if names else ""


def _with_ema(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The UNet's weights, its EMA copy preferred (`model_ema.<key minus 'model.' without dots>`)."""
    unet = {k: v for k, v in state.items() if k.startswith(UNET)}
    ema = {k: state.get("model_ema." + k.removeprefix("model.").replace(".", "")) for k in unet}
    if any(v is None for v in ema.values()):
        return unet
    return ema


def _match(name: str, rules: Sequence[str], sep: str) -> tuple[str, str] | None:
    """(rule, rest of name) for the first rule (dotted) that `name` (its parts joined by sep) starts with."""
    for rule in rules:
        written = rule if sep == "." else rule.replace(".", sep)
        if name == written or name.startswith(written + sep):
            return rule, name[len(written) + 1:]
    return None


def _rename(keys_to: dict[str, str], state: Mapping[str, np.ndarray], prefix: str, what: str
            ) -> dict[str, np.ndarray]:
    """Rename `prefix + old + rest` to `new + rest` by the longest matching `old` in keys_to. A key no rule
    reaches is an error, never dropped."""
    rules = sorted(keys_to, key=len, reverse=True)
    out, unknown = {}, []
    for key, value in state.items():
        found = _match(key.removeprefix(prefix), rules, ".")
        if found is None:
            unknown.append(key)
            continue
        old, rest = found
        out[f"{keys_to[old]}.{rest}" if rest else keys_to[old]] = value
    _refuse_unknown(unknown, what)
    return out


def _refuse_unknown(unknown: list[str], what: str) -> None:
    if unknown:
        raise CheckpointError(f"{what}: keys {preview(unknown)} match no part of the configured architecture; the "
                              "file and config= are of different families or sizes")


def unet_ldm_names(config: Any) -> dict[str, str]:
    """{LDM module path: diffusers module path} for the blocks of a UNetConfig, longest path first (the order
    `ldm_to_diffusers` tries them in). The LDM layout numbers `input_blocks`/`output_blocks` across the down/up
    blocks, so the table depends on the block structure."""
    n, cross = len(config.block_out_channels), ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    k = 1
    for b, kind in enumerate(config.down_block_types):
        for layer in range(config.layers_per_block[b]):
            table[f"input_blocks.{k}.0"] = f"down_blocks.{b}.resnets.{layer}"
            if kind in cross:
                table[f"input_blocks.{k}.1"] = f"down_blocks.{b}.attentions.{layer}"
            k += 1
        if b < n - 1:
            table[f"input_blocks.{k}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            k += 1
    k = 0
    for u, kind in enumerate(config.up_block_types):
        layers = config.layers_per_block[n - 1 - u] + 1
        for layer in range(layers):
            table[f"output_blocks.{k}.0"] = f"up_blocks.{u}.resnets.{layer}"
            if kind in cross:
                table[f"output_blocks.{k}.1"] = f"up_blocks.{u}.attentions.{layer}"
            if layer == layers - 1 and u < n - 1:
                table[f"output_blocks.{k}.{2 if kind in cross else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
            k += 1
    return {old: table[old] for old in sorted(table, key=len, reverse=True)}


_RESNET_PATH = re.compile(r"\.resnets\.\d+$")


def ldm_to_diffusers(name: str, table: Mapping[str, str], sep: str = ".") -> str | None:
    """An LDM UNet path (a parameter key, or a kohya LoRA module with sep="_") in diffusers' names, written
    with the same separator; None when no block of `table` (`unet_ldm_names`) holds it. Inside the blocks
    only resnets differ (`in_layers.2` -> `conv1`, ...): the attentions already use diffusers' names."""
    found = _match(name, list(table), sep)
    if found is None:
        return None
    old, rest = found
    new = table[old]
    if _RESNET_PATH.search(new):
        layer = _match(rest, list(_RESNET), sep)
        if layer is not None:
            rest = f"{_RESNET[layer[0]]}{sep}{layer[1]}" if layer[1] else _RESNET[layer[0]]
    new = new.replace(".", sep)
    return f"{new}{sep}{rest}" if rest else new


def unet_state(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """The UNet's keys in diffusers' names, for a UNetConfig (its blocks number the LDM indices)."""
    table = unet_ldm_names(config)
    out, unknown = {}, []
    for key, value in _with_ema(state).items():
        new = ldm_to_diffusers(key.removeprefix(UNET), table)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    _refuse_unknown(unknown, "UNet weights (model.diffusion_model.*)")
    return out


def vae_state(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """The VAE's keys in diffusers' names, for a VAEConfig."""
    n = len(config.block_out_channels)
    table = {f"{side}.{name}": f"{side}.{name}" for side in ("encoder", "decoder") for name in ("conv_in", "conv_out")}
    table.update({"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out",
                  "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})
    for side in ("encoder", "decoder"):
        table.update({f"{side}.mid.block_1": f"{side}.mid_block.resnets.0", f"{side}.mid.attn_1":
                      f"{side}.mid_block.attentions.0", f"{side}.mid.block_2": f"{side}.mid_block.resnets.1"})
    for i in range(n):
        for j in range(config.layers_per_block + 1):
            table[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            table[f"decoder.up.{i}.block.{j}"] = f"decoder.up_blocks.{n - 1 - i}.resnets.{j}"
        table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        table[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv"
    vae = {k: v for k, v in state.items() if k.startswith(VAE)}
    renamed = _rename(table, vae, VAE, "VAE weights (first_stage_model.*)")
    out = {}
    for key, value in renamed.items():
        key = key.replace(".nin_shortcut.", ".conv_shortcut.")
        if ".attentions." in key:
            head, _, leaf = key.rpartition(".")
            block, _, name = head.rpartition(".")
            key = f"{block}.{_VAE_ATTENTION.get(name, name)}.{leaf}"
            value = value[..., 0, 0] if value.ndim == 4 else value  # 1x1 convs in the file, linear layers in diffusers
        out[key] = value
    return out


def text_state(state: Mapping[str, np.ndarray], config: Any, prefix: str, layout: str) -> dict[str, np.ndarray]:
    """The text tower under `prefix` in transformers' CLIPTextModel(WithProjection) names, for a CLIPTextConfig:
    layout "clip" (already transformers' names: SD 1.x, SDXL's ViT-L) or "open_clip" (SD 2.x, SDXL's bigG: fused
    in_proj attention; layers the config does not keep are dropped, as SD 2.x's diffusers text_encoder drops
    the last)."""
    tower = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if layout == "clip":
        return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in tower.items()}
    out = {"text_model.embeddings.token_embedding.weight": tower["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": tower["positional_embedding"],
           "text_model.final_layer_norm.weight": tower["ln_final.weight"],
           "text_model.final_layer_norm.bias": tower["ln_final.bias"]}
    if config.projection_dim is not None:
        if "text_projection" not in tower:
            raise CheckpointError(f"the file's text tower {prefix}* has no text_projection, which config='s "
                                  "CLIPTextModelWithProjection needs: the file and config= are of different models")
        out["text_projection.weight"] = tower["text_projection"].T   # OpenCLIP: x @ P; a Linear: x @ W.T
    for i in range(config.num_hidden_layers):
        block, layer = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        if block + "attn.in_proj_weight" not in tower:
            raise CheckpointError(f"the file's text encoder has fewer than the {config.num_hidden_layers} layers "
                                  "config= asks for: the file and config= are of different models")
        for name, weight in zip("qkv", np.split(tower[block + "attn.in_proj_weight"], 3)):
            out[f"{layer}self_attn.{name}_proj.weight"] = weight
        for name, bias in zip("qkv", np.split(tower[block + "attn.in_proj_bias"], 3)):
            out[f"{layer}self_attn.{name}_proj.bias"] = bias
        for old, new in _OPEN_CLIP_LAYER.items():
            for leaf in ("weight", "bias"):
                out[f"{layer}{new}.{leaf}"] = tower[f"{block}{old}.{leaf}"]
    return out


_CONFIG_FOR = {"sd1": "an SD 1.x pipeline", "sd2": "an SD 2.x pipeline",
               "sdxl": "an SDXL base pipeline (text_encoder and text_encoder_2)",
               "sdxl-refiner": "an SDXL refiner pipeline (text_encoder_2 only)"}


def check_family(family: str, components: Sequence[str]) -> None:
    """Refuse a config= folder whose text encoders are not the file family's, before any weight is renamed:
    the shapes would disagree somewhere deep in the UNet, far from the cause."""
    towers = set(TEXT_TOWERS[family])
    have = {c for c in components if c.startswith("text_encoder")}
    if have and have != towers:
        found = "an SDXL refiner" if have == {"text_encoder_2"} else ("an SDXL base" if len(have) == 2 else
                                                                     "an SD 1.x/2.x")
        raise CheckpointError(f"this is an {family.upper()} single file but config= is {found} pipeline "
                              f"({', '.join(sorted(have))}); pass config= {_CONFIG_FOR[family]} folder or model id")


def component_states(state: Mapping[str, np.ndarray], configs: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """{component: state dict in diffusers/transformers names} for the components the file holds (the others
    come from config=)."""
    family = infer_family(state)
    if any(k.startswith(prefix) for prefix, _ in TEXT_TOWERS[family].values() for k in state):
        check_family(family, list(configs))   # a UNet-only file cannot tell an SDXL base from a refiner
    out = {}
    if "unet" in configs and any(k.startswith(UNET) for k in state):
        out["unet"] = unet_state(state, configs["unet"])
    if "vae" in configs and any(k.startswith(VAE) for k in state):
        out["vae"] = vae_state(state, configs["vae"])
    for component, (prefix, layout) in TEXT_TOWERS[family].items():
        if component in configs and any(k.startswith(prefix) for k in state):
            out[component] = text_state(state, configs[component], prefix, layout)
    return out
