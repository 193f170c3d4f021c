"""``weightlock plan``: what DLR-Lock costs an attacker on a model too large to run here.

From a ``config.json`` alone (no weights) this predicts, for the original model and its DLR lock at rank
R, per fine-tuning step and for every attack / counter-measure of :data:`SCENARIOS`:

* **activation memory** — the bytes autograd saves for the backward pass. A linear model per component
  (embedding; first decoder layer; later decoder layers; MLP or DLR-Net; the rest: final norm, LM head
  and loss), in shape features (``N·d``, ``N·d_ff``, ``N·L·d``, ``N·L·r``, ``N·V``, ``T·head_dim``, ...;
  N tokens, b sequences of T), whose coefficients are *measured*: the probe builds 2-layer models of the
  real family (the config's own code, activation, biases, attention) at tiny widths, counts what autograd
  saves in each component during one training forward (``saved_tensors_hooks``, deduplicated by storage,
  parameters excluded, each storage charged to the first component that saves it) and solves for the
  coefficients (least squares; the fit must be exact). With gradient checkpointing the hooks see what is
  kept between checkpoints (torch's checkpoint saves each unit's input through autograd); the peak adds
  one unit's activations, recomputed inside the backward pass.
* **parameters, gradients, optimizer state** — from a skeleton of the model on the meta device (the
  attack's trainable set, LoRA adapters included): parameters and gradients in the activation dtype,
  AdamW's two fp32 moments per trainable parameter.
* **FLOPs** — per matmul, from the same skeleton run on the meta device (shapes only, nothing computed):
  2·N·in·out forward per linear map, as much again for the input gradient when the input needs one and
  for the weight gradient when the weight trains; attention 4·b·T²·h·head_dim forward and twice that
  backward (as torch's FLOP counter counts it); a checkpointed unit's forward twice.
* **time** — every aten operation of one training step (forward + backward, recomputation included),
  traced at full size on the meta device, priced by replaying it on this machine (:class:`Pricer`): each
  distinct signature (op, operand shapes, strides, dtypes, arguments) runs on fresh real operands laid out
  like the traced ones (transposed weights, expanded tensors), rotated over copies so they come cold from
  memory as in a step; the smaller median of two passes; ops too large to replay run shrunk along a
  dimension their time scales with. Views cost a call; every op also pays a per-op framework cost (autograd
  and module calls) measured by :func:`calibrate` on a stack of tiny blocks. Priced in the steady state
  of an allocator that keeps freed memory (:func:`keep_freed_memory`): glibc's default gives it back and
  a locked model's many activations are then faulted in again every step, an extra cost not modelled.
  Pricing bare calls by a few throughput tables (the first version) missed op-specific kernels (GELU,
  log-softmax), cold operands and the calibration's own noise: it predicted locked steps 33–49% short.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import WeightlockError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LORA_R = 8
SCENARIOS = {
    "full": "full fine-tuning",
    "lora-attn": f"LoRA r={LORA_R} on attention",
    "lora-all": f"LoRA r={LORA_R} on every linear layer",
    "freeze-ffn": "MLPs / DLR-Nets frozen, the rest trained",
    "ckpt-layer": "full fine-tuning, gradient checkpointing per layer",
    "ckpt-dlr": "full fine-tuning, gradient checkpointing per DLR-Net",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


# ---- the model's config ---------------------------------------------------------------------------

def shipped_configs() -> list[str]:
    """The names of the configs weightlock ships (``weightlock/configs/NAME.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(spec: str | Path):
    """A transformers config from a shipped name (``smollm2-135m``), a ``config.json`` path or a model
    directory holding one."""
    from transformers import AutoConfig

    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    elif not p.exists() and (CONFIG_DIR / f"{spec}.json").exists():
        p = CONFIG_DIR / f"{spec}.json"
    if not p.exists():
        raise WeightlockError(f"no config at {spec!r}: give a config.json, a model directory or one of "
                              f"{', '.join(shipped_configs())}")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightlockError(f"{p}: not a readable config.json ({e})") from None
    mt = d.get("model_type")
    try:
        cfg = AutoConfig.for_model(mt, **{k: v for k, v in d.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError) as e:
        raise WeightlockError(f"{p}: model type {mt!r} is not a transformers model type ({e})") from None
    _check_family(cfg)
    return cfg


def _check_family(cfg) -> None:
    from ..dlr.modeling_weightlock_dlr import ADAPTERS

    mt = cfg.model_type
    if mt not in ADAPTERS:
        fams = ", ".join(sorted({a.family for a in ADAPTERS.values()}))
        raise WeightlockError(f"model type {mt!r} is not supported by DLR-Lock (supported: {fams})")
    missing = [f for f in _SHAPE_FIELDS if getattr(cfg, f, None) is None]
    if missing or ADAPTERS[mt].layers != ("model.layers",):
        raise WeightlockError(f"plan covers decoder families with Llama-style configs (model.layers, "
                              f"{', '.join(_SHAPE_FIELDS)}); {mt!r} lacks {missing or 'that layout'}")


def _with_shape(cfg, **shape):
    """A copy of ``cfg`` with other widths / depth (per-layer lists such as ``layer_types`` regenerated)."""
    from transformers import AutoConfig

    d = cfg.to_dict()
    for k in ("layer_types", "architectures", "auto_map", "_name_or_path", "transformers_version", "dtype",
              "torch_dtype"):
        d.pop(k, None)
    d.update(shape)
    d["max_position_embeddings"] = max(d.get("max_position_embeddings") or 0, 64)
    out = AutoConfig.for_model(d.pop("model_type"), **d)
    out._attn_implementation = "sdpa"
    return out


@dataclass
class Shape:
    """The dimensions the cost model reads (``hd``: head dim; ``L``/``r``: DLR depth and rank, 0 unlocked)."""

    d: int
    d_ff: int
    h: int
    kvh: int
    hd: int
    V: int
    layers: int
    L: int = 0
    r: int = 0

    @classmethod
    def of(cls, cfg, L: int = 0, r: int = 0) -> "Shape":
        h = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        return cls(cfg.hidden_size, cfg.intermediate_size, h, getattr(cfg, "num_key_value_heads", None) or h,
                   hd, cfg.vocab_size, cfg.num_hidden_layers, L, r)


# ---- skeletons on the meta device and the attacks' trainable sets --------------------------------

def skeleton(cfg, rank: int | None = None, device: str = "meta"):
    """The model of ``cfg`` (on ``device``; meta: no memory, nothing computed) and, with ``rank``, its DLR
    lock with depths matched to the MLPs (``specs_for``, without the sink component; a rank that cannot
    match raises). Returns (model, specs or None)."""
    from transformers import AutoModelForCausalLM

    from ..dlr.distill import LockConfig, specs_for
    from ..dlr.modeling_weightlock_dlr import apply_dlr

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
        specs = None
        if rank is not None:
            # the DLR blocks only: a release's sink component (3d + 2 parameters; it saves about d + 3 values a
            # token, under 1% of a net's d + 2r per block × L blocks) is not in the planner's memory model
            _, specs, _ = specs_for(model, LockConfig(rank=rank, sink=False))
            apply_dlr(model, [s.__dict__ for s in specs])
    model.train()
    return model, specs


def prepare(model: nn.Module, scenario: str) -> nn.Module:
    """Make ``model`` what the attack / counter-measure trains (in place)."""
    from ..dlr.modeling_weightlock_dlr import DLRNet, adapter_for, find_layers, mlp_modules
    from ..models.layout import attention_names
    from ..train.finetune import apply_checkpointing

    if scenario not in SCENARIOS:
        raise WeightlockError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if scenario.startswith("lora"):
        from peft import LoraConfig, inject_adapter_in_model

        targets = attention_names(model) if scenario == "lora-attn" else "all-linear"
        inject_adapter_in_model(LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets,
                                           lora_dropout=0.0), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif scenario == "freeze-ffn":
        adapter = adapter_for(model)
        for layer in find_layers(model, adapter):
            for m in mlp_modules(layer, adapter):
                m.requires_grad_(False)
    elif scenario == "ckpt-layer":
        apply_checkpointing(model, "layer")
    elif scenario == "ckpt-dlr":
        if not any(isinstance(m, DLRNet) for m in model.modules()):
            raise WeightlockError("checkpointing per DLR-Net needs a locked model")
        apply_checkpointing(model, "dlr")
    return model


def scenarios_for(locked: bool) -> list[str]:
    """The scenarios that apply to a locked or an unlocked model (``ckpt-dlr`` needs DLR-Nets)."""
    return [s for s in SCENARIOS if locked or s != "ckpt-dlr"]


# ---- activation memory: the probe and its linear model -------------------------------------------

COMPONENTS = ("embed", "layer0", "ffn0", "layer", "ffn", "rest")


def features(comp: str, s: Shape, b: int, T: int) -> list[float]:
    """Shape features of one component (coefficients: saved bytes per unit of each)."""
    N = b * T
    if comp == "embed":
        return [N, b, 1]
    if comp in ("layer0", "layer"):
        return [N * s.d, N * s.h * s.hd, N * s.kvh * s.hd, N * s.h, N * s.kvh, N, N * s.h * T, T * s.hd, T, b, 1]
    if comp in ("ffn0", "ffn"):
        if s.L:
            return [N * s.L * s.d, N * s.L * s.r, N * s.L, N * s.d, N, 1]
        return [N * s.d, N * s.d_ff, N, 1]
    # b == 1: the shifted labels are a slice of the padded ones, already contiguous, so the loss keeps
    # the padded storage (one label more) instead of a contiguous copy
    return [N * s.d, N * s.V, N, T, b, 1, float(b == 1)]


def _component_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers, get_path

    adapter = adapter_for(model)
    out = [(model.get_input_embeddings(), "embed")]
    for i, layer in enumerate(find_layers(model, adapter)):
        out.append((layer, "layer0" if i == 0 else "layer"))
        out.append((get_path(layer, adapter.mlp), "ffn0" if i == 0 else "ffn"))
    return out


def attributed_saved_bytes(model: nn.Module, input_ids: torch.Tensor) -> dict[str, int]:
    """Bytes autograd saves during one training forward (with the loss), per component: each storage is
    counted once, charged to the innermost component running when it was first saved (parameters
    excluded). Only for real (non-meta) tensors."""
    stack: list[str] = ["rest"]
    handles = []
    for mod, name in _component_modules(model):
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: stack.append(name) and None))
        handles.append(mod.register_forward_hook(lambda m, a, o: stack.pop() and None, always_call=True))
    skip = {(p.untyped_storage().data_ptr(), str(p.device)) for p in model.parameters()}
    seen: set = set()
    out = dict.fromkeys(COMPONENTS, 0)

    def pack(t):
        st = t.untyped_storage()
        key = (st.data_ptr(), str(t.device))
        if key not in skip and key not in seen:
            seen.add(key)
            out[stack[-1]] += st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    finally:
        for h in handles:
            h.remove()
    del loss
    return out


