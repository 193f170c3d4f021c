"""Benchmark: the stacked engine's distillation throughput against the per-layer fits, on SmolLM2 shapes.

    OMP_NUM_THREADS=1 python bench/dlr_engine.py [--layers 30] [--steps 6] [--repeats 3] [--threads 1]

SmolLM2-135M's MLP shape (d = 576, d_ff = 1536, SwiGLU): gated DLR-Nets of rank 32 and depth 48 (exactly the
MLP's parameters), ``--layers`` of them, batches of ``--batch`` tokens, random (input, output) pairs (a step's
time does not depend on the values). Measured in one run, interleaved, median of ``--repeats``: layer-steps
per second of

* ``per_layer``: :func:`weightlock.dlr.distill.fit_module` once per layer, fp32 (today's path), and
  ``per_layer_bf16``: the same under bf16 autocast;
* ``stacked_fp32`` and ``stacked_bf16``: :func:`weightlock.dlr.engine.fit_stacked` over all layers at once,
  fp32 and under bf16 autocast.

Writes bench/results/dlr_engine.json with the ratios to ``per_layer``.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from weightlock.dlr.distill import fit_module, holdout_split
from weightlock.dlr.engine import fit_stacked
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec
from weightlock.experiments.harness import save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=6, help="fitting steps per measurement (after one warm-up)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = DLRSpec(576, 32, 48, "silu", readout=4.0, form="gated", init_scale=0.5)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.tokens, 576, generator=g).bfloat16() for _ in range(args.layers)]
    ys = [torch.randn(args.tokens, 576, generator=g).bfloat16() for _ in range(args.layers)]
    split = holdout_split(args.tokens, 0.1, 0, 128)
    kw = dict(steps=args.steps, lr=1e-3, batch_tokens=args.batch, loss="row", grad_clip=1.0)

    def per_layer(bf16: bool = False) -> float:
        t = 0.0
        for k in range(args.layers):
            _, st = fit_module(lambda: DLRNet(spec), xs[k], ys[k], progress=False, split=split, bf16=bf16, **kw)
            t += st["seconds"]
        return args.layers * args.steps / t

    def stacked(bf16: bool) -> float:
        _, st = fit_stacked(lambda k: DLRNet(spec), list(range(args.layers)), xs, ys, split=split, bf16=bf16, **kw)
        return st["layer_steps_per_s"]

    runs = {"per_layer": per_layer, "per_layer_bf16": lambda: per_layer(True), "stacked_fp32": lambda: stacked(False),
            "stacked_bf16": lambda: stacked(True)}
    for fn in runs.values():  # warm-up
        fn()
    samples = {k: [] for k in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):  # interleaved, order alternating
            samples[name].append(runs[name]())
            print(f"repeat {r}: {name} {samples[name][-1]:.3f} layer-steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {"command": "python bench/dlr_engine.py " + " ".join(sys.argv[1:]), "settings": vars(args),
              "spec": spec.__dict__, "layer_steps_per_s": samples, "median": med,
              "ratio_to_per_layer": {k: med[k] / med["per_layer"] for k in med},
              "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in samples.items()}}
    for k, v in result["ratio_to_per_layer"].items():
        print(f"{k}: {med[k]:.3f} layer-steps/s, x{v:.2f} the per-layer fits")
    save("dlr_engine", result)


if __name__ == "__main__":
    main()
