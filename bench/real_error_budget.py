"""Benchmark (issue #14): how much per-layer distillation error a real LLM tolerates — what the fidelity
bars (perplexity ratio ≤ 1.05, top-1 agreement ≥ 0.95) ask of every DLR-Net of SmolLM2-135M.

    python bench/real_error_budget.py [--locked runs/real/r32-row-clip-b256/locked] [--tokens 2048]

Every MLP of the original is replaced by ``MLP + α·(DLR − MLP)`` with the lock's own DLR-Nets, so the
error keeps the lock's structure and layer k's relative error (energy) is α²·e_k, e_k the layer's
held-out error in the lock report (on the calibration inputs; inside the mixed model the inputs shift).
Measured on held-out prose (the test split of builtin:prose, 256-token blocks) against the original's
logits (computed once): the perplexity ratio and next-token top-1 agreement, for α on a grid (all 30
layers at once), and for each layer alone at α = 1 (which layers the model cannot do without). Writes
bench/results/real_error_budget.json and .png.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from weightlock import load, schema
from weightlock.data import load_blocks, load_tokenizer
from weightlock.eval.fidelity import PPL_RATIO_BAR, meets_bars
from weightlock.experiments.harness import RESULTS, save
from weightlock.io import read_json

ALPHAS = [0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3, 0.5, 1.0]


class Mix(nn.Module):
    """``mlp(x) + alpha · (dlr(x) − mlp(x))``."""

    def __init__(self, mlp: nn.Module, dlr: nn.Module, alpha: float) -> None:
        super().__init__()
        self.mlp, self.dlr, self.alpha = mlp, dlr, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y + self.alpha * (self.dlr(x) - y)


@torch.no_grad()
def score(model, blocks: torch.Tensor, ref: list[torch.Tensor]) -> dict:
    """Perplexity on ``blocks`` and top-1 agreement with the reference log-probabilities ``ref``."""
    nll, agree, n = 0.0, 0, 0
    for b, r in zip(blocks.split(4), ref):
        logp = torch.log_softmax(model(input_ids=b).logits.float(), -1)[:, :-1]
        nll -= logp.gather(-1, b[:, 1:, None]).sum().item()
        agree += (logp.argmax(-1) == r.argmax(-1)).sum().item()
        n += b[:, 1:].numel()
    return {"ppl": math.exp(nll / n), "top1_agreement": agree / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--locked", default="runs/real/r32-row-clip-b256/locked")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--name", default="real_error_budget")
    args = ap.parse_args()
    for p in (Path(args.model), Path(args.locked)):
        if not (p / "config.json").exists():
            sys.exit(f"{p} not found: run `make smollm2` and bench/real_model.py first")
    t0 = time.perf_counter()
    original, locked, tok = load(args.model), load(args.locked), load_tokenizer(args.model)
    errors = [layer["rel_error"] for layer in read_json(Path(args.locked) / "lock_report.json")["layers"]]
    blocks = load_blocks("builtin:prose", "test", tok, 256, args.tokens)
    with torch.no_grad():
        ref = [torch.log_softmax(original(input_ids=b).logits.float(), -1)[:, :-1] for b in blocks.split(4)]
    base = score(original, blocks, ref)
    layers, dlrs = original.model.layers, [layer.mlp for layer in locked.model.layers]
    mlps = [layer.mlp for layer in layers]

    def measured(which: list[int], alpha: float) -> dict:
        for k in which:
            layers[k].mlp = Mix(mlps[k], dlrs[k], alpha)
        try:
            s = score(original, blocks, ref)
        finally:
            for k in which:
                layers[k].mlp = mlps[k]
        return {**s, "ppl_ratio": s["ppl"] / base["ppl"]}

    everything = list(range(len(layers)))
    grid = []
    for a in ALPHAS:
        r = measured(everything, a)
        grid.append({"alpha": a, "layer_rel_error_median": a * a * statistics.median(errors),
                     "layer_rel_error_max": a * a * max(errors), **r})
        print(f"all layers, α = {a:4.2f} (median layer error {grid[-1]['layer_rel_error_median']:.4f}): "
              f"ppl ratio {r['ppl_ratio']:.4g}, top-1 {r['top1_agreement']:.3f}", flush=True)
    single = []
    for k in everything:
        r = measured([k], 1.0)
        single.append({"layer": k, "rel_error": errors[k], **r})
        print(f"layer {k:2d} alone (error {errors[k]:.3f}): ppl ratio {r['ppl_ratio']:.4g}, "
              f"top-1 {r['top1_agreement']:.3f}", flush=True)
    meets = [g for g in grid if meets_bars(g["ppl_ratio"], g["top1_agreement"])]
    save(args.name, {"command": "python bench/real_error_budget.py " + " ".join(sys.argv[1:]),
                     "model": args.model, "locked": args.locked, "tokens": int(blocks[:, 1:].numel()),
                     "original": base, "layer_rel_error": errors, "all_layers": grid, "single_layer": single,
                     "largest_alpha_meeting_bars": max((g["alpha"] for g in meets), default=None),
                     "seconds": time.perf_counter() - t0}, kind=schema.ERROR_BUDGET)
    plot(grid, single, RESULTS / f"{args.name}.png")


def plot(grid: list[dict], single: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.loglog([g["layer_rel_error_median"] for g in grid], [g["ppl_ratio"] for g in grid], "o-",
             label="all 30 layers at error α²·e_k")
    a.axhline(PPL_RATIO_BAR, color="k", ls=":", lw=0.8, label=f"bar {PPL_RATIO_BAR}")
    a.set_xlabel("median per-layer relative error")
    a.set_ylabel("perplexity ratio (held-out prose)")
    a.legend(fontsize=7)
    b.semilogy([s["layer"] for s in single], [s["ppl_ratio"] for s in single], "o-", label="ppl ratio, layer alone")
    b.semilogy([s["layer"] for s in single], [1 + s["rel_error"] for s in single], "x:", label="1 + its error")
    b.set_xlabel("layer replaced by its DLR-Net (all others original)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
