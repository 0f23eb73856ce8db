"""How far can a Taylor answer be trusted? A campaign over random smooth problems.

For each of `--problems` random generalised linear models (logistic, Poisson or
probit; random size and design; an L2 penalty ``exp(log_lam)/2 |theta|^2``) with
hyperparameters ``eps = {"w": observation weights, "log_lam": log penalty}``, the
script draws a random direction ``v`` (drop a few observations, reweight all of
them, move the penalty, or both), computes the Taylor coefficients
``theta_1..theta_8`` along it once, picks `--steps` step sizes ``t`` and refits
exactly at ``eps0 + t v`` (Newton's method on ``G = grad f``, continued from
``eps0`` in small steps so that it stays on the branch of ``theta0``).

Then, for each order ``K`` in ``ORDERS`` it evaluates what optsens reports for
``ts = taylor_expansion(eq, K)`` at that ``eps`` — the error estimate
(`truncation_error_estimate`, from orders ``K+1`` and ``K+2``), and the
beyond-radius flag (`estimate_radius` on orders ``1..K+2`` is at most the step) —
against the truth:

- *error estimate within a factor 3*: ``1/3 <= estimate / true error <= 3``; cases
  where both are below ``1e-11 * max(1, |theta0|)`` (rounding level) count as
  agreeing and are reported separately;
- *the series fails* at that ``eps`` when its order-``K`` error is no smaller than its
  order-``floor(K/2)`` error (order 0 is ``theta0``): adding terms did not help.
  The flag should be raised exactly then.

Step sizes are drawn as ``t = u R``, ``u`` log-uniform in ``[0.2, 5]`` and ``R`` the
radius estimated from all eight orders, so that about half the cases lie past the
radius: the hard cases near the boundary are deliberately frequent.

The coefficients of an order-``K`` expansion are the first ``K`` of any longer one
(the recursion does not depend on the truncation), so one order-8 kernel per
problem serves every ``K``; the numbers are those `TaylorExpansion.trust`,
`error_estimate` and `validate_expansion` report (checked on the first problem).

Usage::

    python benchmarks/trust_campaign.py --problems 200 --seed 1 --out docs/trust_campaign.md
"""

from __future__ import annotations

import argparse
import collections
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

jax.config.update("jax_enable_x64", True)

import optsens  # noqa: E402
from optsens import _trust  # noqa: E402

RAW = []
ORDERS = (1, 2, 3, 4, 6)
K_REF = max(ORDERS) + _trust.EXTRA_ORDERS
K_TRUTH = 12
SHAPES = ((30, 2), (60, 5))
NEGLIGIBLE = 1e-11


# ------------------------------------------------------------------ families
def _penalty(theta, eps):
    return 0.5 * jnp.exp(eps["log_lam"]) * theta @ theta


def logistic(theta, eps, x, y):
    z = x @ theta
    return jnp.sum(eps["w"] * (jnp.logaddexp(0.0, z) - y * z)) + _penalty(theta, eps)


def poisson(theta, eps, x, y):
    z = x @ theta
    return jnp.sum(eps["w"] * (jnp.exp(z) - y * z)) + _penalty(theta, eps)


def probit(theta, eps, x, y):
    z = x @ theta
    return jnp.sum(eps["w"] * (-y * log_ndtr(z) - (1 - y) * log_ndtr(-z))) + _penalty(theta, eps)


FAMILIES = {"logistic": logistic, "poisson": poisson, "probit": probit}
GRADIENTS = {name: jax.grad(f) for name, f in FAMILIES.items()}


def simulate(rng, family, n, d):
    x = rng.standard_normal((n, d)) / math.sqrt(d)
    beta = rng.standard_normal(d) * rng.uniform(0.5, 2.0)
    z = x @ beta
    if family == "logistic":
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    elif family == "probit":
        y = (rng.standard_normal(n) < z).astype(float)
    else:
        y = rng.poisson(np.exp(z)).astype(float)
    return jnp.asarray(x), jnp.asarray(y)


