"""`EstimatingEquation`: ``G(theta, eps) = 0``, its solution ``theta0`` at ``eps0``,
and the checked, factorised ``H = dG/dtheta`` that every derivative reuses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._condition import factorisation_condition
from ._errors import (
    IndefiniteHessianError,
    NonFiniteError,
    NotASolutionError,
    SingularHessianError,
)
from ._flat import FlatProblem
from ._linear import CholeskySolver, HessianSolver, IterativeSolver, LUSolver
from ._pytree import TreeLayout, as_float_tree

__all__ = ["EstimatingEquation"]

_SOLVERS = ("auto", "cholesky", "lu", "cg", "gmres")
# Above this many parameters "auto" switches to matrix-free solves: a dense D x D
# float64 Hessian of 4000 parameters is already 128 MB.
_DENSE_LIMIT = 4000


def _is_concrete(tree: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _describe_tree(tree: Any) -> str:
    return str(jax.tree_util.tree_map(lambda x: f"{jnp.result_type(x)}{list(np.shape(x))}", tree))


def _top_entries(vector: np.ndarray, names: list[str], count: int = 5) -> str:
    order = np.argsort(-np.abs(vector))[:count]
    return ", ".join(f"{names[i]}: {vector[i]:+.3g}" for i in order)


class EstimatingEquation(eqx.Module):
    """An estimating equation ``G(theta, eps) = 0`` solved by ``theta0`` at ``eps0``.

    The implicit function theorem defines ``theta_hat(eps)`` near ``eps0`` with
    ``theta_hat(eps0) = theta0`` and ``G(theta_hat(eps), eps) = 0``, provided
    ``H = dG/dtheta (theta0, eps0)`` is nonsingular. On construction this class
    checks that ``theta0`` solves the equation and that ``H`` is nonsingular, and
    factorises ``H`` once (Cholesky for the gradient of an objective, LU otherwise,
    or a matrix-free solver); every derivative of every order reuses that
    factorisation.

    Construction works inside `jax.jit` and `jax.vmap` too (theta0, eps0 or the data
    traced): the whole pipeline then compiles into one program, which removes the
    Python and dispatch overhead between the steps (logistic, D = 100, order 6:
    1.2 ms against 2.2 ms eagerly on 2 CPU cores). The checks are then compiled in
    and raise at run time (non-finite inputs or H, a failed factorisation, too large
    a Newton step); the condition-number estimate needs the host and is skipped
    (`condition_number`, `residual_norm` and `newton_step_norm` are NaN).

    **Arguments:**

    - `g`: ``g(theta, eps, *args)`` returning a pytree shaped like `theta`.
    - `theta0`: the solution at `eps0`; any pytree of arrays.
    - `eps0`: the hyperparameter; any pytree of arrays (a scalar works).
    - `args`: extra arguments of `g` (typically data). They are passed to compiled
      code as traced values, so a new data set reuses the compiled kernels.
    - `residual_rtol`: `theta0` is accepted if the Newton step
      ``||H^{-1} G(theta0, eps0)||_inf`` is at most
      ``residual_rtol * max(1, ||theta0||_inf)``.
    - `solver`: ``"auto"`` (dense Cholesky for objectives, dense LU otherwise,
      matrix-free above 4000 parameters), ``"cholesky"``, ``"lu"``, ``"cg"`` or
      ``"gmres"`` (matrix-free, Hessian-vector products through lineax).
    - `cond_max`: a dense ``H`` whose estimated condition number
      ``cond_1(H) = ||H||_1 ||H^{-1}||_1`` (LAPACK's estimator, from a few solves with
      the factorisation; recorded as `condition_number`) exceeds this is reported
      as numerically singular.
    - `iterative_rtol`, `iterative_max_steps`: settings of CG / GMRES.
    - `hessian`: optionally ``H`` itself, a (D, D) array over the flattened `theta`
      (leaves in pytree order), when you can form it more cheaply than automatic
      differentiation does (``X^T diag(w) X`` for a GLM). It must be ``H`` at
      ``(theta0, eps0)`` to rounding: it is checked against one forward-mode
      derivative of ``G`` along a random direction (a relative mismatch above
      ``sqrt(machine epsilon)`` raises), then factorised and used for every solve
      (dense solvers whatever the size; `hessian()` still differentiates ``G``).
    - `regularization`: ``None`` (default) or ``delta > 0``, for optima that are not
      unique (collinear columns, over-parametrised models: ``H`` singular). Every
      solve then uses ``H + delta I`` (dense solvers only), and every derivative and
      expansion is exactly that of ``theta_delta(eps)``, the solution through
      ``theta0`` of the *proximal* equation

          G(theta, eps) + delta (theta - theta0) = 0

      (for an objective: ``argmin f(theta, eps) + delta/2 ||theta - theta0||^2``),
      not of ``theta_hat``. Among equivalent optima it follows the path that moves
      least from ``theta0``; for symmetric ``H`` and ``dG/deps v`` in the range of
      ``H`` the first derivative tends, as ``delta -> 0``, to the pseudo-inverse
      (minimum-norm) answer ``-H^+ (dG/deps) v``. Quantities constant along the null
      directions of ``H`` (predictions ``X theta``, identified contrasts) are then
      meaningful; the components of ``theta`` along them are a convention, not an
      estimate. Checks (solution, singularity, definiteness) apply to ``H + delta I``.

    **Example:**

    ```python
    def g(theta, lam, X, y):        # ridge regression's normal equations
        return X.T @ (X @ theta - y) + lam * theta
    eq = optsens.EstimatingEquation(g, theta0, 1.0, args=(X, y))
    ```
    """

    problem: FlatProblem = eqx.field(static=True)
    theta0: Any
    eps0: Any
    args: tuple
    theta0_flat: jax.Array
    eps0_flat: jax.Array
    solver: HessianSolver
    residual_norm: float = eqx.field(static=True)
    newton_step_norm: float = eqx.field(static=True)
    condition_number: float = eqx.field(static=True)
    regularization: float | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        g: Callable[..., Any],
        theta0: Any,
        eps0: Any,
        *,
        args: tuple = (),
        residual_rtol: float = 1e-6,
        solver: str = "auto",
        cond_max: float = 1e12,
        iterative_rtol: float = 1e-10,
        iterative_max_steps: int = 10_000,
        regularization: float | None = None,
        hessian: Any = None,
        _kind: str = "equation",
    ):
        if not callable(g):
            name = "f" if _kind == "objective" else "g"
            raise TypeError(f"`{name}` must be a function; got {type(g).__name__}.")
        if solver not in _SOLVERS:
            raise ValueError(f"`solver` must be one of {_SOLVERS}; got {solver!r}.")
        if not isinstance(args, tuple):
            raise TypeError(
                f"`args` must be a tuple of extra arguments for `g`; got {type(args).__name__}. "
                "Wrap a single argument as `args=(data,)`."
            )
        if not (residual_rtol > 0):
            raise ValueError(f"`residual_rtol` must be positive; got {residual_rtol!r}.")
        if regularization is not None:
            if isinstance(regularization, bool) or not (
                isinstance(regularization, (int, float, np.floating, np.integer))
                and np.isfinite(regularization)
                and regularization > 0
            ):
                raise ValueError(
                    f"`regularization` must be None or a finite positive number (the delta of "
                    f"H + delta I); got {regularization!r}."
                )
            if solver in ("cg", "gmres"):
                raise ValueError(
                    f"`regularization` works with the dense solvers only; got solver={solver!r}. "
                    "Use solver='cholesky' or 'lu', or add delta/2 |theta - theta0|^2 to `f` yourself."
                )
            regularization = float(regularization)
        theta0 = as_float_tree(theta0, "theta0")
        eps0 = as_float_tree(eps0, "eps0")
        args = jax.tree_util.tree_map(jnp.asarray, args)
        if not jax.tree_util.tree_leaves(theta0):
            raise ValueError("`theta0` has no arrays in it; it must hold the parameters.")
        concrete = _is_concrete((theta0, eps0, args))
        theta_layout, eps_layout = TreeLayout.of(theta0), TreeLayout.of(eps0)
        if solver == "cholesky" and _kind != "objective":
            raise ValueError(
                "`solver='cholesky'` needs a symmetric positive definite H, which is only "
                "guaranteed for `EstimatingEquation.from_objective`; use solver='lu'."
            )
        if solver == "cg" and _kind != "objective":
            raise ValueError(
                "`solver='cg'` needs a symmetric positive definite H, which is only "
                "guaranteed for `EstimatingEquation.from_objective`; use solver='gmres'."
            )
        problem = FlatProblem(g, _kind, theta_layout, eps_layout)
        _check_output_structure(problem, theta0, eps0, args)
        if hessian is not None:
            hessian = _given_hessian(hessian, theta_layout.size, theta_layout.dtype, solver)

        theta0_flat = theta_layout.ravel(theta0)
        eps0_flat = eps_layout.ravel(eps0)
        self.problem = problem
        self.theta0, self.eps0, self.args = theta0, eps0, args
        self.theta0_flat, self.eps0_flat = theta0_flat, eps0_flat

        if solver == "auto":
            if theta_layout.size > _DENSE_LIMIT and regularization is None and hessian is None:
                solver = "cg" if _kind == "objective" else "gmres"
            else:
                solver = "cholesky" if _kind == "objective" else "lu"
        if solver in ("cg", "gmres"):
            if concrete:  # (the dense path checks the inputs inside its one compiled call)
                _check_finite_inputs({"theta0": theta0, "eps0": eps0, "args": args})
            iterative = IterativeSolver(
                problem, solver, iterative_rtol, iterative_max_steps, theta0_flat, eps0_flat, args
            )
            if not concrete:
                iterative = _traced_checks(iterative, _iterative_summary(iterative), residual_rtol,
                                           theta0_flat.dtype)  # fmt: skip
            self.solver = iterative
            cond = float("nan")
        else:
            # One compiled call forms H, factorises it and computes everything the
            # checks need (compiled once per function and shape, like the kernels).
            hessian, factorised, summary = _factorise(
                problem, solver, regularization, theta0_flat, eps0_flat, args, hessian, traced=not concrete
            )
            cond = float("nan")
            if not concrete:
                # Under jit / vmap nothing can be fetched: the checks are compiled in and
                # raise at run time (an XlaRuntimeError carrying the message).
                factorised = _traced_checks(factorised, summary, residual_rtol, theta0_flat.dtype)
            self.solver = factorised
            if concrete:
                # One transfer of a few scalars; the arrays are fetched only to explain a failure.
                summary = dict(zip(_SUMMARY_KEYS, np.asarray(summary).tolist(), strict=True))
                if not (summary["factor_finite"] and summary["residual_finite"]):
                    # Name the culprit first: NaN or inf in the inputs, then in H.
                    _check_finite_inputs({"theta0": theta0, "eps0": eps0, "args": args})
                    _check_finite_hessian(hessian, theta_layout)
                _check_hessian_matches(summary, theta0_flat.dtype)
                cond = _check_factorisation(factorised, hessian, problem, cond_max, summary)

        if not concrete:
            residual, step = float("nan"), float("nan")
        elif solver in ("cg", "gmres"):
            residual, step = _check_solution(self, residual_rtol)
        else:
            residual, step = _check_newton_step(self, residual_rtol, summary)
        self.residual_norm = residual
        self.newton_step_norm = step
        self.condition_number = cond
        self.regularization = regularization

    @classmethod
    def from_objective(
        cls, f: Callable[..., Any], theta0: Any, eps0: Any, **kwargs: Any
    ) -> EstimatingEquation:
        """The first-order condition ``G = grad_theta f(theta, eps) = 0`` of a minimum.

        `f(theta, eps, *args)` returns a scalar; `theta0` minimises it at `eps0`.
        ``H`` is then the Hessian of `f`, symmetric, and must be positive definite
        (otherwise `theta0` is a saddle point or a maximum and an
        `IndefiniteHessianError` says so). Keyword arguments as for the class.
        """
        return cls(f, theta0, eps0, _kind="objective", **kwargs)

    # ------------------------------------------------------------------ accessors
    @property
    def is_objective(self) -> bool:
        return self.problem.kind == "objective"

    @property
    def solver_name(self) -> str:
        return self.solver.name

    def equation(self, theta: Any, eps: Any) -> Any:
        """``G(theta, eps)`` as a pytree shaped like `theta`."""
        flat = self.problem.equation(self.problem.theta.ravel(theta), self.problem.eps.ravel(eps), self.args)
        return self.problem.theta.unravel(flat)

    def hessian(self) -> jax.Array:
        """The dense ``H = dG/dtheta`` at ``(theta0, eps0)`` over the flattened `theta`."""
        return self.problem.hessian(self.theta0_flat, self.eps0_flat, self.args)

    def solve(self, b: Any, transpose: bool = False) -> Any:
        """``H^{-1} b`` (or ``H^{-T} b``) for a pytree `b` shaped like `theta`."""
        flat = self.problem.theta.ravel(b)
        x = self.solver.transpose_solve(flat) if transpose else self.solver.solve(flat)
        return self.problem.theta.unravel(x)

    def __repr__(self) -> str:
        return (
            f"EstimatingEquation(kind={self.problem.kind}, theta={_describe_tree(self.theta0)}, "
            f"eps={_describe_tree(self.eps0)}, solver={self.solver_name}, "
            f"newton_step={self.newton_step_norm:.2e}, cond={self.condition_number:.2e})"
        )


# ---------------------------------------------------------------------- checks
_STRUCTURE_CHECKED: set = set()


def _check_output_structure(problem: FlatProblem, theta0, eps0, args) -> None:
    # Tracing the user's function costs about a millisecond: remember what passed.
    key = (problem, TreeLayout.of(args))
    if key in _STRUCTURE_CHECKED:
        return
    _check_output_structure_uncached(problem, theta0, eps0, args)
    _STRUCTURE_CHECKED.add(key)


def _check_output_structure_uncached(problem: FlatProblem, theta0, eps0, args) -> None:
    name = "f" if problem.kind == "objective" else "g"
    try:
        out = jax.eval_shape(problem.fn, theta0, eps0, *args)
    except Exception as exc:  # the user's function failed: say where
        raise type(exc)(f"calling `{name}(theta0, eps0, *args)` failed: {exc}") from exc
    if problem.kind == "objective":
        if np.shape(out) != () or not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError(
                f"`f` must return a scalar objective; it returned {out}. "
                "Sum or average the per-observation losses."
            )
        return
    if (
        TreeLayout.of(out).treedef != problem.theta.treedef
        or tuple(tuple(x.shape) for x in jax.tree_util.tree_leaves(out)) != problem.theta.shapes
    ):
        raise ValueError(
            "`g(theta0, eps0, *args)` must return a pytree shaped like `theta0`; "
            f"it returned {jax.tree_util.tree_map(lambda x: x.shape, out)} while `theta0` is "
            f"{jax.tree_util.tree_map(np.shape, theta0)}."
        )


@jax.jit
def _leaves_finite(tree):
    return [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
        for x in jax.tree_util.tree_leaves(tree)
    ]


def _check_finite_inputs(named: dict) -> None:
    """NaN or infinity in `theta0`, `eps0` or the data, named by pytree path (one
    compiled reduction over all leaves; the offending leaf is fetched only on failure)."""
    if all(jax.device_get(_leaves_finite(named))):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(named)[0]:
        values = np.asarray(leaf)
        if np.issubdtype(values.dtype, np.inexact) and not np.all(np.isfinite(values)):
            where = np.argwhere(~np.isfinite(values))[:3].tolist()
            name = path[0].key + jax.tree_util.keystr(path[1:])
            raise NonFiniteError(
                f"`{name}` has {int((~np.isfinite(values)).sum())} "
                f"non-finite entries (first at indices {where}); pass finite values (drop or "
                "impute missing data before building the equation)."
            )


def _check_finite_hessian(hessian: jax.Array, layout: TreeLayout) -> None:
    bad = ~np.isfinite(np.asarray(hessian))
    if bad.any():
        names = layout.leaf_names()
        rows = sorted(set(np.nonzero(bad)[0].tolist()))[:5]
        raise NonFiniteError(
            f"H = dG/dtheta at (theta0, eps0) has {int(bad.sum())} non-finite entries, in the rows "
            f"of {[names[i] for i in rows]}. Check `theta0` and `eps0` for values where the model "
            "overflows (log of 0, exp of a large number) and the data for NaN."
        )


@functools.partial(jax.jit, static_argnames=("problem", "solver", "regularization", "traced"))
def _factorise(
    problem: FlatProblem, solver: str, regularization, theta0_flat, eps0_flat, args, given=None, traced=False
):
    """H, its factorisation, and the scalars every check needs (finiteness of the
    factor; ||H||_1; |G(theta0, eps0)| and its Newton step) in one compiled call.
    cond_1(H) is then estimated on the host from the factor.

    Non-finite inputs or H always show as a non-finite factor or residual; eagerly the
    host then finds and names them, so their own reductions (a fifth of this
    program's compile time) are compiled in only when `traced` (under jit, where
    the run-time error must say which it was)."""
    if given is None:
        hessian = problem.hessian(theta0_flat, eps0_flat, args)
        mismatch = jnp.zeros((), theta0_flat.dtype)
    else:
        # A user-supplied H is trusted only after one check against G: H u against
        # the forward-mode derivative of G along a fixed random u (one jvp of G).
        hessian = given
        u = jax.random.normal(jax.random.PRNGKey(0), theta0_flat.shape, theta0_flat.dtype)
        hu, ju = hessian @ u, problem.hvp(theta0_flat, eps0_flat, args, u)
        mismatch = jnp.linalg.norm(hu - ju) / jnp.maximum(
            jnp.linalg.norm(hu) + jnp.linalg.norm(ju), jnp.finfo(hu.dtype).tiny
        )
    if regularization is not None:
        hessian = hessian + regularization * jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    factorised = (CholeskySolver if solver == "cholesky" else LUSolver).factorise(hessian)
    summary = {
        **_solution_summary(problem, factorised.solve, theta0_flat, eps0_flat, args, traced),
        # Not finite (Cholesky of a matrix that is not positive definite), or an exact
        # zero pivot (LU of an exactly singular matrix stays finite).
        "factor_finite": jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(factorised)])
        )
        & jnp.all(jnp.diagonal(factorised.lu if solver == "lu" else factorised.factor) != 0),
        "norm_1": jnp.max(jnp.sum(jnp.abs(hessian), axis=0), initial=0.0),
        "hessian_mismatch": mismatch,
    }
    if traced:
        summary["hessian_finite"] = jnp.all(jnp.isfinite(hessian))
    return hessian, factorised, _pack(summary, hessian.dtype)


def _solution_summary(problem: FlatProblem, solve, theta0_flat, eps0_flat, args, traced=True) -> dict:
    """The solution checks' scalars: ``|G(theta0, eps0)|`` and the size of its Newton
    step ``H^{-1} G`` (with whatever solver there is), and if `traced` whether the
    inputs are finite."""
    residual = problem.equation(theta0_flat, eps0_flat, args)
    step = solve(jnp.where(jnp.isfinite(residual), residual, 0.0))
    summary = {} if not traced else {
        "inputs_finite": jnp.all(jnp.asarray(_leaves_finite((theta0_flat, eps0_flat, args)))),
    }
    return summary | {
        "residual_finite": jnp.all(jnp.isfinite(residual)),
        "residual_norm": jnp.linalg.norm(residual),
        "step_norm": jnp.max(jnp.abs(step), initial=0.0),
        "theta_scale": jnp.maximum(1.0, jnp.max(jnp.abs(theta0_flat), initial=0.0)),
    }


_SUMMARY_KEYS = (
    "hessian_finite", "factor_finite", "norm_1", "inputs_finite", "residual_finite",
    "residual_norm", "step_norm", "theta_scale", "hessian_mismatch",
)  # fmt: skip
# What a check that does not apply reads (no dense H: nothing to be non-finite or mismatched).
_SUMMARY_DEFAULTS = {
    "hessian_finite": 1.0, "factor_finite": 1.0, "norm_1": 0.0, "hessian_mismatch": 0.0, "inputs_finite": 1.0,
}  # fmt: skip


def _pack(summary: dict, dtype) -> jax.Array:
    """One float vector, so the host fetches every check's input in a single transfer."""
    return jnp.stack([jnp.asarray(summary.get(k, _SUMMARY_DEFAULTS.get(k)), dtype) for k in _SUMMARY_KEYS])


