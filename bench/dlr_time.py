"""Benchmark: forward and forward+backward time of the locked vs original model (same run).

    python bench/dlr_time.py [--base runs/bench/base-small] [--locked runs/bench/locked-r32]

Writes bench/results/dlr_time.json: median (7 repeats after 2 warm-ups) of inference forward (no grad),
training forward and backward, for the small model and its lock at batch 8 × 128, and for a random
2-layer Llama-shaped model (d=2048, d_ff=8192) and its rank-64 DLR version at batch 1 × 128; the
backward/forward ratio of each and the locked/original ratios.
"""
from __future__ import annotations

import argparse

import torch

from weightlock.dlr import load
from weightlock.eval.cost import time_forward_backward
from weightlock.experiments.harness import llama_shaped_pair, save

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def compare(original, locked, ids) -> dict:
    o = time_forward_backward(original.to(DEV), ids.to(DEV))
    l = time_forward_backward(locked.to(DEV), ids.to(DEV))
    return {"batch": list(ids.shape), "original": o, "locked": l,
            "inference_slowdown": l["forward_inference_s"] / o["forward_inference_s"],
            "train_step_slowdown": (l["forward_train_s"] + l["backward_s"]) / (o["forward_train_s"] + o["backward_s"]),
            "backward_slowdown": l["backward_s"] / o["backward_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    res = {"command": "python bench/dlr_time.py", "device": DEV}
    original, locked = load(args.base), load(args.locked)
    res["small_r32"] = compare(original, locked, torch.randint(0, 4096, (8, 128), generator=g))
    print(res["small_r32"], flush=True)
    big, big_locked, _ = llama_shaped_pair(layers=2, rank=64)
    res["llama_d2048_r64"] = compare(big, big_locked, torch.randint(0, 4096, (1, 128), generator=g))
    print(res["llama_d2048_r64"], flush=True)
    save("dlr_time", res)


if __name__ == "__main__":
    main()
