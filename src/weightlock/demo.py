"""``weightlock demo``: the main job, end to end on the built-in corpus.

Pretrains a dense base model on the built-in corpus, then builds every registered defense
(``weightlock.defenses``: DLR-Lock locks the base model; PMP pretrains its own model with the same
settings; defenses registered from user code join them, or ``defenses=``/``--defense`` picks some),
evaluates each release's capability and the defense's own extra evaluations (mask recovery against
chance, memory vs depth), runs each defense's attack plan (full fine-tuning, LoRA, gradient
checkpointing, reverse distillation, mask recovery; PMP's authorized masked fine-tuning as the yardstick)
on the prose-adaptation task and the key–value recall skill, with the same attacks on the unlocked base
model as the reference, and writes one verdict per defense, ``summary.json`` and the report. Every stage
reuses what an earlier (or interrupted) run left in ``--out``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from . import schema
from .errors import WeightlockError
from .io import machine_info, read_json, write_json
from .tables import ATTACK_CAPTION, ATTACK_HEAD, CAPABILITY_HEAD, attack_rows, capability_rows, defenses_of, fmt


@dataclass
class DemoPlan:
    """Sizes and budgets of one demo run (``FULL`` or ``QUICK``)."""

    preset: str = "small"
    rank: int = 32
    lock_steps: int = 600
    pmp_ratio: float = 0.3
    discovery_steps: int = 100
    attack_steps: int = 150  # at most: an attack stops once its task score stops improving (patience)
    attack_batch: int = 8
    score_every: int = 15
    patience: int = 3  # scores in a row without a new best before an attack stops (0: run every step)
    reverse_distill_steps: int = 300
    tasks: tuple[str, ...] = ("prose", "recall")
    lr: dict = field(default_factory=lambda: {"full": 2e-3, "lora": 1e-2, "masked": 2e-3})
    memory_depths: tuple[int, ...] = (8, 16, 24, 32)
    max_ppl_tokens: int = 32768

    @property
    def block_size(self) -> int:
        return 64 if self.preset == "tiny" else 128

    @property
    def train_tokens(self) -> int:
        return 50_000 if self.preset == "tiny" else 200_000

    def defense_options(self, name: str) -> dict:
        """This plan's settings of a built-in defense (others run with their config's defaults)."""
        return {"dlr": {"rank": self.rank, "steps": self.lock_steps},
                "pmp": {"mask_ratio": self.pmp_ratio, "discovery_max_steps": self.discovery_steps}}.get(name, {})


FULL = DemoPlan()
QUICK = DemoPlan(preset="tiny", rank=8, lock_steps=150, discovery_steps=15, attack_steps=6, attack_batch=4,
                 score_every=3, patience=0, reverse_distill_steps=40, memory_depths=(2, 4, 6, 8), max_ppl_tokens=4096)


def select_defenses(names: Sequence | None, plan: DemoPlan) -> list:
    """The defenses a demo runs: every registered one but ``none`` (the reference), or those named (a
    registry name, configured by the plan for the built-ins, or a ready :class:`Defense`)."""
    from .defenses import DEFENSES, Defense, make_defense

    if names is None:
        names = [n for n in DEFENSES if n != "none"]
    chosen = [d if isinstance(d, Defense) else make_defense(d, **plan.defense_options(d)) for d in names]
    if not chosen:
        raise WeightlockError("no defense to run; name one with --defense (registered: "
                              f"{', '.join(DEFENSES)})")
    seen = [d.name for d in chosen]
    if len(set(seen)) != len(seen):
        raise WeightlockError(f"a defense is named twice: {', '.join(seen)}")
    dirs = [d.workdir or d.name for d in chosen]
    if "base" in dirs or len(set(dirs)) != len(dirs):
        raise WeightlockError(f"defense build directories must differ from each other and from 'base': "
                              f"{', '.join(dirs)}")
    return chosen


def _reference_plan(reference, chosen: list, plan: DemoPlan) -> list:
    """The reference attacks on the original that the chosen defenses' attacks are compared with; checks
    every attack's reference and learning rate before any work."""
    from .attacks import ATTACKS

    refs = {s.label: s for s in reference.attacks}
    needed = set()
    for d in chosen:
        for s in d.plan():
            if s.reference not in refs:
                raise WeightlockError(f"defense {d.name!r}: attack {s.label!r} is compared with reference "
                                      f"{s.reference!r}; the original's attacks are {', '.join(refs)}")
            if s.lr not in plan.lr:
                raise WeightlockError(f"defense {d.name!r}: attack {s.label!r} asks for learning rate "
                                      f"{s.lr!r}; the demo has {', '.join(plan.lr)}")
            if s.attack not in ATTACKS:
                raise WeightlockError(f"defense {d.name!r}: unknown attack {s.attack!r}; available: "
                                      f"{', '.join(sorted(ATTACKS))}")
            needed.add(s.reference)
    return [s for s in reference.attacks if s.label in needed]


