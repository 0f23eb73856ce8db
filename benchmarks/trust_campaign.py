"""How far can a Taylor answer be trusted? A campaign over random smooth problems.

For each of `--problems` random generalised linear models (logistic, Poisson or
probit; two sizes; random design and coefficients; an L2 penalty
``exp(log_lam)/2 |theta|^2``) with hyperparameters
``eps = {"w": observation weights, "log_lam": log penalty}``, the script draws a
random direction ``v`` (drop a few observations, reweight all of them, move the
penalty, or drop and move the penalty), computes the Taylor coefficients
``theta_1..theta_12`` along it once, picks `--steps` step sizes ``t`` and refits
exactly at ``eps0 + t v`` (Newton's method on ``G = grad f``, continued from
``eps0`` in small steps so that it stays on the branch of ``theta0``).

Then, for each order ``K`` in ``ORDERS``, it compares what optsens reports for
``ts = taylor_expansion(eq, K)`` at that ``eps`` with the truth:

- the error estimate (`truncation_error_estimate`, from orders up to ``K+2``,
  what ``ts.error_estimate(eps)`` returns) against the true error
  ``||ts(eps) - refit||``: within a factor 3 when ``1/3 <= estimate / error <= 3``;
  cases where both are below ``1e-11 max(1, |theta0|)`` (rounding level) count as
  agreeing and are reported separately;
- the beyond-radius flag (`estimate_radius` on orders ``1..K+2`` is at most 1,
  what ``ts.trust(eps).beyond_radius`` returns) against *the series fails*: the
  partial sums stop approaching the refit, i.e. twelve orders are no closer to it
  than six. The flag should be raised exactly then.

Step sizes are drawn as ``t = u R``, ``u`` log-uniform in ``[0.2, 5]`` and ``R`` the
radius estimated from all twelve orders, so that about half the cases lie past the
radius and the hard cases near it are frequent; a user's typical steps are easier.

The coefficients of an order-``K`` expansion are the first ``K`` of any longer one
(the recursion does not depend on where it stops), so one order-12 kernel per
problem serves every ``K``; the first case is checked against ``ts.trust(eps)``.

Usage (about a minute and a half on 2 cores)::

    python benchmarks/trust_campaign.py --problems 200 --seed 1 --out docs/trust_campaign.md
"""

from __future__ import annotations

import argparse
import collections
import math
import pickle
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

jax.config.update("jax_enable_x64", True)

import optsens  # noqa: E402
from optsens import _trust  # noqa: E402

