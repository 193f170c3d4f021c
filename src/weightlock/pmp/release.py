"""Secrets hygiene for PMP releases: find secret material by name and by content; verify the mask commitment."""
from __future__ import annotations

import base64
import json
import mmap
import os
import re
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
RULES_WITHOUT_PRIVATE = (  # what `release check` applies when it does not know the secrets
    "file names like mask/secret/private/init_seed", "safetensors with mask metadata or uint8/bool tensors",
    "tensors, .npy/.npz arrays, raw buffers and JSON number lists of >= 64 entries holding exactly two values",
    "pickles (reported, never loaded)", "JSON fields init_seed/salt/mask_salt/private_mask",
    "init_seed mentioned in text files", "file SHA-256s against manifest.json")
MIN_MASK_NUMEL = 64  # smaller two-valued tensors are too small to matter (and legitimate ones exist)
MASK_IOU = 0.9  # a binary tensor this close to the private mask (or its complement) reproduces it
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml", ".py", ".toml", ".cfg", ".ini", ".csv", ".jinja")
_WINDOW = 32  # bytes of packed mask bits searched for: 256 bits, no false match by chance
_SAMPLE = 512  # entries of a tensor compared with each mask entry of its size before any full comparison
_AGREE = 0.8  # sampled agreement (or disagreement) with a mask entry that triggers the full IoU
_FLOAT_TOKEN = re.compile(rb"[-+]?\d[\d.]{9,}(?:[eE][-+]?\d{1,3})?")
_TEXT_SCAN_MAX = 16 << 20  # files up to this size (and every text file) are searched for the seed as a float


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


def check_release(directory: str | os.PathLike, private: str | os.PathLike | PrivateSecrets | None = None,
                  manifest: bool = True) -> list[str]:
    """Findings of secret material in ``directory``, one line each, starting with the file (empty list: clean).

    Without the secrets, by name and by content: files named like masks or secrets; safetensors with mask
    metadata or uint8/bool tensors; any tensor (safetensors, ``.npy``/``.npz``, read without pickle) or raw
    buffer of ≥ 64 entries that holds exactly two distinct values, whatever its dtype (a mask stored as
    float, int8, ...: real weights never do); JSON number lists of two values; pickles (``.pt``, ``.bin``,
    ... or by their magic bytes: reported, never loaded); JSON fields ``init_seed``/``salt``.
    With ``private`` (a PMP run's private directory, a mask file or :class:`PrivateSecrets`) also, by
    searching for the secrets themselves: any tensor, array, raw buffer or JSON number list of a mask entry's
    size (flattened or transposed) one of whose bit views reproduces the entry or its complement (IoU ≥ 0.9):
    its sign bits, the sign bits XOR the public weights' sign bits, a threshold halfway between its smallest
    and largest value (0/1 plus noise or stray values), bit 0 or 1 of a float's stored bits (the low
    mantissa), bits 0–7 of integers; the mask's packed bits (``numpy.packbits`` either bit order, mask or
    complement) raw, hex or base64 inside any file's bytes, or as the values of a tensor of bytes (also
    scaled by 1/255 or 1/256, e.g. stored as float32); the salt raw, hex, base64 or base32; the init seed as
    a decimal number, in hex, as 8 raw bytes, as two 32-bit halves (decimal numbers or tensor entries) or
    as a float string. ``manifest``: first check every file listed in ``manifest.json`` against its SHA-256
    (see :func:`manifest_problems`).
    """
    d = Path(directory)
    if not d.is_dir():
        raise WeightlockError(f"{d}: directory not found")
    if private is not None and not isinstance(private, PrivateSecrets):
        private = load_private(private)
    scan = _Scanner(private or PrivateSecrets(), d)
    findings: list[str] = manifest_problems(d) if manifest else []
    for p in sorted(d.rglob("*")):
        if p.is_file():
            findings += [f"{p.relative_to(d).as_posix()}: {f}" for f in scan.file(p)]
    return findings


