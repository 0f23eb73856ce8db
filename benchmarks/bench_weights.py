"""Data-weight sensitivity (`optsens.MEstimator`): cost ratios and accuracy, in one run.

    python benchmarks/bench_weights.py           # full sizes (a few minutes on 2 cores)
    python benchmarks/bench_weights.py --quick   # tiny sizes, seconds
    python benchmarks/bench_weights.py --sections newton breast_cancer   # some sections only

Sections (every ratio is measured in this run, side by side):

1. Scale: first-order influence of every observation on a scalar QoI, logistic
   regression N = 10^6, D = 20, against the floor "one jitted full-data Hessian
   plus one gradient" (`jax.jit(jax.hessian(f))` + `jax.jit(jax.grad(f))`). The
   optsens time is a fresh `MEstimator` (so it includes forming, checking and
   factorising H), compiled beforehand. Peak resident memory of the process.
2. Against statsmodels at N = 10^4 and 10^5 (D = 10): GLM logistic
   `GLMInfluence.params_one` (the same numbers as optsens' Newton-step LOO) and OLS
   `OLSInfluence.dfbeta` (an explicit leave-one-out loop; timed on a subset of its
   refits and extrapolated), and exact refits (statsmodels GLM fits; optsens
   warm-started Newton refits), extrapolated from a subset.
3. Accuracy: breast_cancer (standardised, L2 logistic regression, lambda = 1, N = 569,
   D = 31): all 569 exact leave-one-out refits against IJ orders 1-3 and the Newton step:
   mean LOO log-loss and median relative parameter error.
4. The Newton step (ALO) for leave-one-out, N = 10^4, D = 50 (L2 logistic): the rank-one
   Woodbury update of H's factorisation (declared `linear_predictor`) against a fresh
   D x D factorisation per fold, side by side, with statsmodels' `params_one` (same
   formula, unpenalised GLM on the same data) for scale.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import optsens

jax.config.update("jax_enable_x64", True)


def best_of(fn, repeat=3):
    """Minimum wall time over `repeat` runs (fn must block on its result)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def logistic_loss(theta, d):
    z = d["x"] @ theta
    return jnp.logaddexp(0.0, z) - d["y"] * z


def l2_penalty(theta):
    return 0.5 * theta[1:] @ theta[1:]


def linear_predictor(theta, d):
    return d["x"] @ theta


def logistic_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = np.hstack([np.ones((n, 1)), rng.standard_normal((n, d - 1))])
    beta = rng.standard_normal(d) / np.sqrt(d)
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ beta))).astype(float)
    return x, y


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


# --------------------------------------------------------------------- scale
def section_scale(n, d):
    print(f"\n## 1. Influence of all N observations on a scalar QoI (logistic, N = {n:,}, D = {d})")
    x, y = logistic_data(n, d)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    model = optsens.MEstimator.from_loss(logistic_loss, data, jnp.zeros(d), penalty=l2_penalty).fit()
    theta = model.theta

    def total(th, data):
        return jnp.sum(jax.vmap(logistic_loss, (None, 0))(th, data)) + l2_penalty(th)

    hess, grad = jax.jit(jax.hessian(total)), jax.jit(jax.grad(total))
    block((hess(theta, data), grad(theta, data)))
    floor = best_of(lambda: block((hess(theta, data), grad(theta, data))))

    qoi = lambda th: th[1]  # noqa: E731

    def fresh_influence():
        fresh = optsens.MEstimator.from_loss(logistic_loss, data, theta, penalty=l2_penalty)
        return block(fresh.influence(qoi=qoi))

    fresh_influence()  # compile
    t_qoi = best_of(fresh_influence)
    t_qoi_cached = best_of(lambda: block(model.influence(qoi=qoi)))
    model.influence()
    t_full = best_of(lambda: block(model.influence()))
    print(f"floor: jitted Hessian + gradient          {floor:8.3f} s   1.00x")
    print(f"influence(qoi) on a fresh model (H incl.) {t_qoi:8.3f} s   {t_qoi / floor:.2f}x   (target <= 3x)")
    print(f"influence(qoi), H already factorised      {t_qoi_cached:8.3f} s   {t_qoi_cached / floor:.2f}x")
    print(f"influence() of theta, N x D output        {t_full:8.3f} s   {t_full / floor:.2f}x")
    print(f"peak resident memory of this process so far: {peak_rss_gb():.2f} GB (target < 6 GB)")
    return t_qoi / floor


