"""A user's own norms from a CSV/TSV file (`--norms PATH`), checked cell by cell.

Two layouts, told apart by the header unless `layout` says which:
- wide: `concept, attr1, attr2, ...`, one row per concept;
- long: `concept, attribute, value[, group]`, one row per rating.
Groups come from the long layout's `group` column or from a separate `attribute, group` file; without
either, every attribute is in the group "all". Empty cells and `na`/`nan`/`n/a` are missing values.
Column names match case-insensitively. The delimiter, tab or comma, is the one the header line uses
(if it uses both or neither: tab for `.tsv`/`.tab` files, else comma). Every error names the file,
the line and the column, and says what to change.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jaxprobe.errors import InputError, preview
from jaxprobe.norms.base import Norms

MISSING = frozenset({"", "na", "nan", "n/a"})
LAYOUTS = ("auto", "wide", "long")
_LONG_COLUMNS = ("concept", "attribute", "value")
DEFAULT_GROUP = "all"


@dataclass(frozen=True)
class _Table:
    """A delimited text file's header and non-blank rows, each with its line number in the file."""

    path: Path
    header: list[str]
    lines: list[int]
    cells: np.ndarray  # (rows, columns) str

    def find(self, name: str) -> int | None:
        lowered = [h.lower() for h in self.header]
        return lowered.index(name) if name in lowered else None

    def column(self, name: str, why: str) -> int:
        index = self.find(name)
        if index is None:
            raise InputError(f"{self.path} has no {name!r} column (columns: {preview(self.header)}); {why}.")
        return index

    def labels(self, index: int) -> list[str]:
        """A column of names (concepts, attributes, groups): every cell must be filled."""
        empty = [line for line, cell in zip(self.lines, self.cells[:, index]) if not cell]
        if empty:
            name = self.header[index]
            raise InputError(f"{self.path}: column {name!r} is empty on lines {preview(empty)}; fill it in.")
        return list(self.cells[:, index])

    def numbers(self, indices: list[int]) -> np.ndarray:
        """(rows, len(indices)) float64 of these columns; NaN for missing cells."""
        cells = self.cells[:, indices]
        flat = pd.Series(cells.ravel(), dtype=object)
        missing = flat.str.lower().isin(MISSING).to_numpy()
        numbers = pd.to_numeric(flat.where(~missing), errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~missing & ~np.isfinite(numbers))
        if bad.size:
            rows, columns = np.unravel_index(bad, cells.shape)
            where = "; ".join(
                f"line {self.lines[r]}, column {self.header[indices[c]]!r}: {cells[r, c]!r}"
                for r, c in zip(rows[:5], columns[:5])
            )
            raise InputError(
                f"{self.path}: {bad.size} cells are not finite numbers ({where}). Ratings must be numbers with a "
                "'.' decimal point; leave a cell empty or write 'na' where a rating is missing, and keep "
                "non-numeric columns (categories, notes) out of the norms file."
            )
        return numbers.reshape(cells.shape)


