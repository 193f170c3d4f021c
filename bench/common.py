"""Shared helpers of the benchmark scripts: where results go and what machine produced them."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def save(name: str, result: dict) -> Path:
    from weightlock.io import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), **result})
    print(f"wrote {path}")
    return path


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
