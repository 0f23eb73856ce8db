"""`taylor_expansion`: the Taylor series of ``theta_hat(eps)`` (or of a quantity of
interest) from one factorisation of ``H``.

Along ``eps(t) = eps0 + t v`` write ``theta(t) = sum_k theta_k t^k``. Every Taylor
coefficient of ``G(theta(t), eps(t))`` vanishes, and the ``t^k`` one is linear in
``theta_k``:

    [t^k] G(theta(t), eps(t)) = H theta_k + r_k,
    r_k = [t^k] G(theta0 + theta_1 t + ... + theta_{k-1} t^{k-1}, eps0 + t v),

so ``theta_k = -H^{-1} r_k`` (Giordano, Jordan & Broderick 2019, "A Higher-Order
Swiss Army Infinitesimal Jackknife"). ``D^k theta_hat[v, ..., v] = k! theta_k``.
Each order costs one solve with the cached factorisation and one evaluation of
``r_k``, obtained by one of:

- ``"jet"``: Taylor mode (`optsens._series`), about ``k^2`` times the cost of
  ``G``; covers custom JVP rules and primitives without Taylor rules exactly;
- ``"jvp"``: ``k`` nested forward-mode derivatives of ``t -> G(...)``, about
  ``2^k`` times the cost of ``G`` and of its compilation; works for anything JAX
  can differentiate;
- ``"nested"``: nested derivatives of `implicit_optimum` (the baseline);
- ``"auto"``: ``"jet"``, falling back to ``"jvp"`` if Taylor mode cannot trace ``G``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _trust
from ._errors import NonFiniteError, OptsensError, PrecisionWarning
from ._flat import FlatProblem
from ._implicit import implicit_flat
from ._linear import HessianSolver
from ._problem import EstimatingEquation, _is_concrete
from ._pytree import TreeLayout
from ._series import SeriesState, propagate_series

__all__ = ["taylor_expansion", "TaylorExpansion", "TaylorPolynomial"]

METHODS = ("auto", "jet", "jvp", "nested")
# Cap on the number of directions `derivative_arrays` evaluates.
_MAX_ARRAY_DIRECTIONS = 20_000


# ------------------------------------------------------------------- kernels
def _poly(t, base, coefficients):
    """``base + sum_j coefficients[j] t^(j+1)`` by Horner's rule."""
    acc = jnp.zeros_like(base)
    for c in reversed(coefficients):
        acc = (acc + c) * t
    return base + acc


def _nth_derivative(fun: Callable, n: int) -> Callable:
    """``t -> d^n fun / dt^n`` by `n` nested forward-mode derivatives."""
    for _ in range(n):
        fun = (lambda f: lambda t: jax.jvp(f, (t,), (jnp.ones_like(t),))[1])(fun)
    return fun


def _zeros(n, dtype):
    return jnp.zeros((n,), dtype)


def _series_of_flat(closed, primals, series, order, n_out_leaves=1):
    """Run `propagate_series` and return the output series, zero-filled."""
    outs, out_series = propagate_series(closed, primals, series, order)
    filled = []
    for p, s in zip(outs, out_series, strict=True):
        filled.append([jnp.zeros_like(p)] * order if s is None else list(s))
    return outs, filled


