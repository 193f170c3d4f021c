"""The plan: memory, parameters, FLOPs and time of every scenario for the original and its lock, at full
size, extrapolated from small skeletons (:func:`plan`)."""
from __future__ import annotations

import torch

from ...errors import WeightlockError
from .config import DTYPES, LORA_R, SCENARIOS, Shape, check_family, load_config, prepare, skeleton, with_shape
from .memory import fit_memory_model, predict_memory
from .pricer import calibrate, predict_time, pricer_for
from .trace import analytic_flops, state_bytes, trace_step

# ---- the plan -------------------------------------------------------------------------------------

def _reduced_costs(cfg, rank: int | None, n: int, L: int, scenario: str, b: int, T: int, dt, cal) -> dict:
    """Parameters, FLOPs and predicted time of a meta skeleton with ``n`` layers (and DLR depth ``L``)."""
    from transformers import AutoModelForCausalLM

    from ...dlr.modeling_weightlock_dlr import apply_dlr

    c = with_shape(cfg, num_hidden_layers=n)
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
         device: str = "cpu", with_time: bool = True, progress: bool = False, keep_freed: bool = False) -> dict:
    """The attacker's cost of fine-tuning ``model_spec`` (a config, shipped name, path or directory) and
    its DLR lock at ``rank``: one row per (model, scenario). ``with_time=False``: the analytic figures only
    (memory, parameters, FLOPs; seconds, no machine calibration); ``progress``: a progress bar while the
    operations of the time prediction are replayed (minutes on a first run, cached after);
    ``keep_freed`` (off by default): price steps with this process's allocator keeping the memory it frees,
    the steady state of a GPU's caching allocator — a process-wide ``mallopt`` on Linux that stays for the
    rest of the process (:func:`weightlock.eval.plan.pricer.keep_freed_memory`)."""
    cfg = load_config(model_spec) if not hasattr(model_spec, "model_type") else model_spec
    check_family(cfg)
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
    _, specs = skeleton(with_shape(cfg, num_hidden_layers=1), rank)  # validates the rank (depth matching)
    depth = specs[0].depth
    cal = calibrate(device, dt, remeasure=recalibrate, keep_freed=keep_freed) if with_time else None
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
            "calibration": ({k: cal[k] for k in ("device", "dtype", "threads", "measured_at")}
                            | {"keep_freed_memory": cal.get("keep_freed_memory", False)}) if cal else None,
            "mlp_memory_multiplier": mlp_multiplier(cfg, rank, depth, dt, b, T), "rows": rows}


def mlp_multiplier(cfg, rank, depth, dt, b, T) -> float:
    """Saved bytes of one DLR-Net over one MLP (full fine-tuning)."""
    o = fit_memory_model(cfg, False, "full", dt).component("ffn", Shape.of(cfg), b, T)
    l = fit_memory_model(cfg, True, "full", dt).component("ffn", Shape.of(cfg, depth, rank), b, T)
    return l / o
