"""Benchmark: fitting ONE real MLP of SmolLM2-135M with a DLR-Net — which distillation settings work.

    python bench/real_layer_ablation.py [--layer 1] [--steps 300] [--block 128 256] [--variants energy-clip row-clip]

Real LLMs produce "massive activations": a few tokens (the first token of every sequence, the attention
sink) get MLP outputs hundreds of times larger than the rest. This bench captures one layer's MLP
(input, output) pairs on builtin:code+prose (train split, blocks of --block tokens with the tokenizer's
special tokens) and fits a rank-32, parameter-matched DLR-Net with each variant for --steps steps,
recording the held-out relative error (energy-weighted, as `weightlock lock` reports it) and the error
on the ordinary tokens (all but the 1% with the largest outputs). Writes bench/results/real_layer_ablation.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from weightlock import load
from weightlock.data import load_blocks, load_tokenizer
from weightlock.dlr import DLRNet, DLRSpec, LockConfig
from weightlock.dlr.distill import capture, fit_module, match_depth, relative_error
from weightlock.experiments.harness import save

VARIANTS = {  # name: (loss, gradient clip, learning rate)
    "energy": ("energy", 0.0, 1e-2),
    "energy-clip": ("energy", 1.0, 1e-2),
    "row-clip": ("row", 1.0, 1e-2),
    "row-median-clip": ("row-median", 1.0, 1e-2),
    "energy-clip-lr3e-3": ("energy", 1.0, 3e-3),
    "row-clip-lr3e-3": ("row", 1.0, 3e-3),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=40_960)
    ap.add_argument("--block", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--name", default="real_layer_ablation", help="results file bench/results/NAME.json")
    ap.add_argument("--variants", nargs="+", default=["energy-clip", "row-clip"], choices=sorted(VARIANTS))
    args = ap.parse_args()
    model, tok = load(args.model), load_tokenizer(args.model)
    d, d_ff = model.config.hidden_size, model.config.intermediate_size
    depth = match_depth(3 * d * d_ff, d, LockConfig.rank)
    rows = []
    for block in args.block:
        blocks = load_blocks("builtin:code+prose", "train", tok, block, args.tokens, specials=True)
        x, y = capture(model, blocks, [args.layer])[args.layer]
        x, y = x.float(), y.float()
        energy = y.pow(2).sum(1)
        info = {"block": block, "tokens": x.shape[0], "x_rms": x.pow(2).mean().sqrt().item(),
                "y_rms": y.pow(2).mean().sqrt().item(), "y_absmax": y.abs().max().item(),
                "energy_share_of_top1pct_tokens": (energy.sort(descending=True).values[: x.shape[0] // 100].sum()
                                                   / energy.sum()).item()}
        print(info, flush=True)
        g = torch.Generator().manual_seed(0)
        hold = torch.randperm(x.shape[0], generator=g)[: x.shape[0] // 10]  # fit_module's own held-out split
        ordinary = energy[hold] < energy[hold].quantile(0.99)
        for name in args.variants:
            loss, clip, lr = VARIANTS[name]
            t0 = time.perf_counter()
            net, st = fit_module(lambda: DLRNet(DLRSpec(d, LockConfig.rank, depth)), x, y, steps=args.steps, lr=lr,
                                 batch_tokens=LockConfig.batch_tokens, progress=False, loss=loss, grad_clip=clip)
            err = st["rel_error"]
            row = {**info, "variant": name, "loss": loss, "grad_clip": clip, "lr": lr, "steps": args.steps,
                   "rel_error": err if err == err and err < 1e30 else float("inf"),
                   "rel_error_ordinary_tokens": relative_error(net, x[hold][ordinary], y[hold][ordinary]),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(row, flush=True)
    save(args.name, {"command": "python bench/real_layer_ablation.py " + " ".join(sys.argv[1:]),
                                 "model": args.model, "layer": args.layer, "rank": LockConfig.rank, "depth": depth,
                                 "rows": rows})


if __name__ == "__main__":
    main()