_TRACED_MESSAGES = (
    "optsens: `theta0`, `eps0` or `args` hold NaN or infinite values (build the "
    "EstimatingEquation outside jit to have them named).",
    "optsens: H = dG/dtheta at (theta0, eps0) is not finite: check the model for overflow "
    "and the data for NaN (build the EstimatingEquation outside jit for details).",
    "optsens: the factorisation of H failed: H is singular, or for an objective not positive "
    "definite (theta0 is not a minimum); build the EstimatingEquation outside jit for the "
    "near-null or negative-curvature direction.",
    "optsens: `theta0` does not solve the equation at `eps0`: the Newton step H^-1 G exceeds "
    "`residual_rtol` * max(1, |theta0|). Run the optimiser to a tighter tolerance or raise "
    "`residual_rtol`.",
    "optsens: the `hessian` passed does not match dG/dtheta at (theta0, eps0) along a random "
    "direction; check its formula and the flattening order of theta (build the "
    "EstimatingEquation outside jit for the size of the mismatch).",
)


def _traced_checks(factorised, packed, residual_rtol: float, dtype):
    """The construction checks as run-time errors attached to the factorisation.

    Used when `theta0`, `eps0` or the data are traced (the construction is inside a
    jitted or vmapped function), so they cannot be fetched. The condition-number
    check needs the host and is skipped; exact singularity (a zero pivot) and
    indefiniteness (a non-finite Cholesky factor) are still caught.
    """
    summary = dict(zip(_SUMMARY_KEYS, packed, strict=True))
    step_ok = summary["step_norm"] <= residual_rtol * summary["theta_scale"]
    failures = jnp.stack(
        [
            summary["inputs_finite"] == 0,
            summary["hessian_finite"] == 0,
            summary["factor_finite"] == 0,
            (summary["residual_finite"] == 0) | ~step_ok,
            ~(summary["hessian_mismatch"] <= _mismatch_tol(dtype)),
        ]
    )
    return eqx.branched_error_if(factorised, jnp.any(failures), jnp.argmax(failures), _TRACED_MESSAGES)


