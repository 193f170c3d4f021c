"""Benchmark: PMP across mask ratios — base quality and what fine-tuning gains with and without the mask.

    python bench/pmp_sweep.py [--base runs/bench/base-small] [--workers 2]

For ρ ∈ {0.1, 0.3, 0.5, 0.7, 0.9} pretrains a hardened PMP model of the `small` preset on builtin:code
with the dense base model's settings (same data, optimizer, schedule, 400 Stage-II steps; early-bird
discovery capped at 100 steps), unless runs/bench/pmp/hardened-rho{ρ} already holds one. Then, on a
domain not used in pretraining (prose: held-out perplexity) and a skill task (recall: exact match), runs
for each PMP model and the dense base model (the reference, `--base`, from bench/base_model.py):

- unauthorized full fine-tuning (`full`) and unauthorized LoRA on attention (`lora`);
- the mask-recovery attack with the best public signal on the hardened default (`mask-recover`,
  spectral; bench/pmp_recovery.py) + fine-tuning of the guessed entries;
- authorized fine-tuning with the owner's private mask (`masked`; PMP models only);

each at two learning rates, reporting the best (the attacker's and the owner's best alike). Writes
bench/results/pmp_sweep.json and pmp_sweep.png (gain vs ρ). Runs are kept under runs/bench/pmp-sweep.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from weightlock import schema
from weightlock.experiments.harness import RESULTS, save
from weightlock.io import set_threads_per_process

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
TASKS = ("prose", "recall")
STEPS = 40
METHODS = {  # label: (attack, options, learning rates)
    "full": ("full", {}, [1e-3, 3e-3]),
    "lora": ("lora", {"targets": "attention"}, [3e-3, 1e-2]),
    "mask-recover": ("mask-recover", {"method": "spectral"}, [1e-3, 3e-3]),
    "masked (authorized)": ("masked", {}, [1e-3, 3e-3]),
}


def pretrain_job(args) -> dict:
    ratio, out = args
    from weightlock.io import read_json
    from weightlock.pmp import PMPConfig, pretrain_pmp
    from weightlock.train.pretrain import default_config

    run = Path(out) / f"hardened-rho{ratio}"
    if (run / "pmp_run.json").exists():
        return read_json(run / "pmp_run.json")
    cfg = default_config("small")
    cfg.train.progress = False
    pmp = PMPConfig(mask_ratio=ratio, discovery_max_steps=100)
    return pretrain_pmp(cfg, pmp, run, overwrite=True)


def attack_job(args) -> dict:
    model, label, task, ratio, mask, out = args
    from weightlock.attacks import run_attack

    name, options, lrs = METHODS[label]
    options = dict(options)
    if name == "masked":
        options["mask"] = mask
    if name == "mask-recover":
        options["mask_ratio"] = ratio  # the attacker knows ρ (published configurations are public)
    runs = [run_attack(model, task, name, Path(out) / f"lr{lr}", lr=lr, steps=STEPS, batch_size=8, **options)["target"]
            for lr in lrs]
    best = max(range(len(lrs)), key=lambda i: runs[i]["gain"])
    return {"method": label, "task": task, "ratio": ratio, "lrs": lrs, "gains": [r["gain"] for r in runs],
            "best_lr": lrs[best], "gain": runs[best]["gain"], "before": runs[best]["before"]["score"],
            "after": runs[best]["after"]["score"], "capability_ppl_after": runs[best]["capability_ppl_after"],
            "recovered_mask_density": runs[best].get("recovered_mask_density")}


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4))
    for ax, task in zip(axes, TASKS):
        for label in METHODS:
            pts = sorted((r["ratio"], r["gain"]) for r in rows if r["task"] == task and r["method"] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for label, style in (("full", "--"), ("lora", ":")):
            ax.axhline(dense[task][label], ls=style, color="gray", label=f"dense model, {label}")
        ax.set_xlabel("mask ratio ρ (fraction of entries trained in pretraining)")
        ax.set_ylabel("gain (−Δ loss)" if task == "prose" else "gain (Δ exact match)")
        ax.set_title(f"PMP, {task}: fine-tuning gain vs ρ (best of 2 lrs, {STEPS} steps)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/bench/base-small")
    ap.add_argument("--out", default="runs/bench/pmp")
    ap.add_argument("--runs", default="runs/bench/pmp-sweep")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not Path(args.base).is_dir():
        sys.exit(f"{args.base} not found: run bench/base_model.py first")
    with ProcessPoolExecutor(args.workers, initializer=set_threads_per_process,
                             initargs=(args.workers,)) as pool:
        pre = dict(zip(RATIOS, pool.map(pretrain_job, [(r, args.out) for r in RATIOS])))
        jobs = []
        for task in TASKS:
            for label in ("full", "lora"):
                jobs.append((args.base, label, task, None, None, Path(args.runs) / "dense" / task / label))
            for r in RATIOS:
                run = Path(args.out) / f"hardened-rho{r}"
                for label in METHODS:
                    jobs.append((str(run / "release"), label, task, r, str(run / "private" / "mask.safetensors"),
                                 Path(args.runs) / f"rho{r}" / task / label.split()[0]))
        results = list(pool.map(attack_job, jobs))
    dense = {t: {r["method"]: r["gain"] for r in results if r["ratio"] is None and r["task"] == t} for t in TASKS}
    rows = [r for r in results if r["ratio"] is not None]
    from weightlock.io import read_json

    base_ppl = read_json(Path(args.base) / "metrics.json")["val_ppl"]  # same evaluation as PMP's val_ppl
    plot(rows, dense, RESULTS / "pmp_sweep.png")
    save("pmp_sweep", {"command": "python bench/pmp_sweep.py", "steps": STEPS, "batch": [8, 128],
                       "dense_val_ppl": base_ppl,
                       "pretraining": {str(r): {k: v for k, v in pre[r].items()
                                                if k in ("val_ppl", "density", "discovery")}
                                       for r in RATIOS},
                       "dense_gains": dense, "rows": rows}, kind=schema.PMP_GAIN_VS_RATIO)
    for r in rows:
        print(f"ρ={r['ratio']} {r['task']:7s} {r['method']:20s} gain {r['gain']:+.3f} "
              f"(dense full {dense[r['task']]['full']:+.3f})")


if __name__ == "__main__":
    main()
