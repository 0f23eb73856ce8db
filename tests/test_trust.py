"""Trust: radius of convergence, truncation-error estimates, Padé resummation,
the beyond-radius warning and the comparison against exact refits."""

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import pade as scipy_pade

import optsens
from optsens import _trust
from tests._problems import logistic_data, logistic_objective

# ------------------------------------------------------------------ problems
# theta(lam) = (A + lam I)^{-1} b with eig(A) = {0.5, 2, 5}: each coordinate is a
# rational function of degree [2/3] with poles at lam = -0.5, -2, -5. About
# lam0 = 1 the series in lam converges for |lam - 1| < 1.5 only, although theta is
# smooth for every lam > -0.5.
_RNG = np.random.default_rng(7)
_Q, _ = np.linalg.qr(_RNG.standard_normal((3, 3)))
A = _Q @ np.diag([0.5, 2.0, 5.0]) @ _Q.T
B = _RNG.standard_normal(3)
LAM0 = 1.0
RADIUS = 1.5


def ridge_g(theta, lam, a, b):
    return a @ theta - b + lam * theta


def ridge_exact(lam):
    return np.linalg.solve(A + lam * np.eye(3), B)


@pytest.fixture(scope="module")
def ridge_ts():
    eq = optsens.EstimatingEquation(ridge_g, ridge_exact(LAM0), LAM0, args=(A, B))
    return optsens.taylor_expansion(eq, 6)


@pytest.fixture(scope="module")
def logistic_eq():
    x, y = logistic_data(n=60, d=3)
    theta0 = optsens.newton_solve(logistic_objective, np.zeros(3), 0.0, args=(x, y), objective=True)
    return optsens.EstimatingEquation.from_objective(logistic_objective, theta0, 0.0, args=(x, y))


# ------------------------------------------------------------ estimate_radius
def test_radius_of_a_geometric_series():
    est = optsens.estimate_radius(np.array([0.5**k for k in range(1, 9)]))
    assert est.radius == pytest.approx(2.0, rel=1e-12)
    assert est.ratio == pytest.approx(2.0, rel=1e-12)


def test_radius_ignores_the_constant_that_biases_the_root_test():
    # a_k = 100 * 3^-k: the root test is off by 100^(1/k), the ratio test is not.
    est = optsens.estimate_radius(np.array([100 * 3.0**-k for k in range(1, 9)]))
    assert est.radius == pytest.approx(3.0, rel=1e-12)
    assert est.root < 3.0


def test_radius_is_robust_to_zero_coefficients():
    # 1 / (1 - t^2 / 4): odd coefficients vanish (exactly, or at rounding level).
    even = np.array([0.0 if k % 2 else 0.5**k for k in range(1, 10)])
    assert optsens.estimate_radius(even).radius == pytest.approx(2.0, rel=1e-10)
    noisy = even + np.where(np.arange(1, 10) % 2, 1e-19, 0.0)
    assert optsens.estimate_radius(noisy).radius == pytest.approx(2.0, rel=1e-10)
    # A vector series one of whose coordinates never moves.
    vec = np.stack([[0.5**k, 0.0] for k in range(1, 9)])
    assert optsens.estimate_radius(vec).radius == pytest.approx(2.0, rel=1e-12)


def test_radius_of_an_oscillating_series():
    # Complex-conjugate poles at 2 e^{+-0.7i}: |theta_k| = 2^-k |cos(0.7 k)| dips near zero.
    c = np.array([2.0**-k * np.cos(0.7 * k) for k in range(1, 13)])
    assert optsens.estimate_radius(c).radius == pytest.approx(2.0, rel=0.15)