def _iterative_summary(solver: IterativeSolver) -> jax.Array:
    """The checks' scalars for a matrix-free solver (one iterative solve for the
    Newton step), packed like `_factorise`'s."""
    summary = _solution_summary(solver.problem, solver.solve, solver.theta0, solver.eps0, solver.args)
    return _pack(summary, solver.theta0.dtype)


def _mismatch_tol(dtype) -> float:
    # sqrt(machine epsilon): H formed by another correct formula differs from the jvp
    # by rounding (~eps); a wrong entry, sign or ordering differs by O(1).
    return float(np.sqrt(np.finfo(dtype).eps))


def _given_hessian(hessian, size: int, dtype, solver: str) -> jax.Array:
    """Validate a user-supplied dense ``H`` over the flattened `theta`."""
    if solver in ("cg", "gmres"):
        raise ValueError(
            f"`hessian` is a dense matrix and needs a dense solver; got solver={solver!r}. "
            "Use solver='auto', 'cholesky' or 'lu'."
        )
    try:
        h = jnp.asarray(hessian)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`hessian` must be a (D, D) array; got {type(hessian).__name__} ({exc}).") from None
    if h.shape != (size, size):
        raise ValueError(
            f"`hessian` must be the ({size}, {size}) matrix dG/dtheta over the flattened `theta` "
            f"(leaves in pytree order, each raveled in C order); got shape {h.shape}."
        )
    if jnp.issubdtype(h.dtype, jnp.complexfloating) and not jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"`hessian` must be real like `theta0`; got dtype {h.dtype}.")
    return h.astype(dtype)  # theta's precision throughout (a NumPy float64 H for float32 theta)


