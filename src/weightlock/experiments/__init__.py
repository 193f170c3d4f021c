"""Experiments as data: a spec (:class:`ExperimentSpec`, YAML or JSON: models, defenses and their sweeps, targets,
attacks with their settings and sweeps, tasks, seeds, budget, analyses, stages) run by one engine
(:mod:`weightlock.experiments.engine`, through :func:`run_experiment`: ``weightlock run``, ``weightlock demo`` and
the bench's grid experiments, shipped as specs), each attack run kept as a typed :class:`AttackRun` record and
analysed by registered analyses (:mod:`weightlock.experiments.analyses`); and the harness the scripts left
under ``bench/`` share (:mod:`weightlock.experiments.harness`).

Importing this package is light (no torch): the runner is imported when called.
"""
from ..eval.records import AttackRun, CostPoint
from . import bench_analyses, lock_cost, red_team  # noqa: F401  (register the built-in analyses: light modules)
from .spec import ExperimentSpec, load_spec, shipped_specs


def run_experiment(*args, **kwargs):
    """:func:`weightlock.experiments.runner.run_experiment` (imported on first use)."""
    from .runner import run_experiment as run

    return run(*args, **kwargs)


__all__ = ["AttackRun", "CostPoint", "ExperimentSpec", "load_spec", "run_experiment", "shipped_specs"]
