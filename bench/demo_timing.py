"""Benchmark: wall time of a first (cold) `weightlock demo` run, full or `--quick`.

    python bench/demo_timing.py --quick      # target ≤ 3 minutes on 2 CPU cores
    python bench/demo_timing.py              # target ≤ 20 minutes on 2 CPU cores

Runs the demo as a user would (the CLI, in a subprocess) into a fresh directory, so no cached stage is
reused, and writes bench/results/demo_timing_{quick,full}.json: wall seconds, the demo's own per-stage
seconds, peak resident memory, the load averages around the run, the verdicts, and whether the budget
was met. Keep the machine otherwise idle while it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightlock.experiments.harness import save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", default=None, help="copy the demo's summary.json and report here")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="weightlock-demo-")) / "demo"
    cmd = [sys.executable, "-m", "weightlock.cli", "demo", "--out", str(out)] + (["--quick"] if args.quick else [])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    budget = 180 if args.quick else 1200
    res = {"command": " ".join(["python bench/demo_timing.py", *sys.argv[1:]]), "preset": summary["preset"],
           "wall_seconds": wall,
           # 1/5/15-minute load averages before and after: a run beside other work is an upper bound
           "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
           "budget_seconds": budget, "within_budget": wall <= budget,
           "demo_seconds": summary["seconds"],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "report_files": sorted(p.name for p in (out / "report").iterdir()), "verdicts": summary["verdicts"]}
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.json", keep / "summary.json")
        shutil.copytree(out / "report", keep / "report", dirs_exist_ok=True)
    shutil.rmtree(out.parent, ignore_errors=True)
    print(json.dumps({k: res[k] for k in ("wall_seconds", "within_budget")}))
    save(f"demo_timing_{'quick' if args.quick else 'full'}", res)


if __name__ == "__main__":
    main()
