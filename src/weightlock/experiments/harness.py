"""The harness the bench shares (its scripts and the shipped specs' analyses): where results go and what machine
produced them (:func:`save`), what an attack row's step time depends on and its best gain (:func:`timing_key`,
:func:`max_gain`), and the Llama-shaped model pair the memory and timing meters measure
(:func:`llama_shaped_pair`). Attack runs themselves are the experiment engine's one job type
(:class:`weightlock.experiments.engine.AttackJob`).

A bench script imports only from ``weightlock`` (no ``sys.path`` edits) and stays runnable as
``python bench/NAME.py`` from the repository root.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import schema
from ..errors import WeightlockError
from ..io import read_json

RESULTS_ENV = "WEIGHTLOCK_BENCH_RESULTS"


def results_dir() -> Path:
    """Where bench results go: ``$WEIGHTLOCK_BENCH_RESULTS`` when set; else ``results/`` beside the running
    script when that script lives in a folder named ``bench`` (``python bench/x.py`` from anywhere); else
    ``bench/results`` under the current directory."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and Path(main).resolve().parent.name == "bench":
        return Path(main).resolve().parent / "results"
    return Path.cwd() / "bench" / "results"


RESULTS = results_dir()


def save(name: str, result: dict, kind: str | None = None, directory: Path | None = None) -> Path:
    """Write ``result`` to ``RESULTS/NAME.json`` (``directory``: there instead) with the machine, its record
    ``kind`` (one of :data:`weightlock.schema.RECORD_KINDS` for a record the report draws; default: the kind
    ``result`` carries, else ``bench.NAME``, a record no reader draws) and the schema version. A result read back
    and saved again (a re-analysis) keeps the machine that measured it."""
    from ..io import machine_info, write_json

    path = Path(directory or RESULTS) / f"{name}.json"
    record = {"kind": schema.bench_kind(name), "schema_version": schema.SCHEMA_VERSION, "machine": machine_info(),
              **result}
    if kind is not None:
        record["kind"] = kind
    write_json(path, record)
    print(f"wrote {path}")
    return path


def timing_key(row: dict) -> tuple:
    """What an attack row's step time depends on: the model, the attack and its options except rate and seed."""
    opts = {k: v for k, v in row["options"].items() if k not in ("lr", "seed")}
    return (row["model"], row["attack"], tuple(sorted(opts.items())))


def max_gain(row: dict) -> float:
    """An attack row's best gain over its release (:func:`weightlock.eval.cost_to_target.best_gain` of its curve)."""
    from ..eval.cost_to_target import best_gain

    return best_gain(row["cost_curve"])


def llama_shaped_pair(layers: int = 2, rank: int = 64):
    """A random Llama-shaped model at a real width (d=2048, d_ff=8192, vocab 4,096) and its DLR version
    at ``rank`` (random DLR weights: enough for memory and time). Returns (original, locked, specs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..dlr import LockConfig, apply_dlr
    from ..dlr.distill import specs_for

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
    torch.manual_seed(0)
    original = LlamaForCausalLM(cfg)
    _, specs, _ = specs_for(original, LockConfig(rank=rank))
    locked = apply_dlr(LlamaForCausalLM(cfg), [s.__dict__ for s in specs])
    return original, locked, specs


def run_command(commands: dict, doc: str) -> None:
    """The ``main()`` of a bench script that holds several measurements: ``python bench/X.py COMMAND [options]``
    runs ``commands[COMMAND][0]()`` with the command's own arguments (``commands``: name → (function, its
    description)); no command or an unknown one prints ``doc`` and the commands, and exits 2 (0 for ``-h``).
    Each command is the measurement a former script made; results go to bench/results as before."""
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(doc.strip())
        for name, (_, text) in commands.items():
            print(f"  {name:15s} {text.strip().splitlines()[0]}")
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    cmd = sys.argv.pop(1)
    sys.argv[0] = f"{sys.argv[0]} {cmd}"
    commands[cmd][0]()


def release_fidelity(path: str | Path) -> dict:
    """A release's recorded fidelity (its manifest's ``fidelity``: ppl ratio, read-back ppl ratio, by data)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.exists():
        raise WeightlockError(f"{path}: no manifest.json (not a weightlock release)")
    fid = read_json(manifest).get("fidelity") or {}
    if fid.get("ppl_ratio") is None:
        raise WeightlockError(f"{path}: the manifest records no fidelity (ppl_ratio)")
    return fid