def test_ratio_over_all_orders_catches_a_singularity_hidden_by_an_oscillation():
    # Norms of a logistic regression's coefficients in log(lambda) (docs/trust.md):
    # the last three orders dip, so their slope alone suggests ~9.7; the series in
    # fact diverges beyond ~3.9 (seen with 14 orders).
    a = np.array([2.049e-01, 6.821e-02, 7.186e-03, 2.270e-03, 7.887e-04, 2.428e-05])
    est = optsens.estimate_radius(a)
    assert est.ratio > 9
    assert est.radius == est.baseline == pytest.approx((a[0] / a[4]) ** (1 / 4))
    assert 3.8 < est.radius < 4.2


def test_polynomial_series_has_infinite_radius():
    assert optsens.estimate_radius(np.array([1.0, 0.0, 0.0])).radius == math.inf
    assert optsens.estimate_radius(np.array([1.0, 0.1, 1e-18, 1e-19, 0.0, 0.0])).radius == math.inf
    assert optsens.estimate_radius(np.zeros((4, 3))).radius == math.inf
    # Fast geometric decay below rounding level is not mistaken for a polynomial.
    assert optsens.estimate_radius(np.array([0.01**k for k in range(1, 10)])).radius == pytest.approx(100)


def test_radius_rejects_non_finite_coefficients():
    with pytest.raises(optsens.NonFiniteError, match=r"non-finite Taylor coefficients \(orders \[3\]\)"):
        optsens.estimate_radius(np.array([1.0, 0.5, np.nan]))


# ------------------------------------------------- truncation_error_estimate
def test_error_estimate_of_a_geometric_tail_is_exact():
    # The docstring example: 1 / (1 - t/2) - 1 truncated after t^2 misses 0.25.
    c = np.array([[0.5**k] for k in range(1, 5)])
    assert optsens.truncation_error_estimate(c, order=2) == pytest.approx(0.25, rel=1e-12)
    # Alternating (pole on the other side): 1 / (1 + t/2) at t = 1.
    alt = np.array([[(-0.5) ** k] for k in range(1, 5)])
    exact = 1 / 1.5 - (1 - 0.5 + 0.25)
    assert optsens.truncation_error_estimate(alt, 2, value0=[1.0]) == pytest.approx(abs(exact), rel=1e-12)
    # Past the radius the same formula holds: at t = 3 the true error of the order-2
    # truncation of 1 / (1 - t/2) is |1/(1 - 1.5) - (1 + 1.5 + 2.25)| = 6.75.
    assert optsens.truncation_error_estimate(c, 2, value0=[1.0], t=3.0) == pytest.approx(6.75, rel=1e-12)


def test_error_estimate_needs_an_omitted_term():
    with pytest.raises(ValueError, match="coefficients up to order 4"):
        optsens.truncation_error_estimate(np.ones((3, 2)), order=3)


# ------------------------------------------------------------------- Padé
def test_pade_coefficients_match_scipy():
    rng = np.random.default_rng(3)
    for _ in range(5):
        c = rng.standard_normal(7)
        a, b = _trust.pade_coefficients(c, 3, 3)
        p, q = scipy_pade(c, 3, 3)
        for t in (0.2, -0.7):
            assert np.polyval(a[::-1], t) / np.polyval(b[::-1], t) == pytest.approx(p(t) / q(t), rel=1e-9)


def test_pade_reduces_degrees_of_a_rational_function():
    # 1 / (1 - t/2) asked for as [3/3]: the robust algorithm returns [0/1], no spurious poles.
    a, b = _trust.pade_coefficients([0.5**k for k in range(7)], 3, 3)
    np.testing.assert_allclose(a, [1.0], atol=1e-14)
    np.testing.assert_allclose(b, [1.0, -0.5], atol=1e-14)
    # A polynomial stays a polynomial; the zero series stays zero.
    a, b = _trust.pade_coefficients([1.0, 2.0, 0.0, 0.0, 0.0], 2, 2)
    np.testing.assert_allclose(a, [1.0, 2.0])
    np.testing.assert_allclose(b, [1.0])
    assert _trust.pade_coefficients(np.zeros(5), 2, 2)[0].tolist() == [0.0]


