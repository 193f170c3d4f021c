"""Attacker-cost measurement: saved-activation bytes (autograd saved-tensor hooks), FLOPs (torch's counter),
the training loop's per-step probe (:class:`CostProbe`) — these three re-exported from their home,
``weightlock.train.probe`` — a run's own peak memory (:class:`PeakMemory`) and an analytic model."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import WeightlockError

# re-exported: the training loop's instruments live in train.probe (train does not import eval)
from ..train.probe import (  # noqa: F401
    CostProbe,
    SavedTensorStats,
    count_saved_tensors,
    flop_counter,
    saved_bytes_of_step,
)


def analytic_train_flops(model: torch.nn.Module, batch: int, seq: int) -> int:
    """FLOPs of one full training step (forward + backward) on ``batch`` sequences of ``seq`` tokens:
    6 per weight of every linear map (incl. the LM head and DLR blocks) per token, plus attention's
    score and value matmuls, 4·b·T²·d_attn per layer forward and twice that backward. Embedding lookups,
    norms and activations are not counted (as torch's FLOP counter does not count them)."""
    from transformers.pytorch_utils import Conv1D

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    c = model.config
    layers = getattr(c, "num_hidden_layers", 0)
    heads = getattr(c, "num_attention_heads", 0)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else 0)
    return 6 * linear * batch * seq + 12 * batch * seq * seq * heads * head_dim * layers


# ---- training memory: the one definition of "fits within the original's memory" -------------------

TRAINING_MEMORY = ("training memory = the exact bytes of one training step's state: every parameter, the "
                   "trainable parameters' gradients and optimizer state (counted from their numbers and dtypes: "
                   "AdamW keeps two moments and a step counter per trainable tensor) and the bytes autograd saves "
                   "for one micro-batch's backward pass (saved-tensor hooks); an attack fits within the original's "
                   "memory when its training memory is at most that of the original's full fine-tune")


def _step_counter_bytes() -> int:
    """Bytes of the scalar step counter torch's AdamW and Adafactor keep per parameter tensor (float32, or
    float64 when that is torch's default dtype)."""
    return 8 if torch.get_default_dtype() == torch.float64 else 4


def optimizer_state_bytes(p: torch.Tensor, optimizer: str = "adamw") -> int:
    """Bytes of the state ``optimizer`` (a :class:`~weightlock.train.loop.TrainConfig` optimizer name, as
    :func:`~weightlock.train.loop.make_optimizer` builds it) keeps for the trainable tensor ``p``, as torch
    allocates it: ``adamw`` two moments in ``p``'s dtype and a scalar step; ``sgd`` (momentum) one buffer;
    ``adafactor`` a scalar step and, for a matrix, a row and a column factor, else a full variance."""
    size = p.element_size()
    if optimizer == "adamw":
        return 2 * p.numel() * size + _step_counter_bytes()
    if optimizer == "sgd":
        return p.numel() * size
    if optimizer == "adafactor":
        if p.dim() > 1:
            shape = list(p.shape)
            return _step_counter_bytes() + (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * size
        return _step_counter_bytes() + p.numel() * size
    raise WeightlockError(f"no optimizer-state count for optimizer {optimizer!r} (adamw, sgd, adafactor)")


def training_memory(model: torch.nn.Module, optimizer: str = "adamw",
                    saved_activation_bytes: int | None = None) -> dict:
    """The training memory of one step of fine-tuning ``model`` as it is set up to train (its parameters'
    ``requires_grad`` say what trains), counted, not measured (:data:`TRAINING_MEMORY`): ``param_bytes`` (every
    parameter), ``grad_bytes`` and ``optimizer_state_bytes`` (the trainable ones), ``saved_activation_bytes``
    (given: the saved-tensor hooks' count of one micro-batch) and their sum ``training_memory_bytes`` (None
    without the saved bytes)."""
    params = list(model.parameters())  # shared (tied) parameters once
    trainable = [p for p in params if p.requires_grad]
    parts = {"param_bytes": sum(p.numel() * p.element_size() for p in params),
             "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
             "optimizer_state_bytes": sum(optimizer_state_bytes(p, optimizer) for p in trainable),
             "saved_activation_bytes": saved_activation_bytes}
    total = None if saved_activation_bytes is None else sum(parts.values())
    return {"training_memory_bytes": total, **parts, "optimizer": optimizer,
            "parameters": sum(p.numel() for p in params), "trainable_parameters": sum(p.numel() for p in trainable),
            "trainable_tensors": len(trainable)}


def mlp_saved_elements_per_token(d: int, d_ff: int, gated: bool = True) -> int:
    """Elements autograd saves per token for one MLP (input requires grad).

    gated (SwiGLU ``down(act(gate(x)) * up(x))``): x (shared by gate and up), gate(x) for the activation,
    act(gate(x)) and up(x) for the product, the product for ``down``: d + 4·d_ff.
    plain (``fc2(act(fc1(x)))``): x, fc1(x) for the activation, act(fc1(x)) for fc2: d + 2·d_ff.
    """
    return d + (4 if gated else 2) * d_ff


def dlr_saved_elements_per_token(d: int, rank: int, depth: int, norm: bool = False) -> int:
    """Elements a DLR-Net saves per token: per block its input z_l (for ``down``), ``down``'s output (for the
    activation) and the activation's output (for ``up``): d + 2r; torch's ``nn.RMSNorm`` adds the squared
    input, the normalised input and the per-token scale: 3d + 2r + 1."""
    per_block = d + 2 * rank + ((2 * d + 1) if norm else 0)
    return depth * per_block


def depth_linearity(d: int, rank: int, depths: list[int], tokens: int, device: str = "cpu") -> dict:
    """Saved-activation bytes of one DLR-Net training forward at each depth, a least-squares line through
    them (slope per block, R²) and the analytic bytes per block, (d + 2r)·4·tokens."""
    import numpy as np

    from ..dlr.modeling_weightlock_dlr import DLRNet, DLRSpec

    ys = []
    for depth in depths:
        net = DLRNet(DLRSpec(d, rank, depth)).to(device)
        x = torch.randn(tokens, d, device=device, requires_grad=True)
        ys.append(saved_bytes_of_step(net, lambda: net(x)))  # noqa: B023  (called within this iteration)
    slope, icpt = np.polyfit(depths, ys, 1)
    pred = slope * np.asarray(depths) + icpt
    r2 = 1 - ((np.asarray(ys) - pred) ** 2).sum() / ((np.asarray(ys) - np.mean(ys)) ** 2).sum()
    return {"d": d, "rank": rank, "tokens": tokens, "depths": list(depths), "bytes": ys,
            "slope_bytes_per_block": float(slope), "intercept": float(icpt), "r2": float(r2),
            "analytic_bytes_per_block": (d + 2 * rank) * 4 * tokens}


def time_forward_backward(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 7,
                          warmup: int = 2) -> dict:
    """Median wall times (seconds) of: inference forward (no grad), training forward, backward."""
    import statistics
    import time

    def sync():
        if input_ids.is_cuda:
            torch.cuda.synchronize()

    infer, fwd, bwd = [], [], []
    model.train()
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=input_ids)
        sync()
        t1 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            infer.append(t1 - t0)
            fwd.append(t2 - t1)
            bwd.append(t3 - t2)
    med = statistics.median
    return {"forward_inference_s": med(infer), "forward_train_s": med(fwd), "backward_s": med(bwd),
            "backward_over_forward": med(bwd) / med(fwd), "repeats": repeats}


