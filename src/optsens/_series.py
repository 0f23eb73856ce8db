"""Taylor-mode propagation of truncated power series through any JAX function.

A *series* of order ``K`` for an array ``x`` is the list ``[x_1, ..., x_K]`` of its
normalised Taylor coefficients along a path ``x(t) = x_0 + x_1 t + ... + x_K t^K``
(so ``x_k = (1/k!) d^k x / dt^k``). Given the series of the inputs of ``f``,
:func:`propagate_series` returns the series of ``f(x(t))`` exactly (to rounding).

The work is done *online*, one order at a time, by `SeriesState`: it holds the
coefficients ``0..k`` of every intermediate value of the jaxpr of ``f`` and extends
them all to order ``k + 1`` given the inputs' coefficient ``k + 1``. Each coefficient
is computed once, so order ``K`` costs ``O(K^2)`` convolution terms in all, and the
inputs' newest coefficient may be supplied late: `SeriesState.correct` adds a
change of the newest input coefficients to every intermediate value (the newest
coefficient of any value is affine in the newest input coefficients). That is what
the implicit recursion of `taylor_expansion` needs: ``theta_k`` is known only after
the ``t^k`` coefficient of ``G`` has been computed with ``theta_k = 0``.

Per equation of the jaxpr:

- no input carries a series: evaluated once, constant along the path;
- ``jit`` sub-jaxprs and ``custom_vjp`` functions (whose primal computation is
  followed) are interpreted recursively, in step;
- ``cond``/``switch``, ``scan`` (``fori_loop``) and ``while_loop`` are emitted again
  at each order ``k`` with the series of order ``k`` pushed through their bodies (the
  loops carry the coefficients ``1..k`` of their carry; only the selected branch
  runs): polynomial in the order, and the program does not grow with a loop's length;
- linear primitives (``add``, ``reshape``, ``dot_general`` or ``mul`` with one
  constant operand, ...) map the newest coefficient alone; ``mul``/``dot_general``
  of two series is a convolution; ``div``, ``exp`` and ``log`` use their classical
  recurrences on the output's own coefficients;
- other primitives with a rule in ``jax.experimental.jet`` use that rule (which
  works on normalised coefficients) and keep its newest coefficient;
- everything else — functions with custom JVP rules (``logaddexp``, ``softplus``,
  user rules), primitives that jet lacks (``lgamma``, ``digamma``, a vmapped
  ``while``, ...) — goes through *the JVP rule*: for ``y = f(x)``,
  ``y'(t) = J_f(x(t)) x'(t)``, so ``y_k = (y')_{k-1} / k`` where the series of ``y'``
  is the Taylor-mode image of ``f``'s JVP applied to the series of ``x`` and of
  ``x' = [x_1, 2 x_2, ..., K x_K]``, one order behind. The JVP is itself
  interpreted online; where it calls ``f`` again on the same inputs for its primal
  (``logaddexp``'s rule does), that call *is* ``y``, whose lower coefficients are
  already known, so it is read instead of recursing. This uses the function's own
  JVP rule (not its primal code), so it is exact at kinks and ties too
  (``softplus'(0) = 1/2``).

Inputs without a series stay constant: they are never differentiated, so integer
arguments (the order of ``polygamma``) are safe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import ad_util as _ad_util, core as jax_core, custom_derivatives as _custom, pjit as _pjit
from jax._src.lax.control_flow import conditionals as _conditionals, loops as _loops
from jax.experimental import jet as _jet

__all__ = ["SeriesState", "propagate_series", "propagate_function_series"]

Series = list[Any] | None  # None: the value is constant along the path

_JIT_PRIMITIVES = {_pjit.jit_p}
_CUSTOM_JVP = _custom.custom_jvp_call_p
_CUSTOM_VJP = _custom.custom_vjp_call_p
_COND = _conditionals.cond_p
_SCAN = _loops.scan_p
_WHILE = _loops.while_p
# Bilinear primitives: linear in each argument, so one constant operand makes the
# whole product linear in the other.
_BILINEAR = {lax.mul_p, lax.dot_general_p}


def _jet_rule_kind(prim) -> str:
    rule = _jet.jet_rules.get(prim)
    if isinstance(rule, functools.partial) and rule.func is _jet.linear_prop:
        return "linear"
    if isinstance(rule, functools.partial) and rule.func is _jet.zero_prop:
        return "zero"
    return "rule" if rule is not None else ""


# Linear in their inexact inputs, with integer/boolean inputs (indices, predicates)
# held fixed: the newest coefficient maps through the primitive itself.
_LINEAR_EXTRA = {lax.select_n_p, lax.gather_p, lax.dynamic_slice_p, lax.dynamic_update_slice_p, lax.cumsum_p}


def _is_inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _bind(eqn_primitive, params, invals):
    bind_params = eqn_primitive.get_bind_params(params)
    return eqn_primitive.bind(*invals, **bind_params)


def _evaluate(primitive, params, invals):
    """Plain evaluation of one equation; always returns a list of outputs."""
    out = _bind(primitive, params, invals)
    return list(out) if primitive.multiple_results else [out]


def _zeros_like(x):
    return jnp.zeros(np.shape(x), jnp.result_type(x))


def _add(a, b):
    """``a + b`` where ``None`` is an exact zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _sum(terms):
    out = None
    for t in terms:
        out = _add(out, t)
    return out