# ---------------------------------------------------------------- statsmodels
def section_statsmodels(sizes, d, refit_budget):
    import statsmodels.api as sm
    from statsmodels.stats.outliers_influence import OLSInfluence

    print(
        f"\n## 2. Against statsmodels (D = {d}); exact-refit loops timed on max(5, {refit_budget:,} / N) "
        "refits, extrapolated to N"
    )
    header = f"{'N':>8} {'quantity':<46} {'statsmodels':>12} {'optsens':>10} {'ratio':>8}"
    print(header)
    for n in sizes:
        n_sub = max(5, refit_budget // n)
        x, y = logistic_data(n, d, seed=1)
        res = sm.GLM(y, x, family=sm.families.Binomial()).fit(tol=1e-12)
        t_sm = best_of(lambda res=res: res.get_influence().params_one, repeat=5)
        warm = optsens.MEstimator.from_statsmodels(res)
        block(warm.leave_out("loo", method="newton"))  # compile

        def ours(res=res):
            model = optsens.MEstimator.from_statsmodels(res, polish=False)
            return block(model.leave_out("loo", method="newton"))

        t_ours = best_of(ours, repeat=5)
        agree = np.abs(np.asarray(ours()) - res.get_influence().params_one).max()
        print(
            f"{n:>8} {'GLM logistic LOO one-step (params_one)':<46} {t_sm:>11.3f}s {t_ours:>9.3f}s "
            f"{t_sm / t_ours:>7.1f}x   (max |diff| {agree:.1e})"
        )
        t_ours_infl = best_of(
            lambda res=res: block(optsens.MEstimator.from_statsmodels(res, polish=False).influence()), 5
        )
        print(f"{n:>8} {'GLM logistic influence() (all d theta/d w_n)':<46} {'':>12} {t_ours_infl:>9.3f}s")

        # exact LOO refits: statsmodels GLM fits vs optsens warm-started Newton refits
        sub = np.arange(n_sub)
        t0 = time.perf_counter()
        for i in sub:
            keep = np.ones(n, bool)
            keep[i] = False
            sm.GLM(y[keep], x[keep], family=sm.families.Binomial()).fit(tol=1e-12)
        t_sm_refits = (time.perf_counter() - t0) * n / n_sub
        warm.refit(sub[:, None], progress=False)  # compile (kernels depend on the block of folds)
        t0 = time.perf_counter()
        warm.refit(sub[:, None], progress=False)
        t_ours_refits = (time.perf_counter() - t0) * n / n_sub
        print(
            f"{n:>8} {'GLM logistic exact LOO refits (extrapolated)':<46} {t_sm_refits:>11.1f}s "
            f"{t_ours_refits:>9.1f}s {t_sm_refits / t_ours_refits:>7.1f}x"
        )
        print(
            f"{n:>8} {'  exact refits (optsens) vs Newton-step LOO':<46} {'':>12} {'':>10} "
            f"{t_ours_refits / t_ours:>7.0f}x"
        )

        # OLS: OLSInfluence.dfbeta runs N OLS fits; time that loop on a subset
        yl = x @ np.linspace(-1, 1, d) + np.random.default_rng(2).standard_normal(n)
        ols = sm.OLS(yl, x).fit()
        infl = OLSInfluence(ols)
        t0 = time.perf_counter()
        for i in sub:
            keep = np.ones(n, bool)
            keep[i] = False
            sm.OLS(yl[keep], x[keep]).fit()
        t_dfbeta = (time.perf_counter() - t0) * n / n_sub
        block(optsens.MEstimator.from_statsmodels(ols).leave_out("loo", method="newton"))

        def ours_ols(ols=ols):
            model = optsens.MEstimator.from_statsmodels(ols, polish=False)
            return block(model.leave_out("loo", method="newton"))

        t_ols = best_of(ours_ols, repeat=5)
        if n <= 2000:
            dfbeta = infl.dfbeta
            agree = np.abs(ols.params - np.asarray(ours_ols()) - dfbeta).max()
            note = f"(max |diff| vs dfbeta {agree:.1e})"
        else:
            note = "(dfbeta loop extrapolated)"
        print(
            f"{n:>8} {'OLS dfbeta (exact LOO) = Newton-step LOO':<46} {t_dfbeta:>11.1f}s {t_ols:>9.3f}s "
            f"{t_dfbeta / t_ols:>7.0f}x   {note}"
        )


# ------------------------------------------------------------- breast cancer
def section_breast_cancer(n_folds):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    data = {"x": np.hstack([np.ones((x.shape[0], 1)), x]), "y": y.astype(float)}
    model = optsens.MEstimator.from_loss(
        logistic_loss, data, jnp.zeros(31), penalty=l2_penalty, linear_predictor=linear_predictor
    ).fit()
    n = model.n_obs
    folds = np.arange(n)[:, None] if n_folds is None else np.arange(n_folds)[:, None]
    nf = folds.shape[0]
    print(
        f"\n## 3. breast_cancer, L2 logistic (lambda = 1, intercept unpenalised), N = {n}, D = 31: "
        f"{nf} leave-one-out folds"
    )
    t0 = time.perf_counter()
    exact = np.asarray(model.refit(folds, progress=False))
    t_exact = time.perf_counter() - t0
    th0 = np.asarray(model.theta)
    change = np.linalg.norm(exact - th0, axis=1)
    t0 = time.perf_counter()
    coeffs = np.asarray(model.leave_out_coefficients(folds, order=3))
    t_series = time.perf_counter() - t0
    t0 = time.perf_counter()
    coeffs = np.asarray(model.leave_out_coefficients(folds, order=3))
    t_series_warm = time.perf_counter() - t0
    model.leave_out(folds, method="newton")
    t_newton = best_of(lambda: block(model.leave_out(folds, method="newton")))
    model.leave_out(folds, order=1)
    t_ij1 = best_of(lambda: block(model.leave_out(folds, order=1)))

    def loo_logloss(thetas):
        z = np.sum(data["x"][folds[:, 0]] * thetas, axis=1)
        return float(np.mean(np.logaddexp(0.0, z) - data["y"][folds[:, 0]] * z))

    # Observations far from the boundary have essentially no influence (changes ~1e-15):
    # relative errors are taken over the folds whose exact change is not negligible.
    moved = change > 1e-8 * np.linalg.norm(th0)
    rows = [("exact refits", exact, t_exact)]
    for k in (1, 2, 3):
        rows.append((f"IJ order {k}", th0 + coeffs[:, :k].sum(axis=1), t_ij1 if k == 1 else t_series_warm))
    rows.append(("Newton step (ALO)", np.asarray(model.leave_out(folds, method="newton")), t_newton))
    columns = ("mean LOO log-loss", "median rel. error", "max rel. error")
    print(f"{'method':<20} {columns[0]:>18} {columns[1]:>18} {columns[2]:>15} {'time':>9}")
    for name, thetas, t in rows:
        rel = (np.linalg.norm(thetas - exact, axis=1) / np.maximum(change, 1e-300))[moved]
        med = "-" if name.startswith("exact") else f"{np.median(rel):.2e}"
        mx = "-" if name.startswith("exact") else f"{np.max(rel):.2e}"
        print(f"{name:<20} {loo_logloss(thetas):>18.6f} {med:>18} {mx:>15} {t:>8.3f}s")
    print(
        f"(relative error = |theta_approx - theta_exact| / |theta_exact - theta0| per fold, over the "
        f"{int(moved.sum())} folds whose exact change exceeds 1e-8 |theta0|; order-3 series incl. "
        f"compilation: {t_series:.2f} s; exact refits are warm-started Newton; Newton step by the "
        "Woodbury update)"
    )


# --------------------------------------------------------- Newton step: low rank
def section_newton_low_rank(n, d):
    import statsmodels.api as sm

    print(
        f"\n## 4. Newton-step LOO (ALO), L2 logistic, N = {n:,}, D = {d}: Woodbury update vs a D x D "
        "factorisation per fold"
    )
    x, y = logistic_data(n, d, seed=3)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    dense = optsens.MEstimator.from_loss(logistic_loss, data, jnp.zeros(d), penalty=l2_penalty).fit()

    def fresh(low_rank):
        extra = {"linear_predictor": linear_predictor} if low_rank else {}
        return optsens.MEstimator.from_loss(logistic_loss, data, dense.theta, penalty=l2_penalty, **extra)

    low = fresh(True)
    loo = lambda m: block(m.leave_out("loo", method="newton"))  # noqa: E731
    loo(dense), loo(low)  # compile (and, for `low`, check the declaration against H)
    t_dense, t_low = best_of(lambda: loo(dense)), best_of(lambda: loo(low))
    # a fresh model: H formed, checked, factorised (and the declaration checked) inside the time
    t_dense_fresh, t_low_fresh = best_of(lambda: loo(fresh(False))), best_of(lambda: loo(fresh(True)))
    agree = float(np.max(np.abs(np.asarray(loo(dense)) - np.asarray(loo(low)))))
    res = sm.GLM(y, x, family=sm.families.Binomial()).fit(tol=1e-12)
    t_sm = best_of(lambda: res.get_influence().params_one)
    print(f"{'':<44} {'dense':>9} {'Woodbury':>9} {'speed-up':>9}")
    print(
        f"{'leave_out(loo, newton), H cached':<44} {t_dense:>8.3f}s {t_low:>8.3f}s {t_dense / t_low:>8.1f}x"
    )
    print(
        f"{'the same on a fresh model (H incl.)':<44} {t_dense_fresh:>8.3f}s {t_low_fresh:>8.3f}s "
        f"{t_dense_fresh / t_low_fresh:>8.1f}x"
    )
    print(f"max |Woodbury - dense| = {agree:.1e}")
    print(
        f"statsmodels GLMInfluence.params_one (unpenalised GLM, same data): {t_sm:.3f} s "
        f"= {t_sm / t_low:.1f}x the Woodbury time"
    )
    return t_dense / t_low


SECTIONS = ("scale", "statsmodels", "breast_cancer", "newton")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", category=DeprecationWarning)
    platform = jax.devices()[0].platform
    print(
        f"optsens {optsens.__version__}, jax {jax.__version__}, {platform}, python {sys.version.split()[0]}"
    )
    run = set(args.sections)
    ratio = speedup = None
    if "scale" in run:
        ratio = section_scale(20_000, 20) if args.quick else section_scale(1_000_000, 20)
    if "statsmodels" in run:
        if args.quick:
            section_statsmodels([2_000], 10, 40_000)
        else:
            section_statsmodels([10_000, 100_000], 10, 1_000_000)
    if "breast_cancer" in run:
        section_breast_cancer(60 if args.quick else None)
    if "newton" in run:
        speedup = section_newton_low_rank(1_000, 20) if args.quick else section_newton_low_rank(10_000, 50)
    if ratio is not None:
        print(f"\nscale ratio influence(qoi) / (Hessian + gradient): {ratio:.2f}x")
    if speedup is not None:
        print(f"Newton-step LOO speed-up, Woodbury over dense factorisations: {speedup:.1f}x")


if __name__ == "__main__":
    main()