# ---- peak memory of one run ---------------------------------------------------------------------

def _rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the best available is the process's high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hwm_bytes() -> int | None:
    """This process's RSS high-water mark (``VmHWM``), resettable through ``/proc/self/clear_refs``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so an earlier run's freed memory is not reused unseen."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """The peak memory of the code inside one ``with PeakMemory() as pm:`` block — not the process's
    all-time high. CPU: the RSS high-water mark is reset at entry (after freed heap is handed back to
    the OS) and read at exit, so ``peak_bytes`` is this block's own peak RSS and ``delta_bytes`` what the
    block added over the memory already in use when it began (activations, gradients, optimizer state and
    anything else it allocated). Where the mark cannot be reset (not Linux), RSS is sampled every 2 ms by a
    thread (``method`` says which). CUDA: ``torch.cuda.reset_peak_memory_stats`` at entry,
    ``max_memory_allocated`` at exit (``cuda_peak_bytes``, ``cuda_delta_bytes``)."""

    baseline_bytes: int = 0
    peak_bytes: int = 0
    delta_bytes: int = 0
    method: str = ""
    cuda_peak_bytes: int | None = None
    cuda_delta_bytes: int | None = None
    _sampler: object = field(default=None, repr=False)

    def __enter__(self) -> "PeakMemory":
        _release_free_heap()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self.baseline_bytes = _rss_bytes()
        if _reset_hwm() and _hwm_bytes() is not None:
            self.method = "vmhwm"
        else:
            self.method = "sampled"
            self._sampler = _RSSSampler(self.baseline_bytes)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "vmhwm":
            self.peak_bytes = max(_hwm_bytes() or 0, self.baseline_bytes)
        else:
            self._sampler.stop()
            self.peak_bytes = max(self._sampler.peak, _rss_bytes())
        self.delta_bytes = self.peak_bytes - self.baseline_bytes
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated()
            self.cuda_delta_bytes = self.cuda_peak_bytes - self._cuda_base

    def as_dict(self) -> dict:
        """The measured peaks as a result record (``peak_rss_bytes``, ``cuda_peak_bytes``, ...)."""
        return {"peak_rss_bytes": self.peak_bytes, "peak_rss_delta_bytes": self.delta_bytes,
                "rss_baseline_bytes": self.baseline_bytes, "peak_method": self.method,
                "cuda_peak_bytes": self.cuda_peak_bytes, "cuda_peak_delta_bytes": self.cuda_delta_bytes}


class _RSSSampler:
    def __init__(self, start: int, every_s: float = 0.002) -> None:
        import threading

        self.peak, self.every = start, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss_bytes())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
