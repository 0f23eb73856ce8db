"""Approximate fits at many reweightings at once (folds left out, bootstrap draws):
the first-order, Newton-step and Taylor-series predictions behind `MEstimator`,
dispatched to the jitted kernels in memory-bounded blocks, with their checks.

Every function takes a `FitAtTheta0` (the checked fit every approximation starts
from) and returns flat arrays: steps ``theta_hat - theta0`` (F, D), series
coefficients (F, K, D), held-out losses (F,).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._batching import map_blocks
from ._errors import NonFiniteError, OptsensError
from ._folds import FoldIndex
from ._newton_step import (
    dense_bootstrap_kernel,
    dense_fold_kernel,
    draw_hessian_kernel,
    exact_curvature_left,
    fold_hessian_kernel,
    raise_if_not_identified,
    woodbury_fold_kernel,
)
from ._problem import EstimatingEquation
from ._weights_hessian import FullDataHessian
from ._weights_kernels import bootstrap_ij_kernel, fold_ij_kernel, held_out_loss_kernel
from ._weights_model import ObservationModel, WeightPath
from ._weights_series import (
    bootstrap_series_kernel,
    build_path_equation,
    fold_series_kernel,
    resolve_method,
    with_args,
)

__all__ = [
    "FitAtTheta0",
    "bootstrap_series",
    "bootstrap_steps",
    "check_finite_result",
    "fold_coef",
    "held_out_losses",
    "ij_steps",
    "leave_out_series",
    "newton_steps",
    "path_equation",
    "uses_woodbury",
    "warm_starts",
]


@dataclasses.dataclass(frozen=True)
class FitAtTheta0:
    """The fit at ``theta0``: model, flat parameters, data, weights, the checked and
    factorised full-data Hessian, the chunk sizes (Hessian- and gradient-level), and
    the model with its declared linear predictor (k outputs) or None."""

    model: ObservationModel
    th: jax.Array
    data: Any
    weights: jax.Array
    base: FullDataHessian
    chunk: int
    chunk_g: int
    low_rank_model: ObservationModel | None
    predictor_size: int

    @property
    def dim(self) -> int:
        return self.model.theta.size


def fold_coef(fit: FitAtTheta0, fi: FoldIndex) -> jax.Array:
    """``delta = -w`` on each fold's members, 0 on the padding: (F, m)."""
    w = np.asarray(fit.weights)
    return jnp.asarray(np.where(fi.valid, -w[fi.index], 0.0), fit.th.dtype)


def check_finite_result(out: jax.Array, what: str) -> None:
    bad = ~np.isfinite(np.asarray(out)).reshape(out.shape[0], -1).all(axis=1)
    if bad.any():
        raise NonFiniteError(
            f"`{what}` produced non-finite values for {int(bad.sum())} folds/draws (first: "
            f"{np.flatnonzero(bad)[:5].tolist()}): the model overflows along the path (order > 1) or "
            "at the reweighted data. Use method='ij' at order 1, or smaller folds."
        )


# ------------------------------------------------------------ first order and Newton
def ij_steps(fit: FitAtTheta0, fi: FoldIndex) -> jax.Array:
    """``-H^{-1} g_S`` per fold: (F, D)."""
    m = int(fi.index.shape[1])
    chunk = min(fit.chunk, m)

    def kernel(idx, coef):
        return fold_ij_kernel(fit.model, fit.base.inverse, fit.th, fit.data, idx, coef, chunk)

    return map_blocks(kernel, (jnp.asarray(fi.index, jnp.int32), fold_coef(fit, fi)), chunk * fit.dim)


def uses_woodbury(fit: FitAtTheta0, fi: FoldIndex) -> bool:
    """The low-rank Newton step applies: a declared linear predictor and folds of
    rank ``m k < D`` (otherwise the dense factorisation is cheaper)."""
    if fit.low_rank_model is None:
        return False
    return int(fi.index.shape[1]) * fit.predictor_size < fit.dim


def newton_steps(fit: FitAtTheta0, fi: FoldIndex, check: bool = True) -> tuple[jax.Array, np.ndarray]:
    """Newton steps per fold, (F, D), and the curvature left by each fold, (F,).

    With `check`, raise (naming the fold) where ``H - H_S`` is singular or
    indefinite; without, the caller decides (`refit` starts those folds at ``theta0``).
    """
    base, d = fit.base, fit.dim
    m = int(fi.index.shape[1])
    idx, coef = jnp.asarray(fi.index, jnp.int32), fold_coef(fit, fi)
    if uses_woodbury(fit, fi):
        r = m * fit.predictor_size

        def kernel(i, c):
            return woodbury_fold_kernel(
                fit.low_rank_model, base.inverse, fit.th, base.g0, fit.data, i, c, base.symmetric
            )

        steps, left = map_blocks(kernel, (idx, coef), d * r + r * r + d)
        exact = None
    else:
        chunk = min(fit.chunk, m)

        def kernel(i, c):
            return dense_fold_kernel(
                fit.model, fit.th, base.g0, base.hessian, base.pivots, fit.data, i, c, chunk,
                base.symmetric,
            )  # fmt: skip

        steps, left = map_blocks(kernel, (idx, coef), chunk * d * d + d * d)

        def exact(f: int) -> float:
            h_s = fold_hessian_kernel(fit.model, fit.th, fit.data, idx[f], coef[f], chunk)
            return exact_curvature_left(base.hessian, h_s, base.symmetric)

    left = np.asarray(left)
    if check:
        raise_if_not_identified(left, base.symmetric, base.singular_tol, "folds", exact)
        check_finite_result(steps, "leave_out")
    return steps, left


