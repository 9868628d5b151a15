"""A content-addressed, crash-safe cache of captured features.

One entry per (model, sites, prompts, sampling settings), named by the SHA-256 of a canonical JSON
description, so a changed setting can never return stale features. An entry holds chunks of prompts
(`chunks/000000-000064.safetensors`, every site of those prompts), each committed atomically (write
to a temporary name, fsync, rename) together with a checksum file written after it: a chunk counts as
finished only when its checksum exists and matches, so a kill at any moment leaves either a finished
chunk or nothing that is ever read. Interrupted runs resume from the finished chunks.

safetensors (already a dependency for weights) is the format: a flat name -> array file with no
pickling, memory-mappable, readable from any language.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.errors import InputError

FORMAT_VERSION = 1


def content_hash(description: Mapping[str, Any]) -> str:
    canonical = json.dumps(description, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file, or the new one whole, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FeatureEntry:
    """The chunks of one content-hashed extraction."""

    root: Path
    description: Mapping[str, Any]
    n_prompts: int
    chunk_size: int

    @property
    def chunk_dir(self) -> Path:
        return self.root / "chunks"

    def chunk_slices(self) -> list[slice]:
        return [slice(s, min(s + self.chunk_size, self.n_prompts)) for s in range(0, self.n_prompts, self.chunk_size)]

    def _chunk_path(self, part: slice) -> Path:
        return self.chunk_dir / f"{part.start:06d}-{part.stop:06d}.safetensors"

    def read_chunk(self, part: slice) -> dict[str, np.ndarray] | None:
        """A finished chunk's arrays, or None when it is absent, unfinished, truncated or corrupt."""
        from safetensors.numpy import load

        path = self._chunk_path(part)
        check = path.with_suffix(".sha256")
        if not path.is_file() or not check.is_file():
            return None
        data = path.read_bytes()
        if _sha256(data) != check.read_text().strip():
            return None
        try:
            return load(data)
        except Exception:  # noqa: BLE001 - an unreadable chunk is recomputed, never trusted
            return None

    def write_chunk(self, part: slice, arrays: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        path = self._chunk_path(part)
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(".sha256"), _sha256(data))

    def finished(self) -> list[slice]:
        return [p for p in self.chunk_slices() if self.read_chunk(p) is not None]


class FeatureStore:
    """Features on disk under `root`, keyed by content hash (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, description: Mapping[str, Any], n_prompts: int, chunk_size: int = 64) -> FeatureEntry:
        key = content_hash({**description, "format": FORMAT_VERSION, "chunk_size": chunk_size})
        root = self.root / key
        manifest = root / "manifest.json"
        if not manifest.is_file():
            atomic_write_text(manifest, json.dumps({"description": description, "n_prompts": n_prompts,
                                                    "chunk_size": chunk_size, "format": FORMAT_VERSION},
                                                   indent=2, sort_keys=True, default=str))
        return FeatureEntry(root, description, n_prompts, chunk_size)

    def compute(self, description: Mapping[str, Any], n_prompts: int,
                extract: Callable[[slice], Mapping[str, np.ndarray]], *, chunk_size: int = 64,
                force: bool = False, progress: bool = False, label: str = "features") -> dict[str, np.ndarray]:
        """{site: (n_prompts, ...)}: finished chunks are read back, the others extracted and committed.

        extract(part) must return {site: array with part.stop - part.start rows}.
        """
        if n_prompts < 1:
            raise InputError("nothing to extract: the prompt list is empty")
        entry = self.entry(description, n_prompts, chunk_size)
        pieces: dict[str, list[np.ndarray]] = {}
        parts = entry.chunk_slices()
        iterator = parts
        if progress:
            from rich.progress import track

            iterator = track(parts, description=label)
        for part in iterator:
            arrays = None if force else entry.read_chunk(part)
            if arrays is None:
                arrays = {k: np.asarray(v) for k, v in extract(part).items()}
                _check_finite(arrays, part)
                entry.write_chunk(part, arrays)
            for site, value in arrays.items():
                pieces.setdefault(site, []).append(value)
        return {site: np.concatenate(chunks) for site, chunks in pieces.items()}


def _check_finite(arrays: Mapping[str, np.ndarray], part: slice) -> None:
    for site, value in arrays.items():
        bad = ~np.isfinite(value)
        if bad.any():
            where = np.argwhere(bad)[0]
            step = f", step index {where[1]}" if value.ndim >= 3 else ""
            raise InputError(f"non-finite features (NaN/Inf) at site {site!r}, prompt {part.start + where[0]}{step}: "
                             "the model diverged; try dtype='float32', fewer steps, or check the weights")
