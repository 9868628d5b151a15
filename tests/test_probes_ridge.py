"""jaxprobe.probes.RidgeCV against scikit-learn and himalaya on the Binder concrete nouns, and the
limits ridge must reach (alpha -> 0: least squares; alpha -> infinity: the training mean)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import RidgeCV as SkRidgeCV
from sklearn.model_selection import KFold

import jaxprobe
from jaxprobe.probes import RidgeCV

from binder_sheet import concrete_rows

ALPHAS = np.logspace(-3, 5, 17)
KFOLD_ALPHAS = ALPHAS[::2]  # scikit-learn refits once per alpha and fold: keep its share small


@pytest.fixture(scope="module")
def binder() -> pd.DataFrame:
    """Concrete nouns x 65 attribute ratings (columns F..BR of the sheet)."""
    _, ratings = concrete_rows()
    assert ratings.shape == (275, 65) and ratings.columns[-1] == "Arousal"
    return ratings


@pytest.fixture(scope="module")
def features(binder) -> dict[str, np.ndarray]:
    """Random features (primal: d < n) and structured ones (dual: d > n) built from the ratings
    through a random projection plus noise, with a constant and a duplicated column."""
    rng = np.random.default_rng(0)
    n = len(binder)
    ratings = binder.to_numpy()
    structured = ratings @ rng.normal(size=(65, 400)) / 8 + rng.normal(size=(n, 400)) * 2
    structured[:, 7] = 3.0
    structured[:, 9] = structured[:, 8]
    return {"random": rng.normal(size=(n, 30)), "structured": structured}


def assert_matches(ours: RidgeCV, ref, X: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(ours.alpha_), np.asarray(ref.alpha_))
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_leave_one_out_alpha_per_target_matches_sklearn(binder, features, kind):
    X, Y = features[kind], binder.to_numpy()[:, :20]
    ours = RidgeCV(ALPHAS, cv=None, alpha_per_target=True, dtype=np.float64).fit(X, Y)
    ref = SkRidgeCV(ALPHAS, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    assert_matches(ours, ref, X)
    assert len(np.unique(ours.alpha_)) > 1  # the targets really do pick different alphas
    # cv_scores_: minus the mean squared leave-one-out error of every alpha and target
    np.testing.assert_allclose(-ours.cv_scores_, ref.cv_results_.mean(0).T, rtol=1e-6)


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_kfold_shared_alpha_matches_sklearn(binder, features, kind):
    X, Y = features[kind], binder.to_numpy()[:, :20]
    ours = RidgeCV(KFOLD_ALPHAS, cv=5, alpha_per_target=False, dtype=np.float64).fit(X, Y)
    ref = SkRidgeCV(KFOLD_ALPHAS, cv=5).fit(X, Y)
    assert_matches(ours, ref, X)
    assert ours.best_score_ == pytest.approx(ref.best_score_, abs=1e-8)
    assert ours.score(X, Y) == pytest.approx(ref.score(X, Y), abs=1e-8)


def test_matches_himalaya_selection_on_the_same_splits(binder, features):
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV

    X, Y = features["structured"], binder.to_numpy()[:, :20]
    splits = list(KFold(5, shuffle=True, random_state=3).split(X))
    ours = RidgeCV(ALPHAS, cv=splits, scoring="neg_mean_squared_error", dtype=np.float64).fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # himalaya: n < d would be faster as kernel ridge
        ref = HimalayaRidgeCV(ALPHAS, cv=splits, fit_intercept=True).fit(X, Y)
    np.testing.assert_allclose(ours.alpha_, ref.best_alphas_, rtol=1e-12)  # exp(-log(alpha))
    np.testing.assert_allclose(ours.coef_, ref.coef_.T, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.best_score_, ref.cv_scores_, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_target_columns_are_scored_like_a_few(binder, features, dtype):
    """Past 4 x n_val columns (permuted targets) the deletion systems are solved through their inverse."""
    X, Y = features["structured"], binder.to_numpy()[:, :20]
    splits = list(KFold(5, shuffle=True, random_state=3).split(X))        # n_val 55: the inverse past 220
    few = RidgeCV(ALPHAS, cv=splits, dtype=dtype).fit(X, Y)
    many = RidgeCV(ALPHAS, cv=splits, dtype=dtype).fit(X, np.tile(Y, 12))
    np.testing.assert_array_equal(many.alpha_[:20], few.alpha_)
    np.testing.assert_allclose(many.cv_scores_[:, :20], few.cv_scores_, rtol=1e-10 if dtype == np.float64 else 1e-4,
                               atol=1e-12 if dtype == np.float64 else 1e-5)


def test_float32_default_agrees_with_float64(binder, features):
    X, Y = features["structured"], binder.to_numpy()[:, :20]
    single = RidgeCV(ALPHAS).fit(X, Y)
    double = RidgeCV(ALPHAS, dtype=np.float64).fit(X, Y)
    assert np.mean(single.alpha_ == double.alpha_) >= 0.9
    same = single.alpha_ == double.alpha_
    scale = np.abs(double.predict(X)).max()
    np.testing.assert_allclose(single.predict(X)[:, same], double.predict(X)[:, same], atol=1e-3 * scale)


def test_constant_and_duplicate_columns_stay_finite_in_float32(binder):
    rng = np.random.default_rng(1)
    X = np.repeat(rng.normal(size=(275, 5)), 3, axis=1)      # rank 5 of 15
    X[:, 0] = 7.0
    model = RidgeCV(ALPHAS).fit(X, binder.to_numpy()[:, :3])
    assert np.isfinite(model.coef_).all() and np.isfinite(model.cv_scores_).all()
    assert model.coef_[:, 0] == pytest.approx(0.0, abs=1e-6)  # the constant column carries nothing


def test_one_dimensional_targets_give_sklearn_shapes(binder, features):
    X, y = features["random"], binder.to_numpy()[:, 0]
    model = RidgeCV(ALPHAS, dtype=np.float64).fit(X, y)
    ref = SkRidgeCV(ALPHAS).fit(X, y)
    assert model.coef_.shape == (30,) and np.ndim(model.intercept_) == 0
    assert model.cv_scores_.shape == (len(ALPHAS),) and isinstance(model.alpha_, float)
    assert_matches(model, ref, X)


def test_rejects_splits_that_do_not_partition_the_rows(features, binder):
    from sklearn.model_selection import ShuffleSplit

    with pytest.raises(jaxprobe.errors.InputError, match="partition"):
        RidgeCV(ALPHAS, cv=ShuffleSplit(3, random_state=0)).fit(features["random"], binder.to_numpy())


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_tiny_alpha_gives_least_squares(seed):
    rng = np.random.default_rng(seed)
    n, d = 30, 8
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    Y = rng.normal(size=(n, 2))
    model = RidgeCV([1e-9], dtype=np.float64).fit(X, Y)
    design = np.column_stack([np.ones(n), X])
    solution = np.linalg.lstsq(design, Y, rcond=None)[0]
    np.testing.assert_allclose(model.intercept_, solution[0], atol=1e-6)
    np.testing.assert_allclose(model.coef_, solution[1:].T, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       problem=st.sampled_from([((40, 5), 5), ((25, 60), None)]))  # primal K-fold, dual LOO
def test_huge_alpha_predicts_the_training_mean(seed, problem):
    shape, cv = problem
    rng = np.random.default_rng(seed)
    X = rng.normal(size=shape) * 3
    Y = rng.normal(size=(shape[0], 3)) + rng.normal(size=3) * 10
    model = RidgeCV([1e14], cv=cv, dtype=np.float64).fit(X, Y)
    np.testing.assert_allclose(model.predict(rng.normal(size=(7, shape[1]))),
                               np.broadcast_to(Y.mean(0), (7, 3)), atol=1e-8)
