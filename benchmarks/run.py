"""optsens against the tools users would otherwise pick, on the same problems, in one run.

    python benchmarks/run.py --out out/bench            # the full suite (make bench), ~15 min
    python benchmarks/run.py --out /tmp/b --quick       # tiny sizes, a few seconds (smoke test)

Problems: L2-regularised logistic regression (written with ``jnp.logaddexp``) and
Poisson regression, ``D`` in {10, 100, 1000} parameters, ``N = 10 D`` observations,
a hyperparameter of dimension 1 (log prior strength) or 3 (plus an offset and a link
scale). Methods: optsens' Taylor mode (orders 1..10), vittles, the nested custom_jvp
trick in JAX and in autograd (as in Giordano's blog post), optimistix's implicit
adjoint differentiated with nested ``jax.jvp`` (orders 1..8), and an exact refit.

Every (problem, method) pair runs in its own fresh process (`_bench_worker.py`): its
first call is the *cold* time (compilation included), then each order is timed warm
(compiled code reused, best of several calls). Orders that would take too long are
skipped and listed as such. Derivatives of every method are compared with optsens'
before their times are reported, and optsens' with an independent method (vittles,
else the nested tricks). Writes ``results.csv``, ``accuracy.csv``, ``table.md`` and
``cost_vs_order_p1.png`` / ``cost_vs_order_p3.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from _bench_problems import PROBLEMS, Config, make_data, objective  # noqa: E402

FOCUS = "logistic-D100-p1"  # the problem the warm targets are read on
FOCUS_BIG = "logistic-D1000-p1"  # ... and the one for the D = 1000 targets
CACHED_COLD = (FOCUS, FOCUS_BIG)  # cold also timed with a persistent cache
ALL_METHODS = ("optsens", "optsens_jit", "vittles", "nested", "optimistix", "nested_autograd", "refit")
REFIT_STEPS = (0.1, 0.3, 1.0)


def _limits(cfg: Config, method: str, quick: bool) -> dict | str:
    """Orders, cold order and time limits of one worker, or why it is not run.

    Slow methods are capped by a per-call limit and a per-method budget (orders past
    them are reported as skipped); on the focus problem the nested trick and
    optimistix get enough time to reach the orders the targets are read at (8 and
    6). The whole suite is sized to run in about 15 minutes on 2 cores.
    """
    if quick:
        top = {"optsens": 3, "optsens_jit": 3, "refit": 1}.get(method, 2)
        return dict(
            orders=list(range(1, top + 1)),
            cold_order=2 if method != "refit" else 1,
            call_limit_s=30.0,
            budget_s=60.0,
            min_time_s=0.0,
            max_reps=1,
        )
    big = cfg.d >= 1000
    if big and cfg.p == 3 and method in ("optimistix", "nested_autograd", "vittles"):
        return "not run at D = 1000, p = 3: run-time budget (see p = 1)"
    top = {"optsens": 10, "optsens_jit": 10, "vittles": 10, "refit": 1}.get(method, 8)
    cold = {"vittles": 4 if big else 6, "refit": 1}.get(method, 10 if big else 6)
    if method in ("nested", "optimistix", "nested_autograd"):
        cold = 4
    call_limit, budget = 6.0, 15.0
    if method == "nested_autograd":
        cold = {10: 6, 100: 4}.get(cfg.d, 1)
        call_limit, budget = 6.0, (20.0 if big else 12.0)
    if method == "vittles" and big:
        call_limit, budget = 10.0, 45.0
    if method == "vittles" and cfg.d <= 10:
        # vittles is the independent check of optsens' orders 9 and 10: let it get there.
        call_limit, budget = 40.0, 75.0
    if method == "nested" and cfg.name == FOCUS_BIG:
        # The nested trick's order 8 where compute, not dispatch, dominates (target 2).
        call_limit, budget = 150.0, 260.0
    if cfg.name == FOCUS:
        cold = 6 if method != "refit" else 1
        call_limit, budget = {
            "nested": (120.0, 200.0),
            "optimistix": (20.0, 45.0),
            "nested_autograd": (40.0, 60.0),
        }.get(method, (call_limit, budget))
    if method in ("optsens", "optsens_jit", "refit"):
        call_limit, budget = 60.0, 120.0
    return dict(
        orders=list(range(1, top + 1)),
        cold_order=cold,
        call_limit_s=call_limit,
        budget_s=budget,
        min_time_s=0.25,
        max_reps=25,
    )


def configs(quick: bool) -> list[Config]:
    if quick:
        return [Config("logistic", 4, 40, 1), Config("poisson", 4, 40, 3)]
    return [Config(prob, d, 10 * d, p) for prob in PROBLEMS for d in (10, 100, 1000) for p in (1, 3)]


# ----------------------------------------------------------------- data
def prepare_data(cfgs: list[Config], work: Path) -> dict[str, Path]:
    """Simulate each data set and solve for ``theta0`` (Newton to 1e-13)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import optsens

    paths = {}
    for cfg in cfgs:
        data = make_data(cfg)
        f = objective(cfg.problem, cfg.p, jnp)
        theta0 = optsens.newton_solve(
            f,
            jnp.zeros(cfg.d),
            jnp.asarray(data["eps0"]),
            args=(data["x"], data["y"]),
            objective=True,
            tol=1e-13,
        )
        data["theta0"] = np.asarray(theta0)
        path = work / f"{cfg.name}.npz"
        np.savez(path, **data)
        paths[cfg.name] = path
    return paths


