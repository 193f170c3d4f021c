"""``weightlock report RUNDIR...``: an HTML + Markdown report with figures, from recorded JSON only.

Any mix of inputs works: a demo directory (``summary.json``), ``bench/results``, attack run directories
(``result.json``), locked releases (``lock_report.json``), any folder of records. Each JSON file is read by
its record kind, whatever it is called: its recorded ``kind`` resolved through the library's registry of
record kinds (:data:`weightlock.schema.RECORD_KINDS`; the kinds records carried before are aliases), or, for a
file written before results carried a kind, its fields.

What the report draws comes through registries, nothing is hard-coded to a kind or a defense: record kinds
bring their tables and figures as :class:`Section` s (:data:`SECTIONS`, entry-point group
``weightlock.report``; :data:`BUILTIN_SECTIONS` are the built-in ones), and each defense of a demo's summary
brings its own (:meth:`weightlock.defenses.DefenseHooks.report`: :class:`Table` s, :class:`Figure` s and
:class:`Panels` added to a registered figure). A defense that brings nothing, and a record of a kind no
section reads, get the generic section (a table of what is recorded and, from standard attack rows, the
attacker-gain figure); registered figures whose data is absent are listed as missing. The HTML needs no
network: images are local PNGs next to it.
"""
from __future__ import annotations

import html
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from . import schema
from .errors import WeightlockError
from .eval.fidelity import PPL_RATIO_BAR, TOP1_BAR, meets_bars
from .io import move_dir_contents, read_json, write_text
from .registry import Registry
from .tables import (  # noqa: F401  (Table, Figure, Panels: the report's parts, importable from here too)
    ATTACK_CAPTION,
    ATTACK_HEAD,
    CAPABILITY_HEAD,
    Figure,
    Panels,
    Table,
    attack_rows,
    capability_rows,
    defenses_of,
    fmt,
)

MAX_JSON_BYTES = 50 * 2**20
SKIP_DIRS = {"checkpoint", "report", ".weightlock-work", "__pycache__", ".git"}


