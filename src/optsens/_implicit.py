"""`implicit_optimum`: ``eps -> theta_hat(eps)`` that JAX differentiates to any order.

The "simple and clever" construction (R. Giordano's 2019 note on M-estimator
sensitivity, after M. Jankowiak): a function that returns ``theta0`` and whose
derivative rule is built from differentiable pieces, itself included,

    d theta_hat = -H(theta_hat(eps), eps)^{-1} (dG/deps) d eps.

The solve is a `jax.lax.custom_linear_solve` whose operator is the Hessian-vector
product ``x -> dG/dtheta (theta_hat(eps), eps) x``: its own derivative rule
differentiates that operator (``-H^{-1} (dH) x``) and it has a transpose rule, so
`jax.jvp`, `jax.jacfwd`, `jax.jacrev`, `jax.hessian` and `jax.grad` nest to any
order under `jit` and `vmap`. The primal solve always happens at
``(theta0, eps0)`` and reuses the cached factorisation; the dense ``H`` is never
formed inside the rule, let alone differentiated.

Every level of nesting re-derives the whole rule, so the cost grows like ``2^k``
in the order ``k``; `taylor_expansion` is the fast engine. This function is what
users compose with arbitrary JAX code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax

from ._errors import OptsensError
from ._flat import FlatProblem
from ._linear import HessianSolver
from ._problem import EstimatingEquation, _is_concrete

__all__ = ["implicit_optimum", "implicit_flat"]


def implicit_flat(problem: FlatProblem, solver: HessianSolver, theta0_flat, args):
    """The custom-JVP function ``eps_flat -> theta_flat`` behind `implicit_optimum`."""

    def equation(theta, eps):
        return problem.equation(theta, eps, args)

    @jax.custom_jvp
    def theta_hat_flat(eps_flat):
        del eps_flat
        return theta0_flat

    @theta_hat_flat.defjvp
    def theta_hat_jvp(primals, tangents):
        (eps,), (eps_dot,) = primals, tangents
        theta = theta_hat_flat(eps)
        g_eps_dot = jax.jvp(lambda e: equation(theta, e), (eps,), (eps_dot,))[1]

        def hessian_vector_product(x):
            return jax.jvp(lambda th: equation(th, eps), (theta,), (x,))[1]

        def solve(_matvec, b):
            return solver.solve(b)

        def transpose_solve(_matvec, b):
            return solver.transpose_solve(b)

        try:
            theta_dot = lax.custom_linear_solve(
                hessian_vector_product,
                -g_eps_dot,
                solve=solve,
                transpose_solve=transpose_solve,
                symmetric=problem.symmetric,
            )
        except Exception:  # noqa: BLE001
            # A non-symmetric H's transposed product is built by transposing the HVP,
            # which fails where G has no reverse mode (a while loop with a run-time
            # trip count). Forward derivatives need no transpose: drop it (reverse
            # mode through theta_hat then raises JAX's own error).
            if problem.symmetric:
                raise
            theta_dot = lax.custom_linear_solve(
                hessian_vector_product, -g_eps_dot, solve=solve, symmetric=False
            )
        return theta, theta_dot

    return theta_hat_flat


def implicit_optimum(eq: EstimatingEquation) -> Callable[[Any], Any]:
    """``eps -> theta_hat(eps)`` near ``eps0``, differentiable to any order.

    Its value is ``theta0`` (it is meant to be differentiated at ``eps0``); its
    derivatives are those of the implicit solution:
    ``D theta_hat[v] = -H^{-1} (dG/deps) v`` and all higher ones by nesting.

    **Arguments:** `eq`, an `EstimatingEquation`.

    **Returns:** a function of a pytree shaped like `eps0`, returning a pytree
    shaped like `theta0`. Called with concrete values other than `eps0` it raises:
    it cannot know ``theta_hat`` there; use `taylor_expansion(eq, order)(eps)` for
    an approximation or `newton_solve` for an exact refit.

    **Example:**

    ```python
    theta_hat = optsens.implicit_optimum(eq)
    jax.jacfwd(theta_hat)(eps0)           # first derivative
    jax.hessian(lambda e: loss(theta_hat(e)))(eps0)
    ```
    """
    problem = eq.problem
    eps0_flat = eq.eps0_flat
    theta_hat_flat = implicit_flat(problem, eq.solver, eq.theta0_flat, eq.args)
    eps0_np = np.asarray(eps0_flat) if _is_concrete(eps0_flat) else None

    def theta_hat(eps: Any) -> Any:
        try:
            eps_flat = problem.eps.ravel(eps)
        except Exception as exc:
            raise OptsensError(
                f"`eps` must be a pytree shaped like `eps0` ({problem.eps.shapes}); got {eps!r}."
            ) from exc
        if eps_flat.shape != eps0_flat.shape:
            raise OptsensError(
                f"`eps` has {eps_flat.shape[0]} entries but `eps0` has {eps0_flat.shape[0]}; "
                "pass a pytree shaped like `eps0`."
            )
        if eps0_np is not None and _is_concrete(eps_flat):
            if not np.allclose(np.asarray(eps_flat), eps0_np, rtol=1e-12, atol=1e-12):
                raise OptsensError(
                    "implicit_optimum(eq) was called at an `eps` different from `eps0`; it only "
                    "knows theta_hat at eps0 (its value there is theta0) and its derivatives. "
                    "For an approximation at this eps use optsens.taylor_expansion(eq, order)(eps); "
                    "for the exact solution refit, e.g. optsens.newton_solve."
                )
        return problem.theta.unravel(theta_hat_flat(eps_flat))

    return theta_hat
