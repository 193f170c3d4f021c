"""The analyses of the bench's grid experiments, registered for their shipped specs (``weightlock run attacks``,
``pmp-sweep``, ``frontier``, ``dlr-regime``): each reads the run's summary and typed attack records (or, for the
rank regime, the recorded cost-to-target result) and returns the record the docs and the report read
(``save_as`` writes it to ``bench/results/NAME.json``, its figure beside it)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .. import schema
from ..io import read_json
from .analyses import AnalysisContext, register_analysis
from .harness import max_gain, timing_key


def _groups(ctx: AnalysisContext) -> dict:
    """(defense, attack label, task) → learning rate → the records of its seeds."""
    out: dict = {}
    for r in ctx.records():
        out.setdefault((r.defense, r.attack, r.task), {}).setdefault(r.config.get("lr"), []).append(r)
    return out


def _stats(by_lr: dict) -> tuple:
    """The attacker's best learning rate of one attack (mean gain over seeds): (lr, records, mean, std, points)."""
    stats = {lr: (statistics.mean(r.gain for r in rs), statistics.pstdev([r.gain for r in rs]) if len(rs) > 1 else 0.0)
             for lr, rs in by_lr.items()}
    best = max(stats, key=lambda lr: stats[lr][0])
    return best, by_lr[best], stats[best][0], stats[best][1], stats


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _figure(ctx: AnalysisContext, name: str, fig) -> str:
    ctx.figures.mkdir(parents=True, exist_ok=True)
    path = ctx.figures / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


@register_analysis("attack-gains", kind=schema.ATTACK_CURVES)
def attack_gains(ctx: AnalysisContext, figure: str = "attacks.png") -> dict:
    """Each attack × task on every release against the original: gains at the attacker's best learning rate
    (mean ± spread over seeds), cost medians, score curves; a bar figure per task."""
    groups = _groups(ctx)
    rows = []
    for a in ctx.summary["attacks"]:
        if a["defense"] == "reference":
            continue
        mine = groups[(a["defense"], a["attack"], a["task"])]
        ref = groups[("reference", a["reference_attack"] or a["attack"], a["task"])]
        lr, recs, mean, std, points = _stats(mine)
        ref_lr, ref_recs, ref_mean, ref_std, ref_points = _stats(ref)
        row = {"attack": a["attack"], "task": a["task"], "release": a["defense"], "best_lr_locked": lr,
               "best_lr_reference": ref_lr, "gain_locked_mean": mean, "gain_locked_std": std,
               "gain_reference_mean": ref_mean, "gain_reference_std": ref_std,
               "gain_ratio": mean / ref_mean if abs(ref_mean) > 1e-12 else None,
               "score_before_locked": recs[0].score_before, "score_before_reference": ref_recs[0].score_before,
               "capability_ppl_after_locked": _median(r.capability_ppl_after for r in recs),
               "capability_ppl_after_reference": _median(r.capability_ppl_after for r in ref_recs),
               "points": [{"point": {"lr": x}, "gain_mean": points[x][0], "gain_std": points[x][1],
                           "reference_gain_mean": ref_points.get(x, (None, None))[0],
                           "reference_gain_std": ref_points.get(x, (None, None))[1]} for x in points]}
        for k, attr in (("saved_activation_bytes_per_step", "saved_activation_bytes"), ("step_time_s", "step_time_s"),
                        ("flops_estimate", "flops_estimate"), ("peak_rss_bytes", "peak_rss_bytes"),
                        ("trainable_parameters", "trainable_parameters")):
            row[f"{k}_locked"] = _median(getattr(r, attr) for r in recs)
            row[f"{k}_reference"] = _median(getattr(r, attr) for r in ref_recs)
        row["memory_ratio"] = (row["saved_activation_bytes_per_step_locked"] or 0) / max(
            1, row["saved_activation_bytes_per_step_reference"] or 0)
        st, st_ref = row["step_time_s_locked"], row["step_time_s_reference"]
        row["step_time_ratio"] = st / st_ref if st and st_ref else None
        row["score_curves"] = {"locked": [r.score_curve for r in recs], "reference": [r.score_curve for r in ref_recs]}
        rows.append(row)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    result = {"steps": ctx.spec.budget.steps, "batch": [ctx.spec.budget.batch, ctx.summary["plan"]["block_size"]],
              "seeds": list(ctx.spec.seeds), "models": ctx.summary["models"], "results": rows}
    if figure and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rs = [r for r in rows if r["task"] == task]
            xs = range(len(rs))
            ax.bar([x - 0.2 for x in xs], [r["gain_reference_mean"] for r in rs], 0.4,
                   yerr=[r["gain_reference_std"] for r in rs], label="original (reference)")
            ax.bar([x + 0.2 for x in xs], [r["gain_locked_mean"] for r in rs], 0.4,
                   yerr=[r["gain_locked_std"] for r in rs], label="locked")
            ax.set_xticks(list(xs), [f"{r['release']}: {r['attack']}" for r in rs], rotation=20)
            ax.set_title(f"{task}: attacker gain at its best lr ({len(ctx.spec.seeds)} seeds)")
            ax.legend()
        result["figure"] = _figure(ctx, figure, fig)
    return result


