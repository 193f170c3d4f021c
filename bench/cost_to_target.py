"""Benchmark (issue #15): the security verdict as a cost — what an attacker pays to reach the unlocked
attacker's gain, on the `small` model, for DLR-Lock at two ranks and for PMP.

    python bench/cost_to_target.py [--ranks 16 32] [--tasks prose recall] [--steps 200] [--workers 2]
                                   [--regime-ranks 8 64] [--regime-norm-rank 32]
    python bench/cost_to_target.py --reanalyse | --recount-memory     the recorded JSON again, no attack runs

Models (built here when missing, kept under runs/bench): the dense base (`weightlock run dlr-fidelity --out
runs/bench`), its DLR locks at each rank (default lock settings), and a PMP model pretrained with the same settings
(hardened, ρ = 0.3). Every attack runs until its held-out task score stops improving (scored every 20
steps, patience 3 scores) or the step budget, with batches of 8 × 128 tokens:

* on the original: full fine-tuning and LoRA (r = 8, every linear map), each at 3 learning rates;
* on each lock: full fine-tuning at 3 learning rates, LoRA on every linear map (the DLR factors
  included), per-layer and per-DLR-Net gradient checkpointing and reverse distillation at the best
  full-fine-tuning rate, and the MLPs (DLR-Nets) frozen;
* on PMP: full fine-tuning at 3 learning rates and LoRA (the unauthorized attacker has no mask);
* a second seed of each model's best full fine-tuning and (original) LoRA: the seed spread;
* for the rank sweep of `weightlock run dlr-regime`, the extra locks (ranks 8 and 64, rank 32 with per-block norm):
  full fine-tuning at the original's best rate and the frozen-DLR attack, on prose only.

Each run records its score against cumulative cost (steps, tokens, training seconds, FLOPs counted by
torch; reverse distillation's own time and FLOPs included), its training memory (counted) and its own
measured peak memory growth. The runs go
two at a time beside other work, so their own clocks are not comparable: a final pass times every
distinct (model, attack, options) alone, 10 steps, repeated 3 times in alternating order, and a run's
``seconds`` are its quiet preparation time + steps × the quiet median step time (its own clock is kept as
``seconds_in_run``). Run it on an otherwise idle machine for that pass. For each
task and defense: target = 0.9 × the best gain of any attack on the original; cost to target per run
(interpolated, or never); lock cost multiplier = cheapest run on the lock ÷ cheapest on the original,
in seconds, FLOPs and tokens, without and with a memory budget (the unlocked full fine-tune's training
memory — parameters + gradients + optimizer state + saved activations of a step, counted exactly, not the
runs' measured RSS peaks, which vary run to run: runs above it do not count), and with an activation
budget (the bytes autograd saves for one step, exact, against the unlocked full fine-tune's; checkpointed
runs count what is kept between checkpoints, not the one unit recomputed in the backward pass). Runs are kept under
runs/bench/cost_to_target (re-running skips finished ones; delete a run's directory to redo it). Two workers,
one thread each. Writes
bench/results/cost_to_target.json and cost_to_target.png.

``--reanalyse`` analyses the recorded runs again. A row recorded before weightlock counted training memory
(its run directory gone) gets it counted again without re-running the attack: the run's model is rebuilt
with random weights (the dense preset; a lock's DLR-Nets from the lock's own specs at its rank, with the
lock settings the JSON records — before it recorded them, the locks of 2026-11, which had no sink
component), set up to train by the attack's own ``prepare`` (reverse distillation: its dense student,
not distilled) and counted with the run's own saved-activation bytes; ``memory_recounted`` in the JSON says
so. ``--recount-memory`` recounts every row (a recorded count must come out the same).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from weightlock import schema
from weightlock.experiments.harness import RESULTS, attack_job, max_gain, save, timing_key
from weightlock.io import set_threads_per_process
from weightlock.tables import fmt

BASE = Path("runs/bench/base-small")
RUNS = Path("runs/bench/cost_to_target")
LRS = {"full": [1e-3, 3e-3, 1e-2], "lora": [3e-3, 1e-2, 3e-2]}
BUDGET = dict(batch_size=8, block_size=128, train_tokens=200_000, score_every=20, patience=3, progress=False)
COSTS = ("seconds", "flops", "tokens")
Q = 0.9
REGIME_TASK = "prose"  # the rank sweep's extra locks are attacked on this task only


def lock_dir(rank: int) -> Path:
    return Path(f"runs/bench/locked-r{rank}")


def pmp_dir() -> Path:
    return Path("runs/bench/pmp-small")


def build_model(what: str) -> str:
    """Build one missing model (a lock at rank R: ``dlr-R``; ``pmp``); returns its release directory."""
    if what.startswith("dlr-") and what.endswith("-norm"):  # the rank sweep's per-block-norm variant
        from weightlock.dlr import LockConfig, lock

        rank = int(what.split("-")[1])
        out = Path(f"runs/bench/locked-r{rank}-norm")
        if not (out / "manifest.json").exists():
            lock(BASE, out, LockConfig(rank=rank, norm=True, progress=False), overwrite=True)
        return str(out)
    if what == "pmp":
        from weightlock.defenses import make_defense
        from weightlock.train.pretrain import default_config

        d = make_defense("pmp", mask_ratio=0.3, discovery_max_steps=100)
        release = d.release(pmp_dir()) or d.build(default_config("small"), pmp_dir())
        return str(release)
    from weightlock.dlr import LockConfig, lock

    rank = int(what.split("-")[1])
    out = lock_dir(rank)
    if not (out / "manifest.json").exists():
        lock(BASE, out, LockConfig(rank=rank, progress=False), overwrite=True)
    return str(out)


def run(job: tuple) -> dict:
    """One attack run (skipped when finished): (model key, model dir, task, label, attack, options)."""
    return attack_job(RUNS, BUDGET, job)


def first_jobs(models: dict, tasks) -> list[tuple]:
    """The learning-rate searches and the runs that need no earlier result."""
    jobs = []
    for task in tasks:
        for key, model in models.items():
            for lr in LRS["full"]:
                jobs.append((key, model, task, f"full-lr{lr:g}", "full", {"lr": lr}))
            for lr in (LRS["lora"] if key == "original" else [1e-2]):
                jobs.append((key, model, task, f"lora-all-lr{lr:g}", "lora", {"lr": lr, "targets": "all-linear"}))
            if key.startswith("dlr"):
                jobs.append((key, model, task, "freeze-dlr-lr0.003", "freeze", {"lr": 3e-3, "train": "non-mlp"}))
    return jobs


def second_jobs(models: dict, tasks, done: list[dict], regime: dict) -> list[tuple]:
    """Checkpointing and reverse distillation at the best full-fine-tuning rate; a second seed of the best
    full fine-tuning (and the original's best LoRA). For the rank sweep's extra locks (``regime``, see
    `weightlock run dlr-regime`): full fine-tuning at the original's best rate and the frozen-DLR attack, prose."""
    jobs = []
    best_lr = max((r for r in done if r["task"] == REGIME_TASK and r["model"] == "original" and r["attack"] == "full"),
                  key=max_gain)["options"]["lr"]
    for key, model in regime.items():
        jobs.append((key, model, REGIME_TASK, f"full-lr{best_lr:g}", "full", {"lr": best_lr}))
        jobs.append((key, model, REGIME_TASK, "freeze-dlr-lr0.003", "freeze", {"lr": 3e-3, "train": "non-mlp"}))
    for task in tasks:
        for key, model in models.items():
            mine = [r for r in done if r["task"] == task and r["model"] == key and r["options"].get("seed", 0) == 0]
            for attack in ("full", "lora") if key == "original" else ("full",):
                best = max((r for r in mine if r["attack"] == attack), key=lambda r: max_gain(r))
                jobs.append((key, model, task, best["label"] + "-seed1", attack, {**best["options"], "seed": 1}))
                if attack == "full" and key.startswith("dlr"):
                    lr = best["options"]["lr"]
                    for ck in ("layer", "dlr"):
                        jobs.append((key, model, task, f"ckpt-{ck}-lr{lr:g}", "full", {"lr": lr, "checkpointing": ck}))
                    jobs.append((key, model, task, f"reverse-distill-lr{lr:g}", "reverse-distill",
                                 {"lr": lr, "distill_steps": 300}))
    return jobs


def quiet_timings(models: dict, rows: list[dict], repeats: int, steps: int = 10) -> dict:
    """Median training-step time (and preparation time) of every distinct (model, attack, options), measured
    in this process alone, one configuration after another, the whole pass repeated ``repeats`` times
    (the runs themselves ran two at a time beside other work, so their own clocks are not comparable)."""
    from weightlock.attacks import run_attack

    keys = list(dict.fromkeys(timing_key(r) for r in rows))
    seen: dict[tuple, list] = {k: [] for k in keys}
    for rep in range(repeats):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            model, attack, opts = key
            o = dict(opts)
            if attack == "reverse-distill":
                o["distill_steps"] = o.get("distill_steps", 300)
            r = run_attack(models[model], "prose", attack, None, **{**BUDGET, "steps": steps, "score_every": 0,
                                                                    "patience": 0}, **o)["target"]
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
    from weightlock.eval.cost_to_target import run_training_memory
    from weightlock.schema import target_run

    if r.get("training_memory"):
        return r["training_memory"]
    f = Path(r.get("dir", "")) / "result.json"
    if r.get("dir") and f.is_file():
        return run_training_memory(target_run(json.loads(f.read_text())), r["options"].get("optimizer"))
    return {"counted": None, "estimated": None}


# the bench's locks as the recorded runs of 2026-11-24 had them: weightlock lock installed no sink component
# then (LockConfig.sink, on by default since 2026-12-03); a JSON records its locks' settings from then on
LOCK_SETTINGS_2026_11 = {"sink": False}
PRESET = "small"  # the base model's preset (the dlr-fidelity spec)


def architecture(key: str, preset: str = PRESET, lock_settings: dict | None = None, tokenizer=None):
    """The model ``key`` of this bench (``original``, ``pmp``, ``dlr-R``, ``dlr-R-norm``) rebuilt with fresh
    random weights, nothing trained or distilled: the dense ``preset`` model as the dlr-fidelity spec pretrains
    it (PMP's model has the same architecture), or its DLR lock at rank R (per-block norm for ``-norm``) with
    the DLR-Nets ``weightlock lock`` installs — the lock's own specs (weightlock.dlr.distill.specs_for: depth
    matched to the MLP's parameters) for ``LockConfig(rank=R, norm=..., **lock_settings)`` — built the way a
    release loads (build_locked_model on the config section the release writes)."""
    from dataclasses import asdict

    from weightlock.data import load_tokenizer
    from weightlock.dlr import LockConfig, adapter_for
    from weightlock.dlr.distill import specs_for
    from weightlock.dlr.modeling_weightlock_dlr import DLR_CONFIG_KEY, build_locked_model
    from weightlock.train.pretrain import build_model, default_config

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


def recount_memory(row: dict, model, tokenizer) -> dict:
    """A run's training memory counted again without running it (its record predates the count): ``model``,
    the run's model rebuilt (:func:`architecture`), set up to train as the row's attack sets it up — the
    attack's own ``prepare`` (LoRA's adapters, the frozen DLR-Nets; reverse distillation's dense student, built
    without distilling: its architecture does not depend on the distillation) and counter-measures — and counted
    (weightlock.eval.cost_to_target.counted_training_memory) with the run's own saved-activation bytes."""
    from weightlock.attacks import apply_checkpointing, make_attack
    from weightlock.eval.cost_to_target import counted_training_memory

    options = {**BUDGET, **row["options"]}
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

    from weightlock.data import load_tokenizer
    from weightlock.dlr import DLRNet
    from weightlock.train.pretrain import default_config

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


def analyse(rows: list[dict], defenses: list[str], tasks) -> list[dict]:
    from weightlock.eval.cost import TRAINING_MEMORY
    from weightlock.eval.cost_to_target import (
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
        target = Q * max(max_gain(r) for r in orig)
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
            entry = {"task": task, "defense": key, "q": Q, "target_gain": target, "memory_budget_bytes": budget,
                     "memory_budget_definition": TRAINING_MEMORY, "memory_basis": basis,
                     "memory_basis_note": MEMORY_BASIS[basis], "activation_budget_bytes": act_budget,
                     "best_original_gain": target / Q,
                     "best_gain": max(max_gain(r) for r in rows if r["task"] == task and r["model"] == key),
                     "seed_spread": {"original": seeds["original"], key: seeds[key]}}
            entry["gain_ratio_at_convergence"] = entry["best_gain"] / entry["best_original_gain"]
            for cost in COSTS:
                for name, mb in (("any_memory", None), ("memory_budget", budget), ("activation_budget", act_budget)):
                    if name == "memory_budget" and budget is None:  # no training-memory count: no budget
                        entry[f"{cost}_{name}"] = {"multiplier": None, "note": MEMORY_BASIS["unknown"]}
                        continue
                    c = act_curves if name == "activation_budget" else curves
                    m = lock_cost_multiplier(c[key], c["original"], Q, cost, mb)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--tasks", nargs="+", default=["prose", "recall"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-pmp", action="store_true")
    ap.add_argument("--regime-ranks", type=int, nargs="*", default=[8, 64],
                    help="extra lock ranks for `weightlock run dlr-regime` (prose; full FT + frozen DLR only)")
    ap.add_argument("--regime-norm-rank", type=int, default=32, help="rank of the per-block-norm lock (0: none)")
    ap.add_argument("--timing-repeats", type=int, default=3, help="quiet timing passes (run on an idle machine)")
    ap.add_argument("--reanalyse", action="store_true", help="analyse the recorded JSON again, no runs (a row "
                    "with no training-memory count gets one counted from its rebuilt architecture)")
    ap.add_argument("--recount-memory", action="store_true",
                    help="--reanalyse, counting every row's training memory again from its rebuilt architecture "
                         "and the run's saved-activation bytes (a row's recorded count must come out the same)")
    args = ap.parse_args()
    if args.reanalyse or args.recount_memory:  # the recorded runs and timings, analysed again (no training)
        d = reanalyse(json.loads((RESULTS / "cost_to_target.json").read_text()), args.tasks, args.recount_memory,
                      "python bench/cost_to_target.py " + " ".join(sys.argv[1:]))
        wanted = [a["defense"] for a in d["analysis"] if a["task"] == args.tasks[0]]
        plot(d["runs"], d["analysis"], wanted, args.tasks, RESULTS / "cost_to_target.png")
        d.setdefault("runs_machine", d.get("machine"))  # where and when the attack runs were recorded
        d.pop("kind", None), d.pop("schema_version", None), d.pop("machine", None)
        save("cost_to_target", d, kind=schema.LOCK_COST)
        return
    if not (BASE / "model.safetensors").exists():
        sys.exit(f"{BASE} not found: run `weightlock run dlr-fidelity --out runs/bench` first")
    BUDGET["steps"] = args.steps
    wanted = [f"dlr-{r}" for r in args.ranks] + ([] if args.no_pmp else ["pmp"])
    extra = [f"dlr-{r}" for r in args.regime_ranks if r not in args.ranks]
    extra += [f"dlr-{args.regime_norm_rank}-norm"] if args.regime_norm_rank else []
    with ProcessPoolExecutor(args.workers, initializer=set_threads_per_process, initargs=(args.workers,)) as pool:
        built = list(pool.map(build_model, wanted + extra))
        models = {"original": str(BASE), **dict(zip(wanted, built))}
        regime = dict(zip(extra, built[len(wanted):]))
        rows = list(pool.map(run, first_jobs(models, args.tasks)))
        rows += list(pool.map(run, second_jobs(models, args.tasks, rows, regime)))
    models.update(regime)
    set_threads_per_process(1)
    # the original with frozen MLPs too: the frozen-DLR attack's step-time yardstick (weightlock run dlr-regime)
    timings = quiet_timings(models, rows + [{"model": "original", "attack": "freeze", "options": {"train": "non-mlp"}}],
                            args.timing_repeats)
    rows = with_quiet_seconds(rows, timings)
    analysis = analyse(rows, wanted, args.tasks)
    for a in analysis:
        print(f"{a['task']:7s} {a['defense']:7s} gain ratio {a['gain_ratio_at_convergence']:.2f}  multiplier "
              + "  ".join(f"{c} {a[f'{c}_any_memory']['multiplier']:.2f}× "
                          f"(within memory {fmt(a[f'{c}_memory_budget']['multiplier'], '.2f')}×)" for c in COSTS))
    plot(rows, analysis, wanted, args.tasks, RESULTS / "cost_to_target.png")
    from weightlock.dlr import LockConfig

    save("cost_to_target", {"command": "python bench/cost_to_target.py " + " ".join(sys.argv[1:]),
                            "preset": PRESET, "lock_settings": {"sink": LockConfig().sink}, "budget": BUDGET,
                            "learning_rates": LRS, "q": Q, "models": models,
                            "analysis": analysis, "runs": rows, "timing_repeats": args.timing_repeats,
                            "quiet_timings": [{"model": k[0], "attack": k[1], "options": dict(k[2]), **v}
                                              for k, v in timings.items()],
                            "step_time_median_s": {
                                k: statistics.median(r["step_time_s"] for r in rows if r["model"] == k)
                                for k in models}}, kind=schema.LOCK_COST)


if __name__ == "__main__":
    main()
