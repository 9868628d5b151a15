"""scikit-learn estimators over the batched probe solvers.

`RidgeCV` follows scikit-learn's `RidgeCV` conventions (fit/predict/score, `alpha_`, `coef_` of
shape (n_targets, n_features), `intercept_`, `best_score_`) and adds `cv_scores_`. It is the
single-feature-set face of `ridge.py`: the same decomposition, deletion-based selection and
coefficients the sweep uses. `BandedRidgeCV` is the same for `banded.py` (one penalty per feature
space). `LogisticProbe` is the same for the optax classifiers of `linear.py`.

Both are real scikit-learn estimators (BaseEstimator + RegressorMixin / ClassifierMixin): they
clone, sit in a Pipeline, and tune under GridSearchCV. Inputs go through scikit-learn's own
`validate_data`, so they take what any estimator takes (DataFrames, lists, read-only memmaps) and
reject what any estimator rejects, but as `InputError` (a ValueError) like the rest of jaxprobe.
This module loads scikit-learn; `jaxprobe.probes` imports it only on first use of these names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from jaxprobe.errors import InputError
from jaxprobe.probes import banded, folds, linear
from jaxprobe.probes.crossval import DEFAULT_ALPHAS, host_lapack_single_threaded
from jaxprobe.probes.ridge import Scoring, coefficients, decompose, inner_cv_scores, select_alphas, training_targets


class RidgeCV(RegressorMixin, BaseEstimator):
    """Ridge regression with the alpha chosen by cross-validation, closed form, in JAX.

    alphas: candidate penalties. cv: None -> exact leave-one-out (scikit-learn's default, scored by
    mean squared error); int -> contiguous K-fold; or a scikit-learn splitter / iterable of
    (train, validation) pairs whose validation sets partition the rows (scored by mean R² over
    folds, scikit-learn's GridSearchCV default). scoring: "r2" or "neg_mean_squared_error" to
    override (himalaya selects with the latter). alpha_per_target: one alpha per target (also with
    K-fold, unlike scikit-learn) or one shared alpha maximising the mean score over targets.
    dtype: float32 by default; np.float64 computes in double precision.

    Fitted attributes: alpha_ (n_targets,) or float; coef_ (n_targets, n_features), or
    (n_features,) for 1-D y; intercept_; best_score_ (the selection score at alpha_, per target or
    averaged when shared); cv_scores_ (n_alphas, n_targets), or (n_alphas,) for 1-D y: the
    selection score of every candidate alpha — mean over folds of R², or minus the mean squared
    leave-one-out error.

    A scikit-learn regressor: get_params/set_params, clone, Pipeline and GridSearchCV work, and
    `score` is scikit-learn's R² (uniform average over targets).
    """

    def __init__(
        self, alphas: Sequence[float] | np.ndarray = (0.1, 1.0, 10.0), *, cv=None,
        alpha_per_target: bool = True, fit_intercept: bool = True, scoring: str | None = None,
        dtype: np.dtype | type = np.float32,
    ):
        self.alphas = alphas
        self.cv = cv
        self.alpha_per_target = alpha_per_target
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True     # y (n, t): one ridge per column, fitted at once
        return tags

    def fit(self, X, y) -> RidgeCV:
        # Cross-validation needs two rows at the least (one to fit, one to score).
        X, y = _validate(self, X, y, multi_output=True, y_numeric=True, ensure_min_samples=2)
        X, y = np.asarray(X, float), np.asarray(y, float)   # 2-D, finite, same n: validated
        ravel = y.ndim == 1
        Y = y[:, None] if ravel else y
        alphas = np.asarray(self.alphas, float).reshape(-1)
        if (alphas <= 0).any():
            raise InputError("alphas must be positive")
        vals = folds.inner_folds_from_cv(self.cv, X, y)
        plan = folds.pack_plan(len(X), [np.array([], int)], [vals])
        scoring = _scoring(self.scoring, plan.leave_one_out)
        with jax.enable_x64(np.dtype(self.dtype) == np.float64), host_lapack_single_threaded():
            fitted = _fit(jnp.asarray(X, self.dtype), jnp.asarray(Y, self.dtype), plan,
                          jnp.asarray(alphas, self.dtype), alpha_per_target=self.alpha_per_target,
                          fit_intercept=self.fit_intercept, scoring=scoring)
            coef, intercept, scores, best = jax.device_get(fitted)
        chosen = alphas[best]
        self.n_features_in_ = X.shape[1]
        self.coef_ = coef.T[0] if ravel else coef.T
        self.intercept_ = intercept[0] if ravel else intercept
        self.cv_scores_ = scores[:, 0] if ravel else scores
        best_scores = scores[best, np.arange(scores.shape[1])]
        if self.alpha_per_target and not ravel:
            self.alpha_, self.best_score_ = chosen, best_scores
        else:
            self.alpha_, self.best_score_ = float(chosen[0]), float(best_scores.mean())
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = np.asarray(_validate(self, X, reset=False), float)
        return X @ self.coef_.T + self.intercept_


@functools.partial(jax.jit, static_argnames=("alpha_per_target", "fit_intercept", "scoring"))
def _fit(x, y, plan: folds.FoldPlan, alphas, *, alpha_per_target: bool, fit_intercept: bool,
         scoring: Scoring):
    train, mask = plan.train[0], plan.train_mask[0]
    dec = decompose(x, train, mask, fit_intercept=fit_intercept)
    tt = training_targets(dec.proj[train], y, train, mask, fit_intercept=fit_intercept)
    scores = inner_cv_scores(dec, tt, plan.val[0], plan.val_mask[0], alphas,
                             fit_intercept=fit_intercept, scoring=scoring)       # (A, t)
    t = y.shape[1]
    best = select_alphas(scores, jnp.arange(t) if alpha_per_target else jnp.zeros(t, int))
    coef, intercept = coefficients(dec, tt, alphas[best])
    return coef, intercept, scores, best


class BandedRidgeCV(RegressorMixin, BaseEstimator):
    """Banded ridge: one penalty per feature space, chosen per target by cross-validation, in JAX.

    feature_spaces: None, and X is then a list of (n, d_j) arrays, one per space; or a list of
    column selections of a 2-D X (slices, index arrays or boolean masks; disjoint; columns in no
    space are left out of the model). gammas: (G, k) candidate kernel weights on the simplex; None:
    `banded.kernel_weights(k, ratios)`, every space's weight relative to the first taken from
    `ratios`. alphas: the overall penalties; space j is penalised by alpha / gamma_j. cv, scoring,
    alpha_per_target, fit_intercept, dtype: as in `RidgeCV` (the same deletion-based selection, one
    decomposition per gamma). No scaling is applied: standardize the spaces first if their units
    differ (a StandardScaler in a Pipeline, or the sweep's standardize=True).

    Fitted attributes: deltas_ (k, n_targets), log(gamma_j / alpha) (himalaya's `deltas_`);
    alpha_ (n_targets,); kernel_weights_ (k, n_targets); coef_ (n_targets, n_features_in_) in X's
    columns (zero outside every space) and coefs_, the same split by space [(n_targets, d_j)];
    intercept_ (n_targets,); cv_scores_ (G, n_alphas, n_targets), the selection score of every
    candidate; best_score_ (n_targets,). 1-D y gives (k,), scalars and (d,) as RidgeCV does.
    """

    def __init__(
        self, alphas: Sequence[float] | np.ndarray = tuple(DEFAULT_ALPHAS), *, feature_spaces=None,
        gammas=None, ratios: Sequence[float] | np.ndarray = tuple(banded.DEFAULT_RATIOS), cv=None,
        alpha_per_target: bool = True, fit_intercept: bool = True, scoring: str | None = None,
        dtype: np.dtype | type = np.float32,
    ):
        self.alphas = alphas
        self.feature_spaces = feature_spaces
        self.gammas = gammas
        self.ratios = ratios
        self.cv = cv
        self.alpha_per_target = alpha_per_target
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y) -> BandedRidgeCV:
        X, columns = self._spaces(X, reset=True)
        X, y = _validate(self, X, y, multi_output=True, y_numeric=True, ensure_min_samples=2)
        X, y = np.asarray(X, float), np.asarray(y, float)
        ravel = y.ndim == 1
        Y = y[:, None] if ravel else y
        sizes = [len(c) for c in columns]
        gammas = (banded.kernel_weights(len(sizes), self.ratios) if self.gammas is None
                  else banded.check_kernel_weights(self.gammas, len(sizes)))
        alphas = np.asarray(self.alphas, float).reshape(-1)
        if not len(alphas) or (alphas <= 0).any():
            raise InputError("alphas must be positive")
        joint = X[:, np.concatenate(columns)]
        vals = folds.inner_folds_from_cv(self.cv, joint, y)
        plan = folds.pack_plan(len(joint), [np.array([], int)], [vals])
        scoring = _scoring(self.scoring, plan.leave_one_out)
        with jax.enable_x64(np.dtype(self.dtype) == np.float64), host_lapack_single_threaded():
            fitted = _fit_banded(jnp.asarray(joint, self.dtype), jnp.asarray(Y, self.dtype), plan,
                                 jnp.asarray(alphas, self.dtype), jnp.asarray(gammas, self.dtype),
                                 sizes=tuple(sizes), alpha_per_target=self.alpha_per_target,
                                 fit_intercept=self.fit_intercept, scoring=scoring)
            choice, coef, intercept, scores = jax.device_get(fitted)
        g, a = np.divmod(choice, len(alphas))
        t = Y.shape[1]
        full = np.zeros((self.n_features_in_, t))
        full[np.concatenate(columns)] = coef
        last = (lambda v: v[..., 0]) if ravel else (lambda v: v)   # 1-D y: no target axis
        self.alpha_ = last(alphas[a])
        self.kernel_weights_ = last(gammas[g].T)
        self.deltas_ = last(np.log(gammas[g].T / alphas[a]))
        self.coef_ = full[:, 0] if ravel else full.T
        self.coefs_ = [c[:, 0] if ravel else c.T for c in np.split(coef, np.cumsum(sizes)[:-1])]
        self.intercept_ = last(intercept)
        self.cv_scores_ = last(scores)
        self.best_score_ = last(scores[g, a, np.arange(t)])
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X, _ = self._spaces(X, reset=False)
        X = np.asarray(_validate(self, X, reset=False), float)
        return X @ self.coef_.T + self.intercept_

    def _spaces(self, X, *, reset: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """(X as one 2-D array, the column indices of each space); a list X is stacked side by side."""
        if self.feature_spaces is None:
            if not isinstance(X, (list, tuple)) or not X:
                raise InputError("BandedRidgeCV needs its feature spaces: pass X as a list of (n, d_j) arrays, "
                                 "or feature_spaces=[columns of space 1, columns of space 2, ...]")
            widths = [np.shape(x)[1] if np.ndim(x) == 2 else -1 for x in X]
            if min(widths) < 1 or len({len(x) for x in X}) != 1:
                raise InputError(f"each feature space must be a 2-D (n, d_j) array with the same n, got shapes "
                                 f"{[np.shape(x) for x in X]}")
            return np.hstack([np.asarray(x) for x in X]), np.split(np.arange(sum(widths)), np.cumsum(widths)[:-1])
        width = np.shape(X)[1] if np.ndim(X) == 2 else None
        if width is None:
            raise InputError(f"with feature_spaces, X must be one 2-D array, got shape {np.shape(X)}")
        columns = [np.arange(width)[np.asarray(s) if not isinstance(s, slice) else s] for s in self.feature_spaces]
        every = np.concatenate(columns) if columns else np.array([], int)
        if not columns or min(len(c) for c in columns) == 0 or len(np.unique(every)) != len(every):
            raise InputError("feature_spaces must be non-empty, disjoint column selections of X (slices, index "
                             "arrays or boolean masks), one per space")
        return X, columns


@functools.partial(jax.jit, static_argnames=("sizes", "alpha_per_target", "fit_intercept", "scoring"))
def _fit_banded(x, y, plan: folds.FoldPlan, alphas, gammas, *, sizes: tuple[int, ...],
                alpha_per_target: bool, fit_intercept: bool, scoring: Scoring):
    t = y.shape[1]
    choice, (coef, intercept), scores = banded.search(
        x, y, plan.train[0], plan.train_mask[0], plan.test[0][:0], plan.val[0], plan.val_mask[0],
        jnp.arange(t) if alpha_per_target else jnp.zeros(t, int), alphas, gammas, sizes, coefficients,
        fit_intercept=fit_intercept, standardize=False, scoring=scoring)
    return choice, coef, intercept, scores


class LogisticProbe(ClassifierMixin, BaseEstimator):
    """Logistic-regression probe (binary or multi-class) trained with optax, with L2 and early
    stopping on a random validation split of `val_fraction` of the rows (0: train to convergence
    on all rows); see `linear.ProbeConfig` for the training options.

    Fitted attributes: classes_, coef_ (n_classes or 1, n_features), intercept_, n_steps_ (steps
    until the best validation loss).

    A scikit-learn classifier: get_params/set_params, clone, Pipeline and GridSearchCV work
    (config=None stands for `ProbeConfig(loss="logistic")`, resolved in fit); `score` is accuracy;
    `decision_function` is (n,) for two classes, like LogisticRegression's.
    """

    def __init__(self, config: linear.ProbeConfig | None = None, *, val_fraction: float = 0.2,
                 seed: int = 0):
        self.config = config
        self.val_fraction = val_fraction
        self.seed = seed

    def fit(self, X, y) -> LogisticProbe:
        X, y = _validate(self, X, y)
        check_classification_targets(y)
        X = np.asarray(X, np.float32)
        self.classes_, labels = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise InputError("y holds one class; a classifier needs at least two")
        rng = np.random.default_rng(self.seed)
        val = (rng.permutation(len(X)) < round(self.val_fraction * len(X))).astype(np.float32)
        config = dataclasses.replace(self.config or linear.ProbeConfig(loss="logistic"),
                                     loss="logistic", n_classes=len(self.classes_))
        params, steps = _fit_probe(X, labels.astype(np.float32), 1 - val, val, config=config)
        self.coef_, self.intercept_ = np.asarray(params["w"]).T, np.asarray(params["b"])
        self.n_steps_ = int(steps)
        return self

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = np.asarray(_validate(self, X, reset=False), np.float32)
        return X @ self.coef_.T + self.intercept_                    # (n, n_classes or 1)

    def decision_function(self, X) -> np.ndarray:
        logits = self._logits(X)
        return logits[:, 0] if logits.shape[1] == 1 else logits

    def predict_proba(self, X) -> np.ndarray:
        return np.asarray(linear.class_probabilities(jnp.asarray(self._logits(X))))

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)                  # first: it raises NotFittedError before fit
        return self.classes_[proba.argmax(-1)]


_fit_probe = jax.jit(linear.fit_probe, static_argnames="config")


def _validate(estimator, *args, **kwargs):
    """scikit-learn's input checks (which also set or compare n_features_in_ and
    feature_names_in_), with its ValueErrors raised as InputError, jaxprobe's bad-input error."""
    try:
        return validate_data(estimator, *args, **kwargs)
    except ValueError as error:
        hint = "; probe_sweep masks missing targets (NaN) per target" if "NaN" in str(error) else ""
        raise InputError(f"{error}{hint}") from error


def _scoring(scoring: str | None, leave_one_out: bool) -> Scoring:
    if scoring is None:
        return "neg_mse" if leave_one_out else "r2"
    names = {"r2": "r2", "neg_mean_squared_error": "neg_mse"}
    if scoring not in names:
        raise InputError(f"scoring must be one of {sorted(names)} or None, got {scoring!r}")
    return names[scoring]