def collect(paths: list[str | Path]) -> dict[str, list[tuple[Path, dict]]]:
    """Every weightlock record under ``paths`` (files or directories), grouped by its record kind
    (:func:`weightlock.schema.record_kind`: the recorded ``kind``, whatever the file is called, or the fields of
    a file from before results carried one); a record of a kind no reader registered is grouped under its
    recorded ``kind`` (the report draws it generically). The parts of an experiment directory its summary
    carries (:data:`PARTS`) and JSON that is no weightlock record are passed over."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise WeightlockError(f"{p}: no such file or directory")
        if p.is_file():
            files.append(p)
            continue
        files += sorted(f for f in p.rglob("*.json")
                        if not SKIP_DIRS.intersection(f.relative_to(p).parts[:-1]))
    for f in files:
        if f.stat().st_size > MAX_JSON_BYTES:
            continue
        try:
            data = read_json(f)
        except (WeightlockError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        kind = schema.record_kind(data, f) or schema.kind_of(data, f)
        if kind and kind not in PARTS:
            found.setdefault(kind, []).append((f, data))
    return found


# ---- data extraction: every source reduced to a few plain shapes ---------------------------------

def _curves(found) -> list[dict]:
    """[{title, locked: [[step, score]], reference: [[step, score]] | None, task}]"""
    out = []
    for _, d in found.get(schema.DEMO, []):
        labels = {x["name"]: x["label"] for x in defenses_of(d)}
        for r in d["attacks"]:
            if r["defense"] != "reference":
                out.append({"title": f"{r['defense']}: {r['attack']}", "task": r["task"], "locked": r["curve"],
                            "reference": r["reference_curve"], "label": labels.get(r["defense"], r["defense"])})
    for _, d in found.get(schema.ATTACK_CURVES, []):
        for r in d["results"]:
            c = r["score_curves"]
            out.append({"title": f"bench: {r['attack']}", "task": r["task"], "locked": _mean_curve(c["locked"]),
                        "reference": _mean_curve(c["reference"]), "label": "locked (mean of seeds)"})
    for f, d in found.get(schema.ATTACK_RUN, []):
        out.append({"title": f"{f.parent.name}: {d['attack']}", "task": d["task"],
                    "locked": schema.target_run(d, f)["score_curve"],  # "target" (schema 2) or "locked" (before)
                    "reference": (d.get("reference_run") or {}).get("score_curve"), "label": "attacked model"})
    return [c for c in out if len(c["locked"]) >= 2]


def _mean_curve(curves: list[list]) -> list[list]:
    steps = [p[0] for p in curves[0]]
    if any([p[0] for p in c] != steps for c in curves):
        return curves[0]
    return [[s, statistics.mean(c[i][1] for c in curves)] for i, s in enumerate(steps)]


def _memory(found) -> list[tuple[str, dict]]:
    return [(f"bench (d={d['depth_linearity']['d']}, r={d['depth_linearity']['rank']})", d["depth_linearity"])
            for _, d in found.get(schema.MEMORY_VS_DEPTH, [])]


def _frontier(found) -> list[tuple[str, list[dict]]]:
    return [("bench", [r for r in d["rows"] if "skipped" not in r])
            for _, d in found.get(schema.MEMORY_TIME_FRONTIER, [])]


def _gain_vs_ratio(found) -> list[tuple[str, list[dict]]]:
    out = []
    for _, d in found.get(schema.PMP_GAIN_VS_RATIO, []):
        rows = [dict(r) for r in d["rows"]]
        for task, gains in d["dense_gains"].items():
            rows += [{"ratio": 1.0, "task": task, "method": m, "gain": g} for m, g in gains.items()]
        out.append(("bench", rows))
    return out


def _recovery(found) -> list[tuple[str, dict]]:
    return [(f"{name} (bench, ρ={v['recovery']['mask_ratio']})", v["recovery"])
            for _, d in found.get(schema.MASK_RECOVERY, []) for name, v in d["variants"].items()]


def _layer_errors(found) -> list[tuple[str, list[float]]]:
    out = [(f"bench rank {r['rank']}", r["layer_rel_error"])
           for _, d in found.get(schema.LOCK_FIDELITY, []) for r in d["ranks"]]
    out += [(f"{f.parent.name} (rank {d['layers'][0]['spec']['rank']})", [l["rel_error"] for l in d["layers"]])
            for f, d in found.get(schema.LOCK_REPORT, [])]
    return out


def _unique_layer_errors(items: list[tuple[str, list[float]]]) -> list[tuple[str, list[float]]]:
    """The per-layer errors, each release once: one found twice (its report, a bench copy, a demo's summary)
    is drawn under the name it was first found by."""
    seen, unique = set(), []
    for name, errs in items:
        key = tuple(round(e, 12) if e == e else None for e in errs)
        if key not in seen:
            seen.add(key)
            unique.append((name, errs))
    return unique


# ---- figures: each a list of panels, a drawing function per panel and a caption ---------------

def _draw(path: Path, panels: list, draw: Callable, size: tuple[float, float], cols: int | None = None) -> None:
    """One subplot per panel (``draw(ax, panel)``), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = cols or len(panels)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            draw(ax, panels[i])
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        else:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw_curve(ax, c: dict) -> None:
    ax.plot(*zip(*c["locked"]), "o-", label=c["label"])
    if c["reference"]:
        ax.plot(*zip(*c["reference"]), "s--", label="unlocked original")
    ax.set_title(f"{c['title']} · {c['task']}", fontsize=9)
    ax.set_xlabel("fine-tuning step")
    task = c["task"]
    ax.set_ylabel("−held-out loss" if task in ("prose", "tests", "code") else
                  "−answer loss (nats/token)" if task.endswith("-loglik") else "exact-match accuracy")


def _draw_memory(ax, item) -> None:
    name, m = item
    ax.plot(m["depths"], [b / 2**20 for b in m["bytes"]], "o", label="measured")
    xs = [0, max(m["depths"])]
    ax.plot(xs, [(m["intercept"] + m["slope_bytes_per_block"] * x) / 2**20 for x in xs], "-",
            label=f"fit: {m['slope_bytes_per_block'] / 2**20:.2f} MiB/block, R²={m['r2']:.4f}")
    ax.plot(xs, [m["analytic_bytes_per_block"] * x / 2**20 for x in xs], ":", label="analytic (d+2r)·4·tokens")
    ax.set_xlabel("DLR depth L (blocks)")
    ax.set_ylabel("saved activations (MiB)")
    ax.set_title(name, fontsize=9)


def _draw_frontier(ax, item) -> None:
    name, rows = item
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == model]
        ax.scatter([r["saved_activation_bytes"] / 2**20 for r in pts], [r["step_time_s"] for r in pts], label=model)
        for r in pts:
            ax.annotate(r["strategy"], (r["saved_activation_bytes"] / 2**20, r["step_time_s"]), fontsize=7)
    ax.set_xlabel("saved activations per step (MiB)")
    ax.set_ylabel("step time (s)")
    ax.set_title(f"memory–time frontier ({name})", fontsize=9)


def _draw_gain(ax, item) -> None:
    name, task, rows = item
    rs = [r for r in rows if r["task"] == task]
    for method in dict.fromkeys(r["method"] for r in rs):
        pts = sorted((r["ratio"], r["gain"]) for r in rs if r["method"] == method)
        # points only: the ratios measured are few (often ρ and 1), a line would invent the gain between them
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ls="none", label=method)
    ax.set_xlabel("mask ratio ρ (1 = dense)")
    ax.set_ylabel("fine-tuning gain")
    ax.set_title(f"{name}: {task}", fontsize=9)


def _draw_recovery(ax, item) -> None:
    name, rec = item
    keys = [k for k in rec if "/" in k]
    ax.barh(keys, [rec[k] for k in keys])
    ax.axvline(rec["chance_iou"], color="red", ls="--", label=f"chance ρ/(2−ρ) = {rec['chance_iou']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU of recovered mask with the true mask")
    ax.set_title(name, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)


def _draw_layer_errors(ax, items) -> None:
    for i, (name, errs) in enumerate(items):
        ax.plot(range(len(errs)), [100 * e for e in errs], "os^vD<>"[i % 7] + "-", lw=1, ms=4, alpha=0.8, label=name)
    ax.set_xticks(range(max(len(e) for _, e in items)))
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error (%)")
    ax.set_yscale("log")


