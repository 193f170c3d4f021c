"""What a DLR-locked model costs an attacker to fine-tune, measured: saved-activation memory and time.

    python bench/dlr_cost.py memory [options]          # was bench/dlr_memory.py
    python bench/dlr_cost.py time [options]            # was bench/dlr_time.py

(`python bench/dlr_cost.py COMMAND --help`: a command's options; the ``*_DOC`` texts below describe each.)
"""
from __future__ import annotations

import argparse

import torch

from weightlock import schema
from weightlock.dlr import DLRNet, DLRSpec, load
from weightlock.eval.cost import (
    depth_linearity,
    dlr_saved_elements_per_token,
    mlp_saved_elements_per_token,
    saved_bytes_of_step,
    time_forward_backward,
)
from weightlock.experiments.harness import llama_shaped_pair, run_command, save

# ------------------------------ memory (was bench/dlr_memory.py) ----------------------------------

DLR_MEMORY_DOC = """\
Benchmark: fine-tuning memory of DLR-locked vs original models (saved activations of one step).

    python bench/dlr_cost.py memory [--locked runs/bench/locked-r32] [--base runs/bench/base-small]

Saved-activation bytes are measured with torch.autograd.graph.saved_tensors_hooks, deduplicated by
storage, parameters excluded (weightlock.eval.cost). Writes bench/results/dlr_memory.json with
  * module level: MLP vs DLR-Net, measured vs analytic bytes per token, at the small model's shape
    and at a Llama-3.2-1B shape (d=2048, d_ff=8192, r=64);
  * linearity in depth: DLR-Nets of 5 depths at d=2048, r=64, least-squares fit and R²;
  * model level: one training step of the small model and of its rank-32 lock, and of a random
    2-layer Llama-shaped model (d=2048, d_ff=8192) and its rank-64 DLR version; the locked/original
    ratio and the analytic prediction of the locked step from the original's measurement;
  * on CUDA additionally torch.cuda.max_memory_allocated of the same steps.
"""


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def module_level(d: int, d_ff: int, rank: int, tokens: int) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from weightlock.dlr import match_depth

    depth = match_depth(3 * d * d_ff, d, rank)
    out = {"d": d, "d_ff": d_ff, "rank": rank, "depth": depth, "tokens": tokens}
    for name, mod, ana in [("mlp", LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=d_ff)),
                            mlp_saved_elements_per_token(d, d_ff)),
                           ("dlr", DLRNet(DLRSpec(d, rank, depth)), dlr_saved_elements_per_token(d, rank, depth))]:
        mod = mod.to(DEV)
        x = torch.randn(tokens, d, device=DEV, requires_grad=True)
        b = saved_bytes_of_step(mod, lambda: mod(x))  # noqa: B023  (called within this iteration)
        out[name] = {"measured_bytes_per_token": b / tokens, "analytic_bytes_per_token": ana * 4,
                     "rel_diff": b / tokens / (ana * 4) - 1}
    out["ratio_measured"] = out["dlr"]["measured_bytes_per_token"] / out["mlp"]["measured_bytes_per_token"]
    return out


def step_bytes(model, ids) -> dict:
    model = model.to(DEV).train()
    ids = ids.to(DEV)
    res = {"saved_bytes": saved_bytes_of_step(model, lambda: model(input_ids=ids, labels=ids).loss)}
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        res["cuda_peak_bytes_above_weights"] = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
    return res


def model_level(original, locked, ids, d, d_ff, specs) -> dict:
    o, l = step_bytes(original, ids), step_bytes(locked, ids)
    tokens = ids.numel()
    n_layers = len(specs)
    mlp = mlp_saved_elements_per_token(d, d_ff) * 4 * tokens * n_layers
    dlr = sum(dlr_saved_elements_per_token(d, s.rank, s.depth) for s in specs) * 4 * tokens
    predicted = o["saved_bytes"] - mlp + dlr
    return {"tokens": tokens, "original": o, "locked": l, "ratio": l["saved_bytes"] / o["saved_bytes"],
            "predicted_locked_bytes": predicted, "prediction_rel_diff": l["saved_bytes"] / predicted - 1,
            **({"cuda_ratio": l["cuda_peak_bytes_above_weights"] / o["cuda_peak_bytes_above_weights"]}
               if DEV == "cuda" else {})}


def dlr_memory_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    args = ap.parse_args()
    res = {"command": "python bench/dlr_cost.py memory", "device": DEV, "dtype": "float32"}
    res["module_small"] = module_level(256, 688, 32, 2048)
    res["module_llama1b"] = module_level(2048, 8192, 64, 256)
    res["depth_linearity"] = depth_linearity(2048, 64, [8, 16, 32, 64, 128], 256, DEV)
    print(res["module_small"], res["module_llama1b"], res["depth_linearity"]["r2"], flush=True)

    original, locked = load(args.base), load(args.locked)
    specs = [DLRSpec(**s) for s in locked.config.weightlock_dlr["layers"]]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, original.config.vocab_size, (8, 128), generator=g)
    res["model_small"] = model_level(original, locked, ids, 256, 688, specs)
    print(res["model_small"], flush=True)

    big, big_locked, big_specs = llama_shaped_pair(layers=2, rank=64)
    ids = torch.randint(0, 4096, (1, 256), generator=g)
    res["model_llama_d2048"] = {"layers": 2, "rank": 64, "depth": big_specs[0].depth,
                                **model_level(big, big_locked, ids, 2048, 8192, big_specs)}
    print(res["model_llama_d2048"], flush=True)
    save("dlr_memory", res, kind=schema.MEMORY_VS_DEPTH)


# ------------------------------ time (was bench/dlr_time.py) --------------------------------------

DLR_TIME_DOC = """\
Benchmark: forward and forward+backward time of the locked vs original model (same run).

    python bench/dlr_cost.py time [--base runs/bench/base-small] [--locked runs/bench/locked-r32]

Writes bench/results/dlr_time.json: median (7 repeats after 2 warm-ups) of inference forward (no grad),
training forward and backward, for the small model and its lock at batch 8 × 128, and for a random
2-layer Llama-shaped model (d=2048, d_ff=8192) and its rank-64 DLR version at batch 1 × 128; the
backward/forward ratio of each and the locked/original ratios.
"""



def compare(original, locked, ids) -> dict:
    o = time_forward_backward(original.to(DEV), ids.to(DEV))
    l = time_forward_backward(locked.to(DEV), ids.to(DEV))
    return {"batch": list(ids.shape), "original": o, "locked": l,
            "inference_slowdown": l["forward_inference_s"] / o["forward_inference_s"],
            "train_step_slowdown": (l["forward_train_s"] + l["backward_s"]) / (o["forward_train_s"] + o["backward_s"]),
            "backward_slowdown": l["backward_s"] / o["backward_s"]}


def dlr_time_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    res = {"command": "python bench/dlr_cost.py time", "device": DEV}
    original, locked = load(args.base), load(args.locked)
    res["small_r32"] = compare(original, locked, torch.randint(0, 4096, (8, 128), generator=g))
    print(res["small_r32"], flush=True)
    big, big_locked, _ = llama_shaped_pair(layers=2, rank=64)
    res["llama_d2048_r64"] = compare(big, big_locked, torch.randint(0, 4096, (1, 128), generator=g))
    print(res["llama_d2048_r64"], flush=True)
    save("dlr_time", res)


COMMANDS = {
    "memory": (dlr_memory_main, DLR_MEMORY_DOC),
    "time": (dlr_time_main, DLR_TIME_DOC),
}


if __name__ == "__main__":
    run_command(COMMANDS, __doc__)
