"""The one training loop, used by pretraining (dense and PMP), authorized fine-tuning and the attacks.

Methods extend it through :class:`Hook` objects instead of copies of the loop:

* ``transform_gradients`` runs after the backward pass, before clipping and the optimizer step
  (a PMP mask zeroes gradients here);
* ``after_optimizer_step`` runs after the step (a mask can restore entries that must not move);
* ``on_step_end`` / ``on_evaluate`` see the metrics and may set ``trainer.should_stop``;
* ``state_dict`` / ``load_state_dict`` carry a hook's state through checkpoints.

Checkpoints (model, optimizer, scheduler, step, hook states) are written atomically every
``checkpoint_every`` steps and on Ctrl-C; :meth:`Trainer.fit` continues exactly from one.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..config import check_types
from ..errors import WeightlockError
from ..io import read_json, write_json


@dataclass
class TrainConfig:
    """Optimizer, schedule and bookkeeping of one training run (defaults suit the small presets)."""

    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_blocks: int = 64
    checkpoint_every: int = 100
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self, "train config")
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise WeightlockError("max_steps, batch_size and grad_accum must be at least 1")
        if not self.lr > 0:
            raise WeightlockError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise WeightlockError(f"unknown schedule {self.schedule!r} (cosine, linear, constant)")
        if self.optimizer not in ("adamw", "sgd"):
            raise WeightlockError(f"unknown optimizer {self.optimizer!r} (adamw, sgd)")


class Hook:
    """Base class of training-loop extensions; override what you need."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def transform_gradients(self, trainer: "Trainer") -> None: ...
    def after_optimizer_step(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_evaluate(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LambdaHook(Hook):
    """A hook from plain callables, e.g. ``LambdaHook(on_step_end=lambda t, m: ...)``."""

    def __init__(self, **fns: Callable) -> None:
        for name, fn in fns.items():
            if not hasattr(Hook, name):
                raise TypeError(f"unknown hook point {name!r}")
            setattr(self, name, fn)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine/linear decay to ``min_lr_ratio`` (or constant) — multiplier of ``cfg.lr``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def make_optimizer(params: Iterable[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise WeightlockError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16,
                  device: torch.device | str | None = None) -> float:
    """Token-weighted mean next-token NLL of ``model`` on packed ``blocks`` (all targets count)."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise WeightlockError(f"expected a non-empty [n, block] tensor of token ids, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


class Trainer:
    """Train ``model`` (a causal LM) on packed token blocks with AdamW, a schedule, clipping and hooks."""

    def __init__(self, model: torch.nn.Module, train_blocks: torch.Tensor, cfg: TrainConfig,
                 val_blocks: torch.Tensor | None = None, hooks: Sequence[Hook] = (),
                 checkpoint_dir: str | os.PathLike | None = None, accelerator=None,
                 loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 measure_saved_activations: bool = False) -> None:
        cfg.validate()
        if train_blocks.ndim != 2 or train_blocks.shape[0] < cfg.batch_size:
            raise WeightlockError(
                f"need at least one batch of training blocks ({cfg.batch_size}), got {tuple(train_blocks.shape)}"
            )
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                                      cpu=not torch.cuda.is_available())
        self.acc = accelerator
        self.cfg = cfg
        self.raw_model = model
        self.train_blocks = train_blocks
        self.val_blocks = val_blocks
        self.hooks = list(hooks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.loss_fn = loss_fn or (lambda m, x: m(input_ids=x, labels=x).loss)
        self.optimizer = make_optimizer(model.named_parameters(), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, float]] = []
        self.should_stop = False
        self.measure_saved = measure_saved_activations
        self.saved_activation_bytes: int | None = None  # of one micro-batch, measured at the first step
        self.flops_per_micro_batch: int | None = None  # forward + backward, torch's FLOP counter, first step
        self._perm_epoch, self._perm = -1, None
        self.per_epoch = train_blocks.shape[0] // cfg.batch_size

    # ---- data order: a pure function of (seed, step), so a resumed run sees the same batches
    def batch(self, step: int, micro: int) -> torch.Tensor:
        k = (step * self.cfg.grad_accum + micro) * self.acc.num_processes + self.acc.process_index
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.train_blocks.shape[0], generator=g), epoch
        idx = self._perm[pos * self.cfg.batch_size:(pos + 1) * self.cfg.batch_size]
        return self.train_blocks[idx].to(self.acc.device)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]

    def evaluate(self) -> dict[str, float]:
        if self.val_blocks is None:
            return {}
        loss = evaluate_loss(self.model, self.val_blocks[: self.cfg.eval_blocks], self.cfg.batch_size)
        metrics = {"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        for h in self.hooks:
            h.on_evaluate(self, metrics)
        return metrics

    def train_step(self) -> dict[str, float]:
        self.model.train()
        t0 = time.perf_counter()
        total = t_fwd = t_bwd = 0.0
        for micro in range(self.cfg.grad_accum):
            x = self.batch(self.step, micro)
            ta = time.perf_counter()
            first = self.measure_saved and self.saved_activation_bytes is None
            # the first micro-batch (excluded from timing medians) is also measured: FLOPs of its forward
            # AND backward in one counter (re-entering a FlopCounterMode resets it), saved activations
            flops = _first_step_flops() if first else contextlib.nullcontext()
            with flops:
                if first:
                    from ..eval.cost import count_saved_tensors

                    with count_saved_tensors(tuple(self.raw_model.parameters())) as saved, self.acc.autocast():
                        loss = self.loss_fn(self.model, x) / self.cfg.grad_accum
                    self.saved_activation_bytes = saved.bytes
                else:
                    with self.acc.autocast():
                        loss = self.loss_fn(self.model, x) / self.cfg.grad_accum
                tb = time.perf_counter()
                self.acc.backward(loss)
            if first:
                self.flops_per_micro_batch = flops.get_total_flops()
            t_fwd += tb - ta
            t_bwd += time.perf_counter() - tb
            total += loss.item()
            self.tokens_seen += x.numel() * self.acc.num_processes
        tc = time.perf_counter()
        for h in self.hooks:
            h.transform_gradients(self)
        gnorm = 0.0
        if self.cfg.grad_clip > 0:
            gnorm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        for h in self.hooks:
            h.after_optimizer_step(self)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": total, "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0],
                "step_time": dt, "forward_time": t_fwd, "backward_time": t_bwd,
                "optimizer_time": time.perf_counter() - tc,
                "tokens_per_s": self.cfg.batch_size * self.cfg.grad_accum * self.train_blocks.shape[1] / dt}

    def fit(self, resume: bool = True) -> list[dict[str, float]]:
        """Train to ``cfg.max_steps`` (resuming from the checkpoint dir if one is there)."""
        if resume:
            self.load_checkpoint()
        for h in self.hooks:
            h.on_train_start(self)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"),
                            disable=not (self.cfg.progress and self.acc.is_main_process))
        interrupted = []
        previous = _install_sigint(interrupted)
        try:
            with progress:
                task = progress.add_task("train", total=self.cfg.max_steps, completed=self.step, info="")
                while self.step < self.cfg.max_steps and not self.should_stop:
                    m = self.train_step()
                    if self.val_blocks is not None and (self.step % self.cfg.eval_every == 0
                                                        or self.step == self.cfg.max_steps):
                        m.update(self.evaluate())
                    self.history.append(m)
                    for h in self.hooks:
                        h.on_step_end(self, m)
                    info = f"loss {m['loss']:.3f}  {m['tokens_per_s']:.0f} tok/s"
                    if "val_ppl" in m:
                        info += f"  val ppl {m['val_ppl']:.2f}"
                    progress.update(task, completed=self.step, info=info)
                    if interrupted:  # Ctrl-C: finish the step, checkpoint, then stop
                        self.save_checkpoint()
                        raise KeyboardInterrupt
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 \
                            and self.step < self.cfg.max_steps:
                        self.save_checkpoint()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.history

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is None or not self.acc.is_main_process:
            return
        from safetensors.torch import save_file

        d = self.checkpoint_dir
        tmp, old = d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.raw_model.state_dict().items()}
        save_file(_dedupe_shared(state), str(tmp / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "hooks": [h.state_dict() for h in self.hooks]}, tmp / "optimizer.pt")
        write_json(tmp / "trainer_state.json", {"step": self.step, "tokens_seen": self.tokens_seen,
                                                "history": self.history, "config": asdict(self.cfg)})
        if d.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(d, old)
        os.replace(tmp, d)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        d = self.checkpoint_dir
        if not d.exists() and d.with_name(d.name + ".old").exists():
            d = d.with_name(d.name + ".old")  # interrupted between the two renames
        if not (d / "trainer_state.json").exists():
            return False
        from safetensors.torch import load_file

        state = load_file(str(d / "model.safetensors"))
        missing, unexpected = self.raw_model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k not in _tied_names(self.raw_model)]:
            raise WeightlockError(f"{d}: checkpoint does not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        opt = torch.load(d / "optimizer.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        for h, s in zip(self.hooks, opt["hooks"]):
            h.load_state_dict(s)
        ts = read_json(d / "trainer_state.json")
        self.step, self.tokens_seen, self.history = ts["step"], ts["tokens_seen"], ts["history"]
        return True

    def remove_checkpoint(self) -> None:
        if self.checkpoint_dir is not None and self.acc.is_main_process:
            for d in (self.checkpoint_dir, self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")):
                shutil.rmtree(d, ignore_errors=True)


def _first_step_flops():
    """torch's FLOP counter, taught the CPU flash-attention kernels it does not know (without them every
    attention matmul on CPU would count as zero)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v))
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _install_sigint(flag: list) -> object:
    """First Ctrl-C sets ``flag`` (the loop checkpoints at the end of the step); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag.append(signum)
        signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    return previous


def _tied_names(model: torch.nn.Module) -> set[str]:
    tied = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    return tied


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first of each."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out
