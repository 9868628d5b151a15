"""Optax probes: logistic (binary, multi-class) and L2 linear regression against their closed-form
or scikit-learn optima, early stopping, and the batched engine's folds and nulls."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from jaxprobe.probes import LogisticProbe, ProbeConfig, cross_validate, nested_plan
from jaxprobe.probes.linear import fit_probe

CONVERGE = ProbeConfig(l2=1e-2, learning_rate=0.05, max_steps=4000, patience=50, standardize=False)


@pytest.fixture(scope="module")
def standardized():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6))
    return (X - X.mean(0)) / X.std(0), rng


def test_binary_logistic_converges_to_sklearn(standardized):
    X, rng = standardized
    y = (X @ rng.normal(size=6) + rng.logistic(size=200) > 0).astype(int)
    probe = LogisticProbe(CONVERGE, val_fraction=0.0).fit(X, y)
    # mean log-loss + l2/2 |w|^2  ==  scikit-learn's C * sum log-loss + 1/2 |w|^2 with C = 1/(l2 n)
    ref = LogisticRegression(C=1 / (CONVERGE.l2 * len(X))).fit(X, y)
    np.testing.assert_allclose(probe.coef_, ref.coef_, atol=2e-3)
    np.testing.assert_allclose(probe.intercept_, ref.intercept_, atol=2e-3)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=1e-3)


def test_multiclass_logistic_converges_to_sklearn(standardized):
    X, rng = standardized
    y = np.digitize(X @ rng.normal(size=6), [-1.0, 1.0])
    names = np.array(["low", "mid", "high"])[y]
    probe = LogisticProbe(CONVERGE, val_fraction=0.0).fit(X, names)
    ref = LogisticRegression(C=1 / (CONVERGE.l2 * len(X))).fit(X, names)
    assert list(probe.classes_) == list(ref.classes_)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=2e-3)
    assert probe.score(X, names) == pytest.approx(ref.score(X, names), abs=0.01)


def test_squared_loss_with_l2_is_ridge(standardized):
    X, rng = standardized
    y = X @ rng.normal(size=6) + rng.normal(size=200)
    config = dataclasses.replace(CONVERGE, loss="squared", l2=0.1)
    ones = np.ones(200, np.float32)
    params, _ = jax.jit(fit_probe, static_argnames="config")(
        X.astype(np.float32), y.astype(np.float32), ones, 0 * ones, config=config)
    ref = Ridge(alpha=config.l2 * len(X) / 2).fit(X, y)  # mean squared loss: alpha = n l2 / 2
    np.testing.assert_allclose(np.asarray(params["w"])[:, 0], ref.coef_, atol=2e-3)


def test_early_stopping_keeps_the_best_validation_step(standardized):
    X, rng = standardized
    y = (X[:, 0] + rng.logistic(size=200) * 3 > 0).astype(int)
    config = ProbeConfig(l2=0.0, learning_rate=0.5, max_steps=2000, patience=3)
    probe = LogisticProbe(config, val_fraction=0.3).fit(np.hstack([X, rng.normal(size=(200, 40))]), y)
    assert 0 < probe.n_steps_ < config.max_steps


def test_vmapped_probes_through_the_fold_engine(standardized):
    X, rng = standardized
    labels = np.stack([(X[:, 0] > 0), (X[:, 1] + X[:, 2] > 0), rng.random(200) > 0.5], 1)
    labels = labels.astype(float)
    labels[:20, 1] = np.nan                                      # a missing pattern of its own
    features = np.stack([X, rng.normal(size=(200, 6))])          # informative, then noise
    res = cross_validate(features, labels, nested_plan(200, 4, 5, seed=0), ProbeConfig(l2=1e-3),
                         metric="accuracy", n_permutations=19, n_bootstrap=20)
    assert (res.score[0, :2] > 0.85).all()
    assert (np.abs(res.score[1] - 0.5) < 0.15).all() and abs(res.score[0, 2] - 0.5) < 0.15
    assert (res.p[0, :2] == 0.05).all()                          # beats all 19 shuffles
    assert np.isnan(res.predictions[:, :20, 1]).all()
    assert set(np.unique(res.predictions[~np.isnan(res.predictions)])) <= {0.0, 1.0}
    assert (res.ci_low <= res.score).all() and (res.score <= res.ci_high).all()
