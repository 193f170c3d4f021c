"""Benchmark (issue #35): the red team on faithful DLR-locked SmolLM2-135M releases vs the unlocked original.

    make smollm2
    weightlock lock --model runs/smollm2 --block gated --init mlp --readout 4096 --steps 0 \\
        --calib-tokens 16384 --out runs/locks/gated-s4096             # the readable faithful release
    OMP_NUM_THREADS=1 python bench/real_attacks.py [--release gated-s4096=runs/locks/gated-s4096]
        [--tasks prose addition-loglik] [--steps 40] [--workers 2] [--reanalyse]

The question an owner asks: what does an attacker who knows everything pay, in time, FLOPs and memory, to
fine-tune this release as well as the unlocked original? Only releases that are faithful at the start (the
manifest's ppl ratio ≤ 1.05) are attacked. Sized for ~1.5–3 hours of background compute on 2 cores:

* tasks: a domain shift scored by held-out loss (``prose``) and a skill scored by its answers' likelihood
  (``addition-loglik``), 128-token blocks, batch 4, each run until its score stops improving (scored every
  10 steps, patience 3) or the step cap (``--steps``, 40 by default: 20,480 training tokens);
* the original: full fine-tuning at 2 learning rates, LoRA (r = 8) on every linear map;
* each release: the same three, the DLR-Nets frozen (everything else trains), gradient checkpointing per
  DLR-Net (at the release's best full fine-tuning rate) and the **read-back** (every DLR-Net laid out as the
  dense MLP its blocks spell, then full fine-tuning at the original's two rates; the read-back's seconds are
  the attack's); where a release's read-back is not faithful (its ppl ratio more than 0.01 above the lock's),
  also **reverse distillation + healing** from the read-back (300 steps a layer, its seconds counted);
* a second seed of the best attack on each side (by best gain), the seed noise.

Each run records its score against cumulative cost (training seconds, FLOPs counted by torch, tokens), the
counted training memory (parameters + gradients + optimizer state + saved activations), its step time and
the bytes autograd saves for one step. The workers (one thread each) run side by side: a run's clock
includes the other's contention. The target is 90% of the best gain any attack reaches on the original,
counted by *gain* (from each release's own score) and by *level* (from the original release's score); the
lock cost multiplier is the cheapest attack to the target on the release over the cheapest on the original,
with every attack and within the unlocked full fine-tune's training memory. Runs are kept under
runs/bench/real_attacks (finished runs are skipped: the bench resumes after a kill, losing only the runs in
flight). Writes bench/results/real_attacks_<release>.json and .png per release.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from weightlock import schema
from weightlock.experiments.harness import RESULTS, attack_job, save
from weightlock.experiments.harness import max_gain as best_gain
from weightlock.io import set_threads_per_process

ORIGINAL = Path("runs/smollm2")
RUNS = Path("runs/bench/real_attacks")
RELEASES = {"gated-s4096": "runs/locks/gated-s4096"}
TASKS = ["prose", "addition-loglik"]
LRS = [3e-5, 1e-4]  # full fine-tuning of a pretrained LLM (the earlier sweep's best two on SmolLM2)
LORA_LR, FREEZE_LR = 1e-3, 1e-4
BUDGET = dict(batch_size=4, block_size=128, train_tokens=65_536, eval_tokens=2048, score_every=10, patience=3,
              warmup_steps=5, progress=False)
Q = 0.9
FAITHFUL = 1.05  # a release is attacked only when its ppl ratio at the start is at most this
READBACK_SLACK = 0.01  # a read-back within this of the lock's ppl ratio needs no reverse distillation
HEAL_STEPS = 300


def release_fidelity(path: str | Path) -> dict:
    """A release's recorded fidelity (its manifest's ``fidelity``: ppl ratio, read-back ppl ratio, by data)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.exists():
        sys.exit(f"{path}: no manifest.json (not a weightlock release)")
    fid = json.loads(manifest.read_text()).get("fidelity") or {}
    if fid.get("ppl_ratio") is None:
        sys.exit(f"{path}: the manifest records no fidelity (ppl_ratio)")
    return fid


