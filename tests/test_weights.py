"""MEstimator: influence, approximate leave-out / bootstrap / CV, refits, interop.

Checked against closed forms (least squares and ridge, where every Taylor
coefficient of the leave-out path is known), the core engine used directly,
exact refits, and statsmodels' influence measures where the definitions coincide.
"""

import concurrent.futures
import contextlib
import io
import multiprocessing
import pickle
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import statsmodels.api as sm
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression, Ridge
from statsmodels.stats.outliers_influence import OLSInfluence

import optsens
from optsens import MEstimator, OptsensError
from optsens._interop import _sk_logistic_loss

jax.config.update("jax_enable_x64", True)  # as tests/conftest.py; kept for running this file alone


# ------------------------------------------------------------------ problems
def logistic_loss(theta, d):
    z = d["x"] @ theta
    return jnp.logaddexp(0.0, z) - d["y"] * z


def l2_penalty(theta):
    return 0.5 * theta[1:] @ theta[1:]


def squared_loss(theta, d):
    r = d["y"] - d["x"] @ theta
    return 0.5 * r * r


def ridge_penalty(theta):
    return 0.5 * 2.0 * theta @ theta


def small_logistic(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = np.hstack([np.ones((n, 1)), rng.standard_normal((n, d))])
    p = 1 / (1 + np.exp(-(x @ np.array([0.3, 1.0, -1.0, 0.5][: d + 1]))))
    y = (rng.random(n) < p).astype(float)
    return {"x": x, "y": y}


def small_ridge(n=30, d=4, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n)
    return {"x": x, "y": y}


@pytest.fixture(scope="module")
def logistic():
    return MEstimator.from_loss(logistic_loss, small_logistic(), jnp.zeros(4), penalty=l2_penalty).fit()


@pytest.fixture(scope="module")
def ridge():
    return MEstimator.from_loss(squared_loss, small_ridge(), jnp.zeros(4), penalty=ridge_penalty).fit()


@pytest.fixture(scope="module")
def breast_cancer():
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    data = {"x": np.hstack([np.ones((x.shape[0], 1)), x]), "y": y.astype(float)}
    return MEstimator.from_loss(logistic_loss, data, jnp.zeros(31), penalty=l2_penalty).fit()


def dense_pieces(model, loss):
    """H and the per-observation gradients by plain autodiff."""
    th = model.theta
    total = lambda t: (
        jnp.sum(model.weights * jax.vmap(loss, (None, 0))(t, model.data))
        + (model._model.penalty(t) if model._model.penalty else 0.0)
    )
    h = np.asarray(jax.hessian(total)(th))
    g = np.asarray(jax.vmap(jax.grad(loss), (None, 0))(th, model.data))
    return h, g


# ------------------------------------------------------------------ influence
def test_influence_is_minus_h_inverse_g(logistic):
    h, g = dense_pieces(logistic, logistic_loss)
    expected = -np.linalg.solve(h, g.T).T
    # same linear algebra, different order of operations: agreement to rounding
    np.testing.assert_allclose(logistic.influence(), expected, rtol=1e-12, atol=1e-14)
    # a scalar QoI needs one solve; it must equal the projected full influence
    # one solve per QoI output; linear and nonlinear outputs, as a pytree
    qoi = lambda th: {"lin": th[2] - 0.5 * th[1], "a": jnp.exp(th[1]), "b": th[:2] ** 2}
    out = logistic.influence(qoi=qoi)
    lin = expected[:, 2] - 0.5 * expected[:, 1]
    np.testing.assert_allclose(out["lin"], lin, rtol=1e-12, atol=1e-14)
    th = np.asarray(logistic.theta)
    np.testing.assert_allclose(out["a"], np.exp(th[1]) * expected[:, 1], rtol=1e-12)
    np.testing.assert_allclose(out["b"], 2 * th[:2] * expected[:, :2], rtol=1e-12, atol=1e-15)


def test_influence_matches_implicit_optimum_in_the_weights(logistic):
    # Independent check through the core's nested-AD path: eps = the N-vector of weights.
    def f(theta, w, data):
        return jnp.sum(w * jax.vmap(logistic_loss, (None, 0))(theta, data)) + l2_penalty(theta)

    eq = optsens.EstimatingEquation.from_objective(
        f, logistic.theta, jnp.ones(logistic.n_obs), args=(logistic.data,)
    )
    jac = jax.jit(jax.jacfwd(optsens.implicit_optimum(eq)))(jnp.ones(logistic.n_obs))  # (D, N)
    np.testing.assert_allclose(logistic.influence(), jac.T, rtol=1e-10, atol=1e-13)


def test_chunking_does_not_change_results(logistic):
    # chunk_size=7 runs the chunk loop with a remainder (40 = 5 * 7 + 5)
    chunked = MEstimator.from_loss(
        logistic_loss, logistic.data, logistic.theta, penalty=l2_penalty, chunk_size=7
    )
    np.testing.assert_allclose(chunked.hessian(), logistic.hessian(), rtol=1e-13)
    np.testing.assert_allclose(chunked.influence(), logistic.influence(), rtol=1e-12, atol=1e-15)
    folds = optsens.kfold(40, 3)  # folds of 14 and 13 observations: chunked inside each fold
    np.testing.assert_allclose(
        chunked.leave_out(folds, method="newton"), logistic.leave_out(folds, method="newton"), rtol=1e-12
    )


# ------------------------------------------------------- closed forms (ridge)
def ridge_pieces(model):
    x, y = np.asarray(model.data["x"]), np.asarray(model.data["y"])
    a = x.T @ x + 2.0 * np.eye(x.shape[1])
    return x, y, a


def test_ridge_leave_out_series_closed_form(ridge):
    # Along w(t) = 1 - t 1_{i}: theta(t) = (A - t x x^T)^{-1}(b - t x y), whose Taylor
    # coefficients are theta_k = A^{-1} x (x^T theta0 - y) h^{k-1}, h = x^T A^{-1} x.
    x, y, a = ridge_pieces(ridge)
    th0 = np.asarray(ridge.theta)
    coeffs = np.asarray(ridge.leave_out_coefficients("loo", order=4))  # (N, K, D)
    ainv_x = np.linalg.solve(a, x.T).T  # (N, D)
    h = np.sum(x * ainv_x, axis=1)
    resid = x @ th0 - y
    for k in range(1, 5):
        expected = ainv_x * (resid * h ** (k - 1))[:, None]
        np.testing.assert_allclose(coeffs[:, k - 1], expected, rtol=1e-10, atol=1e-14)
    # Newton step = exact leave-one-out for a quadratic objective
    exact = np.stack(
        [np.linalg.solve(a - np.outer(x[i], x[i]), x.T @ y - x[i] * y[i]) for i in range(len(y))]
    )
    np.testing.assert_allclose(ridge.leave_out("loo", method="newton"), exact, rtol=1e-11)
    # the IJ series is geometric here: the order-4 sum misses exactly the tail
    # A^{-1} x (x^T theta0 - y) h^4 / (1 - h)
    tail = ainv_x * (resid * h**4 / (1 - h))[:, None]
    np.testing.assert_allclose(ridge.leave_out("loo", order=4) + tail, exact, rtol=1e-10, atol=1e-13)


def test_ridge_cv_score_and_bootstrap_closed_forms(ridge):
    x, y, a = ridge_pieces(ridge)
    exact = np.stack(
        [np.linalg.solve(a - np.outer(x[i], x[i]), x.T @ y - x[i] * y[i]) for i in range(len(y))]
    )
    press = np.mean(0.5 * (y - np.sum(x * exact, axis=1)) ** 2)
    np.testing.assert_allclose(ridge.cv_score("loo", method="newton"), press, rtol=1e-11)
    per_fold = ridge.cv_score("loo", method="newton", per_fold=True)
    assert per_fold.shape == (len(y),)
    # and by exact refits (the Newton step is exact for ridge)
    np.testing.assert_allclose(ridge.cv_score("loo", method="exact"), press, rtol=1e-10)
    # bootstrap, Newton: one Newton step with the reweighted Hessian is exact for a quadratic
    key = jax.random.key(0)
    counts = np.asarray(optsens.bootstrap_counts(key, len(y), 4))
    expected = np.stack([np.linalg.solve((x.T * c) @ x + 2.0 * np.eye(4), (x.T * c) @ y) for c in counts])
    np.testing.assert_allclose(ridge.bootstrap(4, key, method="newton"), expected, rtol=1e-11)
    # bootstrap IJ, order 1: theta0 + sum_n (c_n - 1) d theta / d w_n
    first = np.asarray(ridge.theta) + (counts - 1) @ np.asarray(ridge.influence())
    np.testing.assert_allclose(ridge.bootstrap(4, key, order=1), first, rtol=1e-12)


def test_bootstrap_higher_order_is_the_core_engine_along_counts(logistic):
    # The dense (bootstrap) path equals taylor_expansion on eps = the weight vector, v = counts - 1.
    def f(theta, w, data):
        return jnp.sum(w * jax.vmap(logistic_loss, (None, 0))(theta, data)) + l2_penalty(theta)

    n = logistic.n_obs
    eq = optsens.EstimatingEquation.from_objective(f, logistic.theta, jnp.ones(n), args=(logistic.data,))
    key = jax.random.key(1)
    counts = optsens.bootstrap_counts(key, n, 2)
    ts = optsens.taylor_expansion(eq, 2, "jvp")
    expected = jnp.stack([ts(jnp.ones(n) + (c - 1)) for c in counts])
    np.testing.assert_allclose(logistic.bootstrap(2, key, order=2), expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------- logistic: exact refits
def test_breast_cancer_loo_error_shrinks_with_order(breast_cancer):
    model = breast_cancer
    folds = np.arange(0, 569, 23)[:, None]  # 25 of the 569 LOO folds, to stay fast
    exact = np.asarray(model.refit(folds, progress=False))
    th0 = np.asarray(model.theta)
    change = np.linalg.norm(exact - th0, axis=1)
    coeffs = np.asarray(model.leave_out_coefficients(folds, order=3))
    errors = []
    for k in (1, 2, 3):
        approx = th0 + coeffs[:, :k].sum(axis=1)
        errors.append(np.median(np.linalg.norm(approx - exact, axis=1) / change))
    newton = np.asarray(model.leave_out(folds, method="newton"))
    err_newton = np.median(np.linalg.norm(newton - exact, axis=1) / change)
    # measured: 7e-4, 3e-6, 9e-8 and Newton 3e-5; each order gains >= 10x
    assert errors[0] < 3e-3 and errors[1] < errors[0] / 10 and errors[2] < errors[1] / 10, errors
    assert err_newton < errors[0] / 5, (err_newton, errors)
    # order 1 by the closed form equals the engine's first coefficient
    np.testing.assert_allclose(model.leave_out(folds, order=1), th0 + coeffs[:, 0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.leave_out(folds, order=3), th0 + coeffs.sum(axis=1), rtol=1e-13)


def test_fold_equation_is_the_core_problem(logistic):
    fold = np.array([3, 17, 18])
    eq = logistic.fold_equation(fold)
    direct = optsens.taylor_expansion(eq, 2, "jvp").coefficients(1.0)
    ours = logistic.leave_out_coefficients([fold], order=2)
    np.testing.assert_allclose(ours[0], np.stack(direct), rtol=1e-10, atol=1e-14)


def test_loose_residual_rtol_carries_to_the_compiled_series(logistic):
    """A model accepted with a loose `residual_rtol` (theta0 a little off the optimum)
    must not be refused by the compiled higher-order path, which checks with the same
    tolerance; its series equal the eager core equation's for the same fold."""
    loose = MEstimator.from_loss(
        logistic_loss, small_logistic(), logistic.theta + 1e-4, penalty=l2_penalty, residual_rtol=1e-2
    )
    fold = np.array([3, 17, 18])
    direct = optsens.taylor_expansion(loose.fold_equation(fold), 2, "jvp").coefficients(1.0)
    np.testing.assert_allclose(loose.leave_out_coefficients([fold], order=2)[0], np.stack(direct), rtol=1e-10)


def test_kfold_and_leave_k_out_against_refits(logistic):
    folds = optsens.kfold(logistic.n_obs, 6, seed=0)  # sizes 7 and 6: padded folds
    exact = np.asarray(logistic.refit(folds, progress=False))
    th0 = np.asarray(logistic.theta)
    err = [np.abs(np.asarray(logistic.leave_out(folds, order=k)) - exact).max() for k in (1, 2)]
    err_newton = np.abs(np.asarray(logistic.leave_out(folds, method="newton")) - exact).max()
    scale = np.abs(exact - th0).max()
    # a sixth of the data per fold is a large step in t: measured 0.103 -> 0.043 (order 3: 0.018),
    # Newton 0.034, against changes of up to 0.36
    assert err[1] < err[0] / 2 and err_newton < err[0] < 0.3 * scale, (err, err_newton, scale)
    pairs = optsens.leave_k_out(logistic.n_obs, 2, count=5, seed=1)
    assert pairs.shape == (5, 2)
    assert optsens.leave_k_out(5, 2).shape == (10, 2)


def test_one_compiled_kernel_serves_all_folds():
    traces = []

    def counting_loss(theta, d):
        traces.append(1)  # runs only when JAX traces the function
        z = d["x"] @ theta
        return jnp.logaddexp(0.0, z) - d["y"] * z

    data = small_logistic()  # the data and optimum of the `logistic` fixture: no new fit
    theta0 = MEstimator.from_loss(logistic_loss, data, jnp.zeros(4), penalty=l2_penalty).fit().theta
    model = MEstimator.from_loss(counting_loss, data, theta0, penalty=l2_penalty)
    first = model.leave_out_coefficients([np.array([0, 1]), np.array([2, 3])], order=2)
    before = len(traces)
    # other folds of the same shape: the fold is a traced argument, nothing is re-traced
    second = model.leave_out_coefficients([np.array([5, 9]), np.array([7, 8])], order=2)
    model.leave_out([np.array([10, 11]), np.array([12, 13])], order=2)
    assert len(traces) == before
    assert second.shape == (2, 2, 4) and not np.allclose(first, second)


# ----------------------------------------------------- estimating-function form
def test_equation_form_matches_loss_form(logistic):
    g = jax.grad(logistic_loss)
    model = MEstimator(g, logistic.data, logistic.theta, penalty=jax.grad(l2_penalty))
    folds = optsens.kfold(logistic.n_obs, 4)
    np.testing.assert_allclose(model.influence(), logistic.influence(), rtol=1e-11, atol=1e-14)
    qoi = lambda th: th[3]  # the equation form takes g_n(theta0) @ u, not a forward pass
    np.testing.assert_allclose(model.influence(qoi=qoi), logistic.influence()[:, 3], rtol=1e-11, atol=1e-14)
    for kwargs in ({"order": 2}, {"method": "newton"}):
        np.testing.assert_allclose(
            model.leave_out(folds, **kwargs), logistic.leave_out(folds, **kwargs), rtol=1e-11
        )
    with pytest.raises(OptsensError, match="loss_fn"):
        model.cv_score(folds)


# ------------------------------------------- Newton step: Woodbury versus dense
def linear_predictor(theta, d):
    return d["x"] @ theta


def test_woodbury_newton_step_equals_dense(logistic):
    # from_loss with `linear_predictor`: rank-one per-observation Hessians, so the Newton
    # step is a Woodbury update of H's factorisation; without it, a D x D factorisation
    # per fold. Same numbers, for LOO and for padded folds of 1 and 3 (m k < D = 4).
    low_rank = MEstimator.from_loss(
        logistic_loss, logistic.data, logistic.theta, penalty=l2_penalty, linear_predictor=linear_predictor
    )
    folds = ["loo", [np.array([4]), np.array([7, 30, 31])]]
    for f in folds:
        dense = np.asarray(logistic.leave_out(f, method="newton"))
        np.testing.assert_allclose(low_rank.leave_out(f, method="newton"), dense, rtol=0, atol=1e-10)
    # the estimating-function form (LU, non-symmetric Woodbury solve) agrees too
    g_form = MEstimator(
        jax.grad(logistic_loss), logistic.data, logistic.theta, penalty=jax.grad(l2_penalty),
        linear_predictor=linear_predictor,
    )  # fmt: skip
    np.testing.assert_allclose(
        g_form.leave_out(folds[1], method="newton"), logistic.leave_out(folds[1], method="newton"), atol=1e-10
    )
    # k = 2 outputs (the two halves of x @ theta, whose sum is the logit): 2 x 2 blocks
    eta2 = lambda th, d: jnp.stack([d["x"][:2] @ th[:2], d["x"][2:] @ th[2:]])
    low2 = MEstimator.from_loss(
        logistic_loss, logistic.data, logistic.theta, penalty=l2_penalty, linear_predictor=eta2
    )
    dense_loo = logistic.leave_out("loo", method="newton")
    np.testing.assert_allclose(low2.leave_out("loo", method="newton"), dense_loo, rtol=0, atol=1e-10)
    # a declaration that does not describe the loss is caught against H
    wrong = MEstimator.from_loss(
        logistic_loss,
        logistic.data,
        logistic.theta,
        penalty=l2_penalty,
        linear_predictor=lambda th, d: d["x"][:2] @ th[:2],
    )
    with pytest.raises(OptsensError, match="`linear_predictor` does not describe"):
        wrong.leave_out("loo", method="newton")
    with pytest.raises(OptsensError, match="linear_predictor"):
        MEstimator.from_loss(
            logistic_loss, logistic.data, logistic.theta, linear_predictor=lambda th, d: jnp.outer(th, th)
        )


def dummy_logistic(n=40):
    """Logistic data with a dummy column that is 1 only for observations 0 and 1 (labels 1, 0)."""
    data = small_logistic(n, d=2, seed=3)
    dummy = np.zeros((n, 1))
    dummy[:2] = 1.0
    data = {"x": np.hstack([data["x"], dummy]), "y": data["y"].copy()}
    data["y"][:2] = [1.0, 0.0]
    return data


@pytest.mark.parametrize("low_rank", [True, False])
def test_newton_step_reports_unidentified_and_indefinite_folds(low_rank):
    predictor = {"linear_predictor": linear_predictor} if low_rank else {}
    # no penalty: without observations 0 and 1 the dummy's coefficient is not identified
    model = MEstimator.from_loss(logistic_loss, dummy_logistic(), jnp.zeros(4), **predictor).fit()
    folds = [np.array([5]), np.array([0, 1]), np.array([2, 3])]
    with pytest.raises(optsens.SingularHessianError, match=r"without `folds`\[1\].*1 of 3 folds"):
        model.leave_out(folds, method="newton")
    model.leave_out(folds, order=1)  # first-order IJ needs only H
    if not low_rank:
        with pytest.raises(optsens.SingularHessianError, match="bootstrap draw"):
            model.bootstrap(30, jax.random.key(0), method="newton")
    # a concave penalty: H is positive definite, H - H_S without the dummy's rows is not
    data = dummy_logistic(12)
    concave = lambda th: -0.25 * th @ th
    ls = MEstimator.from_loss(squared_loss, data, jnp.zeros(4), penalty=concave, **predictor).fit()
    with pytest.raises(optsens.IndefiniteHessianError, match=r"`folds`\[1\].*indefinite"):
        ls.leave_out(folds, method="newton")
    ls.leave_out(folds[::2], method="newton")  # the other folds are fine


# ---------------------------------------------------------------- statsmodels
def test_statsmodels_ols_dfbeta_is_the_newton_step():
    rng = np.random.default_rng(4)
    x = sm.add_constant(rng.standard_normal((50, 3)))
    y = x @ np.array([1.0, 2.0, -1.0, 0.5]) + rng.standard_normal(50)
    res = sm.OLS(y, x).fit()
    model = MEstimator.from_statsmodels(res)
    dfbeta = OLSInfluence(res).dfbeta  # params - params_(-i), from an explicit LOO loop
    newton = np.asarray(model.leave_out("loo", method="newton"))
    # exact for least squares: agreement to rounding (|dfbeta| ~ 0.1; 1e-8 asked, ~1e-15 seen),
    # by the Woodbury update (from_statsmodels declares x theta) and by dense factorisations
    np.testing.assert_allclose(np.asarray(model.theta) - newton, dfbeta, rtol=0, atol=1e-10)
    dense = MEstimator.from_statsmodels(res, linear_predictor=None).leave_out("loo", method="newton")
    np.testing.assert_allclose(np.asarray(model.theta) - dense, dfbeta, rtol=0, atol=1e-10)
    # first-order IJ is only first-order: params - IJ differs from dfbeta by O(h) relative
    ij = np.asarray(model.leave_out("loo", order=1))
    assert np.abs(np.asarray(model.theta) - ij - dfbeta).max() > 1e-4
    # WLS weights become observation weights
    wls = sm.WLS(y, x, weights=np.linspace(0.5, 2, 50)).fit()
    np.testing.assert_allclose(MEstimator.from_statsmodels(wls).theta, wls.params, rtol=1e-10)


@pytest.mark.parametrize("family", ["binomial", "poisson", "logit"])
def test_statsmodels_glm_params_one_is_the_newton_step(family):
    rng = np.random.default_rng(5)
    n = 80
    x = sm.add_constant(rng.standard_normal((n, 2)))
    if family == "binomial":
        y = (rng.random(n) < 1 / (1 + np.exp(-x @ np.array([0.2, 1.0, -0.7])))).astype(float)
        res = sm.GLM(y, x, family=sm.families.Binomial()).fit(tol=1e-13)
    elif family == "logit":  # discrete Logit: get_influence() is MLEInfluence, same definitions
        y = (rng.random(n) < 1 / (1 + np.exp(-x @ np.array([0.2, 1.0, -0.7])))).astype(float)
        res = sm.Logit(y, x).fit(disp=0, tol=1e-13)
    else:
        exposure = np.exp(0.2 * rng.standard_normal(n))
        y = rng.poisson(exposure * np.exp(x @ np.array([0.1, 0.5, -0.3]))).astype(float)
        res = sm.GLM(y, x, family=sm.families.Poisson(), exposure=exposure).fit(tol=1e-13)
    infl = res.get_influence()  # GLMInfluence (MLEInfluence for Logit)
    model = MEstimator.from_statsmodels(res, polish=False)  # statsmodels' own optimum
    newton = np.asarray(model.leave_out("loo", method="newton"))
    # GLMInfluence.params_one = params - d_params, d_params = H^{-1} g_i / (1 - h_ii) (canonical
    # link: rank-one per-observation Hessian, so this is exactly one Newton step without i)
    np.testing.assert_allclose(newton, infl.params_one, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(model.theta) - newton, infl.d_params, rtol=0, atol=1e-10)
    # the same by dense factorisations of H - H_i (no declared linear predictor)
    dense = MEstimator.from_statsmodels(res, polish=False, linear_predictor=None)
    np.testing.assert_allclose(dense.leave_out("loo", method="newton"), newton, rtol=0, atol=1e-10)


def test_statsmodels_unsupported_models_say_so():
    rng = np.random.default_rng(0)
    x = sm.add_constant(rng.standard_normal((30, 2)))
    y = rng.gamma(2.0, size=30)
    res = sm.GLM(y, x, family=sm.families.Gamma(sm.families.links.Log())).fit()
    with pytest.raises(OptsensError, match="Gamma"):
        MEstimator.from_statsmodels(res)
    yb = (y > 2).astype(float)
    reg = sm.GLM(yb, x, family=sm.families.Binomial()).fit_regularized(alpha=0.1)
    with pytest.raises(OptsensError, match="fit_regularized"):
        MEstimator.from_statsmodels(reg)


# -------------------------------------------------------------- scikit-learn
@pytest.mark.parametrize(
    "kwargs",
    [
        {"C": 0.5, "class_weight": "balanced"},
        {"C": 0.5, "solver": "liblinear"},
        {"C": 0.5, "fit_intercept": False},
    ],
)
def test_sklearn_logistic_regression_conventions(kwargs):
    data = small_logistic(60, seed=2)
    x, y = data["x"][:, 1:], data["y"]
    est = LogisticRegression(tol=1e-12, max_iter=10_000, **kwargs).fit(x, y)
    # The convention is right iff scikit-learn's own optimum solves our estimating
    # equation: the Newton step H^{-1} G at its parameters is at the level of its
    # solver tolerance (a wrong C scaling or a penalised intercept gives ~1e-1).
    model = MEstimator.from_sklearn(est, x, y, polish=False)
    assert model.newton_step_norm < 1e-6
    infl = model.influence()
    assert infl["coef"].shape == (60, 3) and ("intercept" in infl) == est.fit_intercept


def test_sklearn_ridge_conventions_and_exact_loo():
    data = small_ridge(40, 3, seed=3)
    x, y = data["x"], data["y"]
    sw = np.linspace(0.5, 1.5, 40)
    est = Ridge(alpha=3.0).fit(x, y, sample_weight=sw)
    model = MEstimator.from_sklearn(est, x, y, sample_weight=sw)
    np.testing.assert_allclose(model.theta["coef"], est.coef_, rtol=1e-10)
    # Newton step = exact LOO refit of sklearn's Ridge (quadratic objective)
    newton = model.leave_out([np.array([0]), np.array([5, 6])], method="newton")
    for f, drop in enumerate([[0], [5, 6]]):
        keep = np.setdiff1d(np.arange(40), drop)
        ref = Ridge(alpha=3.0).fit(x[keep], y[keep], sample_weight=sw[keep])
        np.testing.assert_allclose(newton["coef"][f], ref.coef_, rtol=1e-9)
        assert abs(float(newton["intercept"][f]) - ref.intercept_) < 1e-9


# -------------------------------------------------------------------- refits
def test_refit_through_executors_matches_serial():
    data = small_logistic(40, seed=6)
    est = LogisticRegression(C=1.0, tol=1e-10).fit(data["x"][:, 1:], data["y"])
    model = MEstimator.from_sklearn(est, data["x"][:, 1:], data["y"])
    folds = [np.array([0]), np.array([1, 2]), np.array([3]), np.array([4, 5, 6])]
    serial = model.refit(folds)  # with a progress bar
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        threaded = model.refit(folds, executor=pool, progress=False)
    np.testing.assert_allclose(threaded["coef"], serial["coef"], rtol=1e-12)
    # What a process pool (or dask) does to a task: pickle it. The payload travels as
    # NumPy (a worker must enable float64 before making JAX arrays) and gives the same fits.
    submitted = []

    class PicklingExecutor(concurrent.futures.Executor):
        def submit(self, fn, *args):
            fn, args = pickle.loads(pickle.dumps((fn, args)))
            submitted.append(args[0])
            future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

    pickled = model.refit(folds, executor=PicklingExecutor(), progress=False, tasks=2)
    np.testing.assert_allclose(pickled["coef"], serial["coef"], rtol=1e-12)
    assert len(submitted) == 2 and isinstance(submitted[0].data["x"], np.ndarray)
    assert submitted[0].fn is _sk_logistic_loss
    # exact refits really are optima of the reduced problem
    for f, fold in enumerate(folds):
        w = np.ones(40)
        w[fold] = 0.0
        reduced = model._replace(theta0=jax.tree_util.tree_map(lambda a: a[f], serial), weights=w)
        assert reduced.newton_step_norm < 1e-10


def test_refit_through_a_dask_distributed_client():
    # The requirement: a dask.distributed client's executor. An in-process local
    # cluster (one worker thread) starts offline in well under a second; tasks go through
    # dask's scheduler, futures and `concurrent.futures` wrapper like on a real cluster.
    import distributed

    data = small_logistic(40, seed=6)
    est = LogisticRegression(C=1.0, tol=1e-10).fit(data["x"][:, 1:], data["y"])
    model = MEstimator.from_sklearn(est, data["x"][:, 1:], data["y"])
    folds = [np.array([0]), np.array([1, 2]), np.array([3])]
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        out = model.refit(folds, executor=client.get_executor(), progress=False, tasks=2)
    serial = model.refit(folds, progress=False)
    np.testing.assert_allclose(out["coef"], serial["coef"], rtol=1e-12)
    np.testing.assert_allclose(out["intercept"], serial["intercept"], rtol=1e-12)


def test_refit_through_a_process_pool():
    data = small_logistic(40, seed=6)
    est = LogisticRegression(C=1.0, tol=1e-10).fit(data["x"][:, 1:], data["y"])
    model = MEstimator.from_sklearn(est, data["x"][:, 1:], data["y"])
    folds = [np.array([0]), np.array([1, 2])]
    ctx = multiprocessing.get_context("spawn")  # fork after JAX has started threads can deadlock
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        spawned = model.refit(folds, executor=pool, progress=False)
    serial = model.refit(folds, progress=False)
    np.testing.assert_allclose(spawned["coef"], serial["coef"], rtol=1e-12)
    # a dask cluster whose worker is another process: the payload is pickled to it
    import distributed

    with (
        distributed.LocalCluster(
            processes=True, n_workers=1, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        on_dask = model.refit(folds, executor=client.get_executor(), progress=False)
    np.testing.assert_allclose(on_dask["coef"], serial["coef"], rtol=1e-12)


# ----------------------------------------------------------- the docs' example
def test_docs_approximate_cv_example_runs_and_agrees():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "weights.md").read_text()
    section = doc[doc.index("## Approximate cross-validation: choosing a penalty") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/weights.md", "exec"), {"__name__": "docs_example"})
    printed = out.getvalue()
    for name in ("IJ order 3", "Newton    ", "exact     "):
        assert f"{name} chooses lambda = 1.0" in printed, printed


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "folds, match",
    [
        ([np.array([0, 40])], r"outside \[0, 40\)"),
        ([np.array([-1])], "Negative"),
        ([np.array([], dtype=int)], "empty"),
        ([np.array([3, 3])], "repeats"),
        ([np.arange(40)], "all 40 observations"),
        ([np.zeros(40, dtype=bool)], "flatnonzero"),
        ([np.array([0.5])], "integer"),
        (5, "kfold"),
        ("lo0", "loo"),
        ([], "empty"),
    ],
)
def test_bad_folds(logistic, folds, match):
    with pytest.raises(OptsensError, match=match):
        logistic.leave_out(folds)


def test_bad_construction_and_arguments(logistic):
    data = small_logistic()
    with pytest.raises(OptsensError, match=r"shape \(40,\)"):
        MEstimator.from_loss(logistic_loss, data, jnp.zeros(4), weights=np.ones(39))
    with pytest.raises(OptsensError, match="non-negative"):
        MEstimator.from_loss(logistic_loss, data, jnp.zeros(4), weights=-np.ones(40))
    bad = {"x": data["x"].copy(), "y": data["y"]}
    bad["x"][7, 2] = np.nan
    with pytest.raises(optsens.NonFiniteError, match=r"data\['x'\].*first: \[7\]"):
        MEstimator.from_loss(logistic_loss, bad, jnp.zeros(4))
    with pytest.raises(OptsensError, match="same leading axis"):
        MEstimator.from_loss(logistic_loss, {"x": data["x"], "y": data["y"][:-1]}, jnp.zeros(4))
    with pytest.raises(OptsensError, match="scalar"):
        MEstimator.from_loss(lambda th, d: d["x"] * th, data, jnp.zeros(4))
    with pytest.raises(OptsensError, match="shaped like `theta0`"):
        MEstimator(lambda th, d: th[:2], data, jnp.zeros(4))
    unfitted = MEstimator.from_loss(logistic_loss, data, jnp.zeros(4), penalty=l2_penalty)
    with pytest.raises(optsens.NotASolutionError, match=r"\.fit\(\)"):
        unfitted.influence()
    with pytest.raises(OptsensError, match="single Newton step"):
        logistic.leave_out("loo", order=2, method="newton")
    with pytest.raises(OptsensError, match="method"):
        logistic.leave_out("loo", method="exact")
    with pytest.raises(OptsensError, match="order"):
        logistic.leave_out("loo", order=0)
    with pytest.raises(OptsensError, match="nonzero weight"):
        MEstimator.from_loss(
            logistic_loss, data, logistic.theta, penalty=l2_penalty, weights=np.r_[np.ones(2), np.zeros(38)]
        ).leave_out([np.array([0, 1])])
    with pytest.raises(OptsensError, match="k"):
        optsens.kfold(10, 11)
