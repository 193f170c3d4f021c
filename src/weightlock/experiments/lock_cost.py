"""The lock cost multiplier of a grid of attack runs (``weightlock run cost-to-target``, was
``bench/cost_to_target.py``): the security verdict as a cost — what an attacker pays to reach the unlocked
attacker's gain, per task and defense, in seconds, FLOPs and tokens, with every attack, within the unlocked full
fine-tune's training memory (counted) and within its activation budget.

The runs go side by side with other work, so their own clocks are not comparable: a quiet pass
(:func:`quiet_timings`) times every distinct (model, attack, options) alone, repeated in alternating order, and a
run's ``seconds`` become its quiet preparation time + steps × the quiet median step time
(:func:`with_quiet_seconds`; its own clock is kept as ``seconds_in_run``). :func:`reanalyse` analyses a recorded
result again; a row recorded before weightlock counted training memory gets it counted from its rebuilt
architecture (:func:`with_training_memory`). The analysis ``lock-cost`` runs all of it on a spec's records.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import schema
from .analyses import AnalysisContext, register_analysis
from .harness import max_gain, timing_key

BUDGET = dict(batch_size=8, block_size=128, train_tokens=200_000, score_every=20, patience=3, progress=False)
COSTS = ("seconds", "flops", "tokens")
Q = 0.9
BUDGET_KEYS = ("steps", "batch_size", "block_size", "train_tokens", "score_every", "patience", "progress", "lr",
               "seed")


def quiet_timings(models: dict, rows: list[dict], repeats: int, steps: int = 10, budget: dict | None = None) -> dict:
    """Median training-step time (and preparation time) of every distinct (model, attack, options), measured
    in this process alone, one configuration after another, the whole pass repeated ``repeats`` times
    (the runs themselves ran two at a time beside other work, so their own clocks are not comparable)."""
    from ..attacks import run_attack

    budget = {**(budget or BUDGET), "steps": steps, "score_every": 0, "patience": 0}

    keys = list(dict.fromkeys(timing_key(r) for r in rows))
    seen: dict[tuple, list] = {k: [] for k in keys}
    for rep in range(repeats):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            model, attack, opts = key
            o = dict(opts)
            if attack == "reverse-distill":
                o["distill_steps"] = o.get("distill_steps", 300)
            r = run_attack(models[model], "prose", attack, None, **{**o, **budget})["target"]
            seen[key].append((r["cost"]["step_time_s"], r["cost"]["prepare_seconds"],
                              r["cost"]["saved_activation_bytes_per_step"]))
            print(f"timing {model:8s} {attack:16s} {o} step {seen[key][-1][0]:.3f} s", flush=True)
    return {k: {"step_time_s": statistics.median(x[0] for x in v),
                "prepare_seconds": statistics.median(x[1] for x in v), "step_times": [x[0] for x in v],
                "saved_activation_bytes": v[0][2]} for k, v in seen.items()}


def with_quiet_seconds(rows: list[dict], timings: dict) -> list[dict]:
    """Each run's curve with ``seconds`` = quiet preparation time + steps × quiet median step time (the run's
    own clock kept as ``seconds_in_run``)."""
    out = []
    for r in rows:
        t = timings[timing_key(r)]
        prep = t["prepare_seconds"] if r["attack"] == "reverse-distill" else 0.0
        curve = [{**p, "seconds_in_run": p.get("seconds_in_run", p["seconds"]),
                  "seconds": 0.0 if i == 0 else prep + p["step"] * t["step_time_s"]}
                 for i, p in enumerate(r["cost_curve"])]
        out.append({**r, "cost_curve": curve, "quiet_step_time_s": t["step_time_s"]})
    return out


def row_memory(r: dict) -> dict:
    """A run's training memory (weightlock.eval.cost_to_target.run_training_memory): recorded in its row, else
    read from its run directory's result.json when that is still there (rows analysed before weightlock
    counted it), else unknown."""
    from ..eval.cost_to_target import run_training_memory
    from ..schema import target_run

    if r.get("training_memory"):
        return r["training_memory"]
    f = Path(r.get("dir", "")) / "result.json"
    if r.get("dir") and f.is_file():
        return run_training_memory(target_run(json.loads(f.read_text())), r["options"].get("optimizer"))
    return {"counted": None, "estimated": None}


# the bench's locks as the recorded runs of 2026-11-24 had them: weightlock lock installed no sink component
# then (LockConfig.sink, on by default since 2026-12-03); a JSON records its locks' settings from then on
LOCK_SETTINGS_2026_11 = {"sink": False}
PRESET = "small"  # the bench's base model preset (the dlr-fidelity spec)


def architecture(key: str, preset: str = PRESET, lock_settings: dict | None = None, tokenizer=None):
    """The model ``key`` of this bench (``original``, ``pmp``, ``dlr-R``, ``dlr-R-norm``) rebuilt with fresh
    random weights, nothing trained or distilled: the dense ``preset`` model as the dlr-fidelity spec pretrains
    it (PMP's model has the same architecture), or its DLR lock at rank R (per-block norm for ``-norm``) with
    the DLR-Nets ``weightlock lock`` installs — the lock's own specs (weightlock.dlr.distill.specs_for: depth
    matched to the MLP's parameters) for ``LockConfig(rank=R, norm=..., **lock_settings)`` — built the way a
    release loads (build_locked_model on the config section the release writes)."""
    from dataclasses import asdict

    from ..data import load_tokenizer
    from ..dlr import LockConfig, adapter_for
    from ..dlr.distill import specs_for
    from ..dlr.modeling_weightlock_dlr import DLR_CONFIG_KEY, build_locked_model
    from ..train.pretrain import build_model, default_config

    cfg = default_config(preset)
    model = build_model(cfg, tokenizer or load_tokenizer(None, cfg.vocab_size))
    if key in ("original", "pmp"):
        return model
    if not key.startswith("dlr-"):
        raise ValueError(f"no architecture for model {key!r} (original, pmp, dlr-R, dlr-R-norm)")
    lock_cfg = LockConfig(rank=int(key.split("-")[1]), norm=key.endswith("-norm"), progress=False,
                          **(lock_settings or {}))
    adapter, specs, _ = specs_for(model, lock_cfg)
    config = model.config
    setattr(config, DLR_CONFIG_KEY, {"base_class": type(model).__name__, "adapter": adapter_for(model).to_dict(),
                                     "layers": [asdict(s) if s is not None else None for s in specs]})
    return build_locked_model(config)


def recount_memory(row: dict, model, tokenizer, budget: dict | None = None) -> dict:
    """A run's training memory counted again without running it (its record predates the count): ``model``,
    the run's model rebuilt (:func:`architecture`), set up to train as the row's attack sets it up — the
    attack's own ``prepare`` (LoRA's adapters, the frozen DLR-Nets; reverse distillation's dense student, built
    without distilling: its architecture does not depend on the distillation) and counter-measures — and counted
    (weightlock.eval.cost_to_target.counted_training_memory) with the run's own saved-activation bytes."""
    from ..attacks import apply_checkpointing, make_attack
    from ..eval.cost_to_target import counted_training_memory

    options = {**(budget or BUDGET), **row["options"]}
    if row["attack"] == "reverse-distill":  # the student, not fitted (a capture of one block stays)
        options.update(distill_steps=0, distill_tokens=options.get("block_size", 128))
    atk = make_attack(row["attack"], **options)
    prepared = atk.prepare(model, tokenizer, {})
    apply_checkpointing(prepared, atk.cfg.checkpointing)  # changes no parameter; as the run had it
    return counted_training_memory(prepared, atk.cfg.training.optimizer, row["saved_activation_bytes"])


