"""What the experiment harness runs against a defense: its attacks (:class:`AttackSpec`; the two every
defense gets by default, :data:`FULL` and :data:`LORA`) and what its hooks read of the harness's plan
(:class:`HarnessPlan`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class AttackSpec:
    """One attack of a defense's plan: ``attack`` (a name in ``weightlock.attacks.ATTACKS``) with
    ``options``, at the learning rate the harness keeps under ``lr`` (``full``, ``lora`` or ``masked``),
    measured against ``reference``: the label of the ``none`` defense's attack run on the original."""

    label: str
    attack: str
    options: dict = field(default_factory=dict)
    lr: str = "full"
    reference: str | None = "full"


class HarnessPlan(Protocol):
    """What a defense's harness hooks read of the experiment's plan
    (:class:`weightlock.experiments.engine.RunPlan` is one: the spec as one model's run reads it)."""

    tasks: tuple[str, ...]  # the tasks attacked, the first one's rows make the frontier
    memory_depths: tuple[int, ...]  # depths of the memory-vs-depth evaluation
    reverse_distill_steps: int

    @property
    def block_size(self) -> int: ...


FULL = AttackSpec("full", "full", {}, "full", "full")
LORA = AttackSpec("lora", "lora", {"targets": "attention"}, "lora", "lora")


__all__ = ["FULL", "LORA", "AttackSpec", "HarnessPlan"]