def _theta_coefficients(problem: FlatProblem, solver: HessianSolver, theta0, eps0, args, v, order, method):
    """``[theta_1, ..., theta_order]`` (normalised coefficients) along `v`."""
    dtype = theta0.dtype
    d = theta0.shape[0]
    if method == "nested":
        theta_hat = implicit_flat(problem, solver, theta0, args)
        path = lambda t: theta_hat(eps0 + t * v)  # noqa: E731
        t0 = jnp.zeros((), dtype)
        return [_nth_derivative(path, k)(t0) / math.factorial(k) for k in range(1, order + 1)]

    coefficients: list[jax.Array] = []
    if method == "jet":
        # One online Taylor-mode pass over G: at order k every intermediate value of G
        # gets its t^k coefficient computed once, first with theta_k = 0 (giving r_k),
        # then corrected by the now known theta_k (one forward-mode sweep).
        closed = jax.make_jaxpr(lambda th, ep, a: problem.equation(th, ep, a))(theta0, eps0, args)
        arg_leaves = jax.tree_util.tree_leaves(args)
        n_args = len(arg_leaves)
        state = SeriesState(closed, [theta0, eps0, *arg_leaves], [True, True] + [False] * n_args)
        for k in range(1, order + 1):
            (r_k,) = state.extend([None, v if k == 1 else None] + [None] * n_args)
            theta_k = -solver.solve(_zeros(d, dtype) if r_k is None else r_k)
            coefficients.append(theta_k)
            if k < order:
                state.correct([theta_k, None] + [None] * n_args)
        return coefficients

    # method == "jvp": r_k = (1/k!) d^k/dt^k G(theta0 + ... + theta_{k-1} t^{k-1}, eps0 + t v)
    t0 = jnp.zeros((), dtype)
    for k in range(1, order + 1):
        known = list(coefficients)

        def residual_path(t, known=known):
            return problem.equation(_poly(t, theta0, known), eps0 + t * v, args)

        r_k = _nth_derivative(residual_path, k)(t0) / math.factorial(k)
        coefficients.append(-solver.solve(r_k))
    return coefficients


def _qoi_flat(qoi, problem: FlatProblem, out_layout: TreeLayout):
    def f(theta_flat, eps_flat):
        out = qoi(problem.theta.unravel(theta_flat), problem.eps.unravel(eps_flat))
        return out_layout.ravel(out)

    return f


@eqx.filter_jit
def _expansion_kernel(problem, solver, theta0, eps0, args, v, order, method, qoi, out_layout):
    """Normalised Taylor coefficients (order x Q) of theta or of the QoI along `v`."""
    coefficients = _theta_coefficients(problem, solver, theta0, eps0, args, v, order, method)
    if qoi is None:
        return jnp.stack(coefficients)
    f = _qoi_flat(qoi, problem, out_layout)
    dtype = theta0.dtype
    if method == "jet":
        closed = jax.make_jaxpr(f)(theta0, eps0)
        eps_series = [v] + [jnp.zeros_like(v)] * (order - 1)
        _, (q_series,) = _series_of_flat(closed, [theta0, eps0], [coefficients, eps_series], order)
        return jnp.stack(q_series)
    t0 = jnp.zeros((), dtype)
    if method == "nested":
        theta_hat = implicit_flat(problem, solver, theta0, args)
        path = lambda t: f(theta_hat(eps0 + t * v), eps0 + t * v)  # noqa: E731
    else:
        path = lambda t: f(_poly(t, theta0, coefficients), eps0 + t * v)  # noqa: E731
    return jnp.stack([_nth_derivative(path, k)(t0) / math.factorial(k) for k in range(1, order + 1)])


# -------------------------------------------------------------- method choice
_AUTO_CHOICE: dict[Any, tuple[str, str]] = {}


def _choose_method(eq: EstimatingEquation, order: int, qoi, out_layout) -> tuple[str, str]:
    """Taylor mode if it traces, else nested forward mode; cached per problem."""
    # The data's structure matters too: Taylor mode may trace for one and not another.
    key = (eq.problem, TreeLayout.of(eq.args), order, qoi, out_layout)
    if key in _AUTO_CHOICE:
        return _AUTO_CHOICE[key]
    v = jnp.zeros_like(eq.eps0_flat)
    args = (eq.problem, eq.solver, eq.theta0_flat, eq.eps0_flat, eq.args, v, order)
    try:
        eqx.filter_eval_shape(_expansion_kernel, *args, "jet", qoi, out_layout)
        choice = ("jet", "")
    except Exception as exc:  # any failure of Taylor mode: fall back, and say why
        reason = f"Taylor mode failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        choice = ("jvp", reason)
    _AUTO_CHOICE[key] = choice
    return choice