def _fit(x, like):
    """`x` cast and broadcast to the shape and dtype of `like` (``None`` stays ``None``)."""
    if x is None:
        return None
    x = jnp.asarray(x, jnp.result_type(like))
    if np.shape(x) != np.shape(like):
        x = jnp.broadcast_to(x, np.shape(like))
    return x


# ---------------------------------------------------------------- the state
class SeriesState:
    """The online Taylor-mode state of one closed jaxpr.

    Holds, for every value of the jaxpr that moves along the path, its coefficients
    ``[x_0, x_1, ..., x_k]`` (an entry ``None`` is an exact zero); `extend` computes
    coefficient ``k + 1`` of all of them, `correct` changes the newest one.

    **Arguments:**

    - `closed_jaxpr`: the function, as traced by `jax.make_jaxpr`.
    - `primals`: the values ``x_0`` of its inputs (flat list).
    - `moving`: for each input, whether it carries a series (``False``: constant).
    - `memo`: internal; equations of this jaxpr whose outputs are known values of an
      enclosing state (``{equation index: list of coefficient lists}``).
    """

    def __init__(
        self,
        closed_jaxpr: jax_core.ClosedJaxpr,
        primals: Sequence[Any],
        moving: Sequence[bool],
        memo: dict[int, list] | None = None,
    ):
        jaxpr = closed_jaxpr.jaxpr
        self.jaxpr = jaxpr
        self._setup = (closed_jaxpr, list(moving), memo)  # to rebuild at a new point
        self.order = 0
        self.const: dict[Any, Any] = {}
        self.coeffs: dict[Any, list] = {}
        for var, val in zip(jaxpr.constvars, closed_jaxpr.consts, strict=True):
            self.const[var] = val
        for var, val, mov in zip(jaxpr.invars, primals, moving, strict=True):
            if mov and _is_inexact(val):
                self.coeffs[var] = [val]
            else:
                self.const[var] = val
        self.rules: list[tuple[Any, _Rule]] = []
        memo = memo or {}
        for index, eqn in enumerate(jaxpr.eqns):
            in_primals = [self._primal(v) for v in eqn.invars]
            in_moving = [self._moving(v) for v in eqn.invars]
            if not any(in_moving):
                outs = _evaluate(eqn.primitive, eqn.params, in_primals)
                for var, val in zip(eqn.outvars, outs, strict=True):
                    self.const[var] = val
                continue
            if index in memo:
                rule: _Rule = _MemoRule(memo[index])
            else:
                rule = _make_rule(eqn, in_moving)
            outs = rule.init(in_primals)
            for var, val, mov in zip(eqn.outvars, outs, rule.out_moving, strict=True):
                if mov:
                    self.coeffs[var] = [val]
                else:
                    self.const[var] = val
            self.rules.append((eqn, rule))

    # ------------------------------------------------------------ reading
    def _moving(self, atom) -> bool:
        return not isinstance(atom, jax_core.Literal) and atom in self.coeffs

    def _primal(self, atom):
        if isinstance(atom, jax_core.Literal):
            return atom.val
        if atom in self.coeffs:
            return self.coeffs[atom][0]
        return self.const[atom]

    def _inputs(self, eqn) -> list[tuple[Any, list | None]]:
        return [(self._primal(v), self.coeffs.get(v) if self._moving(v) else None) for v in eqn.invars]

    def primals_out(self) -> list[Any]:
        return [self._primal(v) for v in self.jaxpr.outvars]

    def coefficients_out(self) -> list[list | None]:
        """For each output, ``[x_0, ..., x_k]`` (``None`` entries are zeros), or ``None``
        if the output is constant along the path."""
        return [self.coeffs.get(v) if self._moving(v) else None for v in self.jaxpr.outvars]

    def input_moving(self) -> list[bool]:
        return [v in self.coeffs for v in self.jaxpr.invars]

    # ----------------------------------------------------------- updating
    def extend(self, inputs_top: Sequence[Any]) -> list[Any]:
        """Append coefficient ``k + 1`` of every input (``None``: zero; ignored for
        constant inputs) and compute coefficient ``k + 1`` of every value.

        **Returns:** the outputs' new coefficient (``None``: zero or constant).
        """
        self.order += 1
        k = self.order
        for var, top in zip(self.jaxpr.invars, inputs_top, strict=True):
            if var in self.coeffs:
                self.coeffs[var].append(_fit(top, self.coeffs[var][0]))
        for eqn, rule in self.rules:
            tops = rule.extend(self._inputs(eqn), [self.coeffs.get(v) for v in eqn.outvars], k)
            for var, top, mov in zip(eqn.outvars, tops, rule.out_moving, strict=True):
                if mov:
                    self.coeffs[var].append(_fit(top, self.coeffs[var][0]))
        return [self.coeffs[v][k] if self._moving(v) else None for v in self.jaxpr.outvars]

    def correct(self, inputs_delta: Sequence[Any]) -> list[Any]:
        """Add `inputs_delta` to the inputs' newest coefficient (``None``: no change)
        and update the newest coefficient of every value to match.

        **Returns:** the change of the outputs' newest coefficient.
        """
        k = self.order
        old_out = self.primals_out() if k == 0 else None
        rebuild = False
        delta: dict[Any, Any] = {}
        for var, d in zip(self.jaxpr.invars, inputs_delta, strict=True):
            if d is not None and var in self.coeffs:
                d = _fit(d, self.coeffs[var][0])
                self.coeffs[var][k] = _add(self.coeffs[var][k], d)
                delta[var] = d
        for eqn, rule in self.rules:
            in_delta = [None if isinstance(v, jax_core.Literal) else delta.get(v) for v in eqn.invars]
            if all(d is None for d in in_delta):
                continue
            ins = self._inputs(eqn)
            outs = [self.coeffs.get(v) for v in eqn.outvars]
            if k == 0:
                # A moved value feeds a piecewise-constant output (a comparison, floor,
                # argmax): branch decisions may change, and those outputs and everything
                # computed from them were evaluated once, at the old point.
                rebuild = rebuild or (not isinstance(rule, _MemoRule) and not all(rule.out_moving))
                out_delta = rule.reevaluate(ins, in_delta, outs)
            else:
                out_delta = rule.correct(ins, in_delta, outs, k)
            for var, d, mov in zip(eqn.outvars, out_delta, rule.out_moving, strict=True):
                if mov and d is not None:
                    d = _fit(d, self.coeffs[var][0])
                    self.coeffs[var][k] = _add(self.coeffs[var][k], d)
                    delta[var] = d
        if rebuild:
            return self._rebuild(old_out)
        return [delta.get(v) if self._moving(v) else None for v in self.jaxpr.outvars]

    def _rebuild(self, old_out: list[Any]) -> list[Any]:
        """Start again at the (already moved) order-0 point; the outputs' change."""
        closed, moving, memo = self._setup
        primals = [self._primal(v) for v in self.jaxpr.invars]
        self.__init__(closed, primals, moving, memo)
        return [
            (new - old) if self._moving(v) else None
            for v, new, old in zip(self.jaxpr.outvars, self.primals_out(), old_out, strict=True)
        ]


