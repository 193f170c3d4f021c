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
from typing import Callable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from . import schema
from .errors import WeightlockError
from .io import jsonable, machine_info, read_json, write_json
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
# recall scored by its answers' log-likelihood (eval.tasks, kind "loglik"): same skill and data, but in 6 steps
# the tiny model's greedy answers never become right, so exact match stays 0 → 0 and every recall gain was 0
QUICK = DemoPlan(preset="tiny", rank=8, lock_steps=150, discovery_steps=15, attack_steps=6, attack_batch=4,
                 score_every=3, patience=0, reverse_distill_steps=40, tasks=("prose", "recall-loglik"),
                 memory_depths=(2, 4, 6, 8), max_ppl_tokens=4096)


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
    dirs = [d.spec.workdir or d.name for d in chosen]
    if "base" in dirs or len(set(dirs)) != len(dirs):
        raise WeightlockError(f"defense build directories must differ from each other and from 'base': "
                              f"{', '.join(dirs)}")
    return chosen


def _reference_plan(reference, chosen: list, plan: DemoPlan, attacks: Mapping | None = None) -> list:
    """The reference attacks on the original that the chosen defenses' attacks (those labelled in
    ``attacks`` when given) are compared with; checks every attack's reference and learning rate before any
    work."""
    from .attacks import ATTACKS

    refs = {s.label: s for s in reference.spec.attacks}
    needed = set()
    for d in chosen:
        for s in _planned(d, attacks):
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
    return [s for s in reference.spec.attacks if s.label in needed]


def run_demo(out: Path, quick: bool = False, report: bool = True, defenses: Sequence | None = None) -> dict:
    """Run (or resume) the demo in ``out``; returns the summary also written to ``out/summary.json``.

    ``defenses``: registry names or :class:`weightlock.defenses.Defense` objects (default: every
    registered defense but ``none``). The same run as ``weightlock run demo`` / ``demo-quick`` (the shipped
    specs translate to :data:`FULL` / :data:`QUICK`; ``tests/test_experiments.py`` checks it)."""
    return run_plan(out, QUICK if quick else FULL, defenses, report=report)


def _planned(defense, attacks: Mapping | None) -> list:
    """The attacks of ``defense``'s plan that run: all, or those labelled in ``attacks``."""
    return [s for s in defense.plan() if attacks is None or s.label in attacks]


