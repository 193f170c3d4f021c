"""Benchmark (issue #14): the red team against DLR-locked SmolLM2-135M vs the unlocked original.

    make smollm2 && python bench/real_model.py --name r32-row-clip-b256 ...   # the original and a lock
    python bench/real_attacks.py [--locked runs/real/r32-row-clip-b256/locked] [--tasks prose tests]
                                 [--steps 60] [--workers 2] [--reanalyse]

Every attack runs until its held-out task score stops improving (scored every 10 steps, patience 3) or
the step budget, on batches of 2 × 128 tokens (a real 135 M-parameter model on a 2-core CPU: one step
is seconds), its score measured on 2,048 held-out tokens:

* on both: full fine-tuning at 3 learning rates, LoRA (r = 8) on attention and on every linear map (on
  the lock, the DLR factors included); on the lock the DLR-Nets frozen (attention, norms, embeddings train);
* then a second seed of the original's best full fine-tuning (the seed noise), on the first task the
  same run for 150 steps (where the original's curve flattens) and, at the lock's best full-fine-tuning
  rate, per-layer gradient checkpointing and reverse distillation (each
  DLR-Net distilled back into a dense SwiGLU on 8,192 captured tokens, 100 steps per layer, its cost
  included).

Each run records its score against cumulative cost (training seconds, FLOPs counted by torch), the bytes
autograd saves for one step and its own peak memory. The two workers (one thread each) run side by side,
so a run's clock includes the other's contention; the per-step ratios compare runs under the same load.
Two targets, both 90% of the best gain any attack reaches on the original: by *gain* (each curve from its
own release's score, issue #15's definition) and by *level* (from the original release's score: the
attacker wants a model as good as the fine-tuned original; a lock that destroyed the model must first
climb back). Runs are kept under runs/bench/real_attacks (finished ones are skipped: the bench resumes).
Writes bench/results/real_attacks.json and real_attacks.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from weightlock import schema
from weightlock.experiments.harness import RESULTS, attack_job, save
from weightlock.io import set_threads_per_process

ORIGINAL = Path("runs/smollm2")
RUNS = Path("runs/bench/real_attacks")
LRS = [1e-5, 3e-5, 1e-4]  # full fine-tuning of a pretrained LLM
LORA_LR, FREEZE_LR = 1e-3, 1e-4
BUDGET = dict(batch_size=2, block_size=128, train_tokens=65_536, eval_tokens=2048, score_every=10, patience=3,
              warmup_steps=5, progress=False)
Q = 0.9
LONG_STEPS = 150


def first_jobs(models: dict, tasks) -> list[tuple]:
    jobs = []
    for task in tasks:
        for key, model in models.items():
            jobs += [(key, model, task, f"full-lr{lr:g}", "full", {"lr": lr}) for lr in LRS]
            jobs += [(key, model, task, f"lora-{t}-lr{LORA_LR:g}", "lora", {"lr": LORA_LR, "targets": t})
                     for t in ("attention", "all-linear")]
            if key != "original":
                jobs.append((key, model, task, f"freeze-dlr-lr{FREEZE_LR:g}", "freeze",
                             {"lr": FREEZE_LR, "train": "non-mlp"}))
    return jobs


def best_gain(r: dict) -> float:
    """A run's best gain over its release (weightlock.eval.cost_to_target.best_gain of its curve)."""
    from weightlock.eval.cost_to_target import best_gain as curve_best_gain

    return curve_best_gain(r["cost_curve"])


