"""The whole pipeline under `jax.jit` / `jax.vmap`: same numbers, and the checks still fire.

Inside a jitted function nothing can be fetched to the host, so the construction's
checks run as compiled run-time errors (`equinox.error_if`). Truths: the eager
pipeline's derivatives (bit-for-bit: same compiled pieces), and ridge regression's
closed form.
"""

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


def _derivatives(f, theta0, eps0, args, order, kind="objective"):
    if kind == "objective":
        eq = optsens.EstimatingEquation.from_objective(f, theta0, eps0, args=args)
    else:
        eq = optsens.EstimatingEquation(f, theta0, eps0, args=args)
    return jnp.stack(optsens.taylor_expansion(eq, order).derivatives(jnp.ones_like(eps0)))


def test_jitted_pipeline_equals_eager_and_closed_form():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    jitted = jax.jit(_derivatives, static_argnums=(0, 4, 5))
    for kind, f in (("objective", ridge_objective), ("equation", ridge_equation)):
        got = jitted(f, theta0, jnp.asarray(1.0), (x, y), 4, kind)
        eager = _derivatives(f, theta0, jnp.asarray(1.0), (x, y), 4, kind)
        np.testing.assert_array_equal(got, eager)
        for k in range(1, 5):
            np.testing.assert_allclose(got[k - 1], ridge_derivative(x, y, 1.0, k), rtol=1e-10)


def test_vmapped_over_data_sets():
    """One compiled program for many data sets (e.g. simulated replicates)."""
    sets = [logistic_data(seed=s) for s in range(3)]
    xs, ys = jnp.stack([s[0] for s in sets]), jnp.stack([s[1] for s in sets])
    theta0s = jnp.stack(
        [optsens.newton_solve(logistic_objective, jnp.zeros(4), 0.0, args=s, objective=True) for s in sets]
    )
    batched = jax.vmap(lambda t, x, y: _derivatives(logistic_objective, t, jnp.asarray(0.0), (x, y), 3))
    got = batched(theta0s, xs, ys)
    for i, s in enumerate(sets):
        np.testing.assert_allclose(
            got[i], _derivatives(logistic_objective, theta0s[i], jnp.asarray(0.0), s, 3), rtol=1e-12
        )


def test_not_a_solution_raises_at_run_time():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0) + 0.01
    jitted = jax.jit(lambda t: _derivatives(ridge_objective, t, jnp.asarray(1.0), (x, y), 2))
    with pytest.raises(Exception, match="`theta0` does not solve the equation"):
        jax.block_until_ready(jitted(theta0))


def test_singular_hessian_raises_at_run_time():
    x, y = map(jnp.asarray, ridge_data())
    x = x.at[:, 2].set(x[:, 0])  # collinear columns; no penalty: H = X^T X singular
    theta0 = jnp.zeros(5)
    jitted = jax.jit(lambda t, x: _derivatives(lambda th, e, x, y: ridge_objective(th, 0.0 * e, x, y), t,
                                               jnp.asarray(1.0), (x, y), 2))  # fmt: skip
    with pytest.raises(Exception, match="the factorisation of H failed: H is singular"):
        jax.block_until_ready(jitted(theta0, x))


def test_non_finite_data_raise_at_run_time():
    x, y = map(jnp.asarray, ridge_data())
    theta0 = ridge_solution(x, y, 1.0)
    jitted = jax.jit(lambda y: _derivatives(ridge_objective, theta0, jnp.asarray(1.0), (x, y), 2))
    with pytest.raises(Exception, match="hold NaN or infinite values"):
        jax.block_until_ready(jitted(y.at[3].set(jnp.nan)))


def test_non_finite_coefficients_raise_at_run_time():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    eq = optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y))
    ts = optsens.taylor_expansion(eq, 3)
    with pytest.raises(Exception, match="Taylor coefficients are not finite"):
        jax.block_until_ready(jax.jit(lambda v: ts.derivatives(v))(jnp.asarray(jnp.nan)))


def test_exactly_singular_lu_is_a_factorisation_failure_under_jit():
    """LU of an exactly singular H stays finite (a zero pivot): still reported as a
    failed factorisation, not as a bad theta0."""
    a = jnp.array([[1.0, 2.0], [2.0, 4.0]])

    def g(theta, eps):
        return a @ theta - eps * jnp.array([1.0, 1.0])

    jitted = jax.jit(lambda t: _derivatives(g, t, jnp.asarray(0.0), (), 2, kind="equation"))
    with pytest.raises(Exception, match="the factorisation of H failed: H is singular"):
        jax.block_until_ready(jitted(jnp.zeros(2)))
    with pytest.raises(optsens.SingularHessianError):
        optsens.EstimatingEquation(g, jnp.zeros(2), 0.0)


def test_matrix_free_solver_is_checked_under_jit():
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)

    @jax.jit
    def derivative(t):
        eq = optsens.EstimatingEquation.from_objective(ridge_objective, t, 1.0, args=(x, y), solver="cg")
        return optsens.taylor_expansion(eq, 2).derivatives(1.0)[1]

    np.testing.assert_allclose(derivative(theta0), ridge_derivative(x, y, 1.0, 2), rtol=1e-7)
    with pytest.raises(Exception, match="`theta0` does not solve the equation"):
        jax.block_until_ready(derivative(theta0 + 0.5))


def test_automatic_matrix_free_choice_names_non_finite_data(monkeypatch):
    """solver='auto' resolving to CG (above the dense limit; lowered here) still names
    the offending argument."""
    monkeypatch.setattr(optsens._problem, "_DENSE_LIMIT", 3)
    x, y = ridge_data()
    theta0 = ridge_solution(x, y, 1.0)
    eq = optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y))
    assert eq.solver_name == "cg"
    y_bad = np.array(y)
    y_bad[2] = np.nan
    with pytest.raises(optsens.NonFiniteError, match=r"`args\[1\]` has 1 non-finite"):
        optsens.EstimatingEquation.from_objective(ridge_objective, theta0, 1.0, args=(x, y_bad))
