"""`MEstimator`: data-weight sensitivity of an M-estimator, from one fit.

The estimating equation with observation weights ``w`` (default one) is

    G(theta, w) = sum_n w_n g_n(theta) + penalty(theta),

with ``g_n(theta) = grad_theta loss(theta, datum_n)`` for `MEstimator.from_loss`.
``theta0`` solves ``G(theta0, w) = 0``; ``H = dG/dtheta`` at ``theta0``. Everything
here reuses one factorisation of ``H``:

- influence: ``d theta_hat / d w_n = -H^{-1} g_n(theta0)``; for a quantity of
  interest ``f``, ``d f / d w_n = -(H^{-T} grad f)^T g_n(theta0)`` (one solve);
- leaving out a fold ``S`` is the path ``w(t) = w - t w 1_S``, i.e.
  ``G(theta, t) = G(theta, w) - t sum_{n in S} w_n g_n(theta)``; its Taylor
  coefficients at ``t = 1`` come from the core engine (`taylor_expansion` on an
  `EstimatingEquation` whose ``eps`` is ``t`` and whose fold is a traced
  argument), vmapped over folds: one compiled kernel serves every fold;
- the Newton step (approximate leave-one-out): one Newton step from ``theta0`` on
  the objective without the fold, ``theta0 - (H - H_S)^{-1} (G(theta0) - g_S)``
  with ``H_S = sum_{n in S} w_n dg_n/dtheta`` (exact for a quadratic objective);
- a bootstrap draw is ``w(t) = w + t w (counts - 1)``.

Per-observation work is vmapped in chunks (`lax.map` with a batch size, or a loop
over chunks summing into a D x D accumulator), so memory never grows like N D^2.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._errors import (
    IndefiniteHessianError,
    NonFiniteError,
    NotASolutionError,
    OptsensError,
    SingularHessianError,
)
from ._folds import FoldIndex, _draw_counts, as_fold_index
from ._linear import CholeskySolver, HessianSolver, LUSolver
from ._newton import newton_solve
from ._problem import EstimatingEquation
from ._pytree import TreeLayout, as_float_tree
from ._taylor import taylor_expansion

__all__ = ["MEstimator"]

# Elements (float64) that one chunk of per-observation work may hold in a D x D or
# N x D intermediate: 2^23 * 8 bytes = 64 MiB.
_CHUNK_BUDGET = 2**23
# Folds per compiled block, at most: bounds the padding of the last block.
_MAX_BLOCK = 8192
_LEAVE_OUT_METHODS = ("ij", "newton")
_CV_METHODS = ("ij", "newton", "exact")


# ---------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class _Model:
    """Hashable description of the per-observation problem (static in jitted kernels).

    `fn` is ``loss(theta, datum)`` (kind ``"loss"``) or ``g(theta, datum)`` (kind
    ``"equation"``); `penalty` is a scalar function of `theta` (kind ``"loss"``) or a
    function returning a pytree like `theta` (kind ``"equation"``), or None.
    """

    fn: Callable[..., Any]
    kind: str
    penalty: Callable[..., Any] | None
    theta: TreeLayout

    def loss(self, th, datum):
        return self.fn(self.theta.unravel(th), datum)

    def g(self, th, datum):
        """``g_n(theta)`` of one observation, flat."""
        if self.kind == "loss":
            return jax.grad(self.loss)(th, datum)
        return self.theta.ravel(self.fn(self.theta.unravel(th), datum))

    def weighted_g(self, th, data, w):
        """``sum_n w_n g_n(theta)`` over the observations in `data`."""
        if self.kind == "loss":
            return jax.grad(lambda t: jnp.sum(w * jax.vmap(self.loss, (None, 0))(t, data)))(th)
        return w @ jax.vmap(self.g, (None, 0))(th, data)

    def weighted_gh(self, th, data, w):
        """``(sum w_n g_n, sum w_n dg_n/dtheta)`` in one forward-over-reverse pass."""

        def both(t):
            value = self.weighted_g(t, data, w)
            return value, value

        h, g = jax.jacfwd(both, has_aux=True)(th)
        return g, h

    def penalty_g(self, th):
        if self.penalty is None:
            return jnp.zeros_like(th)
        if self.kind == "loss":
            return jax.grad(lambda t: self.penalty(self.theta.unravel(t)))(th)
        return self.theta.ravel(self.penalty(self.theta.unravel(th)))

    def penalty_gh(self, th):
        if self.penalty is None:
            return jnp.zeros_like(th), jnp.zeros((th.shape[0], th.shape[0]), th.dtype)
        return self.penalty_g(th), jax.jacfwd(self.penalty_g)(th)


@dataclasses.dataclass(frozen=True)
class _TotalObjective:
    """``f(theta, eps, data, w) = sum_n w_n loss_n(theta) + penalty(theta)`` (for
    `newton_solve`; `eps` is unused). Hashable, so refits share one compiled kernel."""

    model: _Model

    def __call__(self, theta, eps, data, w):
        del eps
        m = self.model
        th = m.theta.ravel(theta)
        total = jnp.sum(w * jax.vmap(m.loss, (None, 0))(th, data))
        if m.penalty is not None:
            total = total + m.penalty(theta)
        return total


@dataclasses.dataclass(frozen=True)
class _TotalEquation:
    """``G(theta, eps, data, w) = sum_n w_n g_n(theta) + penalty(theta)``."""

    model: _Model

    def __call__(self, theta, eps, data, w):
        del eps
        m = self.model
        th = m.theta.ravel(theta)
        return m.theta.unravel(m.weighted_g(th, data, w) + m.penalty_g(th))


@dataclasses.dataclass(frozen=True)
class _WeightPath:
    """The weight path as an estimating equation in ``t`` (the core engine's ``eps``).

    With `idx`/`delta` a fold: ``sum_n w_n l_n + penalty + t sum_j delta_j l_{idx_j}``;
    with ``idx=None`` and a dense `delta`: ``sum_n (w_n + t delta_n) l_n + penalty``
    (objective form for kind ``"loss"``; the same with ``g`` for kind ``"equation"``).
    Fold and data are traced arguments, so one compiled kernel serves every fold.
    """

    model: _Model

    def __call__(self, theta, t, data, w, idx, delta):
        m = self.model
        th = m.theta.ravel(theta)
        if idx is None:
            sub, weights, extra = data, w + t * delta, None
        else:
            sub = jax.tree_util.tree_map(lambda a: a[idx], data)
            weights, extra = w, delta
        if m.kind == "loss":
            total = jnp.sum(weights * jax.vmap(m.loss, (None, 0))(th, data))
            if extra is not None:
                total = total + t * jnp.sum(extra * jax.vmap(m.loss, (None, 0))(th, sub))
            if m.penalty is not None:
                total = total + m.penalty(theta)
            return total
        out = m.weighted_g(th, data, weights) + m.penalty_g(th)
        if extra is not None:
            out = out + t * m.weighted_g(th, sub, extra)
        return m.theta.unravel(out)


# ----------------------------------------------------------------- chunking
def _chunked_sum(fn: Callable, data, w, chunk: int):
    """``sum_c fn(data_c, w_c)`` over chunks of `chunk` observations (a loop, so only
    one chunk's intermediates are alive); `fn` returns a pytree of arrays."""
    n = w.shape[0]
    if n <= chunk:
        return fn(data, w)
    n_full = n // chunk

    def take(start, size):
        return (
            jax.tree_util.tree_map(lambda a: lax.dynamic_slice_in_dim(a, start, size), data),
            lax.dynamic_slice_in_dim(w, start, size),
        )

    def body(i, acc):
        out = fn(*take(i * chunk, chunk))
        return jax.tree_util.tree_map(jnp.add, acc, out)

    shapes = jax.eval_shape(fn, *take(0, chunk))
    acc = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    acc = lax.fori_loop(0, n_full, body, acc)
    if n_full * chunk < n:
        tail = fn(*take(n_full * chunk, n - n_full * chunk))
        acc = jax.tree_util.tree_map(jnp.add, acc, tail)
    return acc


@eqx.filter_jit
def _base_kernel(model: _Model, th, data, w, chunk: int):
    """``G(theta0)`` and the dense ``H`` at ``theta0``, in chunks."""
    g, h = _chunked_sum(lambda d, ww: model.weighted_gh(th, d, ww), data, w, chunk)
    pg, ph = model.penalty_gh(th)
    return g + pg, h + ph


@eqx.filter_jit
def _influence_kernel(model: _Model, h_inv, th, data, chunk: int):
    """``-H^{-1} g_n(theta0)`` for every observation: (N, D). With the explicit D x D
    inverse (from the factorisation) a chunk costs one matrix product; triangular
    solves with N right-hand sides are several times slower on CPU, for the same
    accuracy order (both ~ cond(H) * eps)."""
    return lax.map(lambda d: -(h_inv @ model.g(th, d)), data, batch_size=chunk)


@eqx.filter_jit
def _qoi_influence_kernel(model: _Model, solver: HessianSolver, th, data, qoi, out_layout, chunk: int):
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


def _fold_sums(model: _Model, th, data, idx, coef, chunk: int, want_h: bool):
    """``sum_j coef_j g_{idx_j}(theta)`` (and the Hessian sum) for one fold."""
    sub = jax.tree_util.tree_map(lambda a: a[idx], data)
    if want_h:
        return _chunked_sum(lambda d, c: model.weighted_gh(th, d, c), sub, coef, chunk)
    return _chunked_sum(lambda d, c: model.weighted_g(th, d, c), sub, coef, chunk), None


@eqx.filter_jit
def _fold_step_kernel(model: _Model, h_inv, th, g0, h, data, idx, coef, chunk: int, newton: bool):
    """Per fold (rows of `idx`, `coef`): the IJ step ``-H^{-1} g_S`` or the Newton step
    ``-(H + H_S)^{-1} (G0 + g_S)`` with ``g_S = sum_j coef_j g_{idx_j}`` (coef = -w on the fold)."""

    def one(i, c):
        g_s, h_s = _fold_sums(model, th, data, i, c, chunk, newton)
        if not newton:
            return -(h_inv @ g_s)
        return -_dense_solve(h + h_s, g0 + g_s, model.kind == "loss")

    return jax.vmap(one)(idx, coef)


@eqx.filter_jit
def _bootstrap_step_kernel(model: _Model, h_inv, th, g0, h, data, w, keys, chunk: int, newton: bool):
    """Per bootstrap draw: the IJ or Newton step along ``delta = w (counts - 1)``."""
    n = w.shape[0]

    def one(key):
        delta = w * (_draw_counts(key, n) - 1).astype(w.dtype)
        if not newton:
            g_s = _chunked_sum(lambda d, c: model.weighted_g(th, d, c), data, delta, chunk)
            return -(h_inv @ g_s)
        g_s, h_s = _chunked_sum(lambda d, c: model.weighted_gh(th, d, c), data, delta, chunk)
        return -_dense_solve(h + h_s, g0 + g_s, model.kind == "loss")

    return jax.vmap(one)(keys)


def _dense_solve(a, b, symmetric: bool):
    """Solve with the downdated Hessian ``H + H_S`` (a fresh D x D factorisation;
    non-finite if ``H + H_S`` is not positive definite, which is then reported)."""
    if symmetric:
        factor = jnp.linalg.cholesky(a)
        return jax.scipy.linalg.cho_solve((factor, True), b)
    return jnp.linalg.solve(a, b)


@eqx.filter_jit
def _build_equation(path: _WeightPath, kind: str, theta0, data, w, idx, delta):
    """The core `EstimatingEquation` of the weight path, built under `jit`: its ``H``
    (at ``t = 0``, the full-data Hessian) is computed by compiled code. The checks
    that an eager construction would run were done by `MEstimator` on the same ``H``."""
    eps0 = jnp.zeros((), w.dtype)
    if kind == "loss":
        return EstimatingEquation.from_objective(
            path, theta0, eps0, args=(data, w, idx, delta), solver="cholesky"
        )
    return EstimatingEquation(path, theta0, eps0, args=(data, w, idx, delta), solver="lu")


def _with_args(eq: EstimatingEquation, args: tuple) -> EstimatingEquation:
    return eqx.tree_at(lambda e: e.args, eq, args)


def _series(eq: EstimatingEquation, order: int, method: str) -> jax.Array:
    """``[theta_1, ..., theta_K]`` at ``t = 1`` along ``v = 1`` from the core engine: (K, D)."""
    ts = taylor_expansion(eq, order, method)
    coefficients = ts.coefficients(jnp.ones((), eq.theta0_flat.dtype))
    return jnp.stack([eq.problem.theta.ravel(c) for c in coefficients])


@eqx.filter_jit
def _engine_fold_kernel(eq: EstimatingEquation, order: int, method: str, idx, delta):
    """Taylor coefficients of a block of folds, (F, K, D); the fold is a traced argument."""
    data, w = eq.args[0], eq.args[1]
    return jax.vmap(lambda i, d: _series(_with_args(eq, (data, w, i, d)), order, method))(idx, delta)


@eqx.filter_jit
def _engine_bootstrap_kernel(eq: EstimatingEquation, order: int, method: str, keys):
    """Taylor coefficients of a block of bootstrap draws, (B, K, D)."""
    data, w = eq.args[0], eq.args[1]
    n = w.shape[0]

    def one(key):
        delta = w * (_draw_counts(key, n) - 1).astype(w.dtype)
        return _series(_with_args(eq, (data, w, None, delta)), order, method)

    return jax.vmap(one)(keys)


@eqx.filter_jit
def _held_out_loss_kernel(loss_fn, layout: TreeLayout, thetas, data, idx, weights):
    """``sum_j weights_j loss_fn(theta_f, datum_{idx_j})`` for a block of folds."""

    def one(th, i, c):
        sub = jax.tree_util.tree_map(lambda a: a[i], data)
        theta = layout.unravel(th)
        return jnp.sum(c * jax.vmap(lambda d: loss_fn(theta, d))(sub))

    return jax.vmap(one)(thetas, idx, weights)


def _block_size(rows: int, per_row: int) -> int:
    """Rows (folds, draws) per compiled block: as many as `_CHUNK_BUDGET` allows, and
    for fewer rows the next power of two, so a kernel compiles once per block size,
    not once per number of folds."""
    cap = int(max(1, min(_MAX_BLOCK, _CHUNK_BUDGET // max(per_row, 1))))
    return min(cap, 1 << max(0, (rows - 1).bit_length()))


def _map_blocks(kernel: Callable, rows: tuple, per_row: int):
    """``kernel(*block)`` over blocks of the leading axis of `rows` (padded with copies
    of the first row, then cut back), concatenated."""
    n = int(rows[0].shape[0])
    block = _block_size(n, per_row)
    pad = (-n) % block
    if pad:
        rows = tuple(jnp.concatenate([r, jnp.repeat(r[:1], pad, axis=0)]) for r in rows)
    outs = [kernel(*(r[s : s + block] for r in rows)) for s in range(0, n + pad, block)]
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs))[:n]


# --------------------------------------------------------------- validation
def _leaf_name(path) -> str:
    return "data" + jax.tree_util.keystr(path)


def _check_data(data: Any) -> tuple[Any, int]:
    leaves_with_path = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves_with_path:
        raise OptsensError(
            "`data` has no arrays in it; pass a pytree of arrays with a leading observation axis."
        )
    converted, n_obs = [], None
    for path, leaf in leaves_with_path:
        try:
            arr = jnp.asarray(leaf)
        except TypeError as exc:
            raise TypeError(
                f"`{_leaf_name(path)}` must be an array; got {type(leaf).__name__} ({exc})."
            ) from None
        if arr.ndim == 0:
            raise OptsensError(
                f"`{_leaf_name(path)}` is a scalar; every leaf of `data` needs a leading observation "
                "axis. Put constants in `loss` (or `penalty`) instead."
            )
        if n_obs is None:
            n_obs = int(arr.shape[0])
        elif arr.shape[0] != n_obs:
            raise OptsensError(
                f"the leaves of `data` disagree on the number of observations: `{_leaf_name(path)}` has "
                f"{arr.shape[0]} rows, the first leaf {n_obs}. Every leaf needs the same leading axis."
            )
        if jnp.issubdtype(arr.dtype, jnp.inexact):
            finite = np.isfinite(np.asarray(arr)).reshape(arr.shape[0], -1).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise NonFiniteError(
                    f"`{_leaf_name(path)}` has NaN or infinite values in {bad.size} observations "
                    f"(first: {bad[:5].tolist()}). Remove or impute them before fitting; optsens does "
                    "not drop observations silently."
                )
        converted.append(arr)
    if n_obs == 0:
        raise OptsensError("`data` has zero observations.")
    treedef = jax.tree_util.tree_structure(data)
    return jax.tree_util.tree_unflatten(treedef, converted), int(n_obs)


def _check_weights(weights: Any, n_obs: int, dtype) -> jax.Array:
    if weights is None:
        return jnp.ones((n_obs,), dtype)
    arr = np.asarray(weights, dtype=float)
    if arr.shape != (n_obs,):
        raise OptsensError(
            f"`weights` must have shape ({n_obs},), one weight per observation of `data`; got shape "
            f"{arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(
            f"`weights` has non-finite entries at {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}."
        )
    if np.any(arr < 0):
        raise OptsensError(
            f"`weights` must be non-negative; entries {np.flatnonzero(arr < 0)[:5].tolist()} are negative."
        )
    if not np.any(arr > 0):
        raise OptsensError("`weights` are all zero: no observation is left to fit.")
    return jnp.asarray(arr, dtype)


def _first_datum(data):
    return jax.tree_util.tree_map(lambda a: a[0], data)


def _check_function(fn, kind: str, theta0, data) -> None:
    name = "loss" if kind == "loss" else "g"
    try:
        out = jax.eval_shape(fn, theta0, _first_datum(data))
    except Exception as exc:
        raise type(exc)(
            f"calling `{name}(theta0, datum)` on the first observation failed: {exc}. `{name}` takes "
            "the parameters and ONE observation (each leaf of `data` without its leading axis)."
        ) from exc
    if kind == "loss":
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
            raise OptsensError(
                f"`loss(theta, datum)` must return a scalar, the loss of one observation; it returned "
                f"{jax.tree_util.tree_map(lambda s: s.shape, out)}. optsens vmaps it over observations."
            )
        return
    if (
        TreeLayout.of(out).treedef != TreeLayout.of(theta0).treedef
        or tuple(s.shape for s in jax.tree_util.tree_leaves(out)) != TreeLayout.of(theta0).shapes
    ):
        raise OptsensError(
            "`g(theta, datum)` must return a pytree shaped like `theta0` (one observation's estimating "
            f"function); it returned {jax.tree_util.tree_map(lambda s: s.shape, out)}, `theta0` is "
            f"{jax.tree_util.tree_map(np.shape, theta0)}."
        )


def _check_penalty(penalty, kind: str, theta0) -> None:
    if penalty is None:
        return
    if not callable(penalty):
        raise TypeError(f"`penalty` must be a function of theta or None; got {type(penalty).__name__}.")
    try:
        out = jax.eval_shape(penalty, theta0)
    except Exception as exc:
        raise type(exc)(f"calling `penalty(theta0)` failed: {exc}") from exc
    if kind == "loss" and (not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ()):
        raise OptsensError(f"`penalty(theta)` must return a scalar (added to the total loss); got {out}.")
    if kind == "equation" and TreeLayout.of(out).treedef != TreeLayout.of(theta0).treedef:
        raise OptsensError(
            "with `MEstimator(g, ...)`, `penalty(theta)` is added to G and must return a pytree shaped "
            f"like `theta0`; got {out}. For a scalar penalty use `MEstimator.from_loss`."
        )


def _check_order(order: Any) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise OptsensError(f"`order` must be a positive integer; got {order!r}.")
    return int(order)


def _default_chunk(n_obs: int, width: int) -> int:
    return int(max(1, min(n_obs, _CHUNK_BUDGET // max(width, 1))))


# ---------------------------------------------------------------- MEstimator
@dataclasses.dataclass
class _Base:
    g0: jax.Array
    hessian: jax.Array
    solver: HessianSolver
    condition_number: float
    newton_step_norm: float
    _inverse: jax.Array | None = None

    @property
    def inverse(self) -> jax.Array:
        if self._inverse is None:
            self._inverse = self.solver.solve(jnp.eye(self.hessian.shape[0], dtype=self.hessian.dtype))
        return self._inverse


class MEstimator:
    """An M-estimator with observation weights, and how its fit moves with them.

    The estimating equation is

        G(theta, w) = sum_n w_n g_n(theta) + penalty(theta),      w = `weights` (default 1),

    solved by ``theta0``. ``g_n`` is the estimating function of observation ``n``:
    `g(theta, datum_n)`, or ``grad_theta loss(theta, datum_n)`` for `from_loss`
    (then ``G`` is the gradient of ``sum_n w_n loss_n + penalty``). With
    ``H = dG/dtheta (theta0)``, factorised once (Cholesky for a loss, LU otherwise):

    - `influence()`: ``d theta_hat / d w_n = -H^{-1} g_n(theta0)`` for all ``n``;
    - `leave_out(folds, order=K)`: Taylor series of ``theta_hat`` along
      ``w - t w 1_S`` at ``t = 1``, to order K (the infinitesimal jackknife), or the
      Newton step (``method="newton"``);
    - `bootstrap`, `cv_score`, `refit` (exact, warm-started).

    `theta0` is not checked at construction; the optimality check (the Newton step
    ``H^{-1} G(theta0)`` must be small) runs when a derivative is first asked for.
    Use `.fit()` to solve for ``theta0``.

    **Arguments:**

    - `g`: ``g(theta, datum)`` returning a pytree shaped like `theta` (one
      observation's estimating function; `datum` is each leaf of `data` without its
      leading axis).
    - `data`: a pytree of arrays with a common leading observation axis of length N.
    - `theta0`: the parameters (the solution, or a starting point for `.fit()`).
    - `penalty`: optional ``penalty(theta)`` added to ``G`` (a pytree like `theta`;
      with `from_loss`, a scalar added to the loss).
    - `weights`: optional (N,) non-negative observation weights (default ones).
    - `chunk_size`: observations per chunk of vectorised per-observation work
      (default: about 64 MiB of intermediates, i.e. 2^23 / D^2 observations for
      Hessian-level work and 2^21 / D for gradient-level work).
    - `residual_rtol`, `cond_max`: the optimality and conditioning checks, as for
      `EstimatingEquation`.

    **Example:**

    ```python
    def loss(theta, d):                         # logistic log-loss of one observation
        z = d["x"] @ theta
        return jnp.logaddexp(0.0, z) - d["y"] * z
    model = optsens.MEstimator.from_loss(loss, {"x": X, "y": y}, jnp.zeros(D),
                                         penalty=lambda th: 0.5 * th @ th).fit()
    model.influence()                           # (N, D)
    model.leave_out("loo", order=2)             # (N, D): approximate LOO fits
    model.cv_score(optsens.kfold(model.n_obs, 10), order=2)
    ```
    """

    def __init__(
        self,
        g: Callable[..., Any],
        data: Any,
        theta0: Any,
        *,
        penalty: Callable[..., Any] | None = None,
        weights: Any = None,
        chunk_size: int | None = None,
        residual_rtol: float = 1e-6,
        cond_max: float = 1e12,
        _kind: str = "equation",
    ):
        name = "loss" if _kind == "loss" else "g"
        if not callable(g):
            raise TypeError(f"`{name}` must be a function of (theta, datum); got {type(g).__name__}.")
        theta0 = as_float_tree(theta0, "theta0")
        if not jax.tree_util.tree_leaves(theta0):
            raise OptsensError("`theta0` has no arrays in it; it must hold the parameters.")
        data, n_obs = _check_data(data)
        layout = TreeLayout.of(theta0)
        _check_function(g, _kind, theta0, data)
        _check_penalty(penalty, _kind, theta0)
        if chunk_size is None:
            # Hessian-level work holds D x D values per observation, gradient-level work D
            chunk, chunk_g = _default_chunk(n_obs, layout.size**2), _default_chunk(n_obs, 4 * layout.size)
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise OptsensError(f"`chunk_size` must be a positive integer; got {chunk_size!r}.")
        else:
            chunk = chunk_g = int(chunk_size)
        self._model = _Model(g, _kind, penalty, layout)
        self._theta0 = theta0
        self._theta0_flat = layout.ravel(theta0)
        self._data = data
        self._n_obs = n_obs
        self._weights = _check_weights(weights, n_obs, self._theta0_flat.dtype)
        self._chunk, self._chunk_g = chunk, chunk_g
        self._chunk_size = chunk_size
        self._residual_rtol = float(residual_rtol)
        self._cond_max = float(cond_max)
        self._base_cache: _Base | None = None
        self._equation_cache: EstimatingEquation | None = None

    @classmethod
    def from_loss(
        cls,
        loss: Callable[..., Any],
        data: Any,
        theta0: Any,
        penalty: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> MEstimator:
        """The M-estimator minimising ``sum_n w_n loss(theta, datum_n) + penalty(theta)``.

        ``G`` is its gradient, ``g_n = grad_theta loss(theta, datum_n)`` and ``H`` its
        Hessian, which must be positive definite at ``theta0``.

        **Arguments:** `loss(theta, datum)` returns the scalar loss of one observation;
        `penalty(theta)` a scalar (or None); the rest as for `MEstimator`.
        """
        return cls(loss, data, theta0, penalty=penalty, _kind="loss", **kwargs)

    @classmethod
    def from_statsmodels(cls, results: Any, *, polish: bool = True, **kwargs: Any) -> MEstimator:
        """From fitted statsmodels OLS / WLS / GLM results; see `optsens._interop`."""
        from ._interop import from_statsmodels

        return from_statsmodels(cls, results, polish=polish, **kwargs)

    @classmethod
    def from_sklearn(
        cls, estimator: Any, X: Any, y: Any, *, sample_weight: Any = None, polish: bool = True, **kwargs: Any
    ) -> MEstimator:
        """From a fitted scikit-learn `LogisticRegression`, `Ridge` or `LinearRegression`
        and its training data; see `optsens._interop`."""
        from ._interop import from_sklearn

        return from_sklearn(cls, estimator, X, y, sample_weight=sample_weight, polish=polish, **kwargs)

    # ---------------------------------------------------------- attributes
    @property
    def theta(self) -> Any:
        """``theta0``, the fitted parameters."""
        return self._theta0

    @property
    def data(self) -> Any:
        return self._data

    @property
    def weights(self) -> jax.Array:
        return self._weights

    @property
    def n_obs(self) -> int:
        return self._n_obs

    @property
    def kind(self) -> str:
        """``"loss"`` (from `from_loss`) or ``"equation"``."""
        return self._model.kind

    @property
    def condition_number(self) -> float:
        return self._base().condition_number

    @property
    def newton_step_norm(self) -> float:
        """``||H^{-1} G(theta0)||_inf``: how far ``theta0`` is from the exact solution."""
        return self._base().newton_step_norm

    def __repr__(self) -> str:
        shapes = jax.tree_util.tree_map(lambda x: f"{x.dtype}{list(x.shape)}", self._theta0)
        base = self._base_cache
        checked = (
            f", newton_step={base.newton_step_norm:.2e}, cond={base.condition_number:.2e}" if base else ""
        )
        return (
            f"MEstimator(kind={self.kind}, n_obs={self._n_obs}, theta={shapes}, "
            f"penalty={'yes' if self._model.penalty is not None else 'no'}{checked})"
        )

    def _replace(self, theta0: Any = None, weights: Any = None) -> MEstimator:
        return type(self)(
            self._model.fn,
            self._data,
            self._theta0 if theta0 is None else theta0,
            penalty=self._model.penalty,
            weights=self._weights if weights is None else weights,
            chunk_size=self._chunk_size,
            residual_rtol=self._residual_rtol,
            cond_max=self._cond_max,
            _kind=self._model.kind,
        )

    # ------------------------------------------------------------- fitting
    def _tol(self, tol: float | None) -> float:
        """Newton's step tolerance: 1e-12 in float64; float32 cannot get below ~1e-6."""
        if tol is not None:
            return float(tol)
        return 1e-12 if self._theta0_flat.dtype == jnp.float64 else 1e-5

    def _objective_and_kind(self):
        if self._model.kind == "loss":
            return _TotalObjective(self._model), True
        return _TotalEquation(self._model), False

    def fit(self, theta_init: Any = None, *, tol: float | None = None, max_steps: int = 100) -> MEstimator:
        """Solve ``G(theta, w) = 0`` by damped Newton steps (`newton_solve`) from
        `theta_init` (default the current ``theta0``).

        **Returns:** a new `MEstimator` at the solution. Raises `NotASolutionError`
        if Newton does not converge.
        """
        start = self._theta0 if theta_init is None else as_float_tree(theta_init, "theta_init")
        fn, objective = self._objective_and_kind()
        solution = newton_solve(
            fn,
            start,
            0.0,
            args=(self._data, self._weights),
            objective=objective,
            tol=self._tol(tol),
            max_steps=max_steps,
        )
        return self._replace(theta0=solution)

    # -------------------------------------------------------------- checks
    def _base(self) -> _Base:
        if self._base_cache is not None:
            return self._base_cache
        g0, h = _base_kernel(self._model, self._theta0_flat, self._data, self._weights, self._chunk)
        g0_np, h_np = np.asarray(g0), np.asarray(h)
        names = self._model.theta.leaf_names()
        if not np.all(np.isfinite(h_np)) or not np.all(np.isfinite(g0_np)):
            rows = sorted(
                set(np.nonzero(~np.isfinite(h_np))[0].tolist()) | set(np.flatnonzero(~np.isfinite(g0_np)))
            )
            raise NonFiniteError(
                f"G or H = dG/dtheta at theta0 is not finite (in the rows of "
                f"{[names[i] for i in rows[:5]]}). Check theta0 and the model for overflow (log of 0, "
                "exp of a large number)."
            )
        if self._model.kind == "loss":
            solver: HessianSolver = CholeskySolver.factorise(h)
            if not solver.is_finite():
                eigvals = np.linalg.eigvalsh((h_np + h_np.T) / 2)
                scale = max(float(np.max(np.abs(eigvals))), np.finfo(float).tiny)
                if eigvals[0] < -1e-10 * scale:
                    n_negative = int(np.sum(eigvals < -1e-10 * scale))
                    raise IndefiniteHessianError(
                        f"The Hessian of the total loss at theta0 has {n_negative} "
                        f"negative eigenvalues (smallest {eigvals[0]:.3g}): theta0 is not a minimum. Call "
                        "`.fit()` (optsens expects a minimum of sum_n w_n loss_n + penalty)."
                    )
                self._raise_singular(float("inf"))
        else:
            solver = LUSolver.factorise(h)
            if not solver.is_finite():
                self._raise_singular(float("inf"))
        cond = float(np.linalg.cond(h_np))
        if not np.isfinite(cond) or cond > self._cond_max:
            self._raise_singular(cond)
        step = np.asarray(solver.solve(g0))
        step_norm = float(np.max(np.abs(step)))
        scale = max(1.0, float(np.max(np.abs(np.asarray(self._theta0_flat)))))
        if not np.isfinite(step_norm) or step_norm > self._residual_rtol * scale:
            raise NotASolutionError(
                f"`theta0` does not solve the estimating equation: |G(theta0)| = {np.linalg.norm(g0_np):.3g} "
                f"and the Newton step that would correct it has size {step_norm:.3g} (allowed: "
                f"`residual_rtol` * max(1, |theta0|) = {self._residual_rtol * scale:.3g}). Call `.fit()` "
                "first (or fit to a tighter tolerance), or raise `residual_rtol`."
            )
        self._base_cache = _Base(g0, h, solver, cond, step_norm)
        return self._base_cache

    def _raise_singular(self, cond: float):
        raise SingularHessianError(
            f"H = dG/dtheta at theta0 is numerically singular (condition number ~ {cond:.3g}, limit "
            f"`cond_max` = {self._cond_max:.3g}). The fit is not locally unique: add a penalty, remove "
            "collinear columns or redundant parameters, or raise `cond_max`."
        )

    def hessian(self) -> jax.Array:
        """The dense ``H = dG/dtheta`` at ``theta0`` over the flattened parameters (D x D)."""
        return self._base().hessian

    # ----------------------------------------------------------- influence
    def influence(self, qoi: Callable[..., Any] | None = None) -> Any:
        """First-order influence of every observation's weight, at ``w``.

        Without `qoi`: ``d theta_hat / d w_n = -H^{-1} g_n(theta0)``, n = 1..N
        (one solve with N right-hand sides). With `qoi` (``f(theta)`` returning any
        pytree, typically a scalar): ``d f(theta_hat) / d w_n =
        -(H^{-T} grad f(theta0))^T g_n(theta0)`` — one solve per output of `f`, then
        one forward pass over the data; nothing of size N x D is formed.

        Dropping observation ``n`` changes ``theta_hat`` by about ``-w_n`` times its
        influence (``+w_n H^{-1} g_n``): see `leave_out` for the fold version.

        **Returns:** a pytree shaped like `theta` (or like `qoi`'s output) whose
        leaves carry a leading axis of length N.

        **Example:** ``model.influence(qoi=lambda th: th[1])``, shape (N,).
        """
        base = self._base()
        if qoi is None:
            flat = _influence_kernel(self._model, base.inverse, self._theta0_flat, self._data, self._chunk_g)
            return self._model.theta.unravel(flat)
        if not callable(qoi):
            raise TypeError(f"`qoi` must be a function f(theta); got {type(qoi).__name__}.")
        try:
            out = jax.eval_shape(qoi, self._theta0)
        except Exception as exc:
            raise type(exc)(f"calling `qoi(theta0)` failed: {exc}") from exc
        out_layout = TreeLayout.of(out)
        flat = _qoi_influence_kernel(
            self._model, base.solver, self._theta0_flat, self._data, qoi, out_layout, self._chunk_g
        )
        return out_layout.unravel(flat)

    # ---------------------------------------------------------- leave-out
    def _fold_index(self, folds: Any) -> FoldIndex:
        fi = as_fold_index(folds, self._n_obs)
        positive = np.asarray(self._weights) > 0
        if positive.any():
            kept = positive.sum() - np.sum(positive[fi.index] & fi.valid, axis=1)
            empty = np.flatnonzero(kept == 0)
            if empty.size:
                raise OptsensError(
                    f"leaving out `folds`[{int(empty[0])}] drops every observation with a nonzero weight; "
                    "nothing is left to fit. Use smaller folds."
                )
        return fi

    def _fold_coef(self, fi: FoldIndex) -> jax.Array:
        """``delta = -w`` on each fold's members, 0 on the padding: (F, m)."""
        w = np.asarray(self._weights)
        return jnp.asarray(np.where(fi.valid, -w[fi.index], 0.0), self._theta0_flat.dtype)

    def _equation(self) -> EstimatingEquation:
        if self._equation_cache is None:
            self._base()  # the checks, on the same H
            idx = jnp.zeros((1,), jnp.int32)
            delta = jnp.zeros((1,), self._theta0_flat.dtype)
            eq = _build_equation(
                _WeightPath(self._model),
                self._model.kind,
                self._theta0,
                self._data,
                self._weights,
                idx,
                delta,
            )
            self._equation_cache = _with_args(eq, (self._data, self._weights, idx, delta))
        return self._equation_cache

    def fold_equation(self, fold: Any) -> EstimatingEquation:
        """The core `EstimatingEquation` of leaving out `fold` (a 1-D index array).

        Its ``eps`` is the scalar ``t``, ``eps0 = 0``, and
        ``G(theta, t) = sum_n w_n g_n(theta) + penalty - t sum_{n in fold} w_n g_n(theta)``:
        ``t = 1`` leaves the fold out. Use it with `taylor_expansion` or
        `implicit_optimum` (e.g. ``taylor_expansion(model.fold_equation(S), 4)(1.0)``).
        Built with the core's own checks (eagerly; for small problems).
        """
        fi = self._fold_index([fold])
        self._base()
        idx = jnp.asarray(fi.index[0], jnp.int32)
        delta = self._fold_coef(fi)[0]
        path = _WeightPath(self._model)
        args = (self._data, self._weights, idx, delta)
        eps0 = jnp.zeros((), self._theta0_flat.dtype)
        kwargs = {"args": args, "residual_rtol": self._residual_rtol, "cond_max": self._cond_max}
        if self._model.kind == "loss":
            return EstimatingEquation.from_objective(path, self._theta0, eps0, **kwargs)
        return EstimatingEquation(path, self._theta0, eps0, **kwargs)

    def _resolve_method(self, eq: EstimatingEquation, order: int, taylor_method: str) -> str:
        return taylor_expansion(eq, order, taylor_method).method_used

    def leave_out_coefficients(
        self, folds: Any = "loo", order: int = 2, *, taylor_method: str = "auto"
    ) -> Any:
        """The Taylor coefficients ``theta_1, ..., theta_K`` of ``theta_hat`` along each
        fold's path ``w(t) = w - t w 1_S`` (so ``theta_hat(-S) ~ theta0 + sum_k theta_k``).

        From the core engine: ``theta_k = -H^{-1} r_k``, ``r_k`` the ``t^k`` coefficient
        of ``G(theta0 + ... + theta_{k-1} t^{k-1}, t)``, vmapped over folds in one
        compiled kernel. ``|theta_k|^{-1/k}`` estimates the radius of convergence in
        ``t``: below 1, the series at ``t = 1`` should not be trusted.

        **Returns:** a pytree shaped like `theta` whose leaves carry leading axes
        ``(F, K)``.
        """
        order = _check_order(order)
        flat = self._leave_out_series(self._fold_index(folds), order, taylor_method)
        return self._model.theta.unravel(flat)

    def _leave_out_series(self, fi: FoldIndex, order: int, taylor_method: str) -> jax.Array:
        eq = self._equation()
        idx = jnp.asarray(fi.index, jnp.int32)
        delta = self._fold_coef(fi)
        method = self._resolve_method(
            _with_args(eq, (self._data, self._weights, idx[0], delta[0])), order, taylor_method
        )
        # the engine runs the Taylor recursion over the full data for each fold: a block
        # of folds holds about N (K + 1) values per fold and intermediate
        per_fold = self._n_obs * (order + 1) * max(1, self._model.theta.size // 4)
        out = _map_blocks(lambda i, c: _engine_fold_kernel(eq, order, method, i, c), (idx, delta), per_fold)
        self._check_finite_result(out, "leave_out")
        return out

    def _check_finite_result(self, out: jax.Array, what: str) -> None:
        bad = ~np.isfinite(np.asarray(out)).reshape(out.shape[0], -1).all(axis=1)
        if bad.any():
            raise NonFiniteError(
                f"`{what}` produced non-finite values for {int(bad.sum())} folds/draws (first: "
                f"{np.flatnonzero(bad)[:5].tolist()}). With method='newton' this means the Hessian without "
                "the fold is not positive definite (too little data left, or no penalty); with order > 1 "
                "that the model overflows along the path. Use method='ij' or smaller folds."
            )

    def leave_out(
        self, folds: Any = "loo", order: int = 1, *, method: str = "ij", taylor_method: str = "auto"
    ) -> Any:
        """Predicted fits without each fold, from the one fit at ``theta0``.

        Leaving out ``S`` moves the weights along ``w(t) = w - t w 1_S`` to ``t = 1``:

        - ``method="ij"`` (infinitesimal jackknife), order ``K``:
          ``theta_hat(-S) ~ theta0 + sum_{k=1..K} theta_k``; order 1 is
          ``theta0 + H^{-1} sum_{n in S} w_n g_n(theta0)``; higher orders from the
          core Taylor engine (`leave_out_coefficients`).
        - ``method="newton"`` (Newton step, "approximate leave-one-out"): one Newton
          step from ``theta0`` on the problem without ``S``,
          ``theta0 - (H - H_S)^{-1} (G(theta0) - g_S)``, with
          ``g_S = sum_{n in S} w_n g_n(theta0)`` and the rank-``|S|`` downdate
          ``H_S = sum_{n in S} w_n dg_n/dtheta(theta0)`` (solved by a fresh D x D
          factorisation per fold). Exact when the objective is quadratic (least
          squares); for GLMs with canonical link and LOO it is statsmodels'
          ``GLMInfluence.params_one``.

        **Arguments:** `folds`: ``"loo"``, a 2-D integer array (one fold per row), or a
        list of index arrays (see `optsens.kfold`, `optsens.leave_k_out`); `order`:
        the order of the IJ series (1 for ``"newton"``); `taylor_method`: the core
        engine's method for orders >= 2.

        **Returns:** a pytree shaped like `theta` with a leading fold axis.
        """
        return self._model.theta.unravel(self._leave_out_flat(folds, order, method, taylor_method))

    def _leave_out_flat(self, folds, order, method, taylor_method="auto") -> jax.Array:
        order = _check_order(order)
        if method not in _LEAVE_OUT_METHODS:
            raise OptsensError(f"`method` must be one of {_LEAVE_OUT_METHODS}; got {method!r}.")
        if method == "newton" and order != 1:
            raise OptsensError(
                f"method='newton' is a single Newton step and has no order; got `order`={order}. Use "
                "method='ij' for higher orders."
            )
        fi = self._fold_index(folds)
        if method == "ij" and order >= 2:
            return self._theta0_flat + jnp.sum(self._leave_out_series(fi, order, taylor_method), axis=1)
        return self._theta0_flat + self._fold_steps(fi, newton=method == "newton")

    def _fold_steps(self, fi: FoldIndex, newton: bool, check: bool = True) -> jax.Array:
        base = self._base()
        d = self._model.theta.size
        m = int(fi.index.shape[1])
        per_fold = min(m, self._chunk) * d * (d if newton else 1) + (d * d if newton else 0)
        chunk = min(self._chunk, m)

        def kernel(idx, coef):
            return _fold_step_kernel(
                self._model, base.inverse, self._theta0_flat, base.g0, base.hessian, self._data,
                idx, coef, chunk, newton,
            )  # fmt: skip

        out = _map_blocks(kernel, (jnp.asarray(fi.index, jnp.int32), self._fold_coef(fi)), per_fold)
        if check:
            self._check_finite_result(out, "leave_out")
        return out

    # ----------------------------------------------------------- bootstrap
    def bootstrap(
        self, n_draws: int, key: jax.Array, order: int = 1, *, method: str = "ij", taylor_method: str = "auto"
    ) -> Any:
        """Approximate nonparametric bootstrap: ``theta_hat`` at the weights
        ``w * counts_b`` of each draw, along ``v = w (counts_b - 1)`` from ``w``.

        ``method="ij"``: the order-`order` Taylor series at ``t = 1`` (order 1:
        ``theta0 - H^{-1} sum_n w_n (counts_n - 1) g_n(theta0)``); ``method="newton"``:
        one Newton step with the reweighted Hessian. Counts are those of
        ``optsens.bootstrap_counts(key, N, n_draws)``.

        **Returns:** a pytree shaped like `theta` with a leading axis of length `n_draws`.
        """
        if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
            raise OptsensError(f"`n_draws` must be a positive integer; got {n_draws!r}.")
        order = _check_order(order)
        if method not in _LEAVE_OUT_METHODS:
            raise OptsensError(f"`method` must be one of {_LEAVE_OUT_METHODS}; got {method!r}.")
        if method == "newton" and order != 1:
            raise OptsensError(f"method='newton' is a single Newton step; got `order`={order}.")
        keys = jax.random.split(key, int(n_draws))
        base = self._base()
        d = self._model.theta.size
        if method == "ij" and order >= 2:
            eq = self._equation()
            delta0 = jnp.zeros_like(self._weights)
            resolved = self._resolve_method(
                _with_args(eq, (self._data, self._weights, None, delta0)), order, taylor_method
            )
            per_draw = self._n_obs * (order + 1) * max(1, d // 4)
            kernel = lambda k: _engine_bootstrap_kernel(eq, order, resolved, k)  # noqa: E731
            out = jnp.sum(_map_blocks(kernel, (keys,), per_draw), axis=1)
        else:
            newton = method == "newton"
            per_draw = min(self._n_obs, self._chunk) * d * (d if newton else 1)

            def kernel(k):
                return _bootstrap_step_kernel(
                    self._model, base.inverse, self._theta0_flat, base.g0, base.hessian, self._data,
                    self._weights, k, self._chunk, newton,
                )  # fmt: skip

            out = _map_blocks(kernel, (keys,), per_draw)
        self._check_finite_result(out, "bootstrap")
        return self._model.theta.unravel(self._theta0_flat + out)

    # ------------------------------------------------------------------ CV
    def cv_score(
        self,
        folds: Any = "loo",
        loss_fn: Callable[..., Any] | None = None,
        order: int = 1,
        *,
        method: str = "ij",
        per_fold: bool = False,
        executor: concurrent.futures.Executor | None = None,
        progress: bool = False,
    ) -> Any:
        """Approximate cross-validation loss:
        ``sum_S sum_{n in S} w_n loss_fn(theta_hat(-S), datum_n) / sum_S sum_{n in S} w_n``,
        with ``theta_hat(-S)`` from `leave_out` (``method="ij"`` at `order`, or
        ``"newton"``) or from exact refits (``method="exact"``, see `refit`).

        **Arguments:** `loss_fn(theta, datum)`: the held-out loss of one observation
        (default the model's own `loss` for `from_loss`); `per_fold=True` returns the
        mean held-out loss of each fold instead.

        **Returns:** a scalar (or an (F,) array with `per_fold`).

        **Example:** choose a penalty by ``min(lams, key=lambda l: fit(l).cv_score(folds, order=2))``.
        """
        if loss_fn is None:
            if self._model.kind != "loss":
                raise OptsensError(
                    "`loss_fn` is required for an MEstimator built from an estimating function `g`: "
                    "pass loss_fn(theta, datum) to score the held-out observations."
                )
            loss_fn = self._model.fn
        elif not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be a function (theta, datum) -> scalar; got {type(loss_fn).__name__}."
            )
        if method not in _CV_METHODS:
            raise OptsensError(f"`method` must be one of {_CV_METHODS}; got {method!r}.")
        fi = self._fold_index(folds)
        if method == "exact":
            thetas = self._model.theta.ravel(self.refit(fi, executor=executor, progress=progress))
            thetas = jnp.asarray(np.asarray(thetas).reshape(fi.n_folds, -1))
        else:
            thetas = self._leave_out_flat(fi, order, method)
        w = np.asarray(self._weights)
        held = jnp.asarray(np.where(fi.valid, w[fi.index], 0.0), self._theta0_flat.dtype)
        row_size = int(fi.index.shape[1]) * self._model.theta.size

        def kernel(th, idx, c):
            return _held_out_loss_kernel(loss_fn, self._model.theta, th, self._data, idx, c)

        sums = _map_blocks(kernel, (thetas, jnp.asarray(fi.index, jnp.int32), held), row_size)
        if per_fold:
            return sums / jnp.sum(held, axis=1)
        return jnp.sum(sums) / jnp.sum(held)

    # --------------------------------------------------------------- refits
    def refit(
        self,
        folds: Any = "loo",
        executor: concurrent.futures.Executor | None = None,
        *,
        start: str = "newton",
        progress: bool = True,
        tol: float | None = None,
        max_steps: int = 100,
        tasks: int | None = None,
    ) -> Any:
        """Exact fits without each fold, by damped Newton (`newton_solve`) warm-started
        from an approximation.

        **Arguments:**

        - `folds`: as for `leave_out`.
        - `executor`: None (serial, with a progress bar) or any
          `concurrent.futures.Executor` (thread or process pool, a
          `dask.distributed` client's ``get_executor()``); the folds are split into
          `tasks` groups (default ``min(F, 64)``) submitted to it. With a process
          pool the `loss`/`g`/`penalty` functions must be picklable (defined at
          module level).
        - `start`: ``"newton"`` (the Newton-step prediction, default), ``"ij"``
          (first-order IJ) or ``"theta0"``.
        - `progress`: show a tqdm progress bar.
        - `tol`, `max_steps`: passed to `newton_solve` (`tol` default: 1e-12 in float64, 1e-5 in float32).

        **Returns:** a pytree shaped like `theta` with a leading fold axis.
        """
        fi = self._fold_index(folds)
        if start == "theta0":
            starts = np.broadcast_to(np.asarray(self._theta0_flat), (fi.n_folds, self._model.theta.size))
        elif start in ("newton", "ij"):
            steps = np.array(self._fold_steps(fi, newton=start == "newton", check=False))
            # where the prediction failed (H - H_S not positive definite), start from theta0
            steps[~np.isfinite(steps).all(axis=1)] = 0.0
            starts = np.asarray(self._theta0_flat) + steps
        else:
            raise OptsensError(f"`start` must be 'newton', 'ij' or 'theta0'; got {start!r}.")
        payload = _RefitPayload(
            self._model.fn,
            self._model.kind,
            self._model.penalty,
            self._theta0,
            self._data,  # JAX arrays: no transfer per refit; they pickle for process pools
            np.asarray(self._weights),
            bool(jax.config.jax_enable_x64),
            self._tol(tol),
            int(max_steps),
        )
        rows = [fi.members(f) for f in range(fi.n_folds)]
        results = np.empty((fi.n_folds, self._model.theta.size), dtype=np.asarray(self._theta0_flat).dtype)
        bar = _progress_bar(fi.n_folds, progress)
        try:
            if executor is None:
                for f in range(fi.n_folds):
                    results[f] = _refit_one(payload, f, rows[f], starts[f])
                    bar.update(1)
            else:
                n_tasks = min(fi.n_folds, 64 if tasks is None else max(1, int(tasks)))
                groups = np.array_split(np.arange(fi.n_folds), n_tasks)
                futures = {
                    executor.submit(_refit_group, payload, g, [rows[f] for f in g], starts[g]): g
                    for g in groups
                    if g.size
                }
                for future in concurrent.futures.as_completed(futures):
                    g = futures[future]
                    results[g] = future.result()
                    bar.update(g.size)
        finally:
            bar.close()
        return self._model.theta.unravel(jnp.asarray(results))


# -------------------------------------------------------------- refit tasks
@dataclasses.dataclass(frozen=True)
class _RefitPayload:
    """What a refit worker needs (picklable when the user's functions are)."""

    fn: Callable[..., Any]
    kind: str
    penalty: Callable[..., Any] | None
    theta0: Any
    data: Any
    weights: np.ndarray
    x64: bool
    tol: float
    max_steps: int

    def __reduce__(self):
        # Pickle arrays as NumPy: a worker process must switch on float64 (x64) before it
        # makes JAX arrays, or they would be truncated to float32 on unpickling.
        to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
        fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
        fields = fields[:3] + (to_numpy(self.theta0), to_numpy(self.data)) + fields[5:]
        return (_RefitPayload, fields)


def _refit_one(
    payload: _RefitPayload, fold_number: int, members: np.ndarray, start: np.ndarray
) -> np.ndarray:
    if bool(jax.config.jax_enable_x64) != payload.x64:
        jax.config.update("jax_enable_x64", payload.x64)
    model = _Model(payload.fn, payload.kind, payload.penalty, TreeLayout.of(payload.theta0))
    fn = _TotalObjective(model) if payload.kind == "loss" else _TotalEquation(model)
    weights = payload.weights.copy()
    weights[members] = 0.0
    try:
        solution = newton_solve(
            fn,
            model.theta.unravel(jnp.asarray(start)),
            0.0,
            args=(payload.data, jnp.asarray(weights)),
            objective=payload.kind == "loss",
            tol=payload.tol,
            max_steps=payload.max_steps,
        )
    except NotASolutionError as exc:
        raise NotASolutionError(f"the exact refit without fold {fold_number} failed: {exc}") from exc
    return np.asarray(model.theta.ravel(solution))


def _refit_group(
    payload: _RefitPayload, fold_numbers: Sequence[int], rows: Sequence[np.ndarray], starts
) -> np.ndarray:
    return np.stack(
        [_refit_one(payload, int(f), r, s) for f, r, s in zip(fold_numbers, rows, starts, strict=True)]
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="refits", unit="fold")
