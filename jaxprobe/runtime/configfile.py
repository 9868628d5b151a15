"""Frozen-dataclass settings read from TOML files or mappings, with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from jaxprobe.errors import InputError

C = TypeVar("C")


def read_toml(path: str | Path, table: str) -> dict[str, Any]:
    """The `[table]` of a TOML file, or its top level when it has no such table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"cannot read config {path}: {err}") from err
    return dict(data.get(table, data))


def from_mapping(cls: type[C], data: Mapping[str, Any], source: str = "options") -> C:
    """`cls(**data)`, refusing unknown keys by name and turning TOML lists into tuple fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{source}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    tuples = {name for name, f in fields.items() if str(f.type).startswith("tuple")}
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()})


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