def run_demo(out: Path, quick: bool = False, report: bool = True, defenses: Sequence | None = None) -> dict:
    """Run (or resume) the demo in ``out``; returns the summary also written to ``out/summary.json``.

    ``defenses``: registry names or :class:`weightlock.defenses.Defense` objects (default: every
    registered defense but ``none``)."""
    from .defenses import make_defense
    from .train.pretrain import METRICS_FILE, default_config, pretrain

    console = Console()
    plan = QUICK if quick else FULL
    chosen = select_defenses(defenses, plan)
    reference = make_defense("none")
    ref_specs = _reference_plan(reference, chosen, plan)
    out = Path(out)
    t0 = time.perf_counter()
    stage_s: dict[str, float] = {}

    def stage(name: str, done: bool, fn) -> bool:
        if done:
            console.print(f"[dim]reusing {name}[/]")
            return False
        console.rule(f"[bold]{name}")
        t = time.perf_counter()
        fn()
        stage_s[name] = time.perf_counter() - t
        return True

    base = out / f"base-{plan.preset}"
    work = {d.name: out / f"{d.workdir or d.name}-{plan.preset}" for d in chosen}
    rebuilt: set[str] = set()

    def pretrain_base():
        pretrain(default_config(plan.preset), base, overwrite=False, resume=True)

    if stage(f"pretrain the dense {plan.preset} base model on builtin:code",
             (base / METRICS_FILE).exists() and not (base / "checkpoint").exists(), pretrain_base):
        rebuilt.add("reference")
    models = {"reference": Path(reference.apply(base, out / f"reference-{plan.preset}"))}
    # pretraining-time defenses first (pretraining runs, like the base), then those applied to the base
    for d in sorted(chosen, key=lambda d: not d.pretraining):
        release = d.release(work[d.name])
        stale = release is None or ("reference" in rebuilt and not d.pretraining)
        source = default_config(plan.preset) if d.pretraining else base
        built: list[Path] = []
        if stage(d.build_title(), not stale, lambda: built.append(d.build(source, work[d.name]))):  # noqa: B023  (called within this iteration)
            rebuilt.add(d.name)
            release = built[0]
        models[d.name] = release
    models = {"reference": models["reference"], **{d.name: models[d.name] for d in chosen}}

    cached = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    if cached.get("plan") != _plan_dict(plan) or "reference" in rebuilt:  # earlier results are stale
        cached = {}
    for name in rebuilt:
        shutil.rmtree(out / "attacks" / ("" if name == "reference" else name), ignore_errors=True)
    extra_names = [k.replace("_", " ") for d in chosen for k in d.evaluations]
    console.rule("[bold]capability" + (" and " + ", ".join(extra_names) if extra_names else ""))
    cached_cap = cached.get("capability", {})
    capability = {k: cached_cap[k] if k in cached_cap and k not in rebuilt else _capability(m, plan)
                  for k, m in models.items()}
    evaluations: dict = {}
    for d in chosen:
        if d.name not in rebuilt and all(k in cached for k in d.evaluations):
            evaluations.update({k: cached[k] for k in d.evaluations})
        else:
            evaluations.update(d.evaluate(models[d.name], work[d.name], plan))

    console.rule("[bold]attacks")
    specs = [(reference, "reference", s) for s in ref_specs] + [(d, d.name, s) for d in chosen for s in d.plan()]
    runs = {}
    for task in plan.tasks:
        for defense, key, spec in specs:
            opts = {**spec.options, **defense.attack_options(spec, work.get(key, models[key]), plan)}
            console.print(f"{task:7s} {key:9s} {spec.label}")
            runs[(key, spec.label, task)] = _attack(models[key], task, spec.attack,
                                                    out / "attacks" / key / task / spec.label,
                                                    lr=plan.lr[spec.lr], **opts, plan=plan)
    references = {(key, spec.label): (None if key == "reference" else spec.reference) for _, key, spec in specs}
    rows = _attack_rows(runs, references, plan)
    summary = {
        "kind": schema.DEMO, "schema_version": schema.SCHEMA_VERSION, "weightlock_demo": 1,
        "preset": plan.preset, "plan": _plan_dict(plan), "defenses": [d.record() for d in chosen],
        "models": {k: str(v) for k, v in models.items()}, "capability": capability, **evaluations,
        "attacks": rows, "training_memory": training_memory_summary(rows),
    }
    for d in chosen:
        summary.update(d.summarize(rows, work[d.name], plan))
    summary["verdicts"] = verdicts(rows, summary, chosen)
    summary["seconds"] = {"this_run": time.perf_counter() - t0, "stages": stage_s}
    summary["machine"] = machine_info()
    write_json(out / "summary.json", summary)
    print_summary(summary, console, chosen)
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


