"""One engine for every locked layer: the DLR-Nets of many layers fitted together, their weights stacked.

Module-wise distillation fits one net per MLP, each on its own (input, output) pairs. All the MLPs of a
model have one shape, so their nets can be held as stacked tensors — Vᵀ, Gᵀ: ``[depth, layers, d, r]``, Uᵀ:
``[depth, layers, r, d]``, contiguous per block — and a step runs every layer at once with batched matmuls
(``torch.bmm``), one
Python loop over the blocks instead of one per layer and block, optionally under bf16 autocast (the
residual state stays fp32). Each layer's loss is its own and Adam is elementwise, so a stacked fit is the
per-layer fits run in lockstep: same initialisation, same batches (the captured rows are aligned on the same
tokens), same steps — :func:`fit_stacked` matches :func:`weightlock.dlr.distill.fit_module` layer by
layer (a test checks it), minus its divergence guard (the engine clips each layer's gradient norm instead).

Supported: the plain and gated block forms without per-block norms, biases or sink (the structured start
and the random start of the faithful-lock recipes); anything else keeps the per-layer path.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightlockError
from .modeling_weightlock_dlr import BLOCK_ACTIVATIONS, DLRNet, DLRSpec


def supported(spec: DLRSpec) -> bool:
    """Whether the stacked engine runs nets of ``spec`` (no per-block norm, bias or sink)."""
    return not (spec.norm or spec.bias or spec.sink)


class StackedNets(nn.Module):
    """``n`` DLR-Nets of one spec as stacked parameters; ``forward(x)`` maps ``x [n, tokens, d]`` (layer k's
    inputs in row k) to every net's output ``[n, tokens, d]``, exactly as each net would."""

    def __init__(self, nets: list[DLRNet]) -> None:
        super().__init__()
        spec = nets[0].spec
        if any(n.spec != spec for n in nets) or not supported(spec):
            raise WeightlockError("the stacked engine needs nets of one spec without per-block norms, biases or "
                                  "sink; fit these layers one by one")
        self.spec = spec
        # block l's transposed weights of every layer, contiguous: [L, n, in, out]
        stack = lambda name: torch.stack([torch.stack([getattr(n.blocks[l], name).weight.detach().t()  # noqa: E731
                                                       for n in nets]) for l in range(spec.depth)]).contiguous()
        self.down = nn.Parameter(stack("down"))  # Vᵀ [L, n, d, r]
        self.up = nn.Parameter(stack("up"))  # Uᵀ [L, n, r, d]
        self.gate = nn.Parameter(stack("gate")) if spec.form == "gated" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = BLOCK_ACTIVATIONS[self.spec.activation]()
        z = x.float()
        for l in range(self.spec.depth):
            zl = z.to(self.down.dtype)
            h = torch.bmm(zl, self.down[l])
            h = act(torch.bmm(zl, self.gate[l])) * h if self.gate is not None else act(h)
            z = z + torch.bmm(h, self.up[l])
        return self.spec.readout * (z - x.float())

    @torch.no_grad()
    def unstack(self) -> list[DLRNet]:
        """The ``n`` nets, as :class:`DLRNet` modules holding copies of the stacked weights."""
        nets = []
        for k in range(self.down.shape[1]):
            net = DLRNet(self.spec)
            for l, b in enumerate(net.blocks):
                b.down.weight.copy_(self.down[l, k].t())
                b.up.weight.copy_(self.up[l, k].t())
                if self.gate is not None:
                    b.gate.weight.copy_(self.gate[l, k].t())
            nets.append(net)
        return nets

    @staticmethod
    def per_layer(t: torch.Tensor) -> torch.Tensor:
        """Sum of squares of a stacked tensor's entries per layer (``[n]``; layers are dimension 1)."""
        return t.float().pow(2).transpose(0, 1).flatten(1).sum(1)


def fit_stacked(make: Callable[[int], DLRNet], layers: list[int], xs: list[torch.Tensor], ys: list[torch.Tensor],
                steps: int, lr: float, batch_tokens: int, split: tuple[torch.Tensor, torch.Tensor], seed: int = 0,
                loss: str = "energy", grad_clip: float = 0.0, bf16: bool = False, progress: bool = False,
                checkpoint: Path | None = None, checkpoint_every: int = 50) -> tuple[list[DLRNet], dict]:
    """Fit the nets of ``layers`` together: ``make(k)`` builds layer k's starting net (called after
    ``torch.manual_seed(seed)``, as :func:`~weightlock.dlr.distill.fit_module` does), ``xs[i]``/``ys[i]`` are
    layer ``layers[i]``'s captured pairs (aligned rows), ``split`` = (held-out rows, training rows). Adam with
    the same warm-up + cosine schedule and batches as ``fit_module``; each layer's gradient norm clipped to
    ``grad_clip`` on its own; ``bf16``: matmuls under bf16 autocast. ``checkpoint``: a file the fit saves to
    every ``checkpoint_every`` steps (weights, Adam state, step) and resumes from when it exists. Returns the
    nets and the stats (per layer: held-out errors; the run's seconds and steps per second)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..io import atomic_path
    from .distill import distill_loss, error_stats

    nets = []
    for k in layers:
        torch.manual_seed(seed)
        nets.append(make(k))
    stacked = StackedNets(nets)
    del nets
    hold, train = split
    opt = torch.optim.Adam(stacked.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))))
    g = torch.Generator().manual_seed(seed + 1)
    bs = min(batch_tokens, train.numel())
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=True)  # our own file: tensors and plain data only
        stacked.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        start = state["step"]
    x_all, y_all = torch.stack(xs), torch.stack(ys)  # [n, T, d], bf16 captures stay bf16 until a batch is drawn
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]stacked fit"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task("fit", total=steps, completed=start, info="")
        for step in range(start, steps):
            idx = train[torch.randint(0, train.numel(), (bs,), generator=g)]
            xb, yb = x_all[:, idx].float(), y_all[:, idx].float()
            with torch.autocast(xb.device.type, torch.bfloat16, enabled=bf16):
                out = stacked(xb)
            value = sum(distill_loss(out[i].float(), yb[i], loss) for i in range(len(layers)))
            opt.zero_grad(set_to_none=True)
            value.backward()
            if grad_clip > 0:
                params = [p for p in stacked.parameters()]
                norms = sum(stacked.per_layer(p.grad) for p in params).sqrt()
                scale = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
                for p in params:
                    p.grad.mul_(scale.view(1, -1, 1, 1))
            opt.step()
            sched.step()
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                with atomic_path(Path(checkpoint)) as tmp:
                    torch.save({"model": stacked.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                "generator": g.get_state(), "step": step + 1}, tmp)
            if step % 50 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, info=f"loss {value.item() / len(layers):.4f}")
    dt = time.perf_counter() - t0
    nets = stacked.unstack()
    per = [{"layer": k, **error_stats(net, xs[i][hold].float(), ys[i][hold].float())} for i, (k, net) in
           enumerate(zip(layers, nets))]
    done = steps - start
    return nets, {"layers": per, "steps": steps, "steps_run": done, "seconds": dt,
                  "layer_steps_per_s": done * len(layers) / dt if dt > 0 else 0.0, "bf16": bf16}
