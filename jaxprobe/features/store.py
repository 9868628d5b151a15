"""A content-addressed, crash-safe cache of captured features.

One entry per (model, sites, prompts, sampling settings), named by the SHA-256 of a canonical JSON
description, so a changed setting can never return stale features. An entry holds chunks of prompts
(`chunks/000000-000064.safetensors`, every site of those prompts), each committed atomically (write
to a temporary name, fsync, rename) together with a checksum file written after it: a chunk counts as
finished only when its checksum exists and matches, so a kill at any moment leaves either a finished
chunk or nothing that is ever read. Interrupted runs resume from the finished chunks.

Several processes or hosts may fill one entry at once (`jaxprobe.runtime.distributed`): each takes every
process_count-th chunk; temporary names are unique and renames atomic, so disjoint writers never
meet, and two writers of the same chunk write the same bytes.

safetensors (already a dependency for weights) is the format: a flat name -> array file with no
pickling, memory-mappable, readable from any language; one file per chunk keeps commits atomic on
any POSIX file system, shared ones included. We chose it over zarr/tensorstore because a chunk here
is written once and read whole, which needs no chunk-index format, no extra dependency and no
locking: the manifest plus `NNNNNN-NNNNNN.safetensors` names are the index.

`jaxprobe store ls|verify|gc` (`FeatureStore.list`, `verify`, `gc`) look after a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.errors import InputError, StoreError
from jaxprobe.runtime.files import TEMP_SUFFIX, atomic_write_bytes, atomic_write_text
from jaxprobe.runtime.progress import Bar
from jaxprobe.runtime.progress import progress as progress_bar

FORMAT_VERSION = 1


def content_hash(description: Mapping[str, Any]) -> str:
    canonical = json.dumps(description, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CHUNK_SUFFIX = ".safetensors"
CHECK_SUFFIX = ".sha256"


@dataclass(frozen=True)
class FeatureEntry:
    """The chunks of one content-hashed extraction."""

    root: Path
    description: Mapping[str, Any]
    n_prompts: int
    chunk_size: int

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def chunk_dir(self) -> Path:
        return self.root / "chunks"

    def chunk_slices(self) -> list[slice]:
        return [slice(s, min(s + self.chunk_size, self.n_prompts)) for s in range(0, self.n_prompts, self.chunk_size)]

    def chunk_path(self, part: slice) -> Path:
        return self.chunk_dir / f"{part.start:06d}-{part.stop:06d}{CHUNK_SUFFIX}"

    def read_chunk(self, part: slice) -> dict[str, np.ndarray] | None:
        """A finished chunk's arrays, or None when it is absent, unfinished, truncated or corrupt."""
        from safetensors.numpy import load

        data = _verified_bytes(self.chunk_path(part))
        if data is None:
            return None
        try:
            return load(data)
        except Exception:  # noqa: BLE001 - an unreadable chunk is recomputed, never trusted
            return None

    def write_chunk(self, part: slice, arrays: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        path = self.chunk_path(part)
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(CHECK_SUFFIX), _sha256(data))

    def finished(self) -> list[slice]:
        return [p for p in self.chunk_slices() if self.read_chunk(p) is not None]


def _verified_bytes(path: Path) -> bytes | None:
    """The file's bytes when its checksum file exists and matches, else None."""
    check = path.with_suffix(CHECK_SUFFIX)
    try:
        data = path.read_bytes()
        expected = check.read_text().strip()
    except OSError:
        return None
    return data if _sha256(data) == expected else None


@dataclass(frozen=True)
class EntrySummary:
    """What `jaxprobe store ls` shows of one entry (chunk files counted, not verified)."""

    key: str
    kind: str
    n_prompts: int
    chunks_total: int
    chunks_present: int
    bytes: int
    last_used: float
    sites: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReport:
    """Chunk files by state. damaged: present but checksum missing or wrong; stray: temporary files
    and chunks that belong to no chunk of their entry; broken_entries: unreadable manifests."""

    ok: tuple[Path, ...]
    damaged: tuple[Path, ...]
    stray: tuple[Path, ...]
    broken_entries: tuple[Path, ...]

    @property
    def clean(self) -> bool:
        return not (self.damaged or self.stray or self.broken_entries)


