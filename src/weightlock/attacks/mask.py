"""Attacks on a PMP release: guess the private mask and fine-tune only its entries (``mask-recover``), and
the owner's authorized fine-tuning with the true mask (``masked``) — the yardstick, not an attack."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import choice
from ..errors import WeightlockError
from .base import Attack, AttackConfig
from .registry import register


@dataclass
class MaskRecoverConfig(AttackConfig):
    """How the attacker guesses the PMP mask: the scoring method, the guessed ratio and pool."""

    method: Literal["magnitude", "init-regen", "row-col", "spectral", "early-bird"] = choice(
        "magnitude", "mask-recovery method")
    mask_ratio: float = 0.3  # the attacker's guess of ρ (the paper's values are public)
    pool: Literal["all", "linear", "no-embed-norm"] = choice("linear", "pool")
    per_tensor: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mask_ratio <= 1.0:
            raise WeightlockError(f"mask ratio must be in (0, 1], got {self.mask_ratio}")


@register("mask-recover")
class MaskRecover(Attack):
    """Guess the PMP mask from the released weights, then fine-tune only the guessed entries."""

    Config = MaskRecoverConfig
    reference_attack = "full"

    def prepare(self, model, tokenizer, ctx):
        from ..pmp import recover
        from ..pmp.mask import topk_mask
        from ..pmp.train import MaskHook, PMPConfig, pooled_parameters

        c = self.cfg
        pmp = PMPConfig(mask_ratio=c.mask_ratio, pool=c.pool, per_tensor=c.per_tensor)
        params = pooled_parameters(model, c.pool)
        if c.method == "early-bird":
            from ..data import load_blocks

            blocks = load_blocks("builtin:code", "train", tokenizer, c.block_size, 50_000)
            scores = recover.early_bird_scores(model, tokenizer, pmp, blocks)
        else:
            scores = {"magnitude": lambda: recover.magnitude_scores(params),
                      "init-regen": lambda: recover.init_regen_scores(model, params),
                      "row-col": lambda: recover.row_col_scores(params),
                      "spectral": lambda: recover.spectral_scores(params)}[c.method]()
        guess = topk_mask(scores, c.mask_ratio, c.per_tensor)
        ctx["recovered_mask"] = guess
        ctx["hooks"] = [MaskHook(params, guess)]
        return model


@dataclass
class MaskedConfig(AttackConfig):
    """The owner's private mask file (``mask``)."""

    mask: str = ""  # the owner's private mask file (private/mask.safetensors)
    allow_uncommitted: bool = False  # accept a mask for a model without a mask commitment (shapes checked only)


@register("masked")
class AuthorizedMasked(Attack):
    """Authorized fine-tuning of a PMP model: only the entries of the owner's private mask move. Not an
    attack: the yardstick an attack's gain is compared with."""

    Config = MaskedConfig
    reference_attack = "full"

    def prepare(self, model, tokenizer, ctx):
        from ..pmp.release import mask_for_release
        from ..pmp.train import MaskHook

        if not self.cfg.mask:
            raise WeightlockError("the masked attack needs mask=PATH (the owner's private mask file)")
        # checked against the release's commitment, as `weightlock finetune --mask` does
        mask = mask_for_release(ctx["model_dir"], self.cfg.mask, self.cfg.allow_uncommitted)
        params = dict(model.named_parameters())
        missing = [n for n in mask if n not in params or params[n].shape != mask[n].shape]
        if missing:
            raise WeightlockError(f"{self.cfg.mask}: mask does not fit this model (e.g. {missing[0]})")
        ctx["hooks"] = [MaskHook({n: params[n] for n in mask}, mask)]
        return model
