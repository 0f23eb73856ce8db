"""taylor_expansion: the fast engine against closed forms, refits and the nested path."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import digamma, gammaln

import optsens
from optsens import _taylor
from tests._problems import (
    logistic_data,
    logistic_objective,
    ridge_data,
    ridge_derivative,
    ridge_equation,
    ridge_objective,
    ridge_solution,
)

LAM = 2.0


@pytest.fixture(scope="module")
def ridge_eq():
    x, y = ridge_data()
    return (
        x,
        y,
        optsens.EstimatingEquation.from_objective(
            ridge_objective, ridge_solution(x, y, LAM), LAM, args=(x, y)
        ),
    )


@pytest.fixture(scope="module")
def logistic_eq():
    x, y = logistic_data()
    theta0 = optsens.newton_solve(logistic_objective, jnp.zeros(4), 0.0, args=(x, y), objective=True)
    return x, y, optsens.EstimatingEquation.from_objective(logistic_objective, theta0, 0.0, args=(x, y))


@pytest.mark.parametrize("method,order", [("jet", 8), ("jvp", 8), ("auto", 8), ("nested", 5)])
def test_ridge_derivatives_match_closed_form(ridge_eq, method, order):
    """Every derivative in lambda, relative error below 1e-9 (observed ~1e-14)."""
    x, y, eq = ridge_eq
    derivatives = optsens.taylor_expansion(eq, order, method).derivatives(1.0)
    assert len(derivatives) == order
    for k, got in enumerate(derivatives, start=1):
        want = ridge_derivative(x, y, LAM, k)
        assert np.max(np.abs(got - want) / np.abs(want)) < 1e-9, (method, k)


def test_general_equation_matches_closed_form():
    x, y = ridge_data()
    eq = optsens.EstimatingEquation(ridge_equation, ridge_solution(x, y, LAM), LAM, args=(x, y))
    for k, got in enumerate(optsens.taylor_expansion(eq, 6).derivatives(1.0), start=1):
        np.testing.assert_allclose(got, ridge_derivative(x, y, LAM, k), rtol=1e-9)


def test_methods_agree_through_logaddexp(logistic_eq):
    _, _, eq = logistic_eq
    fast = optsens.taylor_expansion(eq, 6, "jet").derivatives(0.7)
    forward = optsens.taylor_expansion(eq, 6, "jvp").derivatives(0.7)
    nested = optsens.taylor_expansion(eq, 4, "nested").derivatives(0.7)
    for k in range(6):
        scale = np.max(np.abs(forward[k]))
        assert np.max(np.abs(fast[k] - forward[k])) < 1e-11 * scale
        if k < 4:
            assert np.max(np.abs(nested[k] - forward[k])) < 1e-11 * scale


def test_error_against_refits_shrinks_with_order(logistic_eq):
    """At a small step the truncation error falls at each order."""
    x, y, eq = logistic_eq
    ts = optsens.taylor_expansion(eq, 6)
    for step in (0.2, -0.3):
        exact = optsens.newton_solve(logistic_objective, eq.theta0, step, args=(x, y), objective=True)
        errors = [float(jnp.linalg.norm(ts(step, order=k) - exact)) for k in range(0, 7)]
        assert all(b < 0.6 * a for a, b in zip(errors, errors[1:], strict=False)), errors
        assert errors[-1] < 1e-6 * errors[0]


def test_call_under_vmap_and_jit(logistic_eq):
    _, _, eq = logistic_eq
    ts = optsens.taylor_expansion(eq, 4)
    grid = jnp.linspace(-0.2, 0.2, 5)
    batched = jax.vmap(ts)(grid)
    looped = jnp.stack([ts(e) for e in grid])
    np.testing.assert_allclose(batched, looped, rtol=1e-13)
    np.testing.assert_allclose(jax.jit(lambda e: ts(e))(0.1), ts(0.1), rtol=1e-13)
    np.testing.assert_allclose(ts(0.0), eq.theta0, rtol=0, atol=0)


def test_quantity_of_interest(logistic_eq):
    """QoI series by propagation equal the nested derivatives of f(theta_hat(eps), eps)."""
    _, _, eq = logistic_eq

    def qoi(theta, log_lam):
        return {"norm": jnp.sum(theta**2) * jnp.exp(log_lam), "first": theta[0]}

    fast = optsens.taylor_expansion(eq, 4, qoi=qoi).derivatives(1.0)
    nested = optsens.taylor_expansion(eq, 4, "nested", qoi=qoi).derivatives(1.0)
    theta_hat = optsens.implicit_optimum(eq)
    direct = jax.jacfwd(jax.jacfwd(lambda e: qoi(theta_hat(e), e)["norm"]))(0.0)
    for a, b in zip(fast, nested, strict=True):
        np.testing.assert_allclose(a["norm"], b["norm"], rtol=1e-11)
        np.testing.assert_allclose(a["first"], b["first"], rtol=1e-11)
    np.testing.assert_allclose(fast[1]["norm"], direct, rtol=1e-11)
    only_theta = optsens.taylor_expansion(eq, 3, qoi=lambda theta: theta[0])
    np.testing.assert_allclose(only_theta.derivatives(1.0)[2], fast[2]["first"], rtol=1e-11)
    np.testing.assert_allclose(only_theta(0.0), eq.theta0[0])


def _two_hyperparameter_problem():
    x, y = logistic_data()

    def f(theta, eps, x, y):
        return logistic_objective(theta, eps["log_lam"], x, y) + eps["tilt"] @ theta

    eps0 = {"log_lam": 0.0, "tilt": jnp.zeros(4)}
    theta0 = optsens.newton_solve(f, jnp.zeros(4), eps0, args=(x, y), objective=True)
    return f, eps0, optsens.EstimatingEquation.from_objective(f, theta0, eps0, args=(x, y))


def test_derivative_arrays_and_polynomial():
    f, eps0, eq = _two_hyperparameter_problem()
    ts = optsens.taylor_expansion(eq, 3)
    arrays = ts.derivative_arrays()
    assert [a.shape for a in arrays] == [(4, 5), (4, 5, 5), (4, 5, 5, 5)]
    theta_hat = optsens.implicit_optimum(eq)
    flat = lambda e: theta_hat({"log_lam": e[0], "tilt": e[1:]})  # noqa: E731
    e0 = jnp.zeros(5)
    np.testing.assert_allclose(arrays[0], jax.jacfwd(flat)(e0), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(arrays[1], jax.hessian(flat)(e0), rtol=1e-9, atol=1e-12)
    # Third order: the array contracted with a direction equals the directional derivative.
    u = jnp.array([0.3, -1.0, 0.5, 0.2, 0.7])
    third = optsens.taylor_expansion(eq, 3).derivatives({"log_lam": u[0], "tilt": u[1:]})[2]
    np.testing.assert_allclose(jnp.einsum("dijk,i,j,k->d", arrays[2], u, u, u), third, rtol=1e-9)
    poly = ts.polynomial()
    eps = {"log_lam": 0.1, "tilt": jnp.array([0.02, -0.01, 0.0, 0.03])}
    np.testing.assert_allclose(poly(eps), ts(eps), rtol=1e-10)
    batch = {"log_lam": jnp.array([0.1, -0.1]), "tilt": jnp.zeros((2, 4))}
    assert jax.vmap(poly)(batch).shape == (2, 4)


def test_models_with_special_functions_and_loops():
    """digamma/gammaln and a while loop in G: Taylor mode equals nested forward mode."""
    rng = np.random.default_rng(4)
    counts = rng.poisson(3.0, size=50).astype(float)

    def f(theta, eps):  # negative-binomial-like likelihood in (log mean, log shape) + a loop
        mu, r = jnp.exp(theta[0]), jnp.exp(theta[1])
        ll = gammaln(counts + r) - gammaln(r) + r * jnp.log(r / (r + mu)) + counts * jnp.log(mu / (r + mu))
        damp = jax.lax.fori_loop(0, 3, lambda i, c: 0.5 * c + 0.1 * jnp.tanh(theta[1]), 0.0)
        return -jnp.sum(ll) + eps * jnp.sum(digamma(1.0 + jnp.exp(theta))) + damp + 0.5 * theta @ theta

    theta0 = optsens.newton_solve(f, jnp.array([1.0, 1.0]), 0.0, objective=True)
    eq = optsens.EstimatingEquation.from_objective(f, theta0, 0.0)
    jet_ts = optsens.taylor_expansion(eq, 4, "auto")
    assert jet_ts.method_used == "jet"
    fast = jet_ts.derivatives(1.0)
    slow = optsens.taylor_expansion(eq, 4, "jvp").derivatives(1.0)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_equation_with_an_inner_iterative_solve_and_a_branch():
    """G calls a while loop whose trip count is data (Newton's method for a square
    root) and a `lax.cond`: Taylor mode follows both without nesting a loop per order,
    and equals nested forward mode through `implicit_optimum` at order 5."""

    def inner_sqrt(a):
        def body(c):
            return 0.5 * (c[0] + a / c[0]), c[1] + 1

        keep_going = lambda c: (c[1] < 60) & (jnp.max(jnp.abs(c[0] ** 2 - a)) > 1e-15 * jnp.max(a))  # noqa: E731
        return jax.lax.while_loop(keep_going, body, (jnp.ones_like(a), 0))[0]

    def g(theta, eps):
        scale = jax.lax.cond(eps > 0, lambda e: 1.0 + e, lambda e: jnp.exp(e), eps)
        return theta**3 + theta - scale * inner_sqrt(theta**2 + 1.0 + eps)

    theta0 = optsens.newton_solve(g, jnp.array([0.5, 1.5]), 0.3)
    eq = optsens.EstimatingEquation(g, theta0, 0.3)
    ts = optsens.taylor_expansion(eq, 5)
    assert ts.method_used == "jet", ts.fallback_reason
    fast = ts.derivatives(1.0)
    slow = optsens.taylor_expansion(eq, 5, "nested").derivatives(1.0)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_vmapped_inner_while_loop_stays_in_taylor_mode():
    """A per-observation iterative solve (vmap of a while loop: a batched predicate)
    goes through its JVP rule and stays in Taylor mode."""

    def inner(a, b):
        step = lambda c: (c[0] + 1, c[1] * (1.0 + b) + a)  # noqa: E731
        return jax.lax.while_loop(lambda c: c[1] < 2.0 + a, step, (0, b))[1]

    def g(theta, eps):
        solved = jax.vmap(inner)(0.5 + 0.1 * theta * eps, 0.3 + 0.0 * theta)
        return theta + 0.1 * solved - eps * jnp.arange(1.0, 4.0)

    theta0 = optsens.newton_solve(g, jnp.zeros(3), 0.3)
    eq = optsens.EstimatingEquation(g, theta0, 0.3)
    ts = optsens.taylor_expansion(eq, 3)
    assert ts.method_used == "jet", ts.fallback_reason
    slow = optsens.taylor_expansion(eq, 3, "jvp").derivatives(1.0)
    for a, b in zip(ts.derivatives(1.0), slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_auto_falls_back_when_taylor_mode_fails(ridge_eq, monkeypatch):
    """If Taylor mode cannot trace G, "auto" uses nested forward mode and says why."""
    x, y, _ = ridge_eq

    def broken_rule(*args, **kwargs):
        raise NotImplementedError("no Taylor rule for sin in this test")

    monkeypatch.setitem(optsens._series._jet.jet_rules, jax.lax.sin_p, broken_rule)
    monkeypatch.setattr(_taylor, "_AUTO_CHOICE", {})

    def f(theta, lam):  # a fresh function, so no cached choice applies
        return ridge_objective(theta, lam, x, y) + 1e-3 * jnp.sum(jnp.sin(theta))

    theta0 = optsens.newton_solve(f, jnp.zeros(5), LAM, objective=True)
    eq = optsens.EstimatingEquation.from_objective(f, theta0, LAM)
    ts = optsens.taylor_expansion(eq, 3)
    assert ts.method_used == "jvp"
    assert "no Taylor rule for sin" in ts.fallback_reason and "fallback" in repr(ts)
    theta_hat = optsens.implicit_optimum(eq)
    np.testing.assert_allclose(ts.derivatives(1.0)[1], jax.hessian(theta_hat)(LAM), rtol=1e-10)


def test_compiled_kernels_are_reused_across_directions_and_problems():
    """G is traced once per (function, order, shape): not per direction, not per
    theta0/eps0/data. Tracing runs the Python function, so a counter sees it."""
    traces = []
    x, y = ridge_data()

    def counting_objective(theta, lam, x, y):
        traces.append(1)
        return ridge_objective(theta, lam, x, y)

    def build(lam, y):
        return optsens.EstimatingEquation.from_objective(
            counting_objective, ridge_solution(x, y, lam), lam, args=(x, y)
        )

    def traces_during(fn):
        before = len(traces)
        fn()
        return len(traces) - before

    first = build(LAM, y)
    assert traces_during(lambda: optsens.taylor_expansion(first, 4, "jet").derivatives(1.0)) > 0
    again = optsens.taylor_expansion(first, 4, "jet")
    assert traces_during(lambda: again.derivatives(-3.0)) == 0
    assert traces_during(lambda: again(LAM + 0.5)) == 0
    other = build(5.0, y[::-1].copy())  # new theta0, eps0 and data, same function and shapes
    assert traces_during(lambda: optsens.taylor_expansion(other, 4, "jet").derivatives(2.0)) == 0


def test_bad_arguments(ridge_eq):
    _, _, eq = ridge_eq
    for order in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="`order` must be a positive integer"):
            optsens.taylor_expansion(eq, order)
    with pytest.raises(ValueError, match="`method`"):
        optsens.taylor_expansion(eq, 2, method="taylor")
    with pytest.raises(TypeError, match="`eq`"):
        optsens.taylor_expansion("eq", 2)
    with pytest.raises(TypeError, match="`qoi`"):
        optsens.taylor_expansion(eq, 2, qoi=3)
    ts = optsens.taylor_expansion(eq, 2)
    with pytest.raises(optsens.OptsensError, match="`v` must be a pytree shaped like `eps0`"):
        ts.derivatives(jnp.ones(2))
    with pytest.raises(optsens.OptsensError, match="`eps`"):
        ts({"lam": 1.0})
    with pytest.raises(ValueError, match="above the order"):
        ts(LAM, order=3)


def test_float32_warns_at_order_two():
    def g(theta, eps):
        return theta - eps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eq = optsens.EstimatingEquation(g, jnp.ones(2, jnp.float32), jnp.float32(1.0))
    with pytest.warns(optsens.PrecisionWarning, match="float64"):
        optsens.taylor_expansion(eq, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optsens.taylor_expansion(eq, 1)


def test_coefficients_are_normalised(ridge_eq):
    x, y, eq = ridge_eq
    ts = optsens.taylor_expansion(eq, 3)
    for k, c in enumerate(ts.coefficients(1.0), start=1):
        np.testing.assert_allclose(c * math.factorial(k), ridge_derivative(x, y, LAM, k), rtol=1e-10)
