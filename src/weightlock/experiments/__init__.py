"""Experiments as data: a spec (:class:`ExperimentSpec`, YAML or JSON) run by one runner
(:func:`run_experiment`, ``weightlock run``), each attack run kept as a typed :class:`AttackRun` record;
and the harness the scripts under ``bench/`` share (:mod:`weightlock.experiments.harness`).

Importing this package is light (no torch): the runner is imported when called.
"""
from ..eval.records import AttackRun, CostPoint
from .spec import ExperimentSpec, load_spec, shipped_specs


def run_experiment(*args, **kwargs):
    """:func:`weightlock.experiments.runner.run_experiment` (imported on first use)."""
    from .runner import run_experiment as run

    return run(*args, **kwargs)


__all__ = ["AttackRun", "CostPoint", "ExperimentSpec", "load_spec", "run_experiment", "shipped_specs"]