def _attack(model_dir: Path, task: str, attack: str, out: Path, plan: DemoPlan, **options) -> dict:
    from .attacks import run_attack

    return run_attack(model_dir, task, attack, out, steps=plan.attack_steps, batch_size=plan.attack_batch,
                      score_every=plan.score_every, patience=plan.patience, block_size=plan.block_size,
                      train_tokens=plan.train_tokens, **options)["locked"]


def _ratio(a, b):
    return a / b if b and abs(b) > 1e-12 and a is not None else None


def _attack_rows(runs: dict, references: dict, plan: DemoPlan) -> list[dict]:
    """One row per (defense, attack, task): gain, gain ratio and cost multipliers against the reference
    (``references``: (defense, attack label) → the label of its reference run on the original), and the
    training memory (counted: :data:`~weightlock.eval.cost.TRAINING_MEMORY`) against the budget, the original's
    full fine-tune on the same task: ``training_memory_ratio`` (the tables' ``memory ×``) and ``fits_memory``,
    what the verdict's "within memory" clause uses."""
    from .eval.cost_to_target import on_one_basis, run_training_memory

    # every run on one basis: counted when all are, else all estimated from older records' parameter counts
    counts, basis = on_one_basis([run_training_memory(r) for r in runs.values()])
    memory = dict(zip(runs, counts))
    rows = []
    for (defense, label, task), r in runs.items():
        ref_label = references[(defense, label)]
        ref = runs[("reference", ref_label or label, task)]
        # the attacker's time: median step × steps run (robust to one-off first-step costs) + its preparation
        total, ref_total = (x["cost"]["step_time_s"] * _steps_run(x, plan) + x["cost"]["prepare_seconds"]
                            for x in (r, ref))
        rows.append({
            "defense": defense, "attack": label, "task": task, "reference_attack": ref_label,
            "score_before": r["before"]["score"], "score_after": r["after"]["score"], "gain": r["gain"],
            "reference_gain": ref["gain"],
            "gain_ratio": _ratio(r["gain"], ref["gain"]) if defense != "reference" else 1.0,
            "saved_activation_bytes": r["cost"]["saved_activation_bytes_per_step"],
            "step_time_s": r["cost"]["step_time_s"], "total_seconds": total,
            "memory_ratio": _ratio(r["cost"]["saved_activation_bytes_per_step"],
                                   ref["cost"]["saved_activation_bytes_per_step"]),
            "time_ratio": _ratio(total, ref_total), "peak_rss_bytes": r["cost"]["peak_rss_bytes"],
            # the run's own measured peak RSS growth: a measurement, reported; the budget is training memory
            "peak_delta_bytes": r["cost"].get("peak_rss_delta_bytes"),
            "peak_ratio": _ratio(r["cost"].get("peak_rss_delta_bytes"), ref["cost"].get("peak_rss_delta_bytes")),
            "capability_ppl_before": r["capability_ppl_before"], "capability_ppl_after": r["capability_ppl_after"],
            "curve": r["score_curve"], "reference_curve": ref["score_curve"],
            "cost_curve": r.get("cost_curve"), "reference_cost_curve": ref.get("cost_curve"),
            "recovered_mask_density": r.get("recovered_mask_density"),
            **_memory_fields(memory[(defense, label, task)], memory.get(("reference", "full", task)), basis),
        })
    return rows