def needs_healing(fid: dict) -> bool:
    rb = fid.get("readback_ppl_ratio")
    return rb is None or rb > fid["ppl_ratio"] + READBACK_SLACK


def first_jobs(key: str, model: str, tasks, lock: bool) -> list[tuple]:
    jobs = []
    for task in tasks:
        jobs += [(key, model, task, f"full-lr{lr:g}", "full", {"lr": lr}) for lr in LRS]
        jobs.append((key, model, task, f"lora-all-linear-lr{LORA_LR:g}", "lora",
                     {"lr": LORA_LR, "targets": "all-linear"}))
        if lock:
            jobs.append((key, model, task, f"freeze-dlr-lr{FREEZE_LR:g}", "freeze",
                         {"lr": FREEZE_LR, "train": "non-mlp"}))
    return jobs


def _plain(r: dict) -> bool:
    return "seed" not in r["options"]


def second_jobs(key: str, model: str, tasks, done: list[dict], heal: bool) -> list[tuple]:
    """On a release: checkpointing per DLR-Net at its best full fine-tuning rate; the read-back fine-tuned at
    both of the original's rates (it is a dense model: the rates that suit the original suit it, not the
    ones that suit the release), and reverse distillation + healing where the read-back is not faithful, at
    the original's best rate."""
    jobs = []
    for task in tasks:
        full = [r for r in done if r["task"] == task and r["model"] == key and r["attack"] == "full" and _plain(r)]
        lr = max(full, key=best_gain)["options"]["lr"]
        jobs.append((key, model, task, f"ckpt-dlr-lr{lr:g}", "full", {"lr": lr, "checkpointing": "dlr"}))
        jobs += [(key, model, task, f"readback-lr{rate:g}", "reverse-distill",
                  {"lr": rate, "init": "readback", "distill_steps": 0}) for rate in LRS]
        if heal:
            orig = [r for r in done if r["task"] == task and r["model"] == "original" and r["attack"] == "full"
                    and _plain(r)]
            rate = max(orig, key=best_gain)["options"]["lr"]
            jobs.append((key, model, task, f"reverse-heal-lr{rate:g}", "reverse-distill",
                         {"lr": rate, "init": "readback", "distill_steps": HEAL_STEPS, "distill_tokens": 16_384}))
    return jobs


def seed_jobs(key: str, model: str, tasks, done: list[dict]) -> list[tuple]:
    """The second seed of the side's best attack (by best gain) on each task."""
    jobs = []
    for task in tasks:
        side = [r for r in done if r["task"] == task and r["model"] == key and _plain(r)]
        best = max(side, key=best_gain)
        jobs.append((key, model, task, best["label"] + "-seed1", best["attack"], {**best["options"], "seed": 1}))
    return jobs


def _memory(r: dict) -> int | None:
    return (r.get("training_memory") or {}).get("counted")


