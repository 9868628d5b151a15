"""Which attribute groups (Binder's domains, McRae's feature types) are decoded better or worse than average.

At one feature set, a group's score is the mean score of its targets and its *difference* is that
minus the mean over all targets. The test asks whether the group's targets are decoded differently
from any other set of as many targets: the group labels are shuffled over the targets (the same
shuffles for every feature set), and the two-sided p-value is the share of shuffles whose difference
is at least as large in absolute value. Benjamini–Hochberg q-values are taken over every
(feature set, group) row.

The null treats the targets as exchangeable: it conditions on this set of attributes and says
nothing about new ones. A permutation p-value is never below 1 / (n_permutations + 1), and a group of
k targets out of t can reach at most 1 / C(t, k): two-target groups cannot be highly significant.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxprobe.errors import InputError
from jaxprobe.probes.stats import fdr_bh
from jaxprobe.studies.norms_probing.decoding import check_table, feature_set_index

# permuted group means held at once: bounds memory at (feature sets x permutations x groups) floats
_CHUNK_ELEMENTS = 1 << 22


def group_decoding(table: pd.DataFrame, *, n_permutations: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per (feature set, group): each group's mean score against the mean over all targets.

    table: the probe table (one row per feature set x target, with `group`; NaN scores are ignored).
    Returns one row per feature set and group, in table order, with columns feature_set, stage, site,
    timestep, group, n_targets (targets with a score), group_score, mean_score (all targets),
    difference (group_score - mean_score), p (two-sided permutation p-value of the difference) and q
    (Benjamini–Hochberg over all rows). See the module docstring for the test.
    """
    table = check_table(table)
    if "group" not in table or table["group"].isna().all():
        raise InputError("the probe table has no target groups: pass target_groups to probe_sweep "
                         "(e.g. `norms.groups`) so that every target has one.")
    if table.duplicated(["feature_set", "target"]).any():
        raise InputError("the probe table has repeated (feature_set, target) rows; give one row per pair.")
    if n_permutations < 1:
        raise InputError(f"n_permutations must be at least 1, got {n_permutations}")

    index = feature_set_index(table)
    targets = list(dict.fromkeys(table["target"]))
    group_of = table.drop_duplicates("target").set_index("target")["group"]
    names = list(dict.fromkeys(group_of.dropna()))
    members = np.stack([(group_of.loc[targets] == g).to_numpy(float) for g in names], axis=1)  # (t, G)
    scores = table.pivot(index="feature_set", columns="target", values="score")
    scores = scores.loc[index["feature_set"], targets].to_numpy(float)  # (F, t)

    rated = ~np.isnan(scores)
    weights, values = rated.astype(float), np.where(rated, scores, 0.0)

    def group_means(membership: np.ndarray) -> np.ndarray:  # (t, k) -> (F, k)
        with np.errstate(invalid="ignore"):  # a group whose targets all lack a score: NaN
            return (values @ membership) / (weights @ membership)

    mean_score = values.sum(1) / weights.sum(1)  # (F,), fixed under shuffles of the labels
    group_score = group_means(members)  # (F, G)
    observed = group_score - mean_score[:, None]

    F, t, G = len(index), len(targets), len(names)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // (F * G))
    exceed = np.zeros((F, G))
    for start in range(0, n_permutations, chunk):
        c = min(chunk, n_permutations - start)
        orders = rng.permuted(np.tile(np.arange(t), (c, 1)), axis=1)  # (c, t)
        shuffled = members[orders].transpose(1, 0, 2).reshape(t, c * G)  # target j takes the labels of orders[:, j]
        null = group_means(shuffled).reshape(F, c, G) - mean_score[:, None, None]
        # ties count as exceeding; the tolerance absorbs rounding between equal sums taken in another order
        exceed += (np.abs(null) >= np.abs(observed)[:, None, :] - 1e-12).sum(1)
    p = np.where(np.isnan(observed), np.nan, (1 + exceed) / (1 + n_permutations))

    out = index.loc[np.repeat(np.arange(F), G)].reset_index(drop=True)
    out["group"] = np.tile(np.array(names, dtype=object), F)
    out["n_targets"] = (weights @ members).astype(int).ravel()
    out["group_score"] = group_score.ravel()
    out["mean_score"] = np.repeat(mean_score, G)
    out["difference"] = observed.ravel()
    out["p"] = p.ravel()
    out["q"] = fdr_bh(out["p"].to_numpy())
    return out
