"""Pretraining a causal LM from scratch on packed token blocks (dense; PMP plugs in through hooks)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..config import check_types
from ..errors import WeightlockError
from ..io import prepare_out_dir, read_json, write_json
from ..models.presets import ModelConfig, preset
from .loop import Hook, TrainConfig, Trainer, evaluate_loss

RUN_FILE = "weightlock_run.json"
METRICS_FILE = "metrics.json"


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on; saved as ``weightlock_run.json`` beside the weights."""

    preset: str = "small"  # a name in weightlock.models.presets.PRESETS
    model: ModelConfig | None = None  # overrides the preset when given
    data: str = "builtin:code"
    block_size: int = 128
    train_tokens: int | None = None  # token budget for training data (None: all of it)
    val_tokens: int = 32768
    vocab_size: int = 4096
    method: Literal["dense", "pmp"] = "dense"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (the nested model and train configs included); called at construction and
        again by :func:`pretrain` and ``pretrain_pmp``, since callers may change fields in between."""
        check_types(self, "pretrain config")
        if self.model is None:
            preset(self.preset)  # raises the clear error for an unknown name
        else:
            self.model.validate()
        self.train.validate()
        if self.block_size < 2 or self.val_tokens < 1 or self.vocab_size < 1:
            raise WeightlockError("block_size must be ≥ 2, val_tokens and vocab_size ≥ 1")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise WeightlockError(f"train_tokens must be ≥ 1 (or None: all of the data), got {self.train_tokens}")

    def model_config(self) -> ModelConfig:
        """The explicit ``model`` if set, else the ``preset``'s configuration."""
        return self.model if self.model is not None else preset(self.preset)

    def to_dict(self) -> dict:
        """Plain data (JSON-ready) with the resolved model configuration; :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["model"] = asdict(self.model_config())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """The config :meth:`to_dict` wrote (nested model and training settings rebuilt and validated)."""
        d = dict(d)
        d["model"] = ModelConfig(**d["model"]) if d.get("model") else None
        t = dict(d.get("train") or {})
        if "betas" in t:
            t["betas"] = tuple(t["betas"])
        d["train"] = TrainConfig(**t)
        return cls(**d)


PRESET_TRAINING = {
    "tiny": dict(max_steps=120, batch_size=16, lr=4e-3, warmup_steps=10, eval_every=40, checkpoint_every=40),
    "small": dict(max_steps=400, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=100, checkpoint_every=100),
}
PRESET_DATA = {"tiny": dict(block_size=64, train_tokens=200_000, val_tokens=8192),
               "small": dict(block_size=128, train_tokens=None, val_tokens=32768)}


def run_config(model_dir: str | os.PathLike) -> dict:
    """The pretraining config saved with a model trained by weightlock (``{}`` for any other model)."""
    p = Path(model_dir) / RUN_FILE
    return read_json(p).get("config", {}) if p.exists() else {}


def default_config(preset_name: str = "small", **overrides) -> PretrainConfig:
    """The recommended training settings for a preset, with keyword overrides of any field."""
    if preset_name not in PRESET_TRAINING:
        preset(preset_name)  # raises the clear error
    train = TrainConfig(**PRESET_TRAINING[preset_name])
    cfg = PretrainConfig(preset=preset_name, train=train, **PRESET_DATA[preset_name])
    for k, v in overrides.items():
        if hasattr(cfg.train, k):
            setattr(cfg.train, k, v)
        elif hasattr(cfg, k):
            setattr(cfg, k, v)
        else:
            raise WeightlockError(f"unknown pretraining option {k!r}")
    cfg.validate()
    return cfg


def build_model(cfg: PretrainConfig, tokenizer):
    """A freshly initialised ``LlamaForCausalLM`` of ``cfg``'s model (seeded by ``cfg.train.seed``) sized for
    ``tokenizer``; a block size beyond the model's positions is a :class:`WeightlockError`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.train.seed)
    mc = cfg.model_config()
    if mc.max_position_embeddings < cfg.block_size:
        raise WeightlockError(f"block size {cfg.block_size} exceeds max_position_embeddings "
                              f"{mc.max_position_embeddings}")
    return LlamaForCausalLM(mc.to_hf(tokenizer))


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, overwrite: bool = False, resume: bool = False,
             hooks: Sequence[Hook] = (), model=None) -> dict:
    """Pretrain into ``out`` (a Hugging Face checkpoint directory) and return the run's metrics.

    ``resume=True`` continues an interrupted run in ``out`` from its checkpoint, with the config saved there.
    """
    from ..data import load_blocks, load_tokenizer
    from ..models.hub import save_model_dir

    cfg.validate()
    out = Path(out)
    if resume and (out / RUN_FILE).exists():
        saved = PretrainConfig.from_dict(read_json(out / RUN_FILE)["config"])
        saved.train.progress = cfg.train.progress
        cfg = saved
        if (out / METRICS_FILE).exists() and not (out / "checkpoint").exists():
            return read_json(out / METRICS_FILE)  # already finished
    out = prepare_out_dir(out, overwrite=overwrite, resume=resume,
                          hint="pass --overwrite to replace it or --resume to continue a run")
    write_json(out / RUN_FILE, {"kind": "pretrain", "config": cfg.to_dict()})

    tok = load_tokenizer(None, cfg.vocab_size)
    train_blocks = load_blocks(cfg.data, "train", tok, cfg.block_size, cfg.train_tokens)
    val_blocks = load_blocks(cfg.data, "validation", tok, cfg.block_size, cfg.val_tokens)
    if model is None:
        model = build_model(cfg, tok)
    t0 = time.perf_counter()
    trainer = Trainer(model, train_blocks, cfg.train, val_blocks=val_blocks, hooks=hooks,
                      checkpoint_dir=out / "checkpoint")
    trainer.fit(resume=resume)
    wall = time.perf_counter() - t0
    model = trainer.acc.unwrap_model(trainer.model)
    final_val = evaluate_loss(model, val_blocks, cfg.train.batch_size)
    metrics = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_blocks": int(train_blocks.shape[0]),
        "tokens_seen": trainer.tokens_seen,
        "wall_time_s": wall,
        "tokens_per_s": trainer.tokens_seen / wall if wall > 0 else float("nan"),
        "val_loss": final_val,
        "val_ppl": math.exp(final_val),
        "history": trainer.history,
    }
    if trainer.acc.is_main_process:
        model.generation_config.pad_token_id = tok.pad_token_id
        save_model_dir(model, tok, out)
        write_json(out / METRICS_FILE, metrics)
        trainer.remove_checkpoint()
    return metrics
