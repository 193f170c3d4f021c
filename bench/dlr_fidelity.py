"""Benchmark: DLR-Lock fidelity of the `small` base model at equal parameter count, per rank.

    python bench/dlr_fidelity.py [--base runs/bench/base-small] [--ranks 8 16 32 64]

Needs the base model of bench/base_model.py (trained if missing). Writes bench/results/dlr_fidelity.json:
for each rank the depth, parameter counts, per-layer held-out relative error, validation perplexity of
the original and the locked model on the training domain (builtin:code) and their ratio, and the
wall time of locking. Also records the design-option comparison (activation, per-block norm, init) on
one layer, which is how the defaults were chosen.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from weightlock import schema
from weightlock.data import load_blocks, load_tokenizer
from weightlock.dlr import DLRSpec, LockConfig, capture, fit_layer, load, lock
from weightlock.experiments.harness import save
from weightlock.train.pretrain import default_config, pretrain


def options_study(base: Path, layer: int = 1) -> list[dict]:
    model, tok = load(base), load_tokenizer(base)
    x, y = capture(model, load_blocks("builtin:code", "train", tok, 128, 131072), [layer])[layer]
    d = model.config.hidden_size
    rows = []
    variants = [dict(), dict(activation="relu"), dict(activation="silu"), dict(norm=True),
                dict(init_scale=1.0), dict(lr=3e-3)]
    for v in variants:
        v = dict(v)
        cfg = LockConfig(steps=200, progress=False, lr=v.pop("lr", 1e-2))
        spec = DLRSpec(d, 32, 32 if not v.get("norm") else 31, **v)
        _, st = fit_layer(x, y, spec, cfg)
        rows.append({"variant": v or {"default": True}, "lr": cfg.lr, "steps": cfg.steps,
                     "rel_error": st["rel_error"], "seconds": st["seconds"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--out-prefix", default="runs/bench/locked-r")
    args = ap.parse_args()
    base = Path(args.base)
    if not (base / "metrics.json").exists():
        pretrain(default_config("small"), base, overwrite=True)
    results = []
    for r in args.ranks:
        rep = lock(base, f"{args.out_prefix}{r}", LockConfig(rank=r, progress=False), overwrite=True)
        results.append({
            "rank": r, "depth": rep["layers"][0]["spec"]["depth"],
            "parameters_before": rep["parameters_before"], "parameters_after": rep["parameters_after"],
            "parameter_ratio": rep["parameters_after"] / rep["parameters_before"],
            "mlp_parameters": rep["mlp_parameters"][0], "dlr_parameters": rep["dlr_parameters"][0],
            "layer_rel_error": [l["rel_error"] for l in rep["layers"]],
            "ppl_original": rep["ppl_before"], "ppl_locked": rep["ppl_after"], "ppl_ratio": rep["ppl_ratio"],
            "lock_seconds": rep["seconds"], "distill_tokens_per_s": [l["tokens_per_s"] for l in rep["layers"]],
        })
        print(results[-1], flush=True)
    save("dlr_fidelity", {"command": "python bench/dlr_fidelity.py", "base": str(base),
                          "eval": "validation perplexity, builtin:code, 32,768 tokens",
                          "lock_config": LockConfig().__dict__, "ranks": results,
                          "options_study": options_study(base)}, kind=schema.LOCK_FIDELITY)


if __name__ == "__main__":
    main()