@register_analysis("pmp-gain-vs-ratio", kind=schema.PMP_GAIN_VS_RATIO)
def pmp_gain_vs_ratio(ctx: AnalysisContext, figure: str = "pmp_sweep.png") -> dict:
    """PMP across mask ratios (a sweep of the pmp defense): base quality of each PMP model, and what each attack
    (and the owner's authorized fine-tuning) gains at its best learning rate, against the dense model's gains."""
    ratios = {d["name"]: d["config"]["mask_ratio"] for d in ctx.summary["defenses"] if "mask_ratio" in d["config"]}
    rows = [{"method": a["attack"], "task": a["task"], "ratio": ratios[a["defense"]], "gain": a["gain"],
             "before": a["score_before"], "after": a["score_after"],
             "capability_ppl_after": a["capability_ppl_after"],
             "recovered_mask_density": a.get("recovered_mask_density")}
            for a in ctx.summary["attacks"] if a["defense"] in ratios]
    dense = {}
    for a in ctx.summary["attacks"]:
        if a["defense"] == "reference":
            dense.setdefault(a["task"], {})[a["attack"]] = a["gain"]
    pretraining = {}
    for label, ratio in ratios.items():
        run = Path(ctx.summary["models"][label]).parent / "pmp_run.json"
        if run.exists():
            pretraining[str(ratio)] = {k: v for k, v in read_json(run).items() if k in ("val_ppl", "density",
                                                                                          "discovery")}
    base = Path(ctx.summary["models"]["reference"]) / "metrics.json"
    result = {"steps": ctx.spec.budget.steps, "batch": [ctx.spec.budget.batch, ctx.summary["plan"]["block_size"]],
              "dense_val_ppl": read_json(base)["val_ppl"] if base.exists() else None,
              "pretraining": pretraining, "dense_gains": dense, "rows": rows}
    if figure and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = list(dict.fromkeys(r["task"] for r in rows))
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r["ratio"], r["gain"]) for r in rows if r["task"] == task and r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            for method, style in (("full", "--"), ("lora", ":")):
                if method in dense.get(task, {}):
                    ax.axhline(dense[task][method], ls=style, color="gray", label=f"dense model, {method}")
            ax.set_xlabel("mask ratio ρ (fraction of entries trained in pretraining)")
            ax.set_title(f"PMP, {task}: fine-tuning gain vs ρ")
            ax.legend(fontsize=7)
        result["figure"] = _figure(ctx, figure, fig)
    return result


