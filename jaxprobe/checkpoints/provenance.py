"""What was loaded, precisely enough that a different fine-tune never reuses another's features: the source,
the SHA-256 of a single file and of every LoRA (with its scale), the Hugging Face cache revision, and the
weight files' sizes and modification times for a local folder (hashing gigabytes of folder weights on every
load would cost more than it guards; editing them in place changes their mtime)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CHUNK = 1 << 24
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(source: str | Path, folder: Path | None = None, *, dtype: Any = None,
                    config: str | Path | None = None, loras: Sequence[tuple[str | Path, float]] = ()) -> dict[str, Any]:
    """A JSON-able record of a load: {"source", "dtype", and "sha256" | "revision" | "weight_files", "config",
    "loras": [{"file", "scale", "sha256"}]}."""
    record: dict[str, Any] = {"source": str(source), "dtype": None if dtype is None else str(dtype)}
    path = Path(source).expanduser()
    if path.is_file():
        record["sha256"] = sha256(path)
    elif folder is not None:
        snapshot = re.search(r"models--[^/]+/snapshots/([0-9a-f]{7,})", folder.as_posix())
        if snapshot:
            record["revision"] = snapshot[1]
        else:
            record["weight_files"] = {str(p.relative_to(folder)): [p.stat().st_size, int(p.stat().st_mtime)]
                                      for p in sorted(folder.rglob("*")) if p.suffix in _WEIGHT_SUFFIXES}
    if config is not None:
        record["config"] = str(config)
    if loras:
        record["loras"] = [{"file": str(f), "scale": float(s), "sha256": sha256(Path(f).expanduser())} for f, s in loras]
    return record
