"""Fine-tuning with the one training loop, and the attacker's memory-saving counter-measures.

A :class:`FinetuneConfig` holds the run's :class:`~weightlock.train.loop.TrainConfig` (``training``) plus
the counter-measures (gradient checkpointing, activation offload). Users and the command line pass flat
options (``steps=3, lr=1e-2, checkpointing="dlr"``): :meth:`FinetuneConfig.from_options` maps the
:data:`TRAIN_ALIASES` into the nested config and :meth:`FinetuneConfig.options` gives them back flat.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import check_types, check_value, default
from ..errors import WeightlockError
from .loop import TrainConfig, Trainer

# flat option name → TrainConfig field (the rest of a TrainConfig keeps the fine-tuning defaults)
TRAIN_ALIASES = {"steps": "max_steps", "lr": "lr", "batch_size": "batch_size", "grad_accum": "grad_accum",
                 "warmup_steps": "warmup_steps", "schedule": "schedule", "optimizer": "optimizer", "seed": "seed",
                 "progress": "progress"}

# a fine-tuning run's training defaults: no weight decay, no evaluation, no checkpoints, quiet
FINETUNE_TRAINING = dict(max_steps=100, batch_size=8, lr=1e-3, warmup_steps=10, weight_decay=0.0,
                         eval_every=10**9, checkpoint_every=0, progress=False)


def finetune_training(**overrides) -> TrainConfig:
    """The fine-tuning :class:`TrainConfig` (:data:`FINETUNE_TRAINING`), with ``overrides`` of any field."""
    return TrainConfig(**{**FINETUNE_TRAINING, **overrides})


def checkpoint_group(mode: str) -> int | None:
    """Validate a checkpointing mode — ``none``, ``layer``, ``dlr`` or ``group:K`` — and return K for
    ``group:K`` (None otherwise)."""
    if mode in ("none", "layer", "dlr"):
        return None
    if mode.startswith("group:") and mode[6:].isdigit() and int(mode[6:]) > 0:
        return int(mode[6:])
    raise WeightlockError(f"unknown checkpointing {mode!r} (none, layer, dlr, group:K)")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: its training settings and memory-saving counter-measures."""

    what: ClassVar[str] = "fine-tuning config"  # how errors name it
    training: TrainConfig = field(default_factory=finetune_training)
    checkpointing: str = "none"  # none | layer | dlr | group:K (K DLR blocks per checkpoint)
    offload: bool = False  # torch.autograd.graph.save_on_cpu

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field, the nested training settings and the checkpointing mode; raise
        :class:`WeightlockError`. Subclasses (the attack configs) add their own checks after ``super()``'s."""
        check_types(self, self.what)
        self.training.validate()
        checkpoint_group(self.checkpointing)

    # ---- flat options ---------------------------------------------------------------------------
    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every flat option name with its default: the training aliases, then the config's own fields."""
        training = default(cls, "training")
        own = {f.name: default(cls, f.name) for f in dataclasses.fields(cls) if f.name != "training"}
        return {alias: getattr(training, name) for alias, name in TRAIN_ALIASES.items()} | own

    @classmethod
    def from_options(cls, **options) -> "FinetuneConfig":
        """A config from flat options: :data:`TRAIN_ALIASES` (``steps`` → ``training.max_steps``, ``lr``, ...)
        go into the nested training config (the class's default one, or ``training=`` when given), the rest
        are the config's own fields."""
        known = set(cls.option_defaults()) | {"training"}
        bad = set(options) - known
        if bad:
            raise WeightlockError(f"{cls.what}: no option(s) {', '.join(sorted(bad))}; "
                                  f"options: {', '.join(sorted(known))}")
        own = {k: v for k, v in options.items() if k not in TRAIN_ALIASES}
        training = own.pop("training", None)
        training = default(cls, "training") if training is None else check_value(
            cls.what, "training", TrainConfig, training)
        hints = typing.get_type_hints(TrainConfig)
        changes = {TRAIN_ALIASES[k]: check_value(cls.what, k, hints[TRAIN_ALIASES[k]], v)
                   for k, v in options.items() if k in TRAIN_ALIASES}
        return cls(training=replace(training, **changes), **own)

    def options(self) -> dict[str, Any]:
        """This config as flat options (what :meth:`from_options` takes; saved with every attack result)."""
        flat = {alias: getattr(self.training, name) for alias, name in TRAIN_ALIASES.items()}
        return flat | {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training"}


# read access under the flat names: cfg.steps is cfg.training.max_steps, cfg.lr is cfg.training.lr, ...
for _alias, _name in TRAIN_ALIASES.items():
    setattr(FinetuneConfig, _alias, property(lambda self, n=_name: getattr(self.training, n),
                                             doc=f"``training.{_name}``"))
del _alias, _name


# ---- counter-measures ---------------------------------------------------------------------------

def apply_checkpointing(model: nn.Module, mode: str) -> None:
    """Gradient checkpointing per transformer layer (``layer``), per DLR-Net (``dlr``) or per group of K
    DLR blocks (``group:K``)."""
    from ..models.formats import checkpoint_blocks

    group = checkpoint_group(mode)
    if mode == "none":
        return
    if mode == "layer":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    if not checkpoint_blocks(model, group):  # the DLR-Nets of a locked release (weightlock.dlr registers them)
        raise WeightlockError(f"checkpointing {mode!r} needs DLR-Nets; use 'layer' on an unlocked model")


def offloaded_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss with the activations autograd saves kept in (pinned) host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return model(input_ids=x, labels=x).loss


# ---- data-parallel runs (torchrun / accelerate launch) ------------------------------------------

def distributed():
    """``torch.distributed``, initialised, in a job of several processes (``torchrun``, ``accelerate launch``:
    ``WORLD_SIZE`` > 1; Gloo on CPU, the cores shared between the processes); None in a single process."""
    from ..io import dist_or_none

    return dist_or_none()


def process_count() -> int:
    """How many processes train together (1 outside a data-parallel job)."""
    dist = distributed()
    return dist.get_world_size() if dist else 1


def is_main_process() -> bool:
    """Whether this process writes the outputs (rank 0, or the only process)."""
    dist = distributed()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process of a data-parallel job (nothing in a single process)."""
    dist = distributed()
    if dist:
        dist.barrier()


def finetune(model: nn.Module, blocks: torch.Tensor, cfg: FinetuneConfig, hooks=(), measure: bool = True):
    """Fine-tune ``model`` in place on the token ``blocks`` with the one training loop, after applying the
    config's counter-measures; ``hooks`` are training-loop hooks (e.g. a PMP mask). The warm-up is capped
    at the step budget. With ``measure`` the trainer also measures the first micro-batch's saved
    activations and FLOPs. Returns ``(history, trainer)``.

    In a data-parallel job every process calls this with the same model and ``blocks``; each trains on
    its slice of every global batch (``batch_size`` per process, see :class:`TrainConfig`) and the history's
    losses are those of the global batch. Writing the result is up to the caller: main process only
    (:func:`is_main_process`)."""
    apply_checkpointing(model, cfg.checkpointing)
    tc = cfg.training
    tc = replace(tc, warmup_steps=min(tc.warmup_steps, tc.max_steps))
    trainer = Trainer(model, blocks, tc, hooks=hooks, loss_fn=offloaded_loss if cfg.offload else None,
                      measure_costs=measure)
    history = trainer.fit(resume=False)
    return history, trainer