# ------------------------------------------------------------------ rules
class _Rule:
    """How one equation's coefficients grow. `ins` are ``(primal, coefficients or
    None)`` per input; `outs` the outputs' coefficient lists (``None`` if constant)."""

    out_moving: list[bool]

    def __init__(self, eqn, in_moving):
        self.eqn = eqn
        self.prim, self.params = eqn.primitive, eqn.params
        self.in_moving = in_moving

    def init(self, in_primals):
        outs = _evaluate(self.prim, self.params, in_primals)
        self.out_moving = [_is_inexact(o) for o in outs]
        return outs

    def extend(self, ins, outs, k):
        raise NotImplementedError

    def correct(self, ins, in_delta, outs, k):
        """Change of the outputs' coefficient ``k >= 1`` for a change `in_delta` of the
        inputs' coefficient ``k`` (exact: it is affine in them)."""
        raise NotImplementedError

    def reevaluate(self, ins, in_delta, outs):
        """Order 0: the inputs' values themselves changed (the ones in `ins` are
        already updated); evaluate again and return the change."""
        new = _evaluate(self.prim, self.params, [p for p, _ in ins])
        return [None if c is None else n - c[0] for n, c in zip(new, outs, strict=True)]


def _top(c, k):
    return None if c is None else c[k]