def _memory_fields(mine: int | None, budget: int | None, basis: str) -> dict:
    """A row's training memory against the budget (the original's full fine-tune on the task): the one test
    of "fits within the original's memory", ``training_memory_bytes <= memory_budget_bytes``."""
    known = mine is not None and budget is not None
    return {"training_memory_bytes": mine, "memory_budget_bytes": budget, "memory_basis": basis,
            "training_memory_ratio": mine / budget if known and budget > 0 else None,
            "fits_memory": mine <= budget if known else None}


def training_memory_summary(rows: list[dict]) -> dict:
    """The memory budget of a demo's verdicts, for ``summary.json``: the definition, how the runs' memory was
    obtained and the budget per task (the original's full fine-tune's training memory)."""
    from .eval.cost import TRAINING_MEMORY
    from .eval.cost_to_target import MEMORY_BASIS

    basis = next((r["memory_basis"] for r in rows), "unknown")
    return {"definition": TRAINING_MEMORY, "basis": basis, "basis_note": MEMORY_BASIS.get(basis, basis),
            "budget_bytes": {r["task"]: r["memory_budget_bytes"] for r in rows},
            "measured_peaks": "peak_rss_bytes / peak_delta_bytes / peak_ratio are each run's measured RSS "
                              "(allocator-dependent): reported, never the budget"}


def _steps_run(r: dict, plan: DemoPlan) -> int:
    """Steps an attack ran (fewer than the plan's when patience stopped it; older results: the plan's)."""
    return r["cost_curve"][-1]["step"] if r.get("cost_curve") else plan.attack_steps


def verdicts(rows: list[dict], summary: dict, defenses: Sequence) -> dict[str, str]:
    """One plain-language line per defense, from the measured numbers only.

    A defense *holds* on a task when no unauthorized attack reaches half of the gain the same budget buys
    on the unlocked model (gain ratio < 0.5); an attack that reaches it *breaks* the lock. Beside each task's
    gain ratio: the lock cost multiplier (what the cheapest attack on the lock pays, in training time and
    FLOPs, to reach 90% of the best gain any attack reaches on the original, ÷ the same on the original;
    also among the attacks that fit within the unlocked full fine-tune's training memory — the rows'
    ``fits_memory``, the tables' ``memory ×`` ≤ 1), within the demo's step budget. The defense adds its
    own facts (memory, mask recovery); the authorized fine-tuning's gain ratio ends the line."""
    out = {}
    for d in defenses:
        authorized = d.authorized.label if d.authorized else None
        attacks = [r for r in rows if r["defense"] == d.name and r["attack"] != authorized]
        broken, parts = [], []
        for task in dict.fromkeys(r["task"] for r in attacks):
            tr = [r for r in attacks if r["task"] == task and r["gain_ratio"] is not None]
            if not tr:
                parts.append(f"{task}: no measurable reference gain")
                continue
            best = max(tr, key=lambda r: r["gain_ratio"])
            parts.append(f"{task}: best attack {best['attack']} gets {best['gain_ratio']:.0%} of the unlocked gain"
                         + _multiplier_clause(rows, attacks, task))
            if best["gain_ratio"] >= 0.5:
                broken.append(f"{best['attack']} ({task})")
        line = "FAILS — broken by " + ", ".join(broken) if broken else "HOLDS against every attack run"
        line += "; " + "; ".join(parts)
        for note in d.verdict_notes(rows, summary):
            line += "; " + note
        auth = [r for r in rows if r["defense"] == d.name and r["attack"] == authorized]
        if auth:
            line += "; authorized fine-tuning gain ratio " + ", ".join(
                f"{r['task']} {fmt(r['gain_ratio'], '.0%')}" for r in auth)
        out[d.display_name] = line
    return out


