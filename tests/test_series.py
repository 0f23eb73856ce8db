"""Taylor-mode propagation (`optsens._series`) against nested forward mode.

Truth: `k` nested `jax.jvp` of ``t -> f(x0 + t dx)`` divided by ``k!`` — an
independent computation of the same coefficients. Agreement is to a few ulps of
the coefficient's size (relative 1e-12 leaves room for ~10^3 roundings).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import jet
from jax.scipy.special import digamma, gammaln, polygamma

from optsens._series import propagate_function_series

ORDER = 6


def nested_coefficients(f, x0, dx, order):
    out, h = [], lambda t: f(x0 + t * dx)
    for k in range(1, order + 1):
        h = (lambda hh: lambda t: jax.jvp(hh, (t,), (1.0,))[1])(h)
        out.append(jax.jit(h)(0.0) / math.factorial(k))
    return out


@jax.custom_jvp
def clipped_cube(x):
    return jnp.where(x > 0, x**3, 0.0)


@clipped_cube.defjvp
def _clipped_cube_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return clipped_cube(x), jnp.where(x > 0, 3 * x**2, 0.0) * dx


FUNCTIONS = {
    "softplus": jax.nn.softplus,
    "logaddexp": lambda x: jnp.logaddexp(x, 2.0 * x - 1.0),
    "gammaln": lambda x: gammaln(x + 3.0),
    "digamma": lambda x: digamma(x + 3.0),
    "polygamma": lambda x: polygamma(1, x + 2.0),
    "user custom_jvp": lambda x: clipped_cube(x + 1.5),
    "fori_loop": lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c * jnp.tanh(c) + x, x),
    "cond": lambda x: jax.lax.cond(jnp.sum(x) > 0, jnp.exp, lambda z: z**3, x),
    "matmul + log_softmax": lambda x: jax.nn.log_softmax(jnp.outer(x, x) @ x),
    "jit inside": jax.jit(lambda x: jnp.sin(x) * jnp.exp(-(x**2))),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_matches_nested_forward_mode(name):
    f = FUNCTIONS[name]
    x0 = jnp.array([0.1, 0.3, -1.2])
    dx = jnp.array([1.0, -0.5, 0.7])
    series = [dx] + [jnp.zeros(3)] * (ORDER - 1)
    primal, (out_series,) = jax.jit(lambda x, s: propagate_function_series(f, [x], [s], ORDER))(x0, series)
    np.testing.assert_allclose(primal[0], f(x0), rtol=1e-14)
    for got, want in zip(out_series, nested_coefficients(f, x0, dx, ORDER), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_exact_at_kinks_and_ties():
    """softplus'(0) = 1/2 and logaddexp(x, x)' come from the JVP rules, not from the
    primal code (which branches at the tie and would give the wrong slope)."""
    for f in (jax.nn.softplus, lambda x: jnp.logaddexp(x, -x)):
        x0, dx = jnp.zeros(1), jnp.ones(1)
        series = [dx] + [jnp.zeros(1)] * 3
        _, (out,) = propagate_function_series(f, [x0], [series], 4)
        for got, want in zip(out, nested_coefficients(f, x0, dx, 4), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-16)
    _, (out,) = propagate_function_series(jax.nn.softplus, [jnp.zeros(1)], [[jnp.ones(1)]], 1)
    assert float(out[0][0]) == 0.5


def test_stock_jet_fails_where_optsens_does_not():
    """Why the interpreter exists: jax.experimental.jet has no rule for lgamma and
    ignores custom JVP rules."""
    with pytest.raises(Exception):
        jet.jet(lambda x: gammaln(x), (2.0,), ((1.0, 0.0),))
    _, (out,) = propagate_function_series(gammaln, [jnp.asarray(2.0)], [[1.0, 0.0]], 2)
    np.testing.assert_allclose(out[1], 0.5 * float(polygamma(1, 2.0)), rtol=1e-14)


def test_constant_inputs_and_integer_outputs():
    """Inputs without a series are never differentiated; integer outputs carry none."""

    def f(x, n):
        return polygamma(n, x + 2.0), jnp.argmax(x)

    x0, dx = jnp.array([0.5, 1.0]), jnp.array([1.0, 2.0])
    primal, series = propagate_function_series(f, [x0, jnp.asarray(1)], [[dx, 0 * dx], None], 2)
    assert series[1] is None
    want = nested_coefficients(lambda x: f(x, 1)[0], x0, dx, 2)
    np.testing.assert_allclose(series[0][1], want[1], rtol=1e-12)