def _read_table(path: Path, kind: str) -> _Table:
    if not path.is_file():
        raise InputError(f"{kind} file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as error:
        raise InputError(f"{kind} file {path} is not UTF-8 text ({error}); save it as UTF-8 CSV.") from None
    header_line = text.lstrip().partition("\n")[0]
    if ("\t" in header_line) != ("," in header_line):
        delimiter = "\t" if "\t" in header_line else ","
    else:  # a one-column file, or a header holding both
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    rows = [  # (line number in the file, stripped cells); blank lines skipped
        (reader.line_num, [cell.strip() for cell in cells]) for cells in reader if any(c.strip() for c in cells)
    ]
    if not rows:
        raise InputError(f"{kind} file {path} is empty: write a header line, then one line per row.")
    (_, header), *body = rows
    if not body:
        raise InputError(f"{kind} file {path} has a header but no rows.")
    for line, cells in body:
        if len(cells) != len(header):
            raise InputError(
                f"{path}, line {line}: {len(cells)} fields, but the header has {len(header)} "
                f"(delimiter {delimiter!r}); quote cells that contain the delimiter."
            )
    blank = [i + 1 for i, name in enumerate(header) if not name]
    if blank:
        raise InputError(f"{path}: header columns {blank} have no name; name every column.")
    repeated = [name for name, n in Counter(name.lower() for name in header).items() if n > 1]
    if repeated:
        raise InputError(f"{path}: columns {preview(repeated)} appear more than once in the header (case ignored).")
    return _Table(path, header, [line for line, _ in body], np.array([cells for _, cells in body], dtype=object))


def _repeats(keys: list, lines: list[int]) -> str:
    """`'dog' on lines 3, 9; ...` for the keys that occur more than once."""
    where = defaultdict(list)
    for key, line in zip(keys, lines):
        where[key].append(line)
    repeated = [(k, ls) for k, ls in where.items() if len(ls) > 1]
    return "; ".join(f"{k!r} on lines {', '.join(map(str, ls))}" for k, ls in repeated[:5])


def load_norms_file(
    path: str | os.PathLike, *, groups: str | os.PathLike | None = None, layout: str = "auto"
) -> Norms:
    """Norms from a wide or long CSV/TSV file, with an optional `attribute, group` groups file."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    table = _read_table(path, "norms")
    names = {h.lower() for h in table.header}
    if layout == "auto":
        layout = "long" if set(_LONG_COLUMNS) <= names <= {*_LONG_COLUMNS, "group"} else "wide"
    concepts, attributes, values, attribute_groups = (_long if layout == "long" else _wide)(table)
    if groups is not None:
        if attribute_groups is not None:
            raise InputError(f"{path} has a 'group' column and a groups file was given too; use one of them.")
        attribute_groups = _read_groups(Path(groups), attributes)
    return Norms(
        name=path.stem,
        concepts=tuple(concepts),
        attributes=tuple(attributes),
        values=values,
        groups=attribute_groups or dict.fromkeys(attributes, DEFAULT_GROUP),
        metadata=pd.DataFrame(index=pd.Index(concepts)),
        citation=f"user-supplied norms: {path}",
    )


def _wide(table: _Table) -> tuple[list[str], list[str], np.ndarray, None]:
    concept = table.column("concept", "name the column of concept words 'concept'")
    concepts = table.labels(concept)
    if len(set(concepts)) < len(concepts):
        raise InputError(
            f"{table.path}: concepts appear more than once ({_repeats(concepts, table.lines)}); give each concept "
            "one row, or use the long layout (concept, attribute, value) for one rating per row."
        )
    columns = [i for i in range(len(table.header)) if i != concept]
    if not columns:
        raise InputError(f"{table.path} has a concept column but no attribute columns.")
    return concepts, [table.header[i] for i in columns], table.numbers(columns), None


def _long(table: _Table) -> tuple[list[str], list[str], np.ndarray, dict[str, str] | None]:
    why = "the long layout needs columns concept, attribute, value and optionally group"
    concept, attribute, value = (table.column(name, why) for name in _LONG_COLUMNS)
    group = table.find("group")
    extra = [h for i, h in enumerate(table.header) if i not in (concept, attribute, value, group)]
    if extra:
        raise InputError(f"{table.path}: columns {preview(extra)} are not part of the long layout; {why}.")
    row_concepts, row_attributes = table.labels(concept), table.labels(attribute)
    pairs = list(zip(row_concepts, row_attributes))
    if len(set(pairs)) < len(pairs):
        raise InputError(
            f"{table.path}: (concept, attribute) pairs rated more than once: {_repeats(pairs, table.lines)}; "
            "keep one rating per pair (average them first if they are repeated measures)."
        )
    concepts, attributes = list(dict.fromkeys(row_concepts)), list(dict.fromkeys(row_attributes))
    values = np.full((len(concepts), len(attributes)), np.nan)  # (concepts, attributes); unlisted pairs missing
    rows, columns = pd.Index(concepts).get_indexer(row_concepts), pd.Index(attributes).get_indexer(row_attributes)
    values[rows, columns] = table.numbers([value])[:, 0]
    return concepts, attributes, values, None if group is None else _group_map(table, attribute, group)


def _group_map(table: _Table, attribute: int, group: int) -> dict[str, str]:
    """attribute -> group from two columns of a table; one group per attribute."""
    mapping: dict[str, str] = {}
    for line, name, label in zip(table.lines, table.labels(attribute), table.labels(group)):
        if mapping.setdefault(name, label) != label:
            raise InputError(
                f"{table.path}, line {line}: attribute {name!r} is in group {label!r} here but {mapping[name]!r} "
                "earlier; give each attribute one group."
            )
    return mapping


def _read_groups(path: Path, attributes: list[str]) -> dict[str, str]:
    table = _read_table(path, "groups")
    why = "a groups file has columns attribute, group"
    attribute, group = table.column("attribute", why), table.column("group", why)
    mapping = _group_map(table, attribute, group)
    unknown = [a for a in mapping if a not in attributes]
    if unknown:
        raise InputError(
            f"groups file {path} names attributes the norms do not have: {preview(unknown)} "
            f"(norms attributes: {preview(attributes)}); fix the names or remove those rows."
        )
    ungrouped = [a for a in attributes if a not in mapping]
    if ungrouped:
        raise InputError(f"groups file {path} gives no group to attributes {preview(ungrouped)}; add a row for each.")
    return mapping
