"""Fold plans: which rows train and test each outer fold, and how each outer training set is split
again for model selection.

A plan is padded to static shapes — every outer fold has the same number of training and test slots,
every inner fold the same number of validation slots — so one compiled program serves every fold,
every feature set and every missingness pattern; boolean masks mark the real slots. Inner folds hold
*positions* into their outer fold's training slots: model selection only ever sees the outer training
set, so no outer test row can influence it.

Inner folds must partition the outer training set (each training row is validated exactly once):
the ridge solver scores them by exact deletion from the fit on the whole outer training set, which
is what refitting on "training set minus validation fold" means only for a partition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np

from jaxprobe.errors import InputError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """Outer folds (train/test row indices) and inner validation folds per outer training set.

    Padded slots hold index 0 and a False mask; `restrict` masks out more rows (e.g. the rows where
    a target is missing) without changing any shape.
    """

    train: np.ndarray       # (k, n_train) int: row indices of each outer training set
    train_mask: np.ndarray  # (k, n_train) bool
    test: np.ndarray        # (k, n_test) int: row indices of each outer test set
    test_mask: np.ndarray   # (k, n_test) bool
    val: np.ndarray         # (k, k_inner, n_val) int: positions into train[k]
    val_mask: np.ndarray    # (k, k_inner, n_val) bool

    @property
    def n_outer(self) -> int:
        return self.train.shape[0]

    @property
    def leave_one_out(self) -> bool:
        """Inner folds of one row each: scored by squared error, as R² needs two rows."""
        return self.val.shape[-1] == 1

    def restrict(self, rows: np.ndarray) -> FoldPlan:
        """The same plan with only `rows` (n,) bool kept: other rows neither train nor test."""
        rows = np.asarray(rows, bool)
        train_mask = self.train_mask & rows[self.train]
        val_mask = self.val_mask & np.take_along_axis(
            train_mask[:, None, :], self.val, axis=2)
        return dataclasses.replace(
            self, train_mask=train_mask, test_mask=self.test_mask & rows[self.test],
            val_mask=val_mask)


def kfold_tests(n_folds: int, groups: np.ndarray, *, seed: int | None) -> list[np.ndarray]:
    """Test row sets of a K-fold split that keeps every group on one side.

    groups: (n,) labels (one distinct label per row for a plain K-fold). seed=None: contiguous
    folds in row order (scikit-learn's KFold without shuffling; groups must then be distinct).
    Otherwise groups are shuffled and dealt largest first to the lightest fold, which balances fold
    sizes as scikit-learn's GroupKFold does.
    """
    n = len(groups)
    _, group_of_row, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if n_folds < 2 or n_folds > len(sizes):
        raise InputError(
            f"cannot make {n_folds} folds from {len(sizes)} groups of rows: use between 2 and "
            f"{len(sizes)} folds, or fewer/larger groups")
    if seed is None:
        if len(sizes) != n:
            raise InputError("contiguous folds cannot keep groups together: pass a seed")
        return np.array_split(np.arange(n), n_folds)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group = np.empty(len(sizes), int)
    load = np.zeros(n_folds, int)
    for g in order:
        fold_of_group[g] = np.argmin(load)
        load[fold_of_group[g]] += sizes[g]
    fold_of_row = fold_of_group[group_of_row]
    return [np.flatnonzero(fold_of_row == f) for f in range(n_folds)]


def nested_plan(
    n: int, outer: int = 5, inner: int | Literal["loo"] = 5, *,
    groups: Sequence | np.ndarray | None = None, seed: int = 0,
) -> FoldPlan:
    """Shuffled outer K-fold with inner K-fold (or leave-one-out) inside every outer training set.

    groups: (n,) labels kept on one side of every split, outer and inner (e.g. concept category).
    """
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise InputError(f"groups has {len(groups)} labels for {n} rows")
    tests = kfold_tests(outer, groups, seed=seed)
    vals = []
    for k, test in enumerate(tests):
        train = np.setdiff1d(np.arange(n), test)
        if inner == "loo":
            vals.append([np.array([i]) for i in range(len(train))])
        else:
            vals.append(kfold_tests(inner, groups[train], seed=seed * 1009 + k + 1))
    return pack_plan(n, tests, vals)


def pack_plan(
    n: int, tests: Sequence[np.ndarray], vals: Sequence[Sequence[np.ndarray]],
) -> FoldPlan:
    """Pad explicit folds into a FoldPlan.

    tests: per outer fold, the test rows (the training rows are all others; an empty test set
    trains on every row). vals: per outer fold, validation sets as positions into that fold's
    sorted training rows, which they must partition.
    """
    trains = [np.setdiff1d(np.arange(n), t) for t in tests]
    for train, folds in zip(trains, vals):
        covered = np.sort(np.concatenate(folds)) if len(folds) else np.array([], int)
        if not np.array_equal(covered, np.arange(len(train))):
            raise InputError(
                "inner validation folds must partition the training rows (every training row in "
                "exactly one validation fold): use a K-fold or leave-one-out splitter")
        if len(folds) < 2:
            raise InputError("model selection needs at least 2 inner folds")
    train, train_mask = _pad(trains)
    test, test_mask = _pad(tests)
    n_val = max(len(v) for folds in vals for v in folds)
    n_inner = max(len(folds) for folds in vals)
    val = np.zeros((len(tests), n_inner, n_val), np.int32)
    val_mask = np.zeros((len(tests), n_inner, n_val), bool)
    for k, folds in enumerate(vals):
        val[k, :len(folds)], val_mask[k, :len(folds)] = _pad(folds, width=n_val)
    return FoldPlan(train, train_mask, test, test_mask, val, val_mask)


def inner_folds_from_cv(cv, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Validation sets of `cv` on all n rows: None -> leave-one-out; int -> contiguous K-fold
    (scikit-learn's default for regressors); a splitter (has .split) or an iterable of
    (train, validation) index pairs -> its validation sets."""
    n = len(x)
    if cv is None or cv == "loo":
        return [np.array([i]) for i in range(n)]
    if isinstance(cv, (int, np.integer)):
        return kfold_tests(int(cv), np.arange(n), seed=None)
    splits = cv.split(x, y) if hasattr(cv, "split") else cv
    return [np.asarray(val) for _, val in splits]


def _pad(index_sets: Sequence[np.ndarray], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in index_sets) if width is None else width
    index = np.zeros((len(index_sets), width), np.int32)
    mask = np.zeros((len(index_sets), width), bool)
    for i, s in enumerate(index_sets):
        index[i, :len(s)] = s
        mask[i, :len(s)] = True
    return index, mask
