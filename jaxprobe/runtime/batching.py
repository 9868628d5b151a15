"""Running a jitted program over many rows: fixed-shape batches sharded over the data mesh, out-of-memory
halving, progress."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxprobe.errors import InputError, JaxprobeError
from jaxprobe.runtime.devices import data_mesh
from jaxprobe.runtime.progress import Bar
from jaxprobe.runtime.progress import progress as progress_bar


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pad the leading axis to `rows` by repeating the last row, so every batch has one shape."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def run_batched(run: callable, inputs: Any, batch_size: int, *, progress: bool | Bar = False,
                label: str = "") -> dict[str, np.ndarray]:
    """Apply a jitted `run` batch by batch, splitting each batch over this process's devices.

    inputs: an array or a pytree of arrays sharing their leading (prompt) axis. Batches are padded
    to one shape (a multiple of the device count), so the program compiles once. One batch stays in
    flight: batch k+1 is uploaded and dispatched (JAX dispatches asynchronously) before batch k's
    results are copied to the host, so host and device work overlap. Per batch that is one upload of
    the inputs and one download per returned array. When a batch runs the device out of memory (at
    dispatch or on the copy back), the batch size is halved (one more compile) and the run resumes
    from the first batch not yet on the host, with a warning that names the size that fits.

    progress: True for a bar of its own (labelled `label`, in rows), or the `Bar` of an enclosing phase
    to advance by the rows of each batch.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    n_dev = jax.local_device_count()
    n = len(jax.tree.leaves(inputs)[0])
    # A batch far beyond the rows would only compute padding (and may not fit); a power of two keeps
    # the shapes, and so the compiled programs, few when the last chunk of a run is short.
    batch_size = min(batch_size, 1 << max(n - 1, 0).bit_length())
    batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    sharding = NamedSharding(data_mesh(), PartitionSpec("data"))
    pieces: dict[str, list[np.ndarray]] = {}
    with _rows_bar(progress, n, label) as bar:
        start = 0                                            # first row not yet dispatched
        in_flight: tuple[int, int, Any] | None = None        # (start, rows, device outputs)
        while start < n or in_flight is not None:
            try:
                launched = None
                if start < n:
                    part = slice(start, min(start + batch_size, n))
                    batch = jax.device_put(jax.tree.map(lambda x: _pad_rows(x[part], batch_size), inputs), sharding)
                    launched = (part.start, part.stop - part.start, run(batch))
                if in_flight is not None:
                    _, rows, out = in_flight
                    host = {site: np.asarray(value)[:rows] for site, value in out.items()}
                    for site, value in host.items():
                        pieces.setdefault(site, []).append(value)
                    bar.advance(rows)
                in_flight = launched
                if launched is not None:
                    start = launched[0] + launched[1]
            except jax.errors.JaxRuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                batch_size = _smaller_batch(batch_size, n_dev, err)
                if in_flight is not None:           # its results never reached the host: run it again
                    start = in_flight[0]
                in_flight = None
    return {site: np.concatenate(chunks) for site, chunks in pieces.items()}


def _smaller_batch(batch_size: int, n_dev: int, err: BaseException) -> int:
    import warnings

    if batch_size <= n_dev:
        raise JaxprobeError(f"device out of memory even at batch size {batch_size} ({n_dev} per device): capture "
                            "fewer sites per run, reduce='mean' instead of 'none', or dtype='bfloat16'") from err
    smaller = max(n_dev, (batch_size // 2) // n_dev * n_dev)
    warnings.warn(f"device out of memory at batch size {batch_size}; retrying with batch size {smaller} "
                  f"(pass batch_size={smaller} to skip the failed attempt next time)", RuntimeWarning, stacklevel=3)
    return smaller


def _rows_bar(progress: bool | Bar, total: int, label: str) -> contextlib.AbstractContextManager[Bar]:
    return contextlib.nullcontext(progress) if isinstance(progress, Bar) else progress_bar(label, total, progress)