class _LinearRule(_Rule):
    """Linear in its inexact inputs (integer/boolean inputs fixed), or ``mul`` /
    ``dot_general`` / ``div`` with the other operand constant."""

    def _map(self, ins, tops):
        if all(t is None for t in tops):
            return [None] * len(self.out_moving)
        if self.prim in _BILINEAR or self.prim is lax.div_p:
            (i,) = [j for j, m in enumerate(self.in_moving) if m]
            args = [p for p, _ in ins]
            args[i] = tops[i]
            return _evaluate(self.prim, self.params, args)
        if self.prim in (lax.add_p, lax.sub_p, _ad_util.add_jaxvals_p) and any(t is None for t in tops):
            a, b = tops
            out = a if b is None else (b if self.prim is not lax.sub_p else -b)
            return [out]
        args = []
        for (p, _), t in zip(ins, tops, strict=True):
            if _is_inexact(p):
                args.append(_zeros_like(p) if t is None else t)
            else:
                args.append(p)
        return _evaluate(self.prim, self.params, args)

    def extend(self, ins, outs, k):
        return self._map(ins, [_top(c, k) for _, c in ins])

    def correct(self, ins, in_delta, outs, k):
        return self._map(ins, in_delta)


class _BilinearRule(_Rule):
    """``z = op(a, b)`` with both moving: ``z_k = sum_i op(a_i, b_{k-i})``."""

    def _op(self, a, b):
        if a is None or b is None:
            return None
        return _bind(self.prim, self.params, [a, b])

    def extend(self, ins, outs, k):
        (_, a), (_, b) = ins
        return [_sum(self._op(a[i], b[k - i]) for i in range(k + 1))]

    def correct(self, ins, in_delta, outs, k):
        (_, a), (_, b) = ins
        da, db = in_delta
        return [_add(self._op(da, b[0]), self._op(a[0], db))]


class _DivRule(_Rule):
    """``z = a / b`` with `b` moving: ``z_k = (a_k - sum_{i=1..k} b_i z_{k-i}) / b_0``."""

    def extend(self, ins, outs, k):
        (_, a), (b0, b) = ins
        (z,) = outs
        acc = _top(a, k)
        for i in range(1, k + 1):
            if b[i] is not None and z[k - i] is not None:
                acc = _add(acc, -(b[i] * z[k - i]))
        return [None if acc is None else acc / b0]

    def correct(self, ins, in_delta, outs, k):
        (_, _), (b0, _) = ins
        (z,) = outs
        da, db = in_delta
        acc = da
        if db is not None:
            acc = _add(acc, -(db * z[0]))
        return [None if acc is None else acc / b0]


class _ExpRule(_Rule):
    """``z = exp(a)``: ``z_k = (1/k) sum_{j=1..k} j a_j z_{k-j}``."""

    def extend(self, ins, outs, k):
        ((_, a),) = ins
        (z,) = outs
        terms = [j * a[j] * z[k - j] for j in range(1, k + 1) if a[j] is not None and z[k - j] is not None]
        acc = _sum(terms)
        return [None if acc is None else acc / k]

    def correct(self, ins, in_delta, outs, k):
        ((_, _),) = ins
        (z,) = outs
        (da,) = in_delta
        return [da * z[0]]


