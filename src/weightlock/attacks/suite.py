"""Seeds and the attacker's hyperparameter sweep: the reported result is the attacker's best."""
from __future__ import annotations

import itertools
import math
import random
import statistics

from ..errors import WeightlockError
from ..io import check_out_dir, write_json
from ..schema import ATTACK_SUITE, SCHEMA_VERSION
from ..train.finetune import is_main_process
from .registry import make_attack
from .run import attack_inputs, run_attack


def parse_value(v: str):
    """A command-line value: an int, a float, true/false, or the string itself."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_grid(items: list[str]) -> dict[str, list | tuple]:
    """``["lr=1e-4,1e-3", "optimizer=adamw,sgd"]`` → ``{"lr": [1e-4, 1e-3], "optimizer": ["adamw", "sgd"]}``;
    ``"lr=1e-4..1e-2"`` is a range ``(1e-4, 1e-2)`` for random search (log-uniform)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise WeightlockError(f"a sweep is KEY=V1,V2,... or KEY=LO..HI, got {item!r}")
        if ".." in values:
            lo, hi = (parse_value(v) for v in values.split("..", 1))
            if not all(isinstance(v, (int, float)) and v > 0 for v in (lo, hi)) or lo >= hi:
                raise WeightlockError(f"{item!r}: a range needs two positive numbers LO < HI")
            grid[key.strip()] = (lo, hi)
        else:
            grid[key.strip()] = [parse_value(v) for v in values.split(",") if v.strip()]
    return grid


def sample_points(grid: dict, samples: int | None, seed: int = 0) -> list[dict]:
    """Every grid point, or ``samples`` random points (lists: uniform choice; ranges: log-uniform)."""
    ranges = [k for k, v in grid.items() if isinstance(v, tuple)]
    if samples is None:
        if ranges:
            raise WeightlockError(f"range(s) for {', '.join(ranges)} need random search (samples=N)")
        return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] or [{}]
    if samples < 1:
        raise WeightlockError(f"samples must be ≥ 1, got {samples}")
    rng = random.Random(seed)
    points = []
    for _ in range(samples):
        p = {}
        for k, v in grid.items():
            if isinstance(v, tuple):
                x = math.exp(rng.uniform(math.log(v[0]), math.log(v[1])))
                p[k] = round(x) if isinstance(v[0], int) and isinstance(v[1], int) else float(f"{x:.3g}")
            else:
                p[k] = rng.choice(v)
        points.append(p)
    return points


def run_suite(model_dir, task: str, attack: str, out, reference=None, seeds=(0,), grid: dict | None = None,
              samples: int | None = None, **options) -> dict:
    """The attacker's hyperparameter search: every grid point (or ``samples`` random points) × seed,
    skipping finished runs; mean and spread per point; the attacker's best is the reported result."""
    grid = grid or {}
    points = sample_points(grid, samples)
    from ..eval.tasks import get_task

    make_attack(attack, **options, **points[0])  # validate names and the task before any work
    get_task(task)
    out = check_out_dir(out, attack_inputs(model_dir, reference, task))  # never inside (or around) a model
    rows = []
    for point in points:
        tag = "_".join(f"{k}-{v}" for k, v in point.items()) or "default"
        runs = [run_attack(model_dir, task, attack, out / tag / f"seed{s}", reference=reference,
                           **{**options, **point, "seed": s}) for s in seeds]
        gains = [r["target"]["gain"] for r in runs]
        row = {"point": point, "seeds": list(seeds), "gain_mean": statistics.mean(gains),
               "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
               "runs": [str(out / tag / f"seed{s}") for s in seeds]}
        if reference is not None:
            ref = [r["reference_run"]["gain"] for r in runs]
            row.update(reference_gain_mean=statistics.mean(ref),
                       reference_gain_std=statistics.stdev(ref) if len(ref) > 1 else 0.0)
        row["cost"] = {k: statistics.mean(r["target"]["cost"][k] for r in runs)
                       for k in ("saved_activation_bytes_per_step", "step_time_s", "peak_rss_bytes")}
        rows.append(row)
    best = max(rows, key=lambda r: r["gain_mean"])
    summary = {"kind": ATTACK_SUITE, "schema_version": SCHEMA_VERSION, "model": str(model_dir),
               "reference": str(reference) if reference else None, "task": task,
               "attack": attack, "options": options, "grid": {k: list(v) for k, v in grid.items()}, "samples": samples,
               "points": rows, "best": best}
    if reference is not None:
        best_ref = max(rows, key=lambda r: r["reference_gain_mean"])
        summary["best_reference"] = best_ref
        summary["gain_ratio"] = (best["gain_mean"] / best_ref["reference_gain_mean"]
                                 if abs(best_ref["reference_gain_mean"]) > 1e-12 else None)
    if is_main_process():
        write_json(out / "summary.json", summary)
    return summary
