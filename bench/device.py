"""The device script: everything that needs a GPU, in one command of at most 9 minutes on one H100.

    PYTHONPATH=src python3 bench/device.py                  # on the lent GPU machine (nothing to install there)
    python bench/device.py --dry-run --model runs/tiny      # the same steps on CPU, tiny budgets (a CI test)

Steps, each in its own process under its own time limit (a step that fails or runs out of time is recorded
as such and the next one runs):

1. ``triton``: ``pytest tests/test_triton.py`` — the fused kernel against the reference path on the GPU;
2. ``inference``: ``bench/timing.py gpu --repeats 3`` — bf16 prefill and decode of the locked model against the
   original (writes bench/results/gpu_*.json);
3. ``frontier``: ``bench/real_unreadable.py --device cuda --name real_unreadable_cuda`` — the random-start and
   continuation points of the price-of-unreadability frontier at the largest budget that fits the time left
   (more layers, steps and reverse-distillation steps than the CPU run).

The model of step 3 is ``--model`` (SmolLM2 after ``make smollm2``); a working tree that travels to the GPU
machine holds at most 64 MiB, so where that directory is absent the script pretrains the built-in ``small``
preset there first and says so. Writes bench/results/device_run_cuda.json (``device_run_dry.json`` for a dry
run): per step its command, exit status, seconds and output tail, and the machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(name: str, cmd: list[str], limit: float, env: dict) -> dict:
    """Run ``cmd`` from the repository root with ``limit`` seconds; its record (never raises)."""
    print(f"[device] {name}: {' '.join(cmd)} (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    dt = time.perf_counter() - t0
    print(f"[device] {name}: exit {rc} after {dt:.0f} s\n{out[-1500:]}", flush=True)
    return {"name": name, "command": " ".join(cmd), "exit": rc, "seconds": dt, "output_tail": out[-4000:]}


def shape(model: str) -> tuple[int, str]:
    """The gated rank (the largest of 32, 16, 8 that divides the MLP's hidden width) and up to six evenly spaced
    layers of the model in ``model`` (its config.json)."""
    import json

    c = json.loads((Path(model) / "config.json").read_text())
    d_ff, n = c["intermediate_size"], c["num_hidden_layers"]
    rank = next((r for r in (32, 16, 8) if d_ff % r == 0), None)
    if rank is None:
        raise SystemExit(f"{model}: no rank of 32, 16 or 8 divides its MLP width {d_ff}")
    layers = sorted({round(i * (n - 1) / 5) for i in range(6)}) if n > 1 else [0]
    return rank, ",".join(map(str, layers))


def plan(args, cuda: bool) -> list[tuple[str, list[str], float]]:
    """The steps as (name, command, seconds) for this machine: full budgets on CUDA, tiny ones in a dry run. On
    CUDA the steps' limits add up to at most 8 minutes with the pretraining step (9 with start-up)."""
    py = sys.executable
    if args.dry_run:
        frontier = ["--device", "cpu", "--name", "real_unreadable_dry", "--rank", "8", "--layers", "0",
                    "--readouts", "64,4", "--start", "8", "--end", "4", "--steps", "3", "--random-steps", "3",
                    "--random-segments", "1", "--reverse-cap", "10", "--calib-tokens", "2048",
                    "--eval-tokens", "256", "--recipes", "structured,random,anneal,penalty"]
    else:
        rank, layers = shape(args.model)
        frontier = ["--device", "cuda", "--name", "real_unreadable_cuda", "--rank", str(rank), "--layers", layers,
                    "--readouts", "4096,1024,256", "--start", "1024", "--end", "16", "--steps", "300",
                    "--random-steps", "1000", "--random-segments", "2", "--reverse-cap", "2000",
                    "--calib-tokens", "65536", "--eval-tokens", "4096", "--batch", "1024",
                    "--recipes", "structured,random,anneal,penalty,attribution"]
    steps = [("triton", [py, "-m", "pytest", "-q", "-x", "tests/test_triton.py"], 60 if cuda else 30)]
    steps.append(("inference", [py, "bench/timing.py", "gpu", "--repeats", "3", "--smollm2", args.model], 120))
    steps.append(("frontier", [py, "bench/real_unreadable.py", "--model", args.model,
                               "--out", str(Path(args.work) / "unreadable"), *frontier], 210 if cuda else 300))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny budgets: checks every step's plumbing")
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--work", default="runs/device")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench/device.py needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run on CPU",
              file=sys.stderr)
        sys.exit(2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    records, t0 = [], time.perf_counter()
    if not (Path(args.model) / "config.json").exists():
        model = str(Path(args.work) / "base-small")
        records.append(step("pretrain", [sys.executable, "-m", "weightlock.cli", "pretrain", "--preset", "small",
                                         "--data", "builtin:code+prose", "--out", model, "--overwrite"], 90, env))
        records[-1]["why"] = f"{args.model} is absent (SmolLM2 does not fit the 64 MiB that travels)"
        args.model = model
    from weightlock.experiments.harness import save

    def record() -> bool:  # after every step: a run cut short keeps what it measured
        ok = all(r["exit"] in (0, "skipped") for r in records)
        save("device_run_dry" if args.dry_run else "device_run_cuda",
             {"command": "python bench/device.py " + " ".join(sys.argv[1:]), "cuda": cuda, "model": args.model,
              "seconds": time.perf_counter() - t0, "ok": ok, "steps": records})
        return ok

    for name, cmd, limit in plan(args, cuda):
        if name in ("triton", "inference") and not cuda:
            records.append({"name": name, "command": " ".join(cmd), "exit": "skipped",
                            "why": "no CUDA on this machine (dry run)"})
        else:
            records.append(step(name, cmd, limit, env))
        record()
    sys.exit(0 if record() else 1)


if __name__ == "__main__":
    main()