RECOUNT_HOW = "architecture rebuilt, saved-activation bytes from the run"


def with_training_memory(rows: list[dict], preset: str = PRESET, lock_settings: dict | None = None,
                         recount_all: bool = False) -> tuple[list[dict], dict | None]:
    """The rows, each with its training memory: recorded (in the row, or its run directory's result.json),
    else counted again from its architecture (:func:`recount_memory`, marked ``"how": "recounted"``);
    ``recount_all`` recounts every row, and a row with a recorded count must come out the same. Returns the
    rows and what was recounted (None when nothing was)."""
    import copy
    import datetime

    from ..data import load_tokenizer
    from ..dlr import DLRNet
    from ..train.pretrain import default_config

    tok = None
    built: dict[str, object] = {}
    out, n = [], 0
    for r in rows:
        recorded = row_memory(r)
        if recorded["counted"] is not None and not recount_all:
            out.append(r)
            continue
        tok = tok or load_tokenizer(None, default_config(preset).vocab_size)
        if r["model"] not in built:
            built[r["model"]] = architecture(r["model"], preset, lock_settings, tok)
        m = recount_memory(r, copy.deepcopy(built[r["model"]]), tok)
        if recorded["counted"] is not None and recorded["counted"] != m["counted"]:
            raise RuntimeError(f"{r['task']} {r['model']} {r['label']}: recounted {m['counted']} bytes, "
                               f"the run counted {recorded['counted']}")
        out.append({**r, "training_memory": {**m, "how": "recounted"}})
        n += 1
    if not n:
        return out, None
    return out, {"date": datetime.date.today().isoformat(), "how": RECOUNT_HOW, "rows": n, "preset": preset,
                 "lock_settings": lock_settings or {},
                 "models": {k: {"parameters": sum(p.numel() for p in m.parameters()),
                                "dlr_depth": sorted({b.spec.depth for b in m.modules() if isinstance(b, DLRNet)})}
                            for k, m in built.items()}}


