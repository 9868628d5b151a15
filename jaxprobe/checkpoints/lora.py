"""LoRA adapters merged into the weights at load: W += scale * alpha / rank * up @ down, before conversion.

Two layouts, told apart by their keys:
- kohya / A1111 (`lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_` for the text encoder): module paths with dots written as underscores, resolved
  against the component's own module names;
- diffusers / PEFT (`unet.down_blocks.0....to_q.lora_A.weight`, `.lora_B.weight`; `text_encoder.`): the
  module path as is, alpha = rank unless an `.alpha` is stored.
Every key must land on a weight of the loaded model: a LoRA for another architecture is an error that
lists what it could not place, never a silent partial merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxprobe.checkpoints.weights import read_state_dict
from jaxprobe.errors import CheckpointError, preview

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
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
                              "lora_unet_/lora_te_ with lora_down/lora_up, or diffusers/PEFT unet./text_encoder. "
                              "with lora_A/lora_B); an SDXL LoRA (lora_te1_/lora_te2_) needs SDXL support")
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


def merge_loras(states: Mapping[str, Mapping[str, np.ndarray]], loras: Sequence[tuple[str | Path, float]]
                ) -> dict[str, dict[str, np.ndarray]]:
    """Copies of the component state dicts (torch layout, diffusers names) with every LoRA merged in order."""
    merged = {name: dict(state) for name, state in states.items()}
    for path, scale in loras:
        path = Path(path).expanduser()
        unplaced = []
        # kohya writes module paths with underscores: matched against each model's own names
        underscored = {component: {k[: -len(".weight")].replace(".", "_"): k for k in state if k.endswith(".weight")}
                       for component, state in merged.items()}
        for (component, module), parts in _adapters(path).items():
            state = merged.get(component)
            target = None
            if state is not None:
                target = f"{module}.weight" if f"{module}.weight" in state else underscored[component].get(module)
            if target is None:
                unplaced.append(f"{component}:{module}")
                continue
            weight = state[target]
            delta = _delta(parts["down"], parts["up"], parts.get("alpha"))
            if delta.shape != weight.shape:
                raise CheckpointError(f"LoRA file {path}: {module} makes a {delta.shape} update for a {weight.shape} "
                                      "weight: the LoRA is for another architecture or size")
            state[target] = (weight.astype(np.float32) + scale * delta).astype(weight.dtype)
        if unplaced:
            raise CheckpointError(f"LoRA file {path}: {len(unplaced)} modules match no weight of this model "
                                  f"({preview(unplaced)}): the LoRA is for another architecture; nothing was merged")
    return merged
