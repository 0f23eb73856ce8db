"""How far a Taylor answer holds: radius of convergence, truncation error, Padé
resummation and checks against exact refits.

Along ``eps(t) = eps0 + t v`` the expansion is ``theta(t) = sum_k theta_k t^k``.
Its own coefficients say where it can be trusted:

- **radius of convergence** ``R`` (in units of ``t``): by Cauchy–Hadamard
  ``1/R = limsup_k ||theta_k||^{1/k}``; if ``||theta_k|| ~ C R^{-k}`` the slope of
  ``log ||theta_k||`` against ``k`` is ``-log R`` (the ratio test, free of the
  constant ``C`` and of the units of ``theta``, unlike the root test). Taken over
  the last orders and over all of them, from the upper envelope of the
  coefficients, so a zero or negligible coefficient (an even or odd function, a
  coordinate that does not move) does not fake a small radius.
- **truncation error** at ``t``: the first omitted terms ``T_j = theta_j t^j``,
  ``j = K+1, K+2``, and the rest of the tail as the Padé approximant of the
  longer series extrapolates it (for a geometric tail, ``T_{K+1} / (1 - rho)``
  with ``rho`` the ratio of successive terms).
- **Padé approximants** ``p(t)/q(t)`` per coordinate from the same coefficients,
  which continue the series past a pole or along a saturating curve.

The functions on arrays here know nothing of `TaylorExpansion`; the ones that take
an expansion (`expansion_trust`, `validate_expansion`, ...) use its public
interface and build the two-orders-longer expansion they need themselves.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import NonFiniteError, OptsensError

__all__ = [
    "BeyondRadiusWarning",
    "RadiusEstimate",
    "estimate_radius",
    "truncation_error_estimate",
    "PadeApproximant",
    "pade_coefficients",
    "pade_approximant",
    "TrustReport",
    "ValidationTable",
    "validate_expansion",
]

# A coefficient whose term at t = 1 is below this fraction of the scale of the
# series (|value0| and its largest term) is rounding noise, not information
# (in float64; 1e3 machine epsilons in lower precision).
_NOISE_RTOL = 1e-13


def _noise_rtol(coefficients) -> float:
    dtype = getattr(coefficients, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.floating):
        return max(_NOISE_RTOL, 1e3 * float(np.finfo(dtype).eps))
    return _NOISE_RTOL


# The error estimate needs this many orders beyond the expansion's own.
EXTRA_ORDERS = 2


class BeyondRadiusWarning(UserWarning):
    """A Taylor series was evaluated beyond its estimated radius of convergence."""


# ---------------------------------------------------------------- the radius
class RadiusEstimate(NamedTuple):
    """The estimated radius of convergence of ``sum_k theta_k t^k`` in ``t``.

    - `radius`: the estimate used, ``min(ratio, baseline)`` (`root` when only one
      order is informative); ``inf`` when the series is a polynomial to working
      precision (no coefficient beyond the first above rounding level, or the last
      two or more orders at rounding level where the trend of the others says they
      would be clearly visible).
    - `ratio`: ratio test over the last orders: ``exp(-slope)`` of the
      least-squares line through ``(k, log ||theta_k||)``.
    - `baseline`: ratio test over all orders, ``min_k (a_j / a_k)^{1/(k-j)}`` from
      the first informative order ``j``.
    - `root`: root test, ``min_k ||theta_k||^{-1/k}``; for information only: unlike
      the others it depends on the units of ``theta``.
    - `orders`: the orders ``k`` the last-orders estimates rest on.
    """

    radius: float
    ratio: float
    baseline: float
    root: float
    orders: tuple[int, ...]


def _norms(coefficients) -> np.ndarray:
    c = np.asarray(coefficients, dtype=float)
    return np.linalg.norm(c.reshape(c.shape[0], -1), axis=1)


def _unbounded(orders=()) -> RadiusEstimate:
    return RadiusEstimate(math.inf, math.inf, math.inf, math.inf, tuple(int(k) for k in orders))


def estimate_radius(coefficients, value0=None) -> RadiusEstimate:
    """Estimate the radius of convergence of ``sum_k theta_k t^k`` from its
    coefficients ``theta_1, ..., theta_N``.

    With ``a_k = ||theta_k||_2`` and ``a_k ~ C R^{-k}`` (Cauchy–Hadamard:
    ``1/R = limsup a_k^{1/k}``),

    - ratio test over the last orders ``W``: ``log a_k ~ alpha - k log R`` fitted by
      least squares, after one pass that drops orders more than 10 times below the
      line (the dips of an oscillating series, a coefficient that happens to vanish);
    - ratio test over all orders: ``R ~ min_{k in W} (a_j / a_k)^{1/(k-j)}``, ``j``
      the first informative order (it catches a singularity that the last few
      orders, caught in an oscillation, hide);
    - ``R = min`` of the two. Neither depends on the units of ``theta`` or on the
      constant ``C`` (which biases the root test ``a_k^{-1/k}``, also reported).

    ``W`` holds the last ``max(3, ceil(n/2))`` of the ``n`` informative orders:
    those whose term at ``t = 1`` exceeds ``1e-13`` (float64; ``1e3`` machine
    epsilons in lower precision) times the scale of the series
    (``max(||value0||, max_k a_k)``), so that exact zeros and rounding noise (odd
    coefficients of an even function, a series that is a polynomial) are ignored.
    The answer is in units of ``t``: along ``eps = eps0 + t v`` the series
    converges for ``|t| < R``.

    **Arguments:**

    - `coefficients`: array ``(N, ...)`` of the normalised coefficients
      ``theta_k`` (``k = 1..N``), or a list of equally shaped arrays.
    - `value0`: optional ``theta_0``, only used for the scale of the noise floor.

    **Returns:** a `RadiusEstimate`.

    **Example:**

    ```python
    est = estimate_radius(np.array([0.5 ** k for k in range(1, 9)]))
    est.radius  # 2.0: the series of 1 / (1 - t / 2)
    ```
    """
    rtol = _noise_rtol(coefficients)
    a = _norms(coefficients)
    if a.size == 0:
        return _unbounded()
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(
            "estimate_radius received non-finite Taylor coefficients (orders "
            f"{[int(k) + 1 for k in np.nonzero(~np.isfinite(a))[0]]}); the expansion overflowed."
        )
    value_scale = float(np.linalg.norm(np.asarray(value0, float))) if value0 is not None else 0.0
    scale = max(float(a.max()), value_scale)
    orders = np.arange(1, a.size + 1)
    informative = orders[a > rtol * scale] if scale > 0 else orders[:0]
    # Only the first order is above rounding: a polynomial to working precision.
    if informative.size == 0 or (informative.size == 1 and informative[0] == 1):
        return _unbounded(informative)
    m = max(3, math.ceil(informative.size / 2))
    window = informative[-m:]
    window = window[window > 1] if window.size > 2 else window
    log_a = np.log(a[window - 1])
    root = float(np.min(np.exp(-log_a / window)))
    # Two or more trailing orders at rounding level where the trend says they should
    # be clearly visible: the series terminates (a polynomial), not a radius.
    last = int(informative[-1])
    floor = math.log(rtol * scale)
    if window.size < 2:
        if a.size - last >= 2:
            return _unbounded(window)
        return RadiusEstimate(root, math.nan, math.nan, root, tuple(int(k) for k in window))
    slope, intercept = np.polyfit(window, log_a, 1)
    keep = log_a >= intercept + slope * window - math.log(10.0)
    if keep.sum() >= 2 and not keep.all():
        window, log_a = window[keep], log_a[keep]
        slope, intercept = np.polyfit(window, log_a, 1)
        root = float(np.min(np.exp(-log_a / window)))
    if a.size - last >= 2 and intercept + slope * (last + 2) > floor + math.log(1e3):
        return _unbounded(window)
    ratio = float(np.exp(-slope))
    first = int(informative[0])
    later = window[window > first]
    baseline = (
        float(np.min((a[first - 1] / a[later - 1]) ** (1.0 / (later - first)))) if later.size else math.inf
    )
    return RadiusEstimate(min(ratio, baseline), ratio, baseline, root, tuple(int(k) for k in window))


# ----------------------------------------------------------- truncation error
def _geometric_tail(terms: np.ndarray, order: int) -> float:
    """``||T_{K+1} + T_{K+2} / (1 - rho)||``, rho the signed ratio of the two terms."""
    first = terms[order]
    if terms.shape[0] == order + 1:
        return float(np.linalg.norm(first))
    second = terms[order + 1]
    denom = float(first @ first)
    if denom == 0.0:
        return float(np.linalg.norm(second))
    one_minus_rho = 1.0 - float(second @ first) / denom
    if abs(one_minus_rho) < 0.1:  # at a pole on the path: the tail is not summable
        return math.inf
    return float(np.linalg.norm(first + second / one_minus_rho))


def truncation_error_estimate(coefficients, order: int, value0=None, t: float = 1.0) -> float:
    """Estimate ``||theta(t) - sum_{k<=order} theta_k t^k||_2`` from the first
    omitted terms, summed by Padé resummation.

    With the coefficients ``theta_1..theta_N`` (``N > order``, typically
    ``order + 2``) and ``P_N(t)`` the per-coordinate Padé approximant of
    ``theta_0 + sum_{k<=N} theta_k t^k`` (degrees ``[N - floor(N/2) / floor(N/2)]``,
    see `pade_coefficients`),

        error ~ || P_N(t) - sum_{k<=order} theta_k t^k - theta_0 ||.

    Inside the radius this is the first omitted terms ``T_{K+1} + T_{K+2}`` plus
    the rest of the tail as the approximant extrapolates it: for a geometric tail
    (one pole) it is exactly ``T_{K+1} / (1 - rho)``, whatever ``rho``, so the
    estimate stays meaningful past the radius, where the truncation error grows with
    the order. If the approximant has a pole at ``t`` the estimate falls back to
    ``||T_{K+1} + T_{K+2} / (1 - rho)||`` with ``rho = <T_{K+2}, T_{K+1}> / ||T_{K+1}||^2``
    (``inf`` when ``rho`` is within 0.1 of 1).

    **Arguments:**

    - `coefficients`: array ``(N, ...)`` of ``theta_1..theta_N`` with ``N > order``.
    - `order`: the truncation order ``K``.
    - `value0`: ``theta_0`` (default zeros); the Padé approximant depends on it.
    - `t`: the step along the direction (1 when the coefficients are along
      ``eps - eps0``).

    **Returns:** the estimated 2-norm of the truncation error (a float).

    **Example:**

    ```python
    c = np.array([[0.5 ** k] for k in range(1, 5)])   # 1 / (1 - t/2) - 1
    truncation_error_estimate(c, order=2)            # 0.25 = sum_{k>2} 2^-k
    ```
    """
    c = np.asarray(coefficients, dtype=float)
    c = c.reshape(c.shape[0], -1)
    if c.shape[0] <= order:
        raise ValueError(
            f"truncation_error_estimate needs the coefficients up to order {order + 1} (at least "
            f"one omitted term); got {c.shape[0]}. Expand to a higher `order`."
        )
    c0 = np.zeros(c.shape[1]) if value0 is None else np.asarray(value0, dtype=float).ravel()
    terms = c * (float(t) ** np.arange(1, c.shape[0] + 1))[:, None]
    pade = pade_from_coefficients(c0, terms, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        resummed = np.asarray(pade.numerators).sum(axis=1) / np.asarray(pade.denominators).sum(axis=1)
    if not np.all(np.isfinite(resummed)):
        return _geometric_tail(terms, order)
    return float(np.linalg.norm(resummed - c0 - terms[:order].sum(axis=0)))


# ----------------------------------------------------------------------- Padé
def pade_coefficients(taylor, m: int, n: int, tol: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """The ``[m/n]`` Padé approximant ``p(t)/q(t)`` of a scalar power series,
    computed robustly (Gonnet, Güttel & Trefethen 2013, "Robust Padé approximation
    via SVD", SIAM Review 55(1)).

    ``p`` (degree ``<= m``) and ``q`` (degree ``<= n``, ``q(0) = 1``) satisfy
    ``q(t) f(t) - p(t) = O(t^{m+n+1})`` for ``f(t) = sum_k c_k t^k``. The
    denominator is the null vector of the ``n x (n+1)`` Toeplitz matrix
    ``[c_{m+i-j}]`` (``i = 1..n``, ``j = 0..n``); singular values below ``tol``
    times ``||c||`` reduce ``m`` and ``n`` together until that matrix has full
    rank, which removes spurious pole–zero pairs (Froissart doublets).

    **Arguments:** `taylor`: ``c_0..c_{m+n}``; `m`, `n`: the degrees; `tol`:
    relative tolerance.

    **Returns:** ``(a, b)``, the coefficients of ``p`` and ``q`` in increasing
    powers, ``b[0] = 1``.
    """
    c = np.asarray(taylor, dtype=float).ravel()
    if c.size < m + n + 1:
        raise ValueError(f"a [{m}/{n}] Padé approximant needs {m + n + 1} Taylor coefficients; got {c.size}.")
    c = c[: m + n + 1]
    scale = float(np.linalg.norm(c))
    if scale == 0.0 or np.max(np.abs(c[: m + 1])) <= tol * np.max(np.abs(c)):
        return np.zeros(1), np.ones(1)
    threshold = tol * scale
    while True:
        if n == 0:
            return c[: m + 1].copy(), np.ones(1)
        # z[i, j] = c_{i - j}: the convolution of c with the denominator.
        idx = np.arange(m + n + 1)[:, None] - np.arange(n + 1)[None, :]
        z = np.where(idx >= 0, c[np.clip(idx, 0, None)], 0.0)
        lower = z[m + 1 : m + n + 1]
        sv = np.linalg.svd(lower, compute_uv=False)
        rank = int(np.sum(sv > threshold))
        if rank == n:
            break
        m, n = m - (n - rank), rank
        if m < 0:
            return np.zeros(1), np.ones(1)
    _, _, vt = np.linalg.svd(lower)
    b = vt[-1]
    # Reweighting step of Gonnet et al.: favours a denominator with no tiny entries.
    weights = np.abs(b) + np.sqrt(np.finfo(float).eps)
    q_mat, _ = np.linalg.qr((lower * weights).T, mode="complete")
    b = weights * q_mat[:, -1]
    b = b / np.linalg.norm(b)
    a = z[: m + 1] @ b
    lead = np.nonzero(np.abs(b) > tol)[0]
    b, a = b[lead[0] :], a[lead[0] :]
    b = b[: np.nonzero(np.abs(b) > tol)[0][-1] + 1]
    nonzero = np.nonzero(np.abs(a) > threshold)[0]
    a = a[: nonzero[-1] + 1] if nonzero.size else np.zeros(1)
    return a / b[0], b / b[0]


class PadeApproximant(eqx.Module):
    """Per-coordinate Padé approximants ``p_i(t) / q_i(t)`` of a Taylor expansion
    along one direction ``v`` (``eps = eps0 + t v``).

    Evaluation is plain JAX (`jit`, `vmap` over `t` work). `poles()` lists the
    roots of each denominator: the singularities the series sees.
    """

    numerators: jax.Array  # (Q, m+1), increasing powers, zero-padded
    denominators: jax.Array  # (Q, n+1)
    out_layout: Any = eqx.field(static=True)

    def __call__(self, t: float = 1.0) -> Any:
        """The approximant at ``eps0 + t v``, shaped like the expansion's output."""
        t = jnp.asarray(t, self.numerators.dtype)
        p = jnp.polyval(self.numerators[:, ::-1].T, t)
        q = jnp.polyval(self.denominators[:, ::-1].T, t)
        return self.out_layout.unravel(p / q)

    def poles(self) -> list[np.ndarray]:
        """The roots of each coordinate's denominator ``q_i`` (complex, in units of ``t``)."""
        out = []
        for b in np.asarray(self.denominators):
            nz = np.nonzero(b)[0]
            out.append(np.roots(b[: nz[-1] + 1][::-1]) if nz.size > 1 else np.zeros(0, complex))
        return out


def _default_degrees(order: int) -> tuple[int, int]:
    n = order // 2
    return order - n, n


def _pade_batch(series: np.ndarray, m: int, n: int, tol: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """`pade_coefficients` for every column of `series` ((m+n+1, Q)); zero-padded
    ``(Q, m+1)`` and ``(Q, n+1)`` arrays. The common case (full rank, no degree
    reduction) is done for all columns at once; the others one by one."""
    q_count = series.shape[1]
    nums = np.zeros((q_count, m + 1))
    dens = np.zeros((q_count, n + 1))
    dens[:, 0] = 1.0
    if q_count == 0:
        return nums, dens
    c = series[: m + n + 1].T  # (Q, m+n+1)
    scale = np.linalg.norm(c, axis=1)
    trivial = (scale == 0) | (np.max(np.abs(c[:, : m + 1]), axis=1) <= tol * np.max(np.abs(c), axis=1))
    slow = np.zeros(q_count, bool)
    if n == 0:
        nums[~trivial] = c[~trivial, : m + 1]
        return nums, dens
    idx = np.arange(m + n + 1)[:, None] - np.arange(n + 1)[None, :]
    z = np.where(idx >= 0, c[:, np.clip(idx, 0, None)], 0.0)  # (Q, m+n+1, n+1)
    lower = z[:, m + 1 : m + n + 1]  # (Q, n, n+1)
    _, sv, vt = np.linalg.svd(lower)
    full = np.sum(sv > tol * scale[:, None], axis=1) == n
    b = vt[:, -1, :]
    weights = np.abs(b) + np.sqrt(np.finfo(float).eps)
    q_mat, _ = np.linalg.qr(np.swapaxes(lower * weights[:, None, :], 1, 2), mode="complete")
    b = weights * q_mat[:, :, -1]
    ok = full & ~trivial & (np.abs(b[:, 0]) > tol * np.linalg.norm(b, axis=1))
    a = np.einsum("qij,qj->qi", z[:, : m + 1], b)
    nums[ok] = a[ok] / b[ok, :1]
    dens[ok] = b[ok] / b[ok, :1]
    slow = ~ok & ~trivial
    for i in np.nonzero(slow)[0]:
        a_i, b_i = pade_coefficients(series[:, i], m, n, tol)
        nums[i] = 0.0
        dens[i] = 0.0
        nums[i, : a_i.size] = a_i
        dens[i, : b_i.size] = b_i
    return nums, dens


def pade_from_coefficients(value0_flat, coefficients_flat, out_layout, degrees=None) -> PadeApproximant:
    """Per-coordinate Padé approximants from ``theta_0`` (Q,) and ``theta_1..K`` (K, Q)."""
    c0 = np.asarray(value0_flat, dtype=float).ravel()
    ck = np.asarray(coefficients_flat, dtype=float)
    ck = ck.reshape(ck.shape[0], -1)
    order = ck.shape[0]
    m, n = _default_degrees(order) if degrees is None else degrees
    if m < 0 or n < 0 or m + n > order:
        raise ValueError(
            f"`degrees`=({m}, {n}) needs m + n <= order = {order} and non-negative degrees; "
            f"use e.g. {_default_degrees(order)}."
        )
    series = np.concatenate([c0[None, :], ck], axis=0)  # (K+1, Q)
    nums, dens = _pade_batch(series, m, n)
    return PadeApproximant(jnp.asarray(nums), jnp.asarray(dens), out_layout)


def pade_approximant(ts, v: Any, degrees: tuple[int, int] | None = None) -> PadeApproximant:
    """Per-coordinate Padé approximants of an expansion along `v`.

    For each output coordinate ``i``, the ``[m/n]`` approximant ``p_i(t)/q_i(t)``
    agrees with ``theta_i(t) = sum_{k<=K} theta_{k,i} t^k`` up to ``t^{m+n}``
    (default ``n = floor(K/2)``, ``m = K - n``). It is exact when ``theta_i(t)`` is a
    rational function of degrees within ``(m, n)``, e.g. ridge regression's
    ``(A + lam I)^{-1} b`` in ``lam``.

    **When it helps:** the series is limited by a pole (``R`` = distance to the
    nearest singularity in the complex plane) but the function is smooth along the
    real path: Padé places a pole there and keeps tracking the function beyond
    ``R``. Saturating curves (``theta -> const`` as ``t`` grows, as in logistic
    models) are also captured by ``m = n``. It does not help when the function
    itself stops existing (a fold where the optimum disappears) and can produce a
    spurious pole between ``0`` and ``t``: check `poles()` and compare with a refit.

    **Arguments:** `ts` a `TaylorExpansion`, `v` a direction shaped like `eps0`,
    `degrees` optional ``(m, n)`` with ``m + n <= ts.order``.

    **Returns:** a `PadeApproximant`; ``approx(t)`` is its value at ``eps0 + t v``.
    """
    v_flat = ts._direction(v)
    _require_concrete(v_flat, "pade_approximant")
    coefficients = np.asarray(ts._coefficients_flat(v_flat))
    return pade_from_coefficients(ts.out_layout.ravel(ts.value0), coefficients, ts.out_layout, degrees)


def pade_at_step(ts, coefficients_flat) -> Any:
    """``ts(eps, resum="pade")``: the Padé approximant at ``t = 1`` from the
    coefficients along ``eps - eps0``."""
    _require_concrete(coefficients_flat, "resum='pade'")
    value0 = np.asarray(ts.out_layout.ravel(ts.value0))
    approx = pade_from_coefficients(value0, np.asarray(coefficients_flat), ts.out_layout)
    return approx(1.0)


# ------------------------------------------------------ expansions: glue code
def _extended(ts, extra: int = EXTRA_ORDERS):
    """The same expansion, `extra` orders longer (same method, QoI and problem)."""
    return dataclasses.replace(ts, order=ts.order + extra, method=ts.method_used)


def _concrete(x) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def _require_concrete(x, what: str) -> None:
    if not _concrete(x):
        raise OptsensError(
            f"{what} inspects the numbers of the coefficients, so it cannot run under "
            "jax.jit or jax.vmap; call it outside, e.g. in a Python loop over `eps`."
        )


def _step(ts, eps, name: str = "eps") -> jax.Array:
    """The flat direction ``d = eps - eps0`` (so ``t = 1`` at `eps`)."""
    return ts._direction(eps, name) - ts.eq.eps0_flat


def extended_coefficients(ts, d_flat, extra: int = EXTRA_ORDERS) -> np.ndarray:
    """``theta_1..theta_{K+extra}`` along the flat direction `d_flat` (numpy, (K+extra, Q))."""
    # Built directly, not through `taylor_expansion`: no second float32 warning for
    # the two extra orders of an estimate.
    return np.asarray(_extended(ts, extra)._coefficients_flat(d_flat))


def expansion_radius(ts, v: Any) -> RadiusEstimate:
    """`estimate_radius` for the expansion along `v`, with `EXTRA_ORDERS` more orders."""
    v_flat = ts._direction(v, "v")
    _require_concrete(v_flat, "radius")
    coefficients = extended_coefficients(ts, v_flat)
    return estimate_radius(coefficients, ts.out_layout.ravel(ts.value0))


def expansion_error(ts, eps: Any, order: int | None = None) -> float:
    """`truncation_error_estimate` of ``ts(eps, order)`` (the first omitted terms)."""
    order = ts.order if order is None else order
    d = _step(ts, eps)
    _require_concrete(d, "error_estimate")
    value0 = np.asarray(ts.out_layout.ravel(ts.value0))
    return truncation_error_estimate(extended_coefficients(ts, d), order, value0)


# ------------------------------------------------------------- the report
_VERDICTS = {
    "reliable": "well inside the radius, and the omitted terms are small",
    "check": "near the radius, or the omitted terms are not small: compare with a refit",
    "unreliable": "beyond the estimated radius, where the series diverges: refit, or try resum='pade'",
}


@dataclasses.dataclass(frozen=True)
class TrustReport:
    """How far ``ts(eps)`` can be trusted; made by ``TaylorExpansion.trust(eps)``.

    - `value`: the order-`order` estimate ``ts(eps)`` (a pytree).
    - `error_estimate`: estimated ``||theta_hat(eps) - ts(eps)||_2``
      (`truncation_error_estimate` with two more orders).
    - `relative_error`: `error_estimate` over ``||ts(eps) - value0||_2``, the size
      of the predicted change.
    - `step`: ``||eps - eps0||_2``.
    - `radius`: estimated radius of convergence along ``eps - eps0``, in the units
      of `step` (the series converges for steps shorter than this).
    - `radius_detail`: the `RadiusEstimate` in units of ``t`` (``t = 1`` at `eps`).
    - `beyond_radius`: ``step >= radius``.
    - `resummed`: the per-coordinate Padé approximant of the series extended by
      two orders, at `eps` (`error_estimate` is its distance to `value`).
    - `verdict`: ``"reliable"`` (step under 0.7 of the radius and relative error
      under 10%), ``"unreliable"`` (beyond the radius) or ``"check"``.
    """

    value: Any
    order: int
    error_estimate: float
    relative_error: float
    step: float
    radius: float
    radius_detail: RadiusEstimate
    beyond_radius: bool
    resummed: Any
    verdict: str

    def __repr__(self) -> str:
        frac = self.step / self.radius if self.radius > 0 else math.inf
        detail = self.radius_detail
        lines = [
            f"TrustReport (order {self.order}, |eps - eps0| = {self.step:.4g})",
            f"  estimate        {_describe(self.value)}",
            f"  error estimate  {self.error_estimate:.3g}  (relative: {self.relative_error:.3g})",
            f"  radius          {self.radius:.4g}  (the step is {frac:.2f} of it; ratio tests: last "
            f"orders {detail.ratio * self.step:.3g}, all orders {detail.baseline * self.step:.3g})",
            f"  resummed        {_describe(self.resummed)}  (Padé, order {self.order + EXTRA_ORDERS})",
            f"  verdict         {self.verdict}: {_VERDICTS[self.verdict]}",
        ]
        return "\n".join(lines)


def _describe(value: Any) -> str:
    leaves = jax.tree_util.tree_leaves(value)
    if len(leaves) == 1 and np.size(leaves[0]) <= 6:
        return np.array2string(np.asarray(leaves[0]), precision=5)
    return str(jax.tree_util.tree_map(lambda x: f"{jnp.result_type(x)}{list(np.shape(x))}", value))


def _verdict(beyond: bool, fraction: float, relative_error: float) -> str:
    if beyond or not np.isfinite(relative_error):
        return "unreliable"
    if fraction > 0.7 or relative_error > 0.1:
        return "check"
    return "reliable"


def expansion_trust(ts, eps: Any) -> TrustReport:
    """The `TrustReport` of ``ts(eps)``; see `TaylorExpansion.trust`."""
    d = _step(ts, eps)
    _require_concrete(d, "trust")
    coefficients = extended_coefficients(ts, d)
    value0 = np.asarray(ts.out_layout.ravel(ts.value0))
    order = ts.order
    value_flat = value0 + coefficients[:order].sum(axis=0)
    err = truncation_error_estimate(coefficients, order, value0)
    radius = estimate_radius(coefficients, value0)
    step = float(np.linalg.norm(np.asarray(d)))
    change = float(np.linalg.norm(value_flat - value0))
    relative = err / change if change > 0 else (0.0 if err == 0 else math.inf)
    resummed = pade_from_coefficients(value0, coefficients, ts.out_layout)(1.0)
    beyond = bool(radius.radius <= 1.0)
    return TrustReport(
        value=ts.out_layout.unravel(jnp.asarray(value_flat)),
        order=order,
        error_estimate=err,
        relative_error=relative,
        step=step,
        radius=radius.radius * step if step > 0 else math.inf,
        radius_detail=radius,
        beyond_radius=beyond,
        resummed=resummed,
        verdict=_verdict(beyond, 1.0 / radius.radius if radius.radius > 0 else math.inf, relative),
    )


# ----------------------------------------------------- the once-only warning
_WARNED: dict[int, weakref.ref] = {}


def warn_if_beyond_radius(ts, coefficients_flat, order: int, step_flat, stacklevel: int = 3) -> None:
    """Warn once per expansion when ``ts(eps)`` is evaluated beyond the radius
    estimated from the coefficients it already has (no extra orders).

    Silent when fewer than three orders are available (no estimate is possible
    without a trend) or under tracing.
    """
    if not _concrete(coefficients_flat) or coefficients_flat.shape[0] < 3:
        return
    ref = _WARNED.get(id(ts))
    if ref is not None and ref() is ts:
        return
    coefficients = np.asarray(coefficients_flat)
    est = estimate_radius(coefficients, np.asarray(ts.out_layout.ravel(ts.value0)))
    if est.radius > 1.0:
        return
    for key in [k for k, r in _WARNED.items() if r() is None]:
        del _WARNED[key]
    try:
        _WARNED[id(ts)] = weakref.ref(ts)
    except TypeError:  # pragma: no cover - objects without weak references
        pass
    step = float(np.linalg.norm(np.asarray(step_flat)))
    warnings.warn(
        f"`eps` lies beyond the estimated radius of convergence of this order-{order} series: "
        f"|eps - eps0| = {step:.4g}, while along this direction the series converges for steps up "
        f"to about {est.radius * step:.4g} (ratio tests over orders 1..{coefficients.shape[0]}: "
        f"last orders {est.ratio * step:.3g}, all orders {est.baseline * step:.3g}), so the "
        "series diverges there (more orders make it worse) and its value may be far from "
        "theta_hat(eps). "
        "Refit at this eps, step less far, or try ts(eps, resum='pade'); ts.trust(eps) gives the "
        "numbers. (This warning is shown once per expansion.)",
        BeyondRadiusWarning,
        stacklevel=stacklevel,
    )


# ----------------------------------------------------------- validation table
@dataclasses.dataclass(frozen=True)
class ValidationRow:
    """One `eps` of a `ValidationTable` (all norms are 2-norms of flat vectors)."""

    eps: Any
    step: float
    predicted: np.ndarray
    exact: np.ndarray
    true_error: float
    error_estimate: float
    radius: float
    beyond_radius: bool
    series_fails: bool
    pade_error: float

    @property
    def estimate_ratio(self) -> float:
        """`error_estimate` / `true_error`."""
        if self.true_error == 0:
            return 1.0 if self.error_estimate == 0 else math.inf
        return self.error_estimate / self.true_error


@dataclasses.dataclass(frozen=True)
class ValidationTable:
    """The expansion against exact refits; made by `validate_expansion`.

    Columns per `eps`: the step ``||eps - eps0||``, the true error
    ``||ts(eps) - refit||``, the error estimate beside it and their ratio, the
    estimated radius along ``eps - eps0`` (in the units of the step), the
    beyond-radius flag, whether the series fails there (with the ``N = K + 2``
    orders computed for the estimates, its order-``N`` partial sum is no closer to
    the refit than its order-``floor(N/2)`` one: more terms do not help), and the
    error of the order-``K`` Padé approximant. ``predicted`` and ``exact`` hold the
    flat vectors.
    """

    order: int
    rows: tuple[ValidationRow, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> ValidationRow:
        return self.rows[i]

    @property
    def within_factor_3(self) -> int:
        """How many error estimates are within a factor 3 of the true error."""
        return sum(1 for r in self.rows if 1 / 3 <= r.estimate_ratio <= 3)

    @property
    def flag_agrees(self) -> int:
        """How many rows have ``beyond_radius == series_fails``."""
        return sum(1 for r in self.rows if r.beyond_radius == r.series_fails)

    def columns(self) -> dict[str, np.ndarray]:
        """The table as a dict of numpy columns (for pandas: ``pd.DataFrame(t.columns())``)."""
        names = ["step", "true_error", "error_estimate", "radius", "beyond_radius", "series_fails"]
        out = {name: np.array([getattr(r, name) for r in self.rows]) for name in names}
        out["estimate_ratio"] = np.array([r.estimate_ratio for r in self.rows])
        out["pade_error"] = np.array([r.pade_error for r in self.rows])
        return out

    def __repr__(self) -> str:
        head = (
            f"{'step':>10} {'true error':>11} {'estimate':>11} {'ratio':>7} "
            f"{'radius':>9} {'beyond':>7} {'fails':>6} {'Pade error':>11}"
        )
        lines = [f"ValidationTable (order {self.order}, {len(self.rows)} refits)", head]
        for r in self.rows:
            lines.append(
                f"{r.step:>10.4g} {r.true_error:>11.3g} {r.error_estimate:>11.3g} "
                f"{r.estimate_ratio:>7.2f} {r.radius:>9.4g} {str(r.beyond_radius):>7} "
                f"{str(r.series_fails):>6} {r.pade_error:>11.3g}"
            )
        n = len(self.rows)
        lines.append(
            f"error estimate within a factor 3 of the true error: {self.within_factor_3}/{n}; "
            f"beyond-radius flag agrees with the series failing: {self.flag_agrees}/{n}"
        )
        return "\n".join(lines)


def _default_refit(ts, steps: int) -> Callable[[Any], Any]:
    from ._newton import newton_solve

    eq = ts.eq
    fn, objective = eq.problem.fn, eq.is_objective
    eps0_flat = np.asarray(eq.eps0_flat)
    layout = eq.problem.eps

    def refit(eps):
        d = np.asarray(layout.ravel(eps)) - eps0_flat
        theta = eq.theta0
        for s in np.linspace(0.0, 1.0, steps + 1)[1:]:
            theta = newton_solve(
                fn, theta, layout.unravel(jnp.asarray(eps0_flat + s * d)), args=eq.args, objective=objective
            )
        return theta

    return refit


def validate_expansion(
    ts,
    eps_points: Iterable[Any],
    *,
    refit: Callable[[Any], Any] | None = None,
    executor: Executor | None = None,
    steps: int = 1,
) -> ValidationTable:
    """Compare an expansion with exact refits at chosen `eps`.

    For each ``eps``: the prediction ``ts(eps)``, the exact answer (``refit(eps)``,
    or ``qoi(refit(eps), eps)`` for an expansion of a quantity of interest), the true
    error ``||ts(eps) - exact||_2`` beside `truncation_error_estimate`, the estimated
    radius along ``eps - eps0``, the beyond-radius flag, whether the series fails
    there, and the error of the Padé approximant.

    **Arguments:**

    - `ts`: a `TaylorExpansion`.
    - `eps_points`: the hyperparameters to check, each shaped like `eps0`.
    - `refit`: ``refit(eps) -> theta`` with any optimiser. Default: `newton_solve`
      on the expansion's problem, started at ``theta0`` and continued in `steps`
      equal steps from ``eps0`` to ``eps`` (more steps keep it on the branch of
      ``theta0`` for equations with several roots). It solves ``G = 0`` itself, not
      the proximal equation of ``EstimatingEquation(..., regularization=delta)``.
    - `executor`: a `concurrent.futures.Executor` to run the refits in parallel
      (a `ThreadPoolExecutor` works with the default refit; a process pool needs a
      picklable `refit`).
    - `steps`: see `refit`.

    **Returns:** a `ValidationTable`.

    **Example:**

    ```python
    ts = optsens.taylor_expansion(eq, order=4)
    with ThreadPoolExecutor(4) as pool:
        print(optsens.validate_expansion(ts, [0.5, 1.0, 2.0], executor=pool))
    ```
    """
    points = list(eps_points)
    directions = [_step(ts, e) for e in points]
    for d in directions:
        _require_concrete(d, "validate_expansion")
    refit = _default_refit(ts, int(steps)) if refit is None else refit
    mapper = map if executor is None else executor.map
    exact_thetas = list(mapper(refit, points))

    value0 = np.asarray(ts.out_layout.ravel(ts.value0))
    order = ts.order
    rows = []
    for eps, d, theta in zip(points, directions, exact_thetas, strict=True):
        if ts.qoi is None:
            exact = np.asarray(ts.eq.problem.theta.ravel(theta))
        else:
            exact = np.asarray(ts.out_layout.ravel(ts.qoi(theta, eps)))
        if exact.shape != value0.shape:
            raise OptsensError(
                f"the refit at eps={eps!r} returned {exact.size} numbers where the expansion has "
                f"{value0.size}; `refit(eps)` must return a pytree shaped like `theta0`."
            )
        if not np.all(np.isfinite(exact)):
            raise NonFiniteError(
                f"the refit at eps={eps!r} returned non-finite values; check the optimiser passed "
                "as `refit` (did it converge?)."
            )
        coefficients = extended_coefficients(ts, d)
        partial = value0 + np.cumsum(coefficients, axis=0)
        predicted = partial[order - 1]
        true_error = float(np.linalg.norm(predicted - exact))
        longest = coefficients.shape[0]
        error_longest = float(np.linalg.norm(partial[longest - 1] - exact))
        error_half = float(np.linalg.norm(partial[longest // 2 - 1] - exact))
        radius = estimate_radius(coefficients, value0)
        pade = pade_from_coefficients(value0, coefficients[:order], ts.out_layout)
        pade_flat = np.asarray(ts.out_layout.ravel(pade(1.0)))
        step = float(np.linalg.norm(np.asarray(d)))
        rows.append(
            ValidationRow(
                eps=eps,
                step=step,
                predicted=predicted,
                exact=exact,
                true_error=true_error,
                error_estimate=truncation_error_estimate(coefficients, order, value0),
                radius=radius.radius * step if step > 0 else math.inf,
                beyond_radius=bool(radius.radius <= 1.0),
                series_fails=bool(error_longest >= error_half),
                pade_error=float(np.linalg.norm(pade_flat - exact)),
            )
        )
    return ValidationTable(order, tuple(rows))
