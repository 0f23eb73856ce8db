"""`MEstimator` from models fitted elsewhere: statsmodels and scikit-learn.

Each constructor rewrites the fitted model as ``sum_n w_n loss_n(theta) + penalty``
with the same minimiser as the original library's objective (the overall scale of
an objective does not move its minimiser, so e.g. scikit-learn's
``C sum_n s_n loss_n + |coef|^2 / 2`` becomes ``sum_n s_n loss_n + |coef|^2 / (2 C)``),
declares its linear predictor ``x theta + offset`` (so the Newton step uses the
rank-one Woodbury update; see `MEstimator`), then, with ``polish=True``, refines
the parameters by Newton's method: the libraries stop at tolerances
(scikit-learn's default ``tol=1e-4``) far looser than derivatives need.

Supported:

- statsmodels: `OLS`, `WLS` (weights), `GLM` with the canonical links of the
  Gaussian, Binomial and Poisson families (``freq_weights * var_weights``, Binomial
  ``n_trials``, ``offset`` and ``exposure`` honoured), discrete `Logit` and
  `Poisson`. ``theta`` is the flat ``params`` vector.
- scikit-learn: `LogisticRegression` (binary, L2 or no penalty; ``C``,
  ``class_weight``, ``fit_intercept``; liblinear's penalised intercept),
  `Ridge` (``alpha``, ``fit_intercept``), `LinearRegression`. ``theta`` is
  ``{"coef": coef_, "intercept": intercept_}`` (no ``"intercept"`` without one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._errors import OptsensError

__all__ = ["from_statsmodels", "from_sklearn"]


# ------------------------------------------------------------- losses (picklable)
def _linear_predictor_flat(theta, d):
    return d["x"] @ theta + d["offset"]


def _sm_squared_loss(theta, d):
    """``(y - x theta - offset)^2 / 2``: least squares (any scale sigma^2 drops out)."""
    r = d["y"] - _linear_predictor_flat(theta, d)
    return 0.5 * r * r


def _sm_logistic_loss(theta, d):
    """Binomial negative log-likelihood, logit link: ``log(1 + e^z) - y z``."""
    z = _linear_predictor_flat(theta, d)
    return jnp.logaddexp(0.0, z) - d["y"] * z


def _sm_poisson_loss(theta, d):
    """Poisson negative log-likelihood, log link, without ``log y!``: ``e^z - y z``."""
    z = _linear_predictor_flat(theta, d)
    return jnp.exp(z) - d["y"] * z


def _sk_linear_predictor(theta, d):
    z = d["x"] @ theta["coef"]
    if "intercept" in theta:
        z = z + theta["intercept"]
    return z


def _sk_logistic_loss(theta, d):
    """scikit-learn's log-loss of one observation, labels ``y`` in {0, 1}."""
    z = _sk_linear_predictor(theta, d)
    return jnp.logaddexp(0.0, z) - d["y"] * z


def _sk_squared_loss(theta, d):
    r = d["y"] - _sk_linear_predictor(theta, d)
    return 0.5 * r * r


@dataclasses.dataclass(frozen=True)
class _L2Penalty:
    """``coef_strength |coef|^2 / 2 + intercept_strength intercept^2 / 2`` (hashable,
    picklable: compiled kernels are shared by estimators with the same penalty)."""

    coef_strength: float
    intercept_strength: float = 0.0

    def __call__(self, theta):
        out = 0.5 * self.coef_strength * jnp.sum(theta["coef"] ** 2)
        if self.intercept_strength and "intercept" in theta:
            out = out + 0.5 * self.intercept_strength * theta["intercept"] ** 2
        return out


# ------------------------------------------------------------------ statsmodels
_GLM_LOSSES = {
    ("Gaussian", "Identity"): _sm_squared_loss,
    ("Binomial", "Logit"): _sm_logistic_loss,
    ("Poisson", "Log"): _sm_poisson_loss,
}