def analyse(rows: list[dict], defenses: list[str], tasks, q: float = Q) -> list[dict]:
    """Per task and defense: the target (``q`` × the best gain any attack reaches on the original), each run's
    cost to it, the seed spread and the lock cost multiplier in seconds, FLOPs and tokens, with every attack, within
    the original full fine-tune's training memory (counted) and within its activation budget."""
    from ..eval.cost import TRAINING_MEMORY
    from ..eval.cost_to_target import (
        MEMORY_BASIS,
        AttackCurve,
        cost_to_target,
        lock_cost_multiplier,
        on_one_basis,
    )

    out = []
    for task in tasks:
        orig = [r for r in rows if r["task"] == task and r["model"] == "original"]
        mine = [r for r in rows if r["task"] == task]
        counts, basis = on_one_basis([row_memory(r) for r in mine])  # every run compared on one basis
        memory = {id(r): m for r, m in zip(mine, counts)}
        plain = [memory[id(r)] for r in orig if r["attack"] == "full" and "ckpt" not in r["label"]
                 and memory[id(r)] is not None]
        budget = max(plain) if plain else None  # the original's full fine-tune's training memory
        target = q * max(max_gain(r) for r in orig)
        seeds = {}
        for key in ["original", *defenses]:
            mine = [r for r in rows if r["task"] == task and r["model"] == key]
            pairs = [(r, next((s for s in mine if s["label"] == r["label"] + "-seed1"), None)) for r in mine]
            seeds[key] = [{"label": r["label"], "best_gain": [max_gain(r), max_gain(s)],
                           "seconds_to_target": [cost_to_target(r["cost_curve"], target, "seconds"),
                                                 cost_to_target(s["cost_curve"], target, "seconds")]}
                          for r, s in pairs if s is not None]
        curves = {key: [AttackCurve(r["label"], r["cost_curve"], r["peak_delta_bytes"], memory_bytes=memory[id(r)])
                        for r in rows if r["task"] == task and r["model"] == key]
                  for key in ["original", *defenses]}
        act_budget = max(r["saved_activation_bytes"] for r in orig
                         if r["attack"] == "full" and "ckpt" not in r["label"])
        act_curves = {key: [AttackCurve(r["label"], r["cost_curve"], memory_bytes=r["saved_activation_bytes"])
                            for r in rows if r["task"] == task and r["model"] == key]
                      for key in ["original", *defenses]}
        for key in defenses:
            entry = {"task": task, "defense": key, "q": q, "target_gain": target, "memory_budget_bytes": budget,
                     "memory_budget_definition": TRAINING_MEMORY, "memory_basis": basis,
                     "memory_basis_note": MEMORY_BASIS[basis], "activation_budget_bytes": act_budget,
                     "best_original_gain": target / q,
                     "best_gain": max(max_gain(r) for r in rows if r["task"] == task and r["model"] == key),
                     "seed_spread": {"original": seeds["original"], key: seeds[key]}}
            entry["gain_ratio_at_convergence"] = entry["best_gain"] / entry["best_original_gain"]
            for cost in COSTS:
                for name, mb in (("any_memory", None), ("memory_budget", budget), ("activation_budget", act_budget)):
                    if name == "memory_budget" and budget is None:  # no training-memory count: no budget
                        entry[f"{cost}_{name}"] = {"multiplier": None, "note": MEMORY_BASIS["unknown"]}
                        continue
                    c = act_curves if name == "activation_budget" else curves
                    m = lock_cost_multiplier(c[key], c["original"], q, cost, mb)
                    entry[f"{cost}_{name}"] = {k: m[k] for k in ("multiplier", "locked_min", "original_min",
                                                                 "locked", "original")}
            out.append(entry)
    return out


