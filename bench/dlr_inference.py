"""Benchmark: inference speed of a locked model (fast DLR path and reference path) vs the original.

    python bench/dlr_inference.py [--base runs/bench/base-small] [--locked runs/bench/locked-r32]

(`weightlock run dlr-fidelity --out runs/bench` produces the two directories.) Writes
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
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from weightlock.dlr import load
from weightlock.dlr.modeling_weightlock_dlr import DLRNet
from weightlock.experiments.harness import RESULTS, llama_shaped_pair, save

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


@contextlib.contextmanager
def reference_path():
    """Every DLR-Net runs its reference path (``DLRNet.fast = False``) inside the block; the default after it."""
    DLRNet.fast = False
    try:
        yield
    finally:
        DLRNet.fast = True


def agreement(locked, ids, compiled: bool = False) -> float:
    """Relative difference of the logits of the fast (or compiled) path and the reference path."""
    with torch.no_grad():
        DLRNet.compile_small = compiled
        fast = locked(ids).logits.float()
        DLRNet.compile_small = False
        with reference_path():
            ref = locked(ids).logits.float()
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


def smollm2_locked(original_dir: str, rank: int, form: str = "plain"):
    """SmolLM2 with all 30 MLPs replaced by random-weight DLR-Nets of equal parameter count at ``rank``: the plain
    form (``U·gelu(V·z)``, depth 72 at rank 32) or the gated form (``U·(silu(G·z) ⊙ V·z)``, depth 48); read-out
    4, the sink component. Speed does not depend on the values, and a random net exercises every term of the
    maths the agreement checks compare."""
    from weightlock.dlr.distill import match_depth
    from weightlock.dlr.modeling_weightlock_dlr import DLRSpec, adapter_for, apply_dlr, find_layers, mlp_num_parameters

    model = load(original_dir).eval()
    adapter = adapter_for(model)
    layers = find_layers(model, adapter)
    width = model.config.hidden_size
    depth = match_depth(mlp_num_parameters(layers[0], adapter), width, rank, form=form)
    spec = DLRSpec(width, rank, depth, readout=4.0, sink=True, init_scale=1.0, form=form,
                   activation="silu" if form == "gated" else "gelu")
    apply_dlr(model, [spec.__dict__] * len(layers), adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for net in model.modules():
            if isinstance(net, DLRNet):
                net.reset_parameters()
                net.sink.value.normal_(0, 0.01)
    return model.eval(), depth


def cost_per_token(model, dtype, context: int) -> dict:
    """What one decoding step of one sequence must do: the bytes of weights it reads (every parameter once: the
    tied embedding is read whole by the output head; the CPU kernel's packed copy of a DLR-Net replaces, not
    adds to, the net's own reads) and its FLOPs (2 per weight of every matmul, plus attention over ``context``
    cached positions: 4·layers·d·context)."""
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() for p in params if p.dim() >= 2)
    cfg = model.config
    return {"bytes": sum(p.numel() for p in params) * torch.finfo(dtype).bits // 8,
            "flops": 2 * weights + 4 * cfg.num_hidden_layers * cfg.hidden_size * context}


def read_bandwidth(repeats: int = 7) -> float:
    """This core's memory read bandwidth (bytes/s, one thread): the best of ``repeats`` sums over 256 MiB, far
    beyond the caches — the bound a decode step that reads every weight once cannot beat."""
    torch.set_num_threads(1)
    x = torch.ones(64 * 2**20)
    best = min(timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best


def machine_flags() -> dict:
    """The CPU's model and the instruction-set flags the kernels use (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "")
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": model, "flags": [f for f in keep if f in flags]}


