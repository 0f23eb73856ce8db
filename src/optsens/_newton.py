"""Exact solutions of ``G(theta, eps) = 0`` by damped Newton iterations.

Used to polish an optimiser's answer before building an `EstimatingEquation`, and
for the exact refits that Taylor approximations are checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._errors import NotASolutionError
from ._flat import FlatProblem
from ._pytree import TreeLayout, as_float_tree

__all__ = ["newton_solve"]


@partial(jax.jit, static_argnames=("problem", "max_steps"))
def _newton_flat(problem: FlatProblem, theta, eps, args, tol, max_steps: int):
    """Newton's method with backtracking on the merit ``||G||^2`` (or ``f``)."""

    def merit(th):
        if problem.kind == "objective":
            return problem.objective(th, eps, args)
        r = problem.equation(th, eps, args)
        return 0.5 * jnp.dot(r, r)

    def step_size(th):
        r = problem.equation(th, eps, args)
        return jnp.max(jnp.abs(r))

    def body(state):
        th, k, _ = state
        r = problem.equation(th, eps, args)
        h = problem.hessian(th, eps, args)
        direction = -jnp.linalg.solve(h, r)
        m0 = merit(th)

        def shrink(carry):
            alpha, _ = carry
            return alpha * 0.5, merit(th + 0.5 * alpha * direction)

        def not_good(carry):
            alpha, m = carry
            return (alpha > 1e-8) & ~(m <= m0 + 1e-14 * jnp.abs(m0))

        alpha, _ = lax.while_loop(not_good, shrink, (jnp.asarray(1.0, th.dtype), merit(th + direction)))
        th_new = th + alpha * direction
        return th_new, k + 1, jnp.max(jnp.abs(alpha * direction))

    def cond(state):
        th, k, last = state
        return (k < max_steps) & (last > tol * jnp.maximum(1.0, jnp.max(jnp.abs(th))))

    th, k, last = lax.while_loop(cond, body, (theta, 0, jnp.asarray(jnp.inf, theta.dtype)))
    resid = step_size(th)
    # Converged when the step is small, or when G itself is at rounding level relative
    # to where it started (ill-conditioned problems stall with tiny G but steps > tol).
    at_rounding = resid <= 1e-13 * jnp.maximum(1.0, step_size(theta))
    converged = (last <= tol * jnp.maximum(1.0, jnp.max(jnp.abs(th)))) | at_rounding
    return th, converged, last, resid


def newton_solve(
    fn: Callable[..., Any],
    theta_init: Any,
    eps: Any,
    *,
    args: tuple = (),
    objective: bool = False,
    tol: float | None = None,
    max_steps: int = 100,
) -> Any:
    """Solve ``G(theta, eps) = 0`` from `theta_init` by damped Newton steps.

    ``theta <- theta - alpha H^{-1} G`` with the step `alpha` halved until the merit
    (the objective `fn` if `objective`, else ``||G||^2 / 2``) does not increase.
    Stops when the step is below ``tol * max(1, ||theta||_inf)`` (default `tol`: 1e-12
    in float64, 1e-5 in float32) or when ``G`` has fallen to rounding level.

    **Arguments:** `fn` is ``g(theta, eps, *args)`` or, with `objective=True`, the
    objective ``f(theta, eps, *args)`` to minimise; `theta_init` and `eps` are
    pytrees. **Returns:** the solution, shaped like `theta_init`. Raises
    `NotASolutionError` if it does not converge within `max_steps`.
    """
    theta_init = as_float_tree(theta_init, "theta_init")
    if tol is None:  # a few hundred ulps of the working precision
        tol = 1e-12 if TreeLayout.of(theta_init).dtype == jnp.float64 else 1e-5
    eps = as_float_tree(eps, "eps")
    kind = "objective" if objective else "equation"
    problem = FlatProblem(fn, kind, TreeLayout.of(theta_init), TreeLayout.of(eps))
    th, converged, last, resid = _newton_flat(
        problem, problem.theta.ravel(theta_init), problem.eps.ravel(eps), tuple(args), tol, max_steps
    )
    if not bool(converged):
        raise NotASolutionError(
            f"newton_solve did not converge in `max_steps`={max_steps} steps (last step "
            f"{float(last):.3g}, |G|_inf = {float(resid):.3g}). Start closer to the solution "
            "(`theta_init`), raise `max_steps`, or check that a solution exists at this `eps`."
        )
    return problem.theta.unravel(th)
