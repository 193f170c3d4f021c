"""Seeds and the attacker's hyperparameter sweep: the reported result is the attacker's best."""
from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from ..io import write_json
from .core import make_attack, run_attack


def _parse(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["lr=1e-4,1e-3", "optimizer=adamw,sgd"]`` → ``{"lr": [1e-4, 1e-3], "optimizer": ["adamw", "sgd"]}``."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        grid[key.strip()] = [_parse(v) for v in values.split(",") if v.strip()]
    return grid


def run_suite(model_dir, task: str, attack: str, out, reference=None, seeds=(0,), grid: dict | None = None,
              **options) -> dict:
    """Every grid point × seed (skipping finished runs); mean and spread per point; the attacker's best."""
    grid = grid or {}
    make_attack(attack, **options, **{k: v[0] for k, v in grid.items()})  # validate names before any work
    out = Path(out)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] or [{}]
    rows = []
    for point in points:
        tag = "_".join(f"{k}-{v}" for k, v in point.items()) or "default"
        runs = [run_attack(model_dir, task, attack, out / tag / f"seed{s}", reference=reference,
                           **{**options, **point, "seed": s}) for s in seeds]
        gains = [r["locked"]["gain"] for r in runs]
        row = {"point": point, "seeds": list(seeds), "gain_mean": statistics.mean(gains),
               "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0, "runs": [str(out / tag / f"seed{s}") for s in seeds]}
        if reference is not None:
            ref = [r["reference_run"]["gain"] for r in runs]
            row.update(reference_gain_mean=statistics.mean(ref),
                       reference_gain_std=statistics.stdev(ref) if len(ref) > 1 else 0.0)
        row["cost"] = {k: statistics.mean(r["locked"]["cost"][k] for r in runs)
                       for k in ("saved_activation_bytes_per_step", "step_time_s", "peak_rss_bytes")}
        rows.append(row)
    best = max(rows, key=lambda r: r["gain_mean"])
    summary = {"model": str(model_dir), "reference": str(reference) if reference else None, "task": task,
               "attack": attack, "options": options, "grid": grid, "points": rows, "best": best}
    if reference is not None:
        best_ref = max(rows, key=lambda r: r["reference_gain_mean"])
        summary["best_reference"] = best_ref
        summary["gain_ratio"] = (best["gain_mean"] / best_ref["reference_gain_mean"]
                                 if abs(best_ref["reference_gain_mean"]) > 1e-12 else None)
    write_json(out / "summary.json", summary)
    return summary
