"""Solving with ``H = dG/dtheta`` at ``(theta0, eps0)``: one factorisation, reused.

Every derivative of every order and along every direction needs solves with the same
matrix ``H``, so it is factorised once:

- `CholeskySolver`: ``H = L L^T``, for the Hessian of an objective at a minimum;
- `LUSolver`: ``P H = L U``, for a general estimating equation;
- `IterativeSolver`: no matrix at all; conjugate gradients (symmetric positive
  definite ``H``) or GMRES through lineax, with Hessian-vector products of ``G``.
  For large `theta` where the D x D matrix does not fit.

The solvers are equinox modules (pytrees): their arrays are traced arguments of
the jitted kernels and their settings are static, so one compiled kernel serves
every problem of the same shape.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx

from ._flat import FlatProblem

__all__ = ["HessianSolver", "CholeskySolver", "LUSolver", "IterativeSolver"]


class HessianSolver(eqx.Module):
    """Solves ``H x = b`` and ``H^T x = b`` for the Hessian of one problem."""

    def solve(self, b: jax.Array) -> jax.Array:
        raise NotImplementedError

    def transpose_solve(self, b: jax.Array) -> jax.Array:
        raise NotImplementedError

    @property
    def name(self) -> str:
        raise NotImplementedError


class CholeskySolver(HessianSolver):
    """``H = L L^T`` (lower triangular `factor`); `H` symmetric positive definite."""

    factor: jax.Array

    @classmethod
    def factorise(cls, hessian: jax.Array) -> CholeskySolver:
        return cls(jnp.linalg.cholesky(hessian))

    def solve(self, b):
        return jsl.cho_solve((self.factor, True), b)

    def transpose_solve(self, b):
        return self.solve(b)

    @property
    def name(self) -> str:
        return "cholesky"

    def is_finite(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.factor)))


class LUSolver(HessianSolver):
    """``P H = L U`` with partial pivoting; any nonsingular `H`."""

    lu: jax.Array
    pivots: jax.Array

    @classmethod
    def factorise(cls, hessian: jax.Array) -> LUSolver:
        lu, piv = jsl.lu_factor(hessian)
        return cls(lu, piv)

    def solve(self, b):
        return jsl.lu_solve((self.lu, self.pivots), b, trans=0)

    def transpose_solve(self, b):
        return jsl.lu_solve((self.lu, self.pivots), b, trans=1)

    @property
    def name(self) -> str:
        return "lu"

    def is_finite(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.lu)))


class IterativeSolver(HessianSolver):
    """Matrix-free solves with Hessian-vector products (CG or GMRES, via lineax).

    ``H v`` costs one forward-mode derivative of ``G``; nothing of size D x D is formed.
    CG needs ``H`` symmetric positive definite (an objective at a minimum); GMRES
    takes any nonsingular ``H``.
    """

    problem: FlatProblem = eqx.field(static=True)
    method: str = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    theta0: jax.Array
    eps0: jax.Array
    args: tuple

    def _operator(self, transpose: bool = False):
        def matvec(x):
            return self.problem.hvp(self.theta0, self.eps0, self.args, x)

        struct = jax.ShapeDtypeStruct(self.theta0.shape, self.theta0.dtype)
        if self.method == "cg":
            tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
        elif self.problem.symmetric:
            tags = (lx.symmetric_tag,)
        else:
            tags = ()
        op = lx.FunctionLinearOperator(matvec, struct, tags=tags)
        return op.T if transpose and not self.problem.symmetric else op

    def _lineax_solver(self):
        atol = self.rtol * 1e-3
        if self.method == "cg":
            return lx.CG(rtol=self.rtol, atol=atol, max_steps=self.max_steps)
        return lx.GMRES(rtol=self.rtol, atol=atol, max_steps=self.max_steps, restart=50)

    def _solve(self, b, transpose):
        sol = lx.linear_solve(self._operator(transpose), b, solver=self._lineax_solver(), throw=True)
        return sol.value

    def solve(self, b):
        return self._solve(b, transpose=False)

    def transpose_solve(self, b):
        return self._solve(b, transpose=True)

    @property
    def name(self) -> str:
        return self.method

    def is_finite(self) -> bool:
        return True
