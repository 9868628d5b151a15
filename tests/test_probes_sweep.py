"""Nested cross-validation engine and probe_sweep: equality with a plain scikit-learn loop,
no leakage from test folds, group-aware folds, per-target missing values, chunking, sharding over
simulated devices, permutation p-values, FDR and bootstrap intervals, the tidy table and files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import RidgeCV as SkRidgeCV
from sklearn.preprocessing import StandardScaler

from jaxprobe.errors import AlignmentError
from jaxprobe.probes import align_by_concept, cross_validate_ridge, metrics, nested_plan, stats
from jaxprobe.probes.folds import FoldPlan
from jaxprobe.probes.sweep import aggregate, probe_sweep, run_probe_files

from binder_sheet import concrete_rows

ALPHAS = np.logspace(-2, 5, 8)


@pytest.fixture(scope="module")
def binder() -> pd.DataFrame:
    """Concrete nouns: 65 attribute ratings plus their category (for group-aware folds)."""
    concrete, ratings = concrete_rows()
    ratings["category"] = concrete["Category"]
    return ratings


@pytest.fixture(scope="module")
def data(binder):
    """Six targets (two missing the same 15% of rows: one compiled pattern fewer) and three feature
    sets built from the ratings: informative, weakly informative and pure noise."""
    rng = np.random.default_rng(0)
    Y = binder.iloc[:, :6].to_numpy().copy()
    Y[rng.random(len(Y)) < 0.15, [[1], [4]]] = np.nan
    ratings = binder.iloc[:, :65].to_numpy()
    n = len(Y)
    X = [ratings @ rng.normal(size=(65, 20)) / 8 + rng.normal(size=(n, 20)) * 0.3,
         ratings @ rng.normal(size=(65, 20)) / 8 + rng.normal(size=(n, 20)) * 3,
         rng.normal(size=(n, 20))]
    return np.stack(X), Y


@pytest.fixture(scope="module")
def plan(data) -> FoldPlan:
    return nested_plan(data[1].shape[0], outer=4, inner=3, seed=1)


@pytest.fixture(scope="module")
def result(data, plan):
    X, Y = data
    return cross_validate_ridge(X, Y, plan, ALPHAS, alpha_per_target=False, dtype=np.float64)


def sklearn_nested(x, y, plan: FoldPlan, observed) -> tuple[np.ndarray, list[float]]:
    """The same nested CV with scikit-learn, one target: scaler on the outer training rows,
    RidgeCV on the plan's inner folds, rows with a missing target dropped from every set."""
    oof, chosen = np.full(len(y), np.nan), []
    for k in range(plan.n_outer):
        slots = plan.train[k][plan.train_mask[k]]
        keep = observed[slots]
        train = slots[keep]
        position = np.cumsum(keep) - 1              # slot position -> position among kept rows
        splits = []
        for fold, mask in zip(plan.val[k], plan.val_mask[k]):
            val = position[fold[mask][keep[fold[mask]]]]
            splits.append((np.setdiff1d(np.arange(len(train)), val), val))
        test = plan.test[k][plan.test_mask[k]]
        test = test[observed[test]]
        scaler = StandardScaler().fit(x[train])
        model = SkRidgeCV(ALPHAS, cv=splits).fit(scaler.transform(x[train]), y[train])
        oof[test] = model.predict(scaler.transform(x[test]))
        chosen.append(model.alpha_)
    return oof, chosen


