"""`probe_sweep`: nested cross-validated ridge probes for every site x timestep, as a tidy table.

Table columns, one row per (feature set, target):
  feature_set  "site" for a site without a step axis (a 2-D array), "site@i" for each entry i on the
               step axis of one with it (a 3-D array; `jaxprobe.captures.feature_sets`)
  site, timestep   the site name and the position i on its step axis (-1 without one)
  target, group    the target name and its group (`target_groups`; missing when not given)
  alpha        median over outer folds of the alpha chosen by inner cross-validation
  score        `metric` of the out-of-fold predictions (default: Pearson r between each row's
               prediction by the outer fold that held it out and its target, over observed rows)
  r2           out-of-fold R² (1 - SSE / total sum of squares around the observed mean)
  pairwise_acc 2-vs-2 accuracy of the out-of-fold predictions (only with pairwise_acc=True)
  ci_low, ci_high  percentile bootstrap interval of `score` over resampled concepts (NaN without)
  p, q         one-sided permutation p-value of `score` (targets shuffled, whole pipeline rerun)
               and its Benjamini–Hochberg q-value over every row of the table (NaN without)
  null_mean, null_high  mean and 95th percentile of the permutation-null scores (with
               n_permutations > 0 only)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from jaxprobe.captures import Captures, feature_sets
from jaxprobe.errors import InputError, preview
from jaxprobe.probes import stats
from jaxprobe.probes.alignment import align_by_concept
from jaxprobe.probes.crossval import DEFAULT_ALPHAS, cross_validate_ridge
from jaxprobe.probes.folds import nested_plan
from jaxprobe.probes.metrics import Metric
from jaxprobe.runtime.files import atomic_write_bytes, atomic_write_npy, read_lines, write_atomic
from jaxprobe.runtime.progress import progress as progress_bar

logger = logging.getLogger(__name__)


def probe_sweep(
    features: Mapping[str, np.ndarray] | np.ndarray,
    targets: pd.DataFrame | np.ndarray,
    *,
    concepts: Sequence[str] | None = None,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    outer_cv: int = 5,
    inner_cv: int | str = 5,
    alpha_per_target: bool = True,
    groups: Sequence | np.ndarray | None = None,
    target_groups: Mapping[str, str] | None = None,
    n_permutations: int = 0,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    standardize: bool = True,
    metric: Metric = "pearson",
    pairwise_acc: bool = False,
    return_predictions: bool = False,
    dtype: np.dtype | type = np.float32,
    batch_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """Probe every feature set against every target with nested cross-validated ridge.

    features: a `Captures` (what `pipe.capture` returns), a plain site -> (n, d) or
        (n, n_timesteps, d) mapping (one feature set per timestep), or an (F, n, d) array (sites "0",
        "1", ...); split by `jaxprobe.captures.feature_sets`.
    targets: (n, t) DataFrame (columns = target names; NaN or "na" = missing, masked per target)
        or array.
    concepts: (n,) the concept of each feature row. Given, the targets must be a DataFrame indexed by
        concept: each feature row is paired with the targets row of the same concept (exact text), a
        concept repeated on either side or missing from the targets raises `AlignmentError`, targets
        rows no feature row names are left out, and "matched n feature rows ..." is logged (INFO,
        logger jaxprobe.probes.sweep); see `jaxprobe.probes.alignment`. Not given, rows are paired by
        position: feature row i with targets row i.
    groups: (n,) labels kept on one side of every split (e.g. category), one per feature row; with
        `concepts`, a pandas Series indexed by concept is matched by concept like the targets.
    outer_cv folds score; inner_cv (int or "loo") folds inside each outer training set choose
    alpha (per target unless alpha_per_target=False). See the module docstring for the columns.
    return_predictions: also return out-of-fold predictions (F, n, t), F in table order.
    progress: a bar (or periodic lines when stderr is not a terminal) over the feature sets.
    """
    sets = feature_sets(features)
    names, sites, steps = [s.name for s in sets], [s.site for s in sets], [s.step for s in sets]
    arrays = [s.array for s in sets]
    if concepts is not None:
        targets, groups = _align_to_concepts(targets, groups, concepts, len(arrays[0]))
    target_names, Y = _targets(targets)
    n = len(Y)
    dims = {a.shape[-1] for a in arrays}
    plan = nested_plan(n, outer_cv, inner_cv, groups=groups, seed=seed)

    results = {}
    with progress_bar("probing (feature sets)", len(arrays), progress) as bar:
        for d in sorted(dims):  # one compiled program per feature width
            index = [i for i, a in enumerate(arrays) if a.shape[-1] == d]
            results[d] = (index, cross_validate_ridge(
                [arrays[i] for i in index], Y, plan, alphas, standardize=standardize, metric=metric,
                pairwise_acc=pairwise_acc, alpha_per_target=alpha_per_target,
                n_permutations=n_permutations, n_bootstrap=n_bootstrap, ci=ci, seed=seed,
                return_predictions=return_predictions, dtype=dtype, batch_size=batch_size, progress=bar))

    def stacked(get):  # per-width results -> (F, ...) in feature-set order
        first = get(next(iter(results.values()))[1])
        out = np.empty((len(arrays), *first.shape[1:]), first.dtype)
        for index, res in results.values():
            out[index] = get(res)
        return out

    t = len(target_names)
    groups_of = [None if target_groups is None else target_groups.get(name) for name in target_names]
    table = pd.DataFrame({
        "feature_set": np.repeat(names, t),
        "site": np.repeat(sites, t),
        "timestep": np.repeat(steps, t),
        "target": np.tile(target_names, len(arrays)),
        "group": np.tile(np.array(groups_of, object), len(arrays)),
        "alpha": np.median(stacked(lambda r: r.alphas), axis=1).ravel(),
        "score": stacked(lambda r: r.score).ravel(),
        "r2": stacked(lambda r: r.metrics["r2"] if metric != "r2" else r.score).ravel(),
    })
    if pairwise_acc or metric == "pairwise_acc":
        table["pairwise_acc"] = stacked(
            lambda r: r.score if metric == "pairwise_acc" else r.metrics["pairwise_acc"]).ravel()
    table["ci_low"] = stacked(lambda r: r.ci_low).ravel()
    table["ci_high"] = stacked(lambda r: r.ci_high).ravel()
    table["p"] = stacked(lambda r: r.p).ravel()
    table["q"] = stats.fdr_bh(table["p"].to_numpy())
    if n_permutations:  # the null itself, so reports can draw chance next to the scores
        null = stacked(lambda r: r.null)  # (F, n_permutations, t)
        table["null_mean"] = np.nanmean(null, axis=1).ravel()
        table["null_high"] = np.nanpercentile(null, 95, axis=1).ravel()
    if return_predictions:
        return table, stacked(lambda r: r.predictions)
    return table


def _align_to_concepts(targets, groups, concepts: Sequence[str], n_features: int):
    """(targets, groups) reordered to the feature rows' `concepts` with `align_by_concept`."""
    named = isinstance(targets, pd.DataFrame) and not isinstance(targets.index, pd.RangeIndex)
    alignment = align_by_concept(concepts, targets.index if named else None, n_features=n_features,
                                 n_targets=len(targets), targets_label="the targets DataFrame")
    logger.info(alignment.message())
    targets = targets.iloc[alignment.rows]
    if isinstance(groups, pd.Series) and not isinstance(groups.index, pd.RangeIndex):
        groups = groups.iloc[align_by_concept(concepts, groups.index, n_features=n_features, n_targets=len(groups),
                                              targets_label="the groups Series").rows].to_numpy()
    return targets, groups