def _check_hessian_matches(summary, dtype) -> None:
    mismatch = summary["hessian_mismatch"]
    if not mismatch <= _mismatch_tol(dtype):  # NaN fails too
        raise ValueError(
            f"The `hessian` passed does not match dG/dtheta at (theta0, eps0): along a random "
            f"direction u, |H u - dG/dtheta u| / (|H u| + |dG/dtheta u|) = {mismatch:.3g}. Check "
            "its formula, that it is the Hessian of this `f` (or the Jacobian of this `g`) at "
            "theta0 and eps0, and that rows and columns follow the flattened `theta` (leaves in "
            "pytree order, each raveled in C order)."
        )


def _check_factorisation(solver, hessian, problem: FlatProblem, cond_max: float, summary) -> float:
    cond = factorisation_condition(solver, float(summary["norm_1"])) if summary["factor_finite"] else np.nan
    if summary["factor_finite"] and np.isfinite(cond) and cond <= cond_max:
        return cond
    names = problem.theta.leaf_names()
    hessian_np = np.asarray(hessian)
    if not summary["factor_finite"]:
        if problem.symmetric:
            eigvals, eigvecs = np.linalg.eigh((hessian_np + hessian_np.T) / 2)
            scale = max(np.max(np.abs(eigvals)), np.finfo(float).tiny)
            if eigvals[0] < -1e-10 * scale:
                n_negative = int(np.sum(eigvals < -1e-10 * scale))
                direction = "a maximum" if eigvals[-1] < 0 else "a saddle point"
                raise IndefiniteHessianError(
                    f"The Hessian of `f` at `theta0` is not positive definite: {n_negative} of "
                    f"{len(eigvals)} eigenvalues are negative (smallest {eigvals[0]:.3g}, largest "
                    f"{eigvals[-1]:.3g}), so `theta0` is {direction} of `f`, not a minimum. "
                    f"Direction of most negative curvature: {_top_entries(eigvecs[:, 0], names)}. "
                    "Re-run the optimiser (optsens expects a minimum of `f`; to maximise a "
                    "log-likelihood pass its negative)."
                )
            _raise_singular(float("inf"), eigvecs[:, 0], names, cond_max)
        _, _, vt = np.linalg.svd(hessian_np)
        _raise_singular(float("inf"), vt[-1], names, cond_max)
    if not np.isfinite(cond) or cond > cond_max:
        if problem.symmetric:
            _, eigvecs = np.linalg.eigh((hessian_np + hessian_np.T) / 2)
            null = eigvecs[:, np.argmin(np.abs(np.linalg.eigvalsh(hessian_np)))]
        else:
            null = np.linalg.svd(hessian_np)[2][-1]
        _raise_singular(cond, null, names, cond_max)
    return float(cond)