_GRID = {"d": (16, 24, 32), "h": (2, 4), "kvh": (1, 2), "hd": (4, 8), "d_ff": (24, 40, 56), "V": (40, 72),
         "b": (1, 2, 3), "T": (4, 6, 8), "L": (2, 3), "r": (2, 4, 6)}


def _probe_shapes(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: int(rng.choice(v)) for k, v in _GRID.items()} for _ in range(n)]


@dataclass
class MemoryModel:
    """Fitted saved-bytes coefficients per component, for one family, kind, scenario and dtype."""

    coef: dict
    rows: dict  # probe feature rows per component (for the span check)
    probes: int
    max_residual: float

    def component(self, comp: str, s: Shape, b: int, T: int) -> float:
        x = np.asarray(features(comp, s, b, T), dtype=np.float64)
        A = self.rows[comp]
        if np.linalg.norm(A) and np.linalg.norm(x - x @ np.linalg.pinv(A) @ A) > 1e-6 * max(np.linalg.norm(x), 1):
            raise WeightlockError(f"the memory model cannot extrapolate component {comp!r} to this shape "
                                  "(outside the probed feature space)")
        return float(x @ self.coef[comp])


_MEMORY_CACHE: dict = {}


def fit_memory_model(cfg, locked: bool, scenario: str, dtype: torch.dtype = torch.float32,
                     probes: int = 20) -> MemoryModel:
    """Probe 2-layer models of ``cfg``'s family at tiny widths (``probes`` random shapes) and fit the
    saved bytes of every component, exactly."""
    key = (cfg.model_type, json.dumps(cfg.to_dict(), sort_keys=True, default=str), locked, scenario, str(dtype),
           probes)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    from ..dlr.modeling_weightlock_dlr import apply_dlr

    X = {c: [] for c in COMPONENTS}
    Y = {c: [] for c in COMPONENTS}
    for p in _probe_shapes(probes):
        shape = {"hidden_size": p["d"], "intermediate_size": p["d_ff"], "num_attention_heads": p["h"],
                 "num_key_value_heads": p["kvh"], "vocab_size": p["V"], "num_hidden_layers": 2}
        if getattr(cfg, "head_dim", None) is not None:
            shape["head_dim"] = p["hd"]
        else:  # the family derives head_dim = d / h
            shape["hidden_size"] = p["h"] * p["hd"]
        tiny = _with_shape(cfg, **shape)
        s = Shape.of(tiny, p["L"] if locked else 0, p["r"] if locked else 0)
        torch.manual_seed(0)
        model = _build_real(tiny, dtype)
        if locked:
            apply_dlr(model, [dict(width=s.d, rank=s.r, depth=s.L)] * 2)
        prepare(model, scenario).train()
        ids = torch.randint(0, s.V, (p["b"], p["T"]))
        got = attributed_saved_bytes(model, ids)
        for c in COMPONENTS:
            X[c].append(features(c, s, p["b"], p["T"]))
            Y[c].append(got[c])
    coef, rows, worst = {}, {}, 0.0
    for c in COMPONENTS:
        A, y = np.asarray(X[c], dtype=np.float64), np.asarray(Y[c], dtype=np.float64)
        sol = np.linalg.lstsq(A, y, rcond=None)[0]
        if np.all(np.abs(sol - np.round(sol)) < 1e-6):
            sol = np.round(sol)
        worst = max(worst, float(np.max(np.abs(A @ sol - y))))
        coef[c], rows[c] = sol, A
    if worst > 0.5:
        raise WeightlockError(f"{cfg.model_type}: saved activations are not linear in the model's shape "
                              f"(probe residual {worst:.1f} bytes); the planner cannot model this family")
    mm = MemoryModel(coef, rows, probes, worst)
    _MEMORY_CACHE[key] = mm
    return mm


