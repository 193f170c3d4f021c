"""Partial fine-tuning: freeze the MLPs (or DLR-Nets) and train the rest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import choice
from ..models.layout import attention_names
from .base import Attack, AttackConfig
from .registry import register


@dataclass
class FreezeAttackConfig(AttackConfig):
    """Which parameters train (``train``); the rest are frozen."""

    # non-mlp: attention, norms, embeddings, head | attention | norms-head
    train: Literal["non-mlp", "attention", "norms-head"] = choice("non-mlp", "freeze mode")


@register("freeze")
class FreezeAttack(Attack):
    """Fine-tune only some parts: freeze the MLPs / DLR-Nets and train the rest."""

    Config = FreezeAttackConfig

    def prepare(self, model, tokenizer, ctx):
        from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers, mlp_modules

        adapter = adapter_for(model)
        frozen = {id(p) for layer in find_layers(model, adapter) for m in mlp_modules(layer, adapter)
                  for p in m.parameters()}
        attn = set(attention_names(model))
        for n, p in model.named_parameters():
            if self.cfg.train == "non-mlp":
                p.requires_grad_(id(p) not in frozen)
            elif self.cfg.train == "attention":
                p.requires_grad_(any(f".{a}." in n for a in attn))
            else:  # norms-head
                p.requires_grad_(p.ndim == 1 or "lm_head" in n)
        return model