def from_statsmodels(cls, results: Any, *, polish: bool = True, **kwargs: Any):
    """An `MEstimator` for a fitted statsmodels `OLS`, `WLS`, `GLM` (canonical link of
    Gaussian, Binomial or Poisson), `Logit` or `Poisson` results object.

    The loss per observation is the negative log-likelihood up to terms free of
    ``theta`` (least squares ``(y - x beta)^2 / 2`` for OLS/WLS/Gaussian, whose
    scale does not move ``beta``); weights are WLS's ``weights`` or GLM's
    ``freq_weights * var_weights`` (times ``n_trials`` for Binomial). ``theta`` is
    ``results.params`` as a flat vector in ``exog`` column order.

    Where definitions coincide: for OLS, ``leave_out("loo", method="newton")`` is
    the exact leave-one-out fit, i.e. ``results.params - OLSInfluence.dfbeta``; for
    a canonical-link GLM it is ``GLMInfluence.params_one`` (and
    ``GLMInfluence.d_params = theta0 - leave_out("loo", method="newton")``).
    """
    res = getattr(results, "_results", results)
    model = getattr(res, "model", None)
    if model is None or not hasattr(res, "params"):
        raise TypeError(
            f"`results` must be a fitted statsmodels results object (from `model.fit()`); got "
            f"{type(results).__name__}."
        )
    if type(res).__name__.startswith("Regularized"):
        raise OptsensError(
            "`results` comes from `fit_regularized` (elastic net); its objective is not smooth, so "
            "derivatives of the fit do not exist. Refit with `fit()`, or write the smooth penalty as "
            "`MEstimator.from_loss(..., penalty=...)`."
        )
    name = type(model).__name__
    exog = np.asarray(model.exog, dtype=float)
    endog = np.asarray(model.endog, dtype=float)
    n_obs = exog.shape[0]
    offset = np.zeros(n_obs)
    if getattr(model, "offset", None) is not None:
        offset = offset + np.asarray(model.offset, dtype=float)
    if getattr(model, "exposure", None) is not None:
        # statsmodels stores log(exposure) in `model.exposure`
        offset = offset + np.asarray(model.exposure, dtype=float)
    weights = np.ones(n_obs)
    if name in ("OLS", "WLS"):
        loss = _sm_squared_loss
        weights = weights * np.broadcast_to(np.asarray(model.weights, dtype=float), (n_obs,))
    elif name == "GLM":
        family = type(model.family).__name__
        link = type(model.family.link).__name__
        loss = _GLM_LOSSES.get((family, link))
        if loss is None:
            raise OptsensError(
                f"GLM with family {family} and link {link} is not supported; supported are "
                f"{sorted(f'{f}/{lk}' for f, lk in _GLM_LOSSES)}. Write its negative log-likelihood as "
                "`loss(theta, datum)` and use `MEstimator.from_loss`."
            )
        weights = (
            weights * np.asarray(model.freq_weights, dtype=float) * np.asarray(model.var_weights, dtype=float)
        )
        if family == "Binomial" and getattr(model, "n_trials", None) is not None:
            weights = weights * np.broadcast_to(np.asarray(model.n_trials, dtype=float), (n_obs,))
    elif name == "Logit":
        loss = _sm_logistic_loss
    elif name == "Poisson":
        loss = _sm_poisson_loss
    else:
        raise OptsensError(
            f"statsmodels model {name} is not supported (supported: OLS, WLS, GLM with a canonical link "
            "of Gaussian/Binomial/Poisson, Logit, Poisson). Use `MEstimator.from_loss` with its "
            "negative log-likelihood per observation."
        )
    if endog.ndim != 1:
        raise OptsensError(f"`results.model.endog` must be one-dimensional; got shape {endog.shape}.")
    data = {"x": exog, "y": endog, "offset": offset}
    kwargs.setdefault("linear_predictor", _linear_predictor_flat)  # rank-one Hessians: Woodbury ALO
    est = cls.from_loss(loss, data, np.asarray(res.params, dtype=float), weights=weights, **kwargs)
    return est.fit() if polish else est


# ----------------------------------------------------------------- scikit-learn
def _logistic_penalty(est) -> tuple[float, float]:
    """(coef strength, intercept strength) with the loss sum unscaled."""
    penalty = getattr(est, "penalty", "l2")
    l1_ratio = getattr(est, "l1_ratio", None)
    C = float(est.C)
    if penalty == "deprecated":  # scikit-learn >= 1.8: l1_ratio and C say it all
        penalty = "l2" if not l1_ratio else "elasticnet"
    if penalty in ("l1", "elasticnet") and (penalty == "l1" or (l1_ratio or 0.0) > 0):
        raise OptsensError(
            f"LogisticRegression with an L1 part (penalty={penalty!r}, l1_ratio={l1_ratio!r}) has a "
            "non-smooth objective: derivatives of the fit do not exist. Use an L2 penalty (l1_ratio=0)."
        )
    if penalty is None or penalty == "none" or not np.isfinite(C):
        return 0.0, 0.0
    coef_strength = 1.0 / C
    intercept_strength = 0.0
    if est.solver == "liblinear" and est.fit_intercept:
        # liblinear fits a synthetic feature `intercept_scaling` with a penalised weight b,
        # intercept_ = intercept_scaling * b, so the penalty is (intercept_ / s)^2 / (2 C).
        intercept_strength = coef_strength / float(est.intercept_scaling) ** 2
    return coef_strength, intercept_strength


