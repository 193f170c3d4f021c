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

import math
import os
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from ..config import check_types
from ..errors import WeightlockError
from ..io import read_json, write_json
from ..models.save import dedupe_shared
from .probe import CostProbe

Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "sgd", "adafactor"]  # adafactor: factored second moments (low memory)


@dataclass
class TrainConfig:
    """Optimizer, schedule and bookkeeping of one training run (defaults suit the small presets).

    Validated at construction; code that changes a field afterwards calls :meth:`validate` again (the
    :class:`Trainer` does, before it trains).

    ``batch_size`` counts the sequences of one micro-batch of *one process*: a step of a data-parallel run
    (``torchrun`` / ``accelerate launch``, P processes) takes ``batch_size × grad_accum × P`` sequences, and
    P processes with ``batch_size=b`` train exactly like one process with ``batch_size=P·b`` (same blocks,
    same order, same loss and weights up to float rounding)."""

    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch per process (global batch: × grad_accum × processes)
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Schedule = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int = 100
    eval_blocks: int = 64
    checkpoint_every: int = 100  # 0: no periodic checkpoints
    seed: int = 0
    optimizer: Optimizer = "adamw"
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types and ranges); raise :class:`WeightlockError` on the first bad one."""
        check_types(self, "train config")
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise WeightlockError("max_steps, batch_size and grad_accum must be at least 1")
        if not self.lr > 0:
            raise WeightlockError(f"learning rate must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise WeightlockError("warmup_steps and checkpoint_every must be ≥ 0")
        if self.eval_every < 1 or self.eval_blocks < 1:
            raise WeightlockError("eval_every and eval_blocks must be at least 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise WeightlockError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise WeightlockError("weight_decay and grad_clip must be ≥ 0, eps positive")


class Hook:
    """Base class of training-loop extensions; override what you need."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """Before the first step of :meth:`Trainer.fit` (after a checkpoint was resumed)."""

    def transform_gradients(self, trainer: "Trainer") -> None:
        """After the backward passes of a step, before clipping and the optimizer: may edit ``p.grad``."""

    def after_optimizer_step(self, trainer: "Trainer") -> None:
        """After the optimizer and scheduler step (e.g. restore entries that must not move)."""

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """At the end of every step, with its metrics; may set ``trainer.should_stop``."""

    def on_evaluate(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After each evaluation on the held-out blocks, with its metrics; may set ``trainer.should_stop``."""

    def state_dict(self) -> dict[str, Any]:
        """The hook's state to keep in a checkpoint (picklable; none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned when the checkpoint was written."""


class LambdaHook(Hook):
    """A hook from plain callables, e.g. ``LambdaHook(on_step_end=lambda t, m: ...)``."""

    def __init__(self, **fns: Callable) -> None:
        for name, fn in fns.items():
            if not hasattr(Hook, name):
                raise TypeError(f"unknown hook point {name!r}")
            setattr(self, name, fn)


def cost_point(trainer, seconds: float, score: float) -> dict:
    """Where ``trainer`` stands now, with ``score``: steps, tokens, training ``seconds`` and FLOPs (counted
    per micro-batch × micro-batches run by every process; ``None`` when not measured)."""
    per_micro = getattr(trainer, "flops_per_micro_batch", None)
    processes = getattr(getattr(trainer, "acc", None), "num_processes", 1)  # data-parallel: all processes
    micro = trainer.step * (trainer.cfg.grad_accum if hasattr(trainer, "cfg") else 1) * processes
    flops = float(per_micro * micro) if per_micro is not None else (0.0 if micro == 0 else None)
    return {"step": trainer.step, "tokens": trainer.tokens_seen, "seconds": seconds, "flops": flops,
            "score": float(score)}