@register_analysis("memory-time-frontier", kind=schema.MEMORY_TIME_FRONTIER)
def memory_time_frontier(ctx: AnalysisContext, figure: str = "frontier.png") -> dict:
    """The attacker's memory–time frontier: per memory-saving strategy (an attack label) and model, the saved
    activations of a step, the median step time, FLOPs per step and the run's measured peak memory."""
    import os

    rows = []
    for r in ctx.records():
        steps = max(r.steps or 1, 1)
        rows.append({"model": "original" if r.defense == "reference" else r.defense, "strategy": r.attack,
                     "saved_activation_bytes": r.saved_activation_bytes, "step_time_s": r.step_time_s,
                     "effective_batch": [ctx.spec.budget.batch, ctx.summary["plan"]["block_size"]],
                     "flops_per_step": (r.flops_counted or r.flops_estimate or 0) / steps,
                     "peak_rss_bytes": r.peak_rss_bytes, "peak_delta_bytes": r.peak_rss_delta_bytes,
                     "seed": r.seed, "lr": r.config.get("lr")})
    result = {"steps": ctx.spec.budget.steps, "models": ctx.summary["models"], "rows": rows,
              # glibc's mmap threshold decides whether freed activations go back to the OS (RSS) at once
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if figure and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
            pts = [r for r in rows if r["model"] == model and r["saved_activation_bytes"] and r["step_time_s"]]
            ax.scatter([r["saved_activation_bytes"] / 2**20 for r in pts], [r["step_time_s"] for r in pts],
                       marker="os^v"[i % 4], label=model)
            for r in pts:
                ax.annotate(r["strategy"], (r["saved_activation_bytes"] / 2**20, r["step_time_s"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("saved activations per micro-batch (MiB, log)")
        ax.set_ylabel("step time (s, median)")
        ax.set_title("Attacker's memory–time frontier: full fine-tuning")
        ax.legend()
        result["figure"] = _figure(ctx, figure, fig)
    return result


def _regime_row(v: str, model_dir: str, runs: list[dict], orig: list[dict], timings: dict, lr: float,
                quiet: dict | None, q: float, task: str) -> dict:
    from ..eval.cost_to_target import AttackCurve, lock_cost_multiplier
    from ..eval.plan import plan

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
        r = next(x for x in runs if x["model"] == v and x["task"] == task and x["label"] == lr_label)
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


def _regime_plot(results: list[dict], task: str):
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
    ax.set_title(f"attack to convergence ({task})")
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
    return fig

@register_analysis("lock-regime", kind=schema.LOCK_REGIME)
def lock_regime(ctx: AnalysisContext, source: str = "bench/results/cost_to_target.json",
                fidelity: str = "bench/results/dlr_fidelity.json", ranks: list | None = None, norm_rank: int = 32,
                task: str = "prose", figure: str = "dlr_regime.png") -> dict:
    """DLR-Lock's regime across ranks, from the recorded cost-to-target runs (``source``): fidelity and lock time,
    the per-MLP and whole-model memory multipliers, the attacker's quiet step time, and the attack to
    convergence (gain ratio, lock cost multiplier in seconds and FLOPs) per rank (and rank + per-block norm)."""
    from ..errors import WeightlockError

    path = Path(source)
    if not path.exists():
        raise WeightlockError(f"{path} not found: run `weightlock run cost-to-target` first")
    d = read_json(path)
    orig = [r for r in d["runs"] if r["model"] == "original" and r["task"] == task]
    timings = {(t["model"], t["attack"], tuple(sorted(t["options"].items()))): t for t in d["quiet_timings"]}
    lr = max((r for r in orig if r["attack"] == "full" and "seed" not in r["options"]
              and "checkpointing" not in r["options"]), key=max_gain)["options"]["lr"]
    variants = [f"dlr-{r}" for r in (ranks or [8, 16, 32, 64])] + ([f"dlr-{norm_rank}-norm"] if norm_rank else [])
    missing = [v for v in variants if v not in d["models"]]
    if missing:
        raise WeightlockError(f"{path} has no runs of {', '.join(missing)}: run the cost-to-target spec with "
                              "locks covering them")
    quiet = read_json(fidelity) if Path(fidelity).exists() else None
    results = [_regime_row(v, d["models"][v], d["runs"], orig, timings, lr, quiet, d["q"], task) for v in variants]
    result = {"task": task, "source": str(path), "learning_rate_full": lr, "budget": d["budget"], "q": d["q"],
              "results": results}
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        result["figure"] = _figure(ctx, figure, _regime_plot(results, task))
    return result


@register_analysis("base-model", figures=("validation_perplexity.*.model",))
def base_model(ctx: AnalysisContext, max_tokens: int = 65536) -> dict:
    """The original's size, pretraining speed and validation perplexity on code and prose, beside a unigram
    model's on the same split and tokenizer."""
    from ..data import load_blocks, load_tokenizer
    from ..eval.perplexity import model_perplexity, unigram_perplexity
    from ..train.pretrain import default_config

    out = Path(ctx.summary["models"]["reference"])
    preset = ctx.summary["preset"]
    cfg = default_config(preset)
    m = read_json(out / "metrics.json")
    tok = load_tokenizer(out)
    ppl = {}
    for domain in ("code", "prose"):
        r = model_perplexity(out, f"builtin:{domain}", "validation", max_tokens=max_tokens)
        train = load_blocks(f"builtin:{domain}", "train", tok, cfg.block_size)
        val = load_blocks(f"builtin:{domain}", "validation", tok, cfg.block_size, max_tokens)
        ppl[domain] = {"model": r["perplexity"], "unigram": unigram_perplexity(train, val, len(tok)),
                       "tokens": r["tokens"]}
    return {"preset": preset, "model": str(out), "config": cfg.to_dict(), "parameters": m["parameters"],
            "training_tokens": m["tokens_seen"], "wall_time_s": m["wall_time_s"], "tokens_per_s": m["tokens_per_s"],
            "validation_perplexity": ppl, "history": [h for h in m["history"] if "val_ppl" in h]}


@register_analysis("lock-fidelity", kind=schema.LOCK_FIDELITY,
                   figures=("ranks.*.ppl_ratio", "ranks.*.layer_rel_error.*"))
def lock_fidelity(ctx: AnalysisContext, options_study: bool = True, layer: int = 1) -> dict:
    """DLR-Lock's fidelity per lock of the run (a rank sweep): depth, parameter counts, per-layer held-out error,
    perplexity of the original and the lock and their ratio, lock time; and the design-option study on one
    layer (activation, per-block norm, init, learning rate), how the defaults were chosen."""
    from ..dlr import LockConfig

    results = []
    for d in ctx.summary["defenses"]:
        if d["name"] not in ctx.summary["models"] or "rank" not in d["config"]:
            continue
        rep = read_json(Path(ctx.summary["models"][d["name"]]) / "lock_report.json")
        results.append({
            "rank": d["config"]["rank"], "release": ctx.summary["models"][d["name"]],
            "depth": rep["layers"][0]["spec"]["depth"],
            "parameters_before": rep["parameters_before"], "parameters_after": rep["parameters_after"],
            "parameter_ratio": rep["parameters_after"] / rep["parameters_before"],
            "mlp_parameters": rep["mlp_parameters"][0], "dlr_parameters": rep["dlr_parameters"][0],
            "layer_rel_error": [x["rel_error"] for x in rep["layers"]],
            "ppl_original": rep["ppl_before"], "ppl_locked": rep["ppl_after"], "ppl_ratio": rep["ppl_ratio"],
            "lock_seconds": rep["seconds"], "distill_tokens_per_s": [x["tokens_per_s"] for x in rep["layers"]]})
    base = Path(ctx.summary["models"]["reference"])
    return {"base": str(base), "eval": "validation perplexity, builtin:code, 32,768 tokens",
            "lock_config": LockConfig().__dict__, "ranks": results,
            "options_study": _options_study(base, layer) if options_study else None}


def _options_study(base: Path, layer: int = 1) -> list[dict]:
    """One layer of ``base`` fitted by DLR-Nets of each design option (200 steps): held-out relative error."""
    from ..data import load_blocks, load_tokenizer
    from ..dlr import DLRSpec, LockConfig, capture, fit_layer, load

    model, tok = load(base), load_tokenizer(base)
    x, y = capture(model, load_blocks("builtin:code", "train", tok, 128, 131072), [layer])[layer]
    d = model.config.hidden_size
    rows = []
    for v in (dict(), dict(activation="relu"), dict(activation="silu"), dict(norm=True), dict(init_scale=1.0),
              dict(lr=3e-3)):
        v = dict(v)
        cfg = LockConfig(steps=200, progress=False, lr=v.pop("lr", 1e-2))
        _, st = fit_layer(x, y, DLRSpec(d, 32, 32 if not v.get("norm") else 31, **v), cfg)
        rows.append({"variant": v or {"default": True}, "lr": cfg.lr, "steps": cfg.steps,
                     "rel_error": st["rel_error"], "seconds": st["seconds"]})
    return rows


@register_analysis("mask-recovery", kind=schema.MASK_RECOVERY,
                   figures=("variants.*.val_ppl", "variants.*.recovery.*/*", "variants.*.recovery.best.iou"))
def mask_recovery(ctx: AnalysisContext) -> dict:
    """Every mask-recovery attack's IoU with the true mask against chance, per PMP model of the run (the PMP
    defense's own evaluation), with its pretraining record (early-bird discovery, validation perplexity)."""
    variants = {}
    for d in ctx.summary["defenses"]:
        if "mask_ratio" not in d["config"]:
            continue
        ev = ctx.summary.get("by_defense", {}).get(d["name"]) or ctx.summary
        run = Path(ctx.summary["models"][d["name"]]).parent / "pmp_run.json"
        info = read_json(run) if run.exists() else {}
        variants[d["config"].get("variant", d["name"])] = {
            "label": d["name"], "pmp": d["config"], "discovery": info.get("discovery"),
            "val_ppl": info.get("val_ppl"), "recovery": ev.get("mask_recovery")}
    ratios = {v["pmp"]["mask_ratio"] for v in variants.values()}
    return {"mask_ratio": ratios.pop() if len(ratios) == 1 else sorted(ratios), "variants": variants}
