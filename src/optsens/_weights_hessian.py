"""The full-data ``G(theta0)`` and ``H = dG/dtheta (theta0)`` of an `MEstimator`:
formed in chunks, checked (finite, nonsingular, positive definite for a loss,
``theta0`` a solution) and factorised once; every data-weight derivative reuses it."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._batching import chunked_sum
from ._errors import IndefiniteHessianError, NonFiniteError, NotASolutionError, SingularHessianError
from ._linear import CholeskySolver, HessianSolver, LUSolver
from ._weights_model import ObservationModel

__all__ = ["FullDataHessian", "full_data_hessian"]


@dataclasses.dataclass
class FullDataHessian:
    """``G(theta0)`` (`g0`), the dense ``H`` and its factorisation, with the checks' numbers."""

    g0: jax.Array
    hessian: jax.Array
    solver: HessianSolver
    condition_number: float
    newton_step_norm: float
    cond_max: float
    _inverse: jax.Array | None = None

    @property
    def inverse(self) -> jax.Array:
        """The explicit ``H^{-1}`` (from the factorisation; made on first use)."""
        if self._inverse is None:
            self._inverse = self.solver.solve(jnp.eye(self.hessian.shape[0], dtype=self.hessian.dtype))
        return self._inverse

    @property
    def symmetric(self) -> bool:
        return isinstance(self.solver, CholeskySolver)

    @property
    def pivots(self) -> jax.Array:
        """The Cholesky factor's diagonal (ones for LU): the scale of `newton_step`'s pivot test."""
        if isinstance(self.solver, CholeskySolver):
            return jnp.diagonal(self.solver.factor)
        return jnp.ones(self.hessian.shape[0], self.hessian.dtype)

    @property
    def singular_tol(self) -> float:
        """Curvature left (a generalised eigenvalue of ``(H + H_S, H)``) below which the
        reduced Hessian counts as numerically singular: its condition number would
        exceed about ``cond(H) / tol = cond_max``."""
        return max(self.condition_number / self.cond_max, 1e3 * float(jnp.finfo(self.hessian.dtype).eps))


@eqx.filter_jit
def _base_kernel(model: ObservationModel, th, data, w, chunk: int):
    """``G(theta0)`` and the dense ``H`` at ``theta0``, in chunks."""
    g, h = chunked_sum(lambda d, ww: model.weighted_gh(th, d, ww), data, w, chunk)
    pg, ph = model.penalty_gh(th)
    return g + pg, h + ph


def _raise_singular(cond: float, cond_max: float):
    raise SingularHessianError(
        f"H = dG/dtheta at theta0 is numerically singular (condition number ~ {cond:.3g}, limit "
        f"`cond_max` = {cond_max:.3g}). The fit is not locally unique: add a penalty, remove "
        "collinear columns or redundant parameters, or raise `cond_max`."
    )


def full_data_hessian(
    model: ObservationModel,
    th: jax.Array,
    data,
    w: jax.Array,
    chunk: int,
    residual_rtol: float,
    cond_max: float,
) -> FullDataHessian:
    """Form, check and factorise ``H`` at ``theta0`` (Cholesky for a loss, LU otherwise).

    Raises `NonFiniteError`, `IndefiniteHessianError` (a loss whose Hessian has
    negative eigenvalues), `SingularHessianError` (condition number above
    `cond_max`) or `NotASolutionError` (the Newton step ``H^{-1} G(theta0)`` exceeds
    ``residual_rtol * max(1, |theta0|_inf)``).
    """
    g0, h = _base_kernel(model, th, data, w, chunk)
    g0_np, h_np = np.asarray(g0), np.asarray(h)
    names = model.theta.leaf_names()
    if not np.all(np.isfinite(h_np)) or not np.all(np.isfinite(g0_np)):
        rows = sorted(
            set(np.nonzero(~np.isfinite(h_np))[0].tolist()) | set(np.flatnonzero(~np.isfinite(g0_np)))
        )
        raise NonFiniteError(
            f"G or H = dG/dtheta at theta0 is not finite (in the rows of "
            f"{[names[i] for i in rows[:5]]}). Check theta0 and the model for overflow (log of 0, "
            "exp of a large number)."
        )
    if model.kind == "loss":
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
            _raise_singular(float("inf"), cond_max)
    else:
        solver = LUSolver.factorise(h)
        if not solver.is_finite():
            _raise_singular(float("inf"), cond_max)
    # The 2-norm condition number: `singular_tol` below reasons with eigenvalues.
    cond = float(np.linalg.cond(h_np))
    if not np.isfinite(cond) or cond > cond_max:
        _raise_singular(cond, cond_max)
    step = np.asarray(solver.solve(g0))
    step_norm = float(np.max(np.abs(step)))
    scale = max(1.0, float(np.max(np.abs(np.asarray(th)))))
    if not np.isfinite(step_norm) or step_norm > residual_rtol * scale:
        raise NotASolutionError(
            f"`theta0` does not solve the estimating equation: |G(theta0)| = {np.linalg.norm(g0_np):.3g} "
            f"and the Newton step that would correct it has size {step_norm:.3g} (allowed: "
            f"`residual_rtol` * max(1, |theta0|) = {residual_rtol * scale:.3g}). Call `.fit()` "
            "first (or fit to a tighter tolerance), or raise `residual_rtol`."
        )
    return FullDataHessian(g0, h, solver, cond, step_norm, float(cond_max))
