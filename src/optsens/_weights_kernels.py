"""Jitted first-order kernels of `MEstimator`: per-observation influence, the
first-order (infinitesimal-jackknife) step of each fold or bootstrap draw, and the
held-out loss of cross-validation.

Per-observation work runs in chunks (`lax.map` with a batch size, or
`chunked_sum`), so memory never holds N x D x D (nor N x D for a scalar QoI beyond
its (N,) output). Folds and draws are vmapped; `map_blocks` feeds them in blocks.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ._batching import chunked_sum
from ._folds import _draw_counts
from ._linear import HessianSolver
from ._pytree import TreeLayout
from ._weights_model import ObservationModel

__all__ = [
    "bootstrap_ij_kernel",
    "fold_ij_kernel",
    "fold_sums",
    "held_out_loss_kernel",
    "influence_kernel",
    "qoi_influence_kernel",
]


@eqx.filter_jit
def influence_kernel(model: ObservationModel, h_inv, th, data, chunk: int):
    """``-H^{-1} g_n(theta0)`` for every observation: (N, D). With the explicit D x D
    inverse (from the factorisation) a chunk costs one matrix product; triangular
    solves with N right-hand sides are several times slower on CPU, for the same
    accuracy order (both ~ cond(H) * eps)."""
    return lax.map(lambda d: -(h_inv @ model.g(th, d)), data, batch_size=chunk)


@eqx.filter_jit
def qoi_influence_kernel(
    model: ObservationModel, solver: HessianSolver, th, data, qoi, out_layout: TreeLayout, chunk: int
):
    """``-(H^{-T} grad f)^T g_n(theta0)`` for every observation: (N, Q)."""
    jac = jax.jacrev(lambda t: out_layout.ravel(qoi(model.theta.unravel(t))))(th)  # (Q, D)
    u = solver.transpose_solve(jac.T)  # (D, Q): one solve per QoI output, not per observation
    if model.kind == "loss":
        # u^T g_n = d/ds loss_n(theta0 + s u): a forward pass, no per-observation gradient
        def per_obs(d):
            tangent = lambda col: jax.jvp(lambda t: model.loss(t, d), (th,), (col,))[1]  # noqa: E731
            return -jax.vmap(tangent, in_axes=1)(u)
    else:

        def per_obs(d):
            return -(model.g(th, d) @ u)

    return lax.map(per_obs, data, batch_size=chunk)


def fold_sums(model: ObservationModel, th, data, idx, coef, chunk: int, want_h: bool):
    """``sum_j coef_j g_{idx_j}(theta)`` (and the Hessian sum, or None) for one fold."""
    sub = jax.tree_util.tree_map(lambda a: a[idx], data)
    if want_h:
        return chunked_sum(lambda d, c: model.weighted_gh(th, d, c), sub, coef, chunk)
    return chunked_sum(lambda d, c: model.weighted_g(th, d, c), sub, coef, chunk), None


@eqx.filter_jit
def fold_ij_kernel(model: ObservationModel, h_inv, th, data, idx, coef, chunk: int):
    """Per fold (rows of `idx`, `coef`): the first-order step ``-H^{-1} g_S`` with
    ``g_S = sum_j coef_j g_{idx_j}(theta0)`` (coef = -w on the fold, 0 on padding)."""

    def one(i, c):
        return -(h_inv @ fold_sums(model, th, data, i, c, chunk, False)[0])

    return jax.vmap(one)(idx, coef)


@eqx.filter_jit
def bootstrap_ij_kernel(model: ObservationModel, h_inv, th, data, w, keys, chunk: int):
    """Per bootstrap draw: the first-order step along ``delta = w (counts - 1)``."""
    n = w.shape[0]

    def one(key):
        delta = w * (_draw_counts(key, n) - 1).astype(w.dtype)
        return -(h_inv @ chunked_sum(lambda d, c: model.weighted_g(th, d, c), data, delta, chunk))

    return jax.vmap(one)(keys)


@eqx.filter_jit
def held_out_loss_kernel(loss_fn, layout: TreeLayout, thetas, data, idx, weights):
    """``sum_j weights_j loss_fn(theta_f, datum_{idx_j})`` for a block of folds."""

    def one(th, i, c):
        sub = jax.tree_util.tree_map(lambda a: a[i], data)
        theta = layout.unravel(th)
        return jnp.sum(c * jax.vmap(lambda d: loss_fn(theta, d))(sub))

    return jax.vmap(one)(thetas, idx, weights)
