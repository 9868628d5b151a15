"""Many processes (hosts) on one job, on JAX's own distributed runtime.

Work is split, never coordinated step by step: every process takes its share of the independent units
(chunks of prompts, feature sets), computes them on its *local* devices and writes them to storage all
processes see (the feature store, a results folder); a barrier then lets the results meet. A process
that dies loses only its unfinished units: the rerun reuses every finished chunk.

On SLURM, Open MPI and Cloud TPU pods `jax.distributed.initialize()` finds the coordinator, process
count and index by itself (`jaxprobe run --distributed`); elsewhere name them
(`--coordinator host:port --num-processes N --process-id I`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import jax

from jaxprobe.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """How to join a multi-process job. All None with `auto=True`: let JAX detect the cluster."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def requested(self) -> bool:
        return self.auto or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def initialize(cluster: Cluster) -> None:
    """Join the job described by `cluster` (nothing to do for a single process)."""
    if not cluster.requested:
        return
    named = (cluster.coordinator, cluster.num_processes, cluster.process_id)
    if not cluster.auto and None in named:
        raise InputError("a multi-process run needs all of --coordinator host:port, --num-processes and "
                         "--process-id (or --distributed alone on SLURM, Open MPI or a TPU pod)")
    if cluster.num_processes is not None and not 0 <= (cluster.process_id or 0) < cluster.num_processes:
        raise InputError(f"--process-id {cluster.process_id} is outside 0..{cluster.num_processes - 1}")
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id)


def share(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every process_count-th one, starting at its index."""
    return list(items[jax.process_index()::jax.process_count()])


def is_leader() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
