"""Benchmark: every fine-tuning attack against the DLR-locked `small` model vs the unlocked original.

    python bench/attacks.py [--base runs/bench/base-small] [--locked runs/bench/locked-r32] [--workers 2]

(`bench/base_model.py` and `bench/dlr_fidelity.py` produce the two directories.) For each attack
(full fine-tuning, LoRA on attention, LoRA on all linear layers incl. the DLR factors, freezing the
MLPs/DLR-Nets, reverse distillation), each task (prose adaptation of the code-pretrained model, scored
by held-out perplexity; in-context key–value recall, scored by exact match), each learning rate of a
small sweep and 3 seeds, the attack runs on the locked model and on the original (the reference).
The attacker's best learning rate is reported for each; gain ratio = locked best gain / reference
best gain. Runs are kept under runs/bench/attacks (re-running skips finished ones). Then it runs
bench/frontier.py (the memory–time frontier). Writes bench/results/attacks.json and attacks.png.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from weightlock import schema
from weightlock.experiments.harness import RESULTS, save
from weightlock.io import set_threads_per_process

STEPS = 40
ATTACKS = {  # label: (attack, options, learning rates)
    "full": ("full", {}, [1e-3, 3e-3]),
    "lora-attention": ("lora", {"targets": "attention"}, [3e-3, 1e-2]),
    "lora-all-linear": ("lora", {"targets": "all-linear"}, [3e-3, 1e-2]),
    "freeze-mlp": ("freeze", {"train": "non-mlp"}, [1e-3, 3e-3]),
    "reverse-distill": ("reverse-distill", {"distill_steps": 300}, [1e-3, 3e-3]),
}
TASKS = ("prose", "recall")
SEEDS = (0, 1, 2)


def job(args) -> dict:
    label, task, base, locked, out = args
    from weightlock.attacks import run_suite

    name, options, lrs = ATTACKS[label]
    return run_suite(locked, task, name, Path(out) / task / label, reference=base, seeds=SEEDS,
                     grid={"lr": lrs}, steps=STEPS, batch_size=8, score_every=10, **options)


def summarize(label: str, task: str, s: dict) -> dict:
    best, best_ref = s["best"], s["best_reference"]
    runs = [p for p in best["runs"]]
    from weightlock.io import read_json
    from weightlock.schema import target_run

    # the attacked model's run as "locked" (attack_run schema 2 records store it under "target")
    locked_runs = [{**d, "locked": target_run(d, f)} for f in (Path(r) / "result.json" for r in runs)
                   for d in [read_json(f)]]
    ref_runs = [read_json(Path(r) / "result.json") for r in best_ref["runs"]]
    cost = lambda rs, side, k: statistics.median(r[side]["cost"][k] for r in rs)  # noqa: E731
    row = {"attack": label, "task": task, "best_lr_locked": best["point"]["lr"],
           "best_lr_reference": best_ref["point"]["lr"],
           "gain_locked_mean": best["gain_mean"], "gain_locked_std": best["gain_std"],
           "gain_reference_mean": best_ref["reference_gain_mean"], "gain_reference_std": best_ref["reference_gain_std"],
           "gain_ratio": s["gain_ratio"],
           "score_before_locked": locked_runs[0]["locked"]["before"]["score"],
           "score_before_reference": ref_runs[0]["reference_run"]["before"]["score"],
           "capability_ppl_after_locked": statistics.mean(r["locked"]["capability_ppl_after"] for r in locked_runs),
           "capability_ppl_after_reference": statistics.mean(r["reference_run"]["capability_ppl_after"]
                                                             for r in ref_runs),
           "points": [{k: p[k] for k in ("point", "gain_mean", "gain_std", "reference_gain_mean", "reference_gain_std")}
                      for p in s["points"]]}
    for k in ("saved_activation_bytes_per_step", "step_time_s", "forward_time_s", "backward_time_s",
              "optimizer_time_s", "flops_estimate", "peak_rss_bytes"):
        row[f"{k}_locked"] = cost(locked_runs, "locked", k)
        row[f"{k}_reference"] = cost(ref_runs, "reference_run", k)
    row["memory_ratio"] = (row["saved_activation_bytes_per_step_locked"]
                           / max(1, row["saved_activation_bytes_per_step_reference"]))
    row["step_time_ratio"] = row["step_time_s_locked"] / row["step_time_s_reference"]
    row["trainable_parameters_locked"] = locked_runs[0]["locked"]["trainable_parameters"]
    row["trainable_parameters_reference"] = ref_runs[0]["reference_run"]["trainable_parameters"]
    if "reverse_distill" in locked_runs[0]["locked"]:
        rd = [r["locked"]["reverse_distill"] for r in locked_runs]
        row["reverse_distill_seconds"] = statistics.median(x["seconds"] for x in rd)
        row["reverse_distill_layer_rel_error"] = [l["rel_error"] for l in rd[0]["layer_rel_error"]]
    row["loss_curves"] = {"locked": locked_runs[0]["locked"]["loss_curve"],
                          "reference": ref_runs[0]["reference_run"]["loss_curve"]}
    row["score_curves"] = {"locked": [r["locked"]["score_curve"] for r in locked_runs],
                           "reference": [r["reference_run"]["score_curve"] for r in ref_runs]}
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4))
    for ax, task in zip(axes, TASKS):
        rs = [r for r in rows if r["task"] == task]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["gain_reference_mean"] for r in rs], 0.4,
               yerr=[r["gain_reference_std"] for r in rs], label="original (reference)")
        ax.bar([x + 0.2 for x in xs], [r["gain_locked_mean"] for r in rs], 0.4,
               yerr=[r["gain_locked_std"] for r in rs], label="DLR-locked")
        ax.set_xticks(list(xs), [r["attack"] for r in rs], rotation=20)
        ax.set_title(f"{task}: attacker gain at its best lr ({len(SEEDS)} seeds)")
        ax.set_ylabel("gain (−Δ loss)" if task == "prose" else "gain (Δ exact match)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    ap.add_argument("--out", default="runs/bench/attacks")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-frontier", action="store_true")
    args = ap.parse_args()
    for d in (args.base, args.locked):
        if not Path(d).is_dir():
            sys.exit(f"{d} not found: run bench/base_model.py and bench/dlr_fidelity.py first")
    jobs = [(label, task, args.base, args.locked, args.out) for task in TASKS for label in ATTACKS]
    with ProcessPoolExecutor(args.workers, initializer=set_threads_per_process,
                             initargs=(args.workers,)) as pool:
        summaries = list(pool.map(job, jobs))
    rows = [summarize(j[0], j[1], s) for j, s in zip(jobs, summaries)]
    for r in rows:
        print(f"{r['task']:7s} {r['attack']:16s} gain locked {r['gain_locked_mean']:+.3f}±{r['gain_locked_std']:.3f} "
              f"reference {r['gain_reference_mean']:+.3f}±{r['gain_reference_std']:.3f} ratio {r['gain_ratio']} "
              f"memory×{r['memory_ratio']:.2f} time×{r['step_time_ratio']:.2f}", flush=True)
    plot(rows, RESULTS / "attacks.png")
    save("attacks", {"command": "python bench/attacks.py", "steps": STEPS, "batch": [8, 128], "seeds": list(SEEDS),
                     "base": args.base, "locked": args.locked, "results": rows}, kind=schema.ATTACK_CURVES)
    if not args.no_frontier:
        subprocess.run([sys.executable, str(Path(__file__).with_name("frontier.py")), "--base", args.base,
                        "--locked", args.locked], check=True)


if __name__ == "__main__":
    main()
