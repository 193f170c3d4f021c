"""Benchmark: the attacker's memory–time frontier, locked vs unlocked (small model, full fine-tuning).

    python bench/frontier.py [--base runs/bench/base-small] [--locked runs/bench/locked-r32]

For each memory-saving strategy (none, gradient checkpointing per layer / per DLR-Net / per group of
4 DLR blocks, CPU activation offload, micro-batch 2 × accumulation 4, Adafactor) runs a few full
fine-tuning steps on the prose task at an effective batch of 8 × 128 tokens and records the
saved-activation bytes of one micro-batch, the run's own peak memory (RSS high-water mark reset at the
start of the run: its peak and its growth over the memory in use before it — parameters, gradients,
optimizer state, activations, recomputation), torch's FLOP count of one step (forward + backward) and
the median step time. Writes bench/results/frontier.json and bench/results/frontier.png.
"""
from __future__ import annotations

import argparse
import os
import sys

from weightlock import load, schema
from weightlock.attacks import finetune, make_attack
from weightlock.data import load_tokenizer
from weightlock.errors import WeightlockError
from weightlock.eval.cost import PeakMemory
from weightlock.eval.tasks import get_task
from weightlock.experiments.harness import RESULTS, save

STRATEGIES = {
    "none": {},
    "ckpt-layer": {"checkpointing": "layer"},
    "ckpt-dlr": {"checkpointing": "dlr"},
    "ckpt-group4": {"checkpointing": "group:4"},
    "offload": {"offload": True},
    "micro2x4": {"batch_size": 2, "grad_accum": 4},
    "adafactor": {"optimizer": "adafactor"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--locked", default="runs/bench/locked-r32")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--name", default="frontier", help="results file bench/results/NAME.json (+ .png)")
    args = ap.parse_args()
    tok = load_tokenizer(args.base)
    blocks = get_task("prose").train_blocks(tok, 128, 100_000)
    rows = []
    for label, path in (("original", args.base), ("locked", args.locked)):
        for name, opts in STRATEGIES.items():
            model = load(path)
            atk = make_attack("full", **{"steps": args.steps, "batch_size": 8, "block_size": 128, **opts})
            try:
                with PeakMemory() as peak:
                    history, trainer = finetune(model, blocks, atk.cfg)
            except WeightlockError as e:  # e.g. DLR checkpointing on the unlocked model
                rows.append({"model": label, "strategy": name, "skipped": str(e)})
                continue
            times = sorted(h["step_time"] for h in history[1:])
            rows.append({"model": label, "strategy": name, "saved_activation_bytes": trainer.saved_activation_bytes,
                         "step_time_s": times[len(times) // 2], "effective_batch": [8, 128],
                         "flops_per_step": trainer.flops_per_micro_batch * atk.cfg.grad_accum, **peak.as_dict()})
            del model, trainer, history
            print(rows[-1], flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, marker in (("original", "o"), ("locked", "s")):
        pts = [r for r in rows if r["model"] == label and "skipped" not in r]
        ax.scatter([r["saved_activation_bytes"] / 2**20 for r in pts], [r["step_time_s"] for r in pts],
                   marker=marker, label=label)
        for r in pts:
            ax.annotate(r["strategy"], (r["saved_activation_bytes"] / 2**20, r["step_time_s"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("saved activations per micro-batch (MiB, log)")
    ax.set_ylabel("step time (s, median)")
    ax.set_title("Attacker's memory–time frontier: full fine-tuning, small model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    save(args.name, {"command": "python bench/frontier.py " + " ".join(sys.argv[1:]), "base": args.base,
                     "locked": args.locked, "steps": args.steps, "rows": rows,
                     "figure": f"bench/results/{args.name}.png",
                     # glibc's mmap threshold decides whether freed activations go back to the OS (RSS) at once
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")},
         kind=schema.MEMORY_TIME_FRONTIER)


if __name__ == "__main__":
    main()
