"""Secrets hygiene for PMP releases: find secret material by name and by content; verify the mask commitment."""
from __future__ import annotations

import json
import mmap
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import WeightlockError
from ..io import read_json
from .mask import Mask, commitment, load_mask

SECRET_KEYS = ("init_seed", "salt", "mask", "private")
MIN_MASK_NUMEL = 64  # smaller two-valued tensors are too small to matter (and legitimate ones exist)
MASK_IOU = 0.9  # a binary tensor this close to the private mask (or its complement) reproduces it
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml", ".py", ".toml", ".cfg", ".ini", ".csv", ".jinja")
_WINDOW = 32  # bytes of packed mask bits searched for: 256 bits, no false match by chance


@dataclass
class PrivateSecrets:
    """What a PMP run keeps private: the mask, its salt and the init seed (any of them may be unknown)."""

    mask: Mask | None = None
    salt: bytes | None = None
    seed: int | None = None


def load_private(path: str | os.PathLike) -> PrivateSecrets:
    """The secrets of a PMP run's private directory (``mask.safetensors``, ``secrets.json``) or of a mask file."""
    p = Path(path)
    mask_file, secrets_file = (p, None) if p.is_file() else (p / "mask.safetensors", p / "secrets.json")
    if not mask_file.exists() and not (secrets_file and secrets_file.exists()):
        raise WeightlockError(f"{p}: no mask.safetensors or secrets.json here (the private directory of a PMP run?)")
    s = PrivateSecrets()
    if mask_file.exists():
        s.mask, salt, _ = load_mask(mask_file)
        s.salt = salt or None
    if secrets_file is not None and secrets_file.exists():
        d = read_json(secrets_file)
        if d.get("init_seed") is not None:
            s.seed = int(d["init_seed"])
        if d.get("salt"):
            s.salt = bytes.fromhex(d["salt"])
    return s


def check_release(directory: str | os.PathLike, private: str | os.PathLike | PrivateSecrets | None = None
                  ) -> list[str]:
    """Findings of secret material in ``directory``, one line each, starting with the file (empty list: clean).

    Without the secrets, by name and by content: files named like masks or secrets; safetensors with mask
    metadata or uint8/bool tensors; any tensor (safetensors, ``.npy``/``.npz``, read without pickle) or raw
    buffer of ≥ 64 entries that holds exactly two distinct values, whatever its dtype (a mask stored as
    float, int8, ...: real weights never do); JSON number lists of two values; pickles (``.pt``, ``.bin``,
    ... or by their magic bytes: reported, never loaded); JSON fields ``init_seed``/``salt``.
    With ``private`` (a PMP run's private directory, a mask file or :class:`PrivateSecrets`) also: any
    binary tensor or buffer that reproduces the mask or its complement (IoU ≥ 0.9, any reshape or the
    transpose), the mask's packed bits (``numpy.packbits`` either bit order, raw or hex) inside any file's
    bytes, the salt (raw or hex) and the init seed as a decimal number anywhere.
    """
    d = Path(directory)
    if not d.is_dir():
        raise WeightlockError(f"{d}: directory not found")
    if private is not None and not isinstance(private, PrivateSecrets):
        private = load_private(private)
    scan = _Scanner(private or PrivateSecrets())
    findings: list[str] = []
    for p in sorted(d.rglob("*")):
        if p.is_file():
            findings += [f"{p.relative_to(d).as_posix()}: {f}" for f in scan.file(p)]
    return findings