def _cost_panels(found) -> list:
    """[(task, defense, target gain, [(label, is_lock, [(seconds, gain)])])] from cost_to_target results."""
    out = []
    for _, d in found.get(schema.LOCK_COST, []):
        for a in d["analysis"]:
            lines = []
            for r in d["runs"]:
                if r["task"] == a["task"] and r["model"] in ("original", a["defense"]) and "seed" not in r["options"]:
                    c = r["cost_curve"]
                    lines.append((r["label"], r["model"] != "original",
                                  [(p["seconds"], p["score"] - c[0]["score"]) for p in c]))
            out.append((a["task"], a["defense"], a["target_gain"], a["seconds_any_memory"]["multiplier"], lines))
    return out


def _lock_vs_original(ax, lines, target: float | None) -> None:
    """Every run's curve, the lock's solid and the original's dashed, and the target as a dotted line."""
    for label, lock, pts in lines:
        ax.plot(*zip(*pts), "-" if lock else "--", lw=1.2 if lock else 0.9,
                label=("lock: " if lock else "original: ") + label)
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=0.8)
    ax.set_xlabel("attacker's training seconds (cumulative)")


def _draw_cost(ax, item) -> None:
    task, defense, target, mult, lines = item
    _lock_vs_original(ax, lines, target)
    ax.set_title(f"{task} · {defense}: time to target ×{mult:.2f}", fontsize=9)
    ax.set_ylabel("gain over the release")


def _red_team(found, faithful: bool) -> list:
    """The red-team records on the real LLM, in file order: the ones on faithful releases (issue #35's, with a
    ``verdict`` per task and the attacked ``release``) or the older ones (on a broken lock, kept as history)."""
    return [d for _, d in found.get(schema.REAL_ATTACKS, [])
            if bool(d["analysis"]) and ("verdict" in d["analysis"][0]) == faithful]


def _attacked(a: dict) -> str:
    return a.get("release") or a["defense"]


def _real_attack_panels(found) -> list:
    """[(task, release, level target, [(label, is_lock, [(seconds, score)])], model)] from bench/real_attacks.py:
    the faithful releases first, then the history."""
    out = []
    for d in _red_team(found, True) + _red_team(found, False):
        for a in d["analysis"]:
            lines = [(r["label"], r["model"] != "original", [(p["seconds"], p["score"]) for p in r["cost_curve"]])
                     for r in d["runs"] if r["task"] == a["task"] and r["model"] in ("original", _attacked(a))]
            out.append((a["task"], _attacked(a), a["seconds_level"]["target_score"], lines,
                        Path(d["models"]["original"]).name))
    return out


def _real_frontier_panels(found) -> list:
    """[(task, release, [(label, is_lock, training memory bytes, step seconds)])]: every attack's counted
    training memory against its step time, on the faithful releases."""
    return [(a["task"], a["release"], [(s["label"], s["model"] != "original", s["training_memory_bytes"],
                                        s["step_time_s"]) for s in a["per_step"] if s["training_memory_bytes"]])
            for d in _red_team(found, True) for a in d["analysis"]]


def _draw_real_frontier(ax, item) -> None:
    task, release, points = item
    for label, lock, mem, t in points:
        ax.scatter(mem / 2**30, t, marker="s" if lock else "o", color="C3" if lock else "C0", s=20)
        ax.annotate(label, (mem / 2**30, t), fontsize=5)
    ax.set_xlabel("counted training memory (GiB)")
    ax.set_ylabel("median step time (s)")
    ax.set_title(f"{task} · {release}: memory–time of every attack (squares: release; circles: original)",
                 fontsize=8)


def _draw_real_attack(ax, item) -> None:
    task, defense, level, lines, name = item
    _lock_vs_original(ax, lines, level)
    if min(y for *_, pts in lines for _, y in pts) < -10:  # a broken lock's loss: compress its scale
        ax.set_yscale("symlog")
    ax.set_title(f"{name} · {task} · {defense}", fontsize=9)
    ax.set_ylabel("held-out task score (−loss)")


def _budget_panels(found) -> list:
    return [d for _, d in found.get(schema.ERROR_BUDGET, [])]


def _draw_budget(ax, d) -> None:
    g = [x for x in d["all_layers"] if x["layer_rel_error_median"] > 0]
    err = [x["layer_rel_error_median"] for x in g]
    ax.semilogx(err, [x["top1_agreement"] for x in g], "o-", label="top-1 agreement")
    ax.semilogx(err, [min(x["ppl_ratio"], 3.0) for x in g], "s-", label="ppl ratio (capped at 3)")
    ax.axhline(TOP1_BAR, color="C0", ls=":", lw=0.8)
    ax.axhline(PPL_RATIO_BAR, color="C1", ls=":", lw=0.8)
    ax.set_xlabel("median per-layer relative error (every layer at α²·e)")
    ax.set_title("what the fidelity bars ask of each DLR-Net (SmolLM2-135M)", fontsize=9)


def _gain_panels(items: list) -> list:
    """One panel per (source, task) of the gains per mask ratio."""
    return [(name, task, rows) for name, rows in items for task in dict.fromkeys(r["task"] for r in rows)]


def _one_panel(items: list) -> list:
    return [items] if items else []


