"""``weightlock demo``: the main job, end to end on the built-in corpus."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .io import read_json, write_json


def run_demo(out: Path, quick: bool = False) -> dict:
    """Pretrain the base model (reused when already there) and evaluate it; returns the summary."""
    from .data import load_blocks, load_tokenizer
    from .eval.perplexity import model_perplexity, unigram_perplexity
    from .train.pretrain import METRICS_FILE, default_config, pretrain

    console = Console()
    preset = "tiny" if quick else "small"
    out = Path(out)
    base = out / f"base-{preset}"
    if (base / METRICS_FILE).exists() and not (base / "checkpoint").exists():
        console.print(f"reusing {base}")
    else:
        console.print(f"[bold]pretraining the {preset} base model on builtin:code[/] -> {base}")
        pretrain(default_config(preset), base, overwrite=False, resume=True)
    tok = load_tokenizer(base)
    block = default_config(preset).block_size
    rows = {}
    for domain in ("code", "prose"):
        r = model_perplexity(base, f"builtin:{domain}", "validation", max_tokens=32768)
        train = load_blocks(f"builtin:{domain}", "train", tok, block, 2_000_000)
        val = load_blocks(f"builtin:{domain}", "validation", tok, block, 32768)
        rows[domain] = {"model_ppl": r["perplexity"], "unigram_ppl": unigram_perplexity(train, val, len(tok))}
    summary = {"preset": preset, "base_model": str(base), "parameters": read_json(base / METRICS_FILE)["parameters"],
               "validation": rows}
    write_json(out / "summary.json", summary)
    t = Table(title=f"weightlock demo ({preset}): base model capability (validation perplexity)")
    for c in ("domain", "model", "unigram baseline"):
        t.add_column(c)
    for d, r in rows.items():
        t.add_row(d, f"{r['model_ppl']:.2f}", f"{r['unigram_ppl']:.2f}")
    console.print(t)
    console.print(f"summary written to {out / 'summary.json'}")
    return summary