def random_direction(rng, n):
    kind = rng.choice(["drop", "reweight", "penalty", "mixed"])
    w = np.zeros(n)
    lam = 0.0
    if kind in ("drop", "mixed"):
        w[rng.choice(n, size=rng.integers(1, max(2, n // 10) + 1), replace=False)] = -1.0
    if kind == "reweight":
        w = rng.standard_normal(n) / math.sqrt(n) * 3
    if kind in ("penalty", "mixed"):
        lam = float(rng.choice([-1.0, 1.0]))
    return str(kind), {"w": jnp.asarray(w), "log_lam": jnp.asarray(lam)}


def refit(family, theta0, eps0, v, t, x, y, steps):
    """Newton on G = grad f, continued along eps0 + s v, s = t/steps, ..., t."""
    theta = theta0
    for s in np.linspace(0.0, t, steps + 1)[1:]:
        eps = jax.tree_util.tree_map(lambda a, b, s=s: a + s * b, eps0, v)
        theta = optsens.newton_solve(GRADIENTS[family], theta, eps, args=(x, y), max_steps=50)
    return np.asarray(theta)


# ------------------------------------------------------------------ one case
def evaluate(coefficients, value0, exact, order):
    """What optsens reports for an order-`order` expansion at t = 1, and the truth."""
    ext = coefficients[: order + _trust.EXTRA_ORDERS]
    partial = value0 + np.cumsum(coefficients[:order], axis=0)
    err = float(np.linalg.norm(partial[-1] - exact))
    half = order // 2
    err_half = float(np.linalg.norm((partial[half - 1] if half else value0) - exact))
    est = _trust.truncation_error_estimate(ext, order)
    radius = _trust.estimate_radius(ext, value0).radius
    pade = _trust.pade_from_coefficients(value0, coefficients[:order], None)
    p, q = np.asarray(pade.numerators), np.asarray(pade.denominators)
    pade_value = p.sum(axis=1) / q.sum(axis=1)
    return {
        "true_error": err,
        "estimate": est,
        "radius": radius,
        "beyond": radius <= 1.0,
        "fails": err >= err_half,
        "pade_error": float(np.linalg.norm(pade_value - exact)),
    }


def within_factor(est, err, floor):
    if err <= floor and est <= floor:
        return True, True
    if err == 0:
        return False, False
    return 1 / 3 <= est / err <= 3, False


# ------------------------------------------------------------------ main
def run(n_problems, seed, n_steps, verbose):
    rng = np.random.default_rng(seed)
    records, skipped = [], collections.Counter()
    checked_api = False
    start = time.perf_counter()
    for i in range(n_problems):
        family = str(rng.choice(list(FAMILIES)))
        n, d = SHAPES[rng.integers(len(SHAPES))]
        x, y = simulate(rng, family, n, d)
        eps0 = {"w": jnp.ones(n), "log_lam": jnp.asarray(rng.uniform(-2.0, 1.0))}
        f = FAMILIES[family]
        try:
            theta0 = optsens.newton_solve(f, jnp.zeros(d), eps0, args=(x, y), objective=True)
            eq = optsens.EstimatingEquation.from_objective(f, theta0, eps0, args=(x, y))
        except optsens.OptsensError:
            skipped["no optimum at eps0"] += 1
            continue
        kind, v = random_direction(rng, n)
        ts_ref = optsens.taylor_expansion(eq, K_TRUTH)
        coefficients = np.asarray(ts_ref._coefficients_flat(ts_ref._direction(v)))
        value0 = np.asarray(eq.theta0_flat)
        r_ref = _trust.estimate_radius(coefficients, value0).radius
        r_ref = r_ref if np.isfinite(r_ref) else 1.0
        for _ in range(n_steps):
            u = float(np.exp(rng.uniform(math.log(0.2), math.log(5.0))))
            t = u * r_ref
            try:
                exact = refit(family, theta0, eps0, v, t, x, y, steps=max(4, math.ceil(8 * u)))
            except optsens.OptsensError:
                skipped["refit did not converge (no optimum on the path)"] += 1
                continue
            scaled = coefficients * t ** np.arange(1, K_TRUTH + 1)[:, None]
            RAW.append(dict(family=family, kind=kind, u=u, scaled=scaled, value0=value0, exact=exact))
            floor = NEGLIGIBLE * max(1.0, float(np.linalg.norm(value0)))
            for order in ORDERS:
                rec = evaluate(scaled, value0, exact, order)
                rec.update(family=family, n=n, d=d, kind=kind, order=order, u=u, t=t)
                rec["factor3"], rec["negligible"] = within_factor(rec["estimate"], rec["true_error"], floor)
                records.append(rec)
            if not checked_api:
                _check_api(eq, v, t, scaled, value0, exact)
                checked_api = True
        if verbose and (i + 1) % 20 == 0:
            print(f"  {i + 1} problems, {len(records)} cases, {time.perf_counter() - start:.0f} s", flush=True)
    return records, skipped, time.perf_counter() - start


def _check_api(eq, v, t, scaled, value0, exact):
    """The shortcut above reports what the public API reports."""
    eps = jax.tree_util.tree_map(lambda a, b: a + t * b, eq.eps0, v)
    ts = optsens.taylor_expansion(eq, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _trust.BeyondRadiusWarning)
        report = ts.trust(eps)
    rec = evaluate(scaled, value0, exact, 2)
    assert math.isclose(report.error_estimate, rec["estimate"], rel_tol=1e-6), (report, rec)
    assert report.beyond_radius == rec["beyond"]


def summarise(records, skipped, seconds, n_problems, seed):
    lines = []
    problems = {(r["family"], r["t"]) for r in records}
    lines.append(
        f"Campaign: {n_problems} random GLM problems (seed {seed}), {len(problems)} refits, "
        f"{len(records)} cases (problem x step x order), {seconds:.0f} s."
    )
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".")
    lines.append("")
    lines.append(
        "| order K | cases | error estimate within 3x | of which at rounding level | "
        "flag & fails | flag & holds | no flag & fails | no flag & holds | flag = fails |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for order in (*ORDERS, "all"):
        rows = [r for r in records if order == "all" or r["order"] == order]
        if not rows:
            continue
        n = len(rows)
        f3 = sum(r["factor3"] for r in rows)
        neg = sum(r["negligible"] for r in rows)
        tp = sum(r["beyond"] and r["fails"] for r in rows)
        fp = sum(r["beyond"] and not r["fails"] for r in rows)
        fn = sum(not r["beyond"] and r["fails"] for r in rows)
        tn = sum(not r["beyond"] and not r["fails"] for r in rows)
        lines.append(
            f"| {order} | {n} | {f3} ({100 * f3 / n:.0f}%) | {neg} | {tp} | {fp} | {fn} | {tn} | "
            f"{tp + tn} ({100 * (tp + tn) / n:.0f}%) |"
        )
    lines.append("")
    inside = [r for r in records if not r["beyond"]]
    if inside:
        f3 = sum(r["factor3"] for r in inside)
        lines.append(
            f"Inside the estimated radius: the error estimate is within 3x of the true error in "
            f"{f3}/{len(inside)} cases ({100 * f3 / len(inside):.0f}%); "
            f"it is below the true error (optimistic) in "
            f"{sum(r['estimate'] < r['true_error'] / 3 for r in inside)} cases by more than 3x."
        )
    lines.append("")
    lines.append("By step / estimated radius (all orders): flag = fails")
    lines.append("")
    lines.append("| step / radius (order 8 estimate) | cases | flag = fails | error estimate within 3x |")
    lines.append("|---|---|---|---|")
    for lo, hi in ((0.2, 0.5), (0.5, 0.8), (0.8, 1.25), (1.25, 2.0), (2.0, 5.0)):
        rows = [r for r in records if lo <= r["u"] < hi]
        if rows:
            agree = sum(r["beyond"] == r["fails"] for r in rows)
            f3 = sum(r["factor3"] for r in rows)
            lines.append(
                f"| {lo}-{hi} | {len(rows)} | {agree} ({100 * agree / len(rows):.0f}%) | "
                f"{f3} ({100 * f3 / len(rows):.0f}%) |"
            )
    lines.append("")
    beyond_fail = [r for r in records if r["fails"]]
    if beyond_fail:
        better = sum(r["pade_error"] < r["true_error"] for r in beyond_fail)
        lines.append(
            f"Where the series fails, the Padé approximant from the same coefficients is closer "
            f"to the refit in {better}/{len(beyond_fail)} cases."
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3, help="step sizes per problem")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown file for the counts")
    parser.add_argument("--raw", default=None, help="optional .npz of the per-case records")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    records, skipped, seconds = run(args.problems, args.seed, args.steps, not args.quiet)
    text = summarise(records, skipped, seconds, args.problems, args.seed)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Trust campaign\n\n")
            fh.write("Produced by `python benchmarks/trust_campaign.py")
            fh.write(f" --problems {args.problems} --steps {args.steps} --seed {args.seed}`.\n\n")
            fh.write(text + "\n")
    if args.raw:
        import pickle
        with open(args.raw, "wb") as fh:
            pickle.dump(RAW, fh)


if __name__ == "__main__":
    main()