def analyse(rows: list[dict], tasks, key: str, fid: dict) -> list[dict]:
    """Per task: the release's and the original's scores, the target, the cheapest attack to it on each side
    and the lock cost multipliers (seconds and FLOPs; by gain and by level; with every attack and within the
    unlocked full fine-tune's training memory), the seed spread on each side, and every run's per-step costs."""
    from weightlock.eval.cost_to_target import AttackCurve, lock_cost_multiplier

    out = []
    for task in tasks:
        orig = [r for r in rows if r["task"] == task and r["model"] == "original"]
        lock = [r for r in rows if r["task"] == task and r["model"] == key]
        if not orig or not lock:
            continue
        ref = max((r for r in orig if r["attack"] == "full" and _plain(r)), key=best_gain)  # per-step baseline
        curves = {side: [AttackCurve(r["label"], r["cost_curve"], r["peak_delta_bytes"], memory_bytes=_memory(r))
                         for r in runs] for side, runs in (("original", orig), ("locked", lock))}
        entry = {"task": task, "release": key, "q": Q,
                 "release_fidelity": {k: fid.get(k) for k in ("ppl_ratio", "readback_ppl_ratio")},
                 "original_release_score": ref["cost_curve"][0]["score"],
                 "locked_release_score": lock[0]["cost_curve"][0]["score"],
                 "best_original_gain": max(best_gain(r) for r in orig),
                 "best_original_score": max(p["score"] for r in orig for p in r["cost_curve"]),
                 "best_gain": max(best_gain(r) for r in lock),
                 "best_locked_score": max(p["score"] for r in lock for p in r["cost_curve"]),
                 "memory_budget_bytes": _memory(ref),
                 "seed_spread": {side: [best_gain(r) for r in runs
                                        if r["label"].removesuffix("-seed1") == s["label"].removesuffix("-seed1")]
                                 for side, runs in (("original", orig), ("locked", lock))
                                 for s in runs if s["label"].endswith("-seed1")}}
        entry["target_gain"] = Q * entry["best_original_gain"]
        gains = entry["best_original_gain"] > 0  # else no target: the unlocked attacker gains nothing
        entry["gain_ratio_at_convergence"] = entry["best_gain"] / entry["best_original_gain"] if gains else None
        for target, level in (("gain", False), ("level", True)):
            for cost in ("seconds", "flops", "tokens"):
                for within, budget in (("", None), ("_within_memory", entry["memory_budget_bytes"])):
                    if within and budget is None:
                        continue
                    m = lock_cost_multiplier(curves["locked"], curves["original"], Q, cost, budget, level) \
                        if gains else {"multiplier": None}
                    entry[f"{cost}_{target}{within}"] = {k: m.get(k) for k in (
                        "multiplier", "locked_min", "original_min", "locked", "original", "target_score")}
        entry["parity"] = parity(orig, lock)
        entry["readback"] = readback_totals(lock, fid)
        entry["verdict"] = verdict(entry)
        entry["per_step"] = [{"model": r["model"], "label": r["label"], "attack": r["attack"],
                              "step_time_s": r["step_time_s"], "step_time_ratio": r["step_time_s"] / ref["step_time_s"],
                              "saved_activation_bytes": r["saved_activation_bytes"],
                              "activation_ratio": r["saved_activation_bytes"] / ref["saved_activation_bytes"],
                              "training_memory_bytes": _memory(r),
                              "memory_ratio": (_memory(r) / _memory(ref)) if _memory(r) and _memory(ref) else None,
                              "peak_delta_bytes": r["peak_delta_bytes"], "prepare_seconds": r["prepare_seconds"],
                              "best_gain": best_gain(r), "best_score": max(p["score"] for p in r["cost_curve"]),
                              "steps": r["cost_curve"][-1]["step"], "seconds": r["cost_curve"][-1]["seconds"]}
                             for r in orig + lock]
        out.append(entry)
    return out


def parity(orig: list[dict], lock: list[dict]) -> dict:
    """The release's best gain against the seed noise of the original's best attack: that attack's gains over
    its seeds (``original_seeds``) and whether the release's best gain is within their spread (at least the
    lowest seed's gain minus the spread) — the 90% target is a single number; this says when missing or
    meeting it is noise."""
    best_o = max((r for r in orig if _plain(r)), key=best_gain)
    seeds = sorted(best_gain(r) for r in orig if r["label"].removesuffix("-seed1") == best_o["label"])
    best_l = max(lock, key=lambda r: -math.inf if math.isnan(best_gain(r)) else best_gain(r))
    g = best_gain(best_l)
    return {"original_attack": best_o["label"], "original_seeds": seeds, "release_attack": best_l["label"],
            "release_gain": g, "within_seed_spread": bool(g >= seeds[0] - (seeds[-1] - seeds[0]))}


