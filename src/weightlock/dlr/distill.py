"""Module-wise distillation: capture each MLP's input/output pairs, fit a DLR-Net to each, per layer.

Layers are independent: with ``torchrun --nproc-per-node N`` each process fits the layers ``k`` with
``k % N == rank`` (gloo on CPU, nccl on GPU). Every finished layer is saved at once in the work dir,
so a killed run restarts and skips it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from ..config import check_types, choice
from ..errors import WeightlockError
from ..io import atomic_path, dist_or_none, read_json, write_json
from .modeling_weightlock_dlr import (
    ArchAdapter,
    DLRNet,
    DLRSpec,
    UnsupportedArchitecture,
    adapter_for,
    find_layers,
    get_path,
    mlp_modules,
    mlp_num_parameters,
    replace_mlp,
)


@dataclass
class LockConfig:
    """Settings of ``weightlock lock`` (the DLR-Net shape, calibration data and distillation).

    Validated at construction; code that changes a field afterwards calls :meth:`validate` again (``lock``
    and ``distill_model`` do, before any work)."""

    rank: int = 32
    depth: int | None = None  # None: chosen so the DLR-Net has the MLP's parameter count (±2%)
    activation: Literal["gelu", "relu", "silu", "tanh"] = choice("gelu", "activation")
    norm: bool = False
    bias: bool = False
    init_scale: float = 0.0
    # zero (U = 0) | mlp (plain MLPs: block l starts as a slice of the MLP's hidden units)
    init: Literal["zero", "mlp"] = choice("zero", "init")
    readout: float = 1.0  # DLR(u) = readout·(z_L − z_0); with init=mlp, s > 1 shrinks the drift of z (see README)
    data: str | None = None  # calibration text; None: the model's own training data, else builtin:code+prose
    calib_tokens: int = 131_072
    block_size: int = 128
    steps: int = 600
    batch_tokens: int = 1024
    lr: float = 1e-2
    holdout: float = 0.1
    seed: int = 0
    # parallel: all layers on the original's activations | sequential
    mode: Literal["parallel", "sequential"] = choice("parallel", "mode")
    refine_steps: int = 0  # optional end-to-end refinement toward the original's logits (KL) / hidden states
    refine_lr: float = 3e-4
    # quality gate: a layer whose held-out relative error is above this (or not finite) fails the lock;
    # 1.0 is what a net that outputs nothing scores. None: no gate
    max_rel_error: float | None = 0.5
    # energy: ‖f(x) − y‖² / ‖y‖² over the batch | row: each token's error relative to its own output energy
    # (floored at the batch mean), so a few tokens with massive activations do not dominate (real LLMs) |
    # row-median: the floor is the batch median (the mean is itself dominated by the massive tokens)
    loss: Literal["energy", "row", "row-median"] = choice("energy", "distillation loss")
    grad_clip: float = 0.0  # clip the distillation gradient norm (0: off); deep nets on real LLMs diverge without
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types and ranges); raise :class:`WeightlockError` on the first bad one."""
        check_types(self, "lock config")
        if self.rank < 1:
            raise WeightlockError(f"rank must be at least 1, got {self.rank}")
        if self.depth is not None and self.depth < 1:
            raise WeightlockError(f"depth must be at least 1, got {self.depth}")
        if not self.readout > 0:
            raise WeightlockError(f"readout must be positive, got {self.readout}")
        if not 0 < self.holdout < 0.5:
            raise WeightlockError("holdout must be in (0, 0.5)")
        if self.steps < 1 or self.batch_tokens < 1 or self.calib_tokens < self.block_size:
            raise WeightlockError("steps, batch_tokens must be ≥ 1 and calib_tokens ≥ block_size")
        if self.block_size < 2 or self.refine_steps < 0 or self.init_scale < 0:
            raise WeightlockError("block_size must be ≥ 2, refine_steps and init_scale ≥ 0")
        if self.grad_clip < 0:
            raise WeightlockError(f"grad_clip must be ≥ 0, got {self.grad_clip}")
        if not self.lr > 0 or not self.refine_lr > 0:
            raise WeightlockError(f"learning rates must be positive, got lr={self.lr}, refine_lr={self.refine_lr}")
        if self.max_rel_error is not None and not self.max_rel_error > 0:
            raise WeightlockError(f"max_rel_error must be positive (or None to accept any error), "
                                  f"got {self.max_rel_error}")


