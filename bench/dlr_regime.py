"""Benchmark (issue #15): the lock's regime — rank sweep of DLR-Lock on the `small` model.

    python bench/cost_to_target.py      # runs every attack, the sweep's included, and times them
    python bench/dlr_regime.py          # this: reads bench/results/cost_to_target.json and the locks

For rank ∈ {8, 16, 32, 64} (depth matched to the MLP's parameter count) and rank 32 with per-block
RMSNorm (``--norm``: even frozen-DLR backprop must then store d per block), each locked with the
default settings (runs/bench/locked-r{R}[-norm], built by bench/cost_to_target.py when missing):

* fidelity and lock time: the lock's own report (held-out perplexity ratio, per-layer error, seconds of
  this build, which shared the machine) and, where bench/results/dlr_fidelity.json locked the same rank
  with the same settings, that quieter measurement;
* the paper's regime: the per-MLP memory multiplier (saved bytes of one DLR-Net over one MLP in full
  fine-tuning, `weightlock plan`'s exact memory model) and the whole model's activation multiplier;
* the attacker's memory and time per step: saved activation bytes and quiet median step time of full
  fine-tuning and of the frozen-DLR attack, against the original's full fine-tuning and frozen MLPs
  (bench/cost_to_target.py's quiet timing pass: every configuration alone, repeated, alternating order);
* the attack to convergence on prose: full fine-tuning at the original's best rate and the frozen-DLR
  attack, gain ratio at convergence (best gain ÷ the best gain of any attack on the original) and the
  lock cost multiplier in quiet seconds and FLOPs against every attack on the original.

Writes bench/results/dlr_regime.json and dlr_regime.png.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from weightlock import schema
from weightlock.experiments.harness import RESULTS, max_gain, save, timing_key
from weightlock.io import read_json

TASK = "prose"  # the task bench/cost_to_target.py attacks the rank sweep's extra locks on


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--norm-rank", type=int, default=32)
    args = ap.parse_args()
    path = RESULTS / "cost_to_target.json"
    if not path.exists():
        sys.exit(f"{path} not found: run bench/cost_to_target.py first")
    d = read_json(path)
    orig = [r for r in d["runs"] if r["model"] == "original" and r["task"] == TASK]
    timings = {(t["model"], t["attack"], tuple(sorted(t["options"].items()))): t for t in d["quiet_timings"]}
    lr = max((r for r in orig if r["attack"] == "full" and "seed" not in r["options"]
              and "checkpointing" not in r["options"]), key=max_gain)["options"]["lr"]
    variants = [f"dlr-{r}" for r in args.ranks] + ([f"dlr-{args.norm_rank}-norm"] if args.norm_rank else [])
    missing = [v for v in variants if v not in d["models"]]
    if missing:
        sys.exit(f"cost_to_target.json has no runs of {', '.join(missing)}: run bench/cost_to_target.py with "
                 "--ranks/--regime-ranks/--regime-norm-rank covering them")
    quiet = read_json(RESULTS / "dlr_fidelity.json") if (RESULTS / "dlr_fidelity.json").exists() else None
    results = [summarize(v, d["models"][v], d["runs"], orig, timings, lr, quiet, d["q"]) for v in variants]
    for r in results:
        print(f"{r['variant']:12s} depth {r['depth']:3d} ppl×{r['ppl_ratio']:.4f} lock {r['lock_seconds']:5.0f} s "
              f"MLP mem×{r['mlp_memory_multiplier'] or float('nan'):.1f} act×{r['full']['activation_ratio']:.2f} "
              f"step×{r['full']['step_time_ratio']:.2f} gain ratio {r['full']['gain_ratio']:.2f} "
              f"cost× {r['full']['multiplier_seconds']:.2f} (FLOPs {r['full']['multiplier_flops']:.2f})", flush=True)
    plot(results, RESULTS / "dlr_regime.png")
    save("dlr_regime", {"command": "python bench/dlr_regime.py " + " ".join(sys.argv[1:]), "task": TASK,
                        "source": str(path), "learning_rate_full": lr, "budget": d["budget"], "q": d["q"],
                        "results": results}, kind=schema.LOCK_REGIME)


def summarize(v: str, model_dir: str, runs: list[dict], orig: list[dict], timings: dict, lr: float,
              quiet: dict | None, q: float) -> dict:
    from weightlock.eval.cost_to_target import AttackCurve, lock_cost_multiplier
    from weightlock.eval.plan import plan

    rep = read_json(Path(model_dir) / "lock_report.json")
    lc = rep["lock_config"]
    analytic = None if lc["norm"] else plan(model_dir, rank=lc["rank"], tokens_per_step=8 * 128, seq_len=128,
                                            dtype="float32", with_time=False, scenarios=["full"])
    same = [q for q in (quiet or {}).get("ranks", []) if q["rank"] == lc["rank"] and not lc["norm"]
            and {k: v for k, v in quiet["lock_config"].items() if k not in ("rank", "progress")}
            == {k: v for k, v in lc.items() if k in quiet["lock_config"] and k not in ("rank", "progress")}]
    curves_orig = [AttackCurve(r["label"], r["cost_curve"], r["peak_delta_bytes"]) for r in orig]
    best_orig = max(max_gain(r) for r in orig)
    out = {"variant": v, "rank": lc["rank"], "norm": lc["norm"], "model": model_dir,
           "depth": read_json(Path(model_dir) / "config.json")["weightlock_dlr"]["layers"][0]["depth"],
           "ppl_ratio": rep["ppl_ratio"], "layer_rel_error": [layer["rel_error"] for layer in rep["layers"]],
           "lock_seconds": rep["seconds"], "lock_seconds_dlr_fidelity": same[0]["lock_seconds"] if same else None,
           "mlp_memory_multiplier": analytic["mlp_memory_multiplier"] if analytic else None,
           "model_activation_multiplier_predicted": analytic["rows"][1]["activation_vs_original"] if analytic else None}
    for label, attack, lr_label in (("full", "full", f"full-lr{lr:g}"), ("freeze", "freeze", "freeze-dlr-lr0.003")):
        r = next(x for x in runs if x["model"] == v and x["task"] == TASK and x["label"] == lr_label)
        o_key = ("original", attack, tuple(sorted({k: val for k, val in r["options"].items()
                                                   if k not in ("lr", "seed")}.items())))
        mine, theirs = timings[timing_key(r)], timings[o_key]
        entry = {"label": r["label"], "gain": max_gain(r), "gain_ratio": max_gain(r) / best_orig,
                 "saved_activation_bytes": mine["saved_activation_bytes"],
                 "activation_ratio": mine["saved_activation_bytes"] / theirs["saved_activation_bytes"],
                 "step_time_s": mine["step_time_s"], "step_time_ratio": mine["step_time_s"] / theirs["step_time_s"],
                 "peak_delta_bytes": r["peak_delta_bytes"], "stopped_early": r["stopped_early"],
                 "steps": r["cost_curve"][-1]["step"]}
        for cost in ("seconds", "flops"):
            m = lock_cost_multiplier([AttackCurve(r["label"], r["cost_curve"], r["peak_delta_bytes"])], curves_orig,
                                     q, cost)
            entry[f"multiplier_{cost}"] = m["multiplier"]
        out[label] = entry
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [r for r in results if not r["norm"]]
    ranks = [r["rank"] for r in plain]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    ax.plot(ranks, [r["ppl_ratio"] for r in plain], "o-", label="perplexity ratio")
    ax.set_ylabel("locked / original perplexity")
    ax2 = ax.twinx()
    ax2.plot(ranks, [r["lock_seconds"] for r in plain], "s--", color="C1", label="lock time (s)")
    ax2.set_ylabel("lock seconds")
    ax.set_title("fidelity and lock time")
    ax = axes[1]
    ax.plot(ranks, [r["mlp_memory_multiplier"] for r in plain], "o-", label="per-MLP (plan model)")
    ax.plot(ranks, [r["full"]["activation_ratio"] for r in plain], "s-", label="whole model, full FT (measured)")
    ax.plot(ranks, [r["freeze"]["activation_ratio"] for r in plain], "^-", label="whole model, frozen DLR")
    ax.axhline(10, color="k", ls=":", lw=0.8)
    ax.set_title("attacker activation memory ÷ original")
    ax = axes[2]
    ax.plot(ranks, [r["full"]["step_time_ratio"] for r in plain], "o-", label="full FT")
    ax.plot(ranks, [r["freeze"]["step_time_ratio"] for r in plain], "^-", label="frozen DLR")
    ax.set_title("attacker time per step ÷ original (quiet)")
    ax = axes[3]
    for k, style in (("multiplier_seconds", "o-"), ("multiplier_flops", "s-")):
        ax.plot(ranks, [r["full"][k] if math.isfinite(r["full"][k]) else float("nan") for r in plain], style,
                label=f"full FT cost multiplier ({k.split('_')[1]})")
    ax.plot(ranks, [r["full"]["gain_ratio"] for r in plain], "^--", label="gain ratio at convergence")
    ax.axhline(1, color="k", ls=":", lw=0.8)
    ax.set_title(f"attack to convergence ({TASK})")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("DLR rank r (depth matched)")
        ax.legend(fontsize=7)
    norm = [r for r in results if r["norm"]]
    if norm:
        n = norm[0]
        fig.suptitle(f"rank {n['rank']} + per-block norm: ppl×{n['ppl_ratio']:.4f}, activation "
                     f"×{n['full']['activation_ratio']:.2f} (frozen ×{n['freeze']['activation_ratio']:.2f}), "
                     f"step ×{n['full']['step_time_ratio']:.2f}, "
                     f"cost multiplier ×{n['full']['multiplier_seconds']:.2f}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