class _Scanner:
    def __init__(self, secrets: PrivateSecrets, release: Path | None = None) -> None:
        self.s = secrets
        self.needles: list[tuple[str, bytes]] = []
        self.packed: list[tuple[str, bytes]] = []  # raw windows of packed mask bits (for byte-valued tensors)
        if secrets.salt:
            self.needles += [("the salt (raw bytes)", secrets.salt), ("the salt (hex)", secrets.salt.hex().encode()),
                             ("the salt (hex)", secrets.salt.hex().upper().encode())]
            self.needles += [("the salt (base64)", b) for b in _b64_forms(secrets.salt)]
            self.needles += [("the salt (base32)", base64.b32encode(secrets.salt)[:-8])]
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
                    for comp in (False, True):
                        bits = (~m if comp else m).numpy().astype(np.uint8)
                        packed = np.packbits(bits, bitorder=order).tobytes()
                        label = f"the private mask's packed bits ({n!r}{', complement' if comp else ''})"
                        for w in _windows(packed):
                            self.packed.append((label, w))
                            self.needles += [(label, w), (label + " as hex", w.hex().encode()),
                                             (label + " as hex", w.hex().upper().encode())]
                            self.needles += [(label + " as base64", b) for b in _b64_forms(w)]
            if len(names) > 1:
                self.targets.append(("the whole private mask", torch.cat([secrets.mask[n].reshape(-1).bool()
                                                                           for n in names])))
        self.needles = [(lab, nd) for lab, nd in self.needles if _searchable(nd)]
        self.packed = [(lab, nd) for lab, nd in self.packed if _searchable(nd)]
        self.seed = str(secrets.seed).encode() if secrets.seed is not None and secrets.seed >= 10**6 else None
        self.seed_forms: list[tuple[str, bytes, bool]] = []  # (label, bytes, needs non-alphanumeric neighbours)
        self.halves: tuple[bytes, bytes] | None = None
        if self.seed is not None:
            seed = secrets.seed % (1 << 64)
            hi, lo = seed >> 32, seed & 0xFFFFFFFF
            if seed >= 16**9:
                self.seed_forms += [("in hex", f"{seed:x}".encode(), True), ("in hex", f"{seed:X}".encode(), True)]
            if seed >= 1 << 40:
                self.seed_forms += [("as 8 raw bytes", seed.to_bytes(8, order), False) for order in ("little", "big")]
                self.seed_forms += [("as two raw 32-bit halves", hi.to_bytes(4, "little") + lo.to_bytes(4, "little"),
                                     False)]
            if min(hi, lo) >= 10**5:
                self.halves = (str(hi).encode(), str(lo).encode())
        self.groups = self._mask_groups(release) if secrets.mask else {}

    def _mask_groups(self, release: Path | None) -> dict[int, dict]:
        """The mask entries (flat, transposed, all together) grouped by size, each with a fixed sample of
        positions; with the public weight of the same name when the release has it (for XOR'ed sign bits)."""
        public: dict[str, tuple[Path, str]] = {}
        if release is not None:
            from safetensors import safe_open

            for f in sorted(release.glob("*.safetensors")):
                try:
                    with safe_open(str(f), "pt") as sf:
                        public.update({k: (f, k) for k in sf.keys() if k in self.s.mask and k not in public})
                except Exception:
                    continue
        groups: dict[int, dict] = {}
        gen = torch.Generator().manual_seed(0)
        for label, m in self.targets:
            n = m.numel()
            if n < MIN_MASK_NUMEL:
                continue
            if n not in groups:
                idx = torch.arange(n) if n <= _SAMPLE else torch.randint(0, n, (_SAMPLE,), generator=gen).unique()
                groups[n] = {"idx": idx, "targets": []}
            name = label.split("'")[1] if "'" in label else None
            ref = (*public[name], label.endswith("(transposed)")) if name in public else None
            pub = self._public_sign(ref)[groups[n]["idx"]] if ref else None
            groups[n]["targets"].append((label, m, m[groups[n]["idx"]], ref, pub))
        return groups

    @staticmethod
    def _public_sign(ref: tuple[Path, str, bool]) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(ref[0]), "pt") as sf:
            w = sf.get_tensor(ref[1])
        return torch.signbit((w.t() if ref[2] else w).reshape(-1).float())

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
        if arr.size > MIN_MASK_NUMEL and np.unique(arr.reshape(-1)[:4096]).size > 2 and \
                arr.size not in self.groups and not self.packed:
            return []  # real data, decided without copying it
        return self.tensor(torch.from_numpy(np.array(arr)), what)

    def raw(self, buf, what: str) -> list[str]:
        """A raw buffer read as 1-, 2-, 4- and 8-byte elements (a mask dumped with ``tofile``, ...)."""
        for width in (1, 2, 4, 8):
            n = len(buf) // width
            if n < MIN_MASK_NUMEL or len(buf) % width:
                continue
            a = np.frombuffer(buf, dtype=f"<i{width}" if width == 8 else f"<u{width}", count=n)
            if n in self.groups:  # with the private mask: a raw dump of a tensor of a mask entry's size
                views = [a] + ([np.frombuffer(buf, dtype=f"<f{width}", count=n)] if width > 1 else [])
                for v in views:
                    hit = self.mask_in(torch.from_numpy(v.copy()))
                    if hit:
                        return [f"{what} (as {v.dtype}) reproduces {hit}"]
            if np.unique(a[:4096]).size > 2:  # almost every file: decided by its first bytes
                continue
            f = self.tensor(torch.from_numpy(a.copy()), f"{what} (as {8 * width}-bit elements)")
            if f:
                return f
        return []

    # ---- content rules ---------------------------------------------------------------------------
    def tensor(self, t: torch.Tensor, what: str) -> list[str]:
        out = []
        if self.s.seed is not None and t.numel() <= 64 and not t.is_floating_point() and t.dtype != torch.bool:
            v = t.reshape(-1).long()
            low = v & 0xFFFFFFFF
            seed = self.s.seed % (1 << 64)
            if bool((v == self.s.seed).any()):
                out.append(f"{what} holds the init seed")
            elif self.halves and bool((low == seed >> 32).any()) and bool((low == seed & 0xFFFFFFFF).any()):
                out.append(f"{what} holds the init seed (as two 32-bit halves)")
        hit = self.mask_in(t)
        if hit:
            return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) reproduces {hit}"]
        packed = self.packed_in_values(t)
        if packed:
            return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) holds {packed}"]
        values = _two_values(t)
        if values is None:
            return out
        hit = self.reproduces_mask(t, values)
        if hit:
            return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) reproduces {hit}"]
        return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) holds only two values "
                      f"({_fmt(values[0])}, {_fmt(values[1])}): a mask? (model weights never do)"]

    def mask_in(self, t: torch.Tensor) -> str | None:
        """The mask entry that some bit view of ``t`` reproduces, with how, or None.

        Reproduces: the view (or its complement) agrees with ≥ 90% of the entry's selected positions and
        ≥ 90% of its unselected ones (so a constant never reproduces a nearly full or empty mask entry;
        entries with fewer than 16 positions of either kind are skipped). ``t`` (any shape: compared
        flattened) is compared only with mask entries of its size: first on a fixed sample of positions
        (every bit view against every entry of that size at once), then in full for the pairs that agree
        (or disagree) on ≥ 80% of each kind of sampled position: linear in the size of the tensor.
        """
        g = self.groups.get(t.numel())
        if g is None or t.is_complex():
            return None
        flat = t.reshape(-1)
        sample = flat[g["idx"]]
        views = _bit_views(sample)
        if not views:
            return None
        C = torch.stack([fn(sample) for _, fn in views])  # views x K
        best = None
        for label, m, ms, ref, pub in g["targets"]:
            for xor in (False, True) if pub is not None else (False,):
                r1, r0 = _recalls((C ^ pub) if xor else C, ms)
                lo, hi = torch.minimum(r1, r0), torch.maximum(r1, r0)
                for vi in torch.nonzero((lo >= _AGREE) | (hi <= 1 - _AGREE)).reshape(-1).tolist():
                    bits = views[vi][1](flat)
                    if xor:
                        bits = bits ^ self._public_sign(ref)
                    if min(int(m.sum()), m.numel() - int(m.sum())) < 16:
                        continue
                    for comp in (False, True):
                        a1, a0 = (float(x) for x in _recalls(~bits if comp else bits, m))
                        score = (a1 + a0) / 2
                        if min(a1, a0) >= MASK_IOU and (best is None or score > best[1]):
                            how = ("the complement of " if comp else "") + views[vi][0] + \
                                (" XOR the public weights' sign bits" if xor else "")
                            best = (f"{label} ({how}; agrees on {a1:.1%} of its selected and {a0:.1%} of its "
                                    "unselected positions)", score)
        return best[0] if best else None

    def packed_in_values(self, t: torch.Tensor) -> str | None:
        """The packed mask bits found in a tensor whose values are bytes (0–255, also scaled by 1/255 or 1/256),
        such as packed bits stored as float32."""
        if not self.packed or t.numel() < _WINDOW or t.dtype in (torch.uint8, torch.int8, torch.bool) or t.is_complex():
            return None
        flat = t.reshape(-1)
        head = flat[:4096].double()
        for scale in (1, 255, 256):
            q = head * scale
            r = q.round()
            if not bool(((q - r).abs() <= 1e-3).all() and (r >= 0).all() and (r <= 255).all()):
                continue
            q = flat.double() * scale
            r = q.round()
            if not bool(((q - r).abs() <= 1e-3).all() and (r >= 0).all() and (r <= 255).all()):
                continue
            found = _find_all(r.to(torch.uint8).numpy().tobytes(), [w for _, w in self.packed])
            if found:
                how = "its values as bytes" + (f" (scaled by 1/{scale})" if scale != 1 else "")
                return f"{sorted({self.packed[i][0] for i in found})[0]} in {how}"
        return None

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
            if _find_bounded(buf, self.seed, bytes.isdigit):
                out.append("contains the init seed (as a decimal number)")
            for label, form, bounded in self.seed_forms:
                if (_find_bounded(buf, form, _is_hex) if bounded else buf.find(form) >= 0):
                    out.append(f"contains the init seed ({label})")
                    break
            if self.halves and all(_find_bounded(buf, h, bytes.isdigit) for h in self.halves):
                out.append("contains the init seed (as two 32-bit halves)")
            if len(buf) <= _TEXT_SCAN_MAX:
                target = float(self.s.seed)
                for tok in _FLOAT_TOKEN.finditer(buf):
                    try:
                        v = float(tok.group())
                    except ValueError:
                        continue
                    if abs(v - target) <= 1e-12 * abs(target) and tok.group() != self.seed:
                        out.append("contains the init seed (as a float)")
                        break
        return out