def _build_real(cfg, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype)


def predict_memory(cfg, shape: Shape, scenario: str, b: int, T: int, dtype=torch.float32) -> dict:
    """Predicted saved-for-backward bytes of one step of ``b`` × ``T`` tokens: ``saved_bytes`` (what is
    held between forward and backward; with checkpointing, torch's checkpoint saves each unit's input
    through autograd, so the probe sees it) and ``peak_activation_bytes`` (plus, with checkpointing, one
    unit's activations recomputed inside the backward pass)."""
    locked = shape.L > 0
    mm = fit_memory_model(cfg, locked, scenario, dtype)
    comp = {c: mm.component(c, shape, b, T) for c in COMPONENTS}
    n = shape.layers
    hooks = comp["embed"] + comp["layer0"] + comp["ffn0"] + (n - 1) * (comp["layer"] + comp["ffn"]) + comp["rest"]
    unit = 0.0
    if scenario.startswith("ckpt"):  # the hooks see the checkpointed units' inputs (saved by torch's checkpoint)
        full = fit_memory_model(cfg, locked, "full", dtype)
        if scenario == "ckpt-layer":
            unit = full.component("layer", shape, b, T) + full.component("ffn", shape, b, T)
        else:
            unit = full.component("ffn", shape, b, T)
    return {"saved_bytes": int(round(hooks)), "recompute_bytes": int(round(unit)),
            "peak_activation_bytes": int(round(hooks + unit)),
            "components": {c: int(round(v)) for c, v in comp.items()}}


# ---- parameters, FLOPs and the op trace on the meta device ---------------------------------------

def state_bytes(model: nn.Module, dtype: torch.dtype) -> dict:
    """Parameters (all, in ``dtype``), gradients (trainable, in ``dtype``), AdamW state (2 fp32 per trainable)."""
    size = torch.finfo(dtype).bits // 8
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable, "param_bytes": total * size,
            "grad_bytes": trainable * size, "optimizer_bytes": trainable * 8}


def _attn_modules(model):
    from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers

    return [layer.self_attn for layer in find_layers(model, adapter_for(model)) if hasattr(layer, "self_attn")]


