"""Small problems with known answers, shared by the tests."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def ridge_data(n=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)
    return x, y


def ridge_equation(theta, lam, x, y):
    """Normal equations of ridge regression: X^T (X theta - y) + lam theta."""
    return x.T @ (x @ theta - y) + lam * theta


def ridge_objective(theta, lam, x, y):
    r = x @ theta - y
    return 0.5 * r @ r + 0.5 * lam * theta @ theta


def ridge_solution(x, y, lam):
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def ridge_derivative(x, y, lam, k):
    """d^k/dlam^k (A + lam I)^{-1} b = (-1)^k k! (A + lam I)^{-(k+1)} b."""
    inv = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    return (-1) ** k * math.factorial(k) * np.linalg.matrix_power(inv, k + 1) @ (x.T @ y)


def logistic_data(n=120, d=4, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    p = 1 / (1 + np.exp(-(x @ rng.standard_normal(d))))
    y = (rng.random(n) < p).astype(float)
    return x, y


def logistic_objective(theta, log_lam, x, y):
    """Negative log-likelihood (written with logaddexp) plus exp(log_lam)/2 |theta|^2."""
    z = x @ theta
    return jnp.sum(jnp.logaddexp(0.0, z) - y * z) + 0.5 * jnp.exp(log_lam) * theta @ theta
