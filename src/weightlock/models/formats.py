"""Model formats beside a plain Hugging Face checkpoint, as plug-ins: a locked release whose modeling code
weightlock holds (DLR-Lock's, which ``weightlock.dlr`` registers on import). Generic code — the one loader
(:func:`weightlock.models.hub.load`), the fine-tuning counter-measures — reaches such a model only through
:data:`MODEL_FORMATS`, never by importing the lock that defines it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..registry import Registry


def _no_compile(model: nn.Module) -> None:
    return None


def _no_checkpointing(model: nn.Module, group: int) -> int:
    return 0


@dataclass(frozen=True)
class ModelFormat:
    """What the generic code needs of a model format.

    * ``claims(config)``: whether a checkpoint with this (transformers) config is of this format;
    * ``load(config, directory)``: the model, its weights loaded from ``directory`` (float32, on CPU);
    * ``compile(model)``: turn on the format's compiled path for steps of a few tokens, on whatever modules
      of ``model`` are its own (none: nothing);
    * ``checkpoint(model, group)``: gradient checkpointing inside the format's own modules, per group of
      ``group`` blocks (0: one checkpoint per module); returns how many modules it applied to (0: none).
    """

    claims: Callable[[Any], bool]
    load: Callable[[Any, str], nn.Module]
    compile: Callable[[nn.Module], None] = _no_compile
    checkpoint: Callable[[nn.Module, int], int] = _no_checkpointing


MODEL_FORMATS: Registry[ModelFormat] = Registry("model format", ModelFormat, instances=True)


def format_of(config: Any) -> ModelFormat | None:
    """The registered format that claims ``config``, None for a plain checkpoint."""
    return next((f for f in MODEL_FORMATS.values() if f.claims(config)), None)


def compile_small(model: nn.Module) -> None:
    """Turn on every registered format's compiled path for the modules of ``model`` that are its own."""
    for f in MODEL_FORMATS.values():
        f.compile(model)


def checkpoint_blocks(model: nn.Module, group: int) -> int:
    """Gradient checkpointing per group of ``group`` blocks (0: per module) in every module of ``model`` a
    registered format owns; how many modules it applied to."""
    return sum(f.checkpoint(model, group) for f in MODEL_FORMATS.values())


__all__ = ["MODEL_FORMATS", "ModelFormat", "checkpoint_blocks", "compile_small", "format_of"]