def _lr_values(v) -> tuple[float, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def run_plan(out: Path, plan: DemoPlan, defenses: Sequence | None = None, report: bool = True, *,
             base_model: str | Path | None = None, attacks: Mapping[str, tuple] | None = None,
             seeds: Sequence[int] = (0,), on_record: Callable | None = None) -> dict:
    """The experiment engine (``weightlock demo`` and ``weightlock run``): run (or resume) ``plan`` in ``out``
    and return the summary also written to ``out/summary.json``.

    ``defenses``: registry names or :class:`~weightlock.defenses.Defense` objects (default: every registered
    defense but ``none``); ``base_model``: a model directory to use instead of pretraining the plan's preset;
    ``attacks``: only these labels of the defenses' plans, each ``label → (learning rates or None, options)``
    (None: the plan's learning rate of the attack's group; options override the plan's); every attack runs at
    every learning rate × ``seeds``, the row reporting the attacker's best learning rate (mean gain over seeds).
    Each run leaves one :class:`~weightlock.eval.records.AttackRun` (``record.json`` in its directory):
    a finished run is skipped when its record matches what would run; ``on_record(record)`` is called after
    each new one. The summary's attack rows read only the records."""
    from .defenses import make_defense
    from .train.pretrain import METRICS_FILE, default_config, pretrain

    console = Console()
    chosen = select_defenses(defenses, plan)
    reference = make_defense("none")
    ref_specs = _reference_plan(reference, chosen, plan, attacks)
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise WeightlockError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if base_model is not None:
        if not (Path(base_model) / "config.json").is_file():
            raise WeightlockError(f"{base_model}: not a model directory (no config.json)")
        pre = [d.name for d in chosen if d.spec.pretraining]
        if pre:
            raise WeightlockError(f"{', '.join(pre)} pretrains its own model: it needs the plan's preset, "
                                  f"not the model {base_model}")
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

    base = out / f"base-{plan.preset}" if base_model is None else Path(base_model)
    work = {d.name: out / f"{d.spec.workdir or d.name}-{plan.preset}" for d in chosen}
    rebuilt: set[str] = set()

    def pretrain_base():
        pretrain(default_config(plan.preset), base, overwrite=False, resume=True)

    if base_model is None and stage(f"pretrain the dense {plan.preset} base model on builtin:code",
                                    (base / METRICS_FILE).exists() and not (base / "checkpoint").exists(),
                                    pretrain_base):
        rebuilt.add("reference")
    models = {"reference": Path(reference.apply(base, out / f"reference-{plan.preset}"))}
    # pretraining-time defenses first (pretraining runs, like the base), then those applied to the base
    for d in sorted(chosen, key=lambda d: not d.spec.pretraining):
        release = d.release(work[d.name])
        stale = release is None or ("reference" in rebuilt and not d.spec.pretraining)
        source = default_config(plan.preset) if d.spec.pretraining else base
        built: list[Path] = []
        if stage(d.hooks().build_title(), not stale, lambda: built.append(d.build(source, work[d.name]))):  # noqa: B023  (called within this iteration)
            rebuilt.add(d.name)
            release = built[0]
        models[d.name] = release
    models = {"reference": models["reference"], **{d.name: models[d.name] for d in chosen}}

    cached = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    if cached.get("plan") != _plan_dict(plan) or "reference" in rebuilt:  # earlier results are stale
        cached = {}
    for name in rebuilt:
        shutil.rmtree(out / "attacks" / ("" if name == "reference" else name), ignore_errors=True)
    extra_names = [k.replace("_", " ") for d in chosen for k in d.spec.evaluations]
    console.rule("[bold]capability" + (" and " + ", ".join(extra_names) if extra_names else ""))
    cached_cap = cached.get("capability", {})
    capability = {k: cached_cap[k] if k in cached_cap and k not in rebuilt else _capability(m, plan)
                  for k, m in models.items()}
    evaluations: dict = {}
    for d in chosen:
        if d.name not in rebuilt and all(k in cached for k in d.spec.evaluations):
            evaluations.update({k: cached[k] for k in d.spec.evaluations})
        else:
            evaluations.update(d.hooks().evaluate(models[d.name], work[d.name], plan))

    console.rule("[bold]attacks")
    specs = ([(reference, "reference", s) for s in ref_specs]
             + [(d, d.name, s) for d in chosen for s in _planned(d, attacks)])
    runs = {}
    for task in plan.tasks:
        for defense, key, spec in specs:
            lrs, override = (attacks or {}).get(spec.label) or (None, {})
            needs = defense.hooks().attack_options(spec, work.get(key, models[key]), plan)
            opts = {**spec.options, **needs, **override}
            points = [(lr, seed) for lr in (lrs or _lr_values(plan.lr[spec.lr])) for seed in seeds]
            run_dir = out / "attacks" / key / task / spec.label
            console.print(f"{task:7s} {key:9s} {spec.label}")
            runs[(key, spec.label, task)] = [
                _attack(models[key], task, spec, key, run_dir if len(points) == 1 else run_dir / f"lr{lr:g}-seed{seed}",
                        plan, on_record, lr=lr, seed=seed, **opts) for lr, seed in points]
    references = {(key, spec.label): (None if key == "reference" else spec.reference) for _, key, spec in specs}
    rows, sweep = _attack_rows(runs, references, plan)
    summary = {
        "kind": schema.DEMO, "schema_version": schema.SCHEMA_VERSION, "weightlock_demo": 1,
        "preset": plan.preset, "plan": _plan_dict(plan), "defenses": [d.record() for d in chosen],
        "models": {k: str(v) for k, v in models.items()}, "capability": capability, **evaluations,
        "attacks": rows, "training_memory": training_memory_summary(rows),
    }
    if sweep:  # more than one learning rate or seed per attack: every point, and the one the row reports
        summary["sweep"] = sweep
    for d in chosen:
        summary.update(d.hooks().summarize(rows, work[d.name], plan))
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


def _attack(model_dir: Path, task: str, spec, defense: str, out: Path, plan: DemoPlan,
            on_record: Callable | None = None, **options):
    """One attack run's :class:`~weightlock.eval.records.AttackRun`: the record in ``out`` when it
    matches what would run (target, task, every option), else the attack run now (a run left by other
    settings is discarded first) and its record written."""
    from .attacks import make_attack, run_attack
    from .eval.records import AttackRun
    from .train.finetune import is_main_process

    kw = dict(steps=plan.attack_steps, batch_size=plan.attack_batch, score_every=plan.score_every,
              patience=plan.patience, block_size=plan.block_size, train_tokens=plan.train_tokens, **options)
    config = jsonable(make_attack(spec.attack, **kw).cfg.options())
    record_file = out / "record.json"
    if record_file.exists() or (out / "result.json").exists():
        try:
            old = (AttackRun.from_dict(read_json(record_file), record_file) if record_file.exists()
                   else AttackRun.from_result(read_json(out / "result.json"), defense=defense, label=spec.label))
        except (WeightlockError, KeyError, TypeError, ValueError):
            old = None
        if (old is not None and jsonable(old.config) == config and old.target == str(model_dir)
                and old.task == task and old.attack == spec.label and old.defense == defense):
            if not record_file.exists() and is_main_process():
                write_json(record_file, old.to_dict())  # a run killed between its result and its record
            return old
        shutil.rmtree(out)  # left by other settings
    result = run_attack(model_dir, task, spec.attack, out, **kw)
    record = AttackRun.from_result(result, defense=defense, label=spec.label, source=out / "result.json")
    if is_main_process():
        write_json(record_file, record.to_dict())
    if on_record is not None:
        on_record(record)
    return record


def _ratio(a, b):
    return a / b if b and abs(b) > 1e-12 and a is not None else None


def _best_point(records: list) -> tuple[object, dict, list[dict]]:
    """The attacker's best of one attack's sweep (``records``: its AttackRuns, every learning rate × seed):
    the learning rate with the best mean gain over seeds; returns that learning rate's first-seed record
    (curves and costs), the means over its seeds (scores, gain) and every point's gain."""
    from .eval.records import mean_run

    by_lr: dict = {}
    for r in records:
        by_lr.setdefault(r.config.get("lr"), []).append(r)
    means = {lr: mean_run(rs) for lr, rs in by_lr.items()}
    best = max(by_lr, key=lambda lr: means[lr]["gain"])  # the first such learning rate on a tie
    points = [{"lr": r.config.get("lr"), "seed": r.seed, "gain": r.gain} for r in records]
    return by_lr[best][0], means[best], points


def _attack_rows(runs: dict, references: dict, plan: DemoPlan) -> tuple[list[dict], list[dict]]:
    """One row per (defense, attack, task), read from the runs' :class:`~weightlock.eval.records.AttackRun`
    records only (``runs``: key → the records of every learning rate × seed; the row reports the attacker's best
    learning rate, its scores and gain averaged over seeds): gain, gain ratio and cost multipliers against the
    reference (``references``: (defense, attack label) → the label of its reference run on the original), and
    the training memory (counted: :data:`~weightlock.eval.cost.TRAINING_MEMORY`) against the budget, the
    original's full fine-tune on the same task: ``training_memory_ratio`` (the tables' ``memory ×``) and
    ``fits_memory``, what the verdict's "within memory" clause uses. Also returns the sweep (every point of the
    attacks run at more than one learning rate or seed; empty when none is)."""
    from .eval.cost_to_target import on_one_basis

    best = {k: _best_point(rs) for k, rs in runs.items()}
    sweep = [{"defense": k[0], "attack": k[1], "task": k[2], "lr": best[k][0].config.get("lr"), "points": best[k][2]}
             for k, rs in runs.items() if len(rs) > 1]
    # every run on one basis: counted when all are, else all estimated from older records' parameter counts
    counts, basis = on_one_basis([best[k][0].memory() for k in runs])
    memory = dict(zip(runs, counts))
    rows = []
    for (defense, label, task) in runs:
        r, mean = best[(defense, label, task)][:2]
        ref_label = references[(defense, label)]
        ref, ref_mean = best[("reference", ref_label or label, task)][:2]
        # the attacker's time: median step × steps run (robust to one-off first-step costs) + its preparation
        total, ref_total = (x.total_seconds(plan.attack_steps) for x in (r, ref))
        rows.append({
            "defense": defense, "attack": label, "task": task, "reference_attack": ref_label,
            "score_before": mean["score_before"], "score_after": mean["score_after"], "gain": mean["gain"],
            "reference_gain": ref_mean["gain"],
            "gain_ratio": _ratio(mean["gain"], ref_mean["gain"]) if defense != "reference" else 1.0,
            "saved_activation_bytes": r.saved_activation_bytes,
            "step_time_s": r.step_time_s, "total_seconds": total,
            "memory_ratio": _ratio(r.saved_activation_bytes, ref.saved_activation_bytes),
            "time_ratio": _ratio(total, ref_total), "peak_rss_bytes": r.peak_rss_bytes,
            # the run's own measured peak RSS growth: a measurement, reported; the budget is training memory
            "peak_delta_bytes": r.peak_rss_delta_bytes,
            "peak_ratio": _ratio(r.peak_rss_delta_bytes, ref.peak_rss_delta_bytes),
            "capability_ppl_before": r.capability_ppl_before, "capability_ppl_after": r.capability_ppl_after,
            "curve": r.score_curve, "reference_curve": ref.score_curve,
            "cost_curve": r.cost_curve(), "reference_cost_curve": ref.cost_curve(),
            "recovered_mask_density": r.extra.get("recovered_mask_density"),
            **_memory_fields(memory[(defense, label, task)], memory.get(("reference", "full", task)), basis),
        })
    return rows, sweep


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
        authorized = d.spec.authorized.label if d.spec.authorized else None
        attacks = [r for r in rows if r["defense"] == d.name and r["attack"] != authorized]
        broken, parts = [], []
        for task in dict.fromkeys(r["task"] for r in attacks):
            tr = [r for r in attacks if r["task"] == task and r["gain_ratio"] is not None]
            if not tr:
                parts.append(f"{task}: no measurable reference gain")
                continue
            best = max(tr, key=lambda r: r["gain_ratio"])
            parts.append(f"{task}: best attack {best['attack']} gets {best['gain_ratio']:.0%} of what it gains on the "
                         f"unlocked model"
                         + _multiplier_clause(rows, attacks, task))
            if best["gain_ratio"] >= 0.5:
                broken.append(f"{best['attack']} ({task})")
        line = "FAILS — broken by " + ", ".join(broken) if broken else "HOLDS against every attack run"
        line += "; " + "; ".join(parts)
        for note in d.hooks().verdict_notes(rows, summary):
            line += "; " + note
        auth = [r for r in rows if r["defense"] == d.name and r["attack"] == authorized]
        if auth:
            line += "; authorized fine-tuning gain ratio " + ", ".join(
                f"{r['task']} {fmt(r['gain_ratio'], '.0%')}" for r in auth)
        out[d.hooks().title] = line
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
        for line in d.hooks().summary_lines(summary):
            console.print(line)
    for name, line in summary["verdicts"].items():
        console.print(f"[bold]{name}[/]: {line}")


def _registered(summary: dict) -> list:
    """The registered defenses a recorded summary names, with their recorded configs where they load."""
    from .defenses import DEFENSES

    out = []
    for rec in defenses_of(summary):
        cls = DEFENSES.get(rec["name"], None)
        if cls is None:
            continue
        for make in (lambda: cls(cls.spec.Config(**rec.get("config", {}))), cls):  # noqa: B023  (called within this iteration)
            try:
                out.append(make())
                break
            except (TypeError, WeightlockError):
                continue
    return out