def refits(cfg: Config, data_path: Path) -> dict[float, np.ndarray]:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import optsens

    data = np.load(data_path)
    f = objective(cfg.problem, cfg.p, jnp)
    out = {}
    for h in REFIT_STEPS:
        theta = optsens.newton_solve(
            f,
            data["theta0"],
            data["eps0"] + h * data["v"],
            args=(data["x"], data["y"]),
            objective=True,
            tol=1e-14,
        )
        out[h] = np.asarray(theta)
    return out


# -------------------------------------------------------------- workers
def run_worker(spec: dict, work: Path, tag: str, timeout: float) -> dict:
    spec_path = work / f"{tag}.spec.json"
    spec["result"] = str(work / f"{tag}.json")
    spec_path.write_text(json.dumps(spec))
    log = work / f"{tag}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(
                [sys.executable, str(HERE / "_bench_worker.py"), str(spec_path)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return load_result(spec, tag, rc, time.perf_counter() - t0)


def load_result(spec: dict, tag: str, rc=0, wall: float = float("nan")) -> dict:
    log = Path(spec["result"]).with_suffix(".log")
    result_path = Path(spec["result"])
    if rc != 0 or not result_path.exists():
        tail = log.read_text()[-400:] if log.exists() else ""
        return {
            "config": spec["config"],
            "results": [
                {"method": m, "rows": [], "error": f"worker failed ({rc}): {tail}"} for m in spec["methods"]
            ],
            "wall_s": wall,
            "tag": tag,
        }
    out = json.loads(result_path.read_text())
    npz = np.load(str(result_path).replace(".json", ".npz"))
    out["derivatives"] = {k: npz[k] for k in npz.files}
    out["wall_s"], out["tag"] = wall, tag
    return out


def plan(cfgs: list[Config], paths: dict[str, Path], methods: list[str], quick: bool):
    """The worker processes to run, and the (problem, method) pairs left out with why."""
    jobs, not_run = [], []
    for cfg in cfgs:
        base = {"config": cfg.as_dict(), "data": str(paths[cfg.name])}
        if quick:  # one process per problem: cold times only for its first method
            spec = dict(base, methods=list(methods), **_limits(cfg, "optsens", True))
            jobs.append((f"{cfg.name}.all", spec))
            continue
        for m in methods:
            limits = _limits(cfg, m, False)
            if m == "refit" and "optsens" in methods:
                continue  # runs in the optsens process, after it (its cold time is not reported)
            if isinstance(limits, str):
                not_run.append((cfg, m, limits))
                continue
            ms = [m, "refit"] if m == "optsens" and "refit" in methods else [m]
            jobs.append((f"{cfg.name}.{m}", dict(base, methods=ms, **limits)))
        if cfg.name in CACHED_COLD:
            # The cold targets are single first calls on a shared machine: two more
            # fresh processes each (the minimum of the three is reported), and optsens
            # once more with JAX's persistent compilation cache, which one process fills
            # and a second one (the one reported) finds filled.
            for m in ("optsens", "optsens_jit", "vittles"):
                if m in methods and not isinstance(_limits(cfg, m, False), str):
                    for i in (1, 2):
                        spec = dict(base, methods=[m], **_limits(cfg, m, False), cold_only=True)
                        jobs.append((f"{cfg.name}.{m}.cold-again{i}", spec))
            if "optsens" in methods:
                spec = dict(base, methods=["optsens"], **_limits(cfg, "optsens", False))
                cache = str(paths[cfg.name].parent / f"jaxcache-{cfg.name}")
                spec.update(cold_only=True, compilation_cache_dir=cache)
                jobs.append((f"{cfg.name}.optsens.fill-cache", dict(spec)))
                jobs.append((f"{cfg.name}.optsens.cached", dict(spec)))
    return jobs, not_run


def machine() -> dict:
    import importlib.metadata as md

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    for pkg in ("jax", "jaxlib", "numpy", "autograd", "vittles", "optimistix", "lineax", "equinox"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no meaningful timings (smoke test)")
    parser.add_argument("--only", default="", help="run only the problems whose name contains this")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the tables and plots from the workers' results already in --out/work",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes at once (default 1; 2 with --quick). Above 1 timings interfere.",
    )
    args = parser.parse_args(argv)

    from _bench_report import write_report

    t_start = time.perf_counter()
    out = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
    cfgs = [c for c in configs(args.quick) if args.only in c.name]
    if not cfgs:
        parser.error(f"no problem matches --only {args.only!r}")

    if args.report_only:
        paths = {cfg.name: work / f"{cfg.name}.npz" for cfg in cfgs}
        jobs, not_run = plan(cfgs, paths, methods, args.quick)
        results = []
        for tag, spec in jobs:
            spec["result"] = str(work / f"{tag}.json")
            results.append(load_result(spec, tag))
    else:
        print(f"preparing {len(cfgs)} data sets ...", flush=True)
        paths = prepare_data(cfgs, work)
        jobs, not_run = plan(cfgs, paths, methods, args.quick)
        n_jobs = args.jobs or (2 if args.quick else 1)
        timeout = 120.0 if args.quick else 900.0
        print(f"running {len(jobs)} worker processes ({n_jobs} at a time) ...", flush=True)
        results = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=n_jobs) as pool:
            futures = {pool.submit(run_worker, spec, work, tag, timeout): tag for tag, spec in jobs}
            for fut in concurrent.futures.as_completed(futures):
                res = fut.result()
                results.append(res)
                print(f"  {res['tag']:45s} {res['wall_s']:6.1f} s", flush=True)
    results.sort(key=lambda r: [tag for tag, _ in jobs].index(r["tag"]))
    for cfg, m, why in not_run:
        results.append(
            {
                "config": cfg.as_dict(),
                "results": [{"method": m, "rows": [], "missing": why}],
                "tag": f"{cfg.name}.{m}",
                "wall_s": 0.0,
            }
        )

    print("refits for the accuracy table ...", flush=True)
    refit_thetas = {cfg.name: refits(cfg, paths[cfg.name]) for cfg in cfgs}
    data = {cfg.name: dict(np.load(paths[cfg.name])) for cfg in cfgs}
    info = machine()
    run_info = work / "run_info.json"
    if args.report_only and run_info.exists():
        info.update(json.loads(run_info.read_text()))
    else:
        info["total_s"] = time.perf_counter() - t_start
        info["command"] = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        run_info.write_text(json.dumps({"total_s": info["total_s"], "command": info["command"]}))
    summary = write_report(out, cfgs, results, data, refit_thetas, info, quick=args.quick)
    print(summary)
    print(
        f"wrote {out}/results.csv, accuracy.csv, table.md, cost_vs_order_p*.png "
        f"in {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