def analytic_flops(model: nn.Module, b: int, T: int, scenario: str) -> dict:
    """FLOPs of one training step, per matmul: the model runs once on the meta device with hooks that
    read each linear map's shape, whether its weight trains and whether its input needs a gradient."""
    from ..dlr.modeling_weightlock_dlr import DLRNet

    lin = {"forward": 0, "input_grad": 0, "weight_grad": 0, "recompute": 0}
    ckpt = set()
    if scenario == "ckpt-layer":
        from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers

        ckpt = {id(m) for layer in find_layers(model, adapter_for(model)) for m in layer.modules()}
    elif scenario == "ckpt-dlr":
        ckpt = {id(m) for net in model.modules() if isinstance(net, DLRNet) for m in net.modules()}
    handles = []
    attn_bwd = []

    def on_linear(m, args):
        x = args[0]
        f = 2 * x.numel() // x.shape[-1] * m.in_features * m.out_features
        lin["forward"] += f
        if x.requires_grad:
            lin["input_grad"] += f
        if m.weight.requires_grad:
            lin["weight_grad"] += f
        if id(m) in ckpt and (x.requires_grad or m.weight.requires_grad):
            lin["recompute"] += f

    def on_attn(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        attn_bwd.append(x.requires_grad or any(p.requires_grad for p in m.parameters()))

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(on_linear))
    for m in _attn_modules(model):
        handles.append(m.register_forward_pre_hook(on_attn, with_kwargs=True))
    dev = next(model.parameters()).device
    try:
        with _meta_safe():
            model(input_ids=torch.zeros(b, T, dtype=torch.long, device=dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    c = model.config
    h = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // h
    attn_fwd = 4 * b * T * T * h * hd
    attn = {"forward": attn_fwd * len(attn_bwd), "backward": 2 * attn_fwd * sum(attn_bwd),
            "recompute": attn_fwd * len(attn_bwd) if scenario == "ckpt-layer" else 0}
    total = sum(lin.values()) + sum(attn.values())
    return {"flops": total, "linear": lin, "attention": attn}


def _meta_safe():
    """transformers checks training inputs for packed sequences with ``.item()``, impossible on the meta
    device: the planner's inputs are never packed."""
    from unittest import mock

    return mock.patch("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)


_VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
             "alias", "detach", "permute", "as_strided", "split", "split_with_sizes", "unbind", "_reshape_alias",
             "lift_fresh", "lift_fresh_copy", "reshape", "chunk", "narrow", "diagonal", "unfold"}
_MM_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def _op_trace():
    """A dispatch mode that records every aten op: (kind, cost quantity, dims, dtype, signature). Kinds:
    ``mm`` (FLOPs, (m, k, n)), ``sdpa`` / ``sdpa_bwd`` (b·h·Tq·Tk·head_dim), ``elementwise`` (everything
    else that computes: bytes read and written), ``view`` (aliases: no kernel, only the call). The
    signature (the op and its arguments, tensors as meta tensors) is what :class:`Pricer` replays."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func._schema.name.split("::")[-1]
            sig = (func, args, kwargs)
            if name in _MM_OPS:
                a, bm = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
                batch = a.shape[0] if a.dim() == 3 else 1
                m, k, n = a.shape[-2], a.shape[-1], bm.shape[-1]
                self.ops.append(("mm", 2 * batch * m * k * n, (m, k, n), a.dtype, sig))
            elif "scaled_dot_product" in name:
                q = args[1] if name.endswith("backward") else args[0]
                bq, hq, tq, dq = q.shape
                tk = args[2].shape[2] if name.endswith("backward") else args[1].shape[2]
                self.ops.append(("sdpa_bwd" if name.endswith("backward") else "sdpa", bq * hq * tq * tk * dq,
                                 None, q.dtype, sig))
            else:
                rets = func._schema.returns
                if name in _VIEW_OPS or (rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write):
                    self.ops.append(("view", 0, None, None, None))
                    return out
                nbytes = sum(x.numel() * x.element_size() for x in _flat([args, out]) if isinstance(x, torch.Tensor))
                self.ops.append(("elementwise", nbytes, None, None, sig))
            return out

    return Trace()


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


def _sdpa_as_cpu_flash():
    """On the meta device torch runs attention as its math path (T² score matrices); make every
    ``scaled_dot_product_attention`` call the CPU flash kernel instead (what training on CPU runs). A
    patch of the function rather than a mode: checkpointing recomputes in the backward pass, where a
    thread-local mode may not be active."""
    from unittest import mock

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        causal = is_causal or (attn_mask is None and q.shape[2] > 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[0]

    return mock.patch("torch.nn.functional.scaled_dot_product_attention", flash)


def trace_step(model: nn.Module, b: int, T: int) -> list:
    """Every aten op of one training step (forward, loss, backward) of the meta ``model``."""
    ids = torch.zeros(b, T, dtype=torch.long, device="meta")
    tr = _op_trace()
    with _meta_safe(), _sdpa_as_cpu_flash(), tr:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return tr.ops


# ---- pricing: every op replayed on this machine ---------------------------------------------------

ELEM_SIZES = (2 ** 14, 2 ** 17, 2 ** 20, 2 ** 23)
REPLAY_BYTES = 256 * 2 ** 20  # larger ops are replayed shrunk (along their leading dims) and scaled up
REPLAY_FLOPS = 4e8  # larger matmuls are replayed with their widest dimension shrunk and scaled up
COLD_BYTES = 64 * 2 ** 20  # operands rotated over copies of at least this many bytes in all (at most 8)


def _fingerprint(device: str, dtype: torch.dtype) -> str:
    from ..io import machine_info

    mi = machine_info()
    parts = [device, str(dtype), torch.__version__, str(torch.get_num_threads()),
             str(mi.get("cpu") or mi.get("processor")), str(mi.get("cuda_device"))]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def keep_freed_memory() -> bool:
    """Make this process's allocator (glibc malloc, Linux) keep the memory it frees instead of returning it
    to the system (no mmap'd chunks, no trimming): a training step then reuses its previous step's pages,
    as under PyTorch's caching allocator on GPU, instead of faulting them in anew (the kernel zeroes every
    page: ~0.3 ns per byte here, paid on whatever glibc's heuristics gave back). The plan prices steps in
    that steady state; its replays and ``bench/plan_validation.py`` run under it. Returns whether it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-4, 0)  # M_MMAP_MAX: never mmap
        return bool(ok and libc.mallopt(-1, 2 ** 31 - 1))  # M_TRIM_THRESHOLD: never trim
    except (OSError, AttributeError):
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` (the median, not the minimum: a training step's ops do not all run at
    the best case, and this machine may be shared)."""
    fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _tensor_bytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _flat(x) if isinstance(t, torch.Tensor))


def _sig_key(sig) -> str:
    """A replay signature's identity: the op, every tensor's shape, strides and dtype, the other arguments."""
    func, args, kwargs = sig

    def show(x):
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{tuple(x.stride())}{x.storage_offset()}{str(x.dtype)[6:]}"
        if isinstance(x, (list, tuple)):
            return "[" + ",".join(show(y) for y in x) + "]"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}={show(v)}" for k, v in sorted(x.items())) + "}"
        if isinstance(x, torch.device):
            return "dev"
        return repr(x)

    return f"{func._schema.name}({show(args)};{show(kwargs)})"


def _materialize(x, dev: torch.device, shape=None):
    """A real tensor laid out like the meta tensor ``x`` (same strides, expanded and transposed operands
    included; ``shape`` overrides the sizes, strides then follow ``x``'s dimension order): random normal
    values for floating point, zeros (valid indices, no ignored labels) otherwise. Other arguments pass
    through, devices become ``dev``."""
    if isinstance(x, torch.device):
        return dev
    if isinstance(x, (list, tuple)):
        return type(x)(_materialize(y, dev) for y in x)
    if isinstance(x, dict):
        return {k: _materialize(v, dev) for k, v in x.items()}
    if not isinstance(x, torch.Tensor):
        return x
    shape = tuple(x.shape) if shape is None else tuple(shape)
    stride = list(x.stride())
    if shape != tuple(x.shape):  # recompute strides in x's dimension order (stride 0 stays 0: expanded)
        order = sorted(range(x.dim()), key=lambda i: (x.stride(i), x.shape[i]))
        acc = 1
        for i in order:
            if x.stride(i) != 0:
                stride[i] = acc
                acc *= shape[i]
            else:
                stride[i] = 0
    n = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    buf = torch.empty(max(n, 1), dtype=x.dtype, device=dev)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        buf.normal_()
    else:
        buf.zero_()
    return buf.as_strided(shape, stride)


def _shrunk(sig, budget: float, kind: str):
    """``sig`` made small enough to replay (total tensor bytes ≤ ``budget``, or FLOPs for matmuls), and
    the factor its time scales by: a matmul loses from its widest dimension, any other op from its
    leading dimensions (b, then h or T: attention, rows of elementwise ops), every tensor that has that
    size there alike. Returns (args, kwargs, scale) of meta templates, or None when the op does not shrink
    that way."""
    func, args, kwargs = sig
    tensors = [t for t in _flat([args, kwargs]) if isinstance(t, torch.Tensor)]
    if kind == "mm" and func._schema.name.split("::")[-1] in ("mm", "addmm"):
        a, bm = (args[1], args[2]) if len(args) > 2 else (args[0], args[1])
        m, k, n = a.shape[0], a.shape[1], bm.shape[1]
        flops = 2 * m * k * n
        new = {"m": m, "k": k, "n": n}
        while 2 * new["m"] * new["k"] * new["n"] > budget:
            widest = max(new, key=new.get)
            if new[widest] <= 64:
                break
            new[widest] = max(64, int(new[widest] * budget / (2 * new["m"] * new["k"] * new["n"])))
        shapes = {id(a): (new["m"], new["k"]), id(bm): (new["k"], new["n"])}
        if len(args) > 2:  # addmm's bias: [n] or [m, n]
            bias = args[0]
            shapes[id(bias)] = (new["n"],) if bias.dim() == 1 else (new["m"], new["n"])
        new_args = tuple(_Resized(t, shapes[id(t)]) if isinstance(t, torch.Tensor) and id(t) in shapes else t
                         for t in args)
        return new_args, kwargs, flops / (2 * new["m"] * new["k"] * new["n"])
    total = _tensor_bytes(tensors)
    scale, sizes = 1.0, {id(t): list(t.shape) for t in tensors}
    for dim in (0, 1):
        if total / scale <= budget:
            break
        D = max((t.shape[dim] for t in tensors if t.dim() > dim), default=1)
        if D <= 1:
            continue
        D2 = max(1, int(D * budget * scale / total))
        if D2 >= D:
            continue
        for t in tensors:
            if t.dim() > dim and t.shape[dim] == D:
                sizes[id(t)][dim] = D2
        scale *= D / D2
    if scale == 1.0:
        return None

    def sub(x):
        if isinstance(x, torch.Tensor):
            return _Resized(x, sizes[id(x)])
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        return x

    return sub(args), sub(kwargs), scale


class _Resized:
    """A meta tensor to materialize with other sizes (see :func:`_materialize`)."""

    def __init__(self, t: torch.Tensor, shape):
        self.t, self.shape = t, tuple(shape)


def _build(x, dev):
    if isinstance(x, _Resized):
        return _materialize(x.t, dev, x.shape)
    if isinstance(x, (list, tuple)):
        return type(x)(_build(y, dev) for y in x)
    if isinstance(x, dict):
        return {k: _build(v, dev) for k, v in x.items()}
    return _materialize(x, dev)


def replay_seconds(func, args, kwargs, device: str = "cpu", target_s: float = 0.02) -> float:
    """Median seconds of one call of ``func`` on fresh real operands laid out like the meta templates
    ``args`` / ``kwargs``. The operands rotate over copies (``COLD_BYTES`` in all, at most 8) so that, as
    in a training step where an op reads what another op wrote long before, they do not stay in cache."""
    dev = torch.device(device)
    nbytes = max(1, sum(_materialize_bytes(x) for x in _flat([args, kwargs])))
    copies = max(1, min(8, COLD_BYTES // nbytes))
    sets = [(_build(args, dev), _build(kwargs, dev)) for _ in range(copies)]
    t0 = time.perf_counter()
    func(*sets[0][0], **sets[0][1])
    _sync(device)
    first = time.perf_counter() - t0
    reps = max(5, min(40, int(target_s / max(first, 1e-7))))
    ts = []
    for i in range(reps):
        a, k = sets[(i + 1) % copies]
        t0 = time.perf_counter()
        func(*a, **k)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _materialize_bytes(x) -> int:
    if isinstance(x, _Resized):
        return math.prod(x.shape) * x.t.element_size()
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0


class Pricer:
    """Seconds of traced ops on this machine: every distinct op signature (op, operand shapes, strides,
    dtypes, arguments) is replayed once on real operands (:func:`replay_seconds`; shrunk and scaled
    above ``REPLAY_BYTES`` / ``REPLAY_FLOPS``) and cached on disk with the calibration; views cost only a
    call. Every op, views included, also pays the calibration's per-op framework cost (autograd's graph
    and engine, module calls) that a bare call does not show."""

    def __init__(self, cal: dict, device: str = "cpu", cache_path: Path | None = None):
        self.cal, self.device, self.path = cal, device, cache_path
        self.progress = False  # a progress bar on stderr while replaying (the CLI turns it on)
        self.seconds: dict[str, float] = {}
        if cache_path is not None and cache_path.exists():
            try:
                self.seconds = json.loads(cache_path.read_text())
            except (OSError, json.JSONDecodeError):
                self.seconds = {}
        self.dirty = False

    def op(self, op) -> float:
        kind, q, _, _, sig = op
        if kind == "view":
            return self.cal["view_s"]
        key = _sig_key(sig)
        if key not in self.seconds:
            self.seconds[key] = self._measure(kind, q, sig)
            self.dirty = True
        return self.seconds[key]

    def measure_all(self, ops: list, passes: int = 2) -> None:
        """Replay every signature of ``ops`` not yet priced, in ``passes`` separate passes over them all,
        keeping each one's smallest median: on a shared machine a burst of load then cannot stick to
        one op."""
        todo = {}
        for op in ops:
            if op[0] != "view":
                key = _sig_key(op[4])
                if key not in self.seconds:
                    todo[key] = op
        if not todo:
            return
        if self.device == "cpu":
            keep_freed_memory()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        best = {k: math.inf for k in todo}
        saved_at = time.perf_counter()
        with Progress(TextColumn("[bold]timing operations"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True, disable=not self.progress) as bar:
            task = bar.add_task("replay", total=passes * len(todo))
            for p in range(passes):
                for k, (kind, q, _, _, sig) in todo.items():
                    best[k] = min(best[k], self._measure(kind, q, sig))
                    if p == 0:  # cached as soon as measured once: an interrupted run keeps what it priced
                        self.seconds[k] = best[k]
                        self.dirty = True
                    bar.advance(task)
                    if time.perf_counter() - saved_at > 10:
                        self.save()
                        saved_at = time.perf_counter()
        self.seconds.update(best)
        self.dirty = True
        self.save()

    def _measure(self, kind: str, q: float, sig) -> float:
        func, args, kwargs = sig
        budget = REPLAY_FLOPS if kind == "mm" else REPLAY_BYTES
        big = (q if kind == "mm" else _tensor_bytes([args, kwargs])) > budget
        try:
            if not big:
                return replay_seconds(func, args, kwargs, self.device)
            small = _shrunk(sig, budget, kind)
            if small is not None:
                a, k, scale = small
                return scale * replay_seconds(func, a, k, self.device)
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass
        if kind == "mm":  # not replayable: the calibration's wide-matmul rate
            return q / self.cal["matmul_flops_per_s"]
        return _bandwidth_seconds(_tensor_bytes([args, kwargs]), self.cal)

    def save(self) -> None:
        if self.dirty and self.path is not None:
            from ..io import write_json

            write_json(self.path, self.seconds)
            self.dirty = False


def _bandwidth_seconds(nbytes: float, cal: dict) -> float:
    """Seconds to stream ``nbytes`` through an elementwise op (cold operands, fresh output)."""
    sizes = sorted((float(k), v) for k, v in cal["elementwise_seconds_by_bytes"].items())
    if nbytes <= sizes[0][0]:
        return max(cal["view_s"], sizes[0][1] * nbytes / sizes[0][0])
    for (x0, y0), (x1, y1) in zip(sizes, sizes[1:]):
        if nbytes <= x1:
            w = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return nbytes / math.exp((1 - w) * math.log(x0 / y0) + w * math.log(x1 / y1))
    return nbytes * sizes[-1][1] / sizes[-1][0]


def _probe_model(width: int = 16, depth: int = 24):
    """The framework-overhead probe: a stack of tiny residual blocks (norm, two linear maps, activation),
    every kernel negligible, so a training step's time is almost all per-op cost."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(width)
            self.a = nn.Linear(width, width, bias=False)
            self.b = nn.Linear(width, width, bias=False)

        def forward(self, x):
            return x + self.b(nn.functional.gelu(self.a(self.norm(x))))

    return nn.Sequential(*(Block() for _ in range(depth)))


def _probe_trace(model: nn.Module, x: torch.Tensor) -> list:
    tr = _op_trace()
    with tr:
        model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return tr.ops


def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, remeasure: bool = False,
              repeats: int = 5) -> dict:
    """What pricing needs besides op replays, cached in the weightlock cache dir per machine, device,
    dtype, torch version and thread count (``remeasure`` re-runs it and drops the cached op replays):
    a wide matmul's rate and elementwise bandwidth (cold operands) at a few sizes, the fallbacks for ops
    that cannot be replayed; the cost of a view call; the framework's cost per op in a training step
    beyond the op's own call: one step of a stack of tiny residual blocks (kernels negligible) minus its
    ops' replays, over its op count."""
    from ..io import cache_dir, read_json, write_json

    fp = _fingerprint(device, dtype)
    path = cache_dir() / f"plan_calibration_{fp}.json"
    replays = cache_dir() / f"plan_replays_{fp}.json"
    if path.exists() and not remeasure:
        cal = read_json(path)
        if "framework_s_per_op" in cal:
            return cal
    if replays.exists():
        replays.unlink()
    if device == "cpu":
        keep_freed_memory()
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    n = 1024
    pairs = [(rnd(n, n), rnd(n, n)) for _ in range(4)]
    it = iter(range(10 ** 9))
    mm_rate = 2 * n ** 3 / _time(lambda: torch.mm(*pairs[next(it) % 4]), max(repeats, 10), device)
    elem = {}
    for size in ELEM_SIZES:
        xs = [(rnd(size), rnd(size)) for _ in range(max(1, min(8, COLD_BYTES // (8 * size))))]
        it = iter(range(10 ** 9))
        elem[str(size * 3 * xs[0][0].element_size())] = _time(lambda: torch.add(*xs[next(it) % len(xs)]),  # noqa: B023
                                                                max(repeats, 20), device)
    view = rnd(8, 8)
    view_s = _time(lambda: view.t(), 200, device)
    cal = {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "matmul_flops_per_s": mm_rate,
           "elementwise_seconds_by_bytes": elem, "view_s": view_s, "framework_s_per_op": 0.0}
    # the framework's per-op cost: a step of tiny blocks, measured, minus its ops priced as replays
    torch.manual_seed(0)
    model = _probe_model().to(dev, dtype)
    x = rnd(4, 16).requires_grad_()

    def step():
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)

    measured = min(_time(step, 20, device) for _ in range(3))
    meta = _probe_model().to("meta", dtype)
    ops = _probe_trace(meta, torch.empty(4, 16, device="meta", dtype=dtype, requires_grad=True))
    pricer = Pricer(cal, device)
    replayed = sum(pricer.op(o) for o in ops)
    cal["framework_s_per_op"] = max(0.0, (measured - replayed) / len(ops))
    cal["framework_probe"] = {"step_s": measured, "replayed_s": replayed, "ops": len(ops)}
    write_json(path, cal)
    return cal


def pricer_for(cal: dict) -> Pricer:
    """The op pricer of calibration ``cal`` (its replays cached next to it)."""
    from ..io import cache_dir

    key = (cal["device"], cal["dtype"], cal["measured_at"])
    if key not in _PRICERS:
        dt = DTYPES.get(cal["dtype"], torch.float32)
        path = cache_dir() / f"plan_replays_{_fingerprint(cal['device'], dt)}.json"
        _PRICERS[key] = Pricer(cal, cal["device"], path)
    return _PRICERS[key]


_PRICERS: dict = {}


def op_seconds(op, cal: dict) -> float:
    """Predicted seconds of one traced op in a training step: its replay (or a view call) plus the
    framework's per-op cost."""
    return pricer_for(cal).op(op) + cal["framework_s_per_op"]


def predict_time(ops: list, cal: dict) -> dict:
    """Seconds of an op trace priced by the calibration ``cal``: the total, by kind of op, and the op count."""
    parts = {"mm": 0.0, "attention": 0.0, "elementwise": 0.0, "views": 0.0, "framework": 0.0}
    pricer = pricer_for(cal)
    pricer.measure_all(ops)
    for op in ops:
        kind = "attention" if op[0].startswith("sdpa") else ("views" if op[0] == "view" else op[0])
        parts[kind] += pricer.op(op)
        parts["framework"] += cal["framework_s_per_op"]
    pricer.save()
    return {"seconds": sum(parts.values()), "parts": parts, "ops": len(ops)}


# ---- the plan -------------------------------------------------------------------------------------

def _reduced_costs(cfg, rank: int | None, n: int, L: int, scenario: str, b: int, T: int, dt, cal) -> dict:
    """Parameters, FLOPs and predicted time of a meta skeleton with ``n`` layers (and DLR depth ``L``)."""
    from transformers import AutoModelForCausalLM

    from ..dlr.modeling_weightlock_dlr import apply_dlr

    c = _with_shape(cfg, num_hidden_layers=n)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c).to(dt)
        if rank is not None:
            apply_dlr(model, [dict(width=c.hidden_size, rank=rank, depth=L)] * n)
    model.train()
    prepare(model, scenario)
    st = state_bytes(model, dt)
    fl = analytic_flops(model, b, T, scenario)
    out = {"parameters": st["parameters"], "trainable_parameters": st["trainable_parameters"],
           "flops": fl["flops"], **{f"flops_linear_{k}": v for k, v in fl["linear"].items()},
           **{f"flops_attention_{k}": v for k, v in fl["attention"].items()}}
    if cal is not None:
        t = predict_time(trace_step(model, b, T), cal)
        out.update({"time_s": t["seconds"], "ops": t["ops"], **{f"time_{k}_s": v for k, v in t["parts"].items()}})
    return out


def full_size_costs(cfg, rank: int | None, depth: int, scenario: str, b: int, T: int, dt, cal) -> dict:
    """:func:`_reduced_costs` of the full model without building it: every layer (and every DLR block) is
    the same, so each quantity is A + n·B (+ n·L·C for the blocks), solved from skeletons of 2 and 3
    layers (and depths 2 and 3)."""
    n = cfg.num_hidden_layers
    if rank is None:
        p2, p3 = (_reduced_costs(cfg, None, k, 0, scenario, b, T, dt, cal) for k in (2, 3))
        return {k: p2[k] + (n - 2) * (p3[k] - p2[k]) for k in p2}
    p22, p32, p23 = (_reduced_costs(cfg, rank, k, L, scenario, b, T, dt, cal) for k, L in ((2, 2), (3, 2), (2, 3)))
    out = {}
    for k in p22:
        C = (p23[k] - p22[k]) / 2
        B = p32[k] - p22[k] - 2 * C
        A = p22[k] - 2 * B - 4 * C
        out[k] = A + n * B + n * depth * C
    return out


def plan(model_spec, rank: int = 32, tokens_per_step: int = 16384, seq_len: int = 2048,
         dtype: str = "bfloat16", recalibrate: bool = False, scenarios: list[str] | None = None,
         device: str = "cpu", with_time: bool = True, progress: bool = False) -> dict:
    """The attacker's cost of fine-tuning ``model_spec`` (a config, shipped name, path or directory) and
    its DLR lock at ``rank``: one row per (model, scenario). ``with_time=False``: the analytic figures only
    (memory, parameters, FLOPs; seconds, no machine calibration); ``progress``: a progress bar while the
    operations of the time prediction are replayed (minutes on a first run, cached after)."""
    cfg = load_config(model_spec) if not hasattr(model_spec, "model_type") else model_spec
    _check_family(cfg)
    if dtype not in DTYPES:
        raise WeightlockError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    if tokens_per_step < 1 or seq_len < 1:
        raise WeightlockError("tokens per step and sequence length must be at least 1")
    T = min(seq_len, tokens_per_step)
    if tokens_per_step % T:
        raise WeightlockError(f"tokens per step ({tokens_per_step}) must be a multiple of the sequence length ({T})")
    b = tokens_per_step // T
    for sc in scenarios or ():
        if sc not in SCENARIOS:
            raise WeightlockError(f"unknown scenario {sc!r}; choose from {', '.join(SCENARIOS)}")
    _, specs = skeleton(_with_shape(cfg, num_hidden_layers=1), rank)  # validates the rank (depth matching)
    depth = specs[0].depth
    cal = calibrate(device, dt, remeasure=recalibrate) if with_time else None
    if cal is not None:
        pricer_for(cal).progress = progress
    size = torch.finfo(dt).bits // 8
    rows = []
    for kind in ("original", "locked"):
        shape = Shape.of(cfg, depth if kind == "locked" else 0, rank if kind == "locked" else 0)
        for sc in scenarios or list(SCENARIOS):
            if sc == "ckpt-dlr" and kind == "original":
                continue
            mem = predict_memory(cfg, shape, sc, b, T, dt)
            cost = full_size_costs(cfg, rank if kind == "locked" else None, depth, sc, b, T, dt, cal)
            params, trainable = int(round(cost.pop("parameters"))), int(round(cost.pop("trainable_parameters")))
            row = {"model": kind, "scenario": sc, "what": SCENARIOS[sc], **mem, "parameters": params,
                   "trainable_parameters": trainable, "param_bytes": params * size, "grad_bytes": trainable * size,
                   "optimizer_bytes": trainable * 8, "flops": int(round(cost.pop("flops"))),
                   "flops_parts": {k: int(round(v)) for k, v in cost.items() if k.startswith("flops_")}}
            if cal is not None:
                row["time_s"] = cost["time_s"]
                row["time_parts_s"] = {k: v for k, v in cost.items() if k.startswith("time_") and k != "time_s"}
            row["total_bytes"] = (row["peak_activation_bytes"] + row["param_bytes"] + row["grad_bytes"]
                                  + row["optimizer_bytes"])
            rows.append(row)
    orig = {r["scenario"]: r for r in rows if r["model"] == "original"}
    for r in rows:
        ref = orig.get(r["scenario"], orig.get("ckpt-layer"))
        r["activation_vs_original"] = r["peak_activation_bytes"] / ref["peak_activation_bytes"]
        if cal is not None:
            r["time_vs_original"] = r["time_s"] / ref["time_s"]
            if "full" in orig:
                r["time_vs_original_full"] = r["time_s"] / orig["full"]["time_s"]
    return {"model": str(model_spec) if not hasattr(model_spec, "model_type") else cfg.model_type,
            "model_type": cfg.model_type, "rank": rank, "depth": depth, "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "tokens_per_step": tokens_per_step, "batch": b, "seq_len": T, "dtype": dtype, "lora_r": LORA_R,
            "optimizer": "AdamW, two fp32 moments per trainable parameter; parameters and gradients in dtype",
            "calibration": {k: cal[k] for k in ("device", "dtype", "threads", "measured_at")} if cal else None,
            "mlp_memory_multiplier": _mlp_multiplier(cfg, rank, depth, dt, b, T), "rows": rows}


def _mlp_multiplier(cfg, rank, depth, dt, b, T) -> float:
    """Saved bytes of one DLR-Net over one MLP (full fine-tuning)."""
    o = fit_memory_model(cfg, False, "full", dt).component("ffn", Shape.of(cfg), b, T)
    l = fit_memory_model(cfg, True, "full", dt).component("ffn", Shape.of(cfg, depth, rank), b, T)
    return l / o