class _LogRule(_Rule):
    """``z = log(a)``: ``z_k = (a_k - (1/k) sum_{j=1..k-1} j z_j a_{k-j}) / a_0``."""

    def extend(self, ins, outs, k):
        ((a0, a),) = ins
        (z,) = outs
        terms = [j * z[j] * a[k - j] for j in range(1, k) if z[j] is not None and a[k - j] is not None]
        acc = _sum(terms)
        acc = None if acc is None else -(acc / k)
        acc = _add(a[k], acc)
        return [None if acc is None else acc / a0]

    def correct(self, ins, in_delta, outs, k):
        ((a0, _),) = ins
        (da,) = in_delta
        return [da / a0]


class _JetRule(_Rule):
    """A rule of ``jax.experimental.jet``, called on the series up to order ``k``;
    its newest coefficient is kept (the lower ones it recomputes are identical
    computations, merged by XLA)."""

    def _call(self, ins, k):
        full = []
        for p, c in ins:
            if c is None:
                full.append([_zeros_like(p)] * k)
            else:
                full.append([_zeros_like(p) if t is None else t for t in c[1 : k + 1]])
        out, out_series = _jet.jet_rules[self.prim]([p for p, _ in ins], full, **self.params)
        if not self.prim.multiple_results:
            out_series = [out_series]
        tops = []
        for s in out_series:
            if s is _jet.zero_series:
                tops.append(None)
            else:
                t = s[k - 1]
                tops.append(None if t is _jet.zero_term else t)
        return tops

    def extend(self, ins, outs, k):
        return self._call(ins, k)

    def correct(self, ins, in_delta, outs, k):
        new = self._call(ins, k)  # the inputs' coefficient k is already updated
        return [
            None if n is None else (n if c[k] is None else n - c[k]) for n, c in zip(new, outs, strict=True)
        ]


class _ZeroRule(_Rule):
    """Piecewise-constant primitives (comparisons, ``floor``, ``stop_gradient``, ...)."""

    def init(self, in_primals):
        outs = super().init(in_primals)
        self.out_moving = [False] * len(outs)
        return outs

    def extend(self, ins, outs, k):
        return [None] * len(self.out_moving)

    def correct(self, ins, in_delta, outs, k):
        return [None] * len(self.out_moving)


class _SubJaxprRule(_Rule):
    """``jit`` (and ``custom_vjp``'s primal computation): a nested state, in step."""

    def __init__(self, eqn, in_moving, jaxpr):
        super().__init__(eqn, in_moving)
        self.closed = jaxpr

    def init(self, in_primals):
        self.state = SeriesState(self.closed, in_primals, self.in_moving)
        outs = self.state.primals_out()
        self.out_moving = [c is not None for c in self.state.coefficients_out()]
        return outs

    def extend(self, ins, outs, k):
        return self.state.extend([_top(c, k) for _, c in ins])

    def correct(self, ins, in_delta, outs, k):
        return self.state.correct(in_delta)

    def reevaluate(self, ins, in_delta, outs):
        return self.state.correct(in_delta)


class _MemoRule(_Rule):
    """An equation of a JVP rule that recomputes the enclosing ``y = f(x)``: its
    coefficients are those of ``y``, already known one order ahead."""

    def __init__(self, outer_coeffs: list):
        self.outer = outer_coeffs

    def init(self, in_primals):
        self.out_moving = [c is not None for c in self.outer]
        return [c[0] for c in self.outer]

    def extend(self, ins, outs, k):
        return [None if c is None else c[k] for c in self.outer]

    def correct(self, ins, in_delta, outs, k):
        return [None] * len(self.outer)

    def reevaluate(self, ins, in_delta, outs):
        return [None] * len(self.outer)


def _memo_key(eqn):
    """What makes two equations the same function (``None``: never merge)."""
    params = eqn.params
    if eqn.primitive is _CUSTOM_JVP:
        call, jvp = params["call_jaxpr"], params["jvp_jaxpr_fun"]
        info = getattr(jvp, "debug_info", None)
        src = getattr(info, "func_src_info", None)
        if src is None:
            return None
        return (
            "custom_jvp",
            str(call.jaxpr),
            tuple(id(c) for c in call.consts),
            src,
            params.get("num_consts"),
            params.get("symbolic_zeros"),
        )
    try:
        return (eqn.primitive, tuple(sorted(params.items())), hash(tuple(sorted(params.items()))))
    except TypeError:
        return None