class _StepClock:
    """A stopping criterion that never stops: it stamps the time at which each generated token is ready, so
    that one ``generate`` call gives every decoding step's duration."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def smollm2_setting(original, locked, dtype, threads: int, batch: int, repeats: int, prefill_tokens: int,
                    new_tokens: int, prefill_passes: int = 3) -> dict:
    """Prefill (``batch`` × ``prefill_tokens``, one forward) and decode (greedy, KV cache, ``new_tokens`` after a
    16-token prompt, ``batch`` rows) of the original and the lock on its default path, interleaved (which runs
    first alternates round by round), after one warm-up round. A round times ``prefill_passes`` prefill pairs
    (original and lock back to back) and one decode pair. Each ratio is a median of paired locked ÷ original
    times, so that drift in the machine's load between pairs cancels and a burst of load spoils only the pairs
    it hits: prefill over the ``repeats × prefill_passes`` pairs; decode over the ``repeats × (new_tokens − 1)``
    pairs of single decoding steps (step k of the lock's call against step k of the original's in the same
    round; the first step, which also encodes the prompt, left out). ``decode_call_ratio`` (the median of the
    whole calls' paired ratios), ``ratio_of_medians`` and the pairs' quartiles are recorded beside them."""
    from transformers import StoppingCriteriaList

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    vocab = original.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prefill_tokens), generator=g)
    prompt = torch.randint(0, vocab, (batch, 16), generator=g)
    models = {"original": as_dtype(original, dtype), "locked": as_dtype(locked, dtype)}
    times = {k: {"prefill": [], "decode": []} for k in models}
    steps = {k: [] for k in models}  # per round, the durations of decoding steps 2 .. new_tokens
    with torch.no_grad():
        for i in range(repeats + 1):  # the order alternates round by round, so that load drift hits both alike
            order = list(models.items()) if i % 2 else list(reversed(models.items()))
            for _ in range(prefill_passes if i else 1):
                for name, m in order:
                    t0 = time.perf_counter()
                    m(input_ids=ids)
                    if i:
                        times[name]["prefill"].append(time.perf_counter() - t0)
            for name, m in order:
                clock = _StepClock()
                t0 = time.perf_counter()
                m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([clock]))
                if i:
                    times[name]["decode"].append(time.perf_counter() - t0)
                    steps[name].append([b - a for a, b in zip(clock.stamps, clock.stamps[1:])])
    med = {k: {w: statistics.median(v) for w, v in d.items()} for k, d in times.items()}
    pairs = {w: [a / b for a, b in zip(times["locked"][w], times["original"][w])] for w in ("prefill", "decode")}
    step_pairs = [a / b for la, ob in zip(steps["locked"], steps["original"]) for a, b in zip(la, ob)]
    return {"dtype": str(dtype).removeprefix("torch."), "threads": threads, "batch": batch,
            "prefill_tokens": prefill_tokens, "decode_new_tokens": new_tokens, "decode_prompt": 16,
            "repeats": repeats, "prefill_passes": prefill_passes, "median_s": med, "all_s": times,
            "decode_step_s": {k: [statistics.median(r) for r in v] for k, v in steps.items()},
            "prefill_ratio": statistics.median(pairs["prefill"]),
            "decode_ratio": statistics.median(step_pairs),
            "decode_call_ratio": statistics.median(pairs["decode"]),
            "ratio_of_medians": {w: med["locked"][w] / med["original"][w] for w in ("prefill", "decode")},
            "pair_ratio_quartiles": {w: statistics.quantiles(v, n=4) if len(v) > 1 else v for w, v in pairs.items()},
            "decode_step_ratio_quartiles": statistics.quantiles(step_pairs, n=4) if len(step_pairs) > 1 else step_pairs,
            "decode_tokens_per_s": {k: batch * new_tokens / v["decode"] for k, v in med.items()},
            "prefill_tokens_per_s": {k: batch * prefill_tokens / v["prefill"] for k, v in med.items()}}


def as_dtype(model, dtype):
    """A copy of ``model`` in ``dtype``: the benches never convert the models they are given in place (a round
    trip through bf16 would round an fp32 model's weights for every later measurement)."""
    return copy.deepcopy(model).to(dtype)


def greedy_vs_fp32(locked, dtype, prompts: int = 48, batch: int = 8, tokens: int = 32) -> dict:
    """How many of ``prompts`` random 8-token prompts (in batches of ``batch``) get the same ``tokens`` greedy
    tokens as the fp32 model (``locked``, unconverted, default path) on the default and on the reference path in
    ``dtype``, and how many the two paths share: whether a path's disagreement with the other is its own error or
    the dtype's (two implementations that round alike but sum in another order part where two logits are close)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, locked.config.vocab_size, (prompts, 8), generator=g)
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    def run(model):
        return torch.cat([model.generate(ids[i:i + batch], **gen) for i in range(0, prompts, batch)])

    with torch.no_grad():
        exact = run(locked)
        low = as_dtype(locked, dtype)
        default = run(low)
        with reference_path():
            ref = run(low)

    def rows(a, b):
        return sum(bool(torch.equal(x, y)) for x, y in zip(a, b))

    return {"prompts": prompts, "batch": batch, "tokens": tokens,
            "rows_identical_to_fp32": {"default": rows(default, exact), "reference": rows(ref, exact)},
            "tokens_equal_to_fp32": {"default": int((default[:, 8:] == exact[:, 8:]).sum()),
                                     "reference": int((ref[:, 8:] == exact[:, 8:]).sum())},
            "rows_default_equal_reference": rows(default, ref)}


def path_agreement(locked, dtype) -> dict:
    """The default path against the reference path (``DLRNet.fast = False``): relative difference of the logits
    of a decode-sized input and of a prefill (the CPU kernel's paths where it runs), and whether 32 greedy tokens
    with the KV cache are identical (one prompt, and a batch of 8 prompts: the batched decode path); in fp32 also
    both paths' prefill logits against the model run in fp64 (the reference path's own error). ``locked`` (fp32)
    is not converted: the measurements run on a copy in ``dtype``."""
    locked = as_dtype(locked, dtype)
    g = torch.Generator().manual_seed(2)
    short = torch.randint(0, locked.config.vocab_size, (1, 8), generator=g)
    long = torch.randint(0, locked.config.vocab_size, (2, 128), generator=g)
    batch = torch.randint(0, locked.config.vocab_size, (8, 8), generator=g)
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    out = {}
    with torch.no_grad():
        net = next(m for m in locked.modules() if isinstance(m, DLRNet))
        out["decode_path"] = net.inference_path(torch.zeros(1, 1, net.spec.width, dtype=dtype))
        out["prefill_path"] = net.inference_path(torch.zeros(2, 128, net.spec.width, dtype=dtype))
        default = [locked(short).logits.float(), locked(long).logits.float(), locked.generate(short, **gen),
                   locked.generate(batch, **gen)]
        with reference_path():
            ref = [locked(short).logits.float(), locked(long).logits.float(), locked.generate(short, **gen),
                   locked.generate(batch, **gen)]
    out["short_logits_rel_diff"] = ((default[0] - ref[0]).norm() / ref[0].norm()).item()
    out["prefill_logits_rel_diff"] = ((default[1] - ref[1]).norm() / ref[1].norm()).item()
    out["greedy_identical"] = bool(torch.equal(default[2], ref[2]))
    out["greedy_batch8_identical"] = bool(torch.equal(default[3], ref[3]))
    out["greedy_tokens"] = 32
    if dtype == torch.float32:  # both paths against the exact (fp64) prefill logits: how far the reference is
        with torch.no_grad():
            exact = locked.double()(long).logits
        out["prefill_logits_vs_fp64"] = {name: ((logits.double() - exact).norm() / exact.norm()).item()
                                         for name, logits in (("default", default[1]), ("reference", ref[1]))}
    return out


def fidelity(model_dir: str, original, locked, tokens: int) -> dict:
    """The lock's perplexity ratio against the original in fp32 and in bf16 (both models in that dtype, the
    default inference paths) on ``tokens`` held-out tokens of each built-in corpus, 256-token blocks; issue
    #36: a bf16 lock keeps its fidelity when its ratio is within 0.005 of the fp32 one."""
    from weightlock.data import load_blocks, load_tokenizer
    from weightlock.eval.perplexity import perplexity

    tok = load_tokenizer(model_dir)
    out = {"tokens_per_corpus": tokens, "block_size": 256}
    for data in ("builtin:prose", "builtin:code"):
        blocks = load_blocks(data, "test", tok, 256, tokens)
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            ppl = {name: perplexity(as_dtype(m, dtype), blocks, batch_size=8) for name, m in
                   (("original", original), ("locked", locked))}
            row[str(dtype).removeprefix("torch.")] = {**ppl, "ratio": ppl["locked"] / ppl["original"]}
        row["bf16_minus_fp32_ratio"] = row["bfloat16"]["ratio"] - row["float32"]["ratio"]
        out[data] = row
    return out


BARS = {"decode": 1.10, "prefill": 1.05}  # issue #36: every form, fp32 and bf16, batch 1 and 8, one thread


def smollm2(args) -> None:
    """The real LLM: SmolLM2-135M (``make smollm2``) against random-weight locks of every block form at each rank
    (or a saved release with ``--release``), every dtype, thread count and batch. One invocation is one *run*,
    appended to the results file's ``runs`` (the earlier runs are kept: the bars must hold in two consecutive
    runs)."""
    from weightlock.dlr import cpu_kernel

    name = "dlr_inference_" + (Path(args.release).name if args.release else "smollm2")
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    runs = old.get("runs", [])
    command = "python bench/dlr_inference.py --model " + args.model + (
        f" --release {args.release}" if args.release else f" --ranks {' '.join(map(str, args.ranks))} --forms "
        + " ".join(args.forms)) + f" --threads {' '.join(map(str, args.threads))} --batches " + " ".join(
        map(str, args.batches)) + f" --repeats {args.repeats} --new-tokens {args.new_tokens}" + (
        f" --prefill-passes {args.prefill_passes}")
    run = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine_flags(),
           "cpu_kernel": {"available": cpu_kernel.available(), "packed": cpu_kernel.packed_kinds(),
                          "max_rows": cpu_kernel.MAX_ROWS, "prefill_chunk": cpu_kernel.PREFILL_CHUNK},
           "read_bandwidth_gb_s": read_bandwidth() / 1e9, "bars": BARS, "agreement": {}, "cost_per_token": {},
           "settings": []}
    print(f"read bandwidth {run['read_bandwidth_gb_s']:.1f} GB/s (one thread)", flush=True)
    original = load(args.model).eval()
    targets = [(Path(args.release).name, None, None)] if args.release else [
        (f"r{rank}-{form}", rank, form) for rank in args.ranks for form in args.forms]
    context = 16 + args.new_tokens // 2
    for label, rank, form in targets:
        if args.release:
            locked = load(args.release).eval()
        else:
            locked, _ = smollm2_locked(args.model, rank, form)
        net = next(m for m in locked.modules() if isinstance(m, DLRNet))
        spec = {"rank": net.spec.rank, "depth": net.spec.depth, "form": net.spec.form, "readout": net.spec.readout}
        run["agreement"][label] = {"fp32": path_agreement(locked, torch.float32),
                                   "bf16": path_agreement(locked, torch.bfloat16)}
        run["agreement"][label]["bf16"]["greedy_vs_fp32"] = greedy_vs_fp32(locked, torch.bfloat16)
        if args.release and args.fidelity_tokens:
            run["fidelity"] = fidelity(args.model, original, locked, args.fidelity_tokens)
            print(f"fidelity {run['fidelity']}", flush=True)
        print(f"{label} {spec}: agreement {run['agreement'][label]}", flush=True)
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{label}/{str(dtype).removeprefix('torch.')}"
            run["cost_per_token"][key] = {m: cost_per_token(model, dtype, context)
                                          for m, model in (("original", original), ("locked", locked))}
            for threads in args.threads:
                for batch in args.batches:
                    load_before = os.getloadavg()[0]
                    row = {"target": label, **spec, **smollm2_setting(
                        original, locked, dtype, threads, batch, args.repeats, args.prefill_tokens, args.new_tokens,
                        args.prefill_passes)}
                    # the machine's 1-minute load average before and after: a setting measured beside other work
                    # (load well above its own threads) is marked by it
                    row["load_average"] = [load_before, os.getloadavg()[0]]
                    # seconds per decode step against the bound of reading every weight once at this core's bandwidth
                    for m, c in run["cost_per_token"][key].items():
                        step = row["median_s"][m]["decode"] / args.new_tokens
                        row.setdefault("decode_step_vs_bandwidth_bound", {})[m] = step / (
                            c["bytes"] / (run["read_bandwidth_gb_s"] * 1e9))
                    row["met"] = {w: row[f"{w}_ratio"] <= BARS[w] for w in ("decode", "prefill")}
                    run["settings"].append(row)
                    print(f"{label} {row['dtype']} threads {threads} batch {batch}: decode ×{row['decode_ratio']:.3f} "
                          f"prefill ×{row['prefill_ratio']:.3f} met {row['met']}", flush=True)
                    save(name, {"runs": runs + [run], "summary": summary(runs + [run])})
        del locked
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save(name, {"runs": runs + [run], "summary": summary(runs + [run])})
    torch.set_num_threads(1)