def _raise_singular(cond: float, null_direction, names, cond_max: float):
    raise SingularHessianError(
        f"H = dG/dtheta at (theta0, eps0) is numerically singular: condition number ~ {cond:.3g} "
        f"(limit `cond_max` = {cond_max:.3g}). The solution is not locally unique along the "
        f"near-null direction, whose largest entries are {_top_entries(np.asarray(null_direction), names)}. "
        "Add a penalty or prior on these parameters, remove redundant ones (collinear "
        "columns, an over-parametrised model), pass `regularization=delta` to follow the "
        "minimum-movement path (see its documentation), or raise `cond_max` if this "
        "conditioning is expected."
    )


def _check_newton_step(eq: EstimatingEquation, residual_rtol: float, summary) -> tuple[float, float]:
    """The solution check from the scalars computed with the factorisation."""
    if not summary["residual_finite"]:
        return _check_solution(eq, residual_rtol)  # fetches G to name the bad entries
    residual_norm, step_norm = float(summary["residual_norm"]), float(summary["step_norm"])
    if np.isfinite(step_norm) and step_norm <= residual_rtol * float(summary["theta_scale"]):
        return residual_norm, step_norm
    return _check_solution(eq, residual_rtol)  # raises with the full message


def _check_solution(eq: EstimatingEquation, residual_rtol: float, residual=None) -> tuple[float, float]:
    problem = eq.problem
    if residual is None:
        residual = problem.equation(eq.theta0_flat, eq.eps0_flat, eq.args)
    residual_np = np.asarray(residual)
    if not np.all(np.isfinite(residual_np)):
        names = problem.theta.leaf_names()
        bad = [names[i] for i in np.nonzero(~np.isfinite(residual_np))[0][:5]]
        raise NonFiniteError(
            f"G(theta0, eps0) is not finite (at {bad}). Check `theta0`, `eps0` and the data for "
            "NaN or infinite values, and the model for overflow at these values."
        )
    step = np.asarray(eq.solver.solve(residual))
    residual_norm = float(np.linalg.norm(residual_np))
    step_norm = float(np.max(np.abs(step))) if step.size else 0.0
    scale = max(1.0, float(np.max(np.abs(np.asarray(eq.theta0_flat)))))
    if not np.isfinite(step_norm) or step_norm > residual_rtol * scale:
        what = "gradient of `f`" if problem.kind == "objective" else "`g`"
        raise NotASolutionError(
            f"`theta0` does not solve the equation at `eps0`: the {what} has norm "
            f"{residual_norm:.3g} there and the Newton step H^-1 G that would correct "
            f"`theta0` has size {step_norm:.3g} (allowed: `residual_rtol` * max(1, |theta0|) = "
            f"{residual_rtol * scale:.3g}). Run the optimiser to a tighter tolerance (or polish "
            "theta0 with optsens.newton_solve), or raise `residual_rtol` if this accuracy is enough."
        )
    return residual_norm, step_norm