class FeatureStore:
    """Features on disk under `root`, keyed by content hash (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, description: Mapping[str, Any], n_prompts: int, chunk_size: int = 64) -> FeatureEntry:
        key = content_hash({**description, "format": FORMAT_VERSION, "chunk_size": chunk_size})
        root = self.root / key
        manifest = root / "manifest.json"
        if manifest.is_file():
            os.utime(manifest)  # "last used", for `gc --older-than`
        else:
            atomic_write_text(manifest, json.dumps({"description": description, "n_prompts": n_prompts,
                                                    "chunk_size": chunk_size, "format": FORMAT_VERSION},
                                                   indent=2, sort_keys=True, default=str))
        return FeatureEntry(root, description, n_prompts, chunk_size)

    def compute(self, description: Mapping[str, Any], n_prompts: int,
                extract: Callable[[slice, Bar], Mapping[str, np.ndarray]], *, chunk_size: int = 64,
                force: bool = False, progress: bool = False, label: str = "features") -> dict[str, np.ndarray]:
        """{site: (n_prompts, ...)}: finished chunks are read back, the others extracted and committed.

        extract(part, bar) must return {site: array with part.stop - part.start rows}, advancing `bar` (a
        `jaxprobe.runtime.progress.Bar` counting prompts) by the rows it finishes.
        With progress, the bar says how many chunks were reused and which damaged ones are recomputed. In a multi-process
        job each process extracts its share of the chunks, waits for the others, then reads theirs.
        """
        import jax

        from jaxprobe.runtime import distributed

        if n_prompts < 1:
            raise InputError("nothing to extract: the prompt list is empty")
        entry = self.entry(description, n_prompts, chunk_size)
        done: dict[int, Mapping[str, np.ndarray]] = {}
        mine = distributed.share(entry.chunk_slices())
        todo = []
        for part in mine:
            arrays = None if force else entry.read_chunk(part)
            if arrays is None:
                todo.append(part)
            else:
                done[part.start] = arrays
        damaged = [p for p in todo if not force and entry.chunk_path(p).exists()]
        rows = sum(p.stop - p.start for p in todo)
        with progress_bar(label, rows, progress and bool(todo)) as bar:
            if done:
                bar.note(f"{label}: resuming, {len(done)} of {len(mine)} chunks already in the store {self.root}")
            for part in damaged:
                bar.note(f"{label}: chunk {entry.chunk_path(part).name} is damaged or unfinished: recomputing it")
            for part in todo:
                arrays = {k: np.asarray(v) for k, v in extract(part, bar).items()}
                _check_finite(arrays, part)
                entry.write_chunk(part, arrays)
                done[part.start] = arrays
        if jax.process_count() > 1:
            distributed.barrier(f"feature-store-{entry.key}")
        pieces: dict[str, list[np.ndarray]] = {}
        for part in entry.chunk_slices():
            arrays = done.get(part.start)
            if arrays is None:
                arrays = entry.read_chunk(part)
            if arrays is None:
                raise StoreError(f"chunk {entry.chunk_path(part)} is missing or damaged after every process finished: "
                                 "another process failed; rerun the same command (finished chunks are reused)")
            for site, value in arrays.items():
                pieces.setdefault(site, []).append(value)
        # Chunks read back list their arrays by name, fresh ones in capture order: answer in one order
        # (the description's, else by name) so that every process sees the same dict.
        named = [s for s in description.get("sites", ()) if s in pieces]
        order = named + sorted(set(pieces) - set(named))
        return {site: np.concatenate(pieces[site]) for site in order}

    # ---------------------------------------------------------------- housekeeping (`jaxprobe store`)

    def _entry_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    @staticmethod
    def _read_entry(root: Path) -> FeatureEntry | None:
        """The entry whose manifest is under `root`, or None when the manifest is missing or unreadable."""
        try:
            manifest = json.loads((root / "manifest.json").read_text())
            return FeatureEntry(root, manifest["description"], manifest["n_prompts"], manifest["chunk_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def list(self) -> list[EntrySummary]:
        """Every readable entry, most recently used first."""
        out = []
        for root in self._entry_dirs():
            entry = self._read_entry(root)
            if entry is None:
                continue
            present = [p for p in entry.chunk_slices()
                       if entry.chunk_path(p).is_file() and entry.chunk_path(p).with_suffix(CHECK_SUFFIX).is_file()]
            description = entry.description
            out.append(EntrySummary(
                key=root.name, kind=str(description.get("kind", "?")), n_prompts=entry.n_prompts,
                chunks_total=len(entry.chunk_slices()), chunks_present=len(present),
                bytes=sum(f.stat().st_size for f in root.rglob("*") if f.is_file()),
                last_used=(root / "manifest.json").stat().st_mtime, sites=tuple(description.get("sites", ()))))
        return sorted(out, key=lambda e: -e.last_used)

    def verify(self) -> VerifyReport:
        """Read every chunk and check it against its checksum."""
        ok, damaged, stray, broken = [], [], [], []
        for root in self._entry_dirs():
            entry = self._read_entry(root)
            if entry is None:
                broken.append(root)
                continue
            expected = {entry.chunk_path(p) for p in entry.chunk_slices()}
            for path in sorted(entry.chunk_dir.glob("*")) if entry.chunk_dir.is_dir() else []:
                if path.name.endswith(TEMP_SUFFIX):
                    stray.append(path)
                elif path.suffix == CHUNK_SUFFIX:
                    if path not in expected:
                        stray.append(path)
                    else:
                        (ok if _verified_bytes(path) is not None else damaged).append(path)
                elif path.suffix == CHECK_SUFFIX and not path.with_suffix(CHUNK_SUFFIX).exists():
                    stray.append(path)
        return VerifyReport(tuple(ok), tuple(damaged), tuple(stray), tuple(broken))

    def gc(self, *, older_than_days: float | None = None, grace_s: float = 3600.0,
           dry_run: bool = False) -> list[Path]:
        """Remove damaged chunks, stray files and broken entries (all older than `grace_s`, so a writer
        still at work keeps its files) and, with `older_than_days`, whole entries not used for that
        long. Returns what was (or, with dry_run, would be) removed."""
        now = time.time()
        report = self.verify()
        victims = [p for p in (*report.damaged, *report.stray, *report.broken_entries)
                   if now - p.stat().st_mtime > grace_s]
        if older_than_days is not None:
            victims += [self.root / e.key for e in self.list() if now - e.last_used > older_than_days * 86400]
        if not dry_run:
            for path in victims:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                    if path.suffix == CHUNK_SUFFIX:
                        path.with_suffix(CHECK_SUFFIX).unlink(missing_ok=True)
        return victims


def _check_finite(arrays: Mapping[str, np.ndarray], part: slice) -> None:
    for site, value in arrays.items():
        bad = ~np.isfinite(value)
        if bad.any():
            where = np.argwhere(bad)[0]
            step = f", step index {where[1]}" if value.ndim >= 3 else ""
            raise InputError(f"non-finite features (NaN/Inf) at site {site!r}, prompt {part.start + where[0]}{step}: "
                             "the model diverged; try dtype='float32', fewer steps, or check the weights")