# ------------------------------------------------------------------ results
class TaylorPolynomial(eqx.Module):
    """The expansion as an explicit polynomial in ``eps - eps0``, from the full
    derivative arrays: ``value0 + sum_k (1/k!) T_k[d, ..., d]``, ``d = eps - eps0``.

    Cheap to evaluate at many points (tensor contractions only, no solves);
    `jax.vmap` and `jax.jit` work on it.
    """

    value0_flat: jax.Array
    arrays_flat: list  # T_k with shape (Q, p, ..., p)
    eps0_flat: jax.Array
    out_layout: TreeLayout = eqx.field(static=True)
    eps_layout: TreeLayout = eqx.field(static=True)

    def __call__(self, eps: Any, order: int | None = None) -> Any:
        order = len(self.arrays_flat) if order is None else _check_order_arg(order, len(self.arrays_flat))
        d = self.eps_layout.ravel(eps) - self.eps0_flat
        total = self.value0_flat
        for k, tensor in enumerate(self.arrays_flat[:order], start=1):
            term = tensor
            for _ in range(k):
                term = term @ d
            total = total + term / math.factorial(k)
        return self.out_layout.unravel(total)


@functools.partial(jax.jit, static_argnames=("problem", "order", "method", "qoi", "out_layout"))
def _checked_kernel(problem, solver, theta0, eps0, args, v, order, method, qoi, out_layout):
    """`_expansion_kernel` and whether all its coefficients are finite, in one call."""
    out = _expansion_kernel(problem, solver, theta0, eps0, args, v, order, method, qoi, out_layout)
    return out, jnp.all(jnp.isfinite(out))


@functools.partial(jax.jit, static_argnames=("layout", "as_derivatives"))
def _split_orders(flat, layout: TreeLayout, as_derivatives: bool) -> list[Any]:
    """Rows of `flat` as pytrees; times ``k!`` to turn coefficients into derivatives.
    Compiled, so K orders cost one dispatch rather than 2K small eager ones."""
    scale = [math.factorial(k + 1) if as_derivatives else 1 for k in range(flat.shape[0])]
    return [layout.unravel(flat[k] * scale[k]) for k in range(flat.shape[0])]


_TRACED_NON_FINITE = (
    "optsens: Taylor coefficients are not finite: G or its derivatives overflow along this "
    "direction (log(0), exp overflow, division by zero at (theta0, eps0)), or the direction "
    "holds NaN; evaluate outside jit / vmap for the orders concerned."
)


def _check_order_arg(order, available: int) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 0:
        raise ValueError(f"`order` must be a non-negative integer; got {order!r}.")
    if order > available:
        raise ValueError(
            f"`order`={order} is above the order of this expansion ({available}); "
            f"build it with taylor_expansion(eq, order={order})."
        )
    return int(order)


