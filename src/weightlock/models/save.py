"""Saving Hugging Face model directories, atomically (the lowest layer every writer of weights uses)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from ..io import move_dir_contents


def quiet_progress() -> None:
    """No transformers progress bars while loading or saving (weightlock shows its own)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def save_model_dir(model, tokenizer, out: str | os.PathLike, extra_files: dict[str, object] | None = None,
                   module_names: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` (+ JSON ``extra_files``) into ``out`` as a standard HF checkpoint.

    Everything is written to a temporary folder first and then moved in file by file with ``os.replace``,
    so a crash never leaves a half-written ``model.safetensors`` in ``out``. ``module_names=True`` writes the
    weights under the module's own parameter names (no legacy-name conversion), for modeling code of our own.
    """
    quiet_progress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        if module_names:
            from safetensors.torch import save_file

            model.config.save_pretrained(str(tmp))
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(str(tmp))
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(dedupe_shared(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
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



def dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first of each."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs only errors inside the block (no load-report tables or advice meant for its own
    users; weightlock reports what matters as one line)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