def aggregate(table: pd.DataFrame, by: str | None = "group") -> pd.DataFrame:
    """Mean of the per-target metrics over targets, per feature set and per `by` (e.g. "group")
    or over all targets (by=None), with the number of targets averaged."""
    keys = ["feature_set", "site", "timestep"] + ([by] if by else [])
    metrics = [c for c in ("score", "r2", "pairwise_acc") if c in table]
    out = table.groupby(keys, sort=False, dropna=False)[metrics].mean()
    out["n_targets"] = table.groupby(keys, sort=False, dropna=False).size()
    return out.reset_index()


def probe_sweep_across_processes(
    features: Mapping[str, np.ndarray], targets: pd.DataFrame | np.ndarray, parts_dir: str | os.PathLike,
    **options,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray] | None:
    """`probe_sweep` with the sites shared out over the processes of a multi-process job.

    Each process probes its share of sites on its own devices and writes its part of the table under
    `parts_dir` (a folder every process sees); after a barrier process 0 joins the parts in the order
    one process would have produced and returns the result (q-values recomputed over the whole
    table); the other processes return None. Permutations and bootstrap samples depend only on the
    targets and the seed, so the joined table equals a one-process sweep. With one process this is
    `probe_sweep`.
    """
    import jax

    from jaxprobe.runtime import distributed

    if jax.process_count() == 1:
        return probe_sweep(features, targets, **options)
    order = [s.name for s in feature_sets(features)]
    mine = _balanced_share(features, jax.process_index(), jax.process_count())
    parts = Path(parts_dir)
    part = parts / f"probes-{jax.process_index():04d}-of-{jax.process_count():04d}"
    if mine:
        share = features.subset(sites=mine) if isinstance(features, Captures) else {s: features[s] for s in mine}
        table, predictions = probe_sweep(share, targets,
                                         **{**options, "return_predictions": True})
        atomic_write_bytes(part.with_suffix(".parquet"), table.to_parquet())
        atomic_write_npy(part.with_suffix(".npy"), predictions)
    distributed.barrier("probe_sweep_across_processes")
    if not distributed.is_leader():
        return None
    tables, predictions = [], []
    for i in range(jax.process_count()):
        path = parts / f"probes-{i:04d}-of-{jax.process_count():04d}.parquet"
        if path.exists():
            tables.append(pd.read_parquet(path))
            predictions.append(np.load(path.with_suffix(".npy")))
    shutil.rmtree(parts, ignore_errors=True)
    table = pd.concat(tables, ignore_index=True)
    rank = {name: i for i, name in enumerate(order)}
    rows = np.argsort(table["feature_set"].map(rank).to_numpy(), kind="stable")
    table = table.iloc[rows].reset_index(drop=True)
    table["q"] = stats.fdr_bh(table["p"].to_numpy())
    if not options.get("return_predictions"):
        return table
    joined = np.concatenate(predictions)
    names = list(dict.fromkeys(pd.concat(tables)["feature_set"]))
    return table, joined[np.argsort([rank[name] for name in names], kind="stable")]


