"""``weightlock demo``: the main job, end to end on the built-in corpus.

Pretrains a dense base model on the built-in corpus, then builds every registered defense
(``weightlock.defenses``: DLR-Lock locks the base model; PMP pretrains its own model with the same
settings; defenses registered from user code join them, or ``defenses=``/``--defense`` picks some),
evaluates each release's capability and the defense's own extra evaluations (mask recovery against
chance, memory vs depth), runs each defense's attack plan (full fine-tuning, LoRA, gradient
checkpointing, reverse distillation, mask recovery; PMP's authorized masked fine-tuning as the yardstick)
on the prose-adaptation task and the key–value recall skill, with the same attacks on the unlocked base
model as the reference, and writes one verdict per defense, ``summary.json`` and the report. Every stage
reuses what an earlier (or interrupted) run left in ``--out``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .experiments.engine import print_summary, verdicts  # noqa: F401

DEMO, QUICK = "demo", "demo-quick"  # the shipped specs (src/weightlock/experiments/specs/)


def run_demo(out: Path, quick: bool = False, report: bool = True, defenses: Sequence | None = None) -> dict:
    """Run (or resume) the demo in ``out``; returns the summary also written to ``out/summary.json``: the shipped
    spec ``demo`` (``demo-quick`` with ``quick``) through the experiment engine, as ``weightlock run`` runs it.

    ``defenses``: registry names or :class:`weightlock.defenses.Defense` objects (default: every registered
    defense but ``none``, the spec configuring the built-ins)."""
    from .defenses import DEFENSES
    from .experiments import run_experiment

    if defenses is None:
        defenses = [n for n in DEFENSES if n != "none"]
    return run_experiment(QUICK if quick else DEMO, out, defenses=list(defenses), report=report)[
        "tiny" if quick else "small"]


__all__ = ["print_summary", "run_demo", "verdicts"]
