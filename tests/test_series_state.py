"""Direct tests of the online Taylor-mode interpreter `optsens._series.SeriesState`.

Truth: for inputs moving along the polynomial path ``x(t) = x_0 + x_1 t + ... + x_K t^K``
(constant inputs stay at ``x_0``), the normalised coefficient ``k`` of the output is
``(1/k!) d^k/dt^k f(x(t))`` at ``t = 0``, computed by ``k`` nested `jax.jvp` of the
path. That is plain forward mode: it shares none of the interpreter's rules,
recurrences or bookkeeping. A ``None`` coefficient (on either side) is an exact zero.

Agreement is asked to relative 1e-12 of the largest entry of each coefficient: both
sides are exact arithmetic up to rounding, and 1e-12 leaves room for ~10^3 roundings.

Besides `extend` against that truth, the tests check the online protocol (`extend`
with an input coefficient unknown, then `correct`) against the truth and against a
state given the coefficient directly, that each order adds work linear in the order
and traces a custom JVP rule no more, and the degenerate inputs and outputs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core
from jax.scipy.special import digamma, gammaln

from optsens._series import SeriesState

ORDER = 6
RTOL = 1e-12


# ------------------------------------------------------------------ helpers
def path_coefficients(f, primals, series, order):
    """Coefficients ``1..order`` of every output leaf of ``f`` along the polynomial path
    with the given input coefficients (``series[i]``: a list, ``None`` entries zero, or
    ``None`` for a constant input), by nested forward mode."""

    def path(t):
        args = []
        for p, s in zip(primals, series, strict=True):
            acc = jnp.zeros_like(p)
            for c in reversed(s or []):  # Horner: x_0 + t (x_1 + t (x_2 + ...))
                acc = (acc if c is None else acc + c) * t
            args.append(p + acc)
        return jax.tree_util.tree_leaves(f(*args))

    def one_more(h):
        # h(t) = [d^0, ..., d^(k-1)] -> [d^0, ..., d^k]: one more jvp in t.
        def h_next(t):
            lower, tangents = jax.jvp(h, (t,), (jnp.ones_like(t),))
            return [*lower, tangents[-1]]

        return h_next

    h = lambda t: [path(t)]
    for _ in range(order):
        h = one_more(h)
    derivatives = jax.jit(h)(jnp.zeros(()))
    return [[d / math.factorial(k) for d in derivatives[k]] for k in range(1, order + 1)]


def assert_coefficient(got, want, rtol=RTOL):
    """`got` equals `want` to `rtol` of `want`'s largest entry (``None``: zero)."""
    if want is None:
        assert got is None or not np.any(got), got
        return
    want = np.asarray(want)
    got = np.zeros_like(want) if got is None else np.asarray(got)
    scale = float(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1e-300))


def plus(a, b):
    """``a + b`` with ``None`` as zero."""
    return a if b is None else (b if a is None else a + b)


def random_series(key, like, order, holes=()):
    """``order`` random coefficients shaped like `like`; orders in `holes` are ``None``."""
    keys = jax.random.split(key, order)
    return [
        None if k + 1 in holes else 0.5 * jax.random.normal(keys[k], np.shape(like)) for k in range(order)
    ]


def run_state(closed, primals, series, order):
    """Feed the input coefficients to a fresh state order by order; returns the state
    and the outputs' coefficients returned by each `extend`."""
    state = SeriesState(closed, primals, [s is not None for s in series])
    returned = []
    for k in range(1, order + 1):
        returned.append(state.extend([None if s is None else s[k - 1] for s in series]))
    return state, returned


# ---------------------------------------------------------- test functions
@jax.custom_jvp
def soft_clip(x, a):
    """``a tanh(x / a)`` with a hand-written JVP in both arguments."""
    return a * jnp.tanh(x / a)


@soft_clip.defjvp
def _soft_clip_jvp(primals, tangents):
    (x, a), (dx, da) = primals, tangents
    y = soft_clip(x, a)
    sech2 = 1.0 - (y / a) ** 2
    return y, sech2 * dx + (y / a - (x / a) * sech2) * da


