"""LoRA adapters (peft) on attention, on every linear layer, or on a DLR lock's own factors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import choice
from ..errors import WeightlockError
from ..models.layout import attention_names
from ..train.finetune import finetune_training
from ..train.loop import TrainConfig
from .base import Attack, AttackConfig, is_dlr
from .registry import register


@dataclass
class LoraAttackConfig(AttackConfig):
    """LoRA: which linear layers get adapters, their rank ``r`` and scale ``alpha`` (default lr 3e-3)."""

    training: TrainConfig = field(default_factory=lambda: finetune_training(lr=3e-3))
    targets: Literal["attention", "all-linear", "dlr"] = choice("attention", "LoRA targets")
    r: int = 8
    alpha: int = 16

    def validate(self) -> None:
        super().validate()
        if self.r < 1 or self.alpha < 1:
            raise WeightlockError(f"LoRA r and alpha must be at least 1, got r={self.r}, alpha={self.alpha}")


def dlr_targets(model) -> list[str]:
    """The DLR blocks' maps LoRA adapts: down and up, and gate where the blocks are gated."""
    from ..dlr.modeling_weightlock_dlr import DLRNet

    gated = any(m.spec.form == "gated" for m in model.modules() if isinstance(m, DLRNet))
    return ["down", "up", "gate"] if gated else ["down", "up"]


@register("lora")
class LoraAttack(Attack):
    """peft LoRA on attention, on all linear layers, or on the DLR-Net factors."""

    Config = LoraAttackConfig

    def prepare(self, model, tokenizer, ctx):
        from peft import LoraConfig, get_peft_model

        c = self.cfg
        if c.targets == "dlr" and not is_dlr(model):
            raise WeightlockError("LoRA on DLR factors needs a DLR-locked model")
        targets = {"attention": attention_names(model), "all-linear": "all-linear",
                   "dlr": dlr_targets(model)}[c.targets]
        return get_peft_model(model, LoraConfig(r=c.r, lora_alpha=c.alpha, target_modules=targets, lora_dropout=0.0))
