"""Benchmark: `weightlock plan`'s predictions vs measurements (issue #15).

    python bench/plan_validation.py [--threads 1] [--repeats 5] [--cached]

For three shapes — the small preset (random weights), a 2-layer Llama-shaped slice at d=2048
(weightlock.experiments.harness.llama_shaped_pair) and SmolLM2-135M's shape (random weights of its public config) — and
for the original and its DLR lock, measures one fp32 training step on this CPU: the bytes autograd saves
(full fine-tuning and frozen MLPs / DLR-Nets), torch's FLOP count (full fine-tuning) and the median time
of forward + backward (original and locked steps interleaved), and compares each with the plan's
prediction (same tokens, same dtype, this machine calibrated at the start of the run, at the same thread
count and under the same load). glibc is told to keep freed memory (P.keep_freed_memory, the plan's opt-in
``keep_freed``): the steady state the plan then prices. Writes bench/results/plan_validation.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from weightlock.eval import plan as P
from weightlock.eval.cost import flop_counter, saved_bytes_of_step
from weightlock.experiments.harness import save


def step_times(models: dict, ids, repeats: int) -> dict:
    """Median seconds of one training step (forward + backward) of each model, the models' steps
    interleaved (o, l, o, l, ...) so that a neighbour's load falls on both alike; two warm-up steps each."""
    ts = {k: [] for k in models}
    for i in range(repeats + 2):
        for k, model in models.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            if i >= 2:
                ts[k].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in ts.items()}


def measure(cfg, rank, b, T, repeats):
    out = {}
    for kind in ("original", "locked"):
        r = rank if kind == "locked" else None
        res = {}
        for sc in ("full", "freeze-ffn"):
            torch.manual_seed(0)
            model, specs = P.skeleton(cfg, r, device="cpu")
            P.prepare(model, sc)
            ids = torch.randint(0, cfg.vocab_size, (b, T), generator=torch.Generator().manual_seed(0))
            res[f"saved_bytes_{sc}"] = saved_bytes_of_step(
                model, lambda m=model, x=ids: m(input_ids=x, labels=x, use_cache=False).loss)
            if sc == "full":
                with flop_counter() as fc:
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)
                res["flops"] = fc.get_total_flops()
            del model
        out[kind] = res
    models = {}
    for kind in ("original", "locked"):
        torch.manual_seed(0)
        models[kind] = P.skeleton(cfg, rank if kind == "locked" else None, device="cpu")[0]
    ids = torch.randint(0, cfg.vocab_size, (b, T), generator=torch.Generator().manual_seed(0))
    for kind, t in step_times(models, ids, repeats).items():
        out[kind]["step_time_s"] = t
        print(kind, out[kind], flush=True)
    return out


def compare(name, cfg, rank, b, T, repeats) -> dict:
    t0 = time.perf_counter()
    pred = P.plan(cfg, rank=rank, tokens_per_step=b * T, seq_len=T, dtype="float32",
                  scenarios=["full", "freeze-ffn"], keep_freed=True)
    rows = {(r["model"], r["scenario"]): r for r in pred["rows"]}
    meas = measure(cfg, rank, b, T, repeats)
    res = {"name": name, "rank": rank, "depth": pred["depth"], "batch": b, "seq_len": T,
           "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "models": {}}
    for kind in ("original", "locked"):
        m, f, z = meas[kind], rows[(kind, "full")], rows[(kind, "freeze-ffn")]
        res["models"][kind] = {
            "saved_bytes_full": {"measured": m["saved_bytes_full"], "predicted": f["saved_bytes"],
                                 "rel_err": f["saved_bytes"] / m["saved_bytes_full"] - 1},
            "saved_bytes_freeze_ffn": {"measured": m["saved_bytes_freeze-ffn"], "predicted": z["saved_bytes"],
                                       "rel_err": z["saved_bytes"] / m["saved_bytes_freeze-ffn"] - 1},
            "flops": {"measured": m["flops"], "predicted": f["flops"], "rel_err": f["flops"] / m["flops"] - 1},
            "step_time_s": {"measured": m["step_time_s"], "predicted": f["time_s"],
                            "rel_err": f["time_s"] / m["step_time_s"] - 1},
        }
    mo, ml = meas["original"], meas["locked"]
    ratio_m = ml["step_time_s"] / mo["step_time_s"]
    ratio_p = rows[("locked", "full")]["time_s"] / rows[("original", "full")]["time_s"]
    res["time_ratio_locked_over_original"] = {"measured": ratio_m, "predicted": ratio_p,
                                              "rel_err": ratio_p / ratio_m - 1}
    mem_m = ml["saved_bytes_full"] / mo["saved_bytes_full"]
    mem_p = rows[("locked", "full")]["saved_bytes"] / rows[("original", "full")]["saved_bytes"]
    res["memory_ratio_locked_over_original"] = {"measured": mem_m, "predicted": mem_p, "rel_err": mem_p / mem_m - 1}
    res["seconds"] = time.perf_counter() - t0
    print(name, res["time_ratio_locked_over_original"], res["memory_ratio_locked_over_original"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cached", action="store_true", help="use the cached calibration (default: re-measure it "
                    "now, under the same load as the measurements)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the plan prices a steady-state step whose allocator reuses its memory (PyTorch's caching allocator on
    # GPU does); glibc's default gives freed memory back and the next step faults it in again (see README)
    kept = P.keep_freed_memory()
    cal = P.calibrate("cpu", torch.float32, remeasure=not args.cached, keep_freed=True)
    from transformers import LlamaConfig

    from weightlock.data import builtin_tokenizer
    from weightlock.train.pretrain import default_config

    small = default_config("small").model_config().to_hf(builtin_tokenizer())
    slice_cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16,
                            num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)  # llama_shaped_pair's
    cases = [("small preset", small, 32, 8, 128), ("Llama-shaped slice d=2048, 2 layers", slice_cfg, 64, 1, 256),
             ("SmolLM2-135M shape (random weights)", P.load_config("smollm2-135m"), 32, 1, 256)]
    results = [compare(n, c, r, b, T, args.repeats) for n, c, r, b, T in cases]
    save("plan_validation", {"command": "python bench/plan_validation.py", "threads": args.threads,
                             "dtype": "float32", "calibration": cal, "cases": results,
                             "allocator_keeps_freed_memory": kept,
                             "note": "CPU shared with another long benchmark while measured (2 cores): times are "
                                     "noisy; memory and FLOPs are not affected"})


if __name__ == "__main__":
    main()