def _halfsquare_plain(x, y):
    return jnp.sin(x) * y**2 + jnp.exp(x * y)


@jax.custom_vjp
def halfsquare(x, y):
    """A custom_vjp function: its forward derivatives are those of the primal code."""
    return _halfsquare_plain(x, y)


halfsquare.defvjp(lambda x, y: (halfsquare(x, y), (x, y)), lambda res, g: (g, g))


# f(x, y, A): x and y carry series, A is a constant (data) matrix. x0 > 0 so that
# log, sqrt and non-integer powers of x are defined.
FUNCTIONS = {
    "exp log div": lambda x, y, A: (jnp.exp(x) * y / (2.0 + jnp.log(x)), jnp.log(x * y * y) / x),
    "sin tanh logistic": lambda x, y, A: jnp.sin(x) * jnp.tanh(y) + jax.nn.sigmoid(x * y - 1.0),
    "sqrt and powers": lambda x, y, A: (
        jnp.sqrt(x) + x**2.5 + x ** (y + 2.0),
        x**3 * y**-2,
    ),
    "matmul and reductions": lambda x, y, A: (
        A @ x + (A @ y) * x,
        x @ A @ y,
        jnp.sum(jnp.exp(A @ x)),
        jnp.max(x * y + jnp.arange(3.0)),
    ),
    "logaddexp softplus": lambda x, y, A: jnp.logaddexp(x, 2.0 * y) + jax.nn.softplus(x - A @ y),
    "user custom_jvp": lambda x, y, A: soft_clip(x * y + 1.0, A[0] + 2.0) + soft_clip(x, 1.0 + y**2),
    "gammaln digamma": lambda x, y, A: (gammaln(x + 2.0 * y + 3.0), digamma(x * y + 3.0)),
    "fori_loop": lambda x, y, A: lax.fori_loop(0, 2, lambda i, c: jnp.tanh(A @ c) * c + x * y, x),
    "cond and where": lambda x, y, A: (
        lax.cond(jnp.sum(x) > 0, lambda a, b: jnp.exp(a) * b, lambda a, b: a**3 - b, x, y),
        jnp.where(A[0] > 0, jnp.sin(x * y), y**2 / x),
    ),
    "scan: xs, ys, reversed": lambda x, y, A: lax.scan(
        lambda c, a: (c * jnp.tanh(a * x) + y, jnp.exp(c * a)),
        jnp.ones_like(x),
        jnp.stack([x, 2.0 * y, A[0]]),
        reverse=True,
    ),
    "switch (3 branches)": lambda x, y, A: lax.switch(
        jnp.argmax(A[1]), [lambda a, b: a * b, lambda a, b: jnp.sin(a) / b, lambda a, b: a - b], x, y
    ),
    "while_loop (data-dependent trip count)": lambda x, y, A: lax.while_loop(
        lambda c: (c[1] < 40) & (jnp.max(jnp.abs(c[0] ** 2 - x - 2.0)) > 1e-14),  # Newton for sqrt(x + 2)
        lambda c: (0.5 * (c[0] + (x + 2.0) / c[0]) * jnp.exp(0.0 * y), c[1] + 1),
        (jnp.ones_like(x) + y**2, 0),
    )[0],
    "jit inside": jax.jit(lambda x, y, A: jnp.cos(x) * jnp.exp(-(y**2)) + A @ x),
}

# custom_vjp functions cannot be pushed through jax.jvp: the truth is the primal code.
FUNCTIONS["custom_vjp"] = (
    lambda x, y, A: halfsquare(x, y) * A[1],
    lambda x, y, A: _halfsquare_plain(x, y) * A[1],
)


def _split(entry):
    return entry if isinstance(entry, tuple) else (entry, entry)


def _inputs():
    x0 = jnp.array([0.7, 1.3, 0.4])
    y0 = jnp.array([0.5, -0.8, 1.1])
    A = jnp.array([[0.6, -0.3, 0.2], [0.1, 0.9, -0.5], [-0.4, 0.2, 0.8]])
    return x0, y0, A