class _JvpRule(_Rule):
    """Any ``y = f(x)`` through its JVP: ``y_k = (y')_{k-1} / k``, with the series of
    ``y' = J_f(x) x'`` from an online state of the JVP's jaxpr, one order behind."""

    def init(self, in_primals):
        outs = super().init(in_primals)
        self.moving_idx = [i for i, m in enumerate(self.in_moving) if m]
        self.inner: SeriesState | None = None
        return outs

    def _jvp_jaxpr(self, primals, tangents0):
        prim, params, moving, n = self.prim, self.params, self.moving_idx, len(primals)

        def f(*args):
            return _evaluate(prim, params, args)

        def jvp_of_f(*args):
            # args: all primals, then one tangent per moving input. Constant inputs are
            # closed over in the JVP so they are never differentiated.
            all_primals, tangents = args[:n], args[n:]

            def f_of_moving(*moving_vals):
                full = list(all_primals)
                for i, val in zip(moving, moving_vals, strict=True):
                    full[i] = val
                return f(*full)

            return jax.jvp(f_of_moving, [all_primals[i] for i in moving], list(tangents))

        return jax.make_jaxpr(jvp_of_f)(*primals, *tangents0)

    def _start(self, ins, outs, k) -> bool:
        """Build the online state of the JVP, at order ``k - 1``, from the inputs'
        coefficients up to ``k``. Until some moving input has a nonzero coefficient the
        outputs' are zero too (the JVP is linear in ``x'``) and nothing is built:
        returns ``False``."""
        if all(ins[i][1][j] is None for i in self.moving_idx for j in range(1, k + 1)):
            return False
        primals = [p for p, _ in ins]
        tangents0 = []
        for i in self.moving_idx:
            p, c = ins[i]
            tangents0.append(_zeros_like(p) if c[1] is None else c[1])
        closed = self._jvp_jaxpr(primals, tangents0)
        invars = closed.jaxpr.invars[: len(primals)]
        key = _memo_key(self.eqn)
        memo = {}
        if key is not None and all(self.out_moving):
            for index, e in enumerate(closed.jaxpr.eqns):
                if (
                    e.primitive is self.prim
                    and len(e.invars) == len(invars)
                    and all(a is b for a, b in zip(e.invars, invars, strict=True))
                    and len(e.outvars) == len(outs)
                    and _memo_key(e) == key
                ):
                    memo[index] = [c if m else None for c, m in zip(outs, self.out_moving, strict=True)]
        moving = [*self.in_moving, *([True] * len(tangents0))]
        self.inner = SeriesState(closed, [*primals, *tangents0], moving, memo)
        self.n_out = len(outs)
        for j in range(1, k):  # catch up: x_j and x'_j = (j + 1) x_{j+1}
            self.inner.extend(self._inner_tops(ins, j))
        return True

    def _inner_tops(self, ins, j):
        tops = [_top(c, j) for _, c in ins]
        for i in self.moving_idx:
            t = ins[i][1][j + 1]
            tops.append(None if t is None else (j + 1) * t)
        return tops

    def _inner_top_out(self):
        inner = self.inner
        if inner.order == 0:
            return inner.primals_out()[self.n_out :]
        return [None if c is None else c[inner.order] for c in inner.coefficients_out()[self.n_out :]]

    def _result(self, tangent_tops, k):
        out = []
        for mov, t in zip(self.out_moving, tangent_tops, strict=True):
            out.append(None if (not mov or t is None) else t / k)
        return out

    def extend(self, ins, outs, k):
        if self.inner is None:
            if not self._start(ins, outs, k):
                return [None] * len(self.out_moving)
            return self._result(self._inner_top_out(), k)
        new = self.inner.extend(self._inner_tops(ins, k - 1))
        return self._result(new[self.n_out :], k)

    def correct(self, ins, in_delta, outs, k):
        if self.inner is None:
            # All coefficients so far were zero; the corrected ones may not be.
            if not self._start(ins, outs, k):
                return [None] * len(self.out_moving)
            return self._result(self._inner_top_out(), k)
        primal_delta = [None] * len(ins)
        tangent_delta = [None if in_delta[i] is None else k * in_delta[i] for i in self.moving_idx]
        new = self.inner.correct([*primal_delta, *tangent_delta])
        return self._result(new[self.n_out :], k)


