"""LoRA adapters merged into the weights at load: W += scale * alpha / rank * up @ down, before conversion.

Two layouts, told apart by their keys:
- kohya / A1111 (`lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_` for the text encoder, `lora_te1_`/`lora_te2_` for SDXL's two): module paths with
  dots written as underscores, resolved against the component's own module names. UNet modules may also be
  written in the original LDM names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `middle_block_1`, `output_blocks_*`: SDXL LoRAs trained with sd-scripts, A1111 exports); they resolve
  through the single-file loader's LDM -> diffusers table;
- diffusers / PEFT (`unet.down_blocks.0....to_q.lora_A.weight`, `.lora_B.weight`; `text_encoder.`,
  `text_encoder_2.`): the module path as is, alpha = rank unless an `.alpha` is stored.
Every key must land on a weight of the loaded model: a LoRA for another architecture is an error that
lists what it could not place, never a silent partial merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.checkpoints.single_file import ldm_to_diffusers, unet_ldm_names
from jaxprobe.checkpoints.weights import as_array, read_state_dict
from jaxprobe.errors import CheckpointError, preview

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (file, scale); scale 1 when not given."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).is_file():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def _adapters(path: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(component, module as written): {"down", "up", "alpha"}} from one LoRA file."""
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")
    try:
        state = read_state_dict([path])
    except Exception as err:  # noqa: BLE001 - a damaged file raises several types
        raise CheckpointError(f"cannot read LoRA file {path} ({err}); download it again") from None
    adapters: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in state.items():
        for prefixes, parts in ((KOHYA_PREFIXES, _KOHYA_PARTS), (PEFT_PREFIXES, _PEFT_PARTS)):
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            part = next((p for p in parts if key.endswith("." + p)), None)
            if prefix and part:
                module = key[len(prefix):-len(part) - 1]
                adapters.setdefault((prefixes[prefix], module), {})[parts[part]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"LoRA file {path}: keys {preview(unknown)} are in no layout jaxprobe reads (kohya "
                              "lora_unet_/lora_te_/lora_te1_/lora_te2_ with lora_down/lora_up, or diffusers/PEFT "
                              "unet./text_encoder./text_encoder_2. with lora_A/lora_B; LyCORIS/LoHa/DoRA files are "
                              "not LoRAs jaxprobe merges)")
    broken = [m for (_, m), parts in adapters.items() if not {"down", "up"} <= set(parts)]
    if broken:
        raise CheckpointError(f"LoRA file {path}: modules {preview(broken)} lack their down or up matrix")
    return adapters


def _delta(down: np.ndarray, up: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """alpha / rank * up @ down, for linear (out, r) x (r, in) and conv (out, r, 1, 1) x (r, in, kh, kw) pairs."""
    rank = down.shape[0]
    factor = (float(alpha) if alpha is not None else rank) / rank
    down, up = down.astype(np.float32), up.astype(np.float32)
    if down.ndim == 4:
        return factor * np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    return factor * (up @ down)


def _target(module: str, state: Mapping[str, np.ndarray], underscored: Mapping[str, str],
            ldm_table: Mapping[str, str] | None) -> str | None:
    """The weight key of `state` a LoRA module names: as is (PEFT), with underscores for dots (kohya), or in the
    original LDM UNet names with underscores (kohya SDXL / A1111), renamed through `ldm_table`."""
    if f"{module}.weight" in state:
        return f"{module}.weight"
    if module in underscored:
        return underscored[module]
    renamed = ldm_to_diffusers(module, ldm_table, sep="_") if ldm_table else None
    return underscored.get(renamed) if renamed else None


def merge_loras(states: Mapping[str, Mapping[str, np.ndarray]], loras: Sequence[tuple[str | Path, float]], *,
                unet_config: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Copies of the component state dicts (torch layout, diffusers names) with every LoRA merged in order.
    unet_config: the UNet's UNetConfig, which places UNet modules written in the LDM names."""
    merged = {name: dict(state) for name, state in states.items()}
    ldm_table = unet_ldm_names(unet_config) if unet_config is not None else None
    # kohya writes module paths with underscores: matched against each model's own names
    underscored = {component: {k[: -len(".weight")].replace(".", "_"): k for k in state if k.endswith(".weight")}
                   for component, state in merged.items()}
    for path, scale in loras:
        path = Path(path).expanduser()
        unplaced, misfit = [], []
        for (component, module), parts in _adapters(path).items():
            state = merged.get(component)
            target = None if state is None else _target(module, state, underscored[component],
                                                        ldm_table if component == "unet" else None)
            if target is None:
                unplaced.append(f"{component}:{module}")
                continue
            weight = as_array(state[target])  # only merged tensors are read; the rest stay unread TensorRefs
            delta = _delta(parts["down"], parts["up"], parts.get("alpha"))
            if delta.shape != weight.shape:
                misfit.append(f"{component}:{module} {delta.shape} for {weight.shape}")
                continue
            state[target] = (weight.astype(np.float32) + scale * delta).astype(weight.dtype)
        if unplaced or misfit:
            raise CheckpointError(_refusal(path, unplaced, misfit, sorted(merged)))
    return merged


def _refusal(path: Path, unplaced: list[str], misfit: list[str], components: list[str]) -> str:
    """Every module of a LoRA that does not fit this model, and which model it is more likely for."""
    absent = sorted({u.partition(":")[0] for u in unplaced} - set(components))
    hint = (f" This model has no {', '.join(absent)}: an SDXL LoRA on an SD 1.x/2.x model?" if absent else
            " The LoRA is for another architecture (an SDXL LoRA on SD 1.x/2.x, or the reverse) or size.")
    found = [f"{len(unplaced)} modules match no weight of this model ({preview(unplaced)})"] if unplaced else []
    found += [f"{len(misfit)} make updates of the wrong shape ({preview(misfit)})"] if misfit else []
    return f"LoRA file {path}: {'; '.join(found)}.{hint} Nothing was merged; load the model the LoRA was trained for"
