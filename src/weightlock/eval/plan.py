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
  traced at full size on the meta device, priced with a per-operation throughput calibration measured on
  this machine (:func:`calibrate`): matmuls by the narrowest of their three dimensions and which one it
  is (thin ``[N×d]·[d×r]`` DLR maps run at a fraction of a wide MLP matmul's GFLOP/s), attention by
  its own kernel's rate, everything else by bytes moved over measured bandwidth plus a per-call overhead.
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
    lock with depths matched to the MLPs (``specs_for``; a rank that cannot match raises). Returns
    (model, specs or None)."""
    from transformers import AutoModelForCausalLM

    from ..dlr.distill import LockConfig, specs_for
    from ..dlr.modeling_weightlock_dlr import apply_dlr

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
        specs = None
        if rank is not None:
            _, specs, _ = specs_for(model, LockConfig(rank=rank))
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
    """A dispatch mode that records (kind, cost quantity, narrow dim / bytes) per aten op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name.split("::")[-1]
            if name in _MM_OPS:
                a, bm = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
                batch = a.shape[0] if a.dim() == 3 else 1
                m, k, n = a.shape[-2], a.shape[-1], bm.shape[-1]
                self.ops.append(("mm", 2 * batch * m * k * n, (m, k, n), a.dtype))
            elif "scaled_dot_product" in name:
                q = args[1] if name.endswith("backward") else args[0]
                bq, hq, tq, dq = q.shape
                tk = args[2].shape[2] if name.endswith("backward") else args[1].shape[2]
                self.ops.append(("sdpa_bwd" if name.endswith("backward") else "sdpa", bq * hq * tq * tk * dq,
                                 None, q.dtype))
            elif name not in _VIEW_OPS:
                rets = func._schema.returns
                if rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write:
                    return out  # a view
                nbytes = sum(x.numel() * x.element_size() for x in _flat([args, out]) if isinstance(x, torch.Tensor))
                self.ops.append(("elementwise", nbytes, None, None))
            return out

    return Trace()


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
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


# ---- throughput calibration ----------------------------------------------------------------------

NARROW = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
WIDE = 1024
ELEM_SIZES = (2 ** 14, 2 ** 17, 2 ** 20, 2 ** 23)


def _fingerprint(device: str, dtype: torch.dtype) -> str:
    from ..io import machine_info

    mi = machine_info()
    parts = [device, str(dtype), torch.__version__, str(torch.get_num_threads()),
             str(mi.get("cpu") or mi.get("processor")), str(mi.get("cuda_device"))]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _time(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` (the median, not the minimum: a training step's ops do not all run at
    the best case, and this machine may be shared)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, remeasure: bool = False,
              repeats: int = 3) -> dict:
    """Per-operation throughput of this machine, cached in the weightlock cache dir per machine, device,
    dtype, torch version and thread count (``remeasure`` re-runs it): matmul GFLOP/s with the narrow
    dimension n ∈ NARROW as output width ([WIDE×WIDE]·[WIDE×n], the forward of a thin map), as inner
    dimension ([WIDE×n]·[n×WIDE], its input gradient) and as output rows ([n×WIDE]·[WIDE×WIDE], its weight
    gradient); elementwise bandwidth at a few sizes and the per-call overhead; the attention kernel's
    time per b·h·T²·head_dim (forward and backward, causal)."""
    from ..io import cache_dir, read_json, write_json

    path = cache_dir() / f"plan_calibration_{_fingerprint(device, dtype)}.json"
    if path.exists() and not remeasure:
        return read_json(path)
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    mm = {"out": {}, "inner": {}, "rows": {}}
    for n in NARROW:
        for kind, (ashape, wshape) in {"out": ((WIDE, WIDE), (WIDE, n)), "inner": ((WIDE, n), (n, WIDE)),
                                       "rows": ((n, WIDE), (WIDE, WIDE))}.items():
            # fresh operands for every call, as in a step where each op reads what the previous one wrote
            pairs = [(rnd(*ashape), rnd(*wshape)) for _ in range(4)]
            it = iter(range(10 ** 9))
            flops = 2 * ashape[0] * ashape[1] * wshape[1]
            reps = max(repeats, min(40, int(2e8 // flops)))
            mm[kind][str(n)] = flops / _time(lambda: torch.mm(*pairs[next(it) % 4]), reps, device)  # noqa: B023  (timed at once)
    elem = {}
    for n in ELEM_SIZES:
        x, y = rnd(n), rnd(n)
        elem[str(n * 3 * x.element_size())] = _time(lambda: torch.add(x, y), max(repeats, 20), device)  # noqa: B023
    tiny = rnd(8)
    overhead = _time(lambda: torch.add(tiny, tiny), 200, device)
    bq, hq, tq, dq = 1, 8, 512, 64
    q, k, v = (rnd(bq, hq, tq, dq).requires_grad_() for _ in range(3))
    F = torch.nn.functional
    fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats, device)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    go = torch.ones_like(out)
    both = _time(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), go),
                 repeats, device)
    unit = bq * hq * tq * tq * dq
    cal = {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "matmul_flops_per_s": mm,
           "elementwise_seconds_by_bytes": elem, "op_overhead_s": overhead,
           "sdpa_fwd_s_per_unit": fwd / unit, "sdpa_bwd_s_per_unit": max(both - fwd, fwd) / unit,
           "wide": WIDE}
    write_json(path, cal)
    return cal


def _interp_log(table: dict, x: float) -> float:
    xs = sorted((float(k), v) for k, v in table.items())
    if x <= xs[0][0]:
        return xs[0][1] * (x / xs[0][0]) if x < xs[0][0] else xs[0][1]
    for (x0, y0), (x1, y1) in zip(xs, xs[1:]):
        if x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return xs[-1][1]


def op_seconds(op, cal: dict) -> float:
    """Predicted seconds of one traced op."""
    kind, q, dims, _ = op
    over = cal["op_overhead_s"]
    if kind == "mm":
        m, k, n = dims
        narrow = min(m, k, n)
        which = "out" if narrow == n else ("inner" if narrow == k else "rows")
        return over + q / _interp_log(cal["matmul_flops_per_s"][which], narrow)
    if kind == "sdpa":
        return over + q * cal["sdpa_fwd_s_per_unit"]
    if kind == "sdpa_bwd":
        return over + q * cal["sdpa_bwd_s_per_unit"]
    table = cal["elementwise_seconds_by_bytes"]
    sizes = sorted((float(k), v) for k, v in table.items())
    if q <= sizes[0][0]:
        return max(over, sizes[0][1] * q / sizes[0][0])
    rate = _interp_log({k: k / v for k, v in sizes}, q)  # bytes/s
    return over + q / rate


def predict_time(ops: list, cal: dict) -> dict:
    """Seconds of an op trace priced by the calibration ``cal``: the total, by kind of op, and the op count."""
    parts = {"mm": 0.0, "attention": 0.0, "elementwise": 0.0}
    for op in ops:
        parts["attention" if op[0].startswith("sdpa") else op[0]] += op_seconds(op, cal)
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
         device: str = "cpu", with_time: bool = True) -> dict:
    """The attacker's cost of fine-tuning ``model_spec`` (a config, shipped name, path or directory) and
    its DLR lock at ``rank``: one row per (model, scenario)."""
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
