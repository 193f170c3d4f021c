"""The red team on faithful releases of a real LLM (``weightlock run real-attacks``, was ``bench/real_attacks.py``):
what does an attacker who knows everything pay, in time, FLOPs and memory, to fine-tune a release as well as the
unlocked original? The analysis ``real-attacks`` reads a run's attack records (the original and each target),
and per task: the target (90% of the best gain any attack reaches on the original), counted by *gain* (from each
release's own score) and by *level* (from the original release's score); the lock cost multiplier (cheapest
attack to the target on the release over the cheapest on the original, with every attack and within the
unlocked full fine-tune's training memory); the seed parity; what laying the blocks out (the read-back) and
reverse distillation cost; a plain verdict. One record per release (``bench/results/real_attacks_NAME.json``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import schema
from .analyses import AnalysisContext, register_analysis
from .harness import max_gain as best_gain

Q = 0.9
READBACK_SLACK = 0.01  # a read-back within this of the lock's ppl ratio needs no reverse distillation


def needs_healing(fid: dict) -> bool:
    rb = fid.get("readback_ppl_ratio")
    return rb is None or rb > fid["ppl_ratio"] + READBACK_SLACK


def _plain(r: dict) -> bool:
    return "seed" not in r["options"]


def _memory(r: dict) -> int | None:
    return (r.get("training_memory") or {}).get("counted")


def analyse(rows: list[dict], tasks, key: str, fid: dict) -> list[dict]:
    """Per task: the release's and the original's scores, the target, the cheapest attack to it on each side
    and the lock cost multipliers (seconds and FLOPs; by gain and by level; with every attack and within the
    unlocked full fine-tune's training memory), the seed spread on each side, and every run's per-step costs."""
    from ..eval.cost_to_target import AttackCurve, lock_cost_multiplier

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


@register_analysis("real-attacks", kind=schema.REAL_ATTACKS)
def real_attacks(ctx: AnalysisContext, model_name: str = "SmolLM2-135M", save_releases: bool = False,
                 reanalyse: list | None = None, figure: bool = True) -> dict:
    """Per target release against the original: the lock cost multipliers by gain and by level, the seed
    parity, the read-back and reverse distillation's cost and a verdict per task (``save_releases``: each as
    ``bench/results/real_attacks_NAME.json`` with its figure; ``reanalyse``: those recorded files again)."""
    from ..eval.records import AttackRun
    from ..io import read_json
    from .harness import release_fidelity
    from .lock_cost import record_row

    out = {}
    if reanalyse:
        for path in reanalyse:
            d = json.loads(Path(path).read_text())
            key = next(k for k in d["models"] if k != "original")
            out[key] = _finish(d, key, d["tasks"], ctx, save_releases, figure)
        return {"releases": out}
    rows = [record_row(AttackRun.from_dict(read_json(f), f), f.parent)
            for f in sorted((ctx.out / "attacks").rglob("record.json"))]
    models = ctx.summary["models"]
    for key, path in (ctx.summary.get("targets") or {}).items():
        d = {"command": f"weightlock run {ctx.spec.name}", "model_name": model_name,
             "models": {"original": models["reference"], key: path}, "release_fidelity": release_fidelity(path),
             "budget": {**ctx.summary["plan"]["budget"], "block_size": ctx.summary["plan"]["block_size"],
                        "train_tokens": ctx.summary["plan"]["train_tokens"]},
             "tasks": list(ctx.spec.tasks), "learning_rates": ctx.summary["plan"]["learning_rates"],
             "runs": [r for r in rows if r["model"] in ("original", key)]}
        out[key] = _finish(d, key, list(ctx.spec.tasks), ctx, save_releases, figure)
    return {"releases": out}


def _finish(d: dict, key: str, tasks, ctx: AnalysisContext, save_releases: bool, figure: bool) -> dict:
    from . import harness

    analysis = analyse(d["runs"], tasks, key, d["release_fidelity"])
    where = harness.RESULTS if save_releases else ctx.figures
    if figure and analysis:
        where.mkdir(parents=True, exist_ok=True)
        plot(d["runs"], analysis, key, where / f"real_attacks_{key}.png")
    if any(needs_healing(d["release_fidelity"]) and not a["readback"]["reverse_distillation_runs"] for a in analysis):
        d["note"] = ("the read-back is not faithful: add a reverse-distillation + healing attack (reverse-heal) "
                     "against this release")
    # a re-analysis keeps the machine that measured the runs (save() stamps the current one only when none)
    d = {"model_name": "SmolLM2-135M", **{k: v for k, v in d.items() if k not in ("kind", "schema_version",
                                                                                "analysis")}, "analysis": analysis}
    if save_releases:
        harness.save(f"real_attacks_{key}", d, kind=schema.REAL_ATTACKS)
    return d
