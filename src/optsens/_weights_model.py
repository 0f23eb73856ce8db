"""The per-observation problem of `MEstimator`, and the totals built from it.

``G(theta, w) = sum_n w_n g_n(theta) + penalty(theta)``, with ``g_n`` either a
user's estimating function ``g(theta, datum_n)`` or ``grad_theta loss(theta, datum_n)``.
Everything here is a frozen dataclass of functions and layouts: hashable, so it is a
static argument of the jitted kernels and one compiled kernel serves every data set
and every fold of the same shapes. Parameters are flat vectors ``th`` (D,) inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._pytree import TreeLayout

__all__ = ["ObservationModel", "TotalEquation", "TotalObjective", "WeightPath"]


@dataclasses.dataclass(frozen=True)
class ObservationModel:
    """Hashable description of the per-observation problem.

    `fn` is ``loss(theta, datum)`` (kind ``"loss"``) or ``g(theta, datum)`` (kind
    ``"equation"``); `penalty` is a scalar function of `theta` (kind ``"loss"``) or a
    function returning a pytree like `theta` (kind ``"equation"``), or None.
    `predictor` is the optional declared linear predictor ``eta(theta, datum)``
    (scalar or (k,)), affine in `theta`, through which alone ``g_n`` depends on
    `theta`; it makes every per-observation Jacobian rank ``<= k`` (see
    `curvature_factors`).
    """

    fn: Callable[..., Any]
    kind: str
    penalty: Callable[..., Any] | None
    theta: TreeLayout
    predictor: Callable[..., Any] | None = None

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

    def eta(self, th, datum):
        """The declared linear predictor of one observation, flat: (k,)."""
        return jnp.reshape(jnp.asarray(self.predictor(self.theta.unravel(th), datum)), (-1,))

    def curvature_factors(self, th, datum):
        """``(U_n, A_n)`` with ``dg_n/dtheta (theta) = U_n A_n U_n^T`` for one observation.

        With ``eta_n = J_n theta + c_n`` (J_n: k x D) and ``g_n`` a function of
        ``eta_n`` alone (through ``J_n^T``), ``dg_n/dtheta = J_n^T A_n J_n``. So
        ``U_n = J_n^T`` (one reverse pass of `eta`) and, with ``P = J_n^+`` (so
        ``J_n P = I`` on the range of ``J_n``), ``A_n = d/ds P^T g_n(theta + P s)`` at
        ``s = 0``: k forward passes of ``g_n``, no D x D matrix. An observation with
        ``J_n = 0`` gets ``A_n = 0``. Whether the declaration holds is checked once,
        against the full-data Hessian (see `MEstimator`).
        """
        jac = jax.jacrev(self.eta)(th, datum)  # (k, D)
        k = jac.shape[0]
        if k == 1:
            norm2 = jac @ jac.T  # (1, 1)
            proj = jnp.where(norm2 > 0, jac.T / jnp.where(norm2 > 0, norm2, 1.0), 0.0)
        else:  # J^+ = J^T (J J^T)^+, through the k x k Gram matrix
            lam, q = jnp.linalg.eigh(jac @ jac.T)
            keep = lam > lam[-1] * k * jnp.finfo(lam.dtype).eps
            proj = jac.T @ ((q * jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)) @ q.T)

        def projected(s):
            return proj.T @ self.g(th + proj @ s, datum)

        a = jax.jacfwd(projected)(jnp.zeros((k,), th.dtype))
        if self.kind == "loss":
            a = 0.5 * (a + a.T)
        return jac.T, a


@dataclasses.dataclass(frozen=True)
class TotalObjective:
    """``f(theta, eps, data, w) = sum_n w_n loss_n(theta) + penalty(theta)`` (for
    `newton_solve`; `eps` is unused). Hashable, so refits share one compiled kernel."""

    model: ObservationModel

    def __call__(self, theta, eps, data, w):
        del eps
        m = self.model
        th = m.theta.ravel(theta)
        total = jnp.sum(w * jax.vmap(m.loss, (None, 0))(th, data))
        if m.penalty is not None:
            total = total + m.penalty(theta)
        return total


@dataclasses.dataclass(frozen=True)
class TotalEquation:
    """``G(theta, eps, data, w) = sum_n w_n g_n(theta) + penalty(theta)``."""

    model: ObservationModel

    def __call__(self, theta, eps, data, w):
        del eps
        m = self.model
        th = m.theta.ravel(theta)
        return m.theta.unravel(m.weighted_g(th, data, w) + m.penalty_g(th))


@dataclasses.dataclass(frozen=True)
class WeightPath:
    """The weight path as an estimating equation in ``t`` (the core engine's ``eps``).

    With `idx`/`delta` a fold: ``sum_n w_n l_n + penalty + t sum_j delta_j l_{idx_j}``;
    with ``idx=None`` and a dense `delta`: ``sum_n (w_n + t delta_n) l_n + penalty``
    (objective form for kind ``"loss"``; the same with ``g`` for kind ``"equation"``).
    Fold and data are traced arguments, so one compiled kernel serves every fold.
    """

    model: ObservationModel

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
