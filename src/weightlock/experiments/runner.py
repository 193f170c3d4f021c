"""``weightlock run SPEC|NAME --out DIR``: an :class:`~weightlock.experiments.spec.ExperimentSpec` run by the
demo's engine (:func:`weightlock.demo.run_plan`), resumably.

The spec translates into the engine's :class:`~weightlock.demo.DemoPlan` (sizes, budget, learning rates,
tasks, what to measure), the configured defenses, the attack selection with its sweeps and the seeds. Each
model runs in ``DIR`` (or ``DIR/NAME`` when the spec has several); every stage and every attack run that
finished there is reused (an attack run's ``record.json`` is its :class:`~weightlock.eval.records.AttackRun`),
so a killed run continues where it stopped when run again. ``DIR/spec.json`` keeps the resolved spec.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..io import check_out_dir, write_json
from ..schema import EXPERIMENT_SPEC, stamp
from .spec import ExperimentSpec, ModelSpec, load_spec, thaw


def plan_of(spec: ExperimentSpec, model: ModelSpec | None = None):
    """The engine's :class:`~weightlock.demo.DemoPlan` for ``spec`` on ``model`` (default: its first). The
    plan's DLR and PMP settings are those of the spec's configured defenses (else the plan's defaults; a run
    of some of the defenses, ``--defense``, keeps the whole spec's plan)."""
    from ..demo import DemoPlan

    model = model or spec.models[0]
    defenses = {e.name: e.make() for e in spec.defenses}
    kw: dict = {}
    if "dlr" in defenses:
        kw.update(rank=defenses["dlr"].cfg.rank, lock_steps=defenses["dlr"].cfg.steps)
    if "pmp" in defenses:
        kw.update(pmp_ratio=defenses["pmp"].cfg.mask_ratio, discovery_steps=defenses["pmp"].cfg.discovery_max_steps)
    b, m = spec.budget, spec.measure
    return DemoPlan(preset=model.preset, attack_steps=b.steps, attack_batch=b.batch, score_every=b.score_every,
                    patience=b.patience, reverse_distill_steps=b.reverse_distill_steps, tasks=tuple(spec.tasks),
                    lr={g: v[0] if len(v) == 1 else list(v) for g, v in spec.learning_rates.items()},
                    memory_depths=tuple(m.memory_depths), max_ppl_tokens=m.capability_tokens, **kw)


def run_experiment(spec: ExperimentSpec | str | Path, out: str | Path, *, defenses: Sequence[str] | None = None,
                   report: bool | None = None, on_record: Callable | None = None) -> dict[str, dict]:
    """Run (or resume) ``spec`` (a spec, a spec file or a shipped spec's name) in ``out``; returns each model's
    summary by model name. ``defenses``: run only these (a registered defense the spec does not configure
    runs with its config's defaults); ``report``: override the spec's ``measure.report``; ``on_record`` is
    called with every new :class:`~weightlock.eval.records.AttackRun`."""
    from ..demo import run_plan

    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    plans = {m.label: plan_of(spec, m) for m in spec.models}  # the spec's sizes, whichever defenses run
    if defenses:
        spec = spec.with_defenses(list(defenses))
    out = check_out_dir(out)  # before any work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", stamp(EXPERIMENT_SPEC, spec.to_dict()))
    attacks = None if spec.attacks is None else {k: (a.lr, thaw(a.options)) for k, a in spec.attacks.items()}
    summaries = {}
    for m in spec.models:
        where = out if len(spec.models) == 1 else out / m.label
        summaries[m.label] = run_plan(where, plans[m.label], [e.make() for e in spec.defenses],
                                      report=spec.measure.report if report is None else report,
                                      base_model=m.path, attacks=attacks, seeds=spec.seeds, on_record=on_record)
    return summaries
