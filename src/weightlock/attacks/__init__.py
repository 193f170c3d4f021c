"""The red team: fine-tuning attacks (a registry), counter-measures and attacker-cost measurement."""
from .core import (ATTACKS, Attack, AttackConfig, apply_checkpointing, finetune, make_attack, register,
                   reverse_distill, run_attack)
from .suite import run_suite

__all__ = ["ATTACKS", "Attack", "AttackConfig", "apply_checkpointing", "finetune", "make_attack", "register",
           "reverse_distill", "run_attack", "run_suite"]