def warm_starts(fit: FitAtTheta0, fi: FoldIndex, start: str) -> np.ndarray:
    """Starting points of exact refits, (F, D): ``theta0`` plus the Newton-step or
    first-order prediction, or ``theta0`` itself where that prediction failed."""
    th0 = np.asarray(fit.th)
    if start == "theta0":
        return np.broadcast_to(th0, (fi.n_folds, th0.size))
    if start == "newton":
        steps, left = newton_steps(fit, fi, check=False)
        steps = np.array(steps)
        steps[~(left > fit.base.singular_tol)] = 0.0
    elif start == "ij":
        steps = np.array(ij_steps(fit, fi))
    else:
        raise OptsensError(f"`start` must be 'newton', 'ij' or 'theta0'; got {start!r}.")
    steps[~np.isfinite(steps).all(axis=1)] = 0.0
    return th0 + steps


def bootstrap_steps(fit: FitAtTheta0, keys: jax.Array, newton: bool) -> jax.Array:
    """First-order or Newton steps per bootstrap draw: (B, D)."""
    base, n_obs = fit.base, int(fit.weights.shape[0])
    per_draw = min(n_obs, fit.chunk) * fit.dim * (fit.dim if newton else 1)
    if not newton:

        def kernel(k):
            return bootstrap_ij_kernel(fit.model, base.inverse, fit.th, fit.data, fit.weights, k, fit.chunk)

        out = map_blocks(kernel, (keys,), per_draw)
    else:

        def kernel(k):
            return dense_bootstrap_kernel(
                fit.model, fit.th, base.g0, base.hessian, base.pivots, fit.data, fit.weights, k,
                fit.chunk, base.symmetric,
            )  # fmt: skip

        out, left = map_blocks(kernel, (keys,), per_draw)

        def exact(b: int) -> float:
            h_s = draw_hessian_kernel(fit.model, fit.th, fit.data, fit.weights, keys[b], fit.chunk)
            return exact_curvature_left(base.hessian, h_s, base.symmetric)

        raise_if_not_identified(np.asarray(left), base.symmetric, base.singular_tol, "bootstrap draws", exact)
    check_finite_result(out, "bootstrap")
    return out


# ------------------------------------------------------------------ higher orders
def path_equation(fit: FitAtTheta0, theta0: Any, residual_rtol: float) -> EstimatingEquation:
    """The core `EstimatingEquation` of the weight path (`WeightPath`), with a
    placeholder fold; folds and draws are swapped in as traced arguments."""
    idx = jnp.zeros((1,), jnp.int32)
    delta = jnp.zeros((1,), fit.th.dtype)
    path = WeightPath(fit.model)
    eq = build_path_equation(path, fit.model.kind, theta0, fit.data, fit.weights, idx, delta,
                             fit.base.hessian, residual_rtol)  # fmt: skip
    return with_args(eq, (fit.data, fit.weights, idx, delta))


def leave_out_series(
    fit: FitAtTheta0, eq: EstimatingEquation, fi: FoldIndex, order: int, taylor_method: str
) -> jax.Array:
    """Taylor coefficients ``theta_1..theta_K`` per fold from the core engine: (F, K, D)."""
    idx, delta = jnp.asarray(fi.index, jnp.int32), fold_coef(fit, fi)
    method = resolve_method(with_args(eq, (fit.data, fit.weights, idx[0], delta[0])), order, taylor_method)
    # the engine runs the Taylor recursion over the full data for each fold: a block
    # of folds holds about N (K + 1) values per fold and intermediate
    per_fold = int(fit.weights.shape[0]) * (order + 1) * max(1, fit.dim // 4)
    out = map_blocks(lambda i, c: fold_series_kernel(eq, order, method, i, c), (idx, delta), per_fold)
    check_finite_result(out, "leave_out")
    return out


def bootstrap_series(
    fit: FitAtTheta0, eq: EstimatingEquation, keys: jax.Array, order: int, taylor_method: str
) -> jax.Array:
    """Taylor coefficients per bootstrap draw: (B, K, D)."""
    delta0 = jnp.zeros_like(fit.weights)
    method = resolve_method(with_args(eq, (fit.data, fit.weights, None, delta0)), order, taylor_method)
    per_draw = int(fit.weights.shape[0]) * (order + 1) * max(1, fit.dim // 4)
    out = map_blocks(lambda k: bootstrap_series_kernel(eq, order, method, k), (keys,), per_draw)
    check_finite_result(out, "bootstrap")
    return out


# ------------------------------------------------------------------------- CV
def held_out_losses(
    fit: FitAtTheta0, loss_fn: Callable[..., Any], thetas: jax.Array, fi: FoldIndex
) -> tuple[jax.Array, jax.Array]:
    """``(sum_{n in S} w_n loss_fn(theta_S, datum_n), sum_{n in S} w_n)`` per fold."""
    w = np.asarray(fit.weights)
    held = jnp.asarray(np.where(fi.valid, w[fi.index], 0.0), fit.th.dtype)
    row_size = int(fi.index.shape[1]) * fit.dim

    def kernel(th, idx, c):
        return held_out_loss_kernel(loss_fn, fit.model.theta, th, fit.data, idx, c)

    sums = map_blocks(kernel, (thetas, jnp.asarray(fi.index, jnp.int32), held), row_size)
    return sums, jnp.sum(held, axis=1)