def test_pade_tracks_refits_where_the_taylor_series_diverges(ridge_ts):
    """Ridge regression stepped past the radius set by the smallest eigenvalue."""
    assert ridge_ts.radius(1.0) == pytest.approx(RADIUS, rel=1e-3)
    for lam in (LAM0 + 2 * RADIUS, LAM0 + 4 * RADIUS, 20.0):
        exact = ridge_exact(lam)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optsens.BeyondRadiusWarning)
            taylor_error = np.linalg.norm(np.asarray(ridge_ts(lam)) - exact)
        pade_error = np.linalg.norm(np.asarray(ridge_ts(lam, resum="pade")) - exact)
        assert taylor_error > 0.1 * np.linalg.norm(exact)  # the series diverges
        assert pade_error < 1e-10 * np.linalg.norm(exact)  # Padé is exact for [2/3]


def test_pade_approximant_object(ridge_ts):
    approx = optsens.pade_approximant(ridge_ts, 1.0)
    grid = jnp.linspace(-0.4, 10.0, 7)
    values = jax.jit(jax.vmap(approx))(grid)
    for t, value in zip(grid, values, strict=True):
        np.testing.assert_allclose(value, ridge_exact(LAM0 + float(t)), rtol=1e-10)
    # The denominators carry the poles of (A + lam I)^{-1}: lam = -0.5, -2, -5.
    poles = np.sort(np.concatenate([p.real for p in approx.poles()]))
    for pole in (-1.5, -3.0, -6.0):
        assert np.min(np.abs(poles - pole)) < 1e-6
    with pytest.raises(ValueError, match="m \\+ n <= order"):
        optsens.pade_approximant(ridge_ts, 1.0, degrees=(4, 4))


def test_resum_argument_is_checked(ridge_ts):
    with pytest.raises(ValueError, match="`resum` must be None or 'pade'; got 'borel'"):
        ridge_ts(1.5, resum="borel")
    with pytest.raises(optsens.OptsensError, match="cannot run under jax.jit"):
        jax.jit(lambda e: ridge_ts(e, resum="pade"))(1.5)
    # The plain series still works under jit and vmap.
    np.testing.assert_allclose(jax.vmap(ridge_ts)(jnp.array([1.1, 1.2]))[1], ridge_ts(1.2))


# ------------------------------------------------- the methods on the expansion
def test_error_estimate_against_exact_errors(ridge_ts):
    for lam in (1.3, 1.8, 2.2):
        true = np.linalg.norm(np.asarray(ridge_ts(lam)) - ridge_exact(lam))
        assert ridge_ts.error_estimate(lam) == pytest.approx(true, rel=1e-6)
        true3 = np.linalg.norm(np.asarray(ridge_ts(lam, order=3)) - ridge_exact(lam))
        assert ridge_ts.error_estimate(lam, order=3) == pytest.approx(true3, rel=1e-6)
    with pytest.raises(ValueError, match="above the order of this expansion"):
        ridge_ts.error_estimate(1.3, order=7)


def test_radius_scales_with_the_direction(ridge_ts):
    assert ridge_ts.radius(2.0) == pytest.approx(RADIUS / 2, rel=1e-3)
    assert ridge_ts.radius(-1.0) == pytest.approx(RADIUS, rel=1e-3)
    with pytest.raises(optsens.OptsensError, match="cannot run under jax.jit"):
        jax.jit(lambda v: ridge_ts.radius(v))(1.0)


