"""The red team, on releases: fine-tuning attacks (a registry), counter-measures and attacker-cost
measurement, each run against the unlocked original; ``weightlock.eval`` scores what they gain.

Importing this package registers the built-in attacks (each module registers itself):
``full``, ``lora``, ``freeze``, ``reverse-distill``, ``mask-recover`` and the authorized ``masked``.
"""
from ..train.finetune import apply_checkpointing, finetune
from . import freeze, full, lora, mask  # noqa: F401  (registers the built-ins; reverse_distill: below)
from .base import Attack, AttackConfig
from .freeze import FreezeAttackConfig
from .lora import LoraAttackConfig
from .mask import MaskedConfig, MaskRecoverConfig
from .registry import ATTACKS, attack_options, make_attack, register
from .reverse_distill import ReverseDistillConfig, reverse_distill
from .run import run_attack
from .suite import run_suite

__all__ = ["ATTACKS", "Attack", "AttackConfig", "FreezeAttackConfig", "LoraAttackConfig", "MaskRecoverConfig",
           "MaskedConfig", "ReverseDistillConfig", "apply_checkpointing", "attack_options", "finetune",
           "make_attack", "register", "reverse_distill", "run_attack", "run_suite"]
