"""EstimatingEquation: construction, pytrees, checks and their messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optsens
from tests._problems import (
    logistic_data,
    logistic_objective,
    ridge_data,
    ridge_derivative,
    ridge_equation,
    ridge_objective,
    ridge_solution,
)


def test_objective_uses_cholesky_and_equation_uses_lu():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    eq_obj = optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y))
    eq_g = optsens.EstimatingEquation(ridge_equation, theta0, 1.0, args=(x, y))
    assert eq_obj.solver_name == "cholesky" and eq_g.solver_name == "lu"
    np.testing.assert_allclose(eq_obj.hessian(), x.T @ x + np.eye(5), rtol=1e-13)
    b = np.arange(5.0)
    np.testing.assert_allclose(eq_obj.solve(b), np.linalg.solve(x.T @ x + np.eye(5), b), rtol=1e-12)
    # The Newton step of an exact solution is at rounding level.
    assert eq_obj.newton_step_norm < 1e-12
    assert 1 < eq_obj.condition_number < 1e4
    assert "cholesky" in repr(eq_obj)


def test_pytree_theta_and_eps():
    """theta = {matrix, vector}, eps = {scalar, vector}: flattened inside, pytrees out."""
    rng = np.random.default_rng(0)
    target_w, target_b = rng.standard_normal((3, 2)), rng.standard_normal(2)

    def f(theta, eps):
        return (
            0.5 * jnp.exp(eps["a"]) * jnp.sum((theta["w"] - target_w) ** 2)
            + 0.5 * jnp.sum((theta["b"] - target_b - eps["shift"]) ** 2)
            + 0.1 * jnp.sum(theta["w"] ** 4)
        )

    eps0 = {"a": 0.0, "shift": jnp.zeros(2)}
    theta0 = optsens.newton_solve(f, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, eps0, objective=True)
    eq = optsens.EstimatingEquation.from_objective(f, theta0, eps0)
    g = eq.equation(theta0, eps0)
    assert g["w"].shape == (3, 2) and g["b"].shape == (2,)
    assert eq.hessian().shape == (8, 8)


def test_integer_inputs_are_promoted():
    x, y = ridge_data()
    eq = optsens.EstimatingEquation(ridge_equation, ridge_solution(x, y, 1.0), 1, args=(x, y))
    assert eq.eps0.dtype == jnp.float64


def test_not_a_solution_reports_residual_and_remedy():
    x, y = ridge_data()
    theta = ridge_solution(x, y, 1.0) + 1e-3
    with pytest.raises(optsens.NotASolutionError, match=r"Newton step.*residual_rtol"):
        optsens.EstimatingEquation(ridge_equation, theta, 1.0, args=(x, y))
    # A looser tolerance accepts it.
    eq = optsens.EstimatingEquation(ridge_equation, theta, 1.0, args=(x, y), residual_rtol=1e-2)
    assert eq.newton_step_norm > 1e-4


def test_singular_hessian_names_the_near_null_direction():
    x, y = ridge_data()
    x = np.column_stack([x, x[:, 0]])  # collinear columns: X^T X singular

    def g(theta, lam):
        return x.T @ (x @ theta - y) + lam * theta

    theta0 = np.linalg.lstsq(x, y, rcond=None)[0]
    with pytest.raises(optsens.SingularHessianError, match=r"\[0\].*\[5\]|\[5\].*\[0\]"):
        optsens.EstimatingEquation(g, theta0, 0.0)


def test_saddle_point_is_not_a_minimum():
    def f(theta, eps):
        return theta[0] ** 2 - theta[1] ** 2 + eps * theta[0]

    with pytest.raises(optsens.IndefiniteHessianError, match="saddle point"):
        optsens.EstimatingEquation.from_objective(f, jnp.zeros(2), 0.0)


def test_maximum_is_reported_as_such():
    def f(theta, eps):
        return -jnp.sum(theta**2) + eps * theta[0]

    with pytest.raises(optsens.IndefiniteHessianError, match="maximum"):
        optsens.EstimatingEquation.from_objective(f, jnp.zeros(2), 0.0)


def test_non_finite_inputs_and_values():
    x, y = logistic_data()
    y_bad = y.copy()
    y_bad[3] = np.nan
    with pytest.raises(optsens.NonFiniteError):
        optsens.EstimatingEquation.from_objective(logistic_objective, jnp.zeros(4), 0.0, args=(x, y_bad))

    def g(theta, eps):
        return jnp.log(theta) + eps

    with pytest.raises(optsens.NonFiniteError, match="non-finite"):
        optsens.EstimatingEquation(g, jnp.array([0.0, 1.0]), 0.0)


def test_bad_arguments_are_named():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    with pytest.raises(TypeError, match="`g` must be a function"):
        optsens.EstimatingEquation("not a function", theta0, 1.0)
    with pytest.raises(ValueError, match="`solver`"):
        optsens.EstimatingEquation(ridge_equation, theta0, 1.0, args=(x, y), solver="qr")
    with pytest.raises(TypeError, match="`args` must be a tuple"):
        optsens.EstimatingEquation(ridge_equation, theta0, 1.0, args=x)
    with pytest.raises(ValueError, match="shaped like `theta0`"):
        optsens.EstimatingEquation(lambda th, e: th[:2], theta0, 1.0)
    with pytest.raises(ValueError, match="scalar objective"):
        optsens.EstimatingEquation.from_objective(lambda th, e: th, theta0, 1.0)
    with pytest.raises(ValueError, match="solver='lu'"):
        optsens.EstimatingEquation(ridge_equation, theta0, 1.0, args=(x, y), solver="cholesky")
    with pytest.raises(TypeError, match="`theta0`"):
        optsens.EstimatingEquation(ridge_equation, {"a": "text"}, 1.0, args=(x, y))


@pytest.mark.parametrize("solver", ["cg", "gmres"])
def test_matrix_free_solvers_match_dense(solver):
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    dense = optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y))
    free = optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y), solver=solver)
    b = np.linspace(-1, 1, 5)
    # The iterative solvers stop at rtol 1e-10 of the residual.
    np.testing.assert_allclose(free.solve(b), dense.solve(b), rtol=1e-8)
    d_dense = optsens.taylor_expansion(dense, 3).derivatives(1.0)
    d_free = optsens.taylor_expansion(free, 3).derivatives(1.0)
    for a, b in zip(d_free, d_dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7)


# ---------------------------------------------------------------- a given H
def test_given_hessian_is_used_and_gives_the_closed_form(monkeypatch):
    """With `hessian=` nothing forms H by autodiff (FlatProblem.hessian is disabled
    here); the derivatives are ridge regression's closed form."""
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)

    def no_autodiff_hessian(*args, **kwargs):
        raise AssertionError("H was formed by autodiff although it was given")

    monkeypatch.setattr(optsens._flat.FlatProblem, "hessian", no_autodiff_hessian)
    h = x.T @ x + np.eye(5)
    for make, fn in (
        (optsens.EstimatingEquation.from_objective, ridge_objective),
        (optsens.EstimatingEquation, ridge_equation),
    ):
        eq = make(fn, theta0, 1.0, args=(x, y), hessian=h)
        derivatives = optsens.taylor_expansion(eq, 3).derivatives(1.0)
        for k, d in enumerate(derivatives, start=1):
            np.testing.assert_allclose(d, ridge_derivative(x, y, 1.0, k), rtol=1e-11)
        assert 1 < eq.condition_number < 1e4


