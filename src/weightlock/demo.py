"""``weightlock demo``: the main job, end to end on the built-in corpus.

Pretrains a dense base model and a PMP model with the same settings, locks the base model with
DLR-Lock, evaluates all three, attacks both locks (full fine-tuning, LoRA, gradient checkpointing,
reverse distillation, mask recovery; the owner's authorized masked fine-tuning as the yardstick) on the
prose-adaptation task and the key–value recall skill, runs the same attacks on the unlocked base model
as the reference, measures mask recovery against chance, and writes ``summary.json`` and the report.
Every stage reuses what an earlier (or interrupted) run left in ``--out``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import schema
from .io import machine_info, read_json, write_json
from .tables import ATTACK_HEAD, CAPABILITY_HEAD, attack_rows, capability_rows, fmt


@dataclass
class DemoPlan:
    """Sizes and budgets of one demo run (``FULL`` or ``QUICK``)."""

    preset: str = "small"
    rank: int = 32
    lock_steps: int = 600
    pmp_ratio: float = 0.3
    discovery_steps: int = 100
    attack_steps: int = 30
    attack_batch: int = 8
    score_every: int = 10
    reverse_distill_steps: int = 300
    tasks: tuple[str, ...] = ("prose", "recall")
    lr: dict = field(default_factory=lambda: {"full": 2e-3, "lora": 1e-2, "masked": 2e-3})
    memory_depths: tuple[int, ...] = (8, 16, 24, 32)
    max_ppl_tokens: int = 32768


FULL = DemoPlan()
QUICK = DemoPlan(preset="tiny", rank=8, lock_steps=150, discovery_steps=15, attack_steps=6, attack_batch=4,
                 score_every=3, reverse_distill_steps=40, memory_depths=(2, 4, 6, 8), max_ppl_tokens=4096)

# (defense, label, attack, options, learning-rate key, reference label); the reference runs on the base model
ATTACK_PLAN = [
    ("reference", "full", "full", {}, "full", None),
    ("reference", "lora", "lora", {"targets": "attention"}, "lora", None),
    ("reference", "checkpointing", "full", {"checkpointing": "layer"}, "full", None),
    ("dlr", "full", "full", {}, "full", "full"),
    ("dlr", "lora", "lora", {"targets": "attention"}, "lora", "lora"),
    ("dlr", "checkpointing", "full", {"checkpointing": "dlr"}, "full", "checkpointing"),
    ("dlr", "reverse-distill", "reverse-distill", {}, "full", "full"),
    ("pmp", "full", "full", {}, "full", "full"),
    ("pmp", "lora", "lora", {"targets": "attention"}, "lora", "lora"),
    ("pmp", "mask-recover", "mask-recover", {"method": "spectral"}, "masked", "full"),
    ("pmp", "masked (authorized)", "masked", {}, "masked", "full"),
]


def run_demo(out: Path, quick: bool = False, report: bool = True) -> dict:
    """Run (or resume) the demo in ``out``; returns the summary also written to ``out/summary.json``."""
    from .dlr.lock import LockConfig, lock
    from .pmp import PMPConfig, pretrain_pmp
    from .train.pretrain import METRICS_FILE, default_config, pretrain

    console = Console()
    plan = QUICK if quick else FULL
    out = Path(out)
    t0 = time.perf_counter()
    stage_s: dict[str, float] = {}

    def stage(name: str, done: bool, fn) -> None:
        if done:
            console.print(f"[dim]reusing {name}[/]")
            return
        console.rule(f"[bold]{name}")
        t = time.perf_counter()
        fn()
        stage_s[name] = time.perf_counter() - t

    base, pmp_dir, locked = out / f"base-{plan.preset}", out / f"pmp-{plan.preset}", out / f"locked-{plan.preset}"

    def pretrain_base():
        cfg = default_config(plan.preset)
        pretrain(cfg, base, overwrite=False, resume=True)

    def pretrain_pmp_model():
        cfg = default_config(plan.preset)
        pretrain_pmp(cfg, PMPConfig(mask_ratio=plan.pmp_ratio, discovery_max_steps=plan.discovery_steps),
                     pmp_dir, overwrite=True)

    def lock_base():
        lock(base, locked, LockConfig(rank=plan.rank, steps=plan.lock_steps), overwrite=True)

    stage(f"pretrain the dense {plan.preset} base model on builtin:code",
          (base / METRICS_FILE).exists() and not (base / "checkpoint").exists(), pretrain_base)
    stage(f"pretrain a PMP model (hardened, ρ={plan.pmp_ratio}), same settings",
          (pmp_dir / "pmp_run.json").exists(), pretrain_pmp_model)
    stage(f"lock the base model with DLR-Lock (rank {plan.rank})", (locked / "lock_report.json").exists(), lock_base)
    models = {"reference": base, "dlr": locked, "pmp": pmp_dir / "release"}
    mask_file = pmp_dir / "private" / "mask.safetensors"

    cached = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    if stage_s or cached.get("plan") != _plan_dict(plan):  # a model was (re)built: earlier results are stale
        cached = {}
        if stage_s:
            shutil.rmtree(out / "attacks", ignore_errors=True)
    console.rule("[bold]capability and mask recovery")
    capability = cached.get("capability") or {k: _capability(d, plan) for k, d in models.items()}
    recovery = cached.get("mask_recovery") or _mask_recovery(pmp_dir, plan)
    memory = cached.get("memory_vs_depth") or _memory_vs_depth(locked, plan)

    console.rule("[bold]attacks")
    runs = {}
    for task in plan.tasks:
        for defense, label, attack, options, lr_key, _ in ATTACK_PLAN:
            opts = dict(options)
            if attack == "masked":
                opts["mask"] = str(mask_file)
            if attack == "mask-recover":
                opts["mask_ratio"] = plan.pmp_ratio
            if attack == "reverse-distill":
                opts["distill_steps"] = plan.reverse_distill_steps
            console.print(f"{task:7s} {defense:9s} {label}")
            runs[(defense, label, task)] = _attack(models[defense], task, attack, out / "attacks" / defense / task / label,
                                                   lr=plan.lr[lr_key], **opts, plan=plan)
    rows = _attack_rows(runs, plan)
    summary = {
        "kind": schema.DEMO, "schema_version": schema.SCHEMA_VERSION, "weightlock_demo": 1, "preset": plan.preset, "plan": _plan_dict(plan),
        "models": {k: str(v) for k, v in models.items()}, "capability": capability,
        "mask_recovery": recovery, "memory_vs_depth": memory, "attacks": rows,
        "frontier": _frontier(runs, plan), "layer_rel_error": [l["rel_error"] for l in read_json(locked / "lock_report.json")["layers"]],
        "pmp_gain_vs_ratio": _gain_vs_ratio(rows, plan),
        "verdicts": verdicts(rows, recovery),
        "seconds": {"this_run": time.perf_counter() - t0, "stages": stage_s},
    }
    summary["machine"] = machine_info()
    write_json(out / "summary.json", summary)
    print_summary(summary, console)
    if report:
        from .report import build_report

        index = build_report([out], out / "report")
        console.print(f"report: {index}")
    console.print(f"summary written to {out / 'summary.json'} ({summary['seconds']['this_run']:.0f} s)")
    return summary


def _plan_dict(plan: DemoPlan) -> dict:
    d = asdict(plan)
    d["tasks"] = list(plan.tasks)
    d["memory_depths"] = list(plan.memory_depths)
    return d


def _capability(model_dir: Path, plan: DemoPlan) -> dict:
    from .eval.perplexity import model_perplexity

    return {d: model_perplexity(model_dir, f"builtin:{d}", "validation", max_tokens=plan.max_ppl_tokens)["perplexity"]
            for d in ("code", "prose")}


def _mask_recovery(pmp_dir: Path, plan: DemoPlan) -> dict:
    from .data import load_blocks, load_tokenizer
    from .models.hub import load
    from .pmp import PMPConfig, load_mask
    from .pmp.recover import recover_all

    release = pmp_dir / "release"
    tok = load_tokenizer(release)
    mask, _, _ = load_mask(pmp_dir / "private" / "mask.safetensors")
    cfg = PMPConfig(mask_ratio=plan.pmp_ratio, discovery_max_steps=plan.discovery_steps)
    public = load_blocks("builtin:code", "train", tok, 64 if plan.preset == "tiny" else 128, 50_000)
    return recover_all(load(release), mask, cfg, tok, public)


def _memory_vs_depth(locked: Path, plan: DemoPlan) -> dict:
    from .eval.cost import depth_linearity

    spec = read_json(locked / "lock_report.json")["layers"][0]["spec"]
    return depth_linearity(spec["width"], spec["rank"], list(plan.memory_depths), 256)


def _attack(model_dir: Path, task: str, attack: str, out: Path, plan: DemoPlan, **options) -> dict:
    from .attacks import run_attack

    return run_attack(model_dir, task, attack, out, steps=plan.attack_steps, batch_size=plan.attack_batch,
                      score_every=plan.score_every, block_size=64 if plan.preset == "tiny" else 128,
                      train_tokens=50_000 if plan.preset == "tiny" else 200_000, **options)["locked"]


def _ratio(a, b):
    return a / b if b and abs(b) > 1e-12 and a is not None else None


def _attack_rows(runs: dict, plan: DemoPlan) -> list[dict]:
    """One row per (defense, attack, task): gain, gain ratio and cost multipliers against the reference."""
    rows = []
    for (defense, label, task), r in runs.items():
        ref_label = next(p[5] for p in ATTACK_PLAN if p[0] == defense and p[1] == label)
        ref = runs[("reference", ref_label or label, task)]
        # the attacker's time: median step × steps (robust to one-off first-step costs) + its preparation
        total = r["cost"]["step_time_s"] * plan.attack_steps + r["cost"]["prepare_seconds"]
        ref_total = ref["cost"]["step_time_s"] * plan.attack_steps + ref["cost"]["prepare_seconds"]
        rows.append({
            "defense": defense, "attack": label, "task": task, "reference_attack": ref_label,
            "score_before": r["before"]["score"], "score_after": r["after"]["score"], "gain": r["gain"],
            "reference_gain": ref["gain"], "gain_ratio": _ratio(r["gain"], ref["gain"]) if defense != "reference" else 1.0,
            "saved_activation_bytes": r["cost"]["saved_activation_bytes_per_step"],
            "step_time_s": r["cost"]["step_time_s"], "total_seconds": total,
            "memory_ratio": _ratio(r["cost"]["saved_activation_bytes_per_step"], ref["cost"]["saved_activation_bytes_per_step"]),
            "time_ratio": _ratio(total, ref_total), "peak_rss_bytes": r["cost"]["peak_rss_bytes"],
            # the run's own peak memory growth (parameters' gradients, optimizer state, activations)
            "peak_delta_bytes": r["cost"].get("peak_rss_delta_bytes"),
            "peak_ratio": _ratio(r["cost"].get("peak_rss_delta_bytes"), ref["cost"].get("peak_rss_delta_bytes")),
            "capability_ppl_before": r["capability_ppl_before"], "capability_ppl_after": r["capability_ppl_after"],
            "curve": r["score_curve"], "reference_curve": ref["score_curve"],
            "recovered_mask_density": r.get("recovered_mask_density"),
        })
    return rows


def _frontier(runs: dict, plan: DemoPlan) -> list[dict]:
    """(saved-activation bytes, step time) of plain full fine-tuning and of checkpointing, per model."""
    names = {"reference": "original", "dlr": "DLR-locked"}
    return [{"model": names[d], "strategy": "none" if label == "full" else label,
             "saved_activation_bytes": r["cost"]["saved_activation_bytes_per_step"], "step_time_s": r["cost"]["step_time_s"]}
            for (d, label, task), r in runs.items()
            if d in names and label in ("full", "checkpointing", "lora") and task == plan.tasks[0]]


def _gain_vs_ratio(rows: list[dict], plan: DemoPlan) -> list[dict]:
    """Gains of the PMP model at its ρ, and of the dense model as ρ = 1 (every entry trained)."""
    out = []
    for r in rows:
        if r["defense"] == "pmp":
            out.append({"ratio": plan.pmp_ratio, "task": r["task"], "method": r["attack"], "gain": r["gain"]})
        elif r["defense"] == "reference" and r["attack"] in ("full", "lora"):
            out.append({"ratio": 1.0, "task": r["task"], "method": r["attack"], "gain": r["gain"]})
    return out


def verdicts(rows: list[dict], recovery: dict) -> dict[str, str]:
    """One plain-language line per defense, from the measured numbers only.

    A defense *holds* on a task when no unauthorized attack reaches half of the gain the same budget buys
    on the unlocked model (gain ratio < 0.5); an attack that reaches it *breaks* the lock."""
    out = {}
    for defense, name in (("dlr", "DLR-Lock"), ("pmp", "PMP")):
        attacks = [r for r in rows if r["defense"] == defense and r["attack"] != "masked (authorized)"]
        broken, parts = [], []
        for task in dict.fromkeys(r["task"] for r in attacks):
            tr = [r for r in attacks if r["task"] == task and r["gain_ratio"] is not None]
            if not tr:
                parts.append(f"{task}: no measurable reference gain")
                continue
            best = max(tr, key=lambda r: r["gain_ratio"])
            parts.append(f"{task}: best attack {best['attack']} gets {best['gain_ratio']:.0%} of the unlocked gain")
            if best["gain_ratio"] >= 0.5:
                broken.append(f"{best['attack']} ({task})")
        line = "FAILS — broken by " + ", ".join(broken) if broken else "HOLDS against every attack run"
        line += "; " + "; ".join(parts)
        if defense == "dlr":
            full = [r for r in rows if r["defense"] == "dlr" and r["attack"] == "full"]
            if full and full[0]["memory_ratio"]:
                line += (f"; full fine-tuning costs {full[0]['memory_ratio']:.1f}× activation memory"
                         + (f" ({full[0]['peak_ratio']:.1f}× peak memory growth)" if full[0].get("peak_ratio") else "")
                         + f", {full[0]['time_ratio']:.1f}× time")
        else:
            b = recovery["best"]
            line += (f"; best mask recovery ({b['attack']}) IoU {b['iou']:.2f} vs chance {recovery['chance_iou']:.2f}"
                     + (" — the mask leaks" if b["excess_over_chance"] > 0.05 else " — at chance"))
            auth = [r for r in rows if r["defense"] == "pmp" and r["attack"] == "masked (authorized)"]
            if auth:
                line += "; authorized fine-tuning gain ratio " + ", ".join(
                    f"{r['task']} {fmt(r['gain_ratio'], '.0%')}" for r in auth)
        out[name] = line
    return out


def print_summary(summary: dict, console: Console | None = None) -> None:
    """The terminal table: capability, attacker gain ratio, memory and time multipliers, mask recovery."""
    console = console or Console()
    if console.width < 110:  # the attack table needs the room
        console = Console(width=110)
    t = Table(title=f"weightlock demo ({summary['preset']}): capability (validation perplexity, lower is better)")
    for c in CAPABILITY_HEAD:
        t.add_column(c)
    for row in capability_rows(summary):
        t.add_row(*row)
    console.print(t)
    t = Table(title="attacks: gain ratio = attacker gain on the lock / same attack's gain on the original")
    for c in ATTACK_HEAD:
        t.add_column(c, justify="right" if c not in ("defense", "attack", "task") else "left")
    for row in attack_rows(summary):
        t.add_row(*row)
    console.print(t)
    rec = summary["mask_recovery"]
    console.print(f"PMP mask recovery: best {rec['best']['attack']} IoU {rec['best']['iou']:.3f} "
                  f"(chance {rec['chance_iou']:.3f})")
    for name, line in summary["verdicts"].items():
        console.print(f"[bold]{name}[/]: {line}")
