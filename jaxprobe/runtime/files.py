"""The one way jaxprobe writes a file: to a unique temporary name beside it, fsynced, then renamed.

Readers see the old file or the new one whole, never a part, and a crash or kill leaves at most a
`.<name>.<random>.tmp` beside it (which `jaxprobe store gc` removes). A full disk or quota is a
StoreError that says what to do, and leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.errors import InputError, StoreError

TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(_UMASK)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[int, Path]]:
    """(open fd, temporary path) in path's folder; renamed over `path` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp)
    try:
        yield fd, tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"no space left writing {path}: free disk space or point the cache/output at "
                             "another disk; finished files are intact and reused on rerun") from err
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _temporary_beside(Path(path)) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    atomic_write_bytes(path, buffer.getvalue())


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """write(tmp) for writers that take a path (parquet, savefig, orbax-free npz), then fsync and rename."""
    path = Path(path)
    with _temporary_beside(path) as (fd, tmp):
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path


def read_lines(path: str | os.PathLike, what: str = "file") -> list[str]:
    """The non-blank lines of a UTF-8 text file (one prompt or name per line), surrounding spaces dropped.

    what: how errors name the file ("prompts file")."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: editors on Windows often start with a BOM
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8, "
                         f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{what} {path} is empty: give one entry per line")
    return lines


def write_table(frame: Any, out: str | os.PathLike, name: str) -> list[Path]:
    """A pandas DataFrame as out/<name>.parquet and out/<name>.csv side by side, each written atomically."""
    return [write_atomic(Path(out) / (name + suffix), lambda p, w=write: w(p, index=False))
            for suffix, write in ((".parquet", frame.to_parquet), (".csv", frame.to_csv))]