def second_jobs(models: dict, tasks, done: list[dict]) -> list[tuple]:
    jobs = []
    for i, task in enumerate(tasks):
        for key, model in models.items():
            full = [r for r in done if r["task"] == task and r["model"] == key and r["attack"] == "full"
                    and not {"seed", "steps"} & set(r["options"])]
            best = max(full, key=best_gain)
            if key == "original":
                jobs.append((key, model, task, best["label"] + "-seed1", "full", {**best["options"], "seed": 1}))
                if i == 0:  # where the original's best curve flattens: the same run, LONG_STEPS steps
                    jobs.append((key, model, task, f"{best['label']}-{LONG_STEPS}steps", "full",
                                 {**best["options"], "steps": LONG_STEPS}))
            elif i == 0:
                lr = best["options"]["lr"]
                jobs.append((key, model, task, f"ckpt-layer-lr{lr:g}", "full", {"lr": lr, "checkpointing": "layer"}))
                jobs.append((key, model, task, f"reverse-distill-lr{lr:g}", "reverse-distill",
                             {"lr": lr, "distill_steps": 100, "distill_tokens": 8192}))
    return jobs


def analyse(rows: list[dict], tasks) -> list[dict]:
    from weightlock.eval.cost_to_target import AttackCurve, lock_cost_multiplier

    out = []
    for task in tasks:
        orig = [r for r in rows if r["task"] == task and r["model"] == "original"]
        ref = max((r for r in orig if r["attack"] == "full" and not {"seed", "steps"} & set(r["options"])),
                  key=best_gain)  # the best full fine-tune of the shared budget: the per-step baseline
        seed1 = next((r for r in orig if r["label"] == ref["label"] + "-seed1"), None)
        for key in sorted({r["model"] for r in rows if r["task"] == task} - {"original"}):
            lock = [r for r in rows if r["task"] == task and r["model"] == key]
            curves = {k: [AttackCurve(r["label"], r["cost_curve"], r["peak_delta_bytes"]) for r in side]
                      for k, side in (("original", orig), ("locked", lock))}
            entry = {"task": task, "defense": key, "q": Q,
                     "original_release_score": ref["cost_curve"][0]["score"],
                     "locked_release_score": lock[0]["cost_curve"][0]["score"],
                     "best_original_gain": max(best_gain(r) for r in orig),
                     "best_original_score": max(p["score"] for r in orig for p in r["cost_curve"]),
                     "best_gain": max(best_gain(r) for r in lock),
                     "best_locked_score": max(p["score"] for r in lock for p in r["cost_curve"]),
                     "seed_spread": None if seed1 is None else [best_gain(ref), best_gain(seed1)]}
            entry["target_gain"] = Q * entry["best_original_gain"]
            gains = entry["best_original_gain"] > 0  # else no target: the unlocked attacker gains nothing
            entry["gain_ratio_at_convergence"] = entry["best_gain"] / entry["best_original_gain"] if gains else None
            for target, level in (("gain", False), ("level", True)):
                for cost in ("seconds", "flops"):
                    counted = all(p.get(cost) is not None for r in orig + lock for p in r["cost_curve"])
                    m = lock_cost_multiplier(curves["locked"], curves["original"], Q, cost, level=level) \
                        if gains and counted else {"multiplier": None}
                    entry[f"{cost}_{target}"] = {k: m.get(k) for k in ("multiplier", "locked_min", "original_min",
                                                                      "locked", "original", "target_score")}
            entry["per_step"] = [{"model": r["model"], "label": r["label"], "step_time_s": r["step_time_s"],
                                  "step_time_ratio": r["step_time_s"] / ref["step_time_s"],
                                  "saved_activation_bytes": r["saved_activation_bytes"],
                                  "activation_ratio": r["saved_activation_bytes"] / ref["saved_activation_bytes"],
                                  "peak_delta_bytes": r["peak_delta_bytes"], "prepare_seconds": r["prepare_seconds"],
                                  "best_gain": best_gain(r),
                                  "best_score": max(p["score"] for p in r["cost_curve"]),
                                  "steps": r["cost_curve"][-1]["step"]}
                                 for r in orig + lock]
            out.append(entry)
    return out