def _multiplier_clause(rows: list[dict], attacks: list[dict], task: str) -> str:
    """The lock cost multiplier on ``task`` (``attacks``: the defense's unauthorized attack rows; the
    original's are the reference rows), or nothing for results recorded without cost curves."""
    from .eval.cost_to_target import AttackCurve, multiplier_note

    lock = [r for r in attacks if r["task"] == task]
    orig = [r for r in rows if r["defense"] == "reference" and r["task"] == task]
    if not orig or not all(r.get("cost_curve") for r in lock + orig):
        return ""
    # the budget and every run's training memory as the rows hold them (the tables' memory × column)
    budget = next((r.get("memory_budget_bytes") for r in orig if r["attack"] == "full"), None)
    basis = next((r["memory_basis"] for r in orig if r.get("memory_basis")), "unknown")
    curves = [[AttackCurve(r["attack"], r["cost_curve"], r.get("peak_delta_bytes"),
                           memory_bytes=r.get("training_memory_bytes")) for r in rs] for rs in (lock, orig)]
    return " (" + multiplier_note(*curves, memory_budget=budget, memory_basis=basis) + ")"


def print_summary(summary: dict, console: Console | None = None, defenses: Sequence | None = None) -> None:
    """The terminal table: capability, attacker gain ratio, memory and time multipliers, then each defense's
    own lines (mask recovery...) and the verdicts. ``defenses`` default: the registered ones the summary
    names."""
    console = console or Console()
    if console.width < 120:  # the attack table needs the room
        console = Console(width=120)
    if defenses is None:
        defenses = _registered(summary)
    t = Table(title=f"weightlock demo ({summary['preset']}): capability (validation perplexity, lower is better)")
    for c in CAPABILITY_HEAD:
        t.add_column(c)
    for row in capability_rows(summary):
        t.add_row(*row)
    console.print(t)
    t = Table(title="attacks: gain ratio = attacker gain on the lock / same attack's gain on the original",
              caption=ATTACK_CAPTION)
    for c in ATTACK_HEAD:
        t.add_column(c, justify="right" if c not in ("defense", "attack", "task") else "left")
    for row in attack_rows(summary):
        t.add_row(*row)
    console.print(t)
    for d in defenses:
        for line in d.summary_lines(summary):
            console.print(line)
    for name, line in summary["verdicts"].items():
        console.print(f"[bold]{name}[/]: {line}")


def _registered(summary: dict) -> list:
    """The registered defenses a recorded summary names, with their recorded configs where they load."""
    from .defenses import DEFENSES

    out = []
    for rec in defenses_of(summary):
        cls = DEFENSES.get(rec["name"])
        if cls is None:
            continue
        for make in (lambda: cls(cls.Config(**rec.get("config", {}))), cls):  # noqa: B023  (called within this iteration)
            try:
                out.append(make())
                break
            except (TypeError, WeightlockError):
                continue
    return out