def test_given_hessian_follows_the_pytree_flattening_order():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, 4))
    m = a @ a.T + 4 * np.eye(4)  # f = 1/2 z^T M z - eps b^T z with z = (w.ravel(), c)
    b = rng.standard_normal(4)

    def f(theta, eps):
        z = jnp.concatenate([theta["c"], theta["w"].ravel()])  # dict leaves: c before w
        return 0.5 * z @ m @ z - eps * b @ z

    z0 = np.linalg.solve(m, b)
    theta0 = {"c": z0[:1], "w": z0[1:].reshape(1, 3)}
    eq = optsens.EstimatingEquation.from_objective(f, theta0, 1.0, hessian=m)
    np.testing.assert_allclose(eq.solve({"c": b[:1], "w": b[1:].reshape(1, 3)})["w"].ravel(),
                               np.linalg.solve(m, b)[1:], rtol=1e-12)  # fmt: skip
    perm = [1, 2, 3, 0]  # the same matrix with rows and columns in another order
    with pytest.raises(ValueError, match="does not match dG/dtheta"):
        optsens.EstimatingEquation.from_objective(f, theta0, 1.0, hessian=m[np.ix_(perm, perm)])


def test_bad_given_hessian_is_reported():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    h = x.T @ x + np.eye(5)
    with pytest.raises(ValueError, match=r"does not match dG/dtheta .* = \d"):
        optsens.EstimatingEquation.from_objective(
            ridge_objective, theta0, 1.0, args=(x, y), hessian=1.001 * h
        )
    with pytest.raises(ValueError, match=r"must be the \(5, 5\) matrix .* got shape \(4, 4\)"):
        optsens.EstimatingEquation.from_objective(
            ridge_objective, theta0, 1.0, args=(x, y), hessian=h[:4, :4]
        )
    with pytest.raises(ValueError, match="needs a dense solver"):
        optsens.EstimatingEquation.from_objective(
            ridge_objective, theta0, 1.0, args=(x, y), hessian=h, solver="cg"
        )
    with pytest.raises(TypeError, match="`hessian` must be a"):
        optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y), hessian="H")
    with pytest.raises(optsens.NonFiniteError, match="non-finite entries"):
        optsens.EstimatingEquation.from_objective(
            ridge_objective, theta0, 1.0, args=(x, y), hessian=np.where(np.eye(5) > 0, np.nan, h)
        )


def test_given_hessian_under_jit_is_checked_at_run_time():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    h = jnp.asarray(x.T @ x + np.eye(5))

    @jax.jit
    def derivative(h):
        eq = optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y), hessian=h)
        return optsens.taylor_expansion(eq, 2).derivatives(1.0)[1]

    np.testing.assert_allclose(derivative(h), ridge_derivative(x, y, 1.0, 2), rtol=1e-11)
    with pytest.raises(Exception, match="the `hessian` passed does not match"):
        jax.block_until_ready(derivative(1.01 * h))


def test_given_float64_hessian_keeps_float32_theta_in_float32():
    x, y = ridge_data()
    h = x.T @ x + np.eye(5)  # NumPy float64
    theta0 = jnp.asarray(np.linalg.solve(h, x.T @ y), jnp.float32)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    eq = optsens.EstimatingEquation.from_objective(
        ridge_objective, theta0, jnp.float32(1.0), args=args, hessian=h, residual_rtol=1e-4
    )
    d1 = optsens.taylor_expansion(eq, 1).derivatives(jnp.float32(1.0))[0]
    assert d1.dtype == jnp.float32
    np.testing.assert_allclose(d1, ridge_derivative(x, y, 1.0, 1), rtol=1e-4)
    assert jax.jacfwd(optsens.implicit_optimum(eq))(jnp.float32(1.0)).dtype == jnp.float32