@pytest.mark.parametrize("target", [0, 1])  # complete, and with 15% missing
def test_nested_cv_equals_a_sklearn_loop(data, plan, result, target):
    X, Y = data
    observed = ~np.isnan(Y[:, target])
    for f in (0, 2):
        oof, chosen = sklearn_nested(X[f], Y[:, target], plan, observed)
        # alpha shared over targets in ours: compare on a single-target run of the same engine
        alone = cross_validate_ridge(X[f:f + 1], Y[:, [target]], plan, ALPHAS, dtype=np.float64)
        np.testing.assert_allclose(alone.predictions[0, :, 0], oof, atol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(alone.alphas[0, :, 0], chosen)
        r = np.corrcoef(oof[observed], Y[observed, target])[0, 1]
        assert alone.score[0, 0] == pytest.approx(r, abs=1e-8)


def test_missing_targets_are_masked_per_target_not_dropped(data, result):
    X, Y = data
    missing = np.isnan(Y[:, 4])
    assert np.isnan(result.predictions[:, missing][..., [1, 4]]).all()
    assert np.isfinite(result.predictions[:, missing][..., [0, 2, 3, 5]]).all()  # others keep rows
    assert np.isfinite(result.predictions[:, ~missing]).all()


def test_test_folds_never_influence_selection(data, plan, result):
    X, Y = data
    held_out = plan.test[0][plan.test_mask[0]]
    rng = np.random.default_rng(5)
    X2, Y2 = X.copy(), Y.copy()
    X2[:, held_out] = rng.normal(size=X2[:, held_out].shape) * 100
    Y2[held_out] = rng.normal(size=Y2[held_out].shape) * 100
    changed = cross_validate_ridge(X2, Y2, plan, ALPHAS, alpha_per_target=False, dtype=np.float64)
    np.testing.assert_array_equal(changed.alphas[:, 0], result.alphas[:, 0])
    assert not np.array_equal(changed.alphas[:, 1:], result.alphas[:, 1:])


def test_informative_features_beat_noise_and_scores_are_consistent(data, result):
    X, Y = data
    assert (result.score[0] > 0.5).all() and (result.score[0] > result.score[1]).all()
    assert np.abs(result.score[2]).max() < 0.3
    observed = ~np.isnan(Y)
    for f in range(3):
        for j in range(Y.shape[1]):
            pred, y = result.predictions[f, observed[:, j], j], Y[observed[:, j], j]
            r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            assert result.metrics["r2"][f, j] == pytest.approx(r2, abs=1e-10)
    # alpha_per_target=False: one alpha per outer fold for the targets sharing a missing pattern
    for same in ([0, 2, 3, 5], [1, 4]):
        assert (result.alphas[..., same] == result.alphas[..., same[:1]]).all()


def test_group_aware_folds_keep_categories_on_one_side(binder):
    groups = binder["category"].to_numpy()
    plan = nested_plan(len(groups), outer=5, inner=4, groups=groups, seed=3)
    for k in range(plan.n_outer):
        train = plan.train[k][plan.train_mask[k]]
        test = plan.test[k][plan.test_mask[k]]
        assert not set(groups[train]) & set(groups[test])
        assert sorted(np.concatenate([train, test])) == list(range(len(groups)))
        for fold, mask in zip(plan.val[k], plan.val_mask[k]):
            val = train[fold[mask]]
            assert not set(groups[val]) & set(groups[np.setdiff1d(train, val)])


def test_leave_one_out_inner_matches_sklearn_gcv(data):
    X, Y = data
    y = Y[:, 0]
    plan = nested_plan(len(y), outer=3, inner="loo", seed=2)
    ours = cross_validate_ridge(X[:1], y[:, None], plan, ALPHAS, standardize=False, dtype=np.float64)
    for k in range(3):
        train = plan.train[k][plan.train_mask[k]]
        assert ours.alphas[0, k, 0] == SkRidgeCV(ALPHAS).fit(X[0][train], y[train]).alpha_


def test_chunking_does_not_change_results(data, plan, result):
    X, Y = data
    chunked = cross_validate_ridge(X, Y, plan, ALPHAS, alpha_per_target=False, dtype=np.float64,
                                   batch_size=1)
    np.testing.assert_array_equal(chunked.alphas, result.alphas)
    np.testing.assert_allclose(chunked.predictions, result.predictions, equal_nan=True, atol=1e-12)


SHARDED = """
import sys, numpy as np, jax
from jaxprobe.probes import cross_validate_ridge, nested_plan
assert len(jax.devices()) == 4
X, Y = np.load(sys.argv[1] + "/X.npy"), np.load(sys.argv[1] + "/Y.npy")
res = cross_validate_ridge(X, Y, nested_plan(len(Y), 4, 3, seed=1), np.logspace(-2, 5, 8),
                           n_permutations=3, n_bootstrap=5, batch_size=4)
np.save(sys.argv[1] + "/pred.npy", res.predictions)
np.save(sys.argv[1] + "/p.npy", res.p)
"""


def test_sharded_over_simulated_devices_equals_one_device(tmp_path):
    # Small on purpose: jaxlib's CPU LAPACK kernels fan large batches out to the intra-op thread
    # pool and block on them, which deadlocks once 4 simulated devices share a 2-core pool; below
    # its work threshold they run inline. Real accelerators do not go through that path.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(5, 40, 6))       # 5 feature sets over 4 devices: one padded chunk
    Y = X[0, :, :3] + rng.normal(size=(40, 3))
    Y[:6, 2] = np.nan
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Y.npy", Y)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path)], check=True, env=env, timeout=300)
    here = cross_validate_ridge(X, Y, nested_plan(len(Y), 4, 3, seed=1), ALPHAS,
                                n_permutations=3, n_bootstrap=5)
    np.testing.assert_allclose(np.load(tmp_path / "pred.npy"), here.predictions, atol=1e-4,
                               equal_nan=True)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), here.p)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6))