class PatienceHook(Hook):
    """Score the model every ``every`` steps with ``score_fn(trainer) -> float`` (held-out, higher is better)
    and stop training once ``patience`` scores in a row have not beaten the best by more than ``min_delta``
    (``patience=0``: never stop, only record). ``curve`` collects the points (``step``, ``tokens``,
    ``seconds``, ``flops``, ``score``), the first before any training; ``seconds`` is training time only
    (scoring excluded) and ``flops`` the trainer's counted FLOPs per micro-batch × micro-batches run.
    ``skip_final``: no point at ``max_steps`` (the caller scores the final model itself);
    ``initial_score``: the score before training when the caller already has it (not scored again)."""

    def __init__(self, score_fn: Callable, every: int, patience: int = 3, min_delta: float = 0.0,
                 skip_final: bool = False, initial_score: float | None = None) -> None:
        if every < 1 or patience < 0:
            raise WeightlockError("every must be at least 1 and patience ≥ 0")
        self.score_fn, self.every, self.patience, self.min_delta = score_fn, every, patience, min_delta
        self.skip_final, self.initial_score = skip_final, initial_score
        self.curve: list[dict] = []
        self.best = -math.inf
        self.bad = 0
        self._seconds = 0.0

    def point(self, trainer, score: float) -> dict:
        """The cost point of ``trainer`` now, with ``score``."""
        return cost_point(trainer, self._seconds, score)

    def _score(self, trainer, score: float | None = None) -> None:
        score = float(self.score_fn(trainer) if score is None else score)
        self.curve.append(self.point(trainer, score))
        if score > self.best + self.min_delta:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
            if self.patience and self.bad >= self.patience:
                trainer.should_stop = True

    def on_train_start(self, trainer) -> None:
        if not self.curve:
            self._score(trainer, self.initial_score)
            self.bad = 0

    def on_step_end(self, trainer, metrics: dict) -> None:
        self._seconds += metrics.get("step_time", 0.0)
        final = hasattr(trainer, "cfg") and trainer.step >= trainer.cfg.max_steps
        if trainer.step % self.every == 0 and not (self.skip_final and final):
            self._score(trainer)


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
    """``cfg.optimizer`` over the trainable ``params``: weight decay on matrices, none on vectors."""
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise WeightlockError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16,
                  device: torch.device | str | None = None, progress: str | None = None) -> float:
    """Token-weighted mean next-token NLL of ``model`` on packed ``blocks`` (all targets count); ``progress``:
    show a progress bar (on stderr) with this label."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise WeightlockError(f"expected a non-empty [n, block] tensor of token ids, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), Progress(TextColumn(f"[bold]{progress}"), BarColumn(), MofNCompleteColumn(),
                                   TimeRemainingColumn(), transient=True, disable=progress is None) as bar:
        task = bar.add_task("eval", total=blocks.shape[0])
        for i in range(0, blocks.shape[0], batch_size):
            x = blocks[i:i + batch_size].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
            bar.update(task, completed=min(i + batch_size, blocks.shape[0]))
    model.train(was_training)
    return total / count


class Trainer:
    """Train ``model`` (a causal LM) on packed token blocks with an optimizer (AdamW, SGD or Adafactor), a
    schedule, clipping and hooks. Its :class:`~weightlock.train.probe.CostProbe` times every step and, with
    ``measure_costs``, measures the first micro-batch (``saved_activation_bytes``, ``flops_per_micro_batch``)."""

    def __init__(self, model: torch.nn.Module, train_blocks: torch.Tensor, cfg: TrainConfig,
                 val_blocks: torch.Tensor | None = None, hooks: Sequence[Hook] = (),
                 checkpoint_dir: str | os.PathLike | None = None, accelerator=None,
                 loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 measure_costs: bool = False) -> None:
        cfg.validate()
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                                      cpu=not torch.cuda.is_available())
        self.acc = accelerator
        global_batch = cfg.batch_size * accelerator.num_processes
        if train_blocks.ndim != 2 or train_blocks.shape[0] < global_batch:
            raise WeightlockError(
                f"need at least one batch of training blocks ({cfg.batch_size} per process × "
                f"{accelerator.num_processes} processes), got {tuple(train_blocks.shape)}"
            )
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
        # times every step; with measure_costs also the first micro-batch's saved activations and FLOPs
        self.probe = CostProbe(model, measure=measure_costs)
        self._perm_epoch, self._perm = -1, None
        self.per_epoch = train_blocks.shape[0] // global_batch  # global batches per epoch

    # ---- data order: a pure function of (seed, step), so a resumed run sees the same batches
    def batch(self, step: int, micro: int) -> torch.Tensor:
        """The training blocks of micro-batch ``micro`` of ``step`` for this process, on its device: a seeded
        permutation per epoch, so a resumed run sees the same batches. The global batch (P processes ×
        ``batch_size``) is the one a single process with ``P × batch_size`` takes; process p gets its p-th
        slice, so a data-parallel run sees the same blocks in the same order as one process."""
        b, procs = self.cfg.batch_size, self.acc.num_processes
        epoch, pos = divmod(step * self.cfg.grad_accum + micro, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.train_blocks.shape[0], generator=g), epoch
        start = (pos * procs + self.acc.process_index) * b
        return self.train_blocks[self._perm[start:start + b]].to(self.acc.device)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's (name, parameter) pairs that require gradients."""
        return [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]

    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity on the first ``eval_blocks`` held-out blocks (``{}`` without them);
        the hooks' ``on_evaluate`` see the metrics."""
        if self.val_blocks is None:
            return {}
        loss = evaluate_loss(self.model, self.val_blocks[: self.cfg.eval_blocks], self.cfg.batch_size)
        metrics = {"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        for h in self.hooks:
            h.on_evaluate(self, metrics)
        return metrics

    @property
    def saved_activation_bytes(self) -> int | None:
        """Bytes autograd saved for one micro-batch's backward (first step; ``measure_costs`` only)."""
        return self.probe.saved_activation_bytes

    @property
    def flops_per_micro_batch(self) -> int | None:
        """Forward + backward FLOPs of one micro-batch, torch's counter (first step; ``measure_costs`` only)."""
        return self.probe.flops_per_micro_batch

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        with self.acc.autocast():
            return self.loss_fn(self.model, x) / self.cfg.grad_accum

    def train_step(self) -> dict[str, float]:
        """One optimizer step: ``grad_accum`` micro-batches forward and backward, the hooks'
        ``transform_gradients``, clipping, the optimizer and scheduler, ``after_optimizer_step``. Returns the
        step's metrics (loss and tokens per second of the global batch, i.e. of every process together;
        gradient norm, learning rate, the probe's timings)."""
        self.model.train()
        self.probe.begin_step()
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            x = self.batch(self.step, micro)
            loss = self.probe.micro_batch(lambda: self._loss(x), self.acc.backward)  # noqa: B023  (called at once)
            total += loss.item()
            self.tokens_seen += x.numel() * self.acc.num_processes
        if self.acc.num_processes > 1:  # the loss of the global batch: the mean over the processes
            total = self.acc.reduce(torch.tensor(total, device=self.acc.device), reduction="mean").item()
        self.probe.begin_optimizer()
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
        times = self.probe.end_step()
        return {"step": self.step, "loss": total, "grad_norm": gnorm, "lr": self.scheduler.get_last_lr()[0],
                **times, "tokens_per_s": self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes
                * self.train_blocks.shape[1] / times["step_time"]}

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
        """Write model, optimizer, scheduler, hook and trainer state to ``checkpoint_dir`` (main process only;
        a temporary directory renamed into place, so an interruption leaves the previous checkpoint)."""
        if self.checkpoint_dir is None or not self.acc.is_main_process:
            return
        from safetensors.torch import save_file

        d = self.checkpoint_dir
        tmp, old = d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.raw_model.state_dict().items()}
        save_file(dedupe_shared(state), str(tmp / "model.safetensors"))
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
        """Restore the state :meth:`save_checkpoint` wrote; False when there is none to resume from."""
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
        """Delete the checkpoint (and a leftover previous one): the run's output has been saved."""
        if self.checkpoint_dir is not None and self.acc.is_main_process:
            for d in (self.checkpoint_dir, self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")):
                shutil.rmtree(d, ignore_errors=True)


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