def readback_totals(lock: list[dict], fid: dict) -> dict:
    """What undoing the release costs before any fine-tuning: the read-back's seconds and FLOPs (the first
    point of its curve after step 0), and reverse distillation's (the healing run's) where the read-back was
    not faithful; otherwise none is needed, and the record says why."""
    def prep(r):
        p = next((p for p in r["cost_curve"][1:] if p["step"] == 0), None)
        return {"label": r["label"], "seconds": r["prepare_seconds"], "flops": p["flops"] if p else None,
                "score": p["score"] if p else None}

    rb = [prep(r) for r in lock if r["attack"] == "reverse-distill" and r["options"].get("distill_steps") == 0]
    heal = [prep(r) for r in lock if r["attack"] == "reverse-distill" and r["options"].get("distill_steps")]
    out = {"readback_ppl_ratio": fid.get("readback_ppl_ratio"), "lock_ppl_ratio": fid.get("ppl_ratio"),
           "readback_runs": rb, "reverse_distillation_runs": heal}
    if not heal and not needs_healing(fid):
        out["reverse_distillation"] = (f"not needed: the read-back is at ppl ×{fid['readback_ppl_ratio']:.4f}, within "
                                       f"{READBACK_SLACK} of the lock's ×{fid['ppl_ratio']:.4f} (0 distillation steps)")
    return out


def _cheapest(table: dict) -> tuple[str, float] | None:
    hits = [(k, v) for k, v in table.items() if isinstance(v, float)]
    return min(hits, key=lambda kv: kv[1]) if hits else None


def verdict(e: dict) -> str:
    """The plain sentence for one task: the cheapest attack to 90% of the original's best gain on the release,
    its seconds multiplier (any memory, and within the unlocked full fine-tune's memory) and FLOPs multiplier."""
    if e["gain_ratio_at_convergence"] is None:
        return f"{e['task']}: the unlocked attacker gains nothing here; no target"
    parts = []
    for target in ("gain", "level"):
        s = e[f"seconds_{target}"]
        lk, og = _cheapest(s["locked"]), _cheapest(s["original"])
        if lk is None:
            parts.append(f"by {target}: no attack on the release reaches the target within the budget "
                         f"(best {e['gain_ratio_at_convergence']:.2f} of the original's best gain)")
            continue
        line = (f"by {target}: cheapest is {lk[0]} ({lk[1]:.0f} s vs the original's {og[0]} {og[1]:.0f} s: "
                f"×{s['multiplier']:.2f} time, ×{e[f'flops_{target}']['multiplier']:.2f} FLOPs")
        mem = e.get(f"seconds_{target}_within_memory")
        if mem is not None:
            m = mem["multiplier"]
            line += ("; within the original's training memory " + ("none reaches it" if m is None or math.isinf(m)
                                                                   else f"×{m:.2f}"))
        parts.append(line + ")")
    p = e.get("parity")
    if p:
        parts.append(f"the release's best gain {p['release_gain']:+.3f} ({p['release_attack']}) is "
                     + ("within" if p["within_seed_spread"] else "below")
                     + f" the seed spread of the original's best ({p['original_attack']}: "
                     + " / ".join(f"{g:+.3f}" for g in p["original_seeds"]) + ")")
    rb = e.get("readback") or {}
    if rb.get("readback_runs"):
        secs = sorted(r["seconds"] for r in rb["readback_runs"])
        parts.append(f"laying the blocks out (the read-back) took {secs[len(secs) // 2]:.0f} s; reverse distillation "
                     + (rb.get("reverse_distillation") or "then healed it (its runs above)"))
    return f"{e['task']}: " + "; ".join(parts)