# ---- documents ---------------------------------------------------------------------------------

def _x(v, spec: str = ".2f") -> str:
    """A multiplier: ``∞`` when never reached, ``n/a`` when missing."""
    if isinstance(v, float) and math.isinf(v):
        return "∞ (never)"
    return fmt(v, spec) + "×" if v is not None else "n/a"


def _real_model_tables(found) -> list[tuple[str, list[str], list[list[str]]]]:
    """The real LLM first: fidelity against the bars, lock time and speed of every recorded lock."""
    rows = []
    for f, d in sorted(found.get(schema.REAL_LOCK, []), key=lambda x: str(x[0])):
        fid, speed, lc = d["fidelity"], d.get("speed") or {}, d["lock_config"]  # speed: null when not measured
        prose, code = fid.get("builtin:prose", {}), fid.get("builtin:code", {})
        ok = all(meets_bars(x.get("ppl_ratio", math.inf), x.get("top1_agreement", 0)) for x in (prose, code))
        name = d.get("name") or f.stem.removeprefix("real_model_")  # older records: named by their file only
        rows.append([name, f"{lc['rank']} / {d['depth']}",
                     f"{d['lock_seconds'] / 60:.0f}",
                     f"{d['layer_rel_error_median']:.2f} / " + (
                         f"{d['layer_rel_error_max']:.2f}" if not d.get("layers_not_finite")
                         else "NaN (layer " + ", ".join(map(str, d["layers_not_finite"])) + " diverged)"),
                     f"{prose.get('ppl_original', math.nan):.1f} → {prose.get('ppl_locked', math.nan):.3g}",
                     fmt(prose.get("top1_agreement"), ".3f"), fmt(code.get("ppl_ratio"), ".3g"),
                     _x(speed.get("prefill_ratio")), _x(speed.get("decode_ratio")),
                     "meets" if ok else "MISSES"])
    if not rows:
        return []
    return [("Real LLM (SmolLM2-135M): DLR-Lock fidelity, lock time and speed (bars: ppl ratio ≤ 1.05, top-1 "
             "agreement ≥ 0.95, prefill ≤ 1.2×, decode ≤ 1.3×)",
             ["run", "rank / depth", "lock min", "layer error median / max", "prose ppl original → locked",
              "prose top-1 agreement", "code ppl ratio", "prefill", "decode", "fidelity bars"], rows)]


def _red_team_tables(found) -> list[tuple[str, list[str], list[list[str]]]]:
    """The red team on the faithful releases of the real LLM: the verdict per release and task, then every
    attack's cost per step (counted training memory, step time, the preparation's seconds)."""
    tables = []
    for d in _red_team(found, True):
        name, rows, steps = d.get("model_name") or Path(d["models"]["original"]).name, [], []
        for a in d["analysis"]:
            fid = a["release_fidelity"]
            spread = a.get("seed_spread") or {}
            rows.append([a["release"], a["task"],
                         f"{fid['ppl_ratio']:.4f} / {fmt(fid.get('readback_ppl_ratio'), '.4f')}",
                         f"{a['original_release_score']:+.3f} → {a['best_original_score']:+.3f}",
                         f"{a['locked_release_score']:+.3f} → {a['best_locked_score']:+.3f}",
                         "; ".join(f"{k}: " + " / ".join(f"{g:+.3f}" for g in v) for k, v in spread.items()) or "n/a",
                         fmt(a["gain_ratio_at_convergence"], ".2f"), _x(a["seconds_level"]["multiplier"]),
                         _x(a["flops_level"]["multiplier"]),
                         _x((a.get("seconds_level_within_memory") or {}).get("multiplier")), a["verdict"]])
            steps += [[a["release"], a["task"], "release" if s["model"] != "original" else "original", s["label"],
                       f"{s['best_gain']:+.3f}", str(s["steps"]), f"{s['prepare_seconds']:.0f}",
                       _x(s["step_time_ratio"]), _x(s.get("memory_ratio"))] for s in a["per_step"]]
        tables.append((f"Real LLM ({name}): the red team on faithful releases — what an attacker pays to fine-tune "
                       "the release as well as the unlocked original (target: 90% of the original's best gain, as "
                       "a score level; score = −held-out loss)",
                       ["release", "task", "ppl ratio / read-back", "original: release → best",
                        "release: release → best", "best gain, 2 seeds", "gain ratio", "time ×", "FLOPs ×",
                        "time × within the original's training memory", "verdict"], rows))
        tables.append((f"Real LLM ({name}): every attack on the faithful releases, per step, relative to the "
                       "original's best full fine-tune",
                       ["release", "task", "model", "attack", "best gain", "steps", "preparation s", "step time",
                        "training memory"], steps))
    return tables


