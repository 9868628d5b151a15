"""Checkpoint files on disk -> Flax parameter pytrees.

jaxprobe's Flax modules are named exactly like the PyTorch modules they mirror ("layers.3",
"to_out.0", "down_blocks.1.attentions.0"), so a parameter's Flax path joined with dots *is* its
PyTorch key, up to the leaf name. `convert_state_dict` is therefore the one key mapping for every
model family: it walks the parameter tree the Flax model expects, fetches each tensor by its derived
key, transposes kernels into Flax's layout and refuses any missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.errors import CheckpointError

# Flax leaf name -> PyTorch parameter name. Leaves not listed keep their name (e.g. CLIP's
# `class_embedding`, a bare nn.Parameter).
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

WEIGHT_FILE_STEMS = ("model", "diffusion_pytorch_model")
_BIN_NAMES = {"model": "pytorch_model", "diffusion_pytorch_model": "diffusion_pytorch_model"}


def torch_key(flax_path: tuple[str, ...]) -> str:
    """('text_model', 'encoder', 'layers.0', 'fc1', 'kernel') -> 'text_model.encoder.layers.0.fc1.weight'."""
    *modules, leaf = flax_path
    return ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def _to_flax_layout(leaf: str, tensor: np.ndarray, expected_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if tensor.ndim == 4 and len(expected_shape) == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # a 1x1 conv stored where we use a dense layer
        if tensor.ndim == 2:
            return tensor.T  # Linear (out, in) -> Dense (in, out)
        if tensor.ndim == 4:
            return tensor.transpose(2, 3, 1, 0)  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
    return tensor


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def convert_state_dict(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    prefix: str = "",
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
    what: str = "checkpoint",
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Map a PyTorch state dict onto the Flax parameter tree `expected`.

    state_dict: numpy arrays, or `TensorRef`s (`open_state_dict`) read only when their leaf is converted.
    expected: the `params` tree of the Flax model (arrays or `jax.ShapeDtypeStruct`s, e.g. from
        `jax.eval_shape(model.init, ...)["params"]`); only shapes are read.
    prefix: prepended to every derived key ("text_model." inside a full CLIPModel, say).
    ignore: glob patterns of checkpoint keys that are allowed to go unused (buffers such as
        `*.position_ids`, or the other tower of a CLIPModel).
    place: called with each leaf's Flax path and converted array as soon as it is made, its result taking the
        array's place (`ParamSharding.put`: onto the devices), so that with TensorRefs only about one tensor is
        on the host at a time.
    Returns the leaves cast to `dtype` in Flax layout (numpy arrays without `place`). Raises CheckpointError
    naming every missing, unexpected and mis-shaped key, before any tensor is read.
    """
    ignore = tuple(ignore)
    keys, missing, misshaped, used = {}, [], [], set()
    for path, leaf_spec in _flatten(expected).items():
        key = prefix + torch_key(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        # The layout change on a zero-stride stand-in gives the converted shape without reading the tensor.
        stored = tuple(state_dict[key].shape)
        shape = _to_flax_layout(path[-1], np.broadcast_to(np.zeros((), np.int8), stored), tuple(leaf_spec.shape)).shape
        if tuple(shape) != tuple(leaf_spec.shape):
            misshaped.append(f"{key}: checkpoint {stored} -> {tuple(shape)}, model expects {tuple(leaf_spec.shape)}")
            continue
        keys[path] = key, tuple(leaf_spec.shape)
    unexpected = sorted(
        k for k in state_dict
        if k.startswith(prefix) and k not in used and not any(fnmatch.fnmatchcase(k, p) for p in ignore)
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(what, missing, unexpected, misshaped))
    place = place or (lambda path, array: array)
    converted = {}
    for path, (key, shape) in keys.items():
        value = state_dict[key]
        tensor = as_array(value)
        converted[path] = place(path, _to_flax_layout(path[-1], tensor, shape).astype(dtype))
        del tensor, value  # before the next read: the host holds one checkpoint tensor at a time
    return _unflatten(converted)


def _mismatch_message(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    def listing(title: str, keys: list[str]) -> str:
        shown = "\n".join(f"    {k}" for k in keys[:20])
        more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        return f"  {title} ({len(keys)}):\n{shown}{more}"

    parts = [listing(t, ks) for t, ks in
             (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)) if ks]
    return (f"{what} does not match the model its config describes:\n" + "\n".join(parts)
            + "\nIs the config.json from the same checkpoint as the weights, and is the directory complete?")


# ---------------------------------------------------------------------------------------------
# Reading checkpoint folders


def read_config(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """A config JSON file (config.json, model_index.json, ...) with errors that name the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}: the {what} folder is incomplete; re-download or copy it whole.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or repair it.") from err


def find_weight_files(directory: Path, *, variant: str | None = None) -> list[Path]:
    """The weight files of one model folder, preferring safetensors, honouring `variant` ("fp16").

    Handles single files and sharded checkpoints (`*.index.json`). A requested variant that is
    absent falls back to the plain files, as diffusers does.
    """
    directory = Path(directory)
    variants = [variant, None] if variant else [None]
    for var in variants:
        for ext in ("safetensors", "bin"):
            for stem in WEIGHT_FILE_STEMS:
                name = stem if ext == "safetensors" else _BIN_NAMES[stem]
                base = f"{name}.{var}.{ext}" if var else f"{name}.{ext}"
                if (directory / base).is_file():
                    return [directory / base]
                index = directory / f"{base}.index.json"
                if index.is_file():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    absent = [s for s in shards if not (directory / s).is_file()]
                    if absent:
                        raise CheckpointError(f"{index} lists shards that are missing: {absent}. "
                                              "Re-download the checkpoint or copy the missing files.")
                    return [directory / s for s in shards]
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, diffusion_pytorch_model.safetensors, "
        f"pytorch_model.bin or a sharded *.index.json{f' (variant {variant!r})' if variant else ''}; "
        f"found {present or 'nothing'}.")


def read_state_dict(files: Iterable[Path]) -> dict[str, np.ndarray]:
    """Read safetensors or PyTorch .bin files into one flat dict of numpy arrays (dtype kept)."""
    return {k: as_array(v) for k, v in open_state_dict(files).items()}


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a safetensors file, read when `load` is called: a state dict of these lets a loader
    convert and place a checkpoint tensor by tensor instead of holding the whole of it on the host."""

    path: Path
    key: str
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        """The tensor as a fresh numpy array, dtype kept. The file is opened (memory-mapped) for this read alone,
        so pages already read do not stay mapped into the process while the rest of the checkpoint streams."""
        return _read_safetensors(self.path, keys=(self.key,))[self.key]


def as_array(value: TensorRef | np.ndarray) -> np.ndarray:
    """A state dict's value as a numpy array, reading it if it is a TensorRef."""
    return value.load() if isinstance(value, TensorRef) else np.asarray(value)


def open_state_dict(files: Iterable[Path]) -> dict[str, TensorRef | np.ndarray]:
    """The keys of safetensors or PyTorch .bin files, each mapped to a `TensorRef` (safetensors: nothing is
    read but the header) or, for .bin pickles, which torch can only load whole, to its numpy array."""
    from safetensors import safe_open

    state: dict[str, TensorRef | np.ndarray] = {}
    for path in files:
        path = Path(path)
        if path.suffix != ".safetensors":
            state.update(_read_torch_bin(path))
            continue
        try:
            with safe_open(str(path), framework="numpy") as f:
                state.update({k: TensorRef(path, k, tuple(f.get_slice(k).get_shape())) for k in f.keys()})
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError for damaged headers
            raise CheckpointError(f"cannot read {path}: {err}") from err
    return state


def _read_safetensors(path: Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """`keys` (default all) of one safetensors file as numpy arrays."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
    except (TypeError, KeyError, ValueError) as err:
        if "bf16" not in str(err).lower() and "bfloat16" not in str(err).lower():
            raise CheckpointError(f"cannot read {path}: {err}") from err
    # numpy has no bfloat16; ml_dtypes (a jax dependency) does, and the flax reader produces it.
    with safe_open(str(path), framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k)) for k in (f.keys() if keys is None else keys)}


def read_torch_pickle(path: Path) -> Any:
    """What a PyTorch pickle (.bin, .ckpt) holds, read with `weights_only=True`: tensors and plain containers,
    never code. A missing torch, a damaged file or a pickle holding objects is a CheckpointError."""
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; reading it needs torch, which is not installed. Install it "
            "(`pip install torch`), or convert the checkpoint to safetensors once where torch is installed "
            "(`save_pretrained(..., safe_serialization=True)`).") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unsafe pickle, or a damaged file
        raise CheckpointError(f"{path} cannot be read as a weights-only pickle ({type(err).__name__}: "
                              f"{str(err)[:200]}): it is damaged or holds objects other than tensors; jaxprobe never "
                              "unpickles code. Convert it to .safetensors where you trust it") from None


def tensors_to_numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The torch tensors of a state dict as numpy arrays (bfloat16, which numpy lacks, as float32)."""
    import torch

    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()
            if isinstance(v, torch.Tensor)}


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    return tensors_to_numpy(read_torch_pickle(path))


def abstract_params(module: Any, example_inputs: tuple[Any, ...]) -> Any:
    """The `params` tree `module.init` would make, as shapes only (traced, never computed)."""
    import jax

    return jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))["params"]