def _balanced_share(features: Mapping[str, np.ndarray], index: int, count: int) -> list[str]:
    """Sites for process `index`: greedy longest-first packing by feature-set count x width."""
    cost: dict[str, int] = {}
    for s in feature_sets(features):
        cost[s.site] = cost.get(s.site, 0) + s.array.shape[-1]
    loads = [0] * count
    owner = {}
    for site in sorted(cost, key=lambda s: (-cost[s], s)):  # by name too: the same on every process
        owner[site] = min(range(count), key=loads.__getitem__)
        loads[owner[site]] += cost[site]
    return [site for site in features if owner[site] == index]


def run_probe_files(
    features_path: str | os.PathLike, targets_path: str | os.PathLike, out_path: str | os.PathLike,
    *, concept_column: str | None = None, group_column: str | None = None,
    target_groups: str | os.PathLike | Mapping[str, str] | None = None,
    concepts: Sequence[str] | str | os.PathLike | None = None, assume_same_order: bool = False,
    log: Callable[[str], None] | None = None, **options,
) -> pd.DataFrame | None:
    """`probe_sweep` from files; writes the table as <out>.parquet and <out>.csv.

    features_path: .npz (one array per site; an optional "concepts" array names the rows), .npy
        (one site, named after the file) or a directory of .npy files (one per site, plus an
        optional concepts.txt, one concept per line).
    targets_path: CSV with a concept column (`concept_column`, default "concept" or the first
        column) and one numeric column per target ("na" = missing); `group_column` names a column
        of concept groups for group-aware folds (not a target).
    Feature rows are matched to targets rows by name (`jaxprobe.probes.alignment.align_by_concept`),
    never silently by position. The names, first found first: `concepts` (a list, or a text file with
    one concept per feature row); the features' own concepts ("concepts" in the .npz, concepts.txt in
    the folder, as `jaxprobe extract --concepts` writes); the prompts in the folder's manifest.json
    (`jaxprobe extract`), matched by their exact text, so templated prompts ("a photo of a dog") need
    the concepts. Repeated or unmatched names raise `AlignmentError`; targets rows that no feature row
    names are left out. assume_same_order: pair rows by position instead, when the features name no
    concepts (their prompts are then ignored); the row counts must agree. The line saying how many
    rows were matched goes to `log` (default: logging at INFO level).
    target_groups: target -> group mapping, or a CSV whose first two columns are target, group
        (e.g. Binder's attribute_domains.csv). Other options go to `probe_sweep`.
    Files are written under a temporary name and renamed, so a crash never leaves a partial table.
    In a multi-process job the processes share the sites; process 0 writes and returns the table.
    """
    features, names = load_features(Path(features_path))
    by = "concept"
    if concepts is not None:
        names = read_lines(concepts, "concepts file") if isinstance(concepts, (str, os.PathLike)) else list(concepts)
    elif names is None and not assume_same_order:
        names, by = manifest_prompts(Path(features_path)), "prompt"
    table = read_targets(targets_path, concept_column, group_column)
    alignment = align_by_concept(names, table.index, n_features=len(next(iter(features.values()))),
                                 n_targets=len(table), by=by, assume_same_order=assume_same_order,
                                 targets_label=str(targets_path))
    (log or logger.info)(alignment.message())
    table = table.iloc[alignment.rows]
    groups = None
    if group_column is not None:
        groups = table.pop(group_column).to_numpy()
    if isinstance(target_groups, (str, os.PathLike)):
        pairs = pd.read_csv(target_groups)
        target_groups = dict(zip(pairs.iloc[:, 0], pairs.iloc[:, 1]))
    base = Path(out_path)
    base = base.with_suffix("") if base.suffix in (".parquet", ".csv") else base
    result = probe_sweep_across_processes(features, table, base.with_name(f".{base.name}.parts"), groups=groups,
                                          target_groups=target_groups, **options)
    if result is None:  # not process 0 of a multi-process job
        return None
    write_atomic(base.with_suffix(".parquet"), result.to_parquet)
    write_atomic(base.with_suffix(".csv"), lambda path: result.to_csv(path, index=False))
    return result