def _real_attack_tables(found) -> list[tuple[str, list[str], list[list[str]]]]:
    """The older red team on the real LLM (a broken lock, kept as history): the verdict per task, then every
    attack's cost per step; and the per-layer error budget."""
    tables = []
    for d in _red_team(found, False):
        rows, steps = [], []
        for a in d["analysis"]:
            spread = a.get("seed_spread")
            rows.append([a["task"], a["defense"],
                         f"{a['original_release_score']:+.3f} → {a['best_original_score']:+.3f}",
                         "n/a" if not spread else " / ".join(f"{g:+.3f}" for g in spread),
                         f"{a['locked_release_score']:+.3f} → {a['best_locked_score']:+.3f}",
                         fmt(a["gain_ratio_at_convergence"], ".2f"), _x(a["seconds_gain"]["multiplier"]),
                         _x(a["seconds_level"]["multiplier"]), _x(a["flops_level"]["multiplier"])])
            steps += [[a["task"], "lock" if s["model"] != "original" else "original", s["label"],
                       f"{s['best_score']:+.3f}", f"{s['best_gain']:+.3f}", str(s["steps"]),
                       _x(s["step_time_ratio"]), _x(s["activation_ratio"]),
                       fmt(None if s["peak_delta_bytes"] is None else s["peak_delta_bytes"] / 2**20, ".0f")]
                      for s in a["per_step"]]
        name = Path(d["models"]["original"]).name
        tables.append((f"Real LLM ({name}), history — a broken lock: the red team, lock vs unlocked original "
                       "(score = −held-out loss; "
                       "targets: 90% of the best unlocked gain, from each release's own score or as a level from "
                       "the original's)",
                       ["task", "lock", "original: release → best", "original best gain, 2 seeds",
                        "lock: release → best", "gain ratio", "time × (gain target)", "time × (level target)",
                        "FLOPs × (level target)"], rows))
        tables.append((f"Real LLM ({name}): every attack's cost per step, relative to the original's best full "
                       "fine-tune",
                       ["task", "model", "attack", "best score", "best gain", "steps", "step time",
                        "activation memory", "peak growth MiB"], steps))
    for _, d in found.get(schema.ERROR_BUDGET, []):
        rows = [[fmt(g["alpha"], ".2f"), fmt(g["layer_rel_error_median"], ".4f"), fmt(g["ppl_ratio"], ".4g"),
                 fmt(g["top1_agreement"], ".3f"),
                 "meets" if meets_bars(g["ppl_ratio"], g["top1_agreement"]) else "MISSES"]
                for g in d["all_layers"]]
        tables.append(("Real LLM (SmolLM2-135M): per-layer error budget — every MLP replaced by MLP + α·(DLR − MLP)",
                       ["α", "median layer error", "ppl ratio", "top-1 agreement", "fidelity bars"], rows))
    return tables


def _within_memory(a: dict) -> str:
    """The time multiplier within the original full fine-tune's training memory (counted, or estimated from
    older runs' parameter counts); results analysed before weightlock counted it used the runs' measured RSS
    peak, which is not shown as a budget."""
    basis = a.get("memory_basis")
    if basis is None:
        return "n/a (older result: RSS-peak budget, not reliable)"
    if basis == "unknown" or a["seconds_memory_budget"].get("multiplier") is None:
        return "n/a (no training-memory count)"
    return _x(a["seconds_memory_budget"]["multiplier"]) + (" (estimated)" if basis == "estimated" else "")


def _cost_tables(found) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    for _, d in found.get(schema.LOCK_COST, []):
        rows = []
        for a in d["analysis"]:
            sec = a["seconds_any_memory"]
            cheapest = min((k for k, v in sec["locked"].items() if isinstance(v, float)),
                           key=lambda k: sec["locked"][k], default="none")
            rows.append([a["task"], a["defense"], f"{a['best_original_gain']:+.4f}", f"{a['best_gain']:+.4f}",
                         fmt(a["gain_ratio_at_convergence"], ".2f"), _x(sec["multiplier"]),
                         _x(a["flops_any_memory"]["multiplier"]), _x(a["tokens_any_memory"]["multiplier"]),
                         _within_memory(a), cheapest])
        tables.append((f"Lock cost multiplier: what reaching {d['q']:.0%} of the unlocked attacker's best gain costs "
                       "on the lock ÷ on the original (cheapest attack each side, attacks run to convergence)",
                       ["task", "defense", "best unlocked gain", "best gain on the lock", "gain ratio",
                        "time ×", "FLOPs ×", "tokens ×", "time × within training memory",
                        "cheapest attack on the lock"],
                       rows))
    for _, d in found.get(schema.LOCK_REGIME, []):
        rows = [[r["variant"], str(r["depth"]), f"{r['ppl_ratio']:.4f}", f"{r['lock_seconds']:.0f}",
                 _x(r.get("mlp_memory_multiplier"), ".1f"), _x(r["full"]["activation_ratio"]),
                 _x(r["freeze"]["activation_ratio"]), _x(r["full"]["step_time_ratio"]),
                 fmt(r["full"]["gain_ratio"], ".2f"), _x(r["full"]["multiplier_seconds"]),
                 _x(r["full"]["multiplier_flops"])] for r in d["results"]]
        tables.append((f"DLR-Lock regime: rank sweep on the small model ({d['task']} task)",
                       ["variant", "depth", "ppl ratio", "lock s", "per-MLP memory", "activation (full FT)",
                        "activation (frozen DLR)", "step time (full FT)", "gain ratio", "time ×", "FLOPs ×"], rows))
    return tables


