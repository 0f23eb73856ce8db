"""The Newton step ("approximate leave-out", ALO) with the Hessian without a fold.

For a fold ``S`` with coefficients ``c_j = -w_j`` on its members (0 on padding), one
Newton step from ``theta0`` on the problem without ``S`` is

    step_S = -(H + H_S)^{-1} (G(theta0) + g_S),
    g_S = sum_j c_j g_{s_j}(theta0),    H_S = sum_j c_j dg_{s_j}/dtheta (theta0).

Two ways to solve with ``H + H_S``:

- **dense** (any model): form ``H + H_S`` (D x D) and factorise it afresh per fold
  (Cholesky for a loss, LU otherwise): ``O(m D^2 + D^3)`` per fold of ``m``.
- **low rank / Woodbury** (a declared `linear_predictor` ``eta_n = J_n theta + c``,
  k outputs): every per-observation Jacobian is ``J_n^T A_n J_n``, so
  ``H + H_S = H - U C U^T`` with ``U = [J_{s_1}^T ... J_{s_m}^T]`` (D x mk) and
  ``C = blockdiag(w_j A_j)``, and with ``B = U^T H^{-1} U`` and ``H``'s cached
  inverse

      (H - U C U^T)^{-1} = H^{-1} + H^{-1} U (I - C B)^{-1} C U^T H^{-1},

  an mk x mk system per fold: ``O(D^2 mk + (mk)^3)``. This form never inverts
  ``C`` (zero on padding, singular where a loss is flat); used when ``mk < D``.

Both report, per fold, the **curvature left**: the smallest eigenvalue of
``H^{-1} (H + H_S)`` (of the pencil ``(H + H_S, H)``). 1 means the fold carried no
curvature, 0 that dropping it leaves ``H + H_S`` singular (the fit without the fold
is not identified), below 0 that it is indefinite (for a loss: no minimum near
``theta0``). Woodbury computes it exactly, as ``1 - max eig(B^{1/2} C B^{1/2})``;
the dense path bounds it from above by the Cholesky pivots, ``min_i (R_ii / L_ii)^2``
for ``H + H_S = R R^T``, ``H = L L^T`` (Schur complements are monotone, so the bound
never flags a fold falsely), and the exact value of a flagged fold is computed on
the host for the message. For an estimating equation (LU) only singularity is
checked: the smallest singular value of ``I - C B`` (Woodbury) or non-finite steps
(dense).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ._batching import chunked_sum
from ._errors import IndefiniteHessianError, OptsensError, SingularHessianError
from ._folds import _draw_counts
from ._weights_kernels import fold_sums
from ._weights_model import ObservationModel

__all__ = [
    "check_curvature_factors",
    "dense_bootstrap_kernel",
    "dense_fold_kernel",
    "draw_hessian_kernel",
    "exact_curvature_left",
    "fold_hessian_kernel",
    "raise_if_not_identified",
    "woodbury_fold_kernel",
]


# ------------------------------------------------------------------- dense path
def _scored_solve(a, rhs, pivots, symmetric: bool):
    """``(-a^{-1} rhs, curvature-left bound)`` by a fresh factorisation of `a`."""
    if symmetric:
        factor = jnp.linalg.cholesky(a)  # NaN where `a` is not positive definite
        x = jsl.cho_solve((factor, True), rhs)
        left = jnp.min((jnp.diagonal(factor) / pivots) ** 2)
    else:
        x = jnp.linalg.solve(a, rhs)
        left = jnp.where(jnp.all(jnp.isfinite(x)), 1.0, jnp.nan)
    return -x, left


@eqx.filter_jit
def dense_fold_kernel(
    model: ObservationModel, th, g0, h, pivots, data, idx, coef, chunk: int, symmetric: bool
):
    """Per fold: the Newton step with a fresh D x D factorisation of ``H + H_S``,
    and the curvature-left bound: ((F, D), (F,))."""

    def one(i, c):
        g_s, h_s = fold_sums(model, th, data, i, c, chunk, True)
        return _scored_solve(h + h_s, g0 + g_s, pivots, symmetric)

    return jax.vmap(one)(idx, coef)


def _bootstrap_delta(key, w):
    return w * (_draw_counts(key, w.shape[0]) - 1).astype(w.dtype)


@eqx.filter_jit
def dense_bootstrap_kernel(
    model: ObservationModel, th, g0, h, pivots, data, w, keys, chunk: int, symmetric: bool
):
    """Per bootstrap draw: one Newton step with the reweighted Hessian (a dense
    direction: every observation moves, so no low-rank form)."""

    def one(key):
        delta = _bootstrap_delta(key, w)
        g_s, h_s = chunked_sum(lambda d, c: model.weighted_gh(th, d, c), data, delta, chunk)
        return _scored_solve(h + h_s, g0 + g_s, pivots, symmetric)

    return jax.vmap(one)(keys)


@eqx.filter_jit
def fold_hessian_kernel(model: ObservationModel, th, data, idx, coef, chunk: int):
    """``H_S`` of one fold (for the exact diagnosis of a flagged fold)."""
    return fold_sums(model, th, data, idx, coef, chunk, True)[1]


@eqx.filter_jit
def draw_hessian_kernel(model: ObservationModel, th, data, w, key, chunk: int):
    """``H_S`` of one bootstrap draw (for the exact diagnosis of a flagged draw)."""
    delta = _bootstrap_delta(key, w)
    return chunked_sum(lambda d, c: model.weighted_gh(th, d, c), data, delta, chunk)[1]


def exact_curvature_left(h, h_s, symmetric: bool) -> float:
    """The smallest eigenvalue of ``H^{-1}(H + H_S)`` (smallest modulus for an
    estimating equation), on the host."""
    h, h_s = np.asarray(h), np.asarray(h_s)
    if symmetric:
        factor = np.linalg.cholesky(h)
        m = np.linalg.solve(factor, np.linalg.solve(factor, h + h_s).T)
        return float(np.linalg.eigvalsh(0.5 * (m + m.T))[0])
    return float(np.min(np.abs(np.linalg.eigvals(np.linalg.solve(h, h + h_s)))))


# ----------------------------------------------------------------- low rank path
@eqx.filter_jit
def woodbury_fold_kernel(model: ObservationModel, h_inv, th, g0, data, idx, coef, symmetric: bool):
    """Per fold: the Newton step by Woodbury with ``H``'s inverse, and the exact
    curvature left: ((F, D), (F,)). Needs ``model.predictor``."""
    dim = th.shape[0]

    def one(i, c):
        sub = jax.tree_util.tree_map(lambda a: a[i], data)
        g_s = model.weighted_g(th, sub, c)
        u, a = jax.vmap(model.curvature_factors, (None, 0))(th, sub)  # (m, D, k), (m, k, k)
        m, _, k = u.shape
        r = m * k
        big_u = jnp.transpose(u, (1, 0, 2)).reshape(dim, r)  # column j * k + a: U_{s_j}[:, a]
        blocks = -c[:, None, None] * a  # C_j = w_j A_j
        eye_m = jnp.eye(m, dtype=a.dtype)
        cmat = (eye_m[:, None, :, None] * blocks[:, :, None, :]).reshape(r, r)
        hu = h_inv @ big_u  # (D, r)
        b = big_u.T @ hu  # (r, r)
        if symmetric:
            b = 0.5 * (b + b.T)
        x0 = h_inv @ (g0 + g_s)
        kmat = jnp.eye(r, dtype=b.dtype) - cmat @ b
        y = jnp.linalg.solve(kmat, cmat @ (big_u.T @ x0))
        step = -(x0 + hu @ y)
        if not symmetric:
            left = jnp.linalg.svd(kmat, compute_uv=False)[-1]
        elif r == 1:
            left = kmat[0, 0]
        else:
            lam, q = jnp.linalg.eigh(b)
            root = (q * jnp.sqrt(jnp.clip(lam, 0.0))) @ q.T  # B^{1/2}
            e = root @ cmat @ root
            left = 1.0 - jnp.linalg.eigvalsh(0.5 * (e + e.T))[-1]
        if symmetric and r < dim:
            left = jnp.minimum(left, 1.0)  # the directions U does not reach keep all of H
        return step, left

    return jax.vmap(one)(idx, coef)


@eqx.filter_jit
def _low_rank_hessian_kernel(model: ObservationModel, th, data, w, chunk: int):
    """``sum_n w_n U_n A_n U_n^T + penalty Hessian``: ``H`` if the declaration holds."""

    def part(d, ww):
        u, a = jax.vmap(model.curvature_factors, (None, 0))(th, d)
        return jnp.einsum("n,nia,nab,njb->ij", ww, u, a, u)

    return chunked_sum(part, data, w, chunk) + model.penalty_gh(th)[1]


def check_curvature_factors(model: ObservationModel, th, data, w, hessian, chunk: int) -> None:
    """Raise unless ``sum_n w_n U_n A_n U_n^T`` (+ penalty) equals the full-data ``H``
    (relative 1e-8): the declared `linear_predictor` describes the model."""
    low_rank = np.asarray(_low_rank_hessian_kernel(model, th, data, w, chunk))
    h = np.asarray(hessian)
    scale = max(float(np.max(np.abs(h))), np.finfo(float).tiny)
    err = float(np.max(np.abs(low_rank - h))) / scale
    if not err <= 1e-8:
        raise OptsensError(
            "`linear_predictor` does not describe the model: the Hessian rebuilt from it, "
            "sum_n w_n J_n^T A_n J_n + penalty (J_n = d eta_n / d theta), differs from the Hessian of "
            f"the model by {err:.2g} (relative). The loss (or g) of each observation must depend on theta "
            "only through linear_predictor(theta, datum), and that must be affine in theta (e.g. "
            "`datum['x'] @ theta + offset`). Fix it, or drop `linear_predictor` (the Newton step then "
            "factorises H - H_S densely)."
        )


# --------------------------------------------------------------------- reporting
def raise_if_not_identified(
    left,
    symmetric: bool,
    tol: float,
    rows_name: str,
    exact: Callable[[int], float] | None = None,
) -> None:
    """Raise `SingularHessianError` / `IndefiniteHessianError` naming the first fold
    (or draw) whose curvature left is not above `tol` (NaN included).

    `rows_name` is ``"folds"`` or ``"bootstrap draws"``; `exact(row)` recomputes the
    exact curvature left of a flagged row (the dense path's value is a bound).
    """
    left = np.asarray(left)
    bad = ~(left > tol)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    first = int(rows[0])
    value = float(left[first]) if exact is None else exact(first)
    where = f"`folds`[{first}]" if rows_name == "folds" else f"bootstrap draw {first}"
    count = f"{rows.size} of {left.size} {rows_name} (first: {rows[:5].tolist()})"
    if symmetric and value < -tol:
        raise IndefiniteHessianError(
            f"The Newton step without {where} is undefined: the Hessian without it, H - H_S, is "
            f"indefinite (smallest eigenvalue of H^-1 (H - H_S): {value:.3g}), so the problem without "
            f"these observations has no minimum near theta0. Affected: {count}. Use method='ij' (it "
            "needs only H), smaller folds, or check these folds with `refit`."
        )
    measure = "eigenvalue" if symmetric else "|eigenvalue|"
    raise SingularHessianError(
        f"The Newton step without {where} is undefined: the Hessian without it, H - H_S, is "
        f"singular (smallest {measure} of H^-1 (H - H_S): {value:.3g}; numerically singular below "
        f"{tol:.2g}, i.e. condition number above `cond_max`). Without these observations the fit is "
        "not identified: a feature or category seen only in the fold, fewer observations left than "
        "parameters, or (without a penalty) classes that the remaining data nearly separate. "
        f"Affected: {count}. Use method='ij', smaller folds, or a penalty."
    )