def _bit_views(t: torch.Tensor) -> list[tuple[str, object]]:
    """Ways a leaker could carry a mask in a tensor's values, each as (description, tensor -> bool tensor): the
    sign bits, a threshold halfway between the smallest and largest value (0/1 with noise or stray values),
    and single low bits of the stored values (integers, or a float's mantissa)."""
    if t.dtype == torch.bool:
        return [("its entries", lambda x: x.bool())]
    views: list[tuple[str, object]] = []
    if t.is_floating_point():
        finite = t[torch.isfinite(t)].double()
        if finite.numel() == 0:
            return []
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
        views.append(("its sign bits", lambda x: torch.signbit(x)))
        lo, hi = float(finite.min()), float(finite.max())
        if lo < hi:
            mid = (lo + hi) / 2
            views.append((f"its values above {mid:.3g}", lambda x, mid=mid: x.double() > mid))
        if ints is not None:
            views += [(f"bit {k} of its stored values", lambda x, k=k, ints=ints: ((x.view(ints) >> k) & 1).bool())
                      for k in (0, 1)]
        return views
    bits = 8 * t.element_size()
    views += [(f"bit {k} of its values", lambda x, k=k: ((x.long() >> k) & 1).bool()) for k in range(min(bits, 8))]
    views.append(("its nonzero values", lambda x: x != 0))
    if t.dtype != torch.uint8:
        views.append(("its sign", lambda x: x < 0))
    return views