def test_permutation_pvalues_are_uniform_under_the_null(seed):
    rng = np.random.default_rng(seed)
    n, t, n_permutations = 40, 200, 19
    X, Y = rng.normal(size=(1, n, 6)), rng.normal(size=(n, t))
    res = cross_validate_ridge(X, Y, nested_plan(n, 4, 3, seed=seed), ALPHAS,
                               n_permutations=n_permutations, seed=seed, return_predictions=False)
    assert res.null.shape == (1, n_permutations, t)
    # With 19 shuffles P(p <= 0.05) is exactly 1/20 under the null; 99.9% binomial bounds.
    lo, hi = scipy.stats.binom.ppf([0.0005, 0.9995], t, 0.05)
    assert lo <= (res.p <= 0.05).sum() <= hi
    assert scipy.stats.kstest(res.p.ravel(), "uniform").pvalue > 1e-3


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(0).random((7, 9)) ** 3
    p[2, 3] = np.nan
    q = stats.fdr_bh(p)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], scipy.stats.false_discovery_control(p[ok]))
    assert np.isnan(q[2, 3])


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    y, pred = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    pred[:, 1] = y[:, 1] + rng.normal(size=30) * 0.5
    w = np.ones(30)
    np.testing.assert_allclose(metrics.pearson(y, pred, w),
                               [np.corrcoef(y[:, j], pred[:, j])[0, 1] for j in range(3)], rtol=1e-5)
    brute = []
    for j in range(3):
        pairs = [(a, b) for a in range(30) for b in range(a + 1, 30)]
        right = [((pred[a, j] - y[a, j]) ** 2 + (pred[b, j] - y[b, j]) ** 2
                  < (pred[a, j] - y[b, j]) ** 2 + (pred[b, j] - y[a, j]) ** 2) for a, b in pairs]
        brute.append(np.mean(right))
    np.testing.assert_allclose(metrics.pairwise_acc(y, pred, w), brute, rtol=1e-6)
    joint = np.mean([np.sum((pred[a] - y[a]) ** 2 + (pred[b] - y[b]) ** 2)
                     < np.sum((pred[a] - y[b]) ** 2 + (pred[b] - y[a]) ** 2)
                     for a in range(30) for b in range(a + 1, 30)])
    assert float(metrics.pairwise_acc(y, pred, w, joint=True)) == pytest.approx(joint)
    # weights are resampling counts: weight 2 is the row duplicated
    w2 = w.copy()
    w2[0] = 2
    dup = np.vstack([y, y[:1]]), np.vstack([pred, pred[:1]])
    np.testing.assert_allclose(metrics.r2(y, pred, w2), metrics.r2(*dup, np.ones(31)), rtol=1e-5)


def test_probe_sweep_table(binder, data):
    X, _ = data
    targets = binder.iloc[:, :4].copy()
    targets.iloc[:10, 2] = np.nan
    features = {"text_encoder.layers.11": X[0], "unet.mid_block": np.stack([X[1], X[2]], axis=1)}
    table, predictions = probe_sweep(
        features, targets, alphas=ALPHAS, outer_cv=4, inner_cv=3,
        groups=binder["category"].to_numpy(), target_groups={"Vision": "Vision", "Bright": "Vision"},
        n_permutations=4, n_bootstrap=10, pairwise_acc=True, return_predictions=True)
    assert list(table.columns) == ["feature_set", "site", "timestep", "target", "group", "alpha",
                                   "score", "r2", "pairwise_acc", "ci_low", "ci_high", "p", "q",
                                   "null_mean", "null_high"]
    assert (table.null_high >= table.null_mean).all()
    assert len(table) == 3 * 4 and predictions.shape == (3, len(targets), 4)
    assert list(table.feature_set.unique()) == ["text_encoder.layers.11", "unet.mid_block@0",
                                                "unet.mid_block@1"]
    assert list(table.timestep.unique()) == [-1, 0, 1]
    assert table.group.tolist()[:2] == ["Vision", "Vision"] and table.group[2:4].isna().all()
    assert table.p.between(0.2, 1).all() and (table.q >= table.p).all()
    assert (table.ci_low <= table.score).all() and (table.score <= table.ci_high).all()
    again = probe_sweep(features, targets, alphas=ALPHAS, outer_cv=4, inner_cv=3,
                        groups=binder["category"].to_numpy(), n_permutations=4, n_bootstrap=10,
                        pairwise_acc=True)
    pd.testing.assert_frame_equal(again.drop(columns="group"), table.drop(columns="group"))
    summary = aggregate(table)
    assert len(summary) == 3 * 2 and summary.n_targets.sum() == 12


