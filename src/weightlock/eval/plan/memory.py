"""Activation memory: the probe (what autograd saves per component of tiny real models of a family) and
the exact linear model in shape features fitted to it (:class:`MemoryModel`, :func:`predict_memory`)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...errors import WeightlockError
from .config import Shape, prepare, with_shape

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
    from ...dlr.modeling_weightlock_dlr import adapter_for, find_layers, get_path

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
    from ...dlr.modeling_weightlock_dlr import apply_dlr

    X = {c: [] for c in COMPONENTS}
    Y = {c: [] for c in COMPONENTS}
    for p in _probe_shapes(probes):
        shape = {"hidden_size": p["d"], "intermediate_size": p["d_ff"], "num_attention_heads": p["h"],
                 "num_key_value_heads": p["kvh"], "vocab_size": p["V"], "num_hidden_layers": 2}
        if getattr(cfg, "head_dim", None) is not None:
            shape["head_dim"] = p["hd"]
        else:  # the family derives head_dim = d / h
            shape["hidden_size"] = p["h"] * p["hd"]
        tiny = with_shape(cfg, **shape)
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
