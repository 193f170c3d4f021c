"""What every attack is: a config (fine-tuning budget, counter-measures, task data) and a class that
prepares the model to fine-tune."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import WeightlockError
from ..models.layout import attention_names  # noqa: F401  (re-exported: its home is models.layout)
from ..train.finetune import FinetuneConfig


@dataclass
class AttackConfig(FinetuneConfig):
    """Fine-tuning budget and memory-saving counter-measures shared by every attack (``training``: the
    :class:`~weightlock.train.loop.TrainConfig`; flat options ``steps``, ``lr``, ... map into it, see
    :meth:`~weightlock.train.finetune.FinetuneConfig.from_options`), plus the task data's block size and
    token budget and the fine-tuning curve."""

    what: ClassVar[str] = "attack config"
    block_size: int = 128
    train_tokens: int = 200_000
    # held-out tokens of a perplexity task's score (and of the capability perplexity, at most 8192); a real
    # LLM on a CPU pays one forward over them at every score
    eval_tokens: int = 16_384
    score_every: int = 0  # also score the task every N steps (a fine-tuning curve); 0: before/after only
    # stop once this many scores in a row (every score_every steps) have not beaten the best by more than
    # min_delta: an attack run to convergence; 0: run every step
    patience: int = 0
    min_delta: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.train_tokens < 1 or self.block_size < 2:
            raise WeightlockError("train_tokens must be ≥ 1, block_size ≥ 2")
        if self.eval_tokens < self.block_size:
            raise WeightlockError(f"eval_tokens ({self.eval_tokens}) must hold one block of {self.block_size} tokens")
        if self.score_every < 0 or self.patience < 0 or self.min_delta < 0:
            raise WeightlockError("score_every, patience and min_delta must be ≥ 0")
        if self.patience and not self.score_every:
            raise WeightlockError("patience needs a score every N steps (score_every > 0)")


class Attack:
    """A fine-tuning attack: ``Config`` is its :class:`AttackConfig` subclass; :meth:`prepare` turns the
    loaded model into what gets fine-tuned. Registered by name with :func:`~weightlock.attacks.registry.register`;
    built with :func:`~weightlock.attacks.registry.make_attack`; run with
    :func:`~weightlock.attacks.run.run_attack`."""

    name = "attack"
    Config: type[AttackConfig] = AttackConfig
    reference_attack: str | None = None  # what runs on the unlocked reference (default: the same attack)
    changes_model = False  # whether prepare changes the model's function (its curve then scores it again)

    def __init__(self, cfg: AttackConfig | None = None) -> None:
        self.cfg = cfg or self.Config()

    def prepare(self, model: nn.Module, tokenizer, ctx: dict) -> nn.Module:
        """Return the model to fine-tune (may wrap or convert ``model``); record extra costs in ``ctx``
        (``ctx["hooks"]``: training-loop hooks for the fine-tuning)."""
        return model


def is_dlr(model: nn.Module) -> bool:
    """Whether ``model`` is DLR-locked (a release's config section, or DLR-Nets in it)."""
    from ..dlr.modeling_weightlock_dlr import DLR_CONFIG_KEY, DLRNet

    return bool(getattr(model.config, DLR_CONFIG_KEY, None)) or any(isinstance(m, DLRNet) for m in model.modules())
