"""Benchmark: the attention-sink token of SmolLM2-135M's MLPs, with and without the DLR-Net's sink component.

    python bench/real_sink.py --run r32-sink-r4 --layers 11,28,29 [--steps 300]

Measures the run's own fitted nets (with the sink component) on the captures the lock run kept
(``bench/real_model.py --keep-work``: the MLP's inputs and outputs on the calibration text, 128-token
blocks) and refits the same layers without a sink at the same parameter count, for comparison. On the
held-out blocks (split by block, never trained on): the relative error ‖ŷ − y‖ / ‖y‖ (norm, not squared)
of the position-0 (sink) token and its worst single token, the token-weighted error of the ordinary
tokens and the energy-weighted error.
Writes bench/results/real_sink_RUN.json.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from weightlock.dlr.distill import LockConfig, error_stats, fit_layer, holdout_split
from weightlock.dlr.modeling_weightlock_dlr import DLRSpec
from weightlock.experiments.harness import save
from weightlock.io import read_json


def main() -> None:
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
    save(f"real_sink_{args.run}", {"command": "python bench/real_sink.py " + " ".join(sys.argv[1:]),
                                   "run": args.run, "block_size": block, "rows": rows})


if __name__ == "__main__":
    main()