class TaylorExpansion(eqx.Module):
    """The order-`order` Taylor expansion of ``theta_hat(eps)`` (or of a quantity of
    interest ``f(theta_hat(eps), eps)``) about ``eps0``.

    Made by `taylor_expansion`. Attributes: `eq`, `order`, `method` (as requested),
    `method_used` (the path that computes the coefficients) and `fallback_reason`.
    """

    eq: EstimatingEquation
    order: int = eqx.field(static=True)
    method: str = eqx.field(static=True)
    qoi: Callable | None = eqx.field(static=True)
    out_layout: TreeLayout = eqx.field(static=True)
    value0: Any

    @property
    def method_used(self) -> str:
        if self.method != "auto":
            return self.method
        return _choose_method(self.eq, self.order, self.qoi, self.out_layout)[0]

    @property
    def fallback_reason(self) -> str:
        if self.method != "auto":
            return ""
        return _choose_method(self.eq, self.order, self.qoi, self.out_layout)[1]

    def __repr__(self) -> str:
        target = "theta" if self.qoi is None else f"qoi={getattr(self.qoi, '__name__', 'f')}"
        extra = f", fallback: {self.fallback_reason}" if self.fallback_reason else ""
        return (
            f"TaylorExpansion(order={self.order}, {target}, method={self.method!r}, "
            f"method_used={self.method_used!r}, solver={self.eq.solver_name}{extra})"
        )

    # --------------------------------------------------------- coefficients
    def _direction(self, v: Any, name: str = "v") -> jax.Array:
        layout = self.eq.problem.eps
        leaves = jax.tree_util.tree_leaves(v)
        treedef = jax.tree_util.tree_structure(v)
        shapes = tuple(tuple(np.shape(x)) for x in leaves)
        if treedef != layout.treedef or shapes != layout.shapes:
            raise OptsensError(
                f"`{name}` must be a pytree shaped like `eps0`: expected structure {layout.treedef} "
                f"with shapes {list(layout.shapes)}, got {treedef} with shapes {list(shapes)}. "
                f"Pass a pytree shaped like `eps0`."
            )
        flat = layout.ravel(v).astype(self.eq.theta0_flat.dtype)
        if _is_concrete(flat) and not np.all(np.isfinite(host := np.asarray(flat))):
            names = layout.leaf_names()
            bad = [names[i].replace("theta", "eps", 1) for i in np.nonzero(~np.isfinite(host))[0][:5]]
            raise NonFiniteError(f"`{name}` has non-finite entries (at {bad}); pass finite values.")
        return flat

    def _coefficients_flat(self, v_flat: jax.Array) -> jax.Array:
        eq = self.eq
        out, finite = _checked_kernel(
            eq.problem,
            eq.solver,
            eq.theta0_flat,
            eq.eps0_flat,
            eq.args,
            v_flat,
            self.order,
            self.method_used,
            self.qoi,
            self.out_layout,
        )
        if not _is_concrete(finite):  # under jit / vmap: a run-time error instead
            return eqx.error_if(out, ~finite, _TRACED_NON_FINITE)
        if not bool(finite):
            orders = sorted({int(i) + 1 for i in np.nonzero(~np.isfinite(np.asarray(out)))[0]})
            raise NonFiniteError(
                f"The Taylor coefficients of order {orders} are not finite. G or its derivatives "
                "overflow along this direction; check the model for log(0), exp overflow or "
                "divisions by zero at (theta0, eps0), or use a lower `order`."
            )
        return out

    def coefficients(self, v: Any) -> list[Any]:
        """The normalised Taylor coefficients ``[theta_1, ..., theta_K]`` along `v`:
        ``theta(t) = theta0 + sum_k theta_k t^k`` for ``eps = eps0 + t v``."""
        flat = self._coefficients_flat(self._direction(v))
        return _split_orders(flat, self.out_layout, False)

    def derivatives(self, v: Any) -> list[Any]:
        """``[D theta_hat[v], D^2 theta_hat[v, v], ..., D^K theta_hat[v, ..., v]]`` at
        ``eps0`` (``k! theta_k``), each shaped like `theta` (or like the QoI)."""
        flat = self._coefficients_flat(self._direction(v))
        return _split_orders(flat, self.out_layout, True)

    def __call__(self, eps: Any, order: int | None = None, *, resum: str | None = None) -> Any:
        """The truncated series at `eps`: ``theta0 + sum_{k <= order} theta_k`` along
        ``v = eps - eps0`` (``t = 1``). `jax.vmap` over `eps` works.

        With ``resum="pade"``, the per-coordinate Padé approximant built from the
        same coefficients (see `optsens.pade_approximant`); it runs eagerly, not under
        `jit` / `vmap`. Evaluating the plain series beyond the radius of convergence
        estimated from its coefficients (order >= 3) warns once per expansion
        (`BeyondRadiusWarning`); see `trust`.
        """
        order = self.order if order is None else _check_order_arg(order, self.order)
        if resum not in (None, "pade"):
            raise ValueError(f"`resum` must be None or 'pade'; got {resum!r}.")
        v = self._direction(eps, "eps") - self.eq.eps0_flat
        flat = self._coefficients_flat(v)
        if resum == "pade":
            return _trust.pade_at_step(self, flat[:order])
        _trust.warn_if_beyond_radius(self, flat, order, v)
        total = self.out_layout.ravel(self.value0) + jnp.sum(flat[:order], axis=0)
        return self.out_layout.unravel(total)

    # --------------------------------------------------- full derivative arrays
    def derivative_arrays(self) -> list[Any]:
        """The full derivative arrays ``d^k theta_hat / d eps^k`` at ``eps0``, k = 1..K.

        Each is a pytree shaped like `theta` (or the QoI) whose leaves carry ``k``
        extra trailing axes of length ``p`` (the number of entries of the flattened
        `eps`). They are recovered exactly from directional coefficients: ``theta_k(u)``
        is a homogeneous polynomial of degree ``k`` in ``u``, determined by its values
        on the simplex lattice ``{u = beta / K : beta in N^p, |beta| = K}``
        (``C(p+K-1, K)`` directions, evaluated in one batched kernel).
        """
        flat = self._derivative_arrays_flat()
        out = []
        for k, tensor in enumerate(flat, start=1):
            out.append(_unravel_with_trailing(self.out_layout, tensor, k))
        return out

    def _derivative_arrays_flat(self) -> list[jax.Array]:
        p, order = self.eq.eps0_flat.shape[0], self.order
        n_dirs = math.comb(p + order - 1, order)
        if n_dirs > _MAX_ARRAY_DIRECTIONS:
            raise ValueError(
                f"derivative_arrays needs {n_dirs} directions for p={p} hyperparameters at "
                f"order {order}; that is too many. Use `derivatives(v)` along the directions "
                "you need, or a lower `order`."
            )
        lattice = np.array([b for b in _compositions(order, p)], dtype=float)
        directions = jnp.asarray(lattice / order, self.eq.theta0_flat.dtype)
        coeffs = jax.vmap(self._coefficients_flat)(directions)  # (M, K, Q)
        arrays = []
        for k in range(1, order + 1):
            alphas = list(_compositions(k, p))
            vander = np.prod(np.asarray(directions)[:, None, :] ** np.array(alphas)[None], axis=-1)
            c, *_ = np.linalg.lstsq(vander, np.asarray(coeffs[:, k - 1, :]), rcond=None)
            alpha_factorial = np.array([np.prod([math.factorial(a) for a in al]) for al in alphas])
            unique = c * alpha_factorial[:, None]  # T_alpha, (m_k, Q)
            index = {al: i for i, al in enumerate(alphas)}
            tensor = np.empty((c.shape[1],) + (p,) * k)
            for idx in itertools.product(range(p), repeat=k):
                alpha = tuple(np.bincount(np.array(idx, dtype=int), minlength=p))
                tensor[(slice(None),) + idx] = unique[index[alpha]]
            arrays.append(jnp.asarray(tensor))
        return arrays

    def polynomial(self) -> TaylorPolynomial:
        """The expansion as an explicit polynomial (see `TaylorPolynomial`), for
        evaluating it at many `eps` without a solve per point."""
        return TaylorPolynomial(
            self.out_layout.ravel(self.value0),
            self._derivative_arrays_flat(),
            self.eq.eps0_flat,
            self.out_layout,
            self.eq.problem.eps,
        )

    # ------------------------------------------------ trust (see optsens._trust)
    def radius(self, v: Any) -> float:
        """Estimated radius of convergence along `v`: the series converges at
        ``eps0 + t v`` for ``|t| < radius(v)`` (units of ``t``; the distance in `eps`
        is ``radius(v) * ||v||``). From ratio tests on ``||theta_k||``,
        k = 1..order+2 (`optsens.estimate_radius`)."""
        return float(_trust.expansion_radius(self, v).radius)

    def error_estimate(self, eps: Any, order: int | None = None) -> float:
        """Estimated ``||theta_hat(eps) - ts(eps, order)||_2``: the first omitted terms
        and the rest of the tail as the Padé approximant of the series extended by two
        orders sums them, ``||P_{K+2}(eps) - ts(eps, order)||``
        (`optsens.truncation_error_estimate`); computes two orders more than the
        expansion has. Within 3x of the true error in 96% of random GLM cases inside
        the radius (docs/trust.md)."""
        order = self.order if order is None else _check_order_arg(order, self.order)
        return _trust.expansion_error(self, eps, order)

    def trust(self, eps: Any) -> _trust.TrustReport:
        """A `TrustReport` for ``ts(eps)``: the estimate, its error estimate, the
        radius along ``eps - eps0``, the Padé-resummed value as a second opinion and
        a verdict (``"reliable"``, ``"check"``, ``"unreliable"``).

        ```python
        print(ts.trust(eps))   # TrustReport (order 4, |eps - eps0| = 2) ...
        ```
        """
        return _trust.expansion_trust(self, eps)


