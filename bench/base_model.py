"""Benchmark: pretrain the `small` preset on builtin:code and record size, speed and perplexity.

    python bench/base_model.py [--out runs/bench/base-small]

Writes bench/results/base_model.json: parameter count, training tokens, wall time, tokens/s, and
validation perplexity on code and prose next to a unigram model's on the same split and tokenizer.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from weightlock.data import load_blocks, load_tokenizer
from weightlock.eval.perplexity import model_perplexity, unigram_perplexity
from weightlock.experiments.harness import save
from weightlock.io import read_json
from weightlock.train.pretrain import default_config, pretrain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/base-small")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished model in --out")
    args = ap.parse_args()
    cfg = default_config(args.preset)
    out = Path(args.out)
    if args.reuse and (out / "metrics.json").exists():
        m = read_json(out / "metrics.json")
    else:
        m = pretrain(cfg, out, overwrite=True)
    tok = load_tokenizer(out)
    ppl = {}
    for domain in ("code", "prose"):
        r = model_perplexity(out, f"builtin:{domain}", "validation", max_tokens=65536)
        train = load_blocks(f"builtin:{domain}", "train", tok, cfg.block_size)
        val = load_blocks(f"builtin:{domain}", "validation", tok, cfg.block_size, 65536)
        ppl[domain] = {"model": r["perplexity"], "unigram": unigram_perplexity(train, val, len(tok)),
                       "tokens": r["tokens"]}
    save(f"base_model_{args.preset}", {
        "command": f"python bench/base_model.py --preset {args.preset}",
        "preset": args.preset, "config": cfg.to_dict(), "parameters": m["parameters"],
        "training_tokens": m["tokens_seen"], "wall_time_s": m["wall_time_s"], "tokens_per_s": m["tokens_per_s"],
        "validation_perplexity": ppl,
        "history": [h for h in m["history"] if "val_ppl" in h],
    })
    for d, r in ppl.items():
        print(f"{d}: model ppl {r['model']:.2f}  unigram ppl {r['unigram']:.2f}")


if __name__ == "__main__":
    main()
