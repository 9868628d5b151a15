"""`Norms`: one table of human ratings (concepts x attributes), and its alignment with what was prompted.

Every loader returns a `Norms`; nothing downstream knows which dataset it came from. Concepts are the
words that go into prompts, attributes are the probe targets, and `groups` maps each attribute to the
family it is reported under (a Binder domain, a McRae feature type). Whatever a loader or `align`
removes is kept in `dropped`, with the reason, so that a report can say what was left out.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from jaxprobe.errors import InputError, preview


def dropped_frame(rows: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """The `dropped` table: one (concept, reason) row per concept a filter removed."""
    return pd.DataFrame(list(rows), columns=["concept", "reason"], dtype=object)


AMBIGUOUS = "shares its word and sense with another concept: no prompt can tell them apart"


def prompt_words(words: Sequence[str], senses: Sequence[str | None]) -> list[str | None]:
    """The prompt word of each norms entry; None for entries that no prompt can tell apart (`AMBIGUOUS`).

    An entry is prompted as its bare word unless another entry shares it; those are told apart by their
    sense, as `bat (animal)` and `bat (baseball)`, and one without a sense keeps the bare word (McRae's
    `mink` beside `mink (coat)`). Loaders name the whole dataset before filtering, so that a concept's
    prompt word does not depend on the filters.
    """
    shared = Counter(words)
    names = [f"{w} ({s})" if shared[w] > 1 and s else w for w, s in zip(words, senses)]
    taken = Counter(names)
    return [name if taken[name] == 1 else None for name in names]


def _require_unique(items: Sequence[str], what: str) -> None:
    repeated = [item for item, count in Counter(items).items() if count > 1]
    if repeated:
        raise InputError(f"each {what} must appear once, but {preview(repeated)} appear more than once.")


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Norms:
    """Human ratings of `concepts` on `attributes`.

    values: (n_concepts, n_attributes) float64, NaN where an attribute was not rated (read-only).
    groups: attribute -> group, in attribute order.
    metadata: one row per concept, indexed by concept (category, concreteness, original ids, ...).
    dropped: (concept, reason) for everything the loader's filters, `select` or `align` removed.
    """

    name: str
    concepts: tuple[str, ...]
    attributes: tuple[str, ...]
    values: np.ndarray  # (n_concepts, n_attributes)
    groups: dict[str, str]
    metadata: pd.DataFrame
    citation: str
    dropped: pd.DataFrame = dataclasses.field(default_factory=dropped_frame)

    def __post_init__(self) -> None:
        concepts, attributes = tuple(self.concepts), tuple(self.attributes)
        _require_unique(concepts, f"concept of the {self.name} norms")
        _require_unique(attributes, f"attribute of the {self.name} norms")
        values = np.array(self.values, dtype=np.float64)  # a private copy, so that freezing it is safe
        values.flags.writeable = False
        if values.shape != (len(concepts), len(attributes)):
            raise InputError(
                f"{self.name}: values have shape {values.shape}, but there are {len(concepts)} concepts "
                f"and {len(attributes)} attributes."
            )
        ungrouped = [a for a in attributes if a not in self.groups]
        if ungrouped:
            raise InputError(f"{self.name}: attributes {preview(ungrouped)} have no group.")
        if list(self.metadata.index) != list(concepts):
            raise InputError(f"{self.name}: metadata must have one row per concept, indexed by concept, in order.")
        object.__setattr__(self, "concepts", concepts)
        object.__setattr__(self, "attributes", attributes)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "groups", {a: self.groups[a] for a in attributes})
        object.__setattr__(self, "metadata", self.metadata.rename_axis("concept"))

    def __repr__(self) -> str:
        return (
            f"Norms({self.name!r}: {len(self.concepts)} concepts x {len(self.attributes)} attributes "
            f"in {len(self.group_names())} groups, {len(self.dropped)} dropped)"
        )

    def to_frame(self) -> pd.DataFrame:
        """(concepts, attributes) table of the values."""
        return pd.DataFrame(
            self.values,
            index=pd.Index(self.concepts, name="concept"),
            columns=pd.Index(self.attributes, name="attribute"),
        )

    def group_names(self) -> list[str]:
        """The groups, in the order their first attribute appears."""
        return list(dict.fromkeys(self.groups.values()))

    def select(self, concepts: Iterable[str], reason: str = "not selected") -> Norms:
        """Keep `concepts`, in this order; the others are recorded as dropped with `reason`."""
        concepts = list(concepts)
        _require_unique(concepts, "selected concept")
        row = {concept: i for i, concept in enumerate(self.concepts)}
        unknown = [c for c in concepts if c not in row]
        if unknown:
            raise InputError(
                f"{self.name}: {preview(unknown)} are not concepts of these norms. Select among `.concepts`, "
                "or use `jaxprobe.norms.align` to keep only the concepts both sides have."
            )
        rows = [row[c] for c in concepts]
        kept = set(concepts)
        return dataclasses.replace(
            self,
            concepts=tuple(concepts),
            values=self.values[rows],
            metadata=self.metadata.iloc[rows],
            dropped=self._dropped_plus((c, reason) for c in self.concepts if c not in kept),
        )

    def _dropped_plus(self, rows: Iterable[tuple[str, str]]) -> pd.DataFrame:
        return dropped_frame([*self.dropped.itertuples(index=False, name=None), *rows])


def align(norms: Norms, concepts: Iterable[str]) -> Norms:
    """The norms of the prompted `concepts`, in prompt order.

    Norms concepts that were not prompted, and prompted concepts the norms do not rate, are both
    recorded in `dropped`. Concepts match exactly (case and spaces included), as prompts are built
    from `norms.concepts`. Raises InputError when no prompted concept has norms.
    """
    concepts = list(concepts)
    _require_unique(concepts, "prompted concept")
    rated = set(norms.concepts)
    overlap = [c for c in concepts if c in rated]
    if not overlap:
        folded = {c.casefold() for c in norms.concepts}
        near = [c for c in concepts if c.casefold() in folded]
        hint = f" {preview(near)} would match if case were ignored." if near else ""
        raise InputError(
            f"none of the {len(concepts)} prompted concepts ({preview(concepts)}) is rated by the {norms.name} "
            f"norms ({preview(norms.concepts)}).{hint} Prompt the norms' own concepts (`norms.concepts`), "
            "or give norms that rate the prompted concepts."
        )
    aligned = norms.select(overlap, reason="not among the prompted concepts")
    unrated = ((c, f"prompted, but not rated by {norms.name}") for c in concepts if c not in rated)
    return dataclasses.replace(aligned, dropped=aligned._dropped_plus(unrated))
