"""Devices and parameter placement: one `data` mesh axis over this process's devices, parameters
replicated over it or, when one device cannot hold them, sharded (`ParamSharding`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprobe.errors import InputError

SHARD_MODES = ("fsdp", "tensor")
# Layers whose kernel (in, out) is split on its input features under "tensor": the projections back to the
# residual stream (attention outputs, the second MLP layer), so the column-split layer before each feeds them
# without a gather (Megatron's pairing). Every other kernel splits its output features.
_ROW_PARALLEL = re.compile(r"(^|\.)(to_out\.0|to_add_out|out_proj|fc2|net\.2|wo|o|proj_out|output\.dense)$")


def data_mesh() -> Mesh:
    """This process's devices on one `data` axis: prompts are split over it, parameters replicated.

    Local, not global, devices: in a multi-process job every process runs its own share of prompts
    (`jaxprobe.runtime.distributed`), so no program ever waits on another host."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def replicate(params: Any) -> Any:
    """Place a parameter pytree once on every device of the data mesh (one copy per device, no more)."""
    return jax.device_put(params, NamedSharding(data_mesh(), PartitionSpec()))


@dataclass(frozen=True)
class ParamSharding:
    """How a model's parameters lie over a mesh.

    mode: None replicates every leaf (each device holds the whole model); "fsdp" splits each large leaf along
        its largest dimension that the device count divides; "tensor" splits attention and MLP kernels on their
        output features, or their input features for the projections back to the residual stream.
    mesh: the devices, by default `data_mesh()`; a leaf is split over all of its axes at once. It must hold
        this process's local devices, which the prompts are split over: jit then runs sharded parameters and
        sharded prompts as one program, GSPMD gathering what each layer needs.
    min_elements: leaves smaller than this stay replicated (norm scales, biases): splitting them saves little
        memory and costs a gather each.
    """

    mode: str | None = None
    mesh: Mesh | None = None
    min_elements: int = 1 << 14

    def __post_init__(self) -> None:
        if self.mode not in (None, *SHARD_MODES):
            raise InputError(f"unknown shard mode {self.mode!r}; choose {', '.join(SHARD_MODES)} or None (replicated)")
        if self.mesh is not None and set(self.mesh.devices.flat) != set(jax.local_devices()):
            raise InputError(f"the parameter mesh holds {self.mesh.devices.size} devices, but prompts are split over "
                             f"this process's {jax.local_device_count()}: give a mesh over jax.local_devices()")

    def spec(self, path: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec:
        """The PartitionSpec of the leaf at Flax `path` (module names, then the leaf's) with `shape`."""
        mesh = self.mesh or data_mesh()
        n = mesh.devices.size
        if self.mode is None or n == 1 or int(np.prod(shape, dtype=np.int64)) < self.min_elements:
            return PartitionSpec()
        if self.mode == "fsdp":
            fits = [d for d in range(len(shape)) if shape[d] % n == 0]
            axis = max(fits, key=lambda d: (shape[d], d)) if fits else None
        else:
            module = ".".join(path[:-1])
            axis = None
            if len(shape) >= 2 and path[-1] in ("kernel", "embedding"):
                axis = len(shape) - 2 if path[-1] == "kernel" and _ROW_PARALLEL.search(module) else len(shape) - 1
                axis = axis if shape[axis] % n == 0 else None
        if axis is None:
            return PartitionSpec()
        names = mesh.axis_names
        return PartitionSpec(*([None] * axis), names[0] if len(names) == 1 else names)

    def put(self, path: tuple[str, ...], array: Any) -> jax.Array:
        """One leaf (host or device) onto the devices, split as `spec` says: each device receives only its part."""
        return jax.device_put(array, NamedSharding(self.mesh or data_mesh(), self.spec(path, array.shape)))


def reshard(params: Any, sharding: ParamSharding | None = None) -> Any:
    """A parameter pytree, leaf by leaf, laid over the devices as `sharding` says (default: replicated)."""
    sharding = sharding or ParamSharding()
    return jax.tree_util.tree_map_with_path(
        lambda path, a: sharding.put(tuple(str(getattr(k, "key", k)) for k in path), a), params)


def place_params(params: Any, dtype: Any, sharding: ParamSharding | None = None) -> Any:
    """Host parameters (numpy) -> `dtype`, on the devices as `sharding` says (replicated by default) in one
    transfer per leaf.

    Loaders of whole host trees call this once, so a pipeline holds exactly one copy of each parameter per
    device; checkpoint loaders instead place leaf by leaf as they convert (`weights.convert_state_dict`)."""
    return reshard(jax.tree.map(lambda a: np.asarray(a, dtype=dtype), params), sharding)