# a demo summary from before weightlock counted training memory: what its verdicts' memory clause meant
OLD_DEMO_MEMORY = (" (recorded before weightlock counted training memory: a \"within the unlocked full fine-tune's "
                   "memory\" clause here compared the runs' measured RSS peak growth, which varies run to run and "
                   "is not reliable; run the demo again for the counted budget)")


def _demo_tables(found) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    for f, d in found.get(schema.DEMO, []):
        tables.append((f"Capability ({f.parent}, {d['preset']} preset): validation perplexity",
                       CAPABILITY_HEAD, capability_rows(d)))
        tables.append(("Attacks (gain ratio = gain on the lock / same attack's gain on the original; "
                       + ATTACK_CAPTION + ")", ATTACK_HEAD, attack_rows(d)))
        tables.append(("Verdicts" + ("" if d.get("training_memory") else OLD_DEMO_MEMORY), ["defense", "verdict"],
                       [[k, v] for k, v in d["verdicts"].items()]))
    return tables


# ---- the report's parts and the registry of sections ----------------------------------------------------

# Table, Figure and Panels (what sections and defenses' report hooks bring) live in weightlock.tables, below
# the defenses that build them.


@dataclass(frozen=True)
class Section:
    """What the report draws from the records of some kinds (:data:`weightlock.schema.RECORD_KINDS`): its
    ``tables(found) -> [Table]`` and its :class:`Figure` s, whose ``panels(found)`` read the records. ``found``
    maps a record kind to its [(path, record)] (:func:`collect`)."""

    kinds: tuple[str, ...]
    what: str
    tables: Callable[[dict], list[Table]] | None = None
    figures: tuple[Figure, ...] = ()


SECTIONS: Registry[Section] = Registry("report section", Section, group="weightlock.report", instances=True)
"""The report's sections, in the report's order (tables first, then figures, each in this order); plug-ins
register theirs with :func:`register_section` or through the entry-point group ``weightlock.report`` (a
:class:`Section`, or a module that registers on import)."""


def register_section(name: str, section: Section) -> Section:
    """Add ``section`` to the report under ``name`` (a taken name is an error); every kind it reads must be a
    registered record kind (:func:`weightlock.schema.register_kind`)."""
    unknown = sorted(set(section.kinds) - set(schema.RECORD_KINDS))
    if unknown:
        raise WeightlockError(f"report section {name!r} reads unregistered record kinds: {', '.join(unknown)}")
    return SECTIONS.register(name, section)


# the built-in figures' captions (prose, kept as data beside this module), by file
CAPTIONS: dict[str, str] = json.loads(Path(__file__).with_name("report_captions.json").read_text())


def _caption(f: Figure) -> str:
    return CAPTIONS.get(f.file, "") if f.caption is None else f.caption


# the built-in sections, in the report's order
BUILTIN_SECTIONS: tuple[tuple[str, Section], ...] = (
    ("real_attacks", Section((schema.REAL_ATTACKS,), "real-LLM red team on faithful releases", _red_team_tables, (
        Figure("real_attacks.png", "Attacks on a real LLM (SmolLM2-135M): score vs the attacker's cost",
               _real_attack_panels, _draw_real_attack, (6, 4), 2, None),
        Figure("real_attacks_frontier.png", "Attacks on faithful SmolLM2-135M releases: memory vs time",
               _real_frontier_panels, _draw_real_frontier, (6, 4), 2, None)))),
    ("real_lock", Section((schema.REAL_LOCK,), "real-LLM fidelity, lock time and speed", _real_model_tables)),
    ("real_attacks_history", Section((schema.REAL_ATTACKS, schema.ERROR_BUDGET),
                                     "real-LLM red team and error budget", _real_attack_tables)),
    ("lock_cost", Section((schema.LOCK_COST, schema.LOCK_REGIME), "lock cost multiplier and rank regime",
                          _cost_tables, (
        Figure("cost_curves.png", "Gain vs the attacker's cost, locked vs unlocked", _cost_panels, _draw_cost,
               (5, 3.8), 3, None),))),
    ("error_budget", Section((schema.ERROR_BUDGET,), "real-LLM error budget", None, (
        Figure("error_budget.png", "Per-layer error budget of a real LLM", _budget_panels, _draw_budget, (6, 4),
               None, None),))),
    # a demo's (weightlock run's) summary: its defenses bring their own parts (DefenseHooks.report)
    ("demo", Section((schema.DEMO,), "demo capability, attacks and verdicts", _demo_tables)),
    ("curves", Section((schema.DEMO, schema.ATTACK_CURVES, schema.ATTACK_RUN), "fine-tuning curves", None, (
        Figure("curves.png", "Fine-tuning curves, locked vs unlocked", lambda f: _curves(f)[:16], _draw_curve,
               (4, 3), 4, None),))),
    ("memory_vs_depth", Section((schema.MEMORY_VS_DEPTH,), "memory vs DLR depth", None, (
        Figure("memory_vs_depth.png", "Memory vs DLR depth", _memory, _draw_memory, (5, 3.6), None, None),))),
    ("frontier", Section((schema.MEMORY_TIME_FRONTIER,), "memory–time frontier", None, (
        Figure("frontier.png", "Memory–time frontier", _frontier, _draw_frontier, (6, 4), None, None),))),
    ("gain_vs_ratio", Section((schema.PMP_GAIN_VS_RATIO,), "gain vs PMP mask ratio", None, (
        Figure("gain_vs_ratio.png", "Gain vs PMP mask ratio", _gain_vs_ratio, _draw_gain, (5, 3.8), None, None,
               _gain_panels),))),
    ("mask_recovery", Section((schema.MASK_RECOVERY,), "mask-recovery IoU vs chance", None, (
        Figure("mask_recovery.png", "Mask-recovery IoU vs chance", _recovery, _draw_recovery, (5.5, 3.8), None,
               None),))),
    ("layer_error", Section((schema.LOCK_FIDELITY, schema.LOCK_REPORT), "per-layer distillation error", None, (
        Figure("layer_error.png", "Per-layer distillation error", _layer_errors, _draw_layer_errors, (6, 3.8), None,
               None, lambda items: _one_panel(_unique_layer_errors(items))),))),
)
for _name, _section in BUILTIN_SECTIONS:
    register_section(_name, _section)

