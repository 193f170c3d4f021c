"""``weightlock run SPEC|NAME --out DIR``: an :class:`~weightlock.experiments.spec.ExperimentSpec` run by the
engine (:func:`weightlock.experiments.engine.run_model`), resumably.

Each model runs in ``DIR`` (or ``DIR/NAME`` when the spec has several); every stage and every attack run that
finished there is reused (an attack run's ``record.json`` is its :class:`~weightlock.eval.records.AttackRun`),
so a killed run continues where it stopped when run again. ``DIR/spec.json`` keeps the resolved spec (sweeps
expanded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..io import check_out_dir, write_json
from ..schema import EXPERIMENT_SPEC, stamp
from .spec import ExperimentSpec, load_spec


def run_experiment(spec: ExperimentSpec | str | Path, out: str | Path, *, defenses: Sequence | None = None,
                   report: bool | None = None, on_record: Callable | None = None) -> dict[str, dict]:
    """Run (or resume) ``spec`` (a spec, a spec file or a shipped spec's name) in ``out``; returns each model's
    summary by model name. ``defenses``: run only these (a label or registered name; one the spec does not
    configure runs with its config's defaults; or :class:`~weightlock.defenses.Defense` objects);
    ``report``: override the spec's ``measure.report``; ``on_record`` is called with every new
    :class:`~weightlock.eval.records.AttackRun`."""
    from .engine import check_run, run_model

    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    if defenses is not None and all(isinstance(d, str) for d in defenses):
        spec = spec.with_defenses(list(defenses))
        defenses = None
    check_run(spec, defenses)  # refused before any work
    out = check_out_dir(out)  # before any work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", stamp(EXPERIMENT_SPEC, spec.to_dict()))
    return {m.label: run_model(out if len(spec.models) == 1 else out / m.label, spec, m, defenses, report,
                               on_record=on_record)
            for m in spec.models}
