"""One engine for every locked layer: the DLR-Nets of many layers fitted together, their weights stacked.

Module-wise distillation fits one net per MLP, each on its own (input, output) pairs. All the MLPs of a
model have one shape, so their nets can be held as stacked tensors — Vᵀ, Gᵀ: ``[depth, layers, d, r]``, Uᵀ:
``[depth, layers, r, d]``, contiguous per block — with one optimizer over all of them; a step runs every
layer's hand-written forward and backward (:meth:`StackedNets.loss_backward`, optionally with bf16
products, the residual state in fp32), and the layers can be dealt to worker processes. Each layer's loss
is its own and Adam is elementwise, so a stacked fit is the
per-layer fits run in lockstep: same initialisation, same batches (the captured rows are aligned on the same
tokens), same steps — :func:`fit_stacked` matches :func:`weightlock.dlr.distill.fit_module` layer by
layer (a test checks it), minus its divergence guard (the engine clips each layer's gradient norm instead).

Supported: the plain and gated block forms without per-block norms, biases or sink (the structured start
and the random start of the faithful-lock recipes); anything else keeps the per-layer path.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import WeightlockError
from .modeling_weightlock_dlr import BLOCK_ACTIVATIONS, DLRNet, DLRSpec

if TYPE_CHECKING:
    from .config import LockConfig
    from .modeling_weightlock_dlr import ArchAdapter

# the activations as functions (BLOCK_ACTIVATIONS holds module classes)
_ACT_FN = {name: make() for name, make in BLOCK_ACTIVATIONS.items()}


def _add_round(z: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
    """``z += inc`` and ``z`` in bf16, one pass through the C kernel where it builds (torch ops otherwise)."""
    from .cpu_kernel import add_round

    return add_round(z, inc) if z.device.type == "cpu" else _add_copy(z, inc, torch.bfloat16)


def _add_copy(z: torch.Tensor, inc: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    z.add_(inc)
    return z.to(dtype, copy=True)  # a copy: the caller keeps it while z moves on


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

    def _act(self, p: torch.Tensor) -> torch.Tensor:
        """The block's hidden activation from the fp32 pre-activations ``p`` (gated: ``[up | gate]``)."""
        act, r = _ACT_FN[self.spec.activation], self.spec.rank
        return act(p[:, r:]) * p[:, :r] if self.gate is not None else act(p)

    def _act_grad(self, p: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        """d(loss)/d``p`` given d(loss)/d(activation) ``da`` (fp32): SiLU's gated form in closed form, any
        other activation through autograd on the small ``[tokens, r]`` tensor."""
        r = self.spec.rank
        if self.gate is not None and self.spec.activation == "silu":
            up, gate = p[:, :r], p[:, r:]
            sg = torch.sigmoid(gate)
            return torch.cat([da * gate * sg, da * up * sg * (1 + gate * (1 - sg))], 1)
        with torch.enable_grad():
            pl = p.detach().requires_grad_()
            return torch.autograd.grad(self._act(pl), pl, da)[0]

    def loss_backward(self, x: torch.Tensor, y: torch.Tensor, loss: str, bf16: bool = False) -> torch.Tensor:
        """Every layer's distillation loss on ``x``/``y`` (``[n, tokens, d]``, fp32) and its gradients, written
        into the parameters' ``.grad`` — a hand-written forward and backward, layer by layer (one layer's
        activations alive at a time), with no autograd graph over the blocks: per block the gate and up maps
        are one product, the increment is added to the fp32 state and the state rounded to bf16 in one pass
        (:func:`weightlock.dlr.cpu_kernel.add_round`), the weight gradients are written straight into stacked
        buffers. ``bf16``: the products in bf16, the stream, the activations and
        the sums in fp32 (as under autocast). Returns the losses ``[n]``. The same function as
        :meth:`forward` with :func:`~weightlock.dlr.distill.distill_loss` under autograd (a test checks it)."""
        from .distill import distill_loss

        spec, dt = self.spec, torch.bfloat16 if bf16 else torch.float32
        step = _add_round if bf16 else _add_copy  # the fp32 state += a block's increment; the state in dt
        with torch.no_grad():  # this step's weights, in the products' dtype, up and gate maps side by side
            w = (torch.cat([self.down, self.gate], -1) if self.gate is not None else self.down).to(dt)
            u = self.up.to(dt)
            gw, gu = torch.empty_like(w), torch.empty_like(u)
        losses = []
        for i in range(x.shape[0]):
            z, saved = x[i].clone(), []
            with torch.no_grad():
                zb = z.to(dt, copy=True)
                for l in range(spec.depth):
                    p = (zb @ w[l, i]).float()
                    a = self._act(p).to(dt)
                    saved.append((zb, p, a))
                    zb = step(z, a @ u[l, i])
            out = (spec.readout * (z - x[i])).requires_grad_()
            value = distill_loss(out, y[i], loss)
            (g,) = torch.autograd.grad(value, out)
            losses.append(value.detach())
            with torch.no_grad():
                g = g * spec.readout
                gb = g.to(dt)
                for l in reversed(range(spec.depth)):
                    zb, p, a = saved.pop()
                    torch.mm(a.t(), gb, out=gu[l, i])
                    dp = self._act_grad(p, (gb @ u[l, i].t()).float()).to(dt)
                    torch.mm(zb.t(), dp, out=gw[l, i])
                    gb = step(g, dp @ w[l, i].t())
        r = spec.rank
        self.down.grad, self.up.grad = gw[..., :r].float().contiguous(), gu.float().contiguous()
        if self.gate is not None:
            self.gate.grad = gw[..., r:].float().contiguous()
        return torch.stack(losses)

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
        return torch.linalg.vector_norm(t.float(), dim=(0, 2, 3)).pow(2)


def fit_stacked(make: Callable[[int], DLRNet], layers: list[int], xs: list[torch.Tensor], ys: list[torch.Tensor],
                steps: int, lr: float, batch_tokens: int, split: tuple[torch.Tensor, torch.Tensor], seed: int = 0,
                loss: str = "energy", grad_clip: float = 0.0, bf16: bool = False, progress: bool = False,
                checkpoint: Path | None = None, checkpoint_every: int = 50,
                processes: int = 1) -> tuple[list[DLRNet], dict]:
    """Fit the nets of ``layers`` together: ``make(k)`` builds layer k's starting net (called after
    ``torch.manual_seed(seed)``, as :func:`~weightlock.dlr.distill.fit_module` does), ``xs[i]``/``ys[i]`` are
    layer ``layers[i]``'s captured pairs (aligned rows), ``split`` = (held-out rows, training rows). Adam with
    the same warm-up + cosine schedule and batches as ``fit_module``; each layer's gradient norm clipped to
    ``grad_clip`` on its own; ``bf16``: the products in bf16 (see :meth:`StackedNets.loss_backward`).
    ``checkpoint``: a file the fit saves to every ``checkpoint_every`` steps (weights, Adam state, step) and
    resumes from when it exists. ``processes`` > 1: the layers dealt round-robin to that many worker
    processes (threads split among them, tensors shared, not copied), each fitting its share — the layers'
    fits are independent, so the result is the one-process fit's (a test checks it); each share keeps its
    own checkpoint (``checkpoint`` + ``.K``). Returns the nets and the stats (per layer: held-out errors; the
    fitting loop's seconds — with processes, the slowest share's, and ``wall_seconds`` with their start-up —
    and layer-steps per second of the loop)."""
    nets = []
    for k in layers:
        torch.manual_seed(seed)
        nets.append(make(k))
    kw = dict(steps=steps, lr=lr, batch_tokens=batch_tokens, split=split, seed=seed, loss=loss, grad_clip=grad_clip,
              bf16=bf16, checkpoint_every=checkpoint_every)
    processes = max(1, min(processes, len(layers)))
    if processes == 1:
        return _fit_share(nets, layers, xs, ys, progress=progress, checkpoint=checkpoint, **kw)
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing as tmp

    from ..io import set_threads_per_process

    shares = [list(range(len(layers)))[k::processes] for k in range(processes)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(processes, mp_context=tmp.get_context("spawn"), initializer=set_threads_per_process,
                             initargs=(processes,)) as pool:
        futures = [pool.submit(_fit_share, [nets[i] for i in share], [layers[i] for i in share],
                               [xs[i] for i in share], [ys[i] for i in share], progress=False,
                               checkpoint=None if checkpoint is None else Path(f"{checkpoint}.{k}"), **kw)
                   for k, share in enumerate(shares)]
        results = [f.result() for f in futures]
    dt = time.perf_counter() - t0
    out: list[DLRNet | None] = [None] * len(layers)
    per: list[dict | None] = [None] * len(layers)
    for share, (got, st) in zip(shares, results):
        for i, net, row in zip(share, got, st["layers"]):
            out[i], per[i] = net, row
    done = sum(st["steps_run"] * len(share) for share, (_, st) in zip(shares, results))
    loop = max(st["seconds"] for _, st in results)  # the slowest share's fitting loop, as one process reports it
    return out, {"layers": per, "steps": steps, "steps_run": results[0][1]["steps_run"], "seconds": loop,
                 "wall_seconds": dt, "layer_steps_per_s": done / loop if loop > 0 else 0.0, "bf16": bf16,
                 "processes": processes}


def _fit_share(nets: list[DLRNet], layers: list[int], xs: list[torch.Tensor], ys: list[torch.Tensor], steps: int,
               lr: float, batch_tokens: int, split: tuple[torch.Tensor, torch.Tensor], seed: int, loss: str,
               grad_clip: float, bf16: bool, progress: bool, checkpoint: Path | None,
               checkpoint_every: int) -> tuple[list[DLRNet], dict]:
    """:func:`fit_stacked` on one process: the starting ``nets`` of ``layers`` fitted together."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..io import atomic_path
    from .distill import error_stats

    hold, train = split
    init = [error_stats(net, xs[i][hold].float(), ys[i][hold].float())["rel_error"] for i, net in enumerate(nets)]
    stacked = StackedNets(nets)
    del nets
    opt = torch.optim.Adam(stacked.parameters(), lr=lr, fused=True)  # one pass over the weights and state
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))))
    g = torch.Generator().manual_seed(seed + 1)
    bs = min(batch_tokens, train.numel())
    start = 0
    # what a checkpoint must have been written with to be resumed: the layers, shapes and fitting settings
    settings = {"layers": list(layers), "spec": str(stacked.spec), "steps": steps, "lr": lr, "batch": bs, "seed": seed,
                "loss": loss, "grad_clip": grad_clip, "bf16": bf16, "rows": [int(x.shape[0]) for x in xs]}
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=True)  # our own file: tensors and plain data only
        if state.get("settings") != settings:
            differ = sorted(k for k in settings if (state.get("settings") or {}).get(k) != settings[k])
            raise WeightlockError(f"{checkpoint} was written by a fit with other settings ({', '.join(differ)} "
                                  "differ): delete it to start over")
        stacked.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        start = state["step"]
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]stacked fit"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task("fit", total=steps, completed=start, info="")
        for step in range(start, steps):
            idx = train[torch.randint(0, train.numel(), (bs,), generator=g)]
            # [n, batch, d]: each layer's rows gathered (the captures are never stacked whole: 30 layers of 131k
            # tokens are 9 GB in bf16)
            xb, yb = torch.stack([x[idx] for x in xs]).float(), torch.stack([y[idx] for y in ys]).float()
            value = stacked.loss_backward(xb, yb, loss, bf16).sum()
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
                                "generator": g.get_state(), "step": step + 1, "settings": settings}, tmp)
            if step % 50 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, info=f"loss {value.item() / len(layers):.4f}")
    dt = time.perf_counter() - t0
    nets = stacked.unstack()
    per = [{"layer": k, **error_stats(net, xs[i][hold].float(), ys[i][hold].float()), "rel_error_init": init[i]}
           for i, (k, net) in enumerate(zip(layers, nets))]
    done = steps - start
    return nets, {"layers": per, "steps": steps, "steps_run": done, "seconds": dt,
                  "layer_steps_per_s": done * len(layers) / dt if dt > 0 else 0.0, "bf16": bf16}


def fit_with_engine(layers: list[nn.Module], adapter: ArchAdapter, specs: list, todo: list[int], cfg: LockConfig,
                    work: Path, block: int) -> None:
    """``--engine stacked``: fit the nets of the ``todo`` layers together from their captures in ``work``
    (:func:`weightlock.dlr.engine.fit_stacked`, checkpointed to ``work/engine.pt``: a killed lock resumes), and
    write each layer's net and stats as the per-layer path does (the read-back's error beside them)."""
    from safetensors.torch import load_file, save_file

    from ..io import atomic_path, write_json
    from .distill import holdout_split, mlp_init, readback_stats

    if not todo:
        return
    caps = [load_file(str(work / f"capture_{k}.safetensors")) for k in todo]
    split = holdout_split(caps[0]["x"].shape[0], cfg.holdout, cfg.seed, block)
    inits = {k: mlp_init(layers[k], adapter) for k in todo} if cfg.init == "mlp" else {}

    def make(k: int) -> DLRNet:
        net = DLRNet(specs[k])
        if k in inits:
            inits[k](net)
        return net

    lr = cfg.lr / cfg.readout if cfg.init == "mlp" else cfg.lr  # as fit_layer: Adam's step scaled with U/s
    procs = cfg.engine_processes or len(os.sched_getaffinity(0))
    nets, st = fit_stacked(make, todo, [c["x"] for c in caps], [c["y"] for c in caps], steps=cfg.steps, lr=lr,
                           batch_tokens=cfg.batch_tokens, split=split, seed=cfg.seed, loss=cfg.loss,
                           grad_clip=cfg.grad_clip, bf16=cfg.bf16, progress=cfg.progress,
                           checkpoint=work / "engine.pt", processes=procs)
    engine = {k: st[k] for k in ("seconds", "layer_steps_per_s", "steps_run", "bf16")} | {
        "processes": st.get("processes", 1), "layers": len(todo)}
    for k, c, net, row in zip(todo, caps, nets, st["layers"]):
        rb = readback_stats(net, c["x"][split[0]].float(), c["y"][split[0]].float(), cfg.outlier_factor)
        stats = {**row, "layer": k, "process": 0, "steps": cfg.steps, "seconds": st["seconds"] / len(todo),
                 "engine": engine, "readback": rb, "spec": asdict(net.spec), "sink": {}}
        with atomic_path(work / f"layer_{k}.safetensors") as tmp:
            save_file({n: p.detach().contiguous() for n, p in net.state_dict().items()}, str(tmp))
        write_json(work / f"layer_{k}.json", stats)
