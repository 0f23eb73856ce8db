"""Higher-order leave-out and bootstrap series from the core engine.

Leaving out a fold ``S`` is the path ``w(t) = w - t w 1_S``; a bootstrap draw is
``w(t) = w + t w (counts - 1)``. Either is an `EstimatingEquation` in ``t``
(`WeightPath`) whose fold or draw is a traced argument, so `taylor_expansion` (one
factorisation of ``H``, the Taylor recursion ``theta_k = -H^{-1} r_k``) runs for a
whole block of folds in one vmapped, compiled kernel. No second implementation of
the recursion lives here.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ._folds import _draw_counts
from ._problem import EstimatingEquation
from ._taylor import taylor_expansion
from ._weights_model import ObservationModel, WeightPath

__all__ = [
    "bootstrap_series_kernel",
    "build_path_equation",
    "fold_equation",
    "fold_series_kernel",
    "resolve_method",
    "with_args",
]


@eqx.filter_jit
def build_path_equation(path: WeightPath, kind: str, theta0, data, w, idx, delta, hessian, residual_rtol):
    """The core `EstimatingEquation` of the weight path, built under `jit` from the
    full-data ``H`` that `MEstimator` already formed and checked (at ``t = 0`` the
    path's ``H`` is that one), with `MEstimator`'s own `residual_rtol` for the
    compiled-in checks."""
    eps0 = jnp.zeros((), w.dtype)
    solver = "cholesky" if kind == "loss" else "lu"
    make = EstimatingEquation.from_objective if kind == "loss" else EstimatingEquation
    args = (data, w, idx, delta)
    return make(path, theta0, eps0, args=args, solver=solver, hessian=hessian, residual_rtol=residual_rtol)


def fold_equation(model: ObservationModel, theta0, data, w, idx, delta, **checks) -> EstimatingEquation:
    """The `EstimatingEquation` of one fold's path, built eagerly with the core's own
    checks (`checks`: `residual_rtol`, `cond_max`)."""
    path = WeightPath(model)
    eps0 = jnp.zeros((), w.dtype)
    if model.kind == "loss":
        return EstimatingEquation.from_objective(path, theta0, eps0, args=(data, w, idx, delta), **checks)
    return EstimatingEquation(path, theta0, eps0, args=(data, w, idx, delta), **checks)


def with_args(eq: EstimatingEquation, args: tuple) -> EstimatingEquation:
    """`eq` with other traced arguments (another fold or draw)."""
    return eqx.tree_at(lambda e: e.args, eq, args)


def resolve_method(eq: EstimatingEquation, order: int, taylor_method: str) -> str:
    """The core engine's concrete method for ``"auto"`` (decided once, outside jit)."""
    return taylor_expansion(eq, order, taylor_method).method_used


def _series(eq: EstimatingEquation, order: int, method: str) -> jax.Array:
    """``[theta_1, ..., theta_K]`` at ``t = 1`` along ``v = 1`` from the core engine: (K, D)."""
    ts = taylor_expansion(eq, order, method)
    coefficients = ts.coefficients(jnp.ones((), eq.theta0_flat.dtype))
    return jnp.stack([eq.problem.theta.ravel(c) for c in coefficients])


@eqx.filter_jit
def fold_series_kernel(eq: EstimatingEquation, order: int, method: str, idx, delta):
    """Taylor coefficients of a block of folds, (F, K, D); the fold is a traced argument."""
    data, w = eq.args[0], eq.args[1]
    return jax.vmap(lambda i, d: _series(with_args(eq, (data, w, i, d)), order, method))(idx, delta)


@eqx.filter_jit
def bootstrap_series_kernel(eq: EstimatingEquation, order: int, method: str, keys):
    """Taylor coefficients of a block of bootstrap draws, (B, K, D)."""
    data, w = eq.args[0], eq.args[1]
    n = w.shape[0]

    def one(key):
        delta = w * (_draw_counts(key, n) - 1).astype(w.dtype)
        return _series(with_args(eq, (data, w, None, delta)), order, method)

    return jax.vmap(one)(keys)