def test_trust_report(ridge_ts):
    near = ridge_ts.trust(LAM0 + 0.3)
    assert near.verdict == "reliable" and not near.beyond_radius
    assert near.radius == pytest.approx(RADIUS, rel=1e-3)
    assert near.step == pytest.approx(0.3)
    np.testing.assert_allclose(near.value, ridge_ts(LAM0 + 0.3))
    np.testing.assert_allclose(near.resummed, ridge_exact(LAM0 + 0.3), rtol=1e-12)
    text = repr(near)
    for needle in ("TrustReport (order 6", "error estimate", "radius", "verdict         reliable"):
        assert needle in text
    far = ridge_ts.trust(LAM0 + 3.0)
    assert far.beyond_radius and far.verdict == "unreliable"
    assert "beyond the estimated radius" in repr(far)
    edge = ridge_ts.trust(LAM0 + 1.2)
    assert edge.verdict == "check"
    at_eps0 = ridge_ts.trust(LAM0)
    assert at_eps0.error_estimate == 0.0 and at_eps0.radius == math.inf


def test_evaluating_beyond_the_radius_warns_once_with_the_numbers():
    eq = optsens.EstimatingEquation(ridge_g, ridge_exact(LAM0), LAM0, args=(A, B))
    ts = optsens.taylor_expansion(eq, 6)
    ts(LAM0 + 1.0)  # inside: silent (pytest turns warnings into errors)
    with pytest.warns(optsens.BeyondRadiusWarning, match=r"\|eps - eps0\| = 3, .* steps up to about 1\.5"):
        ts(LAM0 + 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts(LAM0 + 4.0)  # once per expansion
        ts(LAM0 + 4.0, resum="pade")  # never for the resummed value
    # A new expansion warns again; under vmap no check is possible, so none is made.
    ts2 = optsens.taylor_expansion(eq, 6)
    jax.vmap(ts2)(jnp.array([LAM0 + 3.0]))
    with pytest.warns(optsens.BeyondRadiusWarning):
        ts2(LAM0 + 3.0)


def test_trust_on_a_quantity_of_interest(logistic_eq):
    ts = optsens.taylor_expansion(logistic_eq, 3, qoi=lambda theta: theta[0] ** 2)
    exact_theta = optsens.newton_solve(
        logistic_objective, logistic_eq.theta0, 0.8, args=logistic_eq.args, objective=True
    )
    true = abs(float(ts(0.8)) - float(exact_theta[0]) ** 2)
    report = ts.trust(0.8)
    assert report.verdict == "reliable"
    assert true / 3 <= report.error_estimate <= 3 * true


# --------------------------------------------------------- validate_expansion
def test_validate_expansion_against_refits(logistic_eq):
    ts = optsens.taylor_expansion(logistic_eq, 3)
    points = [-1.0, 0.5, 1.5]
    with ThreadPoolExecutor(2) as pool:
        table = optsens.validate_expansion(ts, points, executor=pool)
    assert len(table) == 3 and table.order == 3
    for row, eps in zip(table.rows, points, strict=True):
        exact = optsens.newton_solve(
            logistic_objective, logistic_eq.theta0, eps, args=logistic_eq.args, objective=True
        )
        np.testing.assert_allclose(row.exact, exact, rtol=1e-9)
        np.testing.assert_allclose(row.predicted, ts(eps))
        assert row.true_error == pytest.approx(np.linalg.norm(np.asarray(ts(eps)) - exact), rel=1e-6)
        assert row.error_estimate == pytest.approx(ts.error_estimate(eps))
        assert not row.beyond_radius and not row.series_fails
        assert 1 / 3 <= row.estimate_ratio <= 3
    assert table.within_factor_3 == 3 and table.flag_agrees == 3
    cols = table.columns()
    assert set(cols) >= {"step", "true_error", "error_estimate", "estimate_ratio", "beyond_radius"}
    text = repr(table)
    assert "ValidationTable (order 3, 3 refits)" in text and "within a factor 3" in text


def test_validate_expansion_with_a_custom_refit(ridge_ts):
    calls = []

    def refit(lam):
        calls.append(lam)
        return ridge_exact(lam)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the table reports the flag; no warning
        table = optsens.validate_expansion(ridge_ts, [1.5, 4.0], refit=refit)
    assert calls == [1.5, 4.0]
    inside, beyond = table.rows
    assert not inside.beyond_radius and not inside.series_fails
    assert beyond.beyond_radius and beyond.series_fails
    assert beyond.pade_error < 1e-10 < beyond.true_error
    assert inside.error_estimate == pytest.approx(inside.true_error, rel=1e-6)


def test_validate_expansion_checks_its_points(ridge_ts):
    with pytest.raises(optsens.OptsensError, match="`eps` must be a pytree shaped like `eps0`"):
        optsens.validate_expansion(ridge_ts, [np.ones(2)], refit=lambda e: ridge_exact(1.0))
    with pytest.raises(optsens.NonFiniteError, match="refit at eps=2.0 returned non-finite"):
        optsens.validate_expansion(ridge_ts, [2.0], refit=lambda e: np.full(3, np.nan))
    with pytest.raises(optsens.OptsensError, match="returned 2 numbers where the expansion has 3"):
        optsens.validate_expansion(ridge_ts, [2.0], refit=lambda e: np.ones(2))


# ------------------------------------------------------- regularised mode
def _rank_deficient_logistic():
    rng = np.random.default_rng(11)
    z = rng.standard_normal((50, 2))
    x = jnp.asarray(np.column_stack([z, z[:, 0] - z[:, 1]]))  # third column = first - second
    y = jnp.asarray((rng.random(50) < 0.5).astype(float))
    return x, y


def _weighted_logistic(theta, w, x, y):
    z = x @ theta
    return jnp.sum(w * (jnp.logaddexp(0.0, z) - y * z))


def test_regularised_mode_for_a_non_unique_optimum():
    x, y = _rank_deficient_logistic()
    w0 = jnp.ones(50)
    # An exact optimum: fit the first two columns, the third is their difference.
    b = optsens.newton_solve(_weighted_logistic, np.zeros(2), w0, args=(x[:, :2], y), objective=True)
    fit = jnp.concatenate([b, jnp.zeros(1)])
    # The optimum is a line: without regularisation, a singular H is reported...
    with pytest.raises(optsens.SingularHessianError, match="near-null direction"):
        optsens.EstimatingEquation.from_objective(_weighted_logistic, fit, w0, args=(x, y))
    # ... with it, the derivatives are those of the proximal problem through theta0.
    delta = 1e-3
    eq = optsens.EstimatingEquation.from_objective(
        _weighted_logistic, fit, w0, args=(x, y), regularization=delta
    )
    assert eq.regularization == delta
    v = jnp.zeros(50).at[:3].set(-1.0)
    got = optsens.taylor_expansion(eq, 2).derivatives(v)

    def proximal(theta, w, x, y):
        return _weighted_logistic(theta, w, x, y) + 0.5 * delta * jnp.sum((theta - fit) ** 2)

    reference = optsens.EstimatingEquation.from_objective(proximal, fit, w0, args=(x, y))
    want = optsens.taylor_expansion(reference, 2).derivatives(v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # The identified quantity (the linear predictor) matches the pseudo-inverse answer.
    hessian = np.asarray(eq.hessian())
    g_eps = np.asarray(jax.jacfwd(jax.grad(_weighted_logistic), argnums=1)(fit, w0, x, y)) @ np.asarray(v)
    pinv_answer = -np.linalg.pinv(hessian, rcond=1e-10) @ g_eps
    np.testing.assert_allclose(np.asarray(x) @ got[0], np.asarray(x) @ pinv_answer, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), True, "1e-3"])
def test_regularization_argument_is_checked(bad):
    with pytest.raises(ValueError, match="`regularization` must be None or a finite positive number"):
        optsens.EstimatingEquation(ridge_g, ridge_exact(LAM0), LAM0, args=(A, B), regularization=bad)
    with pytest.raises(ValueError, match="dense solvers only"):
        optsens.EstimatingEquation(
            ridge_g, ridge_exact(LAM0), LAM0, args=(A, B), regularization=1e-3, solver="gmres"
        )
