"""Reverse distillation: turn a DLR lock back into a dense model, then fine-tune that."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import choice
from ..errors import WeightlockError
from .base import Attack, AttackConfig, is_dlr
from .registry import register

DISTILL_BATCH_TOKENS = 1024  # captured (input, output) pairs per distillation step
READBACK_CHECK_TOKENS = 1024  # tokens captured to measure a read-back's error when nothing is distilled


@dataclass
class ReverseDistillConfig(AttackConfig):
    """How the dense MLPs start and are distilled before the full fine-tuning."""

    # random | readback (start from each DLR-Net's blocks laid side by side: the stacked V_l, G_l, s·U_l)
    init: Literal["random", "readback"] = choice("random", "reverse-distill init")
    distill_steps: int = 600  # 0 with init=readback: no distillation at all
    distill_tokens: int = 65_536
    distill_lr: float = 3e-3

    def validate(self) -> None:
        super().validate()
        if self.distill_steps < 0 or self.distill_tokens < self.block_size or not self.distill_lr > 0:
            raise WeightlockError("distill_steps must be ≥ 0, distill_tokens ≥ block_size and distill_lr positive")


@register("reverse-distill")
class ReverseDistill(Attack):
    """Distil each DLR-Net back into a dense MLP of the original shape (forward passes through the locked
    model only), then fully fine-tune the dense model. The distillation's time counts as attack cost.
    ``init=readback`` starts each dense MLP from the DLR-Net's own stacked factors, which for an
    ``--init mlp`` release already is the original MLP (``distill_steps=0``: no distillation at all)."""

    Config = ReverseDistillConfig
    reference_attack = "full"  # the unlocked reference has nothing to reverse: it is fine-tuned directly
    changes_model = True

    def prepare(self, model, tokenizer, ctx):
        if not is_dlr(model):
            raise WeightlockError("reverse-distill needs a DLR-locked model (this one has no DLR-Nets)")
        t0 = time.perf_counter()
        dense, errors = reverse_distill(model, tokenizer, self.cfg)
        ctx["reverse_distill"] = {"seconds": time.perf_counter() - t0, "layer_rel_error": errors,
                                  "flops": reverse_distill_flops(model, dense, self.cfg)}
        return dense


def capture_tokens(cfg: ReverseDistillConfig) -> int:
    """Tokens captured through the locked model: the distillation's data, or with no distillation
    (``distill_steps=0``) only :data:`READBACK_CHECK_TOKENS` to measure the read-back's error."""
    return cfg.distill_tokens if cfg.distill_steps else max(cfg.block_size, min(cfg.distill_tokens,
                                                                                 READBACK_CHECK_TOKENS))


def reverse_distill_flops(locked: nn.Module, dense: nn.Module, cfg: ReverseDistillConfig) -> float:
    """Analytic FLOPs of :func:`reverse_distill`: one forward pass of the locked model over the capture
    tokens (2 FLOPs per weight per token, attention scores not counted) plus, per layer, the dense MLP's
    forward and backward (6 FLOPs per weight per token) over ``distill_steps`` batches of
    :data:`DISTILL_BATCH_TOKENS`."""
    from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers, mlp_modules

    capture = 2.0 * sum(p.numel() for p in locked.parameters() if p.ndim >= 2) * capture_tokens(cfg)
    adapter = adapter_for(locked)
    mlp = sum(p.numel() for layer in find_layers(dense, adapter) for m in mlp_modules(layer, adapter)
              for p in m.parameters() if p.ndim >= 2)
    return capture + 6.0 * mlp * DISTILL_BATCH_TOKENS * cfg.distill_steps


class FeedForward(nn.Module):
    """A feed-forward block spread over several modules of a layer, run in order as one module (the modules
    are the layer's own: fitting this fits the layer)."""

    def __init__(self, steps: list[nn.Module]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.steps:
            x = m(x)
        return x


def dense_feed_forward(layer: nn.Module, adapter) -> nn.Module:
    """The function a DLR-Net replaces in ``layer`` (from the feed-forward input to the output of the adapter's
    ``out_path``), computed by the layer's own modules, so that a student built from it starts as, and can
    only become, a feed-forward of the family's own kind: the ``mlp`` module itself where it is the whole
    block (Llama-style gated MLPs, GPT-2, GPT-NeoX, Falcon, Phi); otherwise the ``mlp`` module followed by the
    modules the lock turns into identities, in order, which the adapter lists as the rest of the block
    (OPT: fc1 → activation_fn → fc2; GPT-J: fc_in → act → fc_out; Bloom: dense_h_to_4h → gelu_impl →
    dense_4h_to_h; BERT: intermediate (dense + activation) → output.dense)."""
    from ..dlr.modeling_weightlock_dlr import get_path

    first = get_path(layer, adapter.mlp)
    if adapter.out_path() == adapter.mlp:
        return first
    rest = [p for p in adapter.identity if p != adapter.mlp]
    if not rest or rest[-1] != adapter.out_path():
        raise WeightlockError(f"reverse-distill cannot rebuild the {adapter.family} feed-forward: its adapter's "
                              f"identity modules {list(adapter.identity)} must list, in order, what follows "
                              f"{adapter.mlp!r} up to {adapter.out_path()!r}")
    return FeedForward([first, *(get_path(layer, p) for p in rest)])


def reverse_distill(model, tokenizer, cfg: ReverseDistillConfig) -> tuple[nn.Module, list[dict]]:
    """A dense model with the locked model's architecture before locking, MLPs fitted to the DLR-Nets."""
    import transformers

    from ..data import load_blocks
    from ..dlr.distill import capture, fit_module, relative_error, write_readback
    from ..dlr.modeling_weightlock_dlr import DLR_CONFIG_KEY, adapter_for, find_layers, get_path

    info = getattr(model.config, DLR_CONFIG_KEY)
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                               if k not in (DLR_CONFIG_KEY, "auto_map")})
    torch.manual_seed(cfg.training.seed)
    dense = getattr(transformers, info["base_class"])(config).eval()  # no dropout while fitting the MLPs
    adapter = adapter_for(model)
    locked_layers, dense_layers = find_layers(model, adapter), find_layers(dense, adapter)
    # every non-MLP weight is public: copy it
    own = dict(dense.named_parameters())
    for n, p in model.named_parameters():
        if n in own and own[n].shape == p.shape:
            own[n].data.copy_(p.data)
    if cfg.init == "readback":
        for locked, layer in zip(locked_layers, dense_layers):
            write_readback(layer, adapter, get_path(locked, adapter.mlp))
    blocks = load_blocks("builtin:code+prose", "train", tokenizer, cfg.block_size, capture_tokens(cfg))
    caps = capture(model, blocks, list(range(len(locked_layers))))
    errors = []
    for k, layer in enumerate(dense_layers):
        x, y = caps[k]
        student = dense_feed_forward(layer, adapter)  # the dense layer's own modules: its weights are fitted
        if cfg.distill_steps == 0:
            errors.append({"rel_error": relative_error(student, x, y), "steps": 0})
            continue
        _, st = fit_module(lambda s=student: s, x, y, steps=cfg.distill_steps, lr=cfg.distill_lr,
                           batch_tokens=DISTILL_BATCH_TOKENS, seed=cfg.training.seed,
                           progress=cfg.training.progress, desc=f"reverse {k}")
        errors.append(st)
    return dense.train(), errors