def _filled(p, c, k: int) -> list:
    """Coefficients ``1..k`` of a value (``None`` entries or a constant value: zeros)."""
    return [_zeros_like(p) if c is None or c[j] is None else _fit(c[j], p) for j in range(1, k + 1)]


class _RerunRule(_Rule):
    """Control flow whose intermediate values cannot be kept between orders (a
    branch chosen at run time, a loop): at order ``k`` the construct is emitted again
    with the series of order ``k`` pushed through its body, and coefficient ``k`` of
    its outputs is read off. Every inexact output is treated as moving (zeros where
    it does not). Polynomial in the order; through the JVP rule the construct would
    nest once per order (3x more program per order)."""

    def init(self, in_primals):
        self.last: list | None = None  # coefficient k of the outputs, for `correct`
        return super().init(in_primals)  # (every inexact output moves)

    def _series(self, ins, k) -> list:
        raise NotImplementedError

    def extend(self, ins, outs, k):
        self.last = self._series(ins, k)
        return self.last

    def correct(self, ins, in_delta, outs, k):
        # The inputs' coefficient k is already updated: emit again, return the change.
        old, new = self.last, self._series(ins, k)
        self.last = new
        return [None if n is None else n - o for n, o in zip(new, old, strict=True)]

    def _body_series(self, closed, primals, moving, coeffs, k):
        """Coefficients ``1..k`` of `closed`'s outputs (moving outputs only) at `primals`."""
        state = SeriesState(closed, primals, moving)
        for j in range(k):
            state.extend([c[j] if c else None for c in coeffs])
        # The body's outputs mirror the construct's (branch outputs; carry, then ys).
        outs, coeffs = state.primals_out(), state.coefficients_out()
        return outs, [
            _filled(p, c, k) if mov else [] for p, c, mov in zip(outs, coeffs, self.out_moving, strict=True)
        ]


class _CondRule(_RerunRule):
    """``cond`` / ``switch``: at each order a new ``switch`` on the same index whose
    branches push the series through themselves, so only the selected branch runs
    (an untaken branch may be invalid at this point, e.g. loop forever)."""

    def _series(self, ins, k):
        index = ins[0][0]
        primals = [p for p, _ in ins[1:]]
        moving = list(self.in_moving[1:])
        coeffs = [_filled(p, c, k) if mov else [] for (p, c), mov in zip(ins[1:], moving, strict=True)]

        def branch_fn(closed):
            def run(primals, coeffs):
                _, out = self._body_series(closed, primals, moving, coeffs, k)
                return [c[k - 1] for c in out if c]

            return run

        tops = iter(lax.switch(index, [branch_fn(b) for b in self.params["branches"]], primals, coeffs))
        return [next(tops) if mov else None for mov in self.out_moving]


class _ScanRule(_RerunRule):
    """``scan`` (``fori_loop`` with static bounds): at each order a new scan whose
    carry holds the carry's coefficients ``1..k`` and whose scanned inputs and outputs
    carry their coefficient stacks. The program does not grow with the length."""

    def _series(self, ins, k):
        params = self.params
        nc, ncar = params["num_consts"], params["num_carry"]
        primals = [p for p, _ in ins]
        moving = list(self.in_moving)
        for i in range(nc, nc + ncar):  # every inexact carry moves inside the loop
            moving[i] = _is_inexact(primals[i])
        coeffs = [_filled(p, c, k) if mov else [] for (p, c), mov in zip(ins, moving, strict=True)]
        consts, consts_c = primals[:nc], coeffs[:nc]

        def body(state, xs):
            carry, carry_c = state
            x, x_c = xs
            outs, out_c = self._body_series(
                params["jaxpr"], [*consts, *carry, *x], moving, [*consts_c, *carry_c, *x_c], k
            )
            ys_top = [c[k - 1] for c in out_c[ncar:] if c]
            return (outs[:ncar], out_c[:ncar]), (outs[ncar:], ys_top)

        init = (primals[nc : nc + ncar], coeffs[nc : nc + ncar])
        xs = (primals[nc + ncar :], coeffs[nc + ncar :])
        length, reverse = params["length"], params["reverse"]
        (_, carry_c), (_, ys_top) = lax.scan(body, init, xs, length=length, reverse=reverse)
        ys_top = iter(ys_top)
        carry_tops = [c[k - 1] if c else None for c in carry_c]
        ys = [next(ys_top) if mov else None for mov in self.out_moving[ncar:]]
        return [*carry_tops, *ys]