def _compositions(total: int, parts: int):
    """All tuples of `parts` non-negative integers summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _unravel_with_trailing(layout: TreeLayout, tensor: jax.Array, k: int) -> Any:
    p_axes = tensor.shape[1:]
    leaves, start = [], 0
    for shape, size in zip(layout.shapes, layout.sizes, strict=True):
        piece = tensor[start : start + size].reshape(shape + p_axes)
        leaves.append(piece)
        start += size
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)


def _qoi_takes_eps(qoi: Callable) -> bool:
    try:
        params = inspect.signature(qoi).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def taylor_expansion(
    eq: EstimatingEquation,
    order: int,
    method: str = "auto",
    *,
    qoi: Callable | None = None,
) -> TaylorExpansion:
    """The order-`order` Taylor expansion of ``theta_hat(eps)`` about ``eps0``.

    Along a direction ``v``, ``theta_k = -H^{-1} r_k`` with ``r_k`` the ``t^k``
    coefficient of ``G(theta0 + ... + theta_{k-1} t^{k-1}, eps0 + t v)``; one
    factorisation of ``H`` serves all orders and directions.

    **Arguments:**

    - `eq`: an `EstimatingEquation`.
    - `order`: the number of derivatives, a positive integer.
    - `method`: ``"auto"`` (Taylor mode, else nested forward mode), ``"jet"``,
      ``"jvp"`` or ``"nested"`` (derivatives of `implicit_optimum`; slow baseline).
    - `qoi`: optional quantity of interest ``f(theta)`` or ``f(theta, eps)`` returning
      any pytree; the expansion is then of ``f(theta_hat(eps), eps)``.

    **Returns:** a `TaylorExpansion`: ``ts.derivatives(v)``, ``ts(eps)``,
    ``ts.derivative_arrays()``, ``ts.polynomial()``.

    **Example:**

    ```python
    ts = optsens.taylor_expansion(eq, order=6)
    ts.derivatives(1.0)        # D^k theta_hat[1, ..., 1], k = 1..6
    jax.vmap(ts)(eps_grid)     # the approximation at many eps
    ```
    """
    if not isinstance(eq, EstimatingEquation):
        raise TypeError(f"`eq` must be an optsens.EstimatingEquation; got {type(eq).__name__}.")
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"`order` must be a positive integer; got {order!r}.")
    order = int(order)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    if order >= 2 and eq.theta0_flat.dtype != jnp.float64:
        warnings.warn(
            f"`theta0` is {eq.theta0_flat.dtype}: derivatives of order {order} lose most of "
            "their digits in single precision. Enable float64 with "
            "jax.config.update('jax_enable_x64', True) and pass float64 arrays.",
            PrecisionWarning,
            stacklevel=2,
        )
    if qoi is not None:
        if not callable(qoi):
            raise TypeError(f"`qoi` must be a function f(theta) or f(theta, eps); got {type(qoi).__name__}.")
        user_qoi = qoi
        if not _qoi_takes_eps(user_qoi):
            qoi = _ThetaOnly(user_qoi)
        try:
            value0 = qoi(eq.theta0, eq.eps0)
        except Exception as exc:
            raise type(exc)(f"calling `qoi` at (theta0, eps0) failed: {exc}") from exc
        value0 = jax.tree_util.tree_map(jnp.asarray, value0)
        out_layout = TreeLayout.of(value0)
    else:
        value0 = eq.theta0
        out_layout = eq.problem.theta
    return TaylorExpansion(eq, order, method, qoi, out_layout, value0)


class _ThetaOnly:
    """Adapts ``f(theta)`` to ``f(theta, eps)``; hashable by the wrapped function so
    compiled kernels are shared."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "qoi")

    def __call__(self, theta, eps):
        del eps
        return self.fn(theta)

    def __hash__(self):
        return hash((_ThetaOnly, self.fn))

    def __eq__(self, other):
        return isinstance(other, _ThetaOnly) and other.fn is self.fn
