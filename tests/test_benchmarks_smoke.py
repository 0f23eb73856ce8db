"""The benchmark script still runs end to end (tiny sizes; no timing is checked)."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_script_runs_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("results.csv", "accuracy.csv", "table.md", "cost_vs_order_p1.png", "cost_vs_order_p3.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    optsens_rows = [r for r in rows if r["method"] == "optsens" and r["status"] == "ok"]
    assert {int(r["order"]) for r in optsens_rows} >= {1, 2, 3}
    # Every method that ran agrees with optsens (the script reports no time otherwise).
    assert not [r for r in rows if r["status"] == "disagrees"], rows
    table = (out / "table.md").read_text()
    assert "## Targets" in table and "## Accuracy against exact refits" in table
