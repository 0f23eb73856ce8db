"""No silent wrong answer: every bad input raises (or warns) with a message that
names the argument, says what was received and how to fix it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optsens
from tests._problems import ridge_data, ridge_equation, ridge_objective, ridge_solution

X, Y = ridge_data(n=20, d=3)
THETA0 = ridge_solution(X, Y, 1.0)


@pytest.fixture(scope="module")
def eq():
    return optsens.EstimatingEquation(ridge_equation, THETA0, 1.0, args=(X, Y))


@pytest.fixture(scope="module")
def ts(eq):
    return optsens.taylor_expansion(eq, 3)


# ------------------------------------------------------------ theta0, H, G
def test_theta0_not_a_solution_gives_the_residual_and_the_remedy():
    with pytest.raises(optsens.NotASolutionError) as info:
        optsens.EstimatingEquation(ridge_equation, THETA0 + 1e-3, 1.0, args=(X, Y))
    msg = str(info.value)
    assert "`theta0` does not solve the equation at `eps0`" in msg
    assert "has norm 0.04" in msg and "has size 0.001" in msg  # the residual and the Newton step
    assert "`residual_rtol`" in msg and "tighter tolerance" in msg and "newton_solve" in msg


def test_exactly_singular_hessian_reports_the_near_null_direction():
    x = np.column_stack([X[:, 0], X[:, 1], X[:, 0] + X[:, 1]])  # collinear columns
    theta0 = np.linalg.lstsq(x, Y, rcond=None)[0]  # the minimum-norm least-squares fit
    with pytest.raises(optsens.SingularHessianError) as info:
        optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 0.0, args=(x, Y))
    msg = str(info.value)
    assert "numerically singular: condition number ~" in msg
    assert "near-null direction, whose largest entries are" in msg
    for name in ("theta[0]", "theta[1]", "theta[2]"):
        assert name in msg
    assert "+0.577" in msg or "-0.577" in msg  # (1, 1, -1) / sqrt(3)
    assert "Add a penalty" in msg and "`cond_max`" in msg


def test_numerically_singular_hessian_reports_the_condition_number():
    x = np.column_stack([X[:, 0], X[:, 1], X[:, 0] + 1e-7 * X[:, 2]])  # nearly collinear
    theta0 = np.linalg.solve(x.T @ x, x.T @ Y)
    with pytest.raises(optsens.SingularHessianError, match=r"condition number ~ \d\.\d+e\+1[3-6]"):
        optsens.EstimatingEquation(ridge_equation, theta0, 0.0, args=(x, Y))
    # A better conditioned variant passes, and its condition number is recorded.
    x = np.column_stack([X[:, 0], X[:, 1], X[:, 0] + 1e-2 * X[:, 2]])
    eq = optsens.EstimatingEquation(ridge_equation, np.linalg.solve(x.T @ x, x.T @ Y), 0.0, args=(x, Y))
    assert 1e3 < eq.condition_number < 1e12


def test_saddle_point_is_not_a_minimum():
    def saddle(theta, eps):
        return 0.5 * theta[0] ** 2 - 0.5 * theta[1] ** 2 + eps * theta[0]

    with pytest.raises(optsens.IndefiniteHessianError) as info:
        optsens.EstimatingEquation.from_objective(saddle, jnp.zeros(2), 0.0)
    msg = str(info.value)
    assert "not positive definite: 1 of 2 eigenvalues are negative" in msg
    assert "a saddle point of `f`, not a minimum" in msg
    assert "theta[1]: " in msg  # the direction of negative curvature
    assert "pass its negative" in msg


def test_non_finite_hessian():
    with pytest.raises(optsens.NonFiniteError, match=r"H = dG/dtheta .* non-finite entries, in the rows of"):
        optsens.EstimatingEquation(lambda t, e: jnp.sqrt(t) - e, jnp.zeros(2), 0.0)


def test_nan_in_the_data_raises():
    x = X.copy()
    x[3, 1] = np.nan
    with pytest.raises(optsens.NonFiniteError, match=r"`args\[0\]` has 1 non-finite entries .*\[\[3, 1\]\]"):
        optsens.EstimatingEquation(ridge_equation, THETA0, 1.0, args=(x, Y))


def test_non_finite_g_is_reported():
    def g(theta, eps):
        return theta - eps + jnp.where(theta[0] > -1, jnp.inf, 0.0)  # finite derivative, infinite value

    with pytest.raises(optsens.NonFiniteError, match=r"G\(theta0, eps0\) is not finite .*NaN or infinite"):
        optsens.EstimatingEquation(g, jnp.zeros(2), 0.0)


def test_non_finite_derivatives_are_reported():
    # theta_hat(eps) = sqrt(eps): G is fine at eps0 = 0, dG/deps is infinite.
    eq = optsens.EstimatingEquation(lambda t, e: t - jnp.sqrt(e), jnp.zeros(2), 0.0)
    ts = optsens.taylor_expansion(eq, 2)
    with pytest.raises(optsens.NonFiniteError, match=r"Taylor coefficients of order \[1, 2\] are not finite"):
        ts.coefficients(1.0)
    with pytest.raises(optsens.NonFiniteError):
        ts(0.5)
    with pytest.raises(optsens.NonFiniteError):
        ts.trust(0.5)


def test_non_finite_eps_is_not_returned_as_numbers(ts):
    with pytest.raises(optsens.NonFiniteError, match=r"`eps` has non-finite entries.*pass finite values"):
        ts(np.nan)
    with pytest.raises(optsens.NonFiniteError, match=r"`v` has non-finite entries"):
        ts.derivatives(np.inf)
    with pytest.raises(optsens.NonFiniteError):
        ts.error_estimate(np.inf)


def test_non_finite_theta0_and_eps0_are_named():
    bad = THETA0.copy()
    bad[1] = np.nan
    with pytest.raises(optsens.NonFiniteError, match=r"`theta0` has 1 non-finite entries"):
        optsens.EstimatingEquation(ridge_equation, bad, 1.0, args=(X, Y))
    with pytest.raises(optsens.NonFiniteError, match=r"`eps0\['lam'\]` has 1 non-finite"):
        optsens.EstimatingEquation(
            lambda t, e, x, y: ridge_equation(t, e["lam"], x, y), THETA0, {"lam": np.inf}, args=(X, Y)
        )


def test_non_finite_coefficients_passed_to_the_trust_helpers():
    with pytest.raises(optsens.NonFiniteError, match="non-finite Taylor coefficients"):
        optsens.estimate_radius(np.array([[1.0, np.inf], [0.5, 0.1]]))


# ------------------------------------------------------- structure and shape
def test_g_must_return_the_structure_of_theta0():
    with pytest.raises(ValueError, match=r"must return a pytree shaped like `theta0`; it returned \(2,\)"):
        optsens.EstimatingEquation(lambda t, e: t[:2], THETA0, 1.0)
    with pytest.raises(KeyError, match=r"calling `g\(theta0, eps0, \*args\)` failed"):
        optsens.EstimatingEquation(lambda t, e: {"a": t["a"], "b": t["b"]}, {"a": jnp.zeros(2)}, 0.0)


def test_theta0_and_eps0_that_do_not_fit_g():
    with pytest.raises(TypeError, match=r"calling `g\(theta0, eps0, \*args\)` failed: .*incompatible shapes"):
        optsens.EstimatingEquation(lambda t, e: t - e, jnp.zeros(2), jnp.zeros(3))


@pytest.mark.parametrize(
    "bad",
    [np.ones(2), {"lam": 1.0}, [1.0, 2.0]],
    ids=["wrong-size", "wrong-structure", "list"],
)
def test_direction_and_eps_must_be_shaped_like_eps0(ts, bad):
    with pytest.raises(optsens.OptsensError, match=r"`v` must be a pytree shaped like `eps0`: expected"):
        ts.coefficients(bad)
    with pytest.raises(optsens.OptsensError, match=r"`v` must be a pytree shaped like `eps0`"):
        ts.derivatives(bad)
    with pytest.raises(optsens.OptsensError, match=r"`v` must be a pytree shaped like `eps0`"):
        ts.radius(bad)
    for call in (ts, ts.error_estimate, ts.trust):
        with pytest.raises(optsens.OptsensError, match=r"`eps` must be a pytree shaped like `eps0`"):
            call(bad)


def test_pytree_mismatch_with_pytree_eps():
    def g(theta, eps):
        return {"a": theta["a"] - eps["s"], "b": theta["b"] + eps["s"] * eps["m"].sum()}

    eq = optsens.EstimatingEquation(g, {"a": jnp.zeros(2), "b": jnp.zeros(1)}, {"s": 0.0, "m": jnp.zeros(2)})
    ts = optsens.taylor_expansion(eq, 2)
    ts({"s": 0.1, "m": jnp.ones(2)})  # fine
    with pytest.raises(optsens.OptsensError, match=r"expected structure .* got .*shapes \[\(3,\), \(\)\]"):
        ts({"s": 0.1, "m": jnp.ones(3)})
    with pytest.raises(optsens.OptsensError, match="`eps` has 2 entries but `eps0` has 3"):
        optsens.implicit_optimum(eq)(jnp.ones(2))


# ---------------------------------------------------------- dtypes and order
def test_float32_at_order_two_warns_about_precision():
    x32, y32 = X.astype(np.float32), Y.astype(np.float32)
    eq32 = optsens.EstimatingEquation(
        ridge_equation, THETA0.astype(np.float32), np.float32(1.0), args=(x32, y32), residual_rtol=1e-3
    )
    optsens.taylor_expansion(eq32, 1)  # first order: no warning
    with pytest.warns(optsens.PrecisionWarning, match=r"`theta0` is float32: derivatives of order 2 .*x64"):
        optsens.taylor_expansion(eq32, 2)


def test_integer_inputs_are_promoted():
    eq = optsens.EstimatingEquation(lambda t, e: t - 2 * e, np.array([2, 4]), np.array([1, 2]))
    assert eq.theta0.dtype == jnp.float64 and eq.eps0.dtype == jnp.float64
    ts = optsens.taylor_expansion(eq, 2)
    np.testing.assert_allclose(ts(np.array([2, 3])), [4.0, 6.0])  # integer eps as well


@pytest.mark.parametrize("order", [0, -1, 1.5, True, "2", None])
def test_order_must_be_a_positive_integer(eq, order):
    with pytest.raises(ValueError, match=f"`order` must be a positive integer; got {order!r}"):
        optsens.taylor_expansion(eq, order)


def test_order_above_what_was_computed(ts):
    with pytest.raises(ValueError, match=r"`order`=5 is above the order of this expansion \(3\); build it"):
        ts(1.5, order=5)
    with pytest.raises(ValueError, match=r"`order`=4 is above the order of this expansion \(3\)"):
        ts.error_estimate(1.5, order=4)
    with pytest.raises(ValueError, match="`order` must be a non-negative integer; got -1"):
        ts(1.5, order=-1)


def test_trust_helpers_cannot_run_under_tracing(ts):
    with pytest.raises(optsens.OptsensError, match="cannot run under jax.jit"):
        jax.jit(lambda e: ts.error_estimate(e))(1.5)
    with pytest.raises(optsens.OptsensError, match="cannot run under jax.jit"):
        jax.vmap(lambda e: ts.trust(e).error_estimate)(jnp.array([1.5]))


def test_implicit_optimum_away_from_eps0(eq):
    with pytest.raises(optsens.OptsensError, match="different from `eps0`.*taylor_expansion"):
        optsens.implicit_optimum(eq)(2.0)


def test_newton_solve_that_does_not_converge():
    with pytest.raises(optsens.NotASolutionError, match=r"did not converge in `max_steps`=2 steps"):
        optsens.newton_solve(lambda t, e: jnp.exp(t) - e, jnp.zeros(1), 1e6, max_steps=2)


def test_bad_input_leaves_no_warning_behind(ts):
    # The helpers that inspect the coefficients never warn on good input.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.trust(1.2)
        ts.radius(1.0)
