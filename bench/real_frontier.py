"""Benchmark: the partial-lock frontier on SmolLM2-135M, beside weight quantization.

    python bench/real_frontier.py --run r32-sink-r4        # the fitted layers of bench/real_model.py --name ...

From the module-wise fits a lock run kept (``--keep-work``), with no end-to-end refinement:
1. each layer's DLR-Net swapped in alone: KL to the original, top-1 agreement (its sensitivity);
2. the frontier: the k least damaging layers locked together (k = 1 … 30): perplexity ratio on held-out prose
   and code, top-1 agreement, KL, and the attacker's exact saved-activation bytes of a full fine-tuning
   step (one 256-token sequence, autograd's own count) relative to the original's;
3. 8-bit and 4-bit round-to-nearest weight quantization (group-wise, asymmetric; groups of 64 and 32) of
   every linear map in the transformer layers, on the same text.
Held-out text: the test split of builtin:prose and builtin:code (never used to calibrate), 256-token blocks.
Writes bench/results/real_frontier_RUN.json and .png; stages cached in runs/real/RUN/frontier/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from weightlock import load
from weightlock.data import load_blocks, load_tokenizer
from weightlock.dlr.distill import fidelity_metrics, install_layer, teacher_logprobs
from weightlock.dlr.modeling_weightlock_dlr import DLRSpec, adapter_for, find_layers
from weightlock.experiments.harness import save
from weightlock.io import read_json, write_json

SPECS = ("builtin:prose", "builtin:code")


def evaluate(model, data: dict) -> dict:
    out = {s: fidelity_metrics(model, b, *data[s]["teacher"]) for s, b in ((s, data[s]["blocks"]) for s in SPECS)}
    out["worst_ppl_ratio"] = max(out[s]["ppl_ratio"] for s in SPECS)
    out["min_top1_agreement"] = min(out[s]["top1_agreement"] for s in SPECS)
    out["mean_kl"] = sum(out[s]["kl"] for s in SPECS) / len(SPECS)
    return out


def saved_bytes(model, x: torch.Tensor) -> int:
    from weightlock.train.probe import saved_bytes_of_step

    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    b = saved_bytes_of_step(model, lambda: model(input_ids=x, labels=x).loss)
    model.eval()
    return b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--run", required=True, help="name of a bench/real_model.py run made with --keep-work")
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    ap.add_argument("--sensitivity-blocks", type=int, default=4, help="256-token blocks per domain for step 1")
    ap.add_argument("--stages", default="sensitivity,frontier,quantization",
                    help="which stages to run now (each cached; the result JSON is written when all three are)")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    torch.manual_seed(0)
    work = Path(args.out) / args.run / "locked" / ".weightlock-work"
    cache = Path(args.out) / args.run / "frontier"
    cache.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.model)
    original = load(args.model).eval()
    layers_n = original.config.num_hidden_layers
    fitted = [k for k in range(layers_n) if (work / f"layer_{k}.json").exists()]
    stats = {k: read_json(work / f"layer_{k}.json") for k in fitted}
    data = {}
    for s in SPECS:
        b = load_blocks(s, "test", tok, 256, args.tokens)
        data[s] = {"blocks": b, "teacher": teacher_logprobs(original, b)}
    small = {}
    for s in SPECS:
        b = data[s]["blocks"][:args.sensitivity_blocks]
        small[s] = {"blocks": b, "teacher": teacher_logprobs(original, b)}

    def locked_with(ids: list[int]):
        m = load(args.model).eval()
        adapter = adapter_for(m)
        layers = find_layers(m, adapter)
        for k in ids:
            install_layer(layers[k], adapter, DLRSpec(**stats[k]["spec"]), work / f"layer_{k}.safetensors", "cpu")
        return m

    sens_path = cache / "sensitivity.json"
    sens = read_json(sens_path) if sens_path.exists() else {}
    for k in fitted if "sensitivity" in stages else []:
        if str(k) in sens:
            continue
        t0 = time.perf_counter()
        sens[str(k)] = evaluate(locked_with([k]), small)
        sens[str(k)]["seconds"] = time.perf_counter() - t0
        write_json(sens_path, sens)
        print(f"layer {k}: KL {sens[str(k)]['mean_kl']:.4f} top-1 {sens[str(k)]['min_top1_agreement']:.3f}", flush=True)
    order = sorted((k for k in fitted if str(k) in sens), key=lambda k: sens[str(k)]["mean_kl"])
    x = data[SPECS[0]]["blocks"][:1]
    base_bytes = saved_bytes(load(args.model), x) if "frontier" in stages else None
    front_path = cache / "frontier.json"
    front = read_json(front_path) if front_path.exists() else {}
    for n in [n for n in (1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30) if n <= len(order) and "frontier" in stages]:
        if str(n) in front:
            continue
        m = locked_with(order[:n])
        front[str(n)] = {"layers": sorted(order[:n]), **evaluate(m, data),
                         "saved_activation_bytes": saved_bytes(m, x)}
        front[str(n)]["activation_memory_multiplier"] = front[str(n)]["saved_activation_bytes"] / base_bytes
        write_json(front_path, front)
        f = front[str(n)]
        print(f"{n} layers: ppl ratio {f['worst_ppl_ratio']:.3f} top-1 {f['min_top1_agreement']:.3f} "
              f"KL {f['mean_kl']:.3f} memory x{f['activation_memory_multiplier']:.2f}", flush=True)
    quant_path = cache / "quantization.json"
    quant = read_json(quant_path) if quant_path.exists() else {}
    from weightlock.eval.quantize import quantize_linear_layers_

    for bits, group in ((8, 64), (4, 64), (4, 32)) if "quantization" in stages else ():
        key = f"rtn{bits}-g{group}"
        if key in quant:
            continue
        m = load(args.model).eval()
        quantize_linear_layers_(m, bits, group)
        quant[key] = {"bits": bits, "group_size": group, **evaluate(m, data)}
        write_json(quant_path, quant)
        print(key, f"ppl ratio {quant[key]['worst_ppl_ratio']:.4f} top-1 {quant[key]['min_top1_agreement']:.3f}",
              flush=True)
    if stages != {"sensitivity", "frontier", "quantization"}:
        return
    result = {"command": "python bench/real_frontier.py " + " ".join(sys.argv[1:]), "model": args.model,
              "run": args.run, "held_out_tokens_per_domain": args.tokens, "sensitivity": sens,
              "order": order, "frontier": front, "quantization": quant,
              "baseline_saved_activation_bytes": base_bytes,
              "layer_stats": {k: {f: stats[k].get(f) for f in ("rel_error", "rel_error_tokens", "outlier_rel_error")}
                              for k in fitted}}
    save(f"real_frontier_{args.run}", result)
    plot(result, Path(__file__).resolve().parent / "results" / f"real_frontier_{args.run}.png")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(n) for n in r["frontier"])
    f = [r["frontier"][str(n)] for n in ns]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ns, [x["worst_ppl_ratio"] for x in f], "o-", label="DLR partial lock (no refinement)")
    a.set_yscale("log")
    a.set_xlabel("MLPs locked (least damaging first)")
    a.set_ylabel("perplexity ratio (worse of prose, code)")
    b.plot(ns, [x["min_top1_agreement"] for x in f], "o-", label="DLR partial lock (no refinement)")
    b.set_xlabel("MLPs locked (least damaging first)")
    b.set_ylabel("top-1 agreement (lower of prose, code)")
    for (key, q), ls in zip(r["quantization"].items(), ("--", ":", "-.")):  # in the legend: the lines overlap
        a.axhline(q["worst_ppl_ratio"], ls=ls, lw=1.2, color="gray", label=f"{key} quantization")
        b.axhline(q["min_top1_agreement"], ls=ls, lw=1.2, color="gray", label=f"{key} quantization")
    a.axhline(1.05, color="red", lw=1, label="bar")
    b.axhline(0.90, color="red", lw=1, label="bar")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M: partial locks vs weight quantization (gray), bars in red — run {r['run']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