class _Scanner:
    def __init__(self, secrets: PrivateSecrets) -> None:
        self.s = secrets
        self.needles: list[tuple[str, bytes]] = []
        if secrets.salt:
            self.needles += [("the salt (raw bytes)", secrets.salt), ("the salt (hex)", secrets.salt.hex().encode()),
                             ("the salt (hex)", secrets.salt.hex().upper().encode())]
        self.targets: list[tuple[str, torch.Tensor]] = []  # flattened mask entries (and all of them together)
        if secrets.mask:
            names = sorted(secrets.mask)
            for n in names:
                m = secrets.mask[n].reshape(-1).bool()
                self.targets.append((f"the private mask of {n!r}", m))
                if secrets.mask[n].ndim == 2:
                    mt = secrets.mask[n].t().reshape(-1).bool()
                    self.targets.append((f"the private mask of {n!r} (transposed)", mt))
                for order in ("big", "little"):
                    packed = np.packbits(m.numpy().astype(np.uint8), bitorder=order).tobytes()
                    for w in _windows(packed):
                        label = f"the private mask's packed bits ({n!r})"
                        self.needles += [(label, w), (label + " as hex", w.hex().encode())]
            if len(names) > 1:
                self.targets.append(("the whole private mask", torch.cat([secrets.mask[n].reshape(-1).bool()
                                                                           for n in names])))
        self.needles = [(lab, nd) for lab, nd in self.needles if _searchable(nd)]
        self.seed = str(secrets.seed).encode() if secrets.seed is not None and secrets.seed >= 10**6 else None

    def file(self, p: Path) -> list[str]:
        out = []
        low, suffix = p.name.lower(), p.suffix.lower()
        if any(w in low for w in ("mask", "secret", "init_seed", "private")) or \
                ("init" in low and suffix in (".safetensors", *PICKLE_SUFFIXES)):
            out.append("file name suggests secret material")
        size = p.stat().st_size
        if size == 0:
            return out
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            head = buf[:8]
            if suffix == ".safetensors":
                out += self.safetensors(p)
            elif suffix == ".npy":
                out += self.npy(p)
            elif suffix == ".npz" or (head.startswith(b"PK\x03\x04") and _zip_names(p, ".npy")):
                out += self.npz(p)
            elif suffix in PICKLE_SUFFIXES or _pickle_magic(head) or (head.startswith(b"PK\x03\x04")
                                                                      and _zip_names(p, ".pkl")):
                is_pickle = _pickle_magic(head) or head.startswith(b"PK\x03\x04")
                out.append(("a pickle" if is_pickle else f"an opaque {suffix} file") +
                           " (never loaded here: pickles run code when loaded and can hide anything; "
                           "ship safetensors)")
                if head.startswith(b"PK\x03\x04"):
                    out += self.zip_buffers(p)
                else:
                    out += self.raw(buf, "its bytes")
            else:
                if suffix == ".json":
                    out += self.json(p)
                elif suffix in TEXT_SUFFIXES and b"init_seed" in buf:
                    out.append("mentions init_seed")
                out += self.raw(buf, "its bytes")
            out += self.secrets_in_bytes(buf)
        return out

    # ---- containers of tensors ---------------------------------------------------------------
    def safetensors(self, p: Path) -> list[str]:
        from safetensors import safe_open

        out = []
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                if "salt" in meta or any(k.startswith("shape:") for k in meta):
                    out.append("safetensors with mask metadata")
                small = [k for k in f.keys() if f.get_slice(k).get_dtype() in ("U8", "BOOL")]
                if small:
                    out.append(f"holds uint8/bool tensors ({', '.join(small[:3])}): a packed mask?")
                for k in f.keys():
                    out += self.tensor(f.get_tensor(k), f"tensor {k!r}")
        except Exception as e:
            out.append(f"unreadable safetensors ({type(e).__name__})")
        return out

    def npy(self, p: Path) -> list[str]:
        try:
            arr = np.load(p, allow_pickle=False, mmap_mode="r")
        except ValueError as e:
            if "pickle" in str(e).lower():
                return ["a .npy of Python objects (a pickle; not loaded)"]
            return [f"unreadable .npy ({e})"]
        except Exception as e:
            return [f"unreadable .npy ({type(e).__name__})"]
        return self.array(arr, "its array")

    def npz(self, p: Path) -> list[str]:
        out = []
        try:
            with np.load(p, allow_pickle=False) as z:
                for k in z.files:
                    try:
                        out += self.array(z[k], f"array {k!r}")
                    except ValueError:
                        out.append(f"array {k!r} holds Python objects (a pickle; not loaded)")
        except Exception as e:
            out.append(f"unreadable .npz ({type(e).__name__})")
        return out

    def zip_buffers(self, p: Path) -> list[str]:
        """The stored buffers of a zip (a torch.save archive keeps every tensor's raw bytes in one entry)."""
        out = []
        try:
            with zipfile.ZipFile(p) as z:
                for info in z.infolist():
                    if not info.filename.endswith(".pkl") and info.file_size >= MIN_MASK_NUMEL:
                        out += self.raw(z.read(info), f"buffer {info.filename!r}")
        except (zipfile.BadZipFile, OSError) as e:
            out.append(f"unreadable zip ({type(e).__name__})")
        return out

    def array(self, arr: np.ndarray, what: str) -> list[str]:
        if arr.dtype.kind not in "biuf":
            return []
        if arr.size > MIN_MASK_NUMEL and np.unique(arr.reshape(-1)[:4096]).size > 2:
            return []  # real data, decided without copying it
        return self.tensor(torch.from_numpy(np.array(arr)), what)

    def raw(self, buf, what: str) -> list[str]:
        """A raw buffer read as 1-, 2-, 4- and 8-byte elements (a mask dumped with ``tofile``, ...)."""
        for width in (1, 2, 4, 8):
            n = len(buf) // width
            if n < MIN_MASK_NUMEL or len(buf) % width:
                continue
            a = np.frombuffer(buf, dtype=f"<i{width}" if width == 8 else f"<u{width}", count=n)
            if np.unique(a[:4096]).size > 2:  # almost every file: decided by its first bytes
                continue
            f = self.tensor(torch.from_numpy(a.copy()), f"{what} (as {8 * width}-bit elements)")
            if f:
                return f
        return []

    # ---- content rules ---------------------------------------------------------------------------
    def tensor(self, t: torch.Tensor, what: str) -> list[str]:
        out = []
        if self.s.seed is not None and t.numel() <= 64 and not t.is_floating_point() and t.dtype != torch.bool \
                and bool((t.reshape(-1).long() == self.s.seed).any()):
            out.append(f"{what} holds the init seed")
        values = _two_values(t)
        if values is None:
            return out
        hit = self.reproduces_mask(t, values)
        if hit:
            return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) reproduces {hit}"]
        return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) holds only two values "
                      f"({_fmt(values[0])}, {_fmt(values[1])}): a mask? (model weights never do)"]

    def reproduces_mask(self, t: torch.Tensor, values: tuple[float, float]) -> str | None:
        flat = t.reshape(-1)
        best = None
        for label, m in self.targets:
            if m.numel() != flat.numel():
                continue
            for v in values:  # the mask or its complement
                iou = _iou(flat == torch.tensor(v, dtype=flat.dtype), m)
                if iou >= MASK_IOU and (best is None or iou > best[1]):
                    best = (label, iou)
        return f"{best[0]} (IoU {best[1]:.3f})" if best else None

    def json(self, p: Path) -> list[str]:
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        out = []
        hits = _all_keys(obj) & {"init_seed", "salt", "mask_salt", "private_mask"}
        if hits:
            out.append(f"JSON field(s) {', '.join(sorted(hits))}")
        for path, values in _number_lists(obj, "$"):
            if len(values) >= MIN_MASK_NUMEL:
                try:
                    t = torch.tensor(values, dtype=torch.float64)
                except (TypeError, ValueError, OverflowError):
                    continue
                out += self.tensor(t, f"JSON list {path}")
        return out

    def secrets_in_bytes(self, buf) -> list[str]:
        out = []
        if self.needles:
            out += sorted({self.needles[i][0] for i in _find_all(buf, [nd for _, nd in self.needles])})
            out = [f"contains {label}" for label in out]
        if self.seed is not None:
            start = 0
            while (i := buf.find(self.seed, start)) >= 0:
                before = buf[i - 1:i] if i else b""
                after = buf[i + len(self.seed):i + len(self.seed) + 1]
                if not before.isdigit() and not after.isdigit():
                    out.append("contains the init seed (as a decimal number)")
                    break
                start = i + 1
        return out


