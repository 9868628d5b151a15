"""Devices and parameter placement: one `data` mesh axis over this process's devices."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh() -> Mesh:
    """This process's devices on one `data` axis: prompts are split over it, parameters replicated.

    Local, not global, devices: in a multi-process job every process runs its own share of prompts
    (`jaxprobe.runtime.distributed`), so no program ever waits on another host."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def replicate(params: Any) -> Any:
    """Place a parameter pytree once on every device of the data mesh (one copy per device, no more)."""
    return jax.device_put(params, NamedSharding(data_mesh(), PartitionSpec()))


def place_params(params: Any, dtype: Any) -> Any:
    """Host parameters (numpy) -> `dtype`, replicated over the data mesh in one transfer per leaf.

    Loaders call this once, so a pipeline holds exactly one copy of each parameter per device."""
    return replicate(jax.tree.map(lambda a: np.asarray(a, dtype=dtype), params))
