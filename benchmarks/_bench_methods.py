"""The methods compared, each behind the same small interface.

`Method.setup(cfg, data)` imports the method's libraries and builds its closures
(not timed as part of a call). `Method.run(order)` computes the directional
derivatives ``D^k theta_hat[v, ..., v]``, ``k = 1..order``, from scratch and returns
``(construct_s, derivs_s, derivatives)``: the time spent on what the method has to
build before any derivative (Hessian, factorisation, the expansion object), the time
of the derivatives themselves, and the derivatives as NumPy arrays. Each call starts
from ``theta0``; nothing computed by a previous call is reused, except that JAX
reuses compiled code (that is what "warm" means) and `vittles` reuses the Hessian
at D = 1000 (see `VittlesMethod`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np

from _bench_problems import Config, objective

now = time.perf_counter

REFIT_STEP = 0.3  # the refit method solves at eps0 + REFIT_STEP * v


class Method:
    name = ""
    label = ""
    max_order = 8
    requires: tuple[str, ...] = ()
    note = ""

    def setup(self, cfg: Config, data: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def run(self, order: int) -> tuple[float, float, list[np.ndarray]]:
        raise NotImplementedError


# ---------------------------------------------------------------------- JAX
def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


class _JaxMethod(Method):
    def setup(self, cfg, data):
        jax = _jax()
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.f = objective(cfg.problem, cfg.p, jnp)
        self.args = (jnp.asarray(data["x"]), jnp.asarray(data["y"]))
        self.theta0 = jnp.asarray(data["theta0"])
        self.eps0 = jnp.asarray(data["eps0"])
        self.v = jnp.asarray(data["v"])
        jax.block_until_ready((self.args, self.theta0, self.eps0, self.v))


class OptsensMethod(_JaxMethod):
    """`EstimatingEquation.from_objective` then `taylor_expansion(eq, K, method)`."""

    name = "optsens"
    label = "optsens (Taylor mode)"
    max_order = 10
    engine_method = "auto"

    def setup(self, cfg, data):
        super().setup(cfg, data)
        import optsens

        self.optsens = optsens

    def run(self, order):
        jax, optsens = self.jax, self.optsens
        t0 = now()
        eq = optsens.EstimatingEquation.from_objective(self.f, self.theta0, self.eps0, args=self.args)
        jax.block_until_ready(eq.solver)
        t1 = now()
        derivatives = optsens.taylor_expansion(eq, order, method=self.engine_method).derivatives(self.v)
        jax.block_until_ready(derivatives)
        t2 = now()
        return t1 - t0, t2 - t1, [np.asarray(d) for d in derivatives]


class OptsensJitMethod(_JaxMethod):
    """The same pipeline (construction + `taylor_expansion(eq, K).derivatives(v)`)
    inside one `jax.jit`, as a user would write it: one compiled program, one call,
    the checks compiled in as run-time errors. The like-for-like comparison with
    optimistix, whose whole computation is also one jitted call."""

    name = "optsens_jit"
    label = "optsens, whole pipeline in one jax.jit"
    max_order = 10

    def setup(self, cfg, data):
        super().setup(cfg, data)
        import functools

        import optsens

        jax, f = self.jax, self.f

        @functools.partial(jax.jit, static_argnums=0)
        def derivatives(order, theta0, eps0, v, args):
            eq = optsens.EstimatingEquation.from_objective(f, theta0, eps0, args=args)
            return optsens.taylor_expansion(eq, order).derivatives(v)

        self.derivatives = derivatives

    def run(self, order):
        t0 = now()
        out = self.derivatives(order, self.theta0, self.eps0, self.v, self.args)
        self.jax.block_until_ready(out)
        return 0.0, now() - t0, [np.asarray(d) for d in out]


class NestedMethod(OptsensMethod):
    """The nested custom_jvp trick: derivatives of `implicit_optimum` (same H factorisation)."""

    name = "nested"
    label = "nested trick (JAX)"
    max_order = 8
    engine_method = "nested"


class OptimistixMethod(_JaxMethod):
    """`optimistix.minimise(BFGS, adjoint=ImplicitAdjoint())` from ``theta0``,
    differentiated with ``k`` nested `jax.jvp`, ``k = 1..K``, in one jitted call."""

    name = "optimistix"
    label = "optimistix ImplicitAdjoint + nested jvp"
    max_order = 8
    requires = ("optimistix",)

    def setup(self, cfg, data):
        super().setup(cfg, data)
        import functools

        import optimistix as optx

        jax, jnp, f = self.jax, self.jnp, self.f
        solver = optx.BFGS(rtol=1e-10, atol=1e-10)

        def theta_hat(eps, theta0, x, y):
            sol = optx.minimise(
                lambda th, a: f(th, *a),
                solver,
                theta0,
                args=(eps, x, y),
                adjoint=optx.ImplicitAdjoint(),
                throw=False,
            )
            return sol.value

        def nth(fun: Callable, n: int) -> Callable:
            for _ in range(n):
                fun = (lambda g: lambda t: jax.jvp(g, (t,), (jnp.ones_like(t),))[1])(fun)
            return fun

        @functools.partial(jax.jit, static_argnums=0)
        def derivatives(order, eps0, v, theta0, x, y):
            path = lambda t: theta_hat(eps0 + t * v, theta0, x, y)  # noqa: E731
            t0 = jnp.zeros((), theta0.dtype)
            return [nth(path, k)(t0) for k in range(1, order + 1)]

        self.derivatives = derivatives

    def run(self, order):
        t0 = now()
        out = self.derivatives(order, self.eps0, self.v, self.theta0, *self.args)
        self.jax.block_until_ready(out)
        return 0.0, now() - t0, [np.asarray(d) for d in out]


class RefitMethod(_JaxMethod):
    """An exact refit at ``eps0 + 0.3 v`` by damped Newton (`optsens.newton_solve`,
    jitted, exact Hessian) from ``theta0``: what one Taylor evaluation replaces. Its
    cost does not depend on the order."""

    name = "refit"
    label = "exact refit (Newton), per eps"
    max_order = 1

    def setup(self, cfg, data):
        super().setup(cfg, data)
        import optsens

        self.optsens = optsens

    def run(self, order):
        del order
        t0 = now()
        theta = self.optsens.newton_solve(
            self.f, self.theta0, self.eps0 + REFIT_STEP * self.v, args=self.args, objective=True
        )
        self.jax.block_until_ready(theta)
        return 0.0, now() - t0, [np.asarray(theta)]


# ------------------------------------------------------------------ autograd
class _AutogradMethod(Method):
    requires = ("autograd",)

    def setup(self, cfg, data):
        import autograd
        import autograd.numpy as anp

        self.autograd = autograd
        f = objective(cfg.problem, cfg.p, anp)
        x, y = data["x"], data["y"]
        self.f = lambda theta, eps: f(theta, eps, x, y)
        self.theta0, self.eps0, self.v = data["theta0"], data["eps0"], data["v"]
        warnings.filterwarnings("ignore", message="Output seems independent of input")


class VittlesMethod(_AutogradMethod):
    """`vittles.ParametricSensitivityTaylorExpansion.optimization_objective` (forward mode).

    Construction = the Hessian by `autograd.hessian` + the expansion object (its
    Cholesky factorisation and its table of Taylor terms). The Hessian does not
    depend on the order; when it takes over 0.5 s (D = 1000) it is computed once
    per process and its time added to every order instead of recomputing it.
    """

    name = "vittles"
    label = "vittles 0.173 (autograd)"
    max_order = 10
    requires = ("autograd", "vittles", "paragami")

    def setup(self, cfg, data):
        super().setup(cfg, data)
        from vittles import ParametricSensitivityTaylorExpansion

        self.expansion = ParametricSensitivityTaylorExpansion
        self.hessian_fn = self.autograd.hessian(self.f, 0)
        self.hess, self.hess_s = None, None

    def run(self, order):
        if self.hess is None or self.hess_s < 0.5:
            t0 = now()
            self.hess = self.hessian_fn(self.theta0, self.eps0)
            self.hess_s = now() - t0
        t1 = now()
        ts = self.expansion.optimization_objective(
            self.f, self.theta0, self.eps0, order=order, hess0=self.hess
        )
        t2 = now()
        derivatives = ts.evaluate_input_derivs(self.v, max_order=order)
        t3 = now()
        return self.hess_s + (t2 - t1), t3 - t2, [np.asarray(d) for d in derivatives]


class AutogradNestedMethod(_AutogradMethod):
    """The nested trick as Giordano's blog post wrote it, in autograd: a primitive
    ``theta_hat(eps)`` returning ``theta0`` whose forward-mode rule re-forms the
    Hessian (`autograd.hessian`) and the cross derivative at ``theta_hat(eps)`` and
    solves; ``d^k theta_hat / dt^k`` by ``k`` nested `make_jvp`, for k = 1..K."""

    name = "nested_autograd"
    label = "nested trick (autograd, blog)"
    max_order = 8

    def setup(self, cfg, data):
        super().setup(cfg, data)
        import autograd.numpy as anp
        from autograd.differential_operators import make_jvp
        from autograd.extend import defjvp, primitive

        autograd, f, theta0 = self.autograd, self.f, self.theta0

        @primitive
        def solve(a, b):
            return np.linalg.solve(a, b)

        # d(A^-1 b) = A^-1 (db - dA A^-1 b); autograd has no forward rule for solve.
        defjvp(solve, lambda g, ans, a, b: -solve(a, anp.dot(g, ans)), lambda g, ans, a, b: solve(a, g))
        hessian = autograd.hessian(f, 0)
        cross = autograd.jacobian(autograd.grad(f, 0), 1)

        @primitive
        def theta_hat(eps):
            return theta0

        def theta_hat_jvp(g, ans, eps):
            theta = theta_hat(eps)
            return -solve(hessian(theta, eps), anp.dot(cross(theta, eps), g))

        defjvp(theta_hat, theta_hat_jvp)

        def nth(fun, n):
            for _ in range(n):
                fun = (lambda h: lambda t: make_jvp(h)(t)(1.0)[1])(fun)
            return fun

        eps0, v = self.eps0, self.v
        self.path_derivative = lambda k: nth(lambda t: theta_hat(eps0 + t * v), k)(0.0)

    def run(self, order):
        t0 = now()
        out = [np.asarray(self.path_derivative(k)) for k in range(1, order + 1)]
        return 0.0, now() - t0, out


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        OptsensMethod,
        OptsensJitMethod,
        VittlesMethod,
        NestedMethod,
        OptimistixMethod,
        AutogradNestedMethod,
        RefitMethod,
    )
}


def factorial_scale(derivatives: list[np.ndarray]) -> list[np.ndarray]:
    """Normalised Taylor coefficients ``D^k / k!`` (for the series at a step)."""
    return [d / math.factorial(k) for k, d in enumerate(derivatives, start=1)]