def _two_values(t: torch.Tensor) -> tuple[float, float] | None:
    """The two distinct values of ``t`` when it has exactly two and at least MIN_MASK_NUMEL entries."""
    a = t.reshape(-1)
    if a.numel() < MIN_MASK_NUMEL or a.is_complex():
        return None
    if a.dtype == torch.bool:
        a = a.to(torch.uint8)
    if torch.unique(a[:4096]).numel() > 2:  # real weights: decided by the first entries
        return None
    v0 = a[0]
    v1 = None
    for chunk in a.split(1 << 22):
        other = chunk[chunk != v0]
        if other.numel() == 0:
            continue
        if v1 is None:
            v1 = other[0]
        if not bool((other == v1).all()):
            return None
    if v1 is None or bool(torch.isnan(torch.stack([v0, v1]).float()).any()):
        return None
    lo, hi = sorted((v0.item(), v1.item()))
    return lo, hi


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _windows(packed: bytes, count: int = 2) -> list[bytes]:
    """Up to ``count`` searchable windows of packed mask bits (skipping runs of constant bits)."""
    out = []
    for i in range(0, len(packed) - _WINDOW + 1, _WINDOW):
        w = packed[i:i + _WINDOW]
        if _searchable(w):
            out.append(w)
            if len(out) == count:
                break
    return out