class _WhileRule(_RerunRule):
    """``while_loop`` (a trip count known only at run time): at each order a new loop
    carries the coefficients ``1..k`` of the carry along with its value. The loop
    condition reads the value only: the trip count is constant along the path (a
    strict comparison at a generic point), as in JAX's own JVP of ``while``."""

    def _series(self, ins, k):
        params = self.params
        nc_cond, nc_body = params["cond_nconsts"], params["body_nconsts"]
        primals = [p for p, _ in ins]
        cond_consts = primals[:nc_cond]
        body_consts = primals[nc_cond : nc_cond + nc_body]
        carry0 = primals[nc_cond + nc_body :]
        const_moving = list(self.in_moving[nc_cond : nc_cond + nc_body])
        carry_moving = self.out_moving
        const_c = [_filled(p, c, k) if mov else [] for (p, c), mov
                   in zip(ins[nc_cond : nc_cond + nc_body], const_moving, strict=True)]  # fmt: skip
        carry_c0 = [_filled(p, c, k) if mov else [] for (p, c), mov
                    in zip(ins[nc_cond + nc_body :], carry_moving, strict=True)]  # fmt: skip
        cond = params["cond_jaxpr"]

        def cond_fun(state):
            return jax_core.eval_jaxpr(cond.jaxpr, cond.consts, *cond_consts, *state[0])[0]

        def body_fun(state):
            carry, carry_c = state
            return self._body_series(
                params["body_jaxpr"], [*body_consts, *carry], [*const_moving, *carry_moving],
                [*const_c, *carry_c], k,
            )  # fmt: skip

        _, final_c = lax.while_loop(cond_fun, body_fun, (carry0, carry_c0))
        return [c[k - 1] if c else None for c in final_c]


def _make_rule(eqn, in_moving) -> _Rule:
    prim = eqn.primitive
    n_moving = sum(in_moving)
    if prim in _JIT_PRIMITIVES:
        return _SubJaxprRule(eqn, in_moving, eqn.params["jaxpr"])
    if prim is _COND:
        return _CondRule(eqn, in_moving)
    if prim is _SCAN and eqn.params["length"] > 0:
        return _ScanRule(eqn, in_moving)
    if prim is _WHILE and eqn.params["cond_jaxpr"].out_avals[0].shape == ():
        # (A batched predicate, from vmap of a while loop, goes through the JVP rule.)
        return _WhileRule(eqn, in_moving)
    if prim is _CUSTOM_VJP:
        # Reverse-mode-only rules say nothing about forward derivatives: follow the
        # primal computation.
        return _SubJaxprRule(eqn, in_moving, eqn.params["call_jaxpr"])
    if prim in _BILINEAR:
        return _LinearRule(eqn, in_moving) if n_moving == 1 else _BilinearRule(eqn, in_moving)
    if prim is lax.div_p:
        return _LinearRule(eqn, in_moving) if not in_moving[1] else _DivRule(eqn, in_moving)
    if prim is lax.exp_p:
        return _ExpRule(eqn, in_moving)
    if prim is lax.log_p:
        return _LogRule(eqn, in_moving)
    if prim is _CUSTOM_JVP:
        return _JvpRule(eqn, in_moving)
    kind = _jet_rule_kind(prim)
    if kind == "linear" or prim in _LINEAR_EXTRA:
        return _LinearRule(eqn, in_moving)
    if kind == "zero":
        return _ZeroRule(eqn, in_moving)
    if kind == "rule":
        return _JetRule(eqn, in_moving)
    return _JvpRule(eqn, in_moving)


# --------------------------------------------------------------- functions
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
    moving = [s is not None and order > 0 for s in series]
    state = SeriesState(closed_jaxpr, primals, moving)
    for k in range(1, order + 1):
        state.extend([None if s is None else s[k - 1] for s in series])
    out_series: list[Series] = []
    for p, c in zip(state.primals_out(), state.coefficients_out(), strict=True):
        if c is None:
            out_series.append(None)
        else:
            out_series.append([_zeros_like(p) if t is None else t for t in c[1:]])
    return state.primals_out(), out_series


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
    closed = jax.make_jaxpr(fun)(*primals)
    return propagate_series(closed, primals, series, order)