def test_run_probe_files(binder, data, tmp_path):
    X, _ = data
    targets = binder.iloc[:, :3].copy()
    targets.iloc[0, 1] = np.nan
    targets.index.name = "concept"
    csv = targets.iloc[::-1].assign(category=binder["category"]).to_csv(na_rep="na")
    (tmp_path / "targets.csv").write_text(csv)
    np.savez(tmp_path / "features.npz", **{"unet.mid_block": X[0][:, None].repeat(2, 1)},
             concepts=np.asarray(targets.index, dtype=str))
    domains = tmp_path / "domains.csv"
    domains.write_text("attribute,domain\nVision,Vision\nBright,Vision\nDark,Vision\n")
    out = tmp_path / "out" / "probes"
    table = run_probe_files(tmp_path / "features.npz", tmp_path / "targets.csv", out,
                            group_column="category", target_groups=domains, alphas=ALPHAS,
                            outer_cv=4, inner_cv=3)
    on_disk = pd.read_parquet(out.with_suffix(".parquet"))
    pd.testing.assert_frame_equal(on_disk, table)
    assert len(pd.read_csv(out.with_suffix(".csv"))) == len(table) == 2 * 3
    assert set(table.group) == {"Vision"}
    direct = probe_sweep({"unet.mid_block": X[0][:, None].repeat(2, 1)}, targets, alphas=ALPHAS,
                         outer_cv=4, inner_cv=3, groups=binder["category"].to_numpy())
    np.testing.assert_allclose(table.score, direct.score)  # rows realigned to the features' concepts
    assert not list(out.parent.glob(".*tmp"))
    # a directory of .npy files with no concept list: rows taken in the targets' order only when asked
    # (the same shapes as above, so no new compilation)
    (tmp_path / "store").mkdir()
    np.save(tmp_path / "store" / "text_encoder.layers.3.npy", X[0])
    plain = targets.assign(category=binder["category"]).reset_index()
    (tmp_path / "plain.csv").write_text(plain.to_csv(index=False, na_rep="na"))
    table = run_probe_files(tmp_path / "store", tmp_path / "plain.csv", tmp_path / "layer3.parquet",
                            group_column="category", alphas=ALPHAS, outer_cv=4, inner_cv=3, assume_same_order=True)
    assert table.site.unique().tolist() == ["text_encoder.layers.3"]
    assert (tmp_path / "layer3.csv").exists() and (tmp_path / "layer3.parquet").exists()


def _rated(binder) -> pd.DataFrame:
    """test_run_probe_files's targets (same shapes and missing pattern: no new compilation), indexed by concept."""
    targets = binder.iloc[:, :3].copy()
    targets.iloc[0, 1] = np.nan
    targets.index.name = "concept"
    return targets.assign(category=binder["category"])


def test_shuffled_targets_give_identical_scores(binder, data, tmp_path, caplog):
    X, _ = data
    rated = _rated(binder)
    shuffled = rated.sample(frac=1, random_state=0)
    assert not shuffled.index.equals(rated.index)
    rated.to_csv(tmp_path / "sorted.csv", na_rep="na")
    shuffled.to_csv(tmp_path / "shuffled.csv", na_rep="na")
    site = {"unet.mid_block": X[0][:, None].repeat(2, 1)}
    np.savez(tmp_path / "features.npz", **site, concepts=np.asarray(rated.index, dtype=str))
    options = {"group_column": "category", "alphas": ALPHAS, "outer_cv": 4, "inner_cv": 3}
    said = []
    ordered = run_probe_files(tmp_path / "features.npz", tmp_path / "sorted.csv", tmp_path / "a", log=said.append,
                              **options)
    reordered = run_probe_files(tmp_path / "features.npz", tmp_path / "shuffled.csv", tmp_path / "b",
                                log=said.append, **options)
    pd.testing.assert_frame_equal(reordered, ordered, check_exact=True)
    assert said == ["matched 275 feature rows to targets rows by concept"] * 2
    # the API: a shuffled DataFrame indexed by concept, and the groups as a Series, paired by concept=
    with caplog.at_level("INFO", logger="jaxprobe.probes.sweep"):
        api = probe_sweep(site, shuffled.drop(columns="category"), concepts=list(rated.index),
                          groups=shuffled["category"], alphas=ALPHAS, outer_cv=4, inner_cv=3)
    np.testing.assert_array_equal(api.score, ordered.score)
    assert "matched 275 feature rows to targets rows by concept" in caplog.text
    # the prompts of an extract folder's manifest name the rows when they are the concepts themselves
    folder = tmp_path / "extracted"
    folder.mkdir()
    np.save(folder / "unet.mid_block.npy", site["unet.mid_block"])
    (folder / "manifest.json").write_text(json.dumps({"prompts": list(rated.index)}))
    by_prompt = run_probe_files(folder, tmp_path / "shuffled.csv", tmp_path / "c", log=said.append, **options)
    pd.testing.assert_frame_equal(by_prompt, ordered, check_exact=True)
    assert said[-1] == "matched 275 feature rows to targets rows by prompt"


