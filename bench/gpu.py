"""Benchmark on a CUDA GPU: the locked model's CUDA inference paths, training cost and memory vs the original.

    python bench/gpu.py [--layers 4] [--rank 64] [--repeats 7] [--smollm2 runs/smollm2]

Refuses to run without CUDA (one line on stderr, exit status 2). Writes

- ``bench/results/gpu_llama_d2048.json``: a random Llama-shaped model (d=2048, d_ff=8192, vocab 4,096,
  ``--layers`` layers, bf16; ``weightlock.experiments.harness.llama_shaped_pair``) and its DLR version at ``--rank``
  (L=192 blocks per layer at r=64);
- ``bench/results/gpu_smollm2.json``: the same for SmolLM2-135M (``make smollm2`` converts it to
  ``runs/smollm2``) and a random-weight DLR version of it, when that directory exists;

each with, median of ``--repeats`` (interleaved):

- prefill: one forward pass of 4 × 512 tokens, no grad; decode: ``generate`` of 64 new tokens, greedy, KV
  cache, 16-token prompt — original vs locked on the eager fast path (``use_triton = False``), the fused
  Triton kernel (the default on CUDA) and the kernel replayed as CUDA graphs (``compile_small``, what
  ``weightlock.load(..., compile=True)`` sets); the relative difference of each locked path's logits to the
  reference path;
- training: forward and backward time of one step (1 × 512 tokens, bf16 weights, all trainable), their
  ratio, locked / original; ``torch.cuda.max_memory_allocated`` of that step above the model's own memory,
  locked vs original, next to the analytic saved-activation bytes of weightlock.eval.cost
  (``dlr_saved_elements_per_token`` / ``mlp_saved_elements_per_token``);
- the fused kernel alone on one layer's net (1 token and 4,096 tokens): time, achieved bandwidth (weights
  + input + output bytes / time) vs the device's peak HBM bandwidth (from a table by device name) and vs a
  measured device-to-device copy.

The DLR weights are random (timing and memory do not depend on their values); the up-projections get a
non-zero init so that the logits comparison is not between zeros.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

# peak HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), most specific first
PEAK_HBM = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
            ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
            ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("RTX 4090", 1.008e12)]
PATHS = ("original", "locked_fast", "locked_triton", "locked_graph")


def peak_hbm() -> float | None:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_HBM if key in name), None)


def cuda_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def dlr_nets(model) -> list:
    from weightlock.dlr.modeling_weightlock_dlr import DLRNet

    return [m for m in model.modules() if isinstance(m, DLRNet)]


def set_path(model, path: str) -> None:
    """Put every DLR-Net of ``model`` on one inference path (see PATHS)."""
    for n in dlr_nets(model):
        n.use_triton = path in ("locked_triton", "locked_graph")
        n.compile_small = path == "locked_graph"


def nonzero_init(locked) -> None:
    with torch.no_grad():
        for n in dlr_nets(locked):
            n.spec.init_scale = 0.5
            n.reset_parameters()


def inference(original, locked, vocab: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 512), generator=g).cuda()
    prompt = torch.randint(0, vocab, (1, 16), generator=g).cuda()
    new = 64
    models = {p: original if p == "original" else locked for p in PATHS}

    def run(path, what):
        set_path(locked, path)
        model = models[path]
        with torch.no_grad():
            if what == "prefill":
                return model(ids)
            return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    times = {(p, w): [] for p in PATHS for w in ("prefill", "decode")}
    for what in ("prefill", "decode"):
        for p in PATHS:
            cuda_time(lambda: run(p, what), 1, warmup=1)  # noqa: B023  (called within this iteration)
        for _ in range(repeats):  # interleaved: drift in clocks or load hits every path alike
            for p in PATHS:
                times[(p, what)].append(cuda_time(lambda: run(p, what), 1, warmup=0))  # noqa: B023
    med = {p: {w: statistics.median(times[(p, w)]) for w in ("prefill", "decode")} for p in PATHS}
    res = {"prefill_batch": list(ids.shape), "decode_new_tokens": new, "decode_prompt": 16, "repeats": repeats,
           "seconds": med, "all_seconds": {f"{p}/{w}": v for (p, w), v in times.items()},
           "decode_tokens_per_s": {p: new / med[p]["decode"] for p in PATHS}}
    for p in PATHS[1:]:
        for w in ("prefill", "decode"):
            res[f"{w}_ratio_{p}"] = med[p][w] / med["original"][w]
    # agreement of each locked path with the reference path (bf16), on the prefill batch's first row
    from weightlock.dlr.modeling_weightlock_dlr import DLRNet

    with torch.no_grad():
        DLRNet.fast = False
        try:
            ref = locked(ids[:1]).logits.float()
        finally:
            DLRNet.fast = True
        for p in PATHS[1:3]:
            set_path(locked, p)
            out = locked(ids[:1]).logits.float()
            res[f"logits_rel_diff_{p}_vs_reference"] = ((out - ref).norm() / ref.norm()).item()
    set_path(locked, "locked_triton")
    res["inference_path_prefill"] = dlr_nets(locked)[0].inference_path(torch.empty(1, 512, locked.config.hidden_size,
                                                                                    device="cuda",
                                                                                    dtype=torch.bfloat16))
    return res


def training(original, locked, vocab: int, repeats: int, specs, d_ff: int) -> dict:
    from weightlock.eval.cost import dlr_saved_elements_per_token, mlp_saved_elements_per_token

    tokens = 512
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    res = {"tokens": tokens}
    for name, model in (("original", original), ("locked", locked)):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        box = {}

        def fwd(model=model, box=box):
            box["loss"] = model(input_ids=ids, labels=ids, use_cache=False).loss

        def bwd(box=box):
            box["loss"].backward()

        fwd_t, bwd_t = [], []
        for i in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t_f = cuda_time(fwd, 1, warmup=0)
            t_b = cuda_time(bwd, 1, warmup=0)
            if i:  # the first step is a warm-up
                fwd_t.append(t_f)
                bwd_t.append(t_b)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd()
        bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
        model.eval()
        res[name] = {"forward_s": statistics.median(fwd_t), "backward_s": statistics.median(bwd_t),
                     "backward_over_forward": statistics.median(bwd_t) / statistics.median(fwd_t),
                     "step_peak_bytes_above_model": peak}
    for k in ("forward_s", "backward_s", "step_peak_bytes_above_model"):
        res[f"{k}_locked_over_original"] = res["locked"][k] / res["original"][k]
    d = original.config.hidden_size
    elem = 2  # bf16
    mlp = sum(mlp_saved_elements_per_token(d, d_ff) for _ in specs) * tokens * elem
    dlr = sum(dlr_saved_elements_per_token(s.width, s.rank, s.depth, s.norm) for s in specs) * tokens * elem
    res["analytic"] = {"mlp_saved_bytes": mlp, "dlr_saved_bytes": dlr, "dlr_minus_mlp_bytes": dlr - mlp}
    res["measured_peak_difference_bytes"] = (res["locked"]["step_peak_bytes_above_model"]
                                             - res["original"]["step_peak_bytes_above_model"])
    res["measured_over_analytic_difference"] = res["measured_peak_difference_bytes"] / (dlr - mlp)
    return res


def kernel_bandwidth(net, repeats: int) -> dict:
    """The fused kernel alone on one net: time and achieved bandwidth at 1 and 4,096 tokens."""
    from weightlock.dlr import triton_dlr as K

    s = net.spec
    weight_bytes = sum(t.numel() * t.element_size() for t in K.stacked(net) if t is not None)
    out = {"width": s.width, "rank": s.rank, "depth": s.depth, "weight_bytes": weight_bytes}
    big = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda")
    copy_s = cuda_time(lambda: big.clone(), max(repeats, 10))
    out["device_copy_bytes_per_s"] = 2 * big.numel() / copy_s  # read + write
    out["peak_hbm_bytes_per_s"] = peak_hbm()
    for tokens in (1, 4096):
        x = torch.randn(tokens, s.width, device="cuda", dtype=net.blocks[0].down.weight.dtype)
        assert K.supported(net, x)
        t = cuda_time(lambda: K.forward(net, x), max(repeats, 20))  # noqa: B023  (called within this iteration)
        moved = weight_bytes + 2 * x.numel() * x.element_size()
        with torch.no_grad():
            t_fast = cuda_time(lambda: net.forward_fast(x), max(repeats, 20))  # noqa: B023
        row = {"kernel_s": t, "eager_fast_path_s": t_fast, "bytes_moved": moved, "achieved_bytes_per_s": moved / t,
               "launch_config": list(K.launch_config(tokens, s.width, s.rank, x.dtype))}
        if out["peak_hbm_bytes_per_s"]:
            row["fraction_of_peak_hbm"] = row["achieved_bytes_per_s"] / out["peak_hbm_bytes_per_s"]
        row["fraction_of_device_copy"] = row["achieved_bytes_per_s"] / out["device_copy_bytes_per_s"]
        out[f"tokens_{tokens}"] = row
    return out


def measure(original, locked, specs, d_ff: int, repeats: int) -> dict:
    nonzero_init(locked)
    original, locked = original.to("cuda", torch.bfloat16).eval(), locked.to("cuda", torch.bfloat16).eval()
    vocab = original.config.vocab_size
    res = {"layers": original.config.num_hidden_layers, "hidden_size": original.config.hidden_size, "d_ff": d_ff,
           "dlr_specs": [dict(s.__dict__) for s in specs[:1]], "dtype": "bfloat16"}
    res["inference"] = inference(original, locked, vocab, repeats)
    print({k: v for k, v in res["inference"].items() if "ratio" in k or "rel" in k}, flush=True)
    res["fused_kernel"] = kernel_bandwidth(dlr_nets(locked)[0], repeats)
    print({k: v for k, v in res["fused_kernel"].items() if k.startswith("tokens_")}, flush=True)
    res["training"] = training(original, locked, vocab, repeats, specs, d_ff)
    print({k: v for k, v in res["training"].items() if "over" in k}, flush=True)
    return res


def smollm2_pair(path: str, rank: int):
    import copy

    from weightlock.dlr import LockConfig, apply_dlr
    from weightlock.dlr.distill import specs_for
    from weightlock.models.hub import load

    original = load(path)
    _, specs, _ = specs_for(original, LockConfig(rank=rank))
    locked = apply_dlr(copy.deepcopy(original), [s.__dict__ for s in specs])
    return original, locked, specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--smollm2-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smollm2", default="runs/smollm2")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        sys.exit(2)
    import triton  # noqa: F401  (the fused kernel is what is measured: fail here, not halfway)

    from weightlock.experiments.harness import llama_shaped_pair, save

    meta = {"command": "python " + " ".join(["bench/gpu.py", *sys.argv[1:]]), "device": torch.cuda.get_device_name(),
            "peak_hbm_bytes_per_s": peak_hbm(), "torch": torch.__version__, "triton": triton.__version__}
    original, locked, specs = llama_shaped_pair(layers=args.layers, rank=args.rank)
    save("gpu_llama_d2048", {**meta, **measure(original, locked, specs, 8192, args.repeats)})
    del original, locked
    torch.cuda.empty_cache()
    if Path(args.smollm2).is_dir():
        original, locked, specs = smollm2_pair(args.smollm2, args.smollm2_rank)
        save("gpu_smollm2", {**meta, **measure(original, locked, specs, original.config.intermediate_size,
                                               args.repeats)})
    else:
        print(f"{args.smollm2} not found (make smollm2): SmolLM2-135M skipped", flush=True)


if __name__ == "__main__":
    main()
