"""The training loop's instruments: per-step timing and, for the first micro-batch, the bytes autograd saves
for the backward pass (saved-tensor hooks) and the FLOPs of forward and backward (torch's counter).

They live beside the loop that calls them (``weightlock.train`` does not import ``weightlock.eval``);
``weightlock.eval.cost`` re-exports them with the rest of the attacker-cost measurement."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class SavedTensorStats:
    """What autograd kept for the backward pass, counted once per storage."""

    bytes: int = 0
    tensors: int = 0
    storages: dict = field(default_factory=dict)  # (data_ptr, device) -> nbytes

    def add(self, t: torch.Tensor) -> None:
        """Count one saved tensor; its storage's bytes count once however many tensors share it."""
        self.tensors += 1
        st = t.untyped_storage()
        key = (st.data_ptr(), str(t.device))
        if key not in self.storages:
            self.storages[key] = st.nbytes()
            self.bytes += st.nbytes()


@contextlib.contextmanager
def count_saved_tensors(exclude: tuple[torch.Tensor, ...] = ()):
    """Count the bytes of tensors autograd saves inside the block, deduplicated by storage.

    Tensors whose storage is one of ``exclude`` (e.g. parameters, which exist anyway) are not counted.
    """
    stats = SavedTensorStats()
    skip = {(t.untyped_storage().data_ptr(), str(t.device)) for t in exclude}

    def pack(t: torch.Tensor):
        if (t.untyped_storage().data_ptr(), str(t.device)) not in skip:
            stats.add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield stats


def saved_bytes_of_step(model: torch.nn.Module, fn) -> int:
    """Saved-activation bytes of ``fn()`` (a forward building the graph), parameters excluded."""
    with count_saved_tensors(tuple(model.parameters())) as stats:
        out = fn()
    del out
    return stats.bytes


def flop_counter():
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


class CostProbe:
    """What one training run costs per step, measured where the training loop calls it — the loop itself
    holds no measuring code.

    Every step is timed (forward, backward, optimizer, whole step: :meth:`begin_step`,
    :meth:`micro_batch`, :meth:`begin_optimizer`, :meth:`end_step`). With ``measure=True`` the first
    micro-batch (the first step pays one-off costs and is left out of timing medians anyway) is also
    measured: the bytes autograd saves for its backward pass (parameters of ``model`` excluded, they exist
    anyway) and the FLOPs of its forward AND backward in one :func:`flop_counter` (re-entering a
    ``FlopCounterMode`` would reset it)."""

    def __init__(self, model: torch.nn.Module | None = None, measure: bool = False) -> None:
        self.model, self.measure = model, measure
        self.saved_activation_bytes: int | None = None  # of one micro-batch
        self.flops_per_micro_batch: int | None = None  # forward + backward
        self._t0 = self._t_opt = 0.0
        self._fwd = self._bwd = 0.0

    @property
    def pending(self) -> bool:
        """Whether the next micro-batch is the one measured."""
        return self.measure and self.model is not None and self.saved_activation_bytes is None

    def begin_step(self) -> None:
        """Start timing an optimizer step (before its first micro-batch)."""
        self._t0 = time.perf_counter()
        self._fwd = self._bwd = 0.0

    def micro_batch(self, forward: Callable[[], torch.Tensor],
                    backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Run ``backward(forward())`` timed (and measured, for the first); returns the loss."""
        first = self.pending
        flops = flop_counter() if first else contextlib.nullcontext()
        saved = count_saved_tensors(tuple(self.model.parameters())) if first else contextlib.nullcontext()
        with flops:
            ta = time.perf_counter()
            with saved as stats:
                loss = forward()
            tb = time.perf_counter()
            backward(loss)
        self._fwd += tb - ta
        self._bwd += time.perf_counter() - tb
        if first:
            self.saved_activation_bytes = stats.bytes
            self.flops_per_micro_batch = flops.get_total_flops()
        return loss

    def begin_optimizer(self) -> None:
        """Mark the end of the step's backward passes and the start of its optimizer update."""
        self._t_opt = time.perf_counter()

    def end_step(self) -> dict[str, float]:
        """Seconds of this step: ``step_time``, ``forward_time``, ``backward_time``, ``optimizer_time``."""
        now = time.perf_counter()
        return {"step_time": now - self._t0, "forward_time": self._fwd, "backward_time": self._bwd,
                "optimizer_time": now - self._t_opt}
