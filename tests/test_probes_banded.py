"""Banded ridge and variance partitioning on the Binder concrete nouns: himalaya's banded ridge on the
same folds and grid, planted unique/shared structure, a duplicated space, and the permutation null."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from binder_sheet import concrete_rows
from scipy import stats as scipy_stats
from sklearn.model_selection import KFold
from threadpoolctl import threadpool_limits

import jaxprobe
from jaxprobe.errors import InputError
from jaxprobe.probes import cross_validate_banded, kernel_weights, nested_plan

ALPHAS = np.logspace(-2, 5, 8)


@pytest.fixture(scope="module")
def binder() -> pd.DataFrame:
    """Concrete nouns x the 65 attributes without a missing rating among them, indexed by word."""
    _, ratings = concrete_rows()
    return ratings.loc[:, ratings.notna().all()]


def standard(v: np.ndarray) -> np.ndarray:
    return (v - v.mean(0)) / v.std(0)


def encode(signals: np.ndarray, d: int, noise: float, rng) -> np.ndarray:
    """(n, d) features carrying `signals` (n, s) through a random projection, plus noise."""
    return signals @ rng.normal(size=(signals.shape[1], d)) + noise * rng.normal(size=(len(signals), d))


def himalaya_banded(spaces, Y, splits, gammas):
    from himalaya.ridge import BandedRidgeCV as HimalayaBanded

    model = HimalayaBanded(groups="input", fit_intercept=True, cv=splits,
                           solver_params={"n_iter": gammas, "alphas": ALPHAS, "progress_bar": False})
    # One BLAS thread: on this small shared host multi-threaded OpenBLAS made the fit 30x slower.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # himalaya: n < d would be faster as multiple-kernel ridge
        return model.fit(spaces, Y)


@pytest.fixture(scope="module")
def spaces(binder):
    """A carries the first 5 attributes, B the next 5, C the next 3; W carries B's attributes over more
    columns than there are training rows (with A: the dual form, the others are primal)."""
    rng = np.random.default_rng(0)
    Y = standard(binder.to_numpy())
    return [encode(Y[:, :5], 30, 2.0, rng), encode(Y[:, 5:10], 300, 3.0, rng), encode(Y[:, 10:13], 12, 1.0, rng),
            encode(Y[:, 5:10], 600, 3.0, rng)]


@pytest.mark.parametrize("which", [(0, 1), (0, 1, 2), (0, 3)], ids=["primal", "primal-3-spaces", "dual"])
def test_banded_ridge_matches_himalaya_on_the_same_splits_and_grid(binder, spaces, which):
    Y = binder.to_numpy()[:, :13]
    splits = list(KFold(5, shuffle=True, random_state=3).split(Y))
    gammas = kernel_weights(len(which), np.logspace(-2, 2, 5))
    chosen = [spaces[i] for i in which]
    ours = jaxprobe.BandedRidgeCV(ALPHAS, gammas=gammas, cv=splits, scoring="neg_mean_squared_error",
                                  dtype=np.float64).fit(chosen, Y)
    ref = himalaya_banded(chosen, Y, splits, gammas)
    np.testing.assert_allclose(ours.deltas_, np.asarray(ref.deltas_), rtol=1e-10)
    np.testing.assert_allclose(ours.predict(chosen), np.asarray(ref.predict(chosen)), atol=1e-4)
    assert len(np.unique(ours.deltas_[1] - ours.deltas_[0])) > 1  # targets really pick different ratios


@pytest.mark.parametrize("b", [1, 3], ids=["primal", "dual"])
def test_engine_outer_folds_match_himalaya_and_float32_stays_close(binder, spaces, b):
    """The batched engine (the path of variance_partition) against himalaya fitted per outer fold."""
    Y = binder.to_numpy()[:, :13]
    A, B = spaces[0], spaces[b]
    plan = nested_plan(len(Y), 3, 4, seed=1)
    gammas = kernel_weights(2, np.logspace(-2, 2, 5))
    expected = np.zeros_like(Y)
    for k in range(plan.n_outer):
        train, test = plan.train[k][plan.train_mask[k]], plan.test[k][plan.test_mask[k]]
        inner = [(np.setdiff1d(np.arange(len(train)), v[m]), v[m]) for v, m in zip(plan.val[k], plan.val_mask[k])]
        ref = himalaya_banded([A[train], B[train]], Y[train], inner, gammas)
        expected[test] = np.asarray(ref.predict([A[test], B[test]]))
    for dtype, atol in ((np.float64, 1e-4), (np.float32, 2e-2)):
        res = cross_validate_banded([np.hstack([A, B])], Y, plan, (30, B.shape[1]), ALPHAS, gammas, standardize=False,
                                    scoring="neg_mse", dtype=dtype)
        np.testing.assert_allclose(res.predictions[0], expected, atol=atol)
    assert res.alphas.shape == (1, plan.n_outer, 13, 2)  # per-space penalties alpha / gamma_j


def test_estimator_takes_column_slices_and_splits_coef_by_space(binder, spaces):
    Y = binder.to_numpy()[:, :4]
    A, B = spaces[0], spaces[2]
    X = np.hstack([B, A])
    listed = jaxprobe.BandedRidgeCV(ALPHAS, cv=5).fit([A, B], Y)
    sliced = jaxprobe.BandedRidgeCV(ALPHAS, cv=5, feature_spaces=[slice(12, 42), np.arange(12)]).fit(X, Y)
    np.testing.assert_allclose(sliced.predict(X), listed.predict([A, B]), atol=1e-4)
    np.testing.assert_allclose(sliced.coefs_[0], listed.coefs_[0], atol=1e-5)
    np.testing.assert_allclose(sliced.coef_[:, :12], listed.coefs_[1], atol=1e-5)
    assert listed.deltas_.shape == (2, 4) and listed.cv_scores_.shape == (9, len(ALPHAS), 4)
    np.testing.assert_allclose(np.exp(listed.deltas_).sum(0), 1 / listed.alpha_, rtol=1e-6)
    one = jaxprobe.BandedRidgeCV(ALPHAS, cv=5).fit([A, B], Y[:, 0])
    assert one.deltas_.shape == (2,) and one.coef_.shape == (42,) and np.ndim(one.alpha_) == 0
    with pytest.raises(InputError, match="feature spaces"):
        jaxprobe.BandedRidgeCV().fit(X, Y)
    with pytest.raises(InputError, match="disjoint"):
        jaxprobe.BandedRidgeCV(feature_spaces=[slice(0, 20), slice(10, 42)]).fit(X, Y)


def test_variance_partition_recovers_a_planted_split(binder):
    """A carries attribute 0, B attribute 1, both attribute 2 (decorrelated real ratings); the targets
    are those attributes plus rating noise, so the partition of each is known."""
    rng = np.random.default_rng(1)
    z = np.linalg.qr(standard(binder.to_numpy()[:, [0, 20, 40]]))[0] * np.sqrt(len(binder))
    A = encode(z[:, [0, 2]], 40, 0.5, rng)
    B = {"unet.mid_block": np.stack([encode(z[:, [1, 2]], 60, 0.5, rng) for _ in range(2)], 1)}  # 2 steps
    targets = pd.DataFrame(z + 0.5 * rng.normal(size=z.shape), index=binder.index,
                           columns=["only_a", "only_b", "both"])
    shuffled = targets.sample(frac=1.0, random_state=0)  # matched back by concept
    table = jaxprobe.variance_partition(A, B, shuffled, concepts=list(binder.index), n_bootstrap=200,
                                        outer_cv=3, inner_cv=3, alphas=ALPHAS, n_permutations=19,
                                        null="freedman_lane",
                                        target_groups={"only_a": "a", "only_b": "b", "both": "ab"})
    assert list(table["step"].unique()) == [0, 1] and table["pair"].iloc[0] == "a + unet.mid_block@0"
    explained = 1 / 1.25  # signal variance 1, noise variance 0.25
    row = table.groupby("target")[["unique_a", "unique_b", "shared"]].mean()
    np.testing.assert_allclose(row.loc["only_a"], [explained, 0, 0], atol=0.08)
    np.testing.assert_allclose(row.loc["only_b"], [0, explained, 0], atol=0.08)
    np.testing.assert_allclose(row.loc["both"], [0, 0, explained], atol=0.08)
    np.testing.assert_allclose(table["unique_a"], table["r2_joint"] - table["r2_b"])
    assert ((table["unique_b_low"] <= table["unique_b"]) & (table["unique_b"] <= table["unique_b_high"])).all()
    big = table["target"] == "only_b"
    assert (table.loc[big, "unique_b_low"] > 0.5).all() and (table.loc[~big, "unique_b_low"] < 0.05).all()
    assert (table.loc[big, "p"] == 0.05).all() and (table.loc[big, "null_high"] < 0.05).all()


def test_a_duplicated_space_adds_no_unique_variance(binder, spaces):
    """B = A's columns twice: the joint model is ridge on A with a finer grid of penalties, so unique(B)
    is 0 up to what that finer grid buys in selection (the attributes A encodes; the others score ~0)."""
    A = spaces[0]
    table = jaxprobe.variance_partition(A, np.hstack([A, A]), binder.iloc[:, :5].to_numpy(), outer_cv=3,
                                        inner_cv=3, alphas=ALPHAS)
    assert table["r2_a"].min() > 0.3
    assert table["unique_b"].abs().max() < 0.01
    np.testing.assert_allclose(table["shared"], table["r2_a"], atol=0.02)  # r2_b: A with the alphas halved


@pytest.mark.slow  # permute_b: 1,200 joint fits (60 null spaces x 20 designs), about 30 s on the shared host
@pytest.mark.parametrize("null", ["permute_b", "freedman_lane"])
def test_permutation_pvalues_of_a_null_space_are_uniform(binder, spaces, null):
    """60 independent noise spaces B against one real attribute: at 5% the false positives are at most
    a binomial(60, 0.05) count (P(>= 10) < 0.001). B-row permutations give uniform p-values; the
    Freedman-Lane null is approximate with ridge and CV, and conservative here (its p-values pile up
    in the middle), so for it only the false-positive bound is checked."""
    rng = np.random.default_rng(2)
    nulls = {f"null{i}": rng.normal(size=(len(binder), 4)) for i in range(60)}
    table = jaxprobe.variance_partition(spaces[0], nulls, binder.iloc[:, [2]].to_numpy(), outer_cv=3,
                                        inner_cv=3, n_permutations=19, null=null, alphas=ALPHAS[::2],
                                        ratios=[0.1, 10.0])
    p = table["p"].to_numpy()
    assert len(p) == 60 and set(np.round(p * 20).astype(int)) <= set(range(1, 21))
    assert (p <= 0.05).sum() <= 9
    if null == "permute_b":
        assert scipy_stats.kstest(p, "uniform").pvalue > 0.001
    assert (table["q"] >= table["p"]).all()


def test_bad_inputs_name_the_fix(binder, spaces):
    Y = binder.to_numpy()[:, :3]
    with pytest.raises(InputError, match="row"):
        jaxprobe.variance_partition(spaces[0], spaces[1][:100], Y)
    with pytest.raises(InputError, match="sizes"):
        cross_validate_banded([np.hstack(spaces[:2])], Y, nested_plan(len(Y), 3, 3), (30, 30))
    with pytest.raises(InputError, match="gammas"):
        jaxprobe.BandedRidgeCV(gammas=[[1.0, -1.0]]).fit(spaces[:2], Y)


@pytest.mark.slow  # a probe sweep, then the partition: six programs to compile
def test_experiment_section_partitions_every_step_against_the_best_text_site(binder, tmp_path):
    from jaxprobe.studies.norms_probing import variance

    rng = np.random.default_rng(3)
    Y = standard(binder.to_numpy()[:, :4])
    features = {"text_encoder.text_model.encoder.layers.0": rng.normal(size=(len(Y), 8)),
                "text_encoder.text_model.final_layer_norm": encode(Y[:, :2], 16, 0.5, rng),
                "unet.mid_block": np.stack([encode(Y[:, 1:], 16, 0.5, rng) for _ in range(2)], 1)}
    targets = pd.DataFrame(Y, columns=["a0", "a1", "a2", "a3"])
    probes = jaxprobe.probe_sweep(features, targets, outer_cv=3, inner_cv=3, alphas=ALPHAS)
    groups = {"a0": "text", "a1": "both", "a2": "unet", "a3": "unet"}
    table = variance.partition_denoiser(features, targets, probes, outer_cv=3, inner_cv=3, alphas=ALPHAS,
                                        n_permutations=9, n_bootstrap=50, target_groups=groups)
    assert set(table["reference"]) == {"text_encoder.text_model.final_layer_norm"}
    assert len(table) == 2 * 4 and set(table["step"]) == {0, 1}
    strong = table.groupby("target")["unique_b"].mean()
    assert strong["a2"] > 0.5 and abs(strong["a0"]) < 0.05
    variance.write_table(table, tmp_path)
    section = "".join(variance.section_html(tmp_path))
    assert variance.TITLE in section and "depends on the reference" in section
    assert (tmp_path / "figures" / "variance.png").exists()
    variance.write_table(None, tmp_path)
    assert variance.section_html(tmp_path) == []
    with pytest.raises(InputError, match="not text feature sets"):
        variance.choose_reference(probes, ["unet.mid_block@0"])
