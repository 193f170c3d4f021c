"""PMP masks: exact global top-k of |grad| without one giant sort, IoU, bit-packing and commitments."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightlockError

Mask = dict[str, torch.Tensor]  # parameter name -> bool tensor of the parameter's shape


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as int32 bit patterns: same order, exact comparisons."""
    return t.detach().float().abs().contiguous().view(torch.int32)


def topk_mask(scores: dict[str, torch.Tensor], ratio: float, per_tensor: bool = False) -> Mask:
    """The ``ratio`` fraction of entries with the largest |score|, exactly k = round(ratio · n) of them.

    Global selection finds the k-th largest value by bisection over float bit patterns, counting
    entries tensor by tensor (memory: one boolean temporary of the largest tensor), then breaks ties
    at the threshold in flattened order — no sort of all scores at once.
    """
    if not 0.0 < ratio <= 1.0:
        raise WeightlockError(f"mask ratio must be in (0, 1], got {ratio}")
    if per_tensor:
        return {n: topk_mask({n: s}, ratio)[n] for n, s in scores.items()}
    bits = {n: _bits(s) for n, s in scores.items()}
    total = sum(b.numel() for b in bits.values())
    k = max(1, round(ratio * total))
    lo, hi = 0, max(int(b.max()) for b in bits.values())  # invariant: count(>= lo) >= k

    def count_ge(t: int) -> int:
        return sum(int((b >= t).sum()) for b in bits.values())

    while lo < hi:  # the largest t with count(>= t) >= k
        mid = (lo + hi + 1) // 2
        if count_ge(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    above = {n: b > lo for n, b in bits.items()}
    need = k - sum(int(a.sum()) for a in above.values())
    mask = {}
    for n, b in bits.items():
        m = above[n]
        if need > 0:
            eq = (b == lo).reshape(-1)
            idx = eq.nonzero().reshape(-1)[:need]
            m = m.reshape(-1).clone()
            m[idx] = True
            m = m.reshape(b.shape)
            need -= idx.numel()
        mask[n] = m
    return mask


def mask_iou(a: Mask, b: Mask) -> float:
    """Intersection over union of two masks over the same parameters (1.0 for two empty masks)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def mask_density(m: Mask) -> float:
    """The fraction of entries the mask selects."""
    return sum(int(t.sum()) for t in m.values()) / sum(t.numel() for t in m.values())


def chance_iou(ratio: float) -> float:
    """Expected IoU of a random guess of density ρ with a mask of density ρ: ρ/(2−ρ)."""
    return ratio / (2 - ratio)


def pack(mask: Mask) -> dict[str, torch.Tensor]:
    """1 bit per entry (numpy.packbits, big-endian within a byte), one uint8 tensor per parameter."""
    return {n: torch.from_numpy(np.packbits(m.reshape(-1).cpu().numpy().astype(np.uint8))) for n, m in mask.items()}


def commitment(mask: Mask, salt: bytes) -> str:
    """SHA-256 over a secret salt, the parameter names, shapes and packed bits (in name order)."""
    h = hashlib.sha256(salt)
    packed = pack(mask)
    for n in sorted(mask):
        h.update(f"{n}:{tuple(mask[n].shape)};".encode())
        h.update(packed[n].numpy().tobytes())
    return h.hexdigest()


def save_mask(mask: Mask, path: str | os.PathLike, salt: bytes, extra: dict[str, str] | None = None) -> str:
    """Write the bit-packed mask (safetensors, shapes and salt in the metadata), file mode 0600."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    meta = {f"shape:{n}": ",".join(map(str, m.shape)) for n, m in mask.items()}
    meta["salt"] = salt.hex()
    meta.update(extra or {})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in pack(mask).items()}, str(tmp), metadata=meta)
        os.chmod(tmp, 0o600)
    os.chmod(path, 0o600)
    return commitment(mask, salt)


def load_mask(path: str | os.PathLike) -> tuple[Mask, bytes, dict]:
    """Read a mask file written by :func:`save_mask`: ``(mask, salt, metadata)``; a missing or foreign file
    is a :class:`WeightlockError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise WeightlockError(f"{path}: mask file not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            mask = {}
            for n in f.keys():
                shape = tuple(int(x) for x in meta[f"shape:{n}"].split(",") if x)
                numel = int(np.prod(shape)) if shape else 1
                bits = np.unpackbits(f.get_tensor(n).numpy())[:numel]
                mask[n] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    except WeightlockError:
        raise
    except Exception as e:
        raise WeightlockError(f"{path}: not a weightlock mask file ({type(e).__name__}: {e})") from None
    return mask, bytes.fromhex(meta.get("salt", "")), meta
