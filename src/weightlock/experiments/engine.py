"""The experiment engine: one function (:func:`run_model`) runs every spec (``weightlock run``, ``weightlock demo``,
the shipped bench specs) on one of its models, in three stages whose outputs the next one reads:

* **build**: the original (a preset pretrained on builtin:code, or the spec's model directory), each defense's
  release (built from the original, or pretrained with its settings), each target (a release directory, or a
  ``.gguf`` file converted once);
* **attack**: the capability of every model, each defense's own evaluations, then one :class:`AttackJob` per
  (model, task, attack, learning rate, seed), each leaving an :class:`~weightlock.eval.records.AttackRun`
  (``record.json``) that a later run reuses; the summary (``summary.json``) reads only the records;
* **analyse**: the spec's registered analyses (:mod:`weightlock.experiments.analyses`) on the summary.

Every setting comes from the spec (:class:`~weightlock.experiments.spec.ExperimentSpec`): :class:`RunPlan` is
a view of the spec for one model, not a copy of its values.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.table import Table

from .. import schema
from ..errors import WeightlockError
from ..io import jsonable, machine_info, read_json, write_json
from ..tables import ATTACK_CAPTION, ATTACK_HEAD, CAPABILITY_HEAD, attack_rows, capability_rows, fmt
from .harness import release_fidelity
from .spec import LR_GROUPS, ExperimentSpec, ModelSpec, TargetEntry, thaw


def _refuse_other_seed(run_dir: Path, seed: int) -> None:
    """A pretraining run left in ``run_dir`` (its saved run config, or PMP's) at another seed than ``seed`` is
    refused before any work: resuming would keep the saved seed."""
    from ..pmp.train import CONFIG_FILE
    from ..train.pretrain import run_config

    pmp = Path(run_dir) / CONFIG_FILE
    for cfg in (run_config(run_dir), (read_json(pmp).get("config") or {}) if pmp.is_file() else {}):
        saved = cfg.get("train", {}).get("seed")
        if saved is not None and saved != seed:
            raise WeightlockError(f"{run_dir} was pretrained at seed {saved}, this run asks for seed {seed} "
                                  "(--seed): give the run another --out")


@dataclass(frozen=True)
class RunPlan:
    """The spec as one model's run reads it (what a defense's hooks read: ``tasks``, ``memory_depths``,
    ``reverse_distill_steps``, ``block_size``; :class:`~weightlock.defenses.plan.HarnessPlan`)."""

    spec: ExperimentSpec
    model: ModelSpec

    @property
    def preset(self) -> str:
        return self.model.preset

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    @property
    def memory_depths(self) -> tuple[int, ...]:
        return self.spec.measure.memory_depths

    @property
    def reverse_distill_steps(self) -> int:
        return self.spec.budget.reverse_distill_steps

    @property
    def block_size(self) -> int:
        b = self.spec.budget.block_size
        return b if b is not None else 64 if self.preset == "tiny" else 128

    @property
    def train_tokens(self) -> int:
        t = self.spec.budget.train_tokens
        return t if t is not None else 50_000 if self.preset == "tiny" else 200_000

    def attack_budget(self) -> dict:
        """The attack options every run shares (a job's own options win)."""
        b = self.spec.budget
        return dict(steps=b.steps, batch_size=b.batch, score_every=b.score_every, patience=b.patience,
                    block_size=self.block_size, train_tokens=self.train_tokens)

    def to_dict(self) -> dict:
        """What the summary records as its plan (a summary left by another plan is stale)."""
        d = self.spec.to_dict()
        return {"preset": self.preset, "model": {k: v for k, v in dataclasses.asdict(self.model).items()
                                                 if v is not None},
                **{k: d[k] for k in ("learning_rates", "tasks", "seeds", "budget", "measure")},
                "block_size": self.block_size, "train_tokens": self.train_tokens}


@dataclass(frozen=True)
class AttackJob:
    """One attack run, the engine's one job type: ``attack`` (registered) with ``options`` on the model in
    ``model_dir`` (the ``target`` key: ``reference``, a defense's or a target's label) on ``task``, at ``lr`` and
    ``seed``, under ``out``, recorded as the attack ``label``."""

    target: str
    model_dir: Path
    task: str
    label: str
    attack: str
    options: dict
    lr: float
    seed: int
    out: Path

    def run(self, on_record: Callable | None = None):
        """The job's :class:`~weightlock.eval.records.AttackRun`: the record in ``out`` when it matches what would
        run (target, task, every option), else the attack run now (a run left by other settings is discarded
        first) and its record written."""
        from ..attacks import make_attack, run_attack
        from ..eval.records import AttackRun
        from ..train.finetune import is_main_process

        out = self.out
        kw = {**self.options, "lr": self.lr, "seed": self.seed}
        config = jsonable(make_attack(self.attack, **kw).cfg.options())
        record_file = out / "record.json"
        if record_file.exists() or (out / "result.json").exists():
            try:
                old = (AttackRun.from_dict(read_json(record_file), record_file) if record_file.exists()
                       else AttackRun.from_result(read_json(out / "result.json"), defense=self.target,
                                                  label=self.label))
            except (WeightlockError, KeyError, TypeError, ValueError):
                old = None
            if (old is not None and jsonable(old.config) == config and old.target == str(self.model_dir)
                    and old.task == self.task and old.attack == self.label and old.defense == self.target):
                if not record_file.exists() and is_main_process():
                    write_json(record_file, old.to_dict())  # a run killed between its result and its record
                return old
            shutil.rmtree(out)  # left by other settings
        result = run_attack(self.model_dir, self.task, self.attack, out, **kw)
        record = AttackRun.from_result(result, defense=self.target, label=self.label, source=out / "result.json")
        if is_main_process():
            write_json(record_file, record.to_dict())
        if on_record is not None:
            on_record(record)
        return record


def select_defenses(names: Sequence | None, spec: ExperimentSpec) -> list:
    """The defenses a run builds: the spec's (each called by its label), or those named (a label or registry
    name of the spec's, configured by it; another registered name with its config's defaults; or a ready
    :class:`~weightlock.defenses.Defense`)."""
    from ..defenses import DEFENSES, Defense, make_defense

    if names is None:
        chosen = [e.make() for e in spec.defenses]
    else:
        chosen = []
        for n in names:
            if isinstance(n, Defense):
                chosen.append(n)
                continue
            entries = [e for e in spec.defenses if n in (e.key, e.name)]
            chosen += [e.make() for e in entries] if entries else [make_defense(n)]
    if not chosen and not spec.targets:
        raise WeightlockError("no defense to run; name one with --defense (registered: "
                              f"{', '.join(DEFENSES)})")
    seen = [d.name for d in chosen] + [t.name for t in spec.targets]
    if len(set(seen)) != len(seen):
        raise WeightlockError(f"a defense is named twice: {', '.join(seen)}")
    dirs = [_workdir(d) for d in chosen]
    if "base" in dirs or len(set(dirs)) != len(dirs):
        raise WeightlockError(f"defense build directories must differ from each other and from 'base': "
                              f"{', '.join(dirs)}")
    return chosen


def _labelled(d) -> bool:
    """A defense called by a label of the spec's, not its registered name (a sweep's point)."""
    return d.name != type(d).name


def _workdir(d) -> str:
    return d.name if _labelled(d) else d.spec.workdir or d.name


def _title(d) -> str:
    """The defense's verdict name: its title, with its label when it has one."""
    if getattr(d, "target", None):
        return d.name
    return f"{d.hooks().title} ({d.name})" if _labelled(d) else d.hooks().title


def _target_defense(t: TargetEntry):
    """A target as the engine runs it: the ``none`` defense called by the target's name."""
    from ..defenses import make_defense

    d = make_defense("none")
    d.name, d.target, d.max_ppl_ratio = t.name, t.path, t.max_ppl_ratio
    return d


def attack_specs(d, spec: ExperimentSpec) -> list:
    """The attacks that run on ``d`` (a defense or a target): its plan's (all, or those the spec's attacks
    label) and the spec's explicit attacks (on every defense and target, or those their ``on`` names)."""
    from ..defenses.plan import AttackSpec

    attacks = spec.attacks
    out = [s for s in d.plan() if attacks is None or (s.label in attacks and attacks[s.label].attack is None)]
    for label, e in (attacks or {}).items():
        if e.attack is not None and (e.against is None or d.name in e.against):
            out.append(AttackSpec(label, e.attack, thaw(e.options), e.group, e.reference or label))
    return out


def _reference_specs(reference, chosen: list, spec: ExperimentSpec) -> list:
    """The attacks on the original that the chosen defenses' attacks are compared with; checks every attack's
    reference and learning-rate group before any work."""
    from ..attacks import ATTACKS
    from ..defenses.plan import AttackSpec

    refs = {s.label: s for s in reference.spec.attacks}
    for label, e in (spec.attacks or {}).items():
        if e.attack is not None:
            refs[label] = AttackSpec(label, e.attack, thaw(e.options), e.group, label)
    needed = []
    for d in chosen:
        for s in attack_specs(d, spec):
            if s.reference not in refs:
                raise WeightlockError(f"defense {d.name!r}: attack {s.label!r} is compared with reference "
                                      f"{s.reference!r}; the original's attacks are {', '.join(refs)}")
            if s.lr not in LR_GROUPS:
                raise WeightlockError(f"defense {d.name!r}: attack {s.label!r} asks for learning rate "
                                      f"{s.lr!r}; the spec has {', '.join(LR_GROUPS)}")
            if s.attack not in ATTACKS:
                raise WeightlockError(f"defense {d.name!r}: unknown attack {s.attack!r}; available: "
                                      f"{', '.join(sorted(ATTACKS))}")
            if s.reference not in needed:
                needed.append(s.reference)
    needed += [k for k, e in (spec.attacks or {}).items() if e.against and "reference" in e.against]
    return [refs[label] for label in refs if label in needed]


def check_run(spec: ExperimentSpec, defenses: Sequence | None = None) -> None:
    """Everything :func:`run_model` refuses before any work: the defenses chosen, each attack's reference."""
    from ..defenses import make_defense

    chosen = select_defenses(defenses, spec) + [_target_defense(t) for t in spec.targets]
    _reference_specs(make_defense("none"), chosen, spec)


def run_model(out: Path, spec: ExperimentSpec, model: ModelSpec | None = None, defenses: Sequence | None = None,
              report: bool | None = None, *, on_record: Callable | None = None) -> dict:
    """Run (or resume) ``spec`` on ``model`` (default: its first) in ``out`` and return the summary also written
    to ``out/summary.json`` (the stages ``spec.stages`` names; without the attack stage, the recorded summary).

    ``defenses``: labels or registry names (configured by the spec) or :class:`~weightlock.defenses.Defense`
    objects (default: the spec's). Every attack runs at every learning rate × seed, the row reporting the
    attacker's best learning rate (mean gain over seeds). Each run leaves one
    :class:`~weightlock.eval.records.AttackRun` (``record.json`` in its directory): a finished run is skipped
    when its record matches what would run; ``on_record(record)`` is called after each new one. The summary's
    attack rows read only the records."""
    from ..defenses import make_defense
    from ..train.pretrain import METRICS_FILE, default_config, pretrain

    model = model or spec.models[0]
    plan = RunPlan(spec, model)
    console = Console()
    chosen = select_defenses(defenses, spec)
    targets = [_target_defense(t) for t in spec.targets]
    reference = make_defense("none")
    ref_specs = _reference_specs(reference, chosen + targets, spec)
    out = Path(out)
    if "build" not in spec.stages and "attack" not in spec.stages:  # the analyses of what is recorded
        summary = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
        _analyse(out, spec, summary, console)
        return summary
    seeds = tuple(spec.seeds)
    base_model = model.path
    if base_model is not None:
        if not (Path(base_model) / "config.json").is_file():
            raise WeightlockError(f"{base_model}: not a model directory (no config.json)")
        pre = [d.name for d in chosen if d.spec.pretraining]
        if pre:
            raise WeightlockError(f"{', '.join(pre)} pretrains its own model: it needs the plan's preset, "
                                  f"not the model {base_model}")
    for t in targets:
        p = Path(t.target)
        if not (p.is_dir() or p.suffix.lower() == ".gguf" and p.is_file()):
            raise WeightlockError(f"target {t.name}: {p} is neither a model directory nor a .gguf file")
        if t.max_ppl_ratio is not None:
            ratio = release_fidelity(p)["ppl_ratio"]
            if ratio > t.max_ppl_ratio:
                raise WeightlockError(f"target {t.name}: {p} has ppl ratio {ratio:.4f} > {t.max_ppl_ratio}: not a "
                                      "faithful release")
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

    preset = plan.preset
    base = out / f"base-{preset}" if base_model is None else Path(base_model)
    # a labelled defense (a sweep's point) builds in a directory of its label; a registered one in NAME-PRESET
    work = {d.name: out / (d.name if _labelled(d) else f"{_workdir(d)}-{preset}") for d in chosen}
    rebuilt: set[str] = set()

    seeded = {} if model.seed is None else {"seed": model.seed}
    seed = default_config(preset, **seeded).train.seed
    for run_dir in ([base] if base_model is None else []) + [work[d.name] for d in chosen if d.spec.pretraining]:
        _refuse_other_seed(run_dir, seed)

    def pretrain_base():
        pretrain(default_config(preset, **seeded), base, overwrite=False, resume=True)

    if base_model is None and stage(f"pretrain the dense {preset} base model on builtin:code",
                                    (base / METRICS_FILE).exists() and not (base / "checkpoint").exists(),
                                    pretrain_base):
        rebuilt.add("reference")
    models = {"reference": Path(reference.apply(base, out / f"reference-{preset}"))}
    # pretraining-time defenses first (pretraining runs, like the base), then those applied to the base
    for d in sorted(chosen, key=lambda d: not d.spec.pretraining):
        release = d.release(work[d.name])
        stale = release is None or ("reference" in rebuilt and not d.spec.pretraining)
        source = default_config(preset, **seeded) if d.spec.pretraining else base
        built: list[Path] = []
        if stage(d.hooks().build_title(), not stale, lambda: built.append(d.build(source, work[d.name]))):  # noqa: B023  (called within this iteration)
            rebuilt.add(d.name)
            release = built[0]
        models[d.name] = release
    for t in targets:
        models[t.name] = _target_model(t, out, stage)
    models = {"reference": models["reference"], **{d.name: models[d.name] for d in chosen + targets}}
    if "attack" not in spec.stages:
        console.print("built: " + ", ".join(f"{k} {v}" for k, v in models.items()))
        return {"models": {k: str(v) for k, v in models.items()}}

    cached = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    if cached.get("plan") != jsonable(plan.to_dict()) or "reference" in rebuilt:  # earlier results are stale
        cached = {}
    for name in rebuilt:
        shutil.rmtree(out / "attacks" / ("" if name == "reference" else name), ignore_errors=True)
    extra_names = [k.replace("_", " ") for d in chosen for k in d.spec.evaluations]
    console.rule("[bold]capability" + (" and " + ", ".join(dict.fromkeys(extra_names)) if extra_names else ""))
    cached_cap = cached.get("capability", {})
    capability = {k: cached_cap[k] if k in cached_cap and k not in rebuilt else _capability(m, spec)
                  for k, m in models.items()}
    evaluations: dict = {}
    by_label: dict[str, dict] = {}
    for d in chosen:
        mine = cached.get("by_defense", {}).get(d.name, {}) if _labelled(d) else cached
        if d.name not in rebuilt and all(k in mine for k in d.spec.evaluations):
            ev = {k: mine[k] for k in d.spec.evaluations}
        else:
            ev = d.hooks().evaluate(models[d.name], work[d.name], plan)
        (by_label.setdefault(d.name, {}) if _labelled(d) else evaluations).update(ev)

    console.rule("[bold]attacks")
    specs = ([(reference, "reference", s) for s in ref_specs]
             + [(d, d.name, s) for d in chosen + targets for s in attack_specs(d, spec)])
    runs = {}
    budget = plan.attack_budget()
    entries = spec.attacks or {}
    # those at another attack's best learning rate after the rest (their stage reads the others' records)
    specs.sort(key=lambda x: entries.get(x[2].label) is not None and entries[x[2].label].best_of is not None)
    for task in spec.tasks:
        for defense, key, s in specs:
            entry = entries.get(s.label)
            if entry is not None and entry.tasks and task not in entry.tasks:
                continue
            override = thaw(entry.options) if entry is not None and entry.attack is None else {}
            needs = defense.hooks().attack_options(s, work.get(key, models[key]), plan)
            opts = {**budget, **s.options, **needs, **override}
            if entry is not None and entry.best_of is not None:
                of = entry.best_of.removeprefix("reference:")
                where = ("reference" if entry.best_of != of else key, of, task)
                if where not in runs:
                    raise WeightlockError(f"attack {s.label!r} on {key} ({task}) runs at the best rate of {of!r} on "
                                          f"{where[0]}, which does not run there")
                lrs = (_best_point(runs[where])[0].config["lr"],)
            else:
                lrs = spec.lrs(s.label, s.lr)
            points = [(lr, seed) for lr in lrs for seed in (entry.seeds if entry and entry.seeds else seeds)]
            run_dir = out / "attacks" / key / task / s.label
            console.print(f"{task:7s} {key:9s} {s.label}")
            runs[(key, s.label, task)] = [
                AttackJob(key, models[key], task, s.label, s.attack, opts, lr, seed,
                          run_dir if len(points) == 1 else run_dir / f"lr{lr:g}-seed{seed}").run(on_record)
                for lr, seed in points]
    references = {(key, s.label): (None if key == "reference" else s.reference) for _, key, s in specs}
    rows, sweep = _attack_rows(runs, references, spec.budget.steps) if runs else ([], [])
    summary = {
        "kind": schema.DEMO, "schema_version": schema.SCHEMA_VERSION, "weightlock_demo": 1,
        "preset": preset, "plan": jsonable(plan.to_dict()), "defenses": [d.record() for d in chosen],
        "models": {k: str(v) for k, v in models.items()}, "capability": capability, **evaluations,
        "attacks": rows, "training_memory": training_memory_summary(rows),
    }
    if targets:
        summary["targets"] = {t.name: t.target for t in targets}
    if sweep:  # more than one learning rate or seed per attack: every point, and the one the row reports
        summary["sweep"] = sweep
    for d in chosen:
        found = d.hooks().summarize(rows, work[d.name], plan)
        (by_label.setdefault(d.name, {}) if _labelled(d) else summary).update(found)
    if by_label:
        summary["by_defense"] = by_label
    summary["verdicts"] = verdicts(rows, summary, chosen + targets) if rows else {}
    summary["seconds"] = {"this_run": time.perf_counter() - t0, "stages": stage_s}
    summary["machine"] = machine_info()
    write_json(out / "summary.json", summary)
    print_summary(summary, console, chosen + targets)
    if spec.measure.report if report is None else report:
        from ..report import build_report

        index = build_report([out], out / "report")
        console.print(f"report: {index}")
    console.print(f"summary written to {out / 'summary.json'} ({summary['seconds']['this_run']:.0f} s)")
    if "analyse" in spec.stages:
        _analyse(out, spec, summary, console)
    return summary


def _target_model(t, out: Path, stage) -> Path:
    """A target's model directory: itself, or its ``.gguf`` file converted once under ``out/targets``."""
    p = Path(t.target)
    if p.is_dir():
        return p
    from ..models.gguf import convert_gguf

    dest = out / "targets" / t.name
    stage(f"convert the target {p} to a model directory", (dest / "config.json").is_file(),
          lambda: convert_gguf(p, dest, overwrite=True))
    return dest


def _analyse(out: Path, spec: ExperimentSpec, summary: dict, console: Console) -> None:
    """The analyse stage: each of the spec's analyses on the summary, its result in ``out/analysis/NAME.json``."""
    from .analyses import run_analysis

    for a in spec.analyses:
        console.rule(f"[bold]analysis {a.name}")
        run_analysis(a, out, spec, summary, thaw(a.options))


def _capability(model_dir: Path, spec: ExperimentSpec) -> dict:
    from ..eval.perplexity import model_perplexity

    return {d: model_perplexity(model_dir, f"builtin:{d}", "validation",
                                max_tokens=spec.measure.capability_tokens)["perplexity"]
            for d in ("code", "prose")}


def _ratio(a, b):
    return a / b if b and abs(b) > 1e-12 and a is not None else None


def _best_point(records: list) -> tuple[object, dict, list[dict]]:
    """The attacker's best of one attack's sweep (``records``: its AttackRuns, every learning rate × seed):
    the learning rate with the best mean gain over seeds; returns that learning rate's first-seed record
    (curves and costs), the means over its seeds (scores, gain) and every point's gain."""
    from ..eval.records import mean_run

    by_lr: dict = {}
    for r in records:
        by_lr.setdefault(r.config.get("lr"), []).append(r)
    means = {lr: mean_run(rs) for lr, rs in by_lr.items()}
    best = max(by_lr, key=lambda lr: means[lr]["gain"])  # the first such learning rate on a tie
    points = [{"lr": r.config.get("lr"), "seed": r.seed, "gain": r.gain} for r in records]
    return by_lr[best][0], means[best], points


def _attack_rows(runs: dict, references: dict, steps: int) -> tuple[list[dict], list[dict]]:
    """One row per (defense, attack, task), read from the runs' :class:`~weightlock.eval.records.AttackRun`
    records only (``runs``: key → the records of every learning rate × seed; the row reports the attacker's best
    learning rate, its scores and gain averaged over seeds): gain, gain ratio and cost multipliers against the
    reference (``references``: (defense, attack label) → the label of its reference run on the original), and
    the training memory (counted: :data:`~weightlock.eval.cost.TRAINING_MEMORY`) against the budget, the
    original's full fine-tune on the same task: ``training_memory_ratio`` (the tables' ``memory ×``) and
    ``fits_memory``, what the verdict's "within memory" clause uses. Also returns the sweep (every point of the
    attacks run at more than one learning rate or seed; empty when none is)."""
    from ..eval.cost_to_target import on_one_basis

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
        total, ref_total = (x.total_seconds(steps) for x in (r, ref))
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
    from ..eval.cost import TRAINING_MEMORY
    from ..eval.cost_to_target import MEMORY_BASIS

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
        out[_title(d)] = line
    return out


def _multiplier_clause(rows: list[dict], attacks: list[dict], task: str) -> str:
    """The lock cost multiplier on ``task`` (``attacks``: the defense's unauthorized attack rows; the
    original's are the reference rows), or nothing for results recorded without cost curves."""
    from ..eval.cost_to_target import AttackCurve, multiplier_note

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
        from ..defenses import registered_in

        defenses = registered_in(summary)
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
