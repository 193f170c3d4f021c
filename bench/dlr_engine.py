"""Benchmark: the stacked engine's distillation throughput against the per-layer fits, on SmolLM2 shapes.

    OMP_NUM_THREADS=1 python bench/dlr_engine.py [--layers 30] [--steps 6] [--repeats 3] [--threads 1]

SmolLM2-135M's MLP shape (d = 576, d_ff = 1536, SwiGLU): gated DLR-Nets of rank 32 and depth 48 (exactly the
MLP's parameters), ``--layers`` of them, batches of ``--batch`` tokens, random (input, output) pairs (a step's
time does not depend on the values). Measured in one run, interleaved, median of ``--repeats``: layer-steps
per second of

* ``per_layer``: :func:`weightlock.dlr.distill.fit_module` once per layer, fp32 (today's path), and
  ``per_layer_bf16``: the same under bf16 autocast;
* ``stacked_fp32`` and ``stacked_bf16``: :func:`weightlock.dlr.engine.fit_stacked` over all layers at once,
  fp32 and bf16 products (its hand-written forward and backward);
* on the whole machine (``--cores``, default all): ``per_layer_all_cores``, today's lock path as ``weightlock
  lock`` runs it (per-layer fp32 fits, torch's threads = the cores), against ``engine_all_cores``, the engine
  as it runs there (bf16, the layers dealt to one process per core, one thread each; the fitting loops'
  throughput, process start-up reported apart as ``engine_start_seconds``);
* ``gemm_ceiling_fp32`` and ``gemm_ceiling_bf16``: only the matrix products of the same layer-steps (per block,
  forward x·Vᵀ and h·Uᵀ, backward the four products for dU, dh, dV, dx) on preallocated tensors, no
  elementwise work, no optimizer, no autograd: the throughput no implementation built on this machine's GEMMs
  can beat at this batch (the ceiling an engine's ratio is bounded by); and ``square_gemm_gflops``: a 1024³
  product's GFLOP/s in each dtype, the machine's practical peak.

Writes bench/results/dlr_engine.json with the ratios to ``per_layer``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

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
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="the whole machine's cores (today's path: this many threads; the engine: processes)")
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

    def stacked(bf16: bool, processes: int = 1) -> float:
        _, st = fit_stacked(lambda k: DLRNet(spec), list(range(args.layers)), xs, ys, split=split, bf16=bf16,
                            processes=processes, **kw)
        if processes > 1:
            start_up.append(st["wall_seconds"] - st["seconds"])
        return st["layer_steps_per_s"]

    def all_cores(fn):
        def run():
            torch.set_num_threads(args.cores)
            try:
                return fn()
            finally:
                torch.set_num_threads(args.threads)
        return run

    start_up: list[float] = []

    d, r2, r1 = spec.width, 2 * spec.rank, spec.rank  # the gated block's V: d → 2r, U: r → d

    def gemm_ceiling(dtype) -> float:
        x, g = torch.randn(args.batch, d, dtype=dtype), torch.randn(args.batch, d, dtype=dtype)
        v, u = torch.randn(r2, d, dtype=dtype), torch.randn(d, r1, dtype=dtype)
        pre, h = torch.randn(args.batch, r2, dtype=dtype), torch.randn(args.batch, r1, dtype=dtype)
        t = time.perf_counter()
        for _ in range(args.layers * args.steps):
            for _ in range(spec.depth):
                x @ v.T, h @ u.T  # forward
                g.T @ h, g @ u, pre.T @ x, pre @ v  # backward: dU, dh, dV, dx
        return args.layers * args.steps / (time.perf_counter() - t)

    runs = {"gemm_ceiling_fp32": lambda: gemm_ceiling(torch.float32),
            "gemm_ceiling_bf16": lambda: gemm_ceiling(torch.bfloat16), "per_layer": per_layer,
            "per_layer_bf16": lambda: per_layer(True), "stacked_fp32": lambda: stacked(False),
            "stacked_bf16": lambda: stacked(True), "per_layer_all_cores": all_cores(per_layer),
            "engine_all_cores": lambda: stacked(True, args.cores)}
    for fn in runs.values():  # warm-up
        fn()
    samples = {k: [] for k in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):  # interleaved, order alternating
            samples[name].append(runs[name]())
            print(f"repeat {r}: {name} {samples[name][-1]:.3f} layer-steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        a @ a
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        peak[str(dtype).removeprefix("torch.")] = 10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
    flops = 3 * 2 * args.batch * spec.depth * (d * r2 + r1 * d)  # one layer-step: forward + backward GEMMs
    result = {"square_gemm_gflops": peak, "engine_start_seconds": start_up,
              "whole_machine_ratio": med["engine_all_cores"] / med["per_layer_all_cores"],
              "layer_step_gflop": flops / 1e9, "gflops": {k: v * flops / 1e9 for k, v in med.items()},
              "command": "python bench/dlr_engine.py " + " ".join(sys.argv[1:]), "settings": vars(args),
              "spec": spec.__dict__, "layer_steps_per_s": samples, "median": med,
              "ratio_to_per_layer": {k: med[k] / med["per_layer"] for k in med},
              "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in samples.items()}}
    for k, v in result["ratio_to_per_layer"].items():
        print(f"{k}: {med[k]:.3f} layer-steps/s, x{v:.2f} the per-layer fits")
    print(f"whole machine ({args.cores} cores): the engine x{result['whole_machine_ratio']:.2f} today's lock path")
    save("dlr_engine", result)


if __name__ == "__main__":
    main()
