"""Shared helpers of the benchmark scripts: where results go and what machine produced them."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, result: dict) -> Path:
    """Write ``result`` to ``bench/results/NAME.json`` with the machine and its kind (``bench.NAME``)."""
    from weightlock.io import machine_info, write_json
    from weightlock.schema import SCHEMA_VERSION, bench_kind

    path = RESULTS / f"{name}.json"
    write_json(path, {"kind": bench_kind(name), "schema_version": SCHEMA_VERSION, "machine": machine_info(), **result})
    print(f"wrote {path}")
    return path


def attack_job(root: Path, budget: dict, job: tuple) -> dict:
    """One attack run under ``root/TASK/MODEL/LABEL`` (skipped when finished there) with the shared ``budget``
    options, overridden by the job's; ``job`` = (model key, model dir, task, label, attack, options).
    Returns its row: gain, curve and costs."""
    from weightlock.attacks import run_attack
    from weightlock.eval.cost_to_target import run_training_memory

    key, model, task, label, attack, options = job
    out = root / task / key / label
    r = run_attack(model, task, attack, out, **{**budget, **options})["locked"]  # a job's options win
    print(f"{task:7s} {key:8s} {label:28s} gain {r['gain']:+.4f} steps {r['cost_curve'][-1]['step']:3d} "
          f"{r['cost_curve'][-1]['seconds']:6.0f} s", flush=True)
    return {"model": key, "task": task, "label": label, "attack": attack, "options": options, "dir": str(out),
            **{k: r[k] for k in ("gain", "before", "after", "cost_curve", "stopped_early", "capability_ppl_after")},
            "peak_delta_bytes": r["cost"].get("peak_rss_delta_bytes"),  # measured: reported, never a budget
            # counted (parameters + gradients + optimizer state + saved activations): the memory budget's measure
            "training_memory": run_training_memory(r, {**budget, **options}.get("optimizer")),
            "saved_activation_bytes": r["cost"]["saved_activation_bytes_per_step"],
            "step_time_s": r["cost"]["step_time_s"], "prepare_seconds": r["cost"]["prepare_seconds"]}


def llama_shaped_pair(layers: int = 2, rank: int = 64):
    """A random Llama-shaped model at a real width (d=2048, d_ff=8192, vocab 4,096) and its DLR version
    at ``rank`` (random DLR weights: enough for memory and time). Returns (original, locked, specs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightlock.dlr import LockConfig, apply_dlr
    from weightlock.dlr.distill import specs_for

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
    torch.manual_seed(0)
    original = LlamaForCausalLM(cfg)
    _, specs, _ = specs_for(original, LockConfig(rank=rank))
    locked = apply_dlr(LlamaForCausalLM(cfg), [s.__dict__ for s in specs])
    return original, locked, specs