ORDERS = (1, 2, 3, 4, 6)
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
def evaluate(scaled, value0, exact, order):
    """What optsens reports for an order-`order` expansion at t = 1, and the truth.

    `scaled` holds theta_1..theta_12 along eps - eps0 (t = 1 at the refit)."""
    ext = scaled[: order + _trust.EXTRA_ORDERS]
    partial = value0 + np.cumsum(scaled, axis=0)
    errors = np.linalg.norm(partial - exact, axis=1)  # errors[k-1]: order k
    err = float(errors[order - 1])
    est = _trust.truncation_error_estimate(ext, order, value0)
    radius = _trust.estimate_radius(ext, value0).radius
    pade = _trust.pade_from_coefficients(value0, scaled[:order], None)
    pade_value = np.asarray(pade.numerators).sum(axis=1) / np.asarray(pade.denominators).sum(axis=1)
    return {
        "true_error": err,
        "estimate": est,
        "radius": radius,
        "beyond": bool(radius <= 1.0),
        # The series fails: twelve orders are no better than six.
        "fails": bool(errors[K_TRUTH - 1] >= errors[K_TRUTH // 2 - 1]),
        "pade_error": float(np.linalg.norm(pade_value - exact)),
    }


def agrees_within_3(est, err, floor):
    """(within a factor 3, both at rounding level)."""
    if err <= floor and est <= floor:
        return True, True
    if err == 0:
        return False, False
    return bool(1 / 3 <= est / err <= 3), False


# ------------------------------------------------------------------ main
def run(n_problems, seed, n_steps, verbose, raw):
    rng = np.random.default_rng(seed)
    records = []
    counts = collections.Counter()
    no_refit_flags = collections.Counter()
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
            counts["no optimum at eps0 (problem skipped)"] += 1
            continue
        counts["problems"] += 1
        kind, v = random_direction(rng, n)
        ts_ref = optsens.taylor_expansion(eq, K_TRUTH)
        coefficients = np.asarray(ts_ref._coefficients_flat(ts_ref._direction(v)))
        value0 = np.asarray(eq.theta0_flat)
        r_ref = _trust.estimate_radius(coefficients, value0).radius
        r_ref = r_ref if np.isfinite(r_ref) else 1.0
        for _ in range(n_steps):
            u = float(np.exp(rng.uniform(math.log(0.2), math.log(5.0))))
            t = u * r_ref
            scaled = coefficients * t ** np.arange(1, K_TRUTH + 1)[:, None]
            try:
                exact = refit(family, theta0, eps0, v, t, x, y, steps=max(4, math.ceil(8 * u)))
            except optsens.OptsensError:
                counts["refits with no solution on the path"] += 1
                for order in ORDERS:
                    ext = scaled[: order + _trust.EXTRA_ORDERS]
                    no_refit_flags[order] += _trust.estimate_radius(ext, value0).radius <= 1.0
                continue
            counts["refits"] += 1
            if raw is not None:
                raw.append(
                    {
                        "family": family,
                        "kind": kind,
                        "u": u,
                        "scaled": scaled,
                        "value0": value0,
                        "exact": exact,
                    }
                )
            floor = NEGLIGIBLE * max(1.0, float(np.linalg.norm(value0)))
            for order in ORDERS:
                rec = evaluate(scaled, value0, exact, order)
                rec.update(family=family, n=n, d=d, kind=kind, order=order, u=u)
                rec["factor3"], rec["negligible"] = agrees_within_3(rec["estimate"], rec["true_error"], floor)
                records.append(rec)
            if not checked_api:
                _check_api(eq, v, t, scaled, value0, exact)
                checked_api = True
        if verbose and (i + 1) % 25 == 0:
            print(
                f"  {i + 1} problems, {len(records)} cases, {time.perf_counter() - start:.0f} s", flush=True
            )
    return records, counts, no_refit_flags, time.perf_counter() - start


def _check_api(eq, v, t, scaled, value0, exact):
    """The shortcut above reports what the public API reports."""
    eps = jax.tree_util.tree_map(lambda a, b: a + t * b, eq.eps0, v)
    ts = optsens.taylor_expansion(eq, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optsens.BeyondRadiusWarning)
        report = ts.trust(eps)
    rec = evaluate(scaled, value0, exact, 2)
    assert math.isclose(report.error_estimate, rec["estimate"], rel_tol=1e-6, abs_tol=1e-14), (report, rec)
    assert report.beyond_radius == rec["beyond"], (report, rec)


def _pct(a, b):
    return f"{a}/{b} ({100 * a / b:.0f}%)" if b else "0/0"


def summarise(records, counts, no_refit_flags, seconds, seed):
    lines = [
        f"{counts['problems']} random GLM problems (seed {seed}; logistic, Poisson, probit; "
        f"n x d in {list(SHAPES)}), {counts['refits']} exact refits, {len(records)} cases "
        f"(refit x order), {seconds:.0f} s on this machine.",
        "",
        "| order K | cases | error estimate within 3x of true error | (both at rounding level) "
        "| flag & fails | flag & holds | no flag & fails | no flag & holds | flag = fails |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
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
            f"| {order} | {n} | {_pct(f3, n)} | {neg} | {tp} | {fp} | {fn} | {tn} | {_pct(tp + tn, n)} |"
        )
    inside = [r for r in records if not r["beyond"]]
    beyond = [r for r in records if r["beyond"]]
    under = sum(r["estimate"] < r["true_error"] / 3 and not r["negligible"] for r in records)
    over = sum(r["estimate"] > 3 * r["true_error"] and not r["negligible"] for r in records)
    lines += [
        "",
        f"- Error estimate within 3x: {_pct(sum(r['factor3'] for r in inside), len(inside))} of the cases "
        f"inside the estimated radius, {_pct(sum(r['factor3'] for r in beyond), len(beyond))} beyond it. "
        f"Misses: {under} optimistic (estimate < true error / 3), {over} pessimistic (> 3x).",
    ]
    n_fail = counts["refits with no solution on the path"]
    if n_fail:
        flagged = ", ".join(f"K={k}: {no_refit_flags[k]}" for k in ORDERS)
        lines.append(
            f"- {n_fail} further steps had no solution on the path (the refit found none: weights "
            f"so negative that the optimum disappears); the flag was raised for ({flagged}) of them."
        )
    fails = [r for r in records if r["fails"] and r["order"] >= 2]
    if fails:
        better = sum(r["pade_error"] < r["true_error"] for r in fails)
        lines.append(
            f"- Where the series fails (orders K >= 2; at K = 1 Padé is the series), "
            f"`ts(eps, resum='pade')` is closer to the refit than `ts(eps)` in "
            f"{_pct(better, len(fails))} cases."
        )
    lines += [
        "",
        "By distance (step / radius estimated from 12 orders; all orders K together):",
        "",
        "| step / radius | cases | flag = fails | error estimate within 3x |",
        "|---|---|---|---|",
    ]
    for lo, hi in ((0.2, 0.5), (0.5, 0.8), (0.8, 1.25), (1.25, 2.0), (2.0, 5.0)):
        rows = [r for r in records if lo <= r["u"] < hi]
        if rows:
            agree = sum(r["beyond"] == r["fails"] for r in rows)
            f3 = sum(r["factor3"] for r in rows)
            lines.append(f"| {lo}-{hi} | {len(rows)} | {_pct(agree, len(rows))} | {_pct(f3, len(rows))} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3, help="step sizes per problem")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown file for the counts")
    parser.add_argument("--raw", default=None, help="optional pickle of the coefficients and refits")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    raw = [] if args.raw else None
    records, counts, no_refit_flags, seconds = run(args.problems, args.seed, args.steps, not args.quiet, raw)
    text = summarise(records, counts, no_refit_flags, seconds, args.seed)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Trust campaign\n\n")
            fh.write(f"`python benchmarks/trust_campaign.py --problems {args.problems} --steps {args.steps} ")
            fh.write(f"--seed {args.seed} --out {args.out}`\n\n")
            fh.write(text + "\n")
    if raw is not None:
        with open(args.raw, "wb") as fh:
            pickle.dump(raw, fh)


if __name__ == "__main__":
    main()
