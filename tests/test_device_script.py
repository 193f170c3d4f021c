"""The device script's CPU dry run: every step of bench/device.py planned and run with tiny budgets (the GPU
steps recorded as skipped), the frontier bench end to end on the session's tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_device_script_dry_run(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    env = {**os.environ, "WEIGHTLOCK_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "bench/device.py", "--dry-run", "--model", str(model), "--work",
                        str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = json.loads((tmp_path / "device_run_dry.json").read_text())
    steps = {s["name"]: s for s in run["steps"]}
    assert run["ok"] and not run["cuda"] and set(steps) == {"triton", "inference", "frontier"}
    if not torch.cuda.is_available():
        assert steps["triton"]["exit"] == steps["inference"]["exit"] == "skipped"
    assert steps["frontier"]["exit"] == 0 and "--device cpu" in steps["frontier"]["command"]
    front = json.loads((tmp_path / "real_unreadable_dry.json").read_text())
    recipes = {p["recipe"] for p in front["points"].values()}
    assert recipes == {"structured", "random", "anneal", "penalty"}
    for key, point in front["points"].items():
        for side in ("lock", "readback"):
            assert 0 <= point[side]["min_top1_agreement"] <= 1 and point[side]["worst_ppl_ratio"] > 0
        if point["recipe"] != "structured":
            assert point["reverse"]["per_layer"] and point["owner_seconds"] > 0, key
    assert abs(front["points"]["structured/s=64"]["readback"]["worst_ppl_ratio"] - 1) < 1e-3  # the original
    assert (tmp_path / "real_unreadable_dry.png").stat().st_size > 0


def test_device_script_refuses_cpu_without_dry_run(tmp_path):
    if torch.cuda.is_available():
        return
    p = subprocess.run([sys.executable, "bench/device.py", "--work", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr and "--dry-run" in p.stderr
