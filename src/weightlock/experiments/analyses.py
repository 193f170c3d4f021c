"""The analyse stage: registered analyses that read what an experiment's attack stage recorded (its
``summary.json``, the typed :class:`~weightlock.eval.records.AttackRun` records, earlier results) and write
their result to ``RUN/analysis/NAME.json`` (``save_as``: also to the bench results, ``bench/results/NAME.json``,
through :func:`weightlock.experiments.harness.save`, with the analysis's record kind).

A spec names them under ``analyses`` (``[{name: attack-table, options: {...}}]``); register one with::

    from weightlock.experiments.analyses import register_analysis

    @register_analysis("my-table", kind="bench.my_table")
    def my_table(ctx, threshold: float = 0.5) -> dict:   # ctx: an AnalysisContext
        return {"rows": [r for r in ctx.summary["attacks"] if r["gain"] > threshold]}
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightlockError
from ..registry import Registry


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: ``fn(ctx, **options) -> dict``, the record kind its result is saved as and its
    headline ``figures`` (dotted paths with ``*``: what ``weightlock compare`` checks a rerun against)."""

    fn: Callable[..., dict]
    kind: str | None = None
    description: str = ""
    figures: tuple[str, ...] = ()

    def __call__(self, ctx: "AnalysisContext", **options) -> dict:
        return self.fn(ctx, **options)


ANALYSES: Registry[Analysis] = Registry("analysis", Analysis, instances=True)


def register_analysis(name: str, kind: str | None = None, figures: tuple[str, ...] = ()):
    """Decorator: register ``fn(ctx, **options) -> dict`` as the analysis ``name`` (its docstring's first line
    describes it in ``weightlock run --list``; ``figures``: its headline numbers, for ``weightlock compare``)."""
    def deco(fn):
        text = " ".join((fn.__doc__ or "").split())
        ANALYSES.register(name, Analysis(fn, kind, text.split(": ")[0].split(". ")[0].rstrip("."), tuple(figures)))
        return fn

    return deco


COMMON_OPTIONS = ("save_as",)


def check_options(analysis: Analysis, options: dict) -> None:
    """Refuse an option the analysis does not take (one line naming the valid ones)."""
    params = list(inspect.signature(analysis.fn).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params] + list(COMMON_OPTIONS)
    for k in options:
        if k not in valid:
            raise WeightlockError(f"unknown option {k!r}; valid options: {', '.join(valid)}")


@dataclass
class AnalysisContext:
    """What an analysis reads: the run directory, the spec and the summary the attack stage wrote."""

    out: Path
    spec: Any
    summary: dict
    figures: Path | None = None  # where its figures go: beside its bench result (save_as), else out/analysis

    def __post_init__(self) -> None:
        if self.figures is None:
            self.figures = Path(self.out) / "analysis"

    def records(self) -> list:
        """Every :class:`~weightlock.eval.records.AttackRun` under ``out/attacks``."""
        from ..eval.records import AttackRun
        from ..io import read_json

        return [AttackRun.from_dict(read_json(f), f) for f in sorted((self.out / "attacks").rglob("record.json"))]


def run_analysis(entry, out: Path, spec, summary: dict, options: dict) -> dict:
    """Run the spec's analysis ``entry`` with its ``options`` (a plain dict: the engine thaws the spec's) on
    ``summary``; writes ``out/analysis/NAME.json`` (and the bench result ``save_as`` names). Returns the
    result."""
    from .. import schema
    from ..io import write_json

    analysis = ANALYSES.get(entry.name)
    options = dict(options)
    save_as = options.pop("save_as", None)
    from . import harness

    seeds = sorted({m.seed for m in spec.models if m.seed is not None})
    command = f"weightlock run {spec.name}" + (f" --seed {seeds[0]}" if len(seeds) == 1 else "")
    # a seeded rerun writes its bench result under its run (or $WEIGHTLOCK_BENCH_RESULTS), never over the record
    results = Path(out) / "results" if seeds and not os.environ.get(harness.RESULTS_ENV) else harness.RESULTS
    figures = results if save_as else None
    result = analysis(AnalysisContext(Path(out), spec, summary, figures), **options)
    record = {"kind": analysis.kind or f"analysis.{entry.name}", "schema_version": schema.SCHEMA_VERSION,
              "spec": spec.name, **result}
    write_json(Path(out) / "analysis" / f"{entry.name}.json", record)
    if save_as:
        harness.save(save_as, {"command": command, **({"seeds": seeds} if seeds else {}), **result},
                     kind=analysis.kind, directory=results)
    return result


@register_analysis("attack-table")
def attack_table(ctx: AnalysisContext, task: str | None = None) -> dict:
    """Every attack row's gain, gain ratio and cost multipliers (one task or all), by defense and attack."""
    keep = ("defense", "attack", "task", "gain", "reference_gain", "gain_ratio", "memory_ratio", "time_ratio",
            "training_memory_ratio", "fits_memory")
    rows = [{k: r.get(k) for k in keep} for r in ctx.summary["attacks"] if task is None or r["task"] == task]
    return {"rows": rows, "sweep": ctx.summary.get("sweep", [])}

