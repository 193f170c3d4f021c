"""Saving and loading Hugging Face model directories, locally and atomically (never from a hub)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import WeightlockError
from ..io import move_dir_contents


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def save_model_dir(model, tokenizer, out: str | os.PathLike, extra_files: dict[str, object] | None = None,
                   module_names: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` (+ JSON ``extra_files``) into ``out`` as a standard HF checkpoint.

    Everything is written to a temporary folder first and then moved in file by file with ``os.replace``,
    so a crash never leaves a half-written ``model.safetensors`` in ``out``. ``module_names=True`` writes the
    weights under the module's own parameter names (no legacy-name conversion), for modeling code of our own.
    """
    _quiet()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        if module_names:
            from safetensors.torch import save_file

            from ..train.loop import _dedupe_shared

            model.config.save_pretrained(str(tmp))
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(str(tmp))
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(_dedupe_shared(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        move_dir_contents(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_causal_lm(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype=None,
                   trust_remote_code: bool = False):
    """Load a causal LM from a local directory, with a clear error for missing or corrupt checkpoints."""
    from transformers import AutoModelForCausalLM

    _quiet()
    d = Path(model_dir)
    _check_model_dir(d)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype or torch.float32, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/SafetensorError/... for bad checkpoints
        raise WeightlockError(f"{d}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return model.to(device)


def _check_model_dir(d: Path) -> None:
    if not d.is_dir():
        raise WeightlockError(f"{d}: model directory not found")
    if not (d / "config.json").exists():
        raise WeightlockError(f"{d}: not a Hugging Face model directory (no config.json)")
    if not any(d.glob("*.safetensors")):
        raise WeightlockError(f"{d}: no .safetensors weights (weightlock never unpickles .bin checkpoints)")