def reanalyse(d: dict, tasks, recount_all: bool = False, command: str | None = None) -> dict:
    """The recorded bench JSON ``d`` analysed again, no training: every row first gets its training memory
    (:func:`with_training_memory`: a row recorded before weightlock counted it, its run directory gone, is
    counted again from its rebuilt architecture; ``recount_all``: every row), so that the memory budget is
    the counted one, then :func:`analyse`. A recount is recorded in ``memory_recounted`` (date, how, the
    ``command``). Returns the new record."""
    d = dict(d)
    # records from before the locks' settings were kept: the locks of 2026-11 (no sink component)
    d["runs"], recounted = with_training_memory(d["runs"], d.get("preset", PRESET),
                                                d.get("lock_settings", LOCK_SETTINGS_2026_11), recount_all)
    if recounted:
        d["memory_recounted"] = {**recounted, "command": command}
    wanted = [k for k in d["models"] if k != "original" and k in {a["defense"] for a in d["analysis"]}]
    d["analysis"] = analyse(d["runs"], wanted, tasks)
    return d


def plot(rows: list[dict], analysis: list[dict], defenses: list[str], tasks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..tables import fmt

    fig, axes = plt.subplots(len(tasks), len(defenses), figsize=(5.5 * len(defenses), 4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, key in enumerate(defenses):
            ax = axes[i][j]
            a = next(e for e in analysis if e["task"] == task and e["defense"] == key)
            for model, style in (("original", "--"), (key, "-")):
                for r in rows:
                    if r["task"] != task or r["model"] != model or r["label"].endswith("seed1"):
                        continue
                    c = r["cost_curve"]
                    mem = row_memory(r)["counted"]  # runs over the counted memory budget: faint, marked
                    over = a["memory_basis"] == "counted" and mem is not None and mem > a["memory_budget_bytes"]
                    ax.plot([p["seconds"] for p in c], [p["score"] - c[0]["score"] for p in c], style,
                            label=f"{'original' if model == 'original' else 'lock'}: {r['label']}"
                                  + (" (over memory)" if over else ""), lw=1.2, alpha=0.4 if over else 1.0)
            ax.axhline(a["target_gain"], color="k", lw=0.8, ls=":")
            m, mb = a["seconds_any_memory"]["multiplier"], a["seconds_memory_budget"]["multiplier"]
            ax.set_title(f"{task} · {key}: cost multiplier {m:.2f}× (seconds); within the original's training "
                         f"memory {fmt(mb, '.2f')}×", fontsize=8)
            ax.set_xlabel("attacker's cumulative training seconds")
            ax.set_ylabel("gain over the release")
            ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def record_row(r, run_dir: Path | None = None, budget_keys=BUDGET_KEYS) -> dict:
    """One attack record as a row of this analysis (the shape the recorded ``cost_to_target.json`` holds): the
    model (``original`` for the reference), the label with its rate and seed (a spec's ``LABEL@VARIANT``, e.g.
    ``full@seed1``, is the attack ``LABEL`` in the rows), the attack's own options (the budget's aside), the cost
    curve, the measured peak growth, the counted training memory and the costs."""
    options = {k: v for k, v in r.config.items() if k not in budget_keys}
    label = f"{r.attack.split('@')[0]}-lr{r.config.get('lr'):g}" + (f"-seed{r.seed}" if r.seed else "")
    return {"model": "original" if r.defense == "reference" else r.defense, "task": r.task, "label": label,
            "attack": r.attack_name, "options": {**options, "lr": r.config.get("lr"), **({"seed": r.seed} if r.seed
                                                                                         else {})},
            "dir": str(run_dir) if run_dir else None, "gain": r.gain,
            "before": r.score_before, "after": r.score_after, "cost_curve": r.cost_curve(),
            "stopped_early": r.stopped_early, "capability_ppl_after": r.capability_ppl_after,
            "peak_delta_bytes": r.peak_rss_delta_bytes, "training_memory": r.memory(),
            "saved_activation_bytes": r.saved_activation_bytes, "step_time_s": r.step_time_s,
            "prepare_seconds": r.prepare_seconds}


@register_analysis("lock-cost", kind=schema.LOCK_COST)
def lock_cost(ctx: AnalysisContext, q: float = Q, timing_repeats: int = 3, timing_steps: int = 10,
              reanalyse: str | None = None, recount_all: bool = False, figure: str = "cost_to_target.png") -> dict:
    """The lock cost multiplier per task and defense from the run's attack records (every defense and target
    against the original), after a quiet timing pass (``timing_repeats`` alone, 0: the runs' own clocks);
    ``reanalyse``: a recorded result (``bench/results/cost_to_target.json``) analysed again instead, no runs
    (``recount_all``: every row's training memory counted again)."""
    if reanalyse:
        d = reanalyse_file(reanalyse, recount_all)
        tasks = list(dict.fromkeys(a["task"] for a in d["analysis"]))
        wanted = [a["defense"] for a in d["analysis"] if a["task"] == tasks[0]]
        if figure:
            ctx.figures.mkdir(parents=True, exist_ok=True)
            plot(d["runs"], d["analysis"], wanted, tasks, ctx.figures / figure)
        d.setdefault("runs_machine", d.get("machine"))  # where and when the attack runs were recorded
        for k in ("kind", "schema_version", "machine"):
            d.pop(k, None)
        return d
    from ..eval.records import AttackRun
    from ..io import read_json

    rows = [record_row(AttackRun.from_dict(read_json(f), f), f.parent)
            for f in sorted((ctx.out / "attacks").rglob("record.json"))]
    models = {"original": ctx.summary["models"]["reference"],
              **{k: v for k, v in ctx.summary["models"].items() if k != "reference"}}
    tasks = list(ctx.spec.tasks)
    # the defenses analysed: those attacked on every task (the rank sweep's extra locks run on fewer)
    wanted = [k for k in models if k != "original" and all(any(r["model"] == k and r["task"] == t for r in rows)
                                                           for t in tasks)]
    plan = ctx.summary["plan"]
    budget = {**BUDGET, "batch_size": ctx.spec.budget.batch, "block_size": plan["block_size"],
              "train_tokens": plan["train_tokens"], "score_every": ctx.spec.budget.score_every,
              "patience": ctx.spec.budget.patience, "steps": ctx.spec.budget.steps}
    timings = {}
    if timing_repeats:
        import copy

        from ..io import set_threads_per_process

        set_threads_per_process(1)
        # the original with frozen MLPs too: the frozen-DLR attack's step-time yardstick (weightlock run dlr-regime)
        probe = rows + [{**r, "model": "original"} for r in rows if r["attack"] == "freeze"]
        timings = quiet_timings(models, copy.deepcopy(probe), timing_repeats, timing_steps, budget)
        rows = with_quiet_seconds(rows, timings)
    analysis = analyse(rows, wanted, tasks, q)
    result = {"preset": ctx.summary.get("preset", PRESET), "budget": budget, "q": q, "models": models,
              "learning_rates": {k: list(v) for k, v in ctx.spec.learning_rates.items()},
              "analysis": analysis, "runs": rows, "timing_repeats": timing_repeats,
              "quiet_timings": [{"model": k[0], "attack": k[1], "options": dict(k[2]), **v}
                                for k, v in timings.items()],
              "step_time_median_s": {k: statistics.median(r["step_time_s"] for r in rows if r["model"] == k)
                                     for k in models if any(r["model"] == k for r in rows)}}
    if figure and wanted:
        ctx.figures.mkdir(parents=True, exist_ok=True)
        plot(rows, analysis, wanted, tasks, ctx.figures / figure)
        result["figure"] = str(ctx.figures / figure)
    return result


def reanalyse_file(path: str | Path, recount_all: bool = False) -> dict:
    """A recorded result (``cost_to_target.json``) analysed again (:func:`reanalyse`), its tasks as recorded."""
    d = json.loads(Path(path).read_text())
    tasks = list(dict.fromkeys(a["task"] for a in d["analysis"]))
    return reanalyse(d, tasks, recount_all, f"weightlock run cost-to-target-reanalyse ({path})")