# the built-in figures, in the report's order, and the record kinds each is drawn from
FIGURES: list[Figure] = [f for _, s in BUILTIN_SECTIONS for f in s.figures]
FIGURE_KINDS: dict[str, tuple[str, ...]] = {f.file: s.kinds for _, s in BUILTIN_SECTIONS for f in s.figures}


def drawn() -> dict[str, list[str]]:
    """Record kind → what the report's sections draw from it (figure files and tables), plug-ins' included."""
    out: dict[str, list[str]] = {}
    for section in SECTIONS.values():
        for k in section.kinds:
            out.setdefault(k, []).extend([f.file for f in section.figures]
                                         + ([f"table: {section.what}"] if section.tables else []))
    return out


# the parts of an experiment directory that its summary already carries: one typed record per attack run, the
# resolved spec (weightlock run) and each defense's build record — neither drawn on their own nor generic
PARTS = frozenset({schema.ATTACK_RECORD, schema.EXPERIMENT_SPEC, schema.DEFENSE_BUILD})


# ---- what defenses bring, and the generic sections ---------------------------------------------------

def _defense_parts(found) -> list:
    """What each demo summary's defenses bring (:meth:`DefenseHooks.report <weightlock.defenses.DefenseHooks.report>`:
    tables, figures, panels for the registered figures), in file and run order; a defense that brings nothing
    (or is not installed here) gets the generic section: a table of what the summary records about it and its
    attacker-gain figure."""
    from .defenses import registered_in

    parts: list = []
    for _, d in found.get(schema.DEMO, []):
        hooks = {x.name: x.hooks() for x in registered_in(d)}
        for rec in defenses_of(d):
            brought = list(hooks[rec["name"]].report(d)) if rec["name"] in hooks else []
            parts += brought or _generic_defense(d, rec)
    return parts


def _generic_defense(summary: dict, rec: dict) -> list:
    name, title = rec["name"], rec.get("title") or rec["name"]
    cap = summary.get("capability", {}).get(name, {})
    rows = [["description", rec.get("description") or ""], ["config", _short(rec.get("config", {}))]]
    rows += [[f"capability: {k} perplexity", fmt(v, ".2f")] for k, v in cap.items()]
    rows += [["verdict", summary.get("verdicts", {}).get(title, "n/a")]]
    return [Table(f"{title} ({name}): what the summary records", ["field", "value"], rows),
            *_gain_figure(summary.get("attacks"), name, title)]


def _gain_figure(attacks, defense: str, title: str) -> list[Figure]:
    """The generic attacker-gain figure of ``defense`` from standard attack rows (defense, attack, task, gain,
    reference_gain): per task, each attack's gain on the release beside the same attack's on the original."""
    keys = ("defense", "attack", "task", "gain", "reference_gain")
    rows = [r for r in attacks or [] if isinstance(r, dict) and all(k in r for k in keys) and r["defense"] == defense]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return []
    panels = [(task, [r for r in rows if r["task"] == task]) for task in tasks]
    return [Figure(f"{defense}_gain.png", f"{title}: attacker gain on the release vs on the original", panels,
                   _draw_defense_gain, (5, 3.6), 3,
                   f"Each attack's gain on the {title} release (what fine-tuning it buys the attacker) beside the "
                   "same attack's gain on the unlocked original, per task: a defense holds where the first bar stays "
                   "well below the second.")]


def _draw_defense_gain(ax, item) -> None:
    task, rows = item
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["gain"] for r in rows], 0.4, label="on the release")
    ax.bar([x + 0.2 for x in xs], [r["reference_gain"] for r in rows], 0.4, label="on the original")
    ax.set_xticks(list(xs), [r["attack"] for r in rows], fontsize=7)
    ax.set_ylabel("attacker gain")
    ax.set_title(task, fontsize=9)


def _short(v, width: int = 160) -> str:
    text = v if isinstance(v, str) else fmt(v, ".4g") if isinstance(v, float) else json.dumps(v, default=str)
    return text if len(text) <= width else text[:width - 1] + "…"


