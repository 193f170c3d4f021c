"""Benchmark: how long `weightlock release check` takes on a SmolLM2-sized PMP release, and that it grows linearly.

    OMP_NUM_THREADS=1 python bench/release_check_scan.py [--model runs/smollm2] [--work DIR]

Builds a PMP-style release from the converted SmolLM2-135M (``weightlock convert smollm2 --out runs/smollm2``;
135M parameters, 538 MB of float32 weights): its weights, config and tokenizer, a private mask (a random
ρ = 0.3 over every weight matrix, as the ``linear`` pool covers), its salt and a secret seed, and a manifest with
the mask commitment, as ``pretrain --method pmp`` writes them. Without ``--model`` (or when it is missing) a
randomly initialised model of SmolLM2-135M's shape stands in. Times in this process (after a warm-up check of an
empty directory, so imports are not counted; the first check of the release also builds its config's model on
the meta device, once per process) `release check` without and with ``--private``: on the clean release, and on
the release with a planted Adam state (two tensors per weight: 3× the bytes to scan); `release prepare` (copy,
model card, manifest and a check of the folder with ``--private``); and the whole CLI command once, as a user
runs it. Writes bench/results/release_check_scan.json.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightlock.experiments.harness import save

SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def build_release(model: Path | None, work: Path) -> tuple[Path, Path]:
    """A PMP-style release (weights, config, tokenizer, manifest with the commitment) and its private directory."""
    from safetensors import safe_open

    from weightlock.io import write_json, write_manifest
    from weightlock.pmp.mask import save_mask

    release, private = work / "release", work / "private"
    release.mkdir(parents=True)
    private.mkdir()
    if model is not None:
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"):  # what a PMP release holds (no chat template: the allow-list refuses it)
            if (model / name).exists():
                shutil.copyfile(model / name, release / name)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from weightlock.models.save import save_model_dir

        torch.manual_seed(0)
        save_model_dir(LlamaForCausalLM(LlamaConfig(**SMOLLM2)), None, release)
    g = torch.Generator().manual_seed(0)
    with safe_open(str(release / "model.safetensors"), "pt") as f:
        mask = {k: torch.rand(f.get_slice(k).get_shape(), generator=g) < 0.3 for k in f.keys()
                if len(f.get_slice(k).get_shape()) == 2}
    salt = secrets.token_bytes(32)
    commit = save_mask(mask, private / "mask.safetensors", salt)
    write_json(private / "secrets.json", {"init_seed": secrets.randbits(63), "salt": salt.hex(), "commitment": commit})
    write_manifest(release, kind="weightlock-pmp", mask_commitment=commit,
                   pmp={"mask_ratio": 0.3, "variant": "hardened", "pool": "linear"})
    return release, private


def plant_adam_state(release: Path, out: Path) -> Path:
    """The release with an Adam state beside it: exp_avg and exp_avg_sq for every weight, zero off the mask."""
    from safetensors.torch import load_file, save_file

    from weightlock.pmp import load_mask

    shutil.copytree(release, out)
    mask, _, _ = load_mask(release.parent / "private" / "mask.safetensors")
    state = load_file(str(release / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    moments = {}
    for k, w in state.items():
        m = mask.get(k, torch.ones_like(w, dtype=torch.bool))
        moments[f"state.{k}.exp_avg"] = torch.where(m, torch.randn(w.shape, generator=g) * 1e-4, 0.0)
        moments[f"state.{k}.exp_avg_sq"] = torch.where(m, torch.rand(w.shape, generator=g) * 1e-8, 0.0)
    save_file(moments, str(out / "optimizer.safetensors"))
    return out


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn()
    return round(time.perf_counter() - t, 2), r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2", help="the converted SmolLM2-135M (a random stand-in if missing)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args()
    from weightlock.pmp import check_release, write_upload_folder

    model = Path(args.model) if Path(args.model, "model.safetensors").exists() else None
    work = Path(args.work or tempfile.mkdtemp(prefix="release-check-scan-"))
    try:
        release, private = build_release(model, work / "pmp")
        warm = work / "warm"
        warm.mkdir()
        check_release(warm)  # imports (transformers, safetensors) once, before the clock
        size = sum(p.stat().st_size for p in release.iterdir())
        rows = {}
        first, _ = timed(lambda: check_release(release))  # also builds the config's model on the meta device once
        t, found = timed(lambda: check_release(release))
        rows["clean"] = {"bytes": size, "first_without_private_s": first, "without_private_s": t,
                         "findings_without_private": len(found)}
        t, found = timed(lambda: check_release(release, private=private))
        rows["clean"].update(with_private_s=t, findings_with_private=len(found))
        leaky = plant_adam_state(release, work / "leaky")
        lsize = sum(p.stat().st_size for p in leaky.iterdir())
        t, found = timed(lambda: check_release(leaky))
        rows["adam_state_planted"] = {"bytes": lsize, "without_private_s": t, "findings_without_private": len(found),
                                      "first_finding_without_private": found[0] if found else None}
        t, found = timed(lambda: check_release(leaky, private=private))
        rows["adam_state_planted"].update(with_private_s=t, findings_with_private=len(found))
        shutil.rmtree(leaky)
        t, r = timed(lambda: write_upload_folder(release, work / "upload", private=private))
        rows["prepare_with_private_s"] = t
        cmd = [sys.executable, "-m", "weightlock.cli", "release", "check", str(release), "--private", str(private)]
        t, p = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
        rows["cli_check_with_private_s"] = t  # the whole command: interpreter start, imports, hashing, scan
        rows["cli_check_rc"] = p.returncode
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"model": str(model) if model else "random SmolLM2-135M-shaped stand-in", "threads":
              torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **rows}
    print(json.dumps(result, indent=2))
    save("release_check_scan", result)


if __name__ == "__main__":
    main()