def _find_bounded(buf, needle: bytes, is_part) -> bool:
    """Whether ``needle`` occurs in ``buf`` with no neighbour for which ``is_part`` holds (a whole number)."""
    start = 0
    while (i := buf.find(needle, start)) >= 0:
        before = buf[i - 1:i] if i else b""
        after = buf[i + len(needle):i + len(needle) + 1]
        if not (before and is_part(before)) and not (after and is_part(after)):
            return True
        start = i + 1
    return False


def _is_hex(c: bytes) -> bool:
    return c in b"0123456789abcdefABCDEF"


def _b64_forms(data: bytes) -> list[bytes]:
    """``data`` as it appears in base64 (standard and URL-safe alphabets) at each of the 3 byte alignments
    within a longer encoded blob, without the characters shared with neighbouring bytes."""
    out = []
    for k, skip in ((0, 0), (1, 2), (2, 3)):
        e = base64.b64encode(bytes(k) + data)
        body = e[skip:len(e) - 4]
        out += [body, body.translate(bytes.maketrans(b"+/", b"-_"))]
    return list(dict.fromkeys(out))


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


def _recalls(bits: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fractions of ``m``'s True and of its False positions that ``bits`` (last dimension) agrees with."""
    ones = int(m.sum())
    zeros = m.numel() - ones
    r1 = (bits & m).sum(dim=-1).double() / max(ones, 1)
    r0 = (~bits & ~m).sum(dim=-1).double() / max(zeros, 1)
    return r1, r0


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


def manifest_problems(release: str | os.PathLike) -> list[str]:
    """One line per file listed in ``release/manifest.json`` whose SHA-256 differs from the manifest's (or that
    is missing), starting with the file's name; empty when the directory has no manifest or every file matches."""
    from ..io import sha256_file

    release = Path(release)
    if not (release / "manifest.json").is_file():
        return []
    files = read_json(release / "manifest.json").get("files") or {}
    out = []
    for name, digest in sorted(files.items()):
        f = release / name
        norm = os.path.normpath(name)
        if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):  # never hash a file elsewhere
            out.append(f"{name}: listed in manifest.json but outside the release directory")
        elif not f.is_file():
            out.append(f"{name}: listed in manifest.json but missing")
        elif sha256_file(f) != digest:
            out.append(f"{name}: SHA-256 does not match manifest.json (changed or corrupted since the release "
                       "was written)")
    return out


def verify(release: str | os.PathLike, mask_file: str | os.PathLike) -> str:
    """Check that every file of the release matches its manifest's SHA-256 and that ``mask_file`` matches the
    release's parameter shapes and its manifest commitment."""
    release = Path(release)
    manifest = read_json(release / "manifest.json")
    problems = manifest_problems(release)
    if problems:
        raise WeightlockError(f"{release}/{problems[0]}")
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