def test_repeated_and_unmatched_concepts_are_named_errors(binder, data, tmp_path):
    X, _ = data
    rated = _rated(binder)
    concepts = list(rated.index)
    site = {"unet.mid_block": X[0]}
    np.savez(tmp_path / "features.npz", **site, concepts=np.asarray(concepts))
    options = {"group_column": "category", "alphas": ALPHAS, "outer_cv": 4, "inner_cv": 3}
    twice = pd.concat([rated, rated.iloc[[7]]])
    twice.to_csv(tmp_path / "twice.csv", na_rep="na")
    with pytest.raises(AlignmentError, match=f"'{concepts[7]}' appear more than once"):
        run_probe_files(tmp_path / "features.npz", tmp_path / "twice.csv", tmp_path / "x", **options)
    rated.to_csv(tmp_path / "rated.csv", na_rep="na")
    repeated = concepts[:-1] + [concepts[0]]
    np.savez(tmp_path / "repeated.npz", **site, concepts=np.asarray(repeated))
    with pytest.raises(AlignmentError, match=f"'{concepts[0]}' on more than one row"):
        run_probe_files(tmp_path / "repeated.npz", tmp_path / "rated.csv", tmp_path / "x", **options)
    unrated = ["zebra crossing", "unicorn"] + concepts[2:]
    np.savez(tmp_path / "unrated.npz", **site, concepts=np.asarray(unrated))
    with pytest.raises(AlignmentError, match="2 of 275 feature rows have no row in .*'zebra crossing', 'unicorn'"):
        run_probe_files(tmp_path / "unrated.npz", tmp_path / "rated.csv", tmp_path / "x", **options)
    # templated prompts do not name concepts: the error says to give them
    folder = tmp_path / "extracted"
    folder.mkdir()
    np.save(folder / "unet.mid_block.npy", X[0])
    (folder / "manifest.json").write_text(json.dumps({"prompts": [f"a photo of a {c}" for c in concepts]}))
    with pytest.raises(AlignmentError, match=r"275 of 275 .*'a photo of a .*--concepts FILE"):
        run_probe_files(folder, tmp_path / "rated.csv", tmp_path / "x", **options)
    # unnamed rows: refused unless paired by position on request, which needs equal counts
    (folder / "manifest.json").unlink()
    with pytest.raises(AlignmentError, match="--assume-same-order"):
        run_probe_files(folder, tmp_path / "rated.csv", tmp_path / "x", **options)
    rated.iloc[:-1].to_csv(tmp_path / "short.csv", na_rep="na")
    with pytest.raises(AlignmentError, match="275 feature rows and 274 rows"):
        run_probe_files(folder, tmp_path / "short.csv", tmp_path / "x", assume_same_order=True, **options)
    # the API: a DataFrame indexed with repeats, or targets without names, next to named features
    with pytest.raises(AlignmentError, match="more than once"):
        probe_sweep(site, twice.drop(columns="category").iloc[1:], concepts=concepts)
    with pytest.raises(AlignmentError, match="does not"):
        probe_sweep(site, rated.drop(columns="category").to_numpy(), concepts=concepts)
    assert not list(tmp_path.glob("x*"))


def test_align_by_concept_counts_and_leaves_out_unnamed_targets_rows():
    alignment = align_by_concept(["b", "c"], ["a", "b", "c", "d"], n_features=2, n_targets=4)
    assert alignment.rows.tolist() == [1, 2] and alignment.n_matched == 2 and alignment.n_unused == 2
    assert alignment.message() == "matched 2 feature rows to targets rows by concept; 2 targets rows without " \
                                  "features left out"
    with pytest.raises(AlignmentError, match="'Dog' would match if case were ignored"):
        align_by_concept(["Dog"], ["dog"], n_features=1, n_targets=1)
    with pytest.raises(AlignmentError, match="3 feature concepts for 2 feature rows"):
        align_by_concept(["a", "b", "c"], ["a", "b", "c"], n_features=2, n_targets=3)
    assert align_by_concept(None, None, n_features=3, n_targets=3, assume_same_order=True).by == "position"