def read_targets(path: str | os.PathLike, concept_column: str | None = None,
                 group_column: str | None = None) -> pd.DataFrame:
    """A ratings table indexed by concept: comma, semicolon or tab separated (sniffed), UTF-8, "na" or an
    empty cell for a missing rating. The concept column is `concept_column`, else "concept", else the one
    text column; every other column but `group_column` must hold numbers."""
    try:
        table = pd.read_csv(path, sep=None, engine="python", na_values=["na"], encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"targets file {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it "
                         "as UTF-8 CSV") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as err:
        raise InputError(f"cannot read targets file {path} as CSV/TSV: {err}") from None
    columns = [str(c) for c in table.columns]
    if len(columns) < 2 or table.empty:
        raise InputError(f"targets file {path} needs a concept column and at least one target column, and rows "
                         f"(found columns {columns[:8]}, {len(table)} rows); separate cells with ',', ';' or tabs")
    text = [c for c in columns if c != group_column and not pd.api.types.is_numeric_dtype(table[c])]
    if concept_column is None:
        concept_column = "concept" if "concept" in columns else text[0] if len(text) == 1 else None
        if concept_column is None:
            raise InputError(f"targets file {path}: which column names the concepts? Text columns: {text or 'none'}; "
                             "pass --concept-column NAME (API: concept_column=)")
    if concept_column not in columns:
        raise InputError(f"targets file {path} has no column {concept_column!r}; its columns: {preview(columns)}")
    labels = [c for c in text if c not in (concept_column, group_column)]
    if labels:
        example = table[labels[0]].dropna().astype(str).iloc[0]
        raise InputError(f"targets file {path}: columns {labels[:5]} hold text (e.g. {example!r}), but every "
                         "target must be a number ('na' or empty when missing). Pass a label column as "
                         "--group-column (concept groups kept on one side of every split) or delete it")
    if group_column is not None and group_column not in columns:
        raise InputError(f"targets file {path} has no group column {group_column!r}; its columns: {preview(columns)}")
    return table.set_index(concept_column)


def _targets(targets) -> tuple[list[str], np.ndarray]:
    if isinstance(targets, pd.DataFrame):
        try:
            values = targets.replace("na", np.nan).to_numpy(dtype=float)
        except (TypeError, ValueError) as err:
            raise InputError(
                f"targets must be numeric (NaN or 'na' for missing): move label columns to the "
                f"index or to `groups` ({err})") from None
        return [str(c) for c in targets.columns], values
    values = np.asarray(targets, float)
    values = values[:, None] if values.ndim == 1 else values
    return [str(i) for i in range(values.shape[1])], values


def manifest_prompts(path: Path) -> list[str] | None:
    """The prompts, one per feature row, in the manifest.json `jaxprobe extract` wrote in a feature folder."""
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is None or not manifest.is_file():
        return None
    prompts = json.loads(manifest.read_text()).get("prompts")
    return [str(p) for p in prompts] if prompts else None


def load_features(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise InputError(f"no .npy files in {path}: write one array per site, named after it")
        concepts_file = path / "concepts.txt"
        concepts = read_lines(concepts_file, "concepts file") if concepts_file.exists() else None
        return {f.stem: np.load(f, mmap_mode="r") for f in files}, concepts
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        concepts = arrays.pop("concepts", None)
        return arrays, None if concepts is None else [str(c) for c in concepts]
    if path.suffix == ".npy":
        return {path.stem: np.load(path, mmap_mode="r")}, None
    raise InputError(f"features must be a .npz, a .npy or a directory of .npy files, got {path}")
