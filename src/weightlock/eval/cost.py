"""Attacker-cost measurement: saved-activation bytes (autograd saved-tensor hooks) and an analytic model."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class SavedTensorStats:
    """What autograd kept for the backward pass, counted once per storage."""

    bytes: int = 0
    tensors: int = 0
    storages: dict = field(default_factory=dict)  # (data_ptr, device) -> nbytes

    def add(self, t: torch.Tensor) -> None:
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
        ys.append(saved_bytes_of_step(net, lambda: net(x)))
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
