"""Frozen-dataclass configs to and from TOML, with errors that name the bad key. One reader, one writer:

    config_from_toml(cls, path, table, sections=..., **overrides)   a TOML file -> cls
    config_from_mapping(cls, data, source, sections=...)             a mapping (CLI options) -> cls
    config_to_toml(config, table, sections=...)                      cls -> TOML text that reads back equal

A config's fields sit in its own `[table]` or, when the file has no such table, at the top level.
`sections` ({name: dataclass}) are further tables, at the top level (or inside the config's table),
that hold the fields the config shares with that dataclass: a study's `[model]`, `[sampling]` and
`[run]` (`jaxprobe.features.settings`). Either place works; a field set in both with two values is
an error. In the file, tuples are arrays, nested dataclasses and mappings are sub-tables
(`[table.field]`), and None is left out: TOML has no null, so a None field reads back as its default.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import numbers
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from jaxprobe.errors import InputError

C = TypeVar("C")
S = TypeVar("S")
Sections = Mapping[str, type]
NO_SECTIONS: Sections = types.MappingProxyType({})


def read_toml(path: str | Path) -> dict[str, Any]:
    """The whole TOML document at `path`, with an InputError naming the file when it cannot be read."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"cannot read config {path}: {err}") from err


def config_from_toml(cls: type[C], path: str | Path, table: str, *, sections: Sections = NO_SECTIONS,
                     relative_paths: Iterable[str] = (), **overrides: Any) -> C:
    """`cls` from a TOML file's `[table]` (else its top level) and its `sections`, then `overrides`
    (None ignored; they win over the file). `relative_paths`: fields holding a path, or a mapping of
    paths, given relative to the file."""
    document = read_toml(path)
    own = document.get(table)
    if isinstance(own, Mapping):
        flat, tables = _split(own, sections, f"{table}.")
        tables += [(name, part, document[name]) for name, part in sections.items()
                   if isinstance(document.get(name), Mapping)]
    else:
        flat, tables = _split(document, sections)
        table = ""
    data = _merge(cls, flat, tables, str(path), f"[{table}]" if table else "the top level")
    here = Path(path).resolve().parent
    for name in relative_paths:
        value = data.get(name)
        if isinstance(value, Mapping):
            data[name] = {k: str(here / v) for k, v in value.items()}
        elif value:
            data[name] = str(here / value)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(cls, data, str(path), sections, table)


def config_from_mapping(cls: type[C], data: Mapping[str, Any], source: str = "options", *,
                        sections: Sections = NO_SECTIONS) -> C:
    """`cls(**data)` with the checks and conversions of a file: unknown keys refused by name, lists made
    tuples, mappings made nested dataclasses, and `sections` ({"sampling": {...}}) folded in."""
    flat, tables = _split(data, sections)
    return _build(cls, _merge(cls, flat, tables, source, "the options"), source, sections)


def config_part(config: Any, part: type[S]) -> S:
    """`part` (a dataclass) made of the fields `config` shares with it; the others at their defaults."""
    names = {f.name for f in dataclasses.fields(config)}
    return part(**{f.name: getattr(config, f.name) for f in dataclasses.fields(part) if f.name in names})