def _series(x0, y0):
    # x: every order nonzero; y: some orders missing (None), which must act as zeros.
    sx = random_series(jax.random.key(0), x0, ORDER)
    sy = random_series(jax.random.key(1), y0, ORDER, holes=(2, 5))
    return sx, sy


# -------------------------------------------------------------------- tests
@functools.cache
def _case(name):
    """The closed jaxpr of ``FUNCTIONS[name]``, its primals and input series, and the
    nested-forward-mode truth (computed once per session: it is the slow part)."""
    f, f_truth = _split(FUNCTIONS[name])
    x0, y0, A = _inputs()
    sx, sy = _series(x0, y0)
    closed = jax.make_jaxpr(f)(x0, y0, A)
    truth = path_coefficients(f_truth, [x0, y0, A], [sx, sy, None], ORDER)
    primals_truth = jax.tree_util.tree_leaves(f_truth(x0, y0, A))
    return closed, [x0, y0, A], [sx, sy, None], truth, primals_truth


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_extend_matches_nested_forward_mode(name):
    """`extend` order by order: each returned coefficient, and the stored coefficient
    lists, equal nested forward mode along the polynomial path."""
    closed, primals, series, truth, primals_truth = _case(name)
    state, returned = run_state(closed, primals, series, ORDER)

    assert state.input_moving() == [True, True, False]
    for got, want in zip(state.primals_out(), primals_truth, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    stored = state.coefficients_out()
    for k in range(1, ORDER + 1):
        for j, want in enumerate(truth[k - 1]):
            assert_coefficient(returned[k - 1][j], want)
            assert_coefficient(stored[j][k], want)


def _assert_same_state(state, reference):
    """Every value of the jaxpr has the same coefficients in both states."""
    assert state.order == reference.order
    assert state.coeffs.keys() == reference.coeffs.keys()
    for var, want in reference.coeffs.items():
        got = state.coeffs[var]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_coefficient(g, w)


# Loops are left out here for time: through their JVP rule (the JVP of a loop is a loop,
# itself without a rule) a loop's online state nests one JVP per order, ~3^K equations,
# slow in eager mode. `correct` through JVP rules is covered by the other functions.
NO_LOOP = list(FUNCTIONS)  # (loops used to be left out: their programs tripled per order)


@pytest.mark.parametrize("guess", ["unknown", "wrong guess"])
@pytest.mark.parametrize("name", NO_LOOP)
def test_extend_then_correct_equals_direct(name, guess):
    """The online protocol of `taylor_expansion`: x's coefficient k is not known when
    `extend` runs (``None``, or a wrong guess), and `correct` then adds the difference.
    The corrected outputs equal the truth, and every value of the state equals that of
    a state that was given x's coefficient directly."""
    closed, primals, (sx, sy, _), truth, _ = _case(name)
    direct, _ = run_state(closed, primals, [sx, sy, None], ORDER)
    late = SeriesState(closed, primals, [True, True, False])
    for k in range(1, ORDER + 1):
        first = None if guess == "unknown" else 0.3 * sx[k - 1] + 1.0
        before = late.extend([first, sy[k - 1], None])
        change = late.correct([sx[k - 1] if first is None else sx[k - 1] - first, None, None])
        for j, want in enumerate(truth[k - 1]):
            corrected = plus(before[j], change[j])
            assert_coefficient(corrected, want)
            assert_coefficient(late.coefficients_out()[j][k], want)
    _assert_same_state(late, direct)


# Only x moves (y is a constant of the jaxpr, or moves with no coefficients at all), so
# functions of x alone (custom JVP rules, lgamma) start their JVP state inside `correct`,
# and the outputs that depend on y alone stay zero.
def _only_x(x, y, A):
    main = soft_clip(x, 2.0) * gammaln(x + 3.0) + jnp.logaddexp(x, y) + jnp.sin(x) / x
    return main, jnp.exp(y) + jnp.sin(y) + gammaln(y + 2.0) + A @ y, x


@functools.cache
def _only_x_truth():
    x0, y0, A = _inputs()
    sx = random_series(jax.random.key(2), x0, ORDER, holes=(3,))
    main = lambda x, y, A: _only_x(x, y, A)[0]
    return sx, [c for (c,) in path_coefficients(main, [x0, y0, A], [sx, None, None], ORDER)]


@pytest.mark.parametrize("y_moving", [False, True])
def test_correct_when_the_late_input_is_the_only_series(y_moving):
    """x's coefficients always come late, through `correct`; y is constant or moves
    without any coefficient (always ``None``)."""
    x0, y0, A = _inputs()
    sx, truth_main = _only_x_truth()
    closed = jax.make_jaxpr(_only_x)(x0, y0, A)
    state = SeriesState(closed, [x0, y0, A], [True, y_moving, False])
    assert state.input_moving() == [True, y_moving, False]
    for k in range(1, ORDER + 1):
        # y: no coefficient at all (moving), or one that is ignored (constant input);
        # A is constant, so what is passed for it is ignored too.
        before = state.extend([None, None if y_moving else sx[k - 1], sx[k - 1]])
        assert before[2] is None  # the output x itself waits for `correct`
        if k == 1:  # coefficient 1 of any function of x is linear in x_1, still unknown
            assert before[0] is None or not np.any(before[0])
        change = state.correct([sx[k - 1], None, None])
        assert_coefficient(plus(before[0], change[0]), truth_main[k - 1])
        assert_coefficient(change[2], sx[k - 1])
        # The y-only output: zero (``None`` or zeros) when y moves, constant otherwise.
        if y_moving:
            assert before[1] is None or not np.any(before[1])
            assert change[1] is None or not np.any(change[1])
        else:
            assert before[1] is None and change[1] is None
    coefficients = state.coefficients_out()
    assert (coefficients[1] is None) == (not y_moving)
    for k in range(1, ORDER + 1):
        assert_coefficient(coefficients[0][k], truth_main[k - 1])


@pytest.mark.parametrize("name", NO_LOOP)
def test_correct_at_order_zero_moves_the_point(name):
    """`correct` before any `extend` changes the inputs' values themselves; the state
    then behaves as a fresh state at the new point. (The step is small enough that no
    branch of ``cond`` / ``where`` flips.)"""
    _, f_truth = _split(FUNCTIONS[name])
    closed, (x0, y0, A), (sx, sy, _), _, _ = _case(name)
    dx0 = jnp.array([0.05, -0.1, 0.2])
    moved = SeriesState(closed, [x0, y0, A], [True, True, False])
    moved.correct([dx0, None, None])
    for got, want in zip(
        moved.primals_out(), jax.tree_util.tree_leaves(f_truth(x0 + dx0, y0, A)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    fresh = SeriesState(closed, [x0 + dx0, y0, A], [True, True, False])
    for k in range(1, 4):
        for got, want in zip(
            moved.extend([sx[k - 1], sy[k - 1], None]),
            fresh.extend([sx[k - 1], sy[k - 1], None]),
            strict=True,
        ):
            assert_coefficient(got, want)


# ------------------------------------------------------- each coefficient once
def _count_equations(jaxpr):
    """Equations of a jaxpr, those of its sub-jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    n += _count_equations(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    n += _count_equations(sub)
    return n


def _counted_scaled_softplus():
    """A fresh custom_jvp function ``a log(1 + exp(x / a))`` that counts how often its
    body and JVP rule are traced. It uses only ``exp``, ``log``, ``mul`` and ``div``,
    which have their own recurrences (primitives with a jet rule recompute the lower
    orders inside that rule, by design)."""
    calls = {"body": 0, "rule": 0}

    @jax.custom_jvp
    def g(x, a):
        calls["body"] += 1
        return a * jnp.log(1.0 + jnp.exp(x / a))

    @g.defjvp
    def g_jvp(primals, tangents):
        calls["rule"] += 1
        (x, a), (dx, da) = primals, tangents
        y = g(x, a)  # the rule calls the function for its primal
        e = jnp.exp(x / a)
        s = e / (1.0 + e)
        return y, s * dx + (y / a - (x / a) * s) * da

    return g, calls


def test_work_per_order_grows_linearly():
    """Coefficient ``k`` of every value is computed once, from the lower ones
    (convolutions of length ``k``): the equations added by the ``k``-th `extend` grow
    linearly in ``k``, so their second difference is constant. Recomputing the lower
    coefficients at every order, or re-entering a custom JVP rule once per order, would
    make it grow."""
    g, _ = _counted_scaled_softplus()
    f = lambda x, y: jnp.exp(x) * jnp.log(y) / (1.0 + x * y) + g(x * y, 1.0 + y * y) + jnp.logaddexp(x, y)
    x0, y0 = jnp.array([0.7, 1.3]), jnp.array([0.5, 2.0])
    closed = jax.make_jaxpr(f)(x0, y0)

    def size(order):
        def run(x, y):
            state = SeriesState(closed, [x, y], [True, True])
            for _ in range(order):
                state.extend([x, y])
            return state.coefficients_out()

        return _count_equations(jax.make_jaxpr(run)(x0, y0).jaxpr)

    sizes = [size(order) for order in range(1, 9)]
    second = np.diff(sizes, 2)
    assert np.all(second == second[0]), sizes


@pytest.mark.parametrize(
    "name",
    ["fori_loop", "cond and where", "scan: xs, ys, reversed", "while_loop (data-dependent trip count)"],
)
def test_loops_and_conds_grow_polynomially_with_the_order(name):
    """``scan`` (``fori_loop``) and ``cond`` are followed step by step / branch by
    branch; through their JVP rules instead, one loop or cond would nest per order and
    the program would triple with every order (order 6 ~ 27x order 3). Here the
    jet-rule primitives inside (``tanh``, ``sin``) cost ``O(k^2)`` per order, so the
    total is at most cubic: order 6 costs less than 8x order 3."""
    f, _ = _split(FUNCTIONS[name])
    x0, y0, A = _inputs()
    closed = jax.make_jaxpr(f)(x0, y0, A)

    def size(order):
        def run(x, y):
            state = SeriesState(closed, [x, y, A], [True, True, False])
            for _ in range(order):
                state.extend([x, y, None])
            return state.coefficients_out()

        return _count_equations(jax.make_jaxpr(run)(x0, y0).jaxpr)

    assert size(6) < 8 * size(3)


def test_custom_jvp_rule_is_traced_once_per_call_site():
    """A user JVP rule is traced when its equation first moves, and not again at higher
    orders: the traced rule is extended online, and the rule's own call of the function
    (for its primal) reuses the known coefficients instead of recursing."""
    x0, y0 = jnp.array([0.7, 1.3]), jnp.array([0.5, 2.0])
    counts = []
    for order in (1, ORDER):
        g, calls = _counted_scaled_softplus()
        f = lambda x, y: g(x * y, 1.0 + y**2) + g(x, 2.0)  # two call sites
        closed = jax.make_jaxpr(f)(x0, y0)
        before = dict(calls)
        state = SeriesState(closed, [x0, y0], [True, True])
        for _ in range(order):
            state.extend([jnp.ones(2), None])
        counts.append({key: calls[key] - before[key] for key in calls})
    assert counts[0] == counts[1], counts
    assert 1 <= counts[1]["rule"] <= 2, counts


# ------------------------------------------------------------------ edge cases
def _edge(x, y, n, A):
    return (
        x,  # an input, as is
        jnp.sum(A),  # does not depend on the series
        jnp.argmax(x),  # integer: no series
        jnp.exp(y) * jnp.sin(y) + gammaln(y + 2.0),  # y moves without coefficients
        x * A[0] + jnp.float64(n) * y,  # n: an integer input flagged as moving
        2.5,  # a literal
    )


def test_constant_outputs_and_inputs_without_series():
    x0, y0, A = _inputs()
    n = jnp.asarray(3)
    sx = random_series(jax.random.key(3), x0, ORDER, holes=(2,))
    closed = jax.make_jaxpr(_edge)(x0, y0, n, A)
    state = SeriesState(closed, [x0, y0, n, A], [True, True, True, False])
    assert state.input_moving() == [True, True, False, False]  # integers never move
    for got, want in zip(state.primals_out(), _edge(x0, y0, n, A), strict=True):
        np.testing.assert_array_equal(got, want)
    for k in range(1, ORDER + 1):
        out = state.extend([sx[k - 1], None, jnp.asarray(7), jnp.ones((3, 3))])
        assert_coefficient(out[0], sx[k - 1])
        assert out[1] is None and out[2] is None and out[5] is None
        assert out[3] is None or not np.any(out[3])
        assert_coefficient(out[4], None if sx[k - 1] is None else sx[k - 1] * A[0])
    coefficients = state.coefficients_out()
    assert coefficients[1] is None and coefficients[2] is None and coefficients[5] is None
    assert len(coefficients[0]) == len(coefficients[3]) == len(coefficients[4]) == ORDER + 1
    assert all(c is None or not np.any(c) for c in coefficients[3][1:])
    # Nothing moves at all: every output is constant.
    still = SeriesState(closed, [x0, y0, n, A], [False, False, False, False])
    assert still.extend([sx[0], sx[0], None, None]) == [None] * 6
    assert still.coefficients_out() == [None] * 6


@pytest.mark.parametrize(
    "name",
    ["where", "cond"],
)
def test_correct_at_order_zero_across_a_branch_rebuilds_the_state(name):
    """Moving the point across a branch: predicates are re-evaluated (the state starts
    again at the new point), so values and later coefficients are those of the new branch."""
    if name == "where":
        f = lambda x: jnp.where(x > 0.75, jnp.exp(x), x**2)  # noqa: E731
    else:
        f = lambda x: jax.lax.cond(x[0] > 0.75, jnp.exp, jnp.sin, x)  # noqa: E731
    x0, moved = jnp.array([0.7, 1.3]), jnp.array([0.8, 1.3])
    state = SeriesState(jax.make_jaxpr(f)(x0), [x0], [True])
    (change,) = state.correct([jnp.array([0.1, 0.0])])
    np.testing.assert_allclose(state.primals_out()[0], f(moved), rtol=1e-15)
    np.testing.assert_allclose(change, f(moved) - f(x0), rtol=1e-15)
    fresh = SeriesState(jax.make_jaxpr(f)(moved), [moved], [True])
    for _ in range(3):
        np.testing.assert_allclose(state.extend([jnp.ones(2)])[0], fresh.extend([jnp.ones(2)])[0], rtol=1e-15)


def test_only_the_selected_branch_runs():
    """An untaken branch may be invalid where it is not taken (an iterative solve that
    would not terminate): the series must not run it. A callback counts its runs."""
    runs = []

    def guarded(x):
        jax.debug.callback(lambda: runs.append(1))
        return jnp.sqrt(x) * x

    f = lambda x: lax.cond(x[0] > 0, guarded, lambda z: -(z**3), x)  # noqa: E731
    x0 = jnp.array([-0.5, 0.3])
    state = SeriesState(jax.make_jaxpr(f)(x0), [x0], [True])
    got = [state.extend([jnp.ones(2) if k == 0 else None])[0] for k in range(3)]
    jax.block_until_ready(got)
    assert runs == []
    # -(x0 + t)^3 = -x0^3 - 3 x0^2 t - 3 x0 t^2 - t^3
    for k, want in enumerate([-3 * x0**2, -3 * x0, -jnp.ones(2)], start=1):
        assert_coefficient(got[k - 1], want)


def test_program_size_does_not_grow_with_the_scan_length():
    """A scan is emitted again per order, not unrolled: 5 or 50 steps, same program."""

    def sizes(length):
        f = lambda x: lax.fori_loop(0, length, lambda i, c: jnp.tanh(c) * x + c, x)  # noqa: E731
        closed = jax.make_jaxpr(f)(jnp.ones(2))

        def run(x):
            state = SeriesState(closed, [x], [True])
            return [state.extend([x]) for _ in range(3)]

        return _count_equations(jax.make_jaxpr(run)(jnp.ones(2)).jaxpr)

    assert sizes(5) == sizes(50)
