"""Loading model directories, releases and GGUF files: the one loader (never from a hub)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ManifestMismatch, WeightlockError
from ..io import MANIFEST
from .save import quiet_progress, quiet_transformers, save_model_dir  # noqa: F401  (save_model_dir: re-exported, its home is models.save)


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         compile: bool = False, verify: bool = True, trust_remote_code: bool = False):
    """Load any local model — a plain Hugging Face checkpoint directory (causal LM or encoder), a DLR-locked
    release (with its DLR-Nets), a PMP release, or a ``.gguf`` file (converted once into the cache, see
    :func:`weightlock.models.gguf.resolve_model_path`) — the one loader every weightlock command uses.

    * ``verify``: when the directory has a ``manifest.json`` (every weightlock release does), check the
      SHA-256 of each file it lists first and refuse a file that changed (``verify=False`` skips it).
    * Weights missing from the checkpoint are an error, never silently random-initialised.
    * ``compile=True``: DLR-Nets run steps of a few tokens (token-by-token decoding) faster. On CPU through
      one ``torch.compile``'d function per net shape (a C++ compiler is needed; the first call of each new
      token count compiles for a few seconds; without a compiler the eager fast path is used); on CUDA by
      replaying a CUDA graph of the net's inference path (the fused Triton kernel when available), captured
      once per net and step shape.
    * ``trust_remote_code=True`` loads through the modeling file shipped in the directory instead (what a
      user without weightlock gets).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .formats import compile_small, format_of
    from .gguf import resolve_model_path

    quiet_progress()
    d = resolve_model_path(model_dir)  # a .gguf file: its cached Hugging Face conversion
    _check_model_dir(d)
    if verify:
        verify_manifest(d)
    info: dict = {}  # what transformers reports about the keys it loaded (not for a locked release)
    try:
        with quiet_transformers():  # its load report (a table of keys) would bury weightlock's one line
            config = AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)
            archs = getattr(config, "architectures", None) or []
            fmt = None if trust_remote_code else format_of(config)  # a locked release weightlock holds the code of
            if fmt is not None:
                model = fmt.load(config, str(d))
            else:
                auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
                # mismatched shapes are reported below, by name, instead of transformers' pointer to its report
                model, info = auto.from_pretrained(str(d), local_files_only=True, dtype=dtype or torch.float32,
                                                   trust_remote_code=trust_remote_code, output_loading_info=True,
                                                   ignore_mismatched_sizes=True)
        wrong = sorted(info.get("mismatched_keys") or ())
        if wrong:
            k, ckpt, want = wrong[0]
            raise ValueError(f"weights of the wrong shape for the config: {k} is {list(ckpt)} in the checkpoint, "
                             f"the config needs {list(want)}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1
                                                                 else ""))
        missing = [k for k in info.get("missing_keys", ()) if not _tied_key(model, k)]
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {', '.join(sorted(missing)[:4])}"
                             + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    except Exception as e:  # transformers/safetensors raise many types for bad checkpoints
        raise WeightlockError(f"{d}: cannot load the model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    if dtype is not None:
        model = model.to(dtype)
    if compile:
        compile_small(model)
    return model.to(device).eval()


def _tied_key(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def verify_manifest(d: str | os.PathLike) -> None:
    """Check every file listed in ``d/manifest.json`` against its SHA-256; the error (a
    :class:`~weightlock.errors.ManifestMismatch`) names the file."""
    from ..io import read_json, sha256_file

    d = Path(d)
    if not (d / MANIFEST).exists():
        return
    files = read_json(d / MANIFEST).get("files") or {}
    for name, digest in sorted(files.items()):
        f = d / name
        if not f.exists():
            if name.endswith(".safetensors"):
                raise WeightlockError(f"{f}: listed in {MANIFEST} but missing")
            continue
        if sha256_file(f) != digest:  # the way out (verify=False, --no-verify) is the caller's to name
            raise ManifestMismatch(f"{f}: SHA-256 does not match {MANIFEST} (the file was changed or corrupted)")


def _check_model_dir(d: Path) -> None:
    if not d.is_dir():
        raise WeightlockError(f"{d}: model directory not found")
    if not (d / "config.json").exists():
        raise WeightlockError(f"{d}: not a Hugging Face model directory (no config.json)")
    if not any(d.glob("*.safetensors")):
        raise WeightlockError(f"{d}: no .safetensors weights (weightlock never unpickles .bin checkpoints)")