def config_to_toml(config: Any, table: str, *, sections: Sections = NO_SECTIONS) -> str:
    """TOML text of a dataclass instance that `config_from_toml(type(config), ..., table, sections=...)`
    reads back equal (but for None fields whose default is not None): its own fields under `[table]`,
    the fields it shares with each section under `[section]`."""
    section_of = {f.name: name for name, part in sections.items() for f in dataclasses.fields(part)}
    own: dict[str, Any] = {}
    shared: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for f in dataclasses.fields(config):
        target = shared[section_of[f.name]] if f.name in section_of else own
        target[f.name] = getattr(config, f.name)
    lines = _table_lines([table], own)
    for name, values in shared.items():
        if any(v is not None for v in values.values()):
            lines += ["", *_table_lines([name], values)]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One TOML value: a bool, number, string (or path) or an array of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # exact; 'inf' and 'nan' are TOML too
    if isinstance(value, (str, os.PathLike)):
        # JSON's escapes are TOML's; TOML also wants DEL escaped.
        return json.dumps(os.fspath(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise InputError(f"cannot write {value!r} ({type(value).__name__}) to a TOML config")


# --- reading -----------------------------------------------------------------------------------------


def _split(data: Mapping[str, Any], sections: Sections, prefix: str = "") -> tuple[dict[str, Any], list]:
    """(flat fields, [(section label, its dataclass, its table)]): a key named like a section that holds a
    table is that section (so `model = "tiny"` is the field, `[model]` the section)."""
    flat, tables = {}, []
    for key, value in data.items():
        if key in sections and isinstance(value, Mapping):
            tables.append((f"{prefix}{key}", sections[key], value))
        else:
            flat[key] = value
    return flat, tables


def _merge(cls: type, flat: dict[str, Any], tables: list, source: str, flat_label: str) -> dict[str, Any]:
    """The flat fields with every section's keys added; a section key must be a field both of the section's
    dataclass and of `cls`, and a field set twice must be set to one value."""
    names = {f.name for f in dataclasses.fields(cls)}
    data, where = dict(flat), dict.fromkeys(flat, flat_label)
    for label, section, values in tables:
        part = {f.name for f in dataclasses.fields(section)} & names
        unknown = sorted(set(values) - part)
        if unknown:
            raise InputError(f"{source}: unknown setting(s) {unknown} in [{label}]; {cls.__name__} takes "
                             f"{sorted(part) if part else 'none'} there")
        for key, value in values.items():
            if key in data and _plain(data[key]) != _plain(value):
                raise InputError(f"{source}: {key} is set twice, to {data[key]!r} in {where[key]} and to {value!r} "
                                 f"in [{label}]; set it once")
            data[key], where[key] = value, f"[{label}]"
    return data


def _plain(value: Any) -> Any:
    """Tuples as lists, to compare a value from Python with one from TOML."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _build(cls: type[C], data: Mapping[str, Any], source: str, sections: Sections = NO_SECTIONS, table: str = "") -> C:
    """`cls(**data)`: unknown keys refused by name, values converted to the fields' types. `table`: where
    `data` stands in a file, for the names of nested tables in errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in [{table}]" if table else ""
        tables = f"; tables: {', '.join(f'[{s}]' for s in sections)}" if sections else ""
        raise InputError(f"{source}: unknown setting(s) {unknown}{where}; known: {sorted(fields)}{tables}")
    hints = _hints(cls)
    return cls(**{k: _coerce(hints[k], v, source, f"{table}.{k}" if table else k) for k, v in data.items()})


def _hints(cls: type) -> dict[str, Any]:
    """The fields' types; for a class whose annotations do not resolve (one defined in a function), the
    annotations as written."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _coerce(hint: Any, value: Any, source: str, table: str) -> Any:
    """A TOML value as the field's type wants it: arrays -> tuples, tables -> nested dataclasses."""
    if isinstance(hint, str):  # unresolved: only what the annotation's text tells
        return tuple(value) if hint.startswith("tuple") and isinstance(value, list) else value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, source, table=table) if isinstance(value, Mapping) else value
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        for arm in kinds:
            arm_origin = typing.get_origin(arm)
            if (isinstance(value, list) and arm_origin is tuple) or (isinstance(value, Mapping) and (
                    arm_origin in (dict, collections.abc.Mapping) or dataclasses.is_dataclass(arm))):
                return _coerce(arm, value, source, table)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, table) for v in value)
        if len(args) == len(value):
            return tuple(_coerce(a, v, source, table) for a, v in zip(args, value))
        return tuple(value)
    if origin in (dict, collections.abc.Mapping) and isinstance(value, Mapping):
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, source, table) for k, v in value.items()}
    return value


# --- writing -----------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: Any) -> str:
    name = str(name)
    return name if _BARE_KEY.fullmatch(name) else toml_value(name)


def _table_lines(path: list[str], values: Mapping[str, Any]) -> list[str]:
    """`[path]`, its key = value lines, then its sub-tables (mappings and dataclasses among the values)."""
    lines, subtables = [f"[{'.'.join(_key(p) for p in path)}]"], []
    for name, value in values.items():
        if value is None:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            subtables += ["", *_table_lines([*path, name], value)]
        else:
            lines.append(f"{_key(name)} = {toml_value(value)}")
    return lines + subtables