def _searchable(needle: bytes) -> bool:
    """Long enough, and every 8-byte word of it varied enough that random data or padding never matches."""
    return len(needle) >= 16 and all(len(set(needle[j:j + 8])) >= 4 for j in range(8))


def _find_all(buf, needles: list[bytes]) -> set[int]:
    """Indices of the needles (each ≥ 16 bytes) that occur in ``buf``, in one pass over it.

    An occurrence at offset o covers the aligned 8-byte word at the next multiple of 8, which is the
    needle's bytes j..j+8 with j = (−o) mod 8; so the buffer is read as aligned words, looked up among the
    needles' 8 possible words, and each candidate is checked in full.
    """
    keys: dict[int, list[tuple[int, int]]] = {}
    for i, nd in enumerate(needles):
        for j in range(8):
            keys.setdefault(int.from_bytes(nd[j:j + 8], "little"), []).append((i, j))
    karr = np.array(sorted(keys), dtype=np.uint64)
    n = len(buf) // 8
    words = np.frombuffer(buf, dtype="<u8", count=n) if n else np.zeros(0, np.uint64)
    found: set[int] = set()
    step = 1 << 22
    for start in range(0, n, step):
        w = words[start:start + step]
        pos = np.minimum(np.searchsorted(karr, w), len(karr) - 1)
        for h in np.nonzero(karr[pos] == w)[0]:
            at = (start + int(h)) * 8
            for i, j in keys[int(w[h])]:
                o = at - j
                if i not in found and o >= 0 and buf[o:o + len(needles[i])] == needles[i]:
                    found.add(i)
    return found


def _pickle_magic(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _zip_names(p: Path, ending: str) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.endswith(ending) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _number_lists(obj, path: str) -> Iterator[tuple[str, list]]:
    """Every JSON list of plain numbers (flattening nested lists of numbers), with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _number_lists(v, f"{path}.{k}")
    elif isinstance(obj, list):
        flat = _flatten_numbers(obj)
        if flat is not None:
            yield path, flat
        else:
            for i, v in enumerate(obj):
                yield from _number_lists(v, f"{path}[{i}]")


def _flatten_numbers(obj) -> list | None:
    out = []
    for v in obj:
        if isinstance(v, list):
            sub = _flatten_numbers(v)
            if sub is None:
                return None
            out += sub
        elif isinstance(v, (int, float)):  # bool too
            out.append(int(v) if isinstance(v, bool) else v)
        else:
            return None
    return out


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


def mask_for_release(release: str | os.PathLike, mask_file: str | os.PathLike, allow_uncommitted: bool = False
                     ) -> Mask:
    """The mask in ``mask_file`` once it is known to belong to ``release`` (for authorized fine-tuning).

    Its shapes must match the release's parameters and, when the release's manifest carries a
    ``mask_commitment`` (every PMP release does), its commitment must match. A model without a
    commitment (not a PMP release) is refused unless ``allow_uncommitted``: then only shapes are checked.
    """
    release = Path(release)
    manifest = release / "manifest.json"
    want = read_json(manifest).get("mask_commitment") if manifest.exists() else None
    mask, salt, _ = load_mask(mask_file)
    check_shapes(mask, release)
    if want:
        got = commitment(mask, salt)
        if got != want:
            raise WeightlockError(f"{mask_file} is not the mask of {release}: its commitment {got[:16]}… differs "
                                  f"from the release's {want[:16]}… (a mask from another run?)")
    elif not allow_uncommitted:
        raise WeightlockError(f"{release} has no mask commitment (manifest.json mask_commitment; not a PMP release), "
                              f"so {mask_file} cannot be checked against it; pass --allow-uncommitted to use it anyway")
    return mask


def check_shapes(mask: Mask, release: Path) -> None:
    """Raise :class:`WeightlockError` unless every mask entry names a parameter of the release with its shape."""
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