def block_parameters(width: int, rank: int, norm: bool, bias: bool) -> int:
    """Parameters of one DLR block of this width and rank."""
    return DLRSpec(width, rank, 1, norm=norm, bias=bias).num_parameters()


def match_depth(mlp_params: int, width: int, rank: int, norm: bool = False, bias: bool = False,
                tolerance: float = 0.02) -> int:
    """The depth whose DLR-Net parameter count is closest to ``mlp_params`` (must be within ``tolerance``)."""
    if not 1 <= rank <= width:
        raise WeightlockError(f"rank {rank} must be between 1 and the model width {width}")
    per = block_parameters(width, rank, norm, bias)
    depth = max(1, round(mlp_params / per))
    err = abs(depth * per - mlp_params) / mlp_params
    if err > tolerance:
        raise WeightlockError(
            f"rank {rank} cannot match the MLP's {mlp_params:,} parameters within {tolerance:.0%} "
            f"(best depth {depth} gives {depth * per:,}); use a smaller rank or fix --depth"
        )
    return depth


def specs_for(model: nn.Module, cfg: LockConfig) -> tuple[ArchAdapter, list[DLRSpec], list[int]]:
    """Validate ``model`` against ``cfg`` and return its adapter, one DLRSpec per layer and MLP sizes."""
    _refuse_mixture_of_experts(model)
    try:
        adapter = adapter_for(model)
        adapter.check(model.config)
        layers = find_layers(model, adapter)
    except UnsupportedArchitecture as e:
        raise WeightlockError(str(e)) from None
    if not layers:
        raise WeightlockError(f"{type(model).__name__} has no transformer layers (no MLPs to lock)")
    width = model.config.hidden_size
    if not 1 <= cfg.rank <= width:
        raise WeightlockError(f"rank {cfg.rank} must be between 1 and the model width {width}")
    if cfg.init == "mlp" and adapter.gated:
        raise WeightlockError(f"init 'mlp' needs a plain two-matrix MLP; {adapter.family} has a gated MLP")
    bias = cfg.bias or cfg.init == "mlp"
    specs, sizes = [], []
    for layer in layers:
        try:
            n = mlp_num_parameters(layer, adapter)
        except AttributeError:
            raise WeightlockError(f"{type(model).__name__}: a layer has no {adapter.mlp!r} module (no MLP to lock); "
                                  "is it already locked?") from None
        if n == 0:
            raise WeightlockError(f"{type(model).__name__}: MLP without parameters, nothing to lock")
        depth = cfg.depth or match_depth(n, width, cfg.rank, cfg.norm, bias)
        specs.append(DLRSpec(width, cfg.rank, depth, cfg.activation, cfg.norm, bias, cfg.init_scale, cfg.readout))
        sizes.append(n)
    return adapter, specs, sizes


def _refuse_mixture_of_experts(model: nn.Module) -> None:
    """Mixture-of-experts feed-forwards (Mixtral, Qwen2-MoE, ...) are refused: one DLR-Net in place of the
    block would fold the router and every expert into a single dense net."""
    experts = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in ("experts", "shared_expert")]
    if experts:
        mt = getattr(model.config, "model_type", None) or type(model).__name__
        raise WeightlockError(
            f"{mt}: mixture-of-experts feed-forward blocks are not supported by DLR-Lock (one net would fold "
            "the router and all experts into a single dense network); lock a dense model instead")


# ---- capture ------------------------------------------------------------------------------------

