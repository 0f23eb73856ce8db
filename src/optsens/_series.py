"""Taylor-mode propagation of truncated power series through any JAX function.

A *series* of order ``K`` for an array ``x`` is the list ``[x_1, ..., x_K]`` of its
normalised Taylor coefficients along a path ``x(t) = x_0 + x_1 t + ... + x_K t^K``
(so ``x_k = (1/k!) d^k x / dt^k``). Given the series of the inputs of ``f``,
:func:`propagate_series` returns the series of ``f(x(t))`` exactly (to rounding).

It interprets the jaxpr of ``f`` one equation at a time:

- an equation none of whose inputs carries a series is evaluated as is;
- ``jit`` sub-jaxprs are interpreted recursively;
- a primitive with a rule in ``jax.experimental.jet`` uses that rule (the rules work
  on normalised coefficients);
- ``mul`` and ``dot_general`` with one constant operand are linear: one product per
  coefficient instead of jet's convolution;
- everything else — functions with custom JVP rules (``logaddexp``, ``softplus``,
  user rules), primitives that jet lacks (``lgamma``, ``digamma``, ``while``,
  ``cond``, ...) — goes through *the JVP rule*: for ``y = f(x)``,
  ``y'(t) = J_f(x(t)) x'(t)``, so the series of ``y'`` is the Taylor-mode image of
  ``f``'s JVP at order ``K - 1`` applied to the series of ``x`` and of
  ``x' = [x_1, 2 x_2, ..., K x_K]``, and ``y_k = (y')_{k-1} / k``. The JVP calls ``f``
  again for its primal, one order lower, so the recursion ends at order 0 with a
  plain evaluation. This uses the function's own JVP rule (not its primal code),
  so it is exact at kinks and ties too (``softplus'(0) = 1/2``).

Inputs without a series stay constant: they are never differentiated, so integer
arguments (the order of ``polygamma``) are safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core, custom_derivatives as _custom, pjit as _pjit
from jax.experimental import jet as _jet

__all__ = ["propagate_series", "propagate_function_series"]

Series = list[Any] | None  # None: the value is constant along the path

_JIT_PRIMITIVES = {_pjit.jit_p}
_CUSTOM_JVP = _custom.custom_jvp_call_p
_CUSTOM_VJP = _custom.custom_vjp_call_p
# Bilinear primitives: linear in each argument, so one constant operand makes the
# whole product linear in the other.
_BILINEAR = {lax.mul_p, lax.dot_general_p}


def _is_inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _bind(eqn_primitive, params, invals):
    bind_params = eqn_primitive.get_bind_params(params)
    return eqn_primitive.bind(*invals, **bind_params)


def _evaluate(primitive, params, invals):
    """Plain evaluation of one equation; always returns a list of outputs."""
    out = _bind(primitive, params, invals)
    return list(out) if primitive.multiple_results else [out]


def propagate_series(
    closed_jaxpr: jax_core.ClosedJaxpr,
    primals: Sequence[Any],
    series: Sequence[Series],
    order: int,
) -> tuple[list[Any], list[Series]]:
    """Push the order-`order` series of the inputs through a closed jaxpr.

    **Arguments:**

    - `closed_jaxpr`: the function, as traced by `jax.make_jaxpr`.
    - `primals`: the values ``x_0`` of the inputs (flat list).
    - `series`: for each input, the list ``[x_1, ..., x_order]``, or ``None`` when the
      input is constant along the path.
    - `order`: the truncation order ``K >= 0``.

    **Returns:** ``(primals_out, series_out)``, with ``None`` for outputs that are
    constant along the path.
    """
    jaxpr = closed_jaxpr.jaxpr
    env: dict[Any, tuple[Any, Series]] = {}

    def read(atom):
        if isinstance(atom, jax_core.Literal):
            return atom.val, None
        return env[atom]

    for var, val in zip(jaxpr.constvars, closed_jaxpr.consts, strict=True):
        env[var] = (val, None)
    for var, val, ser in zip(jaxpr.invars, primals, series, strict=True):
        env[var] = (val, ser if order > 0 else None)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        in_primals = [p for p, _ in ins]
        in_series = [s for _, s in ins]
        if all(s is None for s in in_series):
            outs = _evaluate(eqn.primitive, eqn.params, in_primals)
            out_series: list[Series] = [None] * len(outs)
        else:
            outs, out_series = _equation_series(eqn, in_primals, in_series, order)
        for var, p, s in zip(eqn.outvars, outs, out_series, strict=True):
            env[var] = (p, s)

    results = [read(v) for v in jaxpr.outvars]
    return [p for p, _ in results], [s for _, s in results]


def _equation_series(eqn, primals, series, order):
    prim = eqn.primitive
    if prim in _JIT_PRIMITIVES:
        return propagate_series(eqn.params["jaxpr"], primals, series, order)
    if prim is _CUSTOM_VJP:
        # Reverse-mode-only rules say nothing about forward derivatives: follow the
        # primal computation.
        return propagate_series(eqn.params["call_jaxpr"], primals, series, order)
    if prim in _BILINEAR and sum(s is not None for s in series) == 1:
        return _linear_in_one_argument(prim, eqn.params, primals, series)
    if prim is not _CUSTOM_JVP and prim in _jet.jet_rules:
        return _jet_rule(prim, eqn.params, primals, series, order)
    return _series_through_jvp(eqn, primals, series, order)


def _linear_in_one_argument(prim, params, primals, series):
    (which,) = [i for i, s in enumerate(series) if s is not None]
    out = prim.bind(*primals, **params)
    out_series = []
    for coeff in series[which]:
        args = list(primals)
        args[which] = coeff
        out_series.append(prim.bind(*args, **params))
    return [out], [out_series]


def _jet_rule(prim, params, primals, series, order):
    full_series = [
        [jnp.zeros(np.shape(p), jnp.result_type(p))] * order if s is None else list(s)
        for p, s in zip(primals, series, strict=True)
    ]
    out, out_series = _jet.jet_rules[prim](primals, full_series, **params)
    if not prim.multiple_results:
        out, out_series = [out], [out_series]
    fixed = []
    for p, s in zip(out, out_series, strict=True):
        if s is _jet.zero_series or not _is_inexact(p):
            fixed.append(None)
        else:
            fixed.append(
                [jnp.zeros(np.shape(p), jnp.result_type(p)) if t is _jet.zero_term else t for t in s]
            )
    return list(out), fixed


def _series_through_jvp(eqn, primals, series, order):
    """Series of ``y = f(x)`` from the series of ``f``'s JVP, one order lower."""
    prim, params = eqn.primitive, eqn.params
    moving = [i for i, s in enumerate(series) if s is not None]

    def f(*args):
        return _evaluate(prim, params, args)

    outs = f(*primals)
    if order == 0:
        return outs, [None] * len(outs)

    def jvp_of_f(*args):
        # args: all primals, then one tangent per moving input. Constant inputs are
        # closed over in the JVP so they are never differentiated.
        all_primals, tangents = args[: len(primals)], args[len(primals) :]

        def f_of_moving(*moving_vals):
            full = list(all_primals)
            for i, val in zip(moving, moving_vals, strict=True):
                full[i] = val
            return f(*full)

        moving_primals = [all_primals[i] for i in moving]
        return jax.jvp(f_of_moving, moving_primals, list(tangents))

    tangents0 = [series[i][0] for i in moving]
    closed = jax.make_jaxpr(jvp_of_f)(*primals, *tangents0)
    lower = order - 1
    # x(t) truncated to order K-1, and x'(t) = sum_j (j+1) x_{j+1} t^j.
    in_series: list[Series] = [None if s is None else list(s[:lower]) for s in series]
    tangent_series = [[(j + 1) * series[i][j] for j in range(1, order)] for i in moving]
    (flat_out, flat_series) = propagate_series(
        closed, [*primals, *tangents0], [*in_series, *tangent_series], lower
    )
    n_out = len(outs)
    tangent_out, tangent_out_series = flat_out[n_out:], flat_series[n_out:]
    result_series: list[Series] = []
    for y, dy0, dy_series in zip(outs, tangent_out, tangent_out_series, strict=True):
        if not _is_inexact(y):
            result_series.append(None)
            continue
        derivative = [dy0] + (list(dy_series) if dy_series is not None else [jnp.zeros_like(dy0)] * lower)
        result_series.append(
            [jnp.asarray(derivative[k - 1] / k, dtype=jnp.result_type(y)) for k in range(1, order + 1)]
        )
    return outs, result_series


def propagate_function_series(
    fun: Callable[..., Any],
    primals: Sequence[Any],
    series: Sequence[Series],
    order: int,
) -> tuple[Any, list[Series]]:
    """:func:`propagate_series` for a Python function of flat array arguments.

    Returns ``(primals_out, series_out)`` as flat lists over the leaves of `fun`'s
    output.
    """
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*primals)
    out_primals, out_series = propagate_series(closed, primals, series, order)
    del out_shape
    return out_primals, out_series
