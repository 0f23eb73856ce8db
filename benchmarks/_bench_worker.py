"""One benchmark worker: a fresh process that times one or more methods on one problem.

Usage (by `run.py`): ``python _bench_worker.py SPEC.json``. The spec names the
problem's data file, the methods, their orders and time limits, and where to write
``RESULT.json`` and ``RESULT.npz`` (the derivatives of every call, for the agreement
check).

Protocol per method:

1. *cold*: the very first call of the process (at ``cold_order``), construction and
   compilation included; the first method of the process only (imports and data
   loading are done before and timed separately);
2. *warm*: for each order in turn, one call (which compiles it if needed, its time is
   ``first_s``) and then repeated calls, keeping the fastest;
3. an order is skipped, with the reason recorded, when its first call is predicted
   to exceed ``call_limit_s`` or the method's ``budget_s`` (the prediction is the
   last first-call time times the growth between the last two orders, at least 1);
4. peak memory is the process's peak resident set size above its size after set-up
   (``VmHWM`` reset through ``/proc/self/clear_refs`` where Linux allows it).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _bench_problems import Config  # noqa: E402

now = time.perf_counter


def _status_kb(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mb(baseline_kb: float, can_reset: bool) -> float:
    peak_kb = _status_kb("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0.0, (peak_kb - baseline_kb) / 1024.0)


def _sweep(method, spec: dict, is_first: bool, store: dict, t_import: float) -> dict:
    name = method.name
    orders = [k for k in spec["orders"] if k <= method.max_order]
    out: dict = {"method": name, "label": method.label, "rows": [], "cold": None, "import_s": t_import}
    call_limit, budget = spec["call_limit_s"], spec["budget_s"]
    min_time, max_reps = spec["min_time_s"], spec["max_reps"]
    t_start = now()
    baseline_kb = _status_kb("VmRSS")
    can_reset = _reset_peak()

    cold_order = spec.get("cold_order")
    first_times: dict[int, float] = {}
    if is_first and cold_order:
        cold_order = min(cold_order, method.max_order)
        c, d, derivs = method.run(cold_order)
        out["cold"] = {
            "order": cold_order,
            "construct_s": c,
            "derivs_s": d,
            "total_s": c + d,
            "peak_mb": _peak_mb(baseline_kb, can_reset),
        }
        first_times[cold_order] = c + d
        store[f"{name}/cold{cold_order}"] = np.stack(derivs)
        if spec.get("cold_only"):
            out["peak_mb"] = out["cold"]["peak_mb"]
            return out

    previous: list[float] = []
    for i, order in enumerate(orders):
        if previous:
            growth = previous[-1] / previous[-2] if len(previous) >= 2 and previous[-2] > 0 else 2.0
            predicted = previous[-1] * max(growth, 1.0)
            elapsed = now() - t_start
            reason = None
            if predicted > call_limit:
                reason = f"predicted {predicted:.0f} s per call > limit {call_limit:.0f} s"
            elif elapsed + predicted > budget:
                reason = f"predicted {predicted:.0f} s, over the {budget:.0f} s budget of this method"
            if reason:
                for skipped in orders[i:]:
                    out["rows"].append({"order": skipped, "status": "skipped", "note": reason})
                break
        try:
            compiles = not method.requires or "autograd" not in method.requires
            if order in first_times:
                first = first_times[order]
                samples: list[tuple[float, float]] = []
            else:
                c, d, derivs = method.run(order)
                first = c + d
                # Without compilation the first call is itself a valid warm sample.
                samples = [] if compiles else [(c, d)]
            reps = max(1, min(max_reps, math.ceil(min_time / max(first, 1e-4))))
            if first > 5 * min_time:
                reps = 1 if compiles or not samples else 0
            for _ in range(reps):
                c, d, derivs = method.run(order)
                samples.append((c, d))
            if len(samples) < 2 and sum(samples[-1]) < spec.get("second_sample_below_s", 1.5):
                # One sample of a ~1 s call is at the mercy of whatever else the
                # machine is doing; a second one is cheap insurance.
                c, d, derivs = method.run(order)
                samples.append((c, d))
        except Exception as exc:  # a method failing is a result, not a crash
            out["rows"].append(
                {"order": order, "status": "error", "note": f"{type(exc).__name__}: {str(exc)[:300]}"}
            )
            traceback.print_exc()
            break
        best = min(samples, key=lambda s: s[0] + s[1])
        out["rows"].append(
            {
                "order": order,
                "status": "ok",
                "first_s": first,
                "construct_s": best[0],
                "derivs_s": best[1],
                "total_s": best[0] + best[1],
                "reps": len(samples),
            }
        )
        store[f"{name}/{order}"] = np.stack(derivs)
        previous.append(max(first, best[0] + best[1]))
    out["peak_mb"] = _peak_mb(baseline_kb, can_reset)
    out["sweep_s"] = now() - t_start
    return out


def main(spec_path: str) -> None:
    load_start = os.getloadavg()[0]
    spec = json.loads(Path(spec_path).read_text())
    cfg = Config(**spec["config"])
    loaded = np.load(spec["data"])
    data = {k: loaded[k] for k in loaded.files}
    from _bench_methods import METHODS

    if spec.get("compilation_cache_dir"):
        # JAX's persistent compilation cache, as users switch it on: compiled code
        # written by an earlier process is loaded instead of compiled (tracing and
        # lowering still run). Only optsens is timed this way.
        import optsens

        optsens.enable_compilation_cache(spec["compilation_cache_dir"])

    results, store = [], {}
    for i, name in enumerate(spec["methods"]):
        method = METHODS[name]()
        t0 = now()
        try:
            method.setup(cfg, data)
        except ImportError as exc:
            results.append(
                {"method": name, "label": method.label, "rows": [], "missing": f"not installed ({exc})"}
            )
            continue
        t_import = now() - t0
        try:
            results.append(_sweep(method, spec, i == 0, store, t_import))
        except Exception as exc:
            traceback.print_exc()
            results.append(
                {"method": name, "label": method.label, "rows": [], "error": f"{type(exc).__name__}: {exc}"}
            )
    out = {
        "config": cfg.as_dict(),
        "results": results,
        "load_avg": max(load_start, os.getloadavg()[0]),
    }
    Path(spec["result"]).write_text(json.dumps(out, indent=1))
    np.savez(spec["result"].replace(".json", ".npz"), **store)


if __name__ == "__main__":
    main(sys.argv[1])
