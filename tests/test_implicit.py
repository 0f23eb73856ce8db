"""implicit_optimum: derivatives of every order and mode against closed forms.

Truth: ridge regression, ``theta(lam) = (A + lam I)^{-1} b`` with
``d^k theta / d lam^k = (-1)^k k! (A + lam I)^{-(k+1)} b``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optsens
from tests._problems import ridge_data, ridge_derivative, ridge_equation, ridge_objective, ridge_solution

LAM = 2.0


@pytest.fixture(scope="module")
def ridge():
    x, y = ridge_data()
    eq = optsens.EstimatingEquation.from_objective(
        ridge_objective, ridge_solution(x, y, LAM), LAM, args=(x, y)
    )
    return x, y, optsens.implicit_optimum(eq)


def test_value_and_first_derivative(ridge):
    x, y, theta_hat = ridge
    np.testing.assert_allclose(theta_hat(LAM), ridge_solution(x, y, LAM), rtol=1e-12)
    np.testing.assert_allclose(jax.jacfwd(theta_hat)(LAM), ridge_derivative(x, y, LAM, 1), rtol=1e-11)
    np.testing.assert_allclose(jax.jacrev(theta_hat)(LAM), ridge_derivative(x, y, LAM, 1), rtol=1e-11)


def test_second_derivative_every_mode(ridge):
    x, y, theta_hat = ridge
    want = ridge_derivative(x, y, LAM, 2)
    for name, fn in {
        "hessian": jax.hessian(theta_hat),
        "jacrev(jacrev)": jax.jacrev(jax.jacrev(theta_hat)),
        "jacfwd(jacrev)": jax.jacfwd(jax.jacrev(theta_hat)),
        "jit(jacfwd(jacfwd))": jax.jit(jax.jacfwd(jax.jacfwd(theta_hat))),
    }.items():
        np.testing.assert_allclose(fn(LAM), want, rtol=1e-10, err_msg=name)


def test_fourth_order_by_nesting(ridge):
    x, y, theta_hat = ridge
    f = theta_hat
    for _ in range(4):
        f = (lambda ff: lambda e: jax.jvp(ff, (e,), (1.0,))[1])(f)
    np.testing.assert_allclose(jax.jit(f)(LAM), ridge_derivative(x, y, LAM, 4), rtol=1e-10)


def test_jit_vmap_jvp_and_grad_of_a_scalar(ridge):
    x, y, theta_hat = ridge
    d1 = ridge_derivative(x, y, LAM, 1)
    tangents = jnp.array([1.0, -2.0, 0.5])
    out = jax.jit(jax.vmap(lambda t: jax.jvp(theta_hat, (LAM,), (t,))[1]))(tangents)
    np.testing.assert_allclose(out, tangents[:, None] * d1, rtol=1e-11)
    # d/dlam |theta|^2 = 2 theta . theta'
    grad = jax.grad(lambda e: jnp.sum(theta_hat(e) ** 2))(LAM)
    np.testing.assert_allclose(grad, 2 * ridge_solution(x, y, LAM) @ d1, rtol=1e-11)


def test_general_equation_uses_transpose_solve_in_reverse_mode():
    """A non-symmetric G: reverse mode needs H^{-T}, not H^{-1}."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    b = rng.standard_normal(4)

    def g(theta, eps):  # theta solves (A + eps diag(1..4)) theta = b
        return (a + eps * np.diag(np.arange(1.0, 5.0))) @ theta - b

    theta0 = np.linalg.solve(a, b)
    theta_hat = optsens.implicit_optimum(optsens.EstimatingEquation(g, theta0, 0.0))
    want = -np.linalg.solve(a, np.diag(np.arange(1.0, 5.0)) @ theta0)
    np.testing.assert_allclose(jax.jacrev(theta_hat)(0.0), want, rtol=1e-11)
    np.testing.assert_allclose(jax.jacfwd(theta_hat)(0.0), want, rtol=1e-11)


def test_pytree_eps_and_theta():
    def f(theta, eps):
        return (
            0.5 * jnp.exp(eps["s"]) * jnp.sum(theta["a"] ** 2)
            + jnp.sum(theta["a"] * eps["t"])
            + (0.5 * (theta["c"] - eps["s"]) ** 2)
        )

    eps0 = {"s": 0.0, "t": jnp.array([1.0, -1.0])}
    theta0 = {"a": -eps0["t"], "c": jnp.asarray(0.0)}
    theta_hat = optsens.implicit_optimum(optsens.EstimatingEquation.from_objective(f, theta0, eps0))
    jac = jax.jacfwd(theta_hat)(eps0)
    # a = -t exp(-s): da/ds = t exp(-s) = t, da/dt = -I; c = s.
    np.testing.assert_allclose(jac["a"]["s"], eps0["t"], rtol=1e-12)
    np.testing.assert_allclose(jac["a"]["t"], -np.eye(2), rtol=1e-12)
    np.testing.assert_allclose(jac["c"]["s"], 1.0, rtol=1e-12)


def test_called_away_from_eps0_raises(ridge):
    _, _, theta_hat = ridge
    with pytest.raises(optsens.OptsensError, match="taylor_expansion"):
        theta_hat(LAM + 1.0)
    with pytest.raises(optsens.OptsensError, match="shaped like `eps0`"):
        theta_hat(jnp.ones(3))


def test_general_equation_entry_point():
    x, y = ridge_data()
    eq = optsens.EstimatingEquation(ridge_equation, ridge_solution(x, y, LAM), LAM, args=(x, y))
    np.testing.assert_allclose(
        jax.hessian(optsens.implicit_optimum(eq))(LAM), ridge_derivative(x, y, LAM, 2), rtol=1e-10
    )
