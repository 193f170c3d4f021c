"""Benchmark: inference speed of a locked model (fast DLR path and reference path) vs the original.

    python bench/dlr_inference.py [--base runs/bench/base-small] [--locked runs/bench/locked-r32]

(`bench/base_model.py` and `bench/dlr_fidelity.py` produce the two directories.) Writes
bench/results/dlr_inference.json (bench/results/dlr_inference_cuda.json on a GPU): the median over
repeats, interleaved so that drift in machine load hits all three alike, of

- prefill: one forward pass over a batch of 8 × 256 tokens (no grad);
- decode: ``generate`` of 128 new tokens, greedy, with the KV cache, from a 16-token prompt;

for the original, the locked model on its fast path, on the reference path (``DLRNet.fast = False``)
and, on CPU, on the opt-in compiled path (``weightlock.load(..., compile=True)``: steps of ≤ 16 tokens
run one torch.compile'd function per net; prefill of 2048 tokens stays on the eager fast path); plus
the relative difference of the logits of each locked path against the reference. On CUDA
it measures a random Llama-shaped model at d=2048, d_ff=8192, 16 layers, bf16, rank 64, with
prefill of 8 × 1024 tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_shaped_pair, save  # noqa: E402
from weightlock.dlr import load  # noqa: E402
from weightlock.dlr.modeling_weightlock_dlr import DLRNet  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(models: dict, ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median seconds of prefill and decode for each entry of ``models`` ({name: (model, fast, compiled)})."""
    def run(name, what):
        model, fast, compiled = models[name]
        DLRNet.fast, DLRNet.compile_small = fast, compiled
        try:
            with torch.no_grad():
                if what == "prefill":
                    return timed(lambda: model(ids))
                return timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False, pad_token_id=0))
        finally:
            DLRNet.fast, DLRNet.compile_small = True, False

    times = {(n, w): [] for n in models for w in ("prefill", "decode")}
    for what in ("prefill", "decode"):
        for name in models:  # warm-up
            run(name, what)
        for _ in range(repeats):
            for name in models:
                times[(name, what)].append(run(name, what))
    out = {name: {w: statistics.median(times[(name, w)]) for w in ("prefill", "decode")} for name in models}
    for name in models:
        out[name]["prefill_all_s"] = times[(name, "prefill")]
        out[name]["decode_all_s"] = times[(name, "decode")]
    return out


def agreement(locked, ids, compiled: bool = False) -> float:
    """Relative difference of the logits of the fast (or compiled) path and the reference path."""
    with torch.no_grad():
        DLRNet.compile_small = compiled
        fast = locked(ids).logits.float()
        DLRNet.fast, DLRNet.compile_small = False, False
        try:
            ref = locked(ids).logits.float()
        finally:
            DLRNet.fast = True
    return ((fast - ref).norm() / ref.norm()).item()


def compare(original, locked, batch: tuple[int, int], new_tokens: int, repeats: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, batch, generator=g).to(DEV)
    prompt = torch.randint(0, vocab, (1, 16), generator=g).to(DEV)
    paths = {"original": (original, True, False), "locked_fast": (locked, True, False),
             "locked_reference": (locked, False, False)}
    if DEV == "cpu":  # the opt-in compiled decode path (weightlock.load(..., compile=True))
        paths["locked_compiled"] = (locked, True, True)
    t = measure(paths, ids, prompt, new_tokens, repeats)
    res = {"prefill_batch": list(batch), "decode_new_tokens": new_tokens, "decode_prompt": 16,
           "repeats": repeats, "seconds": t, "fast_vs_reference_logits_rel_diff": agreement(locked, ids[:2])}
    if DEV == "cpu":
        res["compiled_vs_reference_logits_rel_diff"] = agreement(locked, ids[:1, :8], compiled=True)
    for path in [p[len("locked_"):] for p in paths if p != "original"]:
        for what in ("prefill", "decode"):
            res[f"{what}_ratio_{path}"] = t[f"locked_{path}"][what] / t["original"][what]
    res["decode_tokens_per_s"] = {k: new_tokens / v["decode"] for k, v in t.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    res = {"command": "python bench/dlr_inference.py", "device": DEV}
    if DEV == "cpu":
        for d in (args.base, args.locked):
            if not Path(d).is_dir():
                sys.exit(f"{d} not found: run bench/base_model.py and bench/dlr_fidelity.py first")
        original, locked = load(args.base).eval(), load(args.locked).eval()
        res["small_r32"] = compare(original, locked, (8, 256), 128, args.repeats, original.config.vocab_size)
        print({k: v for k, v in res["small_r32"].items() if "ratio" in k or "rel" in k}, flush=True)
        save("dlr_inference", res)
    else:
        original, locked, _ = llama_shaped_pair(layers=16, rank=64)
        original, locked = original.to(DEV, torch.bfloat16).eval(), locked.to(DEV, torch.bfloat16).eval()
        res["llama_d2048_16l_r64_bf16"] = compare(original, locked, (8, 1024), 128, args.repeats, 4096)
        print(res, flush=True)
        save("dlr_inference_cuda", res)


if __name__ == "__main__":
    main()
