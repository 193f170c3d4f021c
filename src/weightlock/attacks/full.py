"""Full fine-tuning: the baseline attack."""
from __future__ import annotations

from .base import Attack
from .registry import register


@register("full")
class FullFinetune(Attack):
    """Full fine-tuning: every parameter trains."""
