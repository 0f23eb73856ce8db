"""The condition-number estimate (LAPACK's Hager-Higham) and the Hessian's forward-mode fallback.

Truth: numpy's exact ``cond(H, 1)`` (from the explicit inverse). Hager's estimate of
``||H^{-1}||_1`` is a lower bound, and on these matrices exact or within a small
factor (Higham reports it within a factor 3 in almost all cases); the checks allow
a factor 10 below and nothing above (up to rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optsens
from optsens._condition import factorisation_condition
from optsens._linear import CholeskySolver, LUSolver


def _matrices():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 40, 150):
        a = rng.standard_normal((n, n))
        yield "spd", a @ a.T + n * np.eye(n)
        u, _ = np.linalg.qr(rng.standard_normal((n, n)))
        yield "spd-ill", (u * np.logspace(0, -9, n)) @ u.T
        yield "general", a + 0.1 * np.eye(n)
        yield "graded", np.diag(np.logspace(0, 6, n)) @ (np.eye(n) + 0.1 * rng.standard_normal((n, n)))
    # Higham's counterexample family for the plain vertex search (the safeguard's job).
    n = 30
    yield "kahan", np.triu(-np.ones((n, n)) * 0.9, 1) + np.eye(n)


@pytest.mark.parametrize("kind,h", list(_matrices()), ids=lambda x: x if isinstance(x, str) else "")
def test_estimate_brackets_the_exact_one_norm_condition_number(kind, h):
    exact = np.linalg.norm(h, 1) * np.linalg.norm(np.linalg.inv(h), 1)
    solver = CholeskySolver.factorise(jnp.asarray(h)) if kind.startswith("spd") else LUSolver.factorise(h)
    estimate = factorisation_condition(solver, np.linalg.norm(h, 1))
    assert estimate <= exact * (1 + 1e-8)
    assert estimate >= exact / 10, (kind, h.shape, estimate, exact)


def test_singular_and_non_finite_factorisations():
    h = np.ones((4, 4))
    estimate = factorisation_condition(LUSolver.factorise(h), 4.0)
    assert estimate == np.inf or estimate > 1e15
    h = np.diag([1.0, 0.0])  # exactly singular: U has a zero pivot
    assert factorisation_condition(LUSolver.factorise(h), 1.0) == np.inf
    nan_factor = CholeskySolver.factorise(-jnp.eye(2))  # Cholesky of a negative matrix: NaN
    assert np.isnan(factorisation_condition(nan_factor, 1.0))
    with pytest.raises(TypeError, match="dense factorisation"):
        factorisation_condition(object(), 1.0)


def test_float32_factor_uses_the_single_precision_routine():
    h = np.array([[4.0, 1.0], [1.0, 3.0]], np.float32)
    exact = np.linalg.norm(h, 1) * np.linalg.norm(np.linalg.inv(h), 1)
    estimate = factorisation_condition(CholeskySolver(jnp.linalg.cholesky(h)), float(np.linalg.norm(h, 1)))
    assert estimate == pytest.approx(exact, rel=1e-5)


def test_condition_number_recorded_by_the_equation_is_the_one_norm_estimate():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)) @ np.diag([1.0, 10.0, 100.0, 1000.0])
    y = rng.standard_normal(50)
    theta0 = np.linalg.solve(x.T @ x, x.T @ y)
    eq = optsens.EstimatingEquation.from_objective(
        lambda t, e, x, y: 0.5 * jnp.sum((y - x @ t) ** 2) + 0.0 * e, theta0, 0.0, args=(x, y)
    )
    exact = np.linalg.cond(x.T @ x, 1)
    assert exact / 10 <= eq.condition_number <= exact * (1 + 1e-8)


@jax.custom_vjp
def _square(x):
    return x**2


def _square_fwd(x):
    return x**2, x


def _square_bwd(x, g):
    # 2 x g accumulated by a while loop: reverse mode cannot go through this backward
    # pass again, forward mode can.
    def body(carry):
        i, acc = carry
        return i + 1, acc + x * g

    return (jax.lax.while_loop(lambda c: c[0] < 2, body, (0, jnp.zeros_like(x)))[1],)


_square.defvjp(_square_fwd, _square_bwd)


def test_hessian_falls_back_to_forward_mode_when_reverse_over_reverse_fails():
    def f(theta, eps):
        return jnp.sum(_square(theta)) - 2.0 * eps * jnp.sum(theta)  # minimum at theta = eps

    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.jacrev(jax.grad(f))(jnp.ones(3), 1.0)
    eq = optsens.EstimatingEquation.from_objective(f, jnp.full(3, 0.5), 0.5)
    np.testing.assert_array_equal(eq.hessian(), 2.0 * np.eye(3))
    assert eq.newton_step_norm == 0.0