def from_sklearn(
    cls, estimator: Any, X: Any, y: Any, *, sample_weight: Any = None, polish: bool = True, **kwargs
):
    """An `MEstimator` for a fitted scikit-learn `LogisticRegression` (binary), `Ridge`
    or `LinearRegression`, with the data it was fitted on.

    Regularisation conventions: `LogisticRegression` minimises
    ``C sum_n s_n logloss_n + |coef|^2 / 2`` (intercept not penalised, except by
    liblinear, which penalises ``(intercept_ / intercept_scaling)^2 / 2``), which
    here is ``sum_n s_n logloss_n + |coef|^2 / (2 C)``; ``class_weight`` multiplies
    ``s_n``. `Ridge` minimises ``sum_n s_n (y_n - x_n coef - b)^2 + alpha |coef|^2``,
    here ``sum_n s_n (y_n - x_n coef - b)^2 / 2 + alpha |coef|^2 / 2``.

    **Arguments:** `estimator` (fitted), `X`, `y` and `sample_weight` as passed to
    its ``fit``; `polish`: refine the parameters by Newton's method (default).

    **Returns:** an `MEstimator` with ``theta = {"coef": ..., "intercept": ...}``.
    """
    kind = type(estimator).__name__
    if not hasattr(estimator, "coef_"):
        raise OptsensError(f"`estimator` ({kind}) is not fitted: call its `fit(X, y)` first.")
    X = np.asarray(X, dtype=float)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise OptsensError(f"`X` must be (n_samples, n_features) matching `y`; got X {X.shape}, y {y.shape}.")
    n_obs = X.shape[0]
    weights = np.ones(n_obs) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    coef = np.asarray(estimator.coef_, dtype=float)
    if kind == "LogisticRegression":
        classes = np.asarray(estimator.classes_)
        if classes.size != 2 or coef.shape[0] != 1:
            raise OptsensError(
                f"only binary LogisticRegression is supported; this one has {classes.size} classes."
            )
        if getattr(estimator, "class_weight", None) is not None:
            from sklearn.utils.class_weight import compute_sample_weight

            weights = weights * compute_sample_weight(estimator.class_weight, y)
        labels = (y == classes[1]).astype(float)
        coef_strength, intercept_strength = _logistic_penalty(estimator)
        loss, target = _sk_logistic_loss, labels
        penalty = _L2Penalty(coef_strength, intercept_strength) if coef_strength else None
    elif kind in ("Ridge", "LinearRegression"):
        if getattr(estimator, "positive", False):
            raise OptsensError(f"{kind}(positive=True) is a constrained fit; its derivatives are not smooth.")
        if coef.ndim != 1:
            raise OptsensError(f"only single-target {kind} is supported; coef_ has shape {coef.shape}.")
        alpha = float(np.asarray(getattr(estimator, "alpha", 0.0)).squeeze()) if kind == "Ridge" else 0.0
        loss, target = _sk_squared_loss, y.astype(float)
        penalty = _L2Penalty(alpha) if alpha else None
    else:
        raise OptsensError(
            f"scikit-learn estimator {kind} is not supported (supported: LogisticRegression, Ridge, "
            "LinearRegression). Use `MEstimator.from_loss` with its loss per observation."
        )
    coef = coef.reshape(-1)
    if coef.shape[0] != X.shape[1]:
        raise OptsensError(f"`X` has {X.shape[1]} features but the estimator was fitted on {coef.shape[0]}.")
    theta = {"coef": coef}
    if estimator.fit_intercept:
        theta["intercept"] = np.asarray(estimator.intercept_, dtype=float).reshape(-1)[0]
    kwargs.setdefault("linear_predictor", _sk_linear_predictor)  # rank-one Hessians: Woodbury ALO
    est = cls.from_loss(loss, {"x": X, "y": target}, theta, penalty=penalty, weights=weights, **kwargs)
    return est.fit() if polish else est
