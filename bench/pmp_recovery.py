"""Benchmark: PMP mask recovery on the `small` preset, paper variant vs hardened default.

    python bench/pmp_recovery.py [--ratio 0.3] [--steps 400]

Pretrains a PMP model of each variant (same data, steps and optimizer as the dense base model; the
early-bird stage capped at 100 steps), then runs every mask-recovery attack (magnitude, init
regeneration, row/column statistics, spectral, early-bird re-discovery; global and per tensor) and
records IoU with the true mask against the chance level ρ/(2−ρ). Writes bench/results/pmp_recovery.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from weightlock import load, schema
from weightlock.data import load_blocks, load_tokenizer
from weightlock.experiments.harness import save
from weightlock.pmp import PMPConfig, load_mask, pretrain_pmp
from weightlock.pmp.recover import recover_all
from weightlock.train.pretrain import default_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default="runs/bench/pmp")
    args = ap.parse_args()
    rows = {}
    for variant in ("paper", "hardened"):
        cfg = default_config("small", max_steps=args.steps)
        cfg.train.progress = False
        pmp = PMPConfig.paper(args.ratio) if variant == "paper" else PMPConfig(mask_ratio=args.ratio)
        pmp.discovery_max_steps = 100
        run = Path(args.out) / f"{variant}-rho{args.ratio}"
        info = pretrain_pmp(cfg, pmp, run, overwrite=True)
        model = load(run / "release")
        tok = load_tokenizer(run / "release")
        mask, _, _ = load_mask(run / "private" / "mask.safetensors")
        public = load_blocks("builtin:code", "train", tok, 128, 50_000)
        rows[variant] = {"pmp": pmp.__dict__, "discovery": info["discovery"], "val_ppl": info["val_ppl"],
                         "recovery": recover_all(model, mask, pmp, tok, public)}
        print(variant, rows[variant]["recovery"], flush=True)
    save("pmp_recovery", {"command": "python bench/pmp_recovery.py", "mask_ratio": args.ratio,
                          "steps": args.steps, "variants": rows}, kind=schema.MASK_RECOVERY)


if __name__ == "__main__":
    main()
