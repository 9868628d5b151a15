"""`align_by_concept`: which targets row goes with each feature row, by name, never silently by position.

Every place where features meet ratings (`probe_sweep(..., concepts=)`, `run_probe_files`, `jaxprobe
probe`) calls it. The rule:

  * Feature rows are named by their concepts when those are known (`concepts=`, `--concepts FILE`, a
    "concepts" array in a .npz, concepts.txt next to the .npy files, which `jaxprobe extract --concepts`
    writes), otherwise by their prompts (the manifest.json of `jaxprobe extract`).
  * A name matches a targets row whose concept is exactly the same text (case and spaces included,
    after str()). Prompts are not parsed: "a photo of a dog" does not match "dog"; give the concepts.
  * Every feature row must match one targets row. A name that appears twice among the feature rows or
    among the targets rows is refused, and so is a feature row whose name no targets row has. Targets
    rows that no feature row names are left out (and counted).
  * Feature rows without any names are paired by position only on request (`assume_same_order`), and
    only when both sides have the same number of rows.

Errors are `AlignmentError` (an `InputError`) naming a few offenders and the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxprobe.errors import AlignmentError, preview

NAMING = ("give the features' concepts: a 'concepts' array in the .npz, concepts.txt (one per row) next to the "
          ".npy files (`jaxprobe extract --concepts FILE` writes it), `jaxprobe probe --concepts FILE`, or "
          "`probe_sweep(..., concepts=)`")


@dataclass(frozen=True)
class Alignment:
    """rows: (n_features,) index of the targets row paired with each feature row."""

    rows: np.ndarray
    by: str              # "concept", "prompt" or "position"
    n_targets: int       # targets rows offered

    @property
    def n_matched(self) -> int:
        return len(self.rows)

    @property
    def n_unused(self) -> int:
        """Targets rows that no feature row named (left out of the probes)."""
        return self.n_targets - len(self.rows)

    def message(self) -> str:
        if self.by == "position":
            return f"paired {self.n_matched} feature rows with the targets rows by position (assume_same_order)"
        unused = f"; {self.n_unused} targets rows without features left out" if self.n_unused else ""
        return f"matched {self.n_matched} feature rows to targets rows by {self.by}{unused}"


def _repeated(names: Sequence[str]) -> list[str]:
    return [name for name, count in Counter(names).items() if count > 1]


def align_by_concept(feature_names: Sequence | None, target_names: Sequence | None, *, n_features: int,
                     n_targets: int, by: str = "concept", assume_same_order: bool = False,
                     targets_label: str = "targets") -> Alignment:
    """Pair each of `n_features` feature rows with one of `n_targets` targets rows (module docstring).

    feature_names: per feature row, its concept (by="concept") or prompt (by="prompt"); None when the
    features name no rows. target_names: per targets row, its concept; None when unnamed.
    assume_same_order: with unnamed features, pair rows by position (counts must agree).
    targets_label: how the targets are called in messages (e.g. the ratings file's name).
    """
    if target_names is not None:
        target_names = [str(name) for name in target_names]
        repeated = _repeated(target_names)
        if repeated:
            raise AlignmentError(
                f"{targets_label}: concept(s) {preview(repeated)} appear more than once; give one row per concept "
                "(average or drop the repeats), so that each feature row has exactly one targets row")
    if feature_names is None:
        if not assume_same_order:
            raise AlignmentError(
                f"the features do not name their rows, so they cannot be matched to the rows of {targets_label} "
                f"by concept ({n_features} feature rows, {n_targets} targets rows): {NAMING}. If both are "
                "already in the same order, pass --assume-same-order (assume_same_order=True) to pair them "
                "by position.")
        if n_features != n_targets:
            raise AlignmentError(
                f"--assume-same-order pairs rows by position, but there are {n_features} feature rows and "
                f"{n_targets} rows in {targets_label}: {NAMING}")
        return Alignment(np.arange(n_features), "position", n_targets)
    feature_names = [str(name) for name in feature_names]
    if len(feature_names) != n_features:
        raise AlignmentError(f"{len(feature_names)} feature {by}s for {n_features} feature rows: give one per row")
    repeated = _repeated(feature_names)
    if repeated:
        raise AlignmentError(
            f"the features name {by}(s) {preview(repeated)} on more than one row; a {by} must name one row "
            f"(average the rows of each concept, or give each row its own name)")
    if target_names is None:
        raise AlignmentError(
            f"the features name their rows but {targets_label} does not: give the targets a concept column "
            "(--concept-column) or a DataFrame index of concepts")
    row = {name: i for i, name in enumerate(target_names)}
    missing = [name for name in feature_names if name not in row]
    if missing:
        folded = {name.casefold() for name in target_names}
        near = [name for name in missing if name.casefold() in folded]
        hint = f" {preview(near)} would match if case were ignored." if near else ""
        how = (f" Prompts are matched to concepts by their exact text; for templated prompts (e.g. 'a photo of "
               f"a dog' for 'dog') {NAMING}." if by == "prompt" else
               f" Check the concept column of {targets_label} (--concept-column), or rate these concepts.")
        raise AlignmentError(
            f"{len(missing)} of {n_features} feature rows have no row in {targets_label}: {preview(missing)} "
            f"(targets concepts: {preview(target_names)}).{hint}{how}")
    return Alignment(np.array([row[name] for name in feature_names], dtype=np.int64), by, n_targets)