def _generic_records(found) -> list:
    """A record of a kind no section draws: a table of its fields, and where it holds standard attack rows
    (``attacks``), the attacker-gain figure of each defense in them."""
    parts: list = []
    for kind in sorted(set(found) - set(drawn())):
        for f, d in found[kind]:
            rows = [[k, _short(v)] for k, v in d.items() if k not in ("kind", "schema_version", "machine")]
            parts.append(Table(f"{f} (record kind {kind!r}, no report section): its fields", ["field", "value"],
                               rows))
            attacks = d.get("attacks") if isinstance(d.get("attacks"), list) else []
            for defense in dict.fromkeys(r.get("defense") for r in attacks if isinstance(r, dict)):
                if isinstance(defense, str) and defense != "reference":
                    parts += _gain_figure(attacks, defense, defense)
    return parts


_IMG_CHECK = ("window.addEventListener('load',function(){var i=Array.prototype.slice.call(document.images);"
              "document.body.setAttribute('data-images-total',i.length);document.body.setAttribute("
              "'data-images-loaded',i.filter(function(x){return x.complete&&x.naturalWidth>0;}).length);});")


def _parts(found) -> tuple[list, list[str]]:
    """The report's parts in order (:class:`Table` s, and each figure with its panels) and the
    titles of the registered figures these results have no data for: every section's tables, then the tables
    the demo summaries' defenses bring; every section's figures (with the panels defenses add), then the
    defenses' own; last, the generic sections of the records of kinds no section reads."""
    sections = list(SECTIONS.values())
    brought = _defense_parts(found)
    added: dict[str, list] = {}
    for p in brought:
        if isinstance(p, Panels):
            added.setdefault(p.figure, []).extend(p.items)
    parts: list = [Table(*t) for s in sections if s.tables for t in s.tables(found)]
    parts += [Table(*p) for p in brought if not isinstance(p, (Figure, Panels))]
    missing = []
    for f in (f for s in sections for f in s.figures):
        panels = _panels(f, list(f.panels(found)) + added.pop(f.file, []))
        if panels:
            parts.append(_Drawn(f, panels))
        else:
            missing.append(f.title)
    if added:
        raise WeightlockError(f"panels added to figures no report section draws: {', '.join(added)}")
    for p in [p for p in brought if isinstance(p, Figure)] + _generic_records(found):
        if not isinstance(p, Figure):
            parts.append(Table(*p))
            continue
        panels = _panels(p, list(p.panels(found) if callable(p.panels) else p.panels))
        if panels:
            parts.append(_Drawn(p, panels))
    return parts, missing


class _Drawn(NamedTuple):
    figure: Figure
    panels: list


def _panels(f: Figure, items: list) -> list:
    return f.arrange(items) if f.arrange else items


def _file_name(name: str, taken: set[str]) -> str:
    """``name`` as a safe PNG file name, made unique among ``taken`` (a suffix -2, -3...)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.removesuffix(".png")) or "figure"
    out, i = f"{stem}.png", 1
    while out in taken:
        i += 1
        out = f"{stem}-{i}.png"
    taken.add(out)
    return out


def build_report(paths: list[str | Path], out: str | Path = "report") -> Path:
    """Write ``out/index.html``, ``out/README.md`` and the PNG figures; returns the index path."""
    found = collect(paths)
    if not found:
        raise WeightlockError(f"no weightlock results (JSON) found under {', '.join(map(str, paths))}")
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts, missing = _parts(found)
    sources = [str(f) for items in found.values() for f, _ in items]
    dates = sorted({d.get("machine", {}).get("date") for items in found.values() for _, d in items} - {None})

    md = ["# weightlock report", "",
          f"Built from {len(sources)} recorded result file(s)" + (f" dated {', '.join(dates)}" if dates else "") + ".",
          ""]
    body = [f"<h1>weightlock report</h1><p>Built from {len(sources)} recorded result file(s)"
            + (f" dated {html.escape(', '.join(dates))}" if dates else "") + ".</p>"]
    taken: set[str] = set()
    for part in parts:
        if not isinstance(part, _Drawn):
            title, head, rows = part
            md += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
            body.append(f"<h2>{html.escape(title)}</h2><table><tr>"
                        + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            continue
        f, panels = part
        name = _file_name(f.file, taken)
        _draw(tmp / name, panels, f.draw, f.size, f.cols and min(f.cols, len(panels)))
        md += [f"## {f.title}", "", f"![{f.title}]({name})", "", _caption(f), ""]
        body.append(f"<h2>{html.escape(f.title)}</h2><figure><img src=\"{name}\" alt=\"{html.escape(f.title)}\">"
                    f"<figcaption>{html.escape(_caption(f))}</figcaption></figure>")
    if missing:
        md += ["## Not in these results", ""] + [f"- {m}" for m in missing] + [""]
        body.append("<h2>Not in these results</h2><ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in missing)
                    + "</ul>")
    md += ["## Sources", ""] + [f"- `{s}`" for s in sources]
    body.append("<h2>Sources</h2><ul>" + "".join(f"<li><code>{html.escape(s)}</code></li>" for s in sources) + "</ul>")
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>weightlock report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:.9em;margin-top:.4em}"
            "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em}"
            f"</style><script>{_IMG_CHECK}</script></head><body>" + "\n".join(body) + "</body></html>\n")
    write_text(tmp / "index.html", page)
    write_text(tmp / "README.md", "\n".join(md) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()
    move_dir_contents(tmp, out)
    return out / "index.html"