def summary(runs: list) -> dict:
    """Per setting (target, dtype, threads, batch), the ratios of the last two runs, how far they moved apart
    (relative), and whether both met the bars; ``all_met``: every setting of both."""
    last = runs[-2:]
    rows: dict = {}
    for i, run in enumerate(last):
        for s in run["settings"]:
            key = f"{s['target']}/{s['dtype']}/threads{s['threads']}/batch{s['batch']}"
            rows.setdefault(key, {"decode": [None] * len(last), "prefill": [None] * len(last)})
            for w in ("decode", "prefill"):
                rows[key][w][i] = s[f"{w}_ratio"]
    for row in rows.values():
        for w in ("decode", "prefill"):
            vals = [v for v in row[w] if v is not None]
            row[f"{w}_met"] = len(vals) == len(last) and all(v <= BARS[w] for v in vals)
            row[f"{w}_moved"] = (max(vals) - min(vals)) / min(vals) if len(vals) > 1 else None
    return {"runs": len(last), "settings": rows,
            "all_met": bool(rows) and all(r["decode_met"] and r["prefill_met"] for r in rows.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    ap.add_argument("--model", default=None, help="a converted SmolLM2 directory (make smollm2): bench the real LLM")
    ap.add_argument("--release", default=None, help="with --model: bench this saved release against the model "
                    "instead of random-weight locks (results: dlr_inference_<release dir name>.json)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[32])
    ap.add_argument("--forms", nargs="+", default=["plain", "gated"], choices=["plain", "gated"],
                    help="--model: the block forms of the random-weight locks")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prefill-passes", type=int, default=3, help="--model: prefill pairs per round (the prefill "
                    "ratio is the median of repeats × passes pairs)")
    ap.add_argument("--fidelity-tokens", type=int, default=8192, help="--release: held-out tokens per built-in "
                    "corpus for the fp32 / bf16 perplexity ratios (0: skip)")
    args = ap.parse_args()
    if args.new_tokens < 2 or args.prefill_passes < 1 or args.repeats < 1:
        ap.error("--new-tokens must be at least 2 (the first step, which encodes the prompt, is not a decoding "
                 "step), --prefill-passes and --repeats at least 1")
    if args.model:
        smollm2(args)
        return
    res = {"command": "python bench/dlr_inference.py", "device": DEV}
    if DEV == "cpu":
        for d in (args.base, args.locked):
            if not Path(d).is_dir():
                sys.exit(f"{d} not found: build them first: weightlock run dlr-fidelity --out runs/bench")
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
