"""Module-wise distillation: capture each MLP's input/output pairs, fit a DLR-Net to each, per layer.

Layers are independent: with ``torchrun --nproc-per-node N`` each process fits the layers ``k`` with
``k % N == rank`` (gloo on CPU, nccl on GPU). Every finished layer is saved at once in the work dir,
so a killed run restarts and skips it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import WeightlockError
from ..io import atomic_path, dist_or_none, read_json, write_json
from ..train.loop import Hook
from .config import LockConfig, parse_layers  # noqa: F401  (re-exported: their home was this module)
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
    readback_forward,
    readback_net,
    readback_weights,
    replace_mlp,
    sink_parameters,
)


def block_parameters(width: int, rank: int, norm: bool, bias: bool, form: str = "plain") -> int:
    """Parameters of one DLR block of this width, rank and form."""
    return DLRSpec(width, rank, 1, norm=norm, bias=bias, form=form).num_parameters()


def match_depth(mlp_params: int, width: int, rank: int, norm: bool = False, bias: bool = False,
                tolerance: float = 0.02, form: str = "plain") -> int:
    """The depth whose DLR-Net parameter count is closest to ``mlp_params`` (must be within ``tolerance``)."""
    if not 1 <= rank <= width:
        raise WeightlockError(f"rank {rank} must be between 1 and the model width {width}")
    per = block_parameters(width, rank, norm, bias, form)
    depth = max(1, round(mlp_params / per))
    err = abs(depth * per - mlp_params) / mlp_params
    if err > tolerance:
        raise WeightlockError(
            f"rank {rank} cannot match the MLP's {mlp_params:,} parameters within {tolerance:.0%} "
            f"(best depth {depth} gives {depth * per:,}); use a smaller rank or fix --depth"
        )
    return depth


def specs_for(model: nn.Module, cfg: LockConfig) -> tuple[ArchAdapter, list[DLRSpec | None], list[int]]:
    """Validate ``model`` against ``cfg`` and return its adapter, one DLRSpec per layer (None for a layer the
    config leaves unlocked) and MLP sizes. With a sink the blocks get the sink's parameters fewer, so the
    net still matches the MLP's count."""
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
    if cfg.init == "mlp" and adapter.gated != (cfg.block == "gated"):
        kind, want = ("a gated", "gated") if adapter.gated else ("a plain two-matrix", "plain")
        raise WeightlockError(f"init 'mlp' starts the blocks from the MLP's hidden units: {adapter.family} has "
                              f"{kind} MLP, so it needs --block {want}")
    # the structured start takes the MLP's biases: a plain MLP always has them, a gated one where it does
    bias = cfg.bias or (cfg.init == "mlp" and (not adapter.gated or _gated_has_bias(layers[0], adapter)))
    d_ff = getattr(model.config, "intermediate_size", None)
    if cfg.init == "mlp" and cfg.block == "gated" and d_ff and (d_ff % cfg.rank or (cfg.depth or d_ff // cfg.rank)
                                                                 != d_ff // cfg.rank):
        raise WeightlockError(f"the structured start gives each block {cfg.rank} of the MLP's {d_ff} hidden units: "
                              f"the rank must divide {d_ff} and the depth be {d_ff} / rank")
    activation = resolve_activation(model, cfg)
    sink = cfg.uses_sink
    chosen = parse_layers(cfg.layers, len(layers))
    specs, sizes = [], []
    for k, layer in enumerate(layers):
        try:
            n = mlp_num_parameters(layer, adapter)
        except AttributeError:
            raise WeightlockError(f"{type(model).__name__}: a layer has no {adapter.mlp!r} module (no MLP to lock); "
                                  "is it already locked?") from None
        if n == 0:
            raise WeightlockError(f"{type(model).__name__}: MLP without parameters, nothing to lock")
        extra = sink_parameters(width) if sink else 0
        depth = cfg.depth or match_depth(n - extra, width, cfg.rank, cfg.norm, bias, form=cfg.block)
        locked = chosen is None or k in chosen
        readout = cfg.anneal_to or cfg.readout  # the release's read-out: where an annealed fit ends
        specs.append(DLRSpec(width, cfg.rank, depth, activation, cfg.norm, bias, cfg.init_scale, readout,
                             sink, cfg.block) if locked else None)
        sizes.append(n)
    return adapter, specs, sizes


# the activations of transformers' ACT2FN names that a DLR block has
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "tanh": "tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def resolve_activation(model: nn.Module, cfg: LockConfig) -> str:
    """The blocks' activation: ``cfg.activation``, or with ``auto`` the MLP's own (its config's ``hidden_act``
    / ``hidden_activation`` / ``activation_function``) under ``init="mlp"`` and gelu otherwise. A structured
    start with another activation than the MLP's is refused (it would not start at the MLP)."""
    c = model.config
    own = next((getattr(c, a) for a in ("hidden_activation", "hidden_act", "activation_function")
                if isinstance(getattr(c, a, None), str)), None)
    mapped = _HF_ACTIVATIONS.get(own) if own else None
    if cfg.init != "mlp":
        return "gelu" if cfg.activation == "auto" else cfg.activation
    if mapped is None:
        raise WeightlockError(f"init 'mlp': the MLP's activation {own!r} is not one a DLR block has "
                              f"({', '.join(sorted(set(_HF_ACTIVATIONS.values())))})")
    if cfg.activation not in ("auto", mapped):
        raise WeightlockError(f"init 'mlp' needs the MLP's own activation ({mapped}), got --activation "
                              f"{cfg.activation}; leave it at auto")
    return mapped


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
            dtype: torch.dtype = torch.bfloat16,
            progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` on ``blocks`` and return, per layer id, the MLP (inputs, outputs) as ``[tokens, d]``
    (rows in block order: block i is rows i·block … (i+1)·block − 1)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    adapter = adapter_for(model)
    layers = find_layers(model, adapter)
    n, width = blocks.numel(), model.config.hidden_size
    # preallocated and filled in place: lists of batches concatenated at the end would need twice the memory
    # (30 layers of 131k tokens: 9 GB in bf16, 18 GB while concatenating)
    xs = {k: torch.empty(n, width, dtype=dtype) for k in layer_ids}
    ys = {k: torch.empty(n, width, dtype=dtype) for k in layer_ids}
    pos = {"x": dict.fromkeys(layer_ids, 0), "y": dict.fromkeys(layer_ids, 0)}

    def put(store: dict, kind: str, k: int, t: torch.Tensor) -> None:
        t = t.detach().reshape(-1, t.shape[-1])
        i = pos[kind][k]
        store[k][i:i + t.shape[0]].copy_(t)  # always a copy: the layer may modify t in place afterwards
        pos[kind][k] = i + t.shape[0]

    handles = []
    for k in layer_ids:
        def pre(mod, args, kwargs, k=k):
            put(xs, "x", k, args[0] if args else next(iter(kwargs.values())))

        def post(mod, args, out, k=k):
            put(ys, "y", k, out[0] if isinstance(out, tuple) else out)

        handles.append(get_path(layers[k], adapter.mlp).register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(get_path(layers[k], adapter.out_path()).register_forward_hook(post))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    desc = f"capture ({len(layer_ids)} MLPs)"
    try:
        with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not progress) as bar:
            task = bar.add_task(desc, total=blocks.shape[0])
            for i in range(0, blocks.shape[0], batch_size):
                x = blocks[i:i + batch_size].to(device)
                model(input_ids=x, attention_mask=torch.ones_like(x))
                bar.update(task, completed=min(i + batch_size, blocks.shape[0]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (xs[k], ys[k]) for k in layer_ids}


# ---- fitting one layer --------------------------------------------------------------------------

def relative_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    """‖net(x) − y‖² / ‖y‖² over all tokens (fraction of the MLP output's energy not reproduced)."""
    return error_stats(net, x, y, chunk=chunk)["rel_error"]


@torch.no_grad()
def error_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor, outliers: torch.Tensor | None = None,
                chunk: int = 8192) -> dict:
    """How well ``net`` reproduces y = MLP(x), three ways:

    * ``rel_error``: ‖net(x) − y‖² / ‖y‖² over all tokens (energy-weighted: on a layer with a 24,000-norm
      sink token this is that one token's error);
    * ``rel_error_tokens``: Σ w_i ‖e_i‖² / Σ w_i ‖y_i‖² with w_i = 1 / (‖y_i‖² + median_j ‖y_j‖²): every
      token's relative error counts about alike, as in the row loss (the median floor keeps near-zero
      outputs from blowing up); 1 = the net outputs nothing, as for ``rel_error``;
    * ``outlier_rel_error``: ‖E‖ / ‖Y‖ (relative norm, not squared) over the ``outliers`` rows (massive
      activations such as the attention sink), with their count; None without outliers."""
    sq_err, sq_y = [], []
    for i in range(0, x.shape[0], chunk):
        xi, yi = x[i:i + chunk].float(), y[i:i + chunk].float()
        sq_err.append((net(xi).float() - yi).pow(2).sum(-1))
        sq_y.append(yi.pow(2).sum(-1))
    e, ey = torch.cat(sq_err), torch.cat(sq_y)
    num, den = e.sum().item(), ey.sum().item()
    w = 1 / (ey + ey.median()).clamp_min(1e-30)
    row = ((w * e).sum() / (w * ey).sum().clamp_min(1e-30)).item() if e.numel() else math.nan
    out = {"rel_error": num / max(den, 1e-30), "rel_error_tokens": row,
           "outliers": 0 if outliers is None else int(outliers.sum()), "outlier_rel_error": None}
    if outliers is not None and outliers.any():
        out["outlier_rel_error"] = math.sqrt(e[outliers].sum().item() / max(ey[outliers].sum().item(), 1e-30))
    return out


def outlier_rows(y: torch.Tensor, factor: float) -> torch.Tensor:
    """Rows whose norm is above ``factor`` × the median row norm (massive activations)."""
    n = y.float().norm(dim=-1)
    return n > factor * n.median()


RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _cv_ridge(xf: torch.Tensor, a: torch.Tensor, folds: int = 5) -> float:
    """The ridge strength (relative to the features' scale) of :data:`RIDGES` with the lowest 5-fold
    cross-validated error of the outliers' amplitude: fewer outliers than input dimensions (SmolLM2: ~460
    sinks, d = 576) need shrinkage, how much depends on the layer (layer 11: 1e-4 → sink error 0.013,
    0.1 → 0.0098, 3 → 0.016)."""
    n = xf.shape[0]
    if n < 2 * folds:
        return RIDGES[0]
    fold = torch.arange(n) % folds
    best, choice = math.inf, RIDGES[0]
    for r in RIDGES:
        err = 0.0
        for f in range(folds):
            tr, te = fold != f, fold == f
            xm, am = xf[tr].mean(0), a[tr].mean()
            X = xf[tr] - xm
            lam = r * X.pow(2).sum() / X.shape[1]
            w = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ (a[tr] - am))
            err += ((xf[te] - xm) @ w + am - a[te]).pow(2).sum().item()
        if err < best:
            best, choice = err, r
    return choice


@torch.no_grad()
def fit_sink(sink: nn.Module, x: torch.Tensor, y: torch.Tensor, factor: float, ridge: float | None = None,
             target: torch.Tensor | None = None) -> dict:
    """Fit a :class:`DLRSink` in closed form to the outlier rows of (x, y) (output norm above ``factor`` × the
    median) that point the way most of them do (cosine > 0.9 to their mean: the sink's own cluster): its
    value is their mean output direction, its amplitude a ridge regression of their output along it on the
    input (strength chosen by cross-validation unless ``ridge`` is given), and its gate a logistic
    regression (on the input direction) of outlier vs ordinary, sharpened so that the most outlier-like
    ordinary token of the data sits at logit −12 and the least outlier-like outlier (if they separate;
    else the median one) at +12. Without outliers (or with too few to fit) the sink stays off (value 0).

    ``target`` (rows like y): refit only value and amplitude to it on the same outlier rows, keeping the
    gate (after the blocks are trained: the sink then takes what they leave on the outliers, y − blocks(x)).
    Returns what was found."""
    flag = outlier_rows(y, factor)
    count = int(flag.sum())
    if count < 4 or count > 0.2 * y.shape[0]:
        sink.value.zero_()
        return {"outliers": count, "sink": False}
    xf, yf = x[flag].double(), (y if target is None else target)[flag].double()
    v = yf.mean(0)
    v = v / v.norm()
    # the sink's own cluster: outliers pointing elsewhere (SmolLM2 layer 11: a few " " tokens) are left to the
    # blocks, their amplitude along v would only bias the fit
    same = (y[flag].double() @ v) / y[flag].double().norm(dim=1).clamp_min(1e-30) > 0.9
    if same.sum() >= 4:
        xf, yf = xf[same], yf[same]
        v = yf.mean(0)
        v = v / v.norm()
    a = yf @ v
    ridge = _cv_ridge(xf, a) if ridge is None else ridge
    xm = xf.mean(0)
    X = xf - xm  # centred: the intercept is not shrunk
    lam = ridge * X.pow(2).sum() / X.shape[1]  # relative to the features' scale
    sol = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64), X.T @ (a - a.mean()))
    sink.value.copy_(v.float())
    sink.amp.weight.copy_(sol.float()[None])
    sink.amp.bias.fill_(float(a.mean() - xm @ sol))
    if target is not None:
        return {"outliers": count, "sink": True, "ridge": ridge}
    # the gate: logistic regression on the unit input direction, then sharpened
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    labels = flag.float()
    pos_weight = torch.tensor((labels.numel() - count) / count)

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = nn.functional.binary_cross_entropy_with_logits(unit @ w + b, labels, pos_weight=pos_weight)
            loss = loss + 1e-4 * w.pow(2).sum()
            loss.backward()
        return loss

    opt.step(closure)
    logit = unit @ w.detach() + b.detach()
    lo = logit[~flag].max().item()
    separable = logit[flag].min().item() > lo
    # separable: the least outlying outlier and the most outlying ordinary token at ±12; else the median outlier
    hi = logit[flag].min().item() if separable else logit[flag].median().item()
    if hi > lo:  # map [lo, hi] onto [−12, +12]
        k = 24.0 / (hi - lo)
        sink.gate.weight.copy_((k * w.detach())[None])
        sink.gate.bias.fill_(float(k * (b.detach() - (hi + lo) / 2)))
    else:
        sink.gate.weight.copy_(w.detach()[None])
        sink.gate.bias.fill_(float(b.detach()))
    cut = (hi + lo) / 2 if hi > lo else 0.0
    return {"outliers": count, "sink": True, "gate_separable": separable,
            "ordinary_above_gate": int((logit[~flag] > cut).sum()),
            "outliers_below_gate": int((logit[flag] < cut).sum())}


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


def gated_mlp_maps(layer: nn.Module, adapter: ArchAdapter) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(gate, up, down) linear maps of a gated MLP (``gate_proj``/``up_proj``/``down_proj``, as in Llama,
    Mistral, Qwen, Gemma, OLMo); phi3's fused ``gate_up_proj`` is refused with a clear error."""
    mlp = get_path(layer, adapter.mlp)
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
        raise WeightlockError(f"{adapter.family}: the structured start needs a gated MLP with gate_proj, up_proj "
                              f"and down_proj linear maps; {type(mlp).__name__} has "
                              f"{[n for n, _ in mlp.named_children()]}")
    return tuple(getattr(mlp, n) for n in names)


def _gated_has_bias(layer: nn.Module, adapter: ArchAdapter) -> bool:
    return any(m.bias is not None for m in gated_mlp_maps(layer, adapter))


def gated_mlp_weights(layer: nn.Module, adapter: ArchAdapter) -> tuple[torch.Tensor, ...]:
    """(G [d_ff, d], bg, W [d_ff, d], bw, D [d, d_ff], bd) of a gated MLP ``D·(σ(G·x + bg) ⊙ (W·x + bw)) + bd``
    (zero biases where the MLP has none)."""
    out = []
    for m in gated_mlp_maps(layer, adapter):
        w = m.weight.detach().float()
        out += [w, m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])]
    return tuple(out)


@torch.no_grad()
def dlr_readback(net: DLRNet) -> tuple[torch.Tensor, ...]:
    """The dense MLP a DLR-Net would be if its residual state did not drift (:func:`readback_weights`), as a
    plain MLP's (W1, b1, W2, b2) or a gated MLP's (G, bg, W, bw, D, bd), zero biases where the net has none.
    For an untrained ``init=mlp`` net these are the MLP's own weights; training moves them little
    (MiniLM, s = 16: the read-back MLP is within 0.1–0.3% of the original)."""
    w = readback_weights(net)
    names = ("gate", "down", "up") if net.spec.form == "gated" else ("down", "up")
    out = []
    for n in names:
        out += [w[n], w[n + "_b"] if w[n + "_b"] is not None else torch.zeros(w[n].shape[0])]
    return tuple(t.detach().float() for t in out)


@torch.no_grad()
def write_readback(layer: nn.Module, adapter: ArchAdapter, net: DLRNet) -> None:
    """Write ``net``'s read-back into ``layer``'s own dense MLP (what an attacker does with a release): the
    gated form into a gated MLP's gate/up/down maps, the plain form into a plain MLP's two maps. A net with
    per-block norms or a sink has no such dense form and is refused."""
    if net.spec.norm or net.spec.sink:
        raise WeightlockError("a DLR-Net with per-block norms or a sink has no dense MLP of the family's form to "
                              "read back into; start the attack from a random dense MLP instead")
    weights = dlr_readback(net)
    if (net.spec.form == "gated") != adapter.gated:
        raise WeightlockError(f"{net.spec.form} DLR blocks do not read back into {adapter.family}'s "
                              f"{'gated' if adapter.gated else 'plain'} MLP")
    if not adapter.gated:
        return set_plain_mlp_weights(layer, adapter, weights)
    for m, w, b in zip(gated_mlp_maps(layer, adapter), weights[0::2], weights[1::2]):
        if m.weight.shape != w.shape:
            raise WeightlockError(f"read-back {tuple(w.shape)} does not fit the MLP's {tuple(m.weight.shape)}")
        m.weight.copy_(w)
        if m.bias is not None:
            m.bias.copy_(b)


def mlp_slice_init(weights: tuple[torch.Tensor, ...]) -> Callable[[DLRNet], None]:
    """Initialise block l with the l-th slice of the MLP's hidden units (most important first); the
    up-projections are divided by the net's read-out scale s, so the residual state drifts s times less
    between blocks and the net starts closer to the MLP as s grows. ``weights``: a plain MLP's
    (W1, b1, W2, b2) (:func:`plain_mlp_weights`) for plain blocks, a gated MLP's (G, bg, W, bw, D, bd)
    (:func:`gated_mlp_weights`) for gated blocks."""
    gated = len(weights) == 6
    ins, w2, b2 = weights[:-2], weights[-2], weights[-1]  # ins: (W1, b1) or (G, bg, W, bw)

    @torch.no_grad()
    def init(net: DLRNet) -> None:
        r, blocks, s = net.spec.rank, net.blocks, net.spec.readout
        if gated != (net.spec.form == "gated"):
            raise WeightlockError(f"a {'gated' if gated else 'plain'} MLP cannot start {net.spec.form} blocks")
        size = w2.norm(dim=0) * ins[0].norm(dim=1) * (ins[2].norm(dim=1) if gated else 1)
        order = size.argsort(descending=True)
        for l, b in enumerate(blocks):
            idx = order[l * r:(l + 1) * r]
            if idx.numel() < r:
                break  # more blocks than hidden units: the rest keep their default init
            maps = ((b.gate, ins[0], ins[1]), (b.down, ins[2], ins[3])) if gated else ((b.down, ins[0], ins[1]),)
            for m, w, bias in maps:
                m.weight.copy_(w[idx])
                if m.bias is not None:
                    m.bias.copy_(bias[idx])
            b.up.weight.copy_(w2[:, idx] / s)
            if b.up.bias is not None:
                b.up.bias.copy_(b2 / (len(blocks) * s))

    return init


def mlp_init(layer: nn.Module, adapter: ArchAdapter) -> Callable[[DLRNet], None]:
    """The structured start of ``layer``'s MLP (:func:`mlp_slice_init` of its gated or plain weights)."""
    return mlp_slice_init(gated_mlp_weights(layer, adapter) if adapter.gated else plain_mlp_weights(layer, adapter))


def fit_layer(x: torch.Tensor, y: torch.Tensor, spec: DLRSpec, cfg: LockConfig, desc: str = "layer",
              device: torch.device | str = "cpu", init: Callable[[DLRNet], None] | None = None,
              block: int | None = None,
              on_stage: Callable[[DLRNet, dict], None] | None = None) -> tuple[DLRNet, dict]:
    """Train a DLR-Net on (x, y) pairs (rows of ``block``-token blocks, split into train and held-out by
    block) with the normalised regression loss; with a sink, the sink is fitted first in closed form on the
    training rows and the blocks fit what it leaves. With ``cfg.anneal_to`` the read-out is lowered stage by
    stage (:func:`anneal_readouts`), each stage repaired by ``cfg.steps`` steps; ``on_stage(net, stage)`` is
    called after each. Returns the net and its stats."""
    split = holdout_split(x.shape[0], cfg.holdout, cfg.seed, block)
    sink_state, sink_stats = None, {}
    if spec.sink:
        probe = DLRNet(spec)
        sink_stats = fit_sink(probe.sink, x[split[1]].float(), y[split[1]].float(), cfg.outlier_factor)
        sink_state = {k: v.clone() for k, v in probe.sink.state_dict().items()}

    readouts = anneal_readouts(cfg.readout, cfg.anneal_to) if cfg.init == "mlp" else [spec.readout]
    xh, yh = x[split[0]].float(), y[split[0]].float()  # held-out rows: the read-back and final errors

    def make() -> DLRNet:
        net = DLRNet(replace(spec, readout=readouts[0]))
        if init is not None:
            init(net)
        if sink_state is not None:
            net.sink.load_state_dict(sink_state)
            net.sink.requires_grad_(False)  # fitted in closed form; the blocks fit the rest
        return net

    # init=mlp starts at the MLP with U/s: Adam's step (≈ lr per weight, whatever its scale) is divided by s too,
    # or the first steps would undo the start (MiniLM, s = 16: error 0.0011 after 300 steps). From a zero start
    # the read-out only shrinks the drift, and the full rate fits faster (SmolLM2 layer 5: 0.220 vs 0.270 at s=1)
    extra = readback_term(cfg) if cfg.readback_penalty > 0 else None
    fit = dict(steps=cfg.steps, batch_tokens=cfg.batch_tokens, seed=cfg.seed, holdout=cfg.holdout, device=device,
               progress=cfg.progress, loss=cfg.loss, grad_clip=cfg.grad_clip, split=split,
               outlier_factor=cfg.outlier_factor, extra_loss=extra, bf16=cfg.bf16)
    stages, net, stats = [], None, {}
    for s in readouts:
        prev = net
        start = make if prev is None else (lambda: rescaled(prev, s))  # noqa: B023 (called at once)
        lr = cfg.lr / s if cfg.init == "mlp" else cfg.lr
        net, stats = fit_module(start, x, y, lr=lr, desc=desc if s == spec.readout else f"{desc} s={s:g}", **fit)
        if cfg.anneal_to is not None:
            rb = error_stats(readback_net(net), xh, yh)
            stages.append({"readout": s, **{k: stats[k] for k in ("rel_error", "rel_error_tokens", "seconds")},
                           "readback_rel_error_tokens": rb["rel_error_tokens"]})
            if on_stage is not None:
                on_stage(net, stages[-1])
    if stages:
        stats["stages"] = stages
        stats["seconds"] = sum(st["seconds"] for st in stages)
    net.requires_grad_(True)
    if sink_stats.get("sink"):  # the sink takes what the blocks leave on the outliers; re-measure
        xt, yt = x[split[1]].float(), y[split[1]].float()
        with torch.no_grad():
            rest = torch.cat([yt[i:i + 8192] - net._forward_blocks(xt[i:i + 8192]) for i in range(0, len(xt), 8192)])
        fit_sink(net.sink, xt, yt, cfg.outlier_factor, target=rest)
        stats.update(error_stats(net, xh, yh, outlier_rows(yh, cfg.outlier_factor)))
    stats["readback"] = readback_stats(net, xh, yh, cfg.outlier_factor)
    stats["spec"] = asdict(spec)
    stats["sink"] = sink_stats
    return net, stats


def readback_stats(net: DLRNet, x: torch.Tensor, y: torch.Tensor, outlier_factor: float) -> dict:
    """What an attacker reads off ``net`` by laying its blocks side by side, against the MLP on held-out
    ``x``/``y``: the read-back's errors (:func:`error_stats`)."""
    rb = error_stats(readback_net(net), x, y, outlier_rows(y, outlier_factor))
    return {k: rb[k] for k in ("rel_error", "rel_error_tokens", "outlier_rel_error")}


def anneal_readouts(start: float, end: float | None) -> list[float]:
    """The read-outs of an annealed fit: ``start``, halved stage by stage down to ``end`` (the last stage is
    ``end`` itself); ``[start]`` without ``end``."""
    out = [start]
    while end is not None and out[-1] > end:
        out.append(max(out[-1] / 2, end))
    return out


@torch.no_grad()
def rescaled(net: DLRNet, readout: float) -> DLRNet:
    """A copy of ``net`` with read-out ``readout`` and every U (and up-bias) multiplied by the old read-out over
    the new: the same read-back, so the same function up to the residual state's drift (which grows by
    that factor)."""
    out = DLRNet(replace(net.spec, readout=readout))
    out.load_state_dict(net.state_dict())
    f = net.spec.readout / readout
    for b in out.blocks:
        b.up.weight.mul_(f)
        if b.up.bias is not None:
            b.up.bias.mul_(f)
    if net.spec.sink:
        out.sink.requires_grad_(net.sink.value.requires_grad)
    return out


def readback_term(cfg: LockConfig) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``λ·max(0, τ − loss(read-back(x), y))``: an extra distillation loss that pushes the net's read-back
    (:func:`readback_forward`) away from the MLP until its loss reaches τ."""
    def term(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        rb = distill_loss(readback_forward(net, xb), yb, cfg.loss)
        return cfg.readback_penalty * (cfg.readback_target - rb).clamp_min(0)

    return term


def holdout_split(n: int, holdout: float, seed: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out rows, training rows) of ``n`` rows: whole blocks of ``block`` consecutive rows (a captured
    block of text) go to one side, so held-out tokens never share a block with training tokens; without
    ``block`` (or fewer than 2 blocks), single rows."""
    g = torch.Generator().manual_seed(seed)
    if block and n // block >= 2 and n % block == 0:
        nb = n // block
        perm = torch.randperm(nb, generator=g)
        k = max(1, int(nb * holdout))
        rows = lambda ids: (ids[:, None] * block + torch.arange(block)).reshape(-1)  # noqa: E731
        return rows(perm[:k].sort().values), rows(perm[k:])
    perm = torch.randperm(n, generator=g)
    k = max(1, int(n * holdout))
    return perm[:k], perm[k:]


def distill_loss(out: torch.Tensor, y: torch.Tensor, kind: str = "energy") -> torch.Tensor:
    """``energy``: ‖out − y‖² / ‖y‖² over the batch. ``row``: the mean over tokens of ‖out_i − y_i‖² /
    (‖y_i‖² + median_j ‖y_j‖²) — every token's relative error counts alike, so the few tokens with massive
    activations that real LLMs produce (norm ~10⁴ at the attention sink) do not swamp the rest; the floor
    is the median, which they do not inflate (a mean floor would be set by them, and swing with how many
    a batch holds)."""
    if kind == "energy":
        return (out - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
    if kind == "row":
        e = y.pow(2).sum(-1)
        return ((out - y).pow(2).sum(-1) / (e + e.median()).clamp_min(1e-30)).mean()
    raise WeightlockError(f"unknown distillation loss {kind!r} (energy, row)")


def fit_module(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
               batch_tokens: int, seed: int = 0, holdout: float = 0.1, progress: bool = True,
               desc: str = "fit", device: torch.device | str = "cpu", loss: str = "energy",
               grad_clip: float = 0.0, split: tuple[torch.Tensor, torch.Tensor] | None = None,
               outlier_factor: float = 10.0,
               extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               until: Callable[[nn.Module], bool] | None = None, bf16: bool = False) -> tuple[nn.Module, dict]:
    """Fit ``make()`` (built after seeding) to map x → y with Adam and a warm-up + cosine schedule,
    minimising ``loss`` (see :func:`distill_loss`) plus ``extra_loss(net, x, y)`` if given, the gradient norm
    clipped to ``grad_clip`` (0: off);
    errors (:func:`error_stats`) are measured on a held-out ``holdout`` fraction of the rows, or on
    ``split = (held-out rows, training rows)`` (see :func:`holdout_split`). ``until(net)``: a stopping test
    (e.g. the net's error against some reference), checked before the first step and every ``GUARD_EVERY``
    steps; ``stats["reached_at_step"]`` says when it held (None: not within ``steps``). ``bf16``: the forward
    pass under bf16 autocast (matmuls in bf16; a DLR-Net's residual state stays fp32).

    Divergence guard: when the batch loss is not finite or exceeds ``GUARD_FACTOR`` × the best so far, the
    net goes back to its last healthy snapshot (taken every ``GUARD_EVERY`` steps while the loss is within
    2× its best), Adam's moments are reset and the learning rate halves from that step on; after
    ``GUARD_RESTARTS`` restarts training stops. A fit that restarted (or ends with non-finite weights)
    returns whichever of its final weights and the snapshot has the lower held-out error, never NaN;
    ``stats["restarts"]`` counts the restarts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    hold, train = split if split is not None else holdout_split(x.shape[0], holdout, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_hold = hold.numel()
    xh, yh = x[hold].float().to(device), y[hold].float().to(device)
    flags = outlier_rows(yh, outlier_factor)
    torch.manual_seed(seed)
    net = make().to(device)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))))
    err0 = relative_error(net, xh, yh)
    t0 = time.perf_counter()
    bs = min(batch_tokens, train.numel())
    good, best, restarts, stopped = _snapshot(net), math.inf, 0, None
    reached = 0 if until is not None and until(net) else None
    until_seconds = 0.0  # time spent in the stopping test inside the loop (part of ``seconds``)

    def restart() -> None:  # back to the snapshot, fresh Adam moments, half the rate from this step on
        net.load_state_dict(good)
        opt.state.clear()
        sched.base_lrs = [b / 2 for b in sched.base_lrs]
        for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)

    with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        for step in range(steps if reached is None else 0):
            if until is not None and step and step % GUARD_EVERY == 0:
                t_check = time.perf_counter()
                met = until(net)
                until_seconds += time.perf_counter() - t_check
                if met:
                    reached = step
                    break
            idx = train[torch.randint(0, train.numel(), (bs,), generator=g)]
            xb, yb = x[idx].float().to(device), y[idx].float().to(device)
            with torch.autocast(xb.device.type, torch.bfloat16, enabled=bf16):
                out = net(xb)
                value = distill_loss(out.float(), yb, loss)
                if extra_loss is not None:
                    value = value + extra_loss(net, xb, yb).float()
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
    held = error_stats(net, xh, yh, flags)
    if until is not None and reached is None and until(net):
        reached = steps
    stats = {"restarts": restarts, "stopped_at_step": stopped, "reached_at_step": reached,
             "rel_error_init": err0, "rel_error_train": relative_error(net, x[train[:n_hold]], y[train[:n_hold]]),
             **held, "tokens": x.shape[0], "held_out_tokens": n_hold, "steps": steps, "seconds": dt,
             "until_seconds": until_seconds,
             "tokens_per_s": next(n for n in (stopped, reached, steps) if n is not None) * bs / dt if dt > 0 else 0.0}
    return net.cpu() if str(device) != "cpu" else net, stats


GUARD_EVERY = 25  # steps between the divergence guard's snapshots
GUARD_RESTARTS = 5
GUARD_FACTOR = 1e3  # a batch loss this many times the best so far is divergence


def _snapshot(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---- the whole model ----------------------------------------------------------------------------

def distill_model(model: nn.Module, blocks: torch.Tensor, cfg: LockConfig, work: Path,
                  fit_together: Callable | None = None) -> tuple[nn.Module, list[dict]]:
    """Replace every MLP of ``model`` (in place) by a distilled DLR-Net; returns the model and per-layer stats.

    ``work`` keeps captured activations and finished layers, so an interrupted call resumes. With
    ``cfg.engine == "stacked"``, ``fit_together`` (:func:`weightlock.dlr.engine.fit_with_engine`, passed in by
    :func:`weightlock.dlr.lock.lock`, so this module does not import the engine that imports it) fits the
    layers still to do, together.
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

    locked = [k for k in range(len(layers)) if specs[k] is not None]
    if cfg.mode == "parallel":
        todo = [k for k in locked if not done(k)]
        if rank == 0 and todo and not all((work / f"capture_{k}.safetensors").exists() for k in todo):
            for k, (x, y) in capture(model, blocks, todo, progress=cfg.progress).items():
                with atomic_path(work / f"capture_{k}.safetensors") as tmp:
                    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(tmp))
        if dist:
            dist.barrier()
    if cfg.engine == "stacked":
        if fit_together is None:
            raise WeightlockError("--engine stacked: distill_model needs the engine's fit "
                                  "(fit_together=weightlock.dlr.engine.fit_with_engine)")
        fit_together(layers, adapter, specs, [k for k in locked if not done(k)], cfg, work, blocks.shape[1])
    for i, k in enumerate(locked):
        if i % world != rank or done(k):
            continue
        if cfg.mode == "sequential":  # inputs produced by the already-locked layers below k
            for j in locked[:i]:
                install_layer(layers[j], adapter, specs[j], work / f"layer_{j}.safetensors", device)
            x, y = capture(model, blocks, [k])[k]
        else:
            cap = load_file(str(work / f"capture_{k}.safetensors"))
            x, y = cap["x"], cap["y"]
        init = mlp_init(layers[k], adapter) if cfg.init == "mlp" else None
        net, stats = fit_layer(x, y, specs[k], cfg, desc=f"layer {k} ({i + 1}/{len(locked)})", device=device,
                               init=init, block=blocks.shape[1])
        stats["layer"], stats["process"] = k, rank
        with atomic_path(work / f"layer_{k}.safetensors") as tmp:
            save_file({n: p.detach().contiguous() for n, p in net.state_dict().items()}, str(tmp))
        write_json(work / f"layer_{k}.json", stats)
    if dist:
        dist.barrier()
    stats = [read_json(work / f"layer_{k}.json") for k in locked]
    check_layer_errors(stats, cfg.max_rel_error, work)
    for k in locked:
        install_layer(layers[k], adapter, specs[k], work / f"layer_{k}.safetensors", device)
    return model, stats


def check_layer_errors(stats: list[dict], max_rel_error: float | None, work: Path | None = None) -> None:
    """The quality gate: refuse layers whose held-out error (:func:`gate_error`) is above ``max_rel_error`` or
    not finite."""
    if max_rel_error is None:
        return
    bad = [(s.get("layer", k), gate_error(s)) for k, s in enumerate(stats)
           if not math.isfinite(gate_error(s)) or gate_error(s) > max_rel_error]
    if bad:
        layers = ", ".join(f"layer {k} ({e:.4g})" for k, e in bad)
        kept = f"; the fitted layers stay in {work} (other settings refit them with --restart)" if work else ""
        raise WeightlockError(
            f"held-out relative error above {max_rel_error:g} (1 = the net outputs nothing): {layers}. "
            "Distil longer or wider (--steps, --lr, --rank), or accept it with --max-rel-error N or none "
            f"(LockConfig.max_rel_error){kept}")


def gate_error(stats: dict) -> float:
    """The error the quality gate reads from a layer's stats: the token-weighted relative error (energy-
    weighted, one sink token would be all it measures) or, where the layer has outlier tokens, their
    squared relative error if that is worse; layers fitted before these were recorded: ``rel_error``."""
    if stats.get("rel_error_tokens") is None:
        return stats["rel_error"]
    out = stats.get("outlier_rel_error")
    return max(stats["rel_error_tokens"], out ** 2 if out is not None else 0.0)


def readback_model(model: nn.Module) -> nn.Module:
    """A copy of the locked ``model`` in which every DLR-Net is replaced by its read-back (:func:`readback_net`):
    the dense model an attacker gets by laying each net's blocks side by side."""
    import copy

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, DLRNet):
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, attr, readback_net(mod))
    return out


def install_layer(layer: nn.Module, adapter: ArchAdapter, spec: DLRSpec, path: Path, device) -> None:
    from safetensors.torch import load_file

    mod = get_path(layer, adapter.mlp)
    net = mod if isinstance(mod, DLRNet) else DLRNet(spec)
    net.load_state_dict(load_file(str(path)))
    if not isinstance(mod, DLRNet):
        replace_mlp(layer, adapter, net.to(device))


@torch.no_grad()
def fidelity_metrics(model: nn.Module, blocks: torch.Tensor, teacher_logp: list[torch.Tensor],
                     targets_nll: float, batch_size: int = 8) -> dict:
    """KL(original ‖ model) per token, top-1 agreement and perplexity ratio of ``model`` on ``blocks``, given
    the original's log-probabilities there (``teacher_logp``, one tensor per batch) and its mean NLL."""
    was = model.training
    model.eval()
    kl = agree = nll = 0.0
    count = 0
    for i, t in zip(range(0, blocks.shape[0], batch_size), teacher_logp):
        x = blocks[i:i + batch_size]
        s = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        t = t.float()
        kl += (t.exp() * (t - s)).sum().item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        nll -= s.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
    model.train(was)
    return {"kl": kl / count, "top1_agreement": agree / count,
            "ppl_ratio": math.exp(nll / count - targets_nll)}


@torch.no_grad()
def teacher_logprobs(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> tuple[list[torch.Tensor], float]:
    """The original's next-token log-probabilities on ``blocks`` (bf16, one tensor per batch of ``batch_size``)
    and its mean NLL there: what :func:`fidelity_metrics` compares a model with."""
    logp, nll, n = [], 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size]
        t = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        nll -= t.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
        logp.append(t.to(torch.bfloat16))
    return logp, nll / n


class FidelityHook(Hook):
    """Refinement bookkeeping: every ``every`` steps (and at the start) measure KL, top-1 agreement and the
    perplexity ratio on fixed held-out blocks, record them in the history, and stop the run once the KL
    is at or below ``target_kl``. Its records travel through checkpoints."""

    def __init__(self, original: nn.Module, blocks: torch.Tensor, every: int, target_kl: float | None) -> None:
        self.blocks, self.every, self.target_kl = blocks, every, target_kl
        self.teacher, self.nll = teacher_logprobs(original, blocks)
        self.records: list[dict] = []

    def measure(self, trainer) -> dict:
        m = {"step": trainer.step, "tokens": trainer.tokens_seen,
             **fidelity_metrics(trainer.raw_model, self.blocks, self.teacher, self.nll)}
        self.records.append(m)
        return m

    def on_train_start(self, trainer) -> None:
        if not self.records:
            self.measure(trainer)
        if self.target_kl is not None and self.records[-1]["kl"] <= self.target_kl:
            trainer.should_stop = True

    def on_step_end(self, trainer, metrics: dict) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.max_steps:
            m = self.measure(trainer)
            metrics.update({f"val_{k}": v for k, v in m.items() if k not in ("step", "tokens")})
            if self.target_kl is not None and m["kl"] <= self.target_kl:
                trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state: dict) -> None:
        self.records = list(state["records"])


def refine(locked: nn.Module, original: nn.Module, blocks: torch.Tensor, cfg: LockConfig,
           val: torch.Tensor | None = None, checkpoint_dir: Path | None = None) -> list[dict]:
    """End-to-end refinement: train only the DLR-Nets so the locked model's outputs match the original's:
    KL to its logits (language models), or the normalised squared error of the last hidden states (encoders).

    With ``val`` (held-out blocks, causal LMs) fidelity is measured every ``cfg.refine_eval_every`` steps and
    the run stops early at ``cfg.target_kl``; with ``checkpoint_dir`` a checkpoint is written every
    ``cfg.refine_checkpoint_every`` steps (and on Ctrl-C) and a rerun continues from it exactly. Returns the
    training history; with ``val`` its last entry carries the fidelity records (``"fidelity"``)."""
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

    tc = TrainConfig(max_steps=cfg.refine_steps, batch_size=min(cfg.refine_batch, blocks.shape[0]),
                     lr=cfg.refine_lr, warmup_steps=min(10, cfg.refine_steps), weight_decay=0.0, eval_every=10**9,
                     checkpoint_every=cfg.refine_checkpoint_every if checkpoint_dir else 0, seed=cfg.seed,
                     progress=cfg.progress)
    lm = val is not None and hasattr(locked, "lm_head")
    hooks = [FidelityHook(original, val, cfg.refine_eval_every, cfg.target_kl)] if lm else []
    trainer = Trainer(locked, blocks, tc, loss_fn=match_loss, hooks=hooks, checkpoint_dir=checkpoint_dir)
    history = trainer.fit(resume=checkpoint_dir is not None)
    if checkpoint_dir is not None:
        trainer.save_checkpoint()  # the finished state: a rerun of the lock skips the refinement
    for p in locked.parameters():
        p.requires_grad_(True)
    if history:
        import statistics

        history[-1] = {**history[-1], "median_step_time": statistics.median(h["step_time"] for h in history)}
    if hooks and history:
        history[-1] = {**history[-1], "fidelity": hooks[0].records}
    return history