def plot(rows: list[dict], analysis: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(analysis), 2, figsize=(12, 4.2 * len(analysis)), squeeze=False)
    for (ax, ax2), a in zip(axes, analysis):
        for r in rows:
            if r["task"] != a["task"] or r["model"] not in ("original", a["defense"]):
                continue
            c, lock = r["cost_curve"], r["model"] != "original"
            ax.plot([p["seconds"] for p in c], [p["score"] for p in c], "-" if lock else "--", lw=1.1,
                    label=("lock: " if lock else "original: ") + r["label"])
        if a["seconds_level"]["target_score"] is not None:
            ax.axhline(a["seconds_level"]["target_score"], color="k", ls=":", lw=0.8)
        ax.set_title(f"{a['task']} · {a['defense']}: score vs attacker's seconds (dotted: level target)", fontsize=9)
        ax.set_xlabel("cumulative training seconds")
        ax.set_ylabel("held-out task score (−loss)")
        ax.legend(fontsize=5, ncol=2)
        for s in a["per_step"]:
            ax2.scatter(s["saved_activation_bytes"] / 2**20, s["step_time_s"],
                        marker="o" if s["model"] == "original" else "s", s=18)
            ax2.annotate(("L " if s["model"] != "original" else "O ") + s["label"],
                         (s["saved_activation_bytes"] / 2**20, s["step_time_s"]), fontsize=5)
        ax2.set_xlabel("activation memory of one step (MiB, saved tensors)")
        ax2.set_ylabel("median step time (s)")
        ax2.set_title("memory–time of each attack (O: original, L: lock)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", default=str(ORIGINAL))
    ap.add_argument("--locked", default="runs/real/r32-row-clip-b256/locked")
    ap.add_argument("--runs", default=str(RUNS), help="where the runs are kept (and resumed from)")
    ap.add_argument("--out", default="real_attacks", help="results name: bench/results/NAME.json and .png")
    ap.add_argument("--name", default="dlr-32", help="the lock's key in the results")
    ap.add_argument("--tasks", nargs="+", default=["prose", "tests"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reanalyse", action="store_true", help="analyse the recorded JSON again, no runs")
    args = ap.parse_args()
    if args.reanalyse:
        d = json.loads((RESULTS / f"{args.out}.json").read_text())
        rows = d["runs"]
    else:
        for p in (Path(args.original), Path(args.locked)):
            if not (p / "config.json").exists():
                sys.exit(f"{p} not found: run `make smollm2` and bench/real_model.py first")
        BUDGET["steps"] = args.steps
        models = {"original": args.original, args.name: args.locked}
        job = partial(attack_job, Path(args.runs), BUDGET)
        with ProcessPoolExecutor(args.workers, initializer=set_threads_per_process, initargs=(args.workers,)) as pool:
            rows = list(pool.map(job, first_jobs(models, args.tasks)))
            rows += list(pool.map(job, second_jobs(models, args.tasks, rows)))
        d = {"command": "python bench/real_attacks.py " + " ".join(sys.argv[1:]), "models": models,
             "budget": BUDGET, "learning_rates": LRS, "runs": rows}
    analysis = analyse(rows, args.tasks)
    plot(rows, analysis, RESULTS / f"{args.out}.png")
    for a in analysis:
        print(f"{a['task']:6s} {a['defense']}: release {a['locked_release_score']:+.3f} vs original "
              f"{a['original_release_score']:+.3f}; best score {a['best_locked_score']:+.3f} vs "
              f"{a['best_original_score']:+.3f}; gain ratio {a['gain_ratio_at_convergence']}; time × (gain) "
              f"{a['seconds_gain']['multiplier']}, (level) {a['seconds_level']['multiplier']}")
        for s in a["per_step"]:
            print(f"   {s['model']:8s} {s['label']:28s} step {s['step_time_s']:6.2f} s ({s['step_time_ratio']:.2f}×) "
                  f"activations {s['saved_activation_bytes'] / 2**20:7.0f} MiB ({s['activation_ratio']:.2f}×)")
    d.pop("kind", None), d.pop("schema_version", None), d.pop("machine", None)
    save(args.out, {**d, "analysis": analysis}, kind=schema.REAL_ATTACKS)


if __name__ == "__main__":
    main()