def plot(rows: list[dict], analysis: list[dict], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(analysis), 2, figsize=(12, 4.2 * len(analysis)), squeeze=False)
    for (ax, ax2), a in zip(axes, analysis):
        for r in rows:
            if r["task"] != a["task"] or r["model"] not in ("original", key):
                continue
            c, lock = r["cost_curve"], r["model"] != "original"
            ax.plot([p["seconds"] for p in c], [p["score"] for p in c], "-" if lock else "--", lw=1.1,
                    label=("release: " if lock else "original: ") + r["label"])
        if a["seconds_level"]["target_score"] is not None:
            ax.axhline(a["seconds_level"]["target_score"], color="k", ls=":", lw=0.8)
        ax.set_title(f"{a['task']} · {key}: score vs attacker's seconds (dotted: 90% of the original's best)",
                     fontsize=9)
        ax.set_xlabel("cumulative seconds (training + preparation)")
        ax.set_ylabel("held-out task score (−loss)")
        ax.legend(fontsize=5, ncol=2)
        for s in a["per_step"]:
            mem = s["training_memory_bytes"] or 0
            ax2.scatter(mem / 2**30, s["step_time_s"], marker="o" if s["model"] == "original" else "s", s=18)
            ax2.annotate(("R " if s["model"] != "original" else "O ") + s["label"], (mem / 2**30, s["step_time_s"]),
                         fontsize=5)
        ax2.set_xlabel("counted training memory (GiB)")
        ax2.set_ylabel("median step time (s)")
        ax2.set_title("memory–time of each attack (O: original, R: release)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", default=str(ORIGINAL))
    ap.add_argument("--release", action="append", metavar="NAME=DIR",
                    help="a faithful release to attack (repeatable; default gated-s4096=runs/locks/gated-s4096)")
    ap.add_argument("--runs", default=str(RUNS), help="where the runs are kept (and resumed from)")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--steps", type=int, default=40, help="the step cap of every run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reanalyse", action="store_true", help="analyse the recorded JSON again, no runs")
    args = ap.parse_args()
    releases = dict(r.split("=", 1) for r in args.release) if args.release else dict(RELEASES)
    if args.reanalyse:
        for key in releases:
            d = json.loads((RESULTS / f"real_attacks_{key}.json").read_text())
            finish(d, d["runs"], key, d["tasks"])
        return
    if not (Path(args.original) / "config.json").exists():
        sys.exit(f"{args.original} not found: run `make smollm2` first")
    fids = {}
    for key, path in releases.items():
        fids[key] = release_fidelity(path)
        if fids[key]["ppl_ratio"] > FAITHFUL:
            sys.exit(f"{path}: ppl ratio {fids[key]['ppl_ratio']:.4f} > {FAITHFUL}: not a faithful release")
    budget = {**BUDGET, "steps": args.steps}
    t0 = time.time()
    job = partial(attack_job, Path(args.runs), budget)
    with ProcessPoolExecutor(args.workers, initializer=set_threads_per_process, initargs=(args.workers,)) as pool:
        jobs = first_jobs("original", args.original, args.tasks, lock=False)
        for key, path in releases.items():
            jobs += first_jobs(key, path, args.tasks, lock=True)
        rows = list(pool.map(job, jobs))
        jobs = seed_jobs("original", args.original, args.tasks, rows)
        for key, path in releases.items():
            jobs += second_jobs(key, path, args.tasks, rows, needs_healing(fids[key]))
        rows += list(pool.map(job, jobs))
        jobs = [j for key, path in releases.items() for j in seed_jobs(key, path, args.tasks, rows)]
        rows += list(pool.map(job, jobs))
    for key, path in releases.items():
        d = {"command": "OMP_NUM_THREADS=1 python bench/real_attacks.py " + " ".join(sys.argv[1:]),
             "model_name": "SmolLM2-135M", "models": {"original": args.original, key: path},
             "release_fidelity": fids[key],
             "budget": budget, "tasks": args.tasks, "learning_rates": LRS, "wall_seconds": time.time() - t0,
             "runs": [r for r in rows if r["model"] in ("original", key)]}
        finish(d, d["runs"], key, args.tasks)


def finish(d: dict, rows: list[dict], key: str, tasks) -> None:
    analysis = analyse(rows, tasks, key, d["release_fidelity"])
    plot(rows, analysis, key, RESULTS / f"real_attacks_{key}.png")
    for a in analysis:
        print(a["verdict"])
        for s in a["per_step"]:
            print(f"   {s['model']:12s} {s['label']:30s} step {s['step_time_s']:6.2f} s ({s['step_time_ratio']:.2f}×) "
                  f"memory {s['memory_ratio'] or float('nan'):.2f}× gain {s['best_gain']:+.3f} steps {s['steps']}")
    # a re-analysis keeps the machine that measured the runs (save() stamps the current one only when none)
    d = {"model_name": "SmolLM2-135M", **{k: v for k, v in d.items() if k not in ("kind", "schema_version",
                                                                                "analysis")}}
    save(f"real_attacks_{key}", {**d, "analysis": analysis}, kind=schema.REAL_ATTACKS)


if __name__ == "__main__":
    main()