@torch.no_grad()
def capture(model: nn.Module, blocks: torch.Tensor, layer_ids: list[int], batch_size: int = 16,
            dtype: torch.dtype = torch.bfloat16) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` on ``blocks`` and return, per layer id, the MLP (inputs, outputs) as ``[tokens, d]``."""
    adapter = adapter_for(model)
    layers = find_layers(model, adapter)
    xs: dict[int, list] = {k: [] for k in layer_ids}
    ys: dict[int, list] = {k: [] for k in layer_ids}
    handles = []
    for k in layer_ids:
        def pre(mod, args, kwargs, k=k):
            x = args[0] if args else next(iter(kwargs.values()))
            # always a copy: the layer may modify the tensor in place afterwards (Falcon: mlp_output += attn)
            xs[k].append(x.detach().reshape(-1, x.shape[-1]).to("cpu", dtype, copy=True))

        def post(mod, args, out, k=k):
            y = out[0] if isinstance(out, tuple) else out
            ys[k].append(y.detach().reshape(-1, y.shape[-1]).to("cpu", dtype, copy=True))

        handles.append(get_path(layers[k], adapter.mlp).register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(get_path(layers[k], adapter.out_path()).register_forward_hook(post))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, blocks.shape[0], batch_size):
            x = blocks[i:i + batch_size].to(device)
            model(input_ids=x, attention_mask=torch.ones_like(x))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (torch.cat(xs[k]), torch.cat(ys[k])) for k in layer_ids}


# ---- fitting one layer --------------------------------------------------------------------------

def relative_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    """‖net(x) − y‖² / ‖y‖² over all tokens (fraction of the MLP output's energy not reproduced)."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xi, yi = x[i:i + chunk].float(), y[i:i + chunk].float()
            num += (net(xi) - yi).pow(2).sum().item()
            den += yi.pow(2).sum().item()
    return num / max(den, 1e-30)


def _plain_maps(layer: nn.Module, adapter: ArchAdapter) -> list[nn.Module]:
    maps = [m for mod in mlp_modules(layer, adapter) for m in ([mod] + list(mod.modules()))
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    maps = list(dict.fromkeys(maps))
    if len(maps) != 2:
        raise WeightlockError(f"{adapter.family}: expected two linear maps in the MLP, found {len(maps)}")
    return maps


def plain_mlp_weights(layer: nn.Module, adapter: ArchAdapter) -> tuple[torch.Tensor, ...]:
    """(W1 [d_ff, d], b1, W2 [d, d_ff], b2) of a plain two-matrix MLP (Linear or GPT-2's Conv1D)."""
    out = []
    for m in _plain_maps(layer, adapter):
        w = m.weight.detach().float()
        w = w.t() if type(m).__name__ == "Conv1D" else w
        b = m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])
        out += [w, b]
    return tuple(out)


@torch.no_grad()
def set_plain_mlp_weights(layer: nn.Module, adapter: ArchAdapter, weights: tuple[torch.Tensor, ...]) -> None:
    """Write (W1, b1, W2, b2) into a plain two-matrix MLP; fewer hidden units than d_ff fill the first
    ones and zero the rest (which then contribute nothing)."""
    for m, w, b in zip(_plain_maps(layer, adapter), weights[0::2], weights[1::2]):
        full = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
        if w.shape[0] > full.shape[0] or w.shape[1] > full.shape[1]:
            raise WeightlockError(f"{tuple(w.shape)} weights do not fit the MLP's {tuple(full.shape)}")
        full.zero_()
        full[: w.shape[0], : w.shape[1]].copy_(w)
        if m.bias is not None:
            m.bias.zero_()
            m.bias[: b.shape[0]].copy_(b)


def dlr_readback(net: DLRNet) -> tuple[torch.Tensor, ...]:
    """The dense MLP (W1, b1, W2, b2) a DLR-Net would be if its residual state did not drift: the stacked
    V_l and s·U_l. For an untrained ``init=mlp`` net these are the MLP's own weights; training moves them
    little (MiniLM, s = 16: the read-back MLP is within 0.1–0.3% of the original)."""
    bl, s = net.blocks, net.spec.readout
    w1, w2 = torch.cat([b.down.weight for b in bl]), s * torch.cat([b.up.weight for b in bl], 1)
    b1 = torch.cat([b.down.bias for b in bl]) if net.spec.bias else torch.zeros(w1.shape[0])
    b2 = s * sum(b.up.bias for b in bl) if net.spec.bias else torch.zeros(w2.shape[0])
    return tuple(t.detach().float() for t in (w1, b1, w2, b2))


def mlp_slice_init(weights: tuple[torch.Tensor, ...]) -> Callable[[DLRNet], None]:
    """Initialise block l with the l-th slice of the MLP's hidden units (most important first); the
    up-projections are divided by the net's read-out scale s, so the residual state drifts s times less
    between blocks and the net starts closer to the MLP as s grows."""
    w1, b1, w2, b2 = weights

    @torch.no_grad()
    def init(net: DLRNet) -> None:
        r, blocks, s = net.spec.rank, net.blocks, net.spec.readout
        order = (w2.norm(dim=0) * w1.norm(dim=1)).argsort(descending=True)
        for l, b in enumerate(blocks):
            idx = order[l * r:(l + 1) * r]
            if idx.numel() < r:
                break  # more blocks than hidden units: the rest keep their default init
            b.down.weight.copy_(w1[idx])
            b.up.weight.copy_(w2[:, idx] / s)
            if b.down.bias is not None:
                b.down.bias.copy_(b1[idx])
                b.up.bias.copy_(b2 / (len(blocks) * s))

    return init


def fit_layer(x: torch.Tensor, y: torch.Tensor, spec: DLRSpec, cfg: LockConfig, desc: str = "layer",
              device: torch.device | str = "cpu", init: Callable[[DLRNet], None] | None = None) -> tuple[DLRNet, dict]:
    """Train a DLR-Net on (x, y) pairs with the normalised regression loss; returns it and its stats."""
    def make() -> DLRNet:
        net = DLRNet(spec)
        if init is not None:
            init(net)
        return net

    # Adam moves every weight by ~lr per step whatever its scale, and the read-out multiplies the effect of
    # U by s, so the step size is lr/s (MiniLM layer 2, init=mlp, s = 16: rel. error 0.0011 after 300 steps)
    net, stats = fit_module(make, x, y, steps=cfg.steps, lr=cfg.lr / spec.readout,
                            batch_tokens=cfg.batch_tokens, seed=cfg.seed, holdout=cfg.holdout,
                            progress=cfg.progress, desc=desc, device=device, loss=cfg.loss, grad_clip=cfg.grad_clip)
    stats["spec"] = asdict(spec)
    return net, stats


def distill_loss(out: torch.Tensor, y: torch.Tensor, kind: str = "energy") -> torch.Tensor:
    """``energy``: ‖out − y‖² / ‖y‖² over the batch. ``row``: the mean over tokens of ‖out_i − y_i‖² /
    (‖y_i‖² + mean_j ‖y_j‖²) — every token's relative error counts alike, so the few tokens with massive
    activations that real LLMs produce (|y| in the hundreds on 0.1% of tokens) do not swamp the rest.
    ``row-median``: the same with the batch median as the floor, which the massive tokens do not inflate."""
    if kind == "energy":
        return (out - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
    if kind in ("row", "row-median"):
        e = y.pow(2).sum(-1)
        floor = e.median() if kind == "row-median" else e.mean()
        return ((out - y).pow(2).sum(-1) / (e + floor).clamp_min(1e-30)).mean()
    raise WeightlockError(f"unknown distillation loss {kind!r} (energy, row, row-median)")


def fit_module(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
               batch_tokens: int, seed: int = 0, holdout: float = 0.1, progress: bool = True,
               desc: str = "fit", device: torch.device | str = "cpu", loss: str = "energy",
               grad_clip: float = 0.0) -> tuple[nn.Module, dict]:
    """Fit ``make()`` (built after seeding) to map x → y with Adam and a warm-up + cosine schedule,
    minimising ``loss`` (see :func:`distill_loss`), the gradient norm clipped to ``grad_clip`` (0: off);
    relative errors (energy) are measured on a held-out ``holdout`` fraction.

    Divergence guard: when the batch loss is not finite or exceeds ``GUARD_FACTOR`` × the best so far, the
    net goes back to its last healthy snapshot (taken every ``GUARD_EVERY`` steps while the loss is within
    2× its best), Adam's moments are reset and the learning rate halves from that step on; after
    ``GUARD_RESTARTS`` restarts training stops. A fit that restarted (or ends with non-finite weights)
    returns whichever of its final weights and the snapshot has the lower held-out error, never NaN;
    ``stats["restarts"]`` counts the restarts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    perm = torch.randperm(n, generator=g)
    n_hold = max(1, int(n * holdout))
    hold, train = perm[:n_hold], perm[n_hold:]
    xh, yh = x[hold].float().to(device), y[hold].float().to(device)
    torch.manual_seed(seed)
    net = make().to(device)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    err0 = relative_error(net, xh, yh)
    t0 = time.perf_counter()
    bs = min(batch_tokens, train.numel())
    good, best, restarts, stopped = _snapshot(net), math.inf, 0, None

    def restart() -> None:  # back to the snapshot, fresh Adam moments, half the rate from this step on
        net.load_state_dict(good)
        opt.state.clear()
        sched.base_lrs = [b / 2 for b in sched.base_lrs]
        for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)

    with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        for step in range(steps):
            idx = train[torch.randint(0, train.numel(), (bs,), generator=g)]
            xb, yb = x[idx].float().to(device), y[idx].float().to(device)
            value = distill_loss(net(xb), yb, loss)
            opt.zero_grad(set_to_none=True)
            v = value.item()
            if not math.isfinite(v) or v > GUARD_FACTOR * best:  # diverging
                restarts += 1
                restart()
                if restarts > GUARD_RESTARTS:
                    stopped = step
                    break
                continue
            if step % GUARD_EVERY == 0 and v <= 2 * best:  # a healthy state (not climbing away from the best)
                good = _snapshot(net)
            best = min(best, v)
            value.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, info=f"loss {value.item():.4f}")
    dt = time.perf_counter() - t0
    if restarts or not all(torch.isfinite(p).all() for p in net.parameters()):
        final = _snapshot(net)
        err = relative_error(net, xh, yh)
        net.load_state_dict(good)
        if math.isfinite(err) and err < relative_error(net, xh, yh):
            net.load_state_dict(final)  # the fit after the restarts is better than the last snapshot
    stats = {"restarts": restarts, "stopped_at_step": stopped,
             "rel_error_init": err0, "rel_error_train": relative_error(net, x[train[:n_hold]], y[train[:n_hold]]),
             "rel_error": relative_error(net, xh, yh), "tokens": n, "steps": steps, "seconds": dt,
             "tokens_per_s": (stopped or steps) * bs / dt}
    return net.cpu() if str(device) != "cpu" else net, stats


GUARD_EVERY = 25  # steps between the divergence guard's snapshots
GUARD_RESTARTS = 5
GUARD_FACTOR = 1e3  # a batch loss this many times the best so far is divergence


def _snapshot(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---- the whole model ----------------------------------------------------------------------------

def distill_model(model: nn.Module, blocks: torch.Tensor, cfg: LockConfig, work: Path) -> tuple[nn.Module, list[dict]]:
    """Replace every MLP of ``model`` (in place) by a distilled DLR-Net; returns the model and per-layer stats.

    ``work`` keeps captured activations and finished layers, so an interrupted call resumes.
    """
    from safetensors.torch import load_file, save_file

    cfg.validate()
    adapter, specs, _ = specs_for(model, cfg)
    layers = find_layers(model, adapter)
    work.mkdir(parents=True, exist_ok=True)
    dist = dist_or_none()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if dist and cfg.mode == "sequential":
        raise WeightlockError("sequential mode distils layers one after another; run it in a single process")
    device = next(model.parameters()).device

    def done(k: int) -> bool:
        return (work / f"layer_{k}.safetensors").exists() and (work / f"layer_{k}.json").exists()

    if cfg.mode == "parallel":
        todo = [k for k in range(len(layers)) if not done(k)]
        if rank == 0 and todo and not all((work / f"capture_{k}.safetensors").exists() for k in todo):
            for k, (x, y) in capture(model, blocks, todo).items():
                with atomic_path(work / f"capture_{k}.safetensors") as tmp:
                    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(tmp))
        if dist:
            dist.barrier()
    for k in range(len(layers)):
        if k % world != rank or done(k):
            continue
        if cfg.mode == "sequential":  # inputs produced by the already-locked layers 0..k-1
            for j in range(k):
                _install(layers[j], adapter, specs[j], work / f"layer_{j}.safetensors", device)
            x, y = capture(model, blocks, [k])[k]
        else:
            cap = load_file(str(work / f"capture_{k}.safetensors"))
            x, y = cap["x"], cap["y"]
        init = mlp_slice_init(plain_mlp_weights(layers[k], adapter)) if cfg.init == "mlp" else None
        net, stats = fit_layer(x, y, specs[k], cfg, desc=f"layer {k + 1}/{len(layers)}", device=device, init=init)
        stats["layer"], stats["process"] = k, rank
        with atomic_path(work / f"layer_{k}.safetensors") as tmp:
            save_file({n: p.detach().contiguous() for n, p in net.state_dict().items()}, str(tmp))
        write_json(work / f"layer_{k}.json", stats)
    if dist:
        dist.barrier()
    stats = [read_json(work / f"layer_{k}.json") for k in range(len(layers))]
    check_layer_errors(stats, cfg.max_rel_error, work)
    for k, layer in enumerate(layers):
        _install(layer, adapter, specs[k], work / f"layer_{k}.safetensors", device)
    return model, stats


def check_layer_errors(stats: list[dict], max_rel_error: float | None, work: Path | None = None) -> None:
    """The quality gate: refuse layers whose held-out relative error is above ``max_rel_error`` or not finite."""
    if max_rel_error is None:
        return
    bad = [(s.get("layer", k), s["rel_error"]) for k, s in enumerate(stats)
           if not math.isfinite(s["rel_error"]) or s["rel_error"] > max_rel_error]
    if bad:
        layers = ", ".join(f"layer {k} ({e:.4g})" for k, e in bad)
        kept = f"; the fitted layers stay in {work} (other settings refit them with --restart)" if work else ""
        raise WeightlockError(
            f"held-out relative error above {max_rel_error:g} (1 = the net outputs nothing): {layers}. "
            "Distil longer or wider (--steps, --lr, --rank), or accept it with --max-rel-error N or none "
            f"(LockConfig.max_rel_error){kept}")


def _install(layer: nn.Module, adapter: ArchAdapter, spec: DLRSpec, path: Path, device) -> None:
    from safetensors.torch import load_file

    mod = get_path(layer, adapter.mlp)
    net = mod if isinstance(mod, DLRNet) else DLRNet(spec)
    net.load_state_dict(load_file(str(path)))
    if not isinstance(mod, DLRNet):
        replace_mlp(layer, adapter, net.to(device))


def refine(locked: nn.Module, original: nn.Module, blocks: torch.Tensor, cfg: LockConfig) -> list[dict]:
    """End-to-end refinement: train only the DLR-Nets so the locked model's outputs match the original's:
    KL to its logits (language models), or the normalised squared error of the last hidden states (encoders)."""
    from ..train.loop import TrainConfig, Trainer

    for n, p in locked.named_parameters():
        p.requires_grad_(".blocks." in n)
    original.eval()

    def match_loss(model, x):
        model.eval()  # the teacher is deterministic: no dropout in the student either (gradients still flow)
        with torch.no_grad():
            t = original(input_ids=x)
        s = model(input_ids=x)
        if getattr(t, "logits", None) is not None:
            teacher = torch.log_softmax(t.logits.float(), -1)
            student = torch.log_softmax(s.logits.float(), -1)
            return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") / x.shape[1]
        t, s = t.last_hidden_state.float(), s.last_hidden_state.float()
        return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)

    tc = TrainConfig(max_steps=cfg.refine_steps, batch_size=min(16, blocks.shape[0]),
                     lr=cfg.refine_lr / cfg.readout,  # as in fit_layer
                     warmup_steps=min(10, cfg.refine_steps), weight_decay=0.0, eval_every=10**9,
                     checkpoint_every=0, seed=cfg.seed, progress=cfg.progress)
    history = Trainer(locked, blocks, tc, loss_fn=match_loss).fit(resume=False)
    for p in locked.parameters():
        p.requires_grad_(True)
    return history
