"""Secrets hygiene for PMP releases: scan for secret material, verify the mask commitment."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import WeightlockError
from ..io import read_json
from .mask import Mask, commitment, load_mask

SECRET_KEYS = ("init_seed", "salt", "mask", "private")


def check_release(directory: str | os.PathLike) -> list[str]:
    """Findings of secret material in ``directory`` (empty list: clean).

    Looks for: mask files (safetensors with bit-packed uint8 tensors or mask metadata), JSON/text files
    with an ``init_seed`` or ``salt`` field, files named like masks or secrets, and raw W0 snapshots
    (safetensors named ``*init*``).
    """
    from safetensors import safe_open

    d = Path(directory)
    if not d.is_dir():
        raise WeightlockError(f"{d}: directory not found")
    findings = []
    for p in sorted(d.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(d).as_posix()
        low = p.name.lower()
        if any(w in low for w in ("mask", "secret", "init_seed", "private")) or ("init" in low and p.suffix in (".safetensors", ".pt", ".bin")):
            findings.append(f"{rel}: file name suggests secret material")
            continue
        if p.suffix == ".safetensors":
            try:
                with safe_open(str(p), "pt") as f:
                    meta = f.metadata() or {}
                    if "salt" in meta or any(k.startswith("shape:") for k in meta):
                        findings.append(f"{rel}: safetensors with mask metadata")
                    elif any(f.get_slice(k).get_dtype() in ("U8", "BOOL") for k in f.keys()):
                        findings.append(f"{rel}: holds uint8/bool tensors (a packed mask?)")
            except Exception as e:
                findings.append(f"{rel}: unreadable safetensors ({type(e).__name__})")
        elif p.suffix in (".json", ".txt", ".md", ".yaml", ".yml", ".py"):
            text = p.read_text(encoding="utf-8", errors="replace")
            if p.suffix == ".json":
                try:
                    keys = _all_keys(json.loads(text))
                except json.JSONDecodeError:
                    keys = set()
                hits = keys & {"init_seed", "salt", "mask_salt", "private_mask"}
                if hits:
                    findings.append(f"{rel}: JSON field(s) {', '.join(sorted(hits))}")
            elif "init_seed" in text:
                findings.append(f"{rel}: mentions init_seed")
    return findings


def _all_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _all_keys(v)}
    return set()


def verify(release: str | os.PathLike, mask_file: str | os.PathLike) -> str:
    """Check that ``mask_file`` matches the release's parameter shapes and its manifest commitment."""
    release = Path(release)
    manifest = read_json(release / "manifest.json")
    want = manifest.get("mask_commitment")
    if not want:
        raise WeightlockError(f"{release}: manifest has no mask commitment (not a PMP release?)")
    mask, salt, _ = load_mask(mask_file)
    check_shapes(mask, release)
    got = commitment(mask, salt)
    if got != want:
        raise WeightlockError(f"{mask_file}: commitment {got[:16]}… does not match the release's {want[:16]}…")
    return got


def check_shapes(mask: Mask, release: Path) -> None:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(release.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    for n, m in mask.items():
        if n not in shapes and not (n == "lm_head.weight" and "model.embed_tokens.weight" in shapes):
            raise WeightlockError(f"mask entry {n!r} is not a parameter of {release}: a mask for another model?")
        if n in shapes and shapes[n] != tuple(m.shape):
            raise WeightlockError(f"mask shape {tuple(m.shape)} for {n!r} does not match {shapes[n]} in {release}: "
                                  "a mask for another model?")
