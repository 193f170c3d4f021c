"""Secrets hygiene for PMP releases: find secret material by name and by content; verify the mask commitment."""
from __future__ import annotations

import base64
import io
import json
import lzma
import mmap
import os
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch

from ..errors import WeightlockError
from ..io import read_json
from .allowlist import MODEL_FILE, TEXT_MAX, allowlist_problems, shown
from .fileformats import archive_members, npy_array, safetensors_like, st_file_header, st_header, st_tensor
from .mask import Mask, commitment, load_mask

SECRET_KEYS = ("init_seed", "salt", "mask", "private")
RULES_WITHOUT_PRIVATE = (  # what `release check` applies when it does not know the secrets
    "every file that manifest.json does not list, and every listed file whose SHA-256 differs",
    "a PMP release's listed files held to what they may hold (only the files weightlock writes into one; "
    "model.safetensors: exactly the parameters config.json declares, laid out as the format writes them; config, "
    "generation config, tokenizer files, model card and manifest: known fields only; metrics and run record: their "
    "formats)",
    "archives (zip, tar, gz, bz2, xz, nested) opened in memory and scanned",
    "tensors and arrays outside model.safetensors with the size of a weight matrix (copies of weights, optimizer "
    "state, gradients, deltas)", "sorted integer lists of >= 64 positions (index lists)",
    "file names like mask/secret/private/init_seed", "safetensors with mask metadata or uint8/bool tensors",
    "tensors, .npy/.npz arrays, raw buffers and JSON number lists of >= 64 entries holding exactly two values",
    "pickles (reported, never loaded)", "JSON fields init_seed/salt/mask_salt/private_mask",
    "init_seed mentioned in text files")
WEIGHT_COPY = ("a second copy of weights, optimizer state, gradients or a delta — these reveal the mask")
MIN_MASK_NUMEL = 64  # smaller two-valued tensors are too small to matter (and legitimate ones exist)
MASK_IOU = 0.9  # a binary tensor this close to the private mask (or its complement) reproduces it
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml", ".py", ".toml", ".cfg", ".ini", ".csv", ".jinja")
_WINDOW = 32  # bytes of packed mask bits searched for: 256 bits, no false match by chance
_SAMPLE = 512  # entries of a tensor compared with each mask entry of its size before any full comparison
_AGREE = 0.8  # sampled agreement (or disagreement) with a mask entry that triggers the full IoU
_FLOAT_TOKEN = re.compile(rb"[-+]?\d[\d.]{9,}(?:[eE][-+]?\d{1,3})?")
_TEXT_SCAN_MAX = 16 << 20  # files up to this size (and every text file) are searched for the seed as a float
_ARCHIVE_DEPTH = 4  # archives inside archives are opened this deep (deeper ones are reported, not opened)
_MEMBER_MAX = 1 << 30  # bytes of one archive member read into memory at most (decompressed)
_ARCHIVE_TOTAL = 4 << 30  # bytes decompressed from one file's archives in all (zip bombs)
_MEMBERS_MAX = 100_000  # members of one archive looked at
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)  # position lists


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
    """Findings in ``directory``, one line each, starting with the file (empty list: clean).

    ``manifest``: first the allow-list (see :func:`weightlock.pmp.allowlist.allowlist_problems`): every file
    listed in ``manifest.json`` must match its SHA-256 (see :func:`manifest_problems`), every other file is
    reported, saying what it is, and a PMP release's listed files hold only what they may (its weights exactly
    the parameters its config declares, its JSON files known fields). Then every file, listed or not, by
    content, opening archives (zip, tar, gz, bz2, xz, nested; in memory, size- and depth-capped):

    Without the secrets: files named like masks or secrets; safetensors with mask metadata or uint8/bool
    tensors; any tensor (safetensors, ``.npy``, read without pickle) or raw buffer of ≥ 64 entries that holds
    exactly two distinct values, whatever its dtype (a mask stored as float, int8, ...: real weights never
    do); tensors outside ``model.safetensors`` with the size of a weight matrix (a copy of the weights, optimizer
    state, gradients, a delta: their zero pattern or their difference from the release is the mask); sorted
    integer lists of ≥ 64 positions; JSON number lists of two values; pickles (``.pt``, ``.bin``, ... or by
    their magic bytes: reported, never loaded); JSON fields ``init_seed``/``salt``.
    With ``private`` (a PMP run's private directory, a mask file or :class:`PrivateSecrets`) weight-sized
    tensors and integer lists are instead compared with the secrets themselves: any tensor, array, raw buffer
    or JSON number list of a mask entry's size (flattened or transposed) one of whose bit views reproduces the
    entry or its complement (agreeing on ≥ 90% of both its selected and unselected positions): its non-zero
    entries, where it differs from the released weights, its sign bits, the sign bits XOR the public weights'
    sign bits, a threshold halfway between its smallest and largest value (0/1 plus noise or stray values), bit
    0 or 1 of a float's stored bits (the low mantissa), bits 0–7 of integers; any integer array or list that
    lists the selected (or unselected) positions of an entry or of the whole mask (flat indices, (row, column)
    coordinates, or the row or column indices in ``numpy.nonzero`` order); the mask's packed bits
    (``numpy.packbits`` either bit order, mask or complement) raw, hex or base64 inside any file's bytes, or as
    the values of a tensor of bytes (also scaled by 1/255 or 1/256, e.g. stored as float32); the salt raw,
    hex, base64 or base32; the init seed as a decimal number, in hex, as 8 raw bytes, as two 32-bit halves
    (decimal numbers or tensor entries) or as a float string.
    """
    return [line for _, line in release_findings(directory, private, manifest)]


def release_findings(directory: str | os.PathLike, private: str | os.PathLike | PrivateSecrets | None = None,
                     manifest: bool = True) -> list[tuple[str, str]]:
    """:func:`check_release`'s findings, each as (kind, line): kind ``changed`` (a listed file whose SHA-256
    differs, or is missing), ``not allowed`` (the allow-list) or ``secret`` (found by content)."""
    d = Path(directory)
    if not d.is_dir():
        raise WeightlockError(f"{d}: directory not found")
    if private is not None and not isinstance(private, PrivateSecrets):
        private = load_private(private)
    scan = _Scanner(private or PrivateSecrets(), d)
    out: list[tuple[str, str]] = []
    listed: set[str] | None = None
    if manifest:
        out += [("changed", f) for f in manifest_problems(d)]
        listed, problems = allowlist_problems(d)
        out += [("not allowed", f) for f in problems]
    unreadable: list[str] = []
    for rel, p in release_entries(d, unreadable):
        if p.is_symlink() or not p.is_file():
            out.append(("not allowed", f"{rel}: {'a symbolic link' if p.is_symlink() else 'not a regular file'} "
                                       "(a release holds plain files only; not followed)"))
            continue
        found = scan.file(p, model=rel == MODEL_FILE)
        if listed is not None and rel != "manifest.json" and rel not in listed:
            out.append(("not allowed", f"{rel}: not listed in manifest.json: {scan.what}"))
        out += [("secret", f"{rel}: {f}") for f in found]
    return out + [("not allowed", line) for line in unreadable]


def release_entries(d: Path, unreadable: list[str] | None = None) -> list[tuple[str, Path]]:
    """Every file under ``d`` (and every symbolic link, never followed), as (relative POSIX path, path), sorted;
    a folder that cannot be listed is added to ``unreadable`` as a line naming it (when given)."""
    def onerror(e: OSError) -> None:
        if unreadable is not None:
            rel = Path(e.filename).relative_to(d).as_posix() if e.filename else "?"
            unreadable.append(f"{rel}/: cannot be listed ({e.strerror or type(e).__name__}): not checked")

    out = []
    for root, dirs, files in os.walk(d, onerror=onerror):
        for name in [*files, *(n for n in dirs if os.path.islink(os.path.join(root, n)))]:
            p = Path(root, name)
            out.append((p.relative_to(d).as_posix(), p))
    return sorted(out)


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
        self.model_file = release / "model.safetensors" if release is not None else None
        if self.model_file is not None and not self.model_file.is_file():
            self.model_file = None
        self.numels: dict[int, str] = {}  # sizes of the released weight matrices -> a parameter of that size
        if self.model_file is not None:
            try:
                header, _ = st_file_header(self.model_file)
            except ValueError:
                header = {}
            for k, info in header.items():
                shape = info.get("shape") if isinstance(info, dict) else None
                if isinstance(shape, list) and len(shape) >= 2 and all(isinstance(x, int) for x in shape):
                    self.numels.setdefault(int(np.prod(shape)), k)
        self._counts: dict[str, int] = {}  # selected positions per mask target (computed when first needed)
        self._positions: dict[tuple[str, bool], np.ndarray] = {}
        self._last: tuple[str, torch.Tensor] | None = None  # the released weight read last (see _public)
        self.groups = self._mask_groups() if secrets.mask else {}
        self.what = ""  # what the last file scanned is (for the allow-list's report of an unlisted file)
        self.weighty = 0  # weight-sized tensors in the last file scanned
        self.budget = _ARCHIVE_TOTAL

    def _mask_groups(self) -> dict[int, dict]:
        """The mask entries (flat, transposed, all together) grouped by size, each with a fixed sample of
        positions; with the public weight of the same name when the release's model file has it (for where a
        tensor differs from it, and for XOR'ed sign bits)."""
        from safetensors import safe_open

        public: set[str] = set()
        if self.model_file is not None:
            try:
                with safe_open(str(self.model_file), "pt") as sf:
                    public = {k for k in sf.keys() if k in self.s.mask}
            except Exception:
                pass
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
            ref = (name, label.endswith("(transposed)")) if name in public else None
            pub = self._public(ref)[groups[n]["idx"]] if ref else None
            groups[n]["targets"].append((label, m, m[groups[n]["idx"]], ref, pub))
        return groups

    def _public(self, ref: tuple[str, bool]) -> torch.Tensor:
        """The released weight ``ref`` names, flattened in the order of its mask target (transposed or not);
        the last one read is kept (an entry's plain and transposed targets come one after the other)."""
        from safetensors import safe_open

        if self._last is None or self._last[0] != ref[0]:
            with safe_open(str(self.model_file), "pt") as sf:
                self._last = (ref[0], sf.get_tensor(ref[0]))
        w = self._last[1]
        return (w.t() if ref[1] else w).reshape(-1)

    def file(self, p: Path, model: bool = False) -> list[str]:
        """Findings in one file, read through a memory map (each tensor once); ``model``: the release's
        weights (not themselves a copy of weights). Sets :attr:`what` to what the file is."""
        self.weighty, self.budget = 0, _ARCHIVE_TOTAL
        if p.stat().st_size == 0:
            self.what = "an empty file"
            return _name_rule(p.name)
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return self.blob(p.name, buf, fh=fh, model=model)

    def blob(self, name: str, buf, depth: int = 0, fh=None, model: bool = False) -> list[str]:
        """Findings in the bytes ``buf`` of a file or archive member called ``name`` (``fh``: the open file)."""
        out = _name_rule(name)
        suffix = PurePosixPath(name).suffix.lower()
        kind = _sniff(buf, suffix)
        if kind == "safetensors":
            out += self.safetensors(buf, model)
        elif kind == "npy":
            out += self.npy(buf)
        elif kind in ("zip", "tar", "gzip", "bzip2", "xz"):
            if fh is not None:
                fh.seek(0)
            out += self.archive(kind, name, fh if fh is not None else io.BytesIO(buf), depth)
        elif kind == "pickle":
            out.append(("a pickle" if _pickle_magic(bytes(buf[:2])) else f"an opaque {suffix} file") +
                       " (never loaded here: pickles run code when loaded and can hide anything; ship safetensors)")
            out += self.raw(buf, "its bytes")
        else:
            if suffix == ".json" or kind == "json":
                out += self.json(buf)
            elif suffix in TEXT_SUFFIXES and buf.find(b"init_seed") >= 0:
                out.append("mentions init_seed")
            out += self.raw(buf, "its bytes")
        out += self.secrets_in_bytes(buf)
        if depth == 0:
            self.what = _describe(kind, suffix, self.weighty)
        return out

    # ---- containers of tensors ---------------------------------------------------------------
    def safetensors(self, buf, model: bool = False) -> list[str]:
        try:
            header, meta, start = st_header(buf)
        except ValueError as e:
            return [f"unreadable safetensors ({e})"]
        out = []
        if "salt" in meta or any(k.startswith("shape:") for k in meta):
            out.append("safetensors with mask metadata")
        small = [k for k, v in header.items() if v.get("dtype") in ("U8", "BOOL")]
        if small:
            out.append(f"holds uint8/bool tensors ({', '.join(small[:3])}): a packed mask?")
        weighty = []
        for k, info in header.items():
            try:
                t = st_tensor(buf, info, start)
            except ValueError as e:
                out.append(f"tensor {k!r} unreadable ({e})")
                continue
            if not model and t.numel() in self.numels and t.numel() >= MIN_MASK_NUMEL:
                weighty.append(k)
            out += self.tensor(t, f"tensor {k!r}")
        out += self.weight_copies(weighty)
        return out

    def weight_copies(self, names: list[str]) -> list[str]:
        """Without the secrets: the tensors (``names``) with the size of a released weight matrix, as one line."""
        self.weighty += len(names)
        if not names or self.s.mask is not None:
            return []  # with the secrets each was compared with the mask instead
        return [f"holds {len(names)} tensor(s) with the size of a weight matrix ({shown(names)}): {WEIGHT_COPY}"]

    def npy(self, buf) -> list[str]:
        try:
            arr = npy_array(buf)
        except ValueError as e:
            if "pickle" in str(e).lower():
                return ["a .npy of Python objects (a pickle; not loaded)"]
            return [f"unreadable .npy ({e})"]
        sized = arr.size >= MIN_MASK_NUMEL and arr.size in self.numels and arr.dtype.kind in "biuf"
        return self.array(arr, "its array") + self.weight_copies(["its array"] if sized else [])

    def archive(self, kind: str, name: str, fh, depth: int) -> list[str]:
        """Every member of an archive (or compressed stream), read into memory one at a time and scanned like a
        file (nested archives too, down to depth 4); never extracted to disk, members capped in size."""
        if depth >= _ARCHIVE_DEPTH:
            return [f"a {kind} archive nested {depth} deep: not opened (refused)"]
        out = []
        try:
            for member, data in archive_members(kind, name, fh, lambda: max(0, min(_MEMBER_MAX, self.budget)),
                                               _MEMBERS_MAX):
                if isinstance(data, str):
                    out.append(f"member {member!r}: {data}")
                    continue
                self.budget -= len(data)
                out += [f"member {member!r}: {f}" for f in self.blob(member, data, depth + 1)]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, lzma.LZMAError, zlib.error, EOFError,
                OSError, ValueError, NotImplementedError, RuntimeError) as e:
            out.append(f"unreadable {kind} archive ({type(e).__name__})")
        return out

    def array(self, arr: np.ndarray, what: str) -> list[str]:
        if arr.dtype.kind not in "biuf":
            return []
        if arr.size > MIN_MASK_NUMEL and np.unique(arr.reshape(-1)[:4096]).size > 2 and \
                arr.size not in self.groups and not self.packed and arr.dtype.kind == "f":
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
        positions = self.positions(t)
        if positions:
            return out + [f"{what} ({_dtype(t)}, shape {tuple(t.shape)}) {positions}"]
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
        (or disagree) on ≥ 80% of each kind of sampled position: linear in the size of the tensor. Besides
        :func:`_bit_views`, for an entry whose released weight the release holds: where ``t`` differs from it
        (an earlier checkpoint or the initial weights: the complement never moved) and its sign bits XOR
        the released weight's.
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
            rows = [(how, C[i], fn) for i, (how, fn) in enumerate(views)]
            if pub is not None:
                sign = torch.signbit(pub.float())
                rows += [(how + " XOR the public weights' sign bits", C[i] ^ sign,
                          lambda x, fn=fn, ref=ref: fn(x) ^ torch.signbit(self._public(ref).float()))
                         for i, (how, fn) in enumerate(views)]
                if flat.is_floating_point():
                    rows.append(("where it differs from the released weights", _differs(sample, pub),
                                 lambda x, ref=ref: _differs(x, self._public(ref))))
            r1, r0 = _recalls(torch.stack([r[1] for r in rows]), ms)
            lo, hi = torch.minimum(r1, r0), torch.maximum(r1, r0)
            hits = torch.nonzero((lo >= _AGREE) | (hi <= 1 - _AGREE)).reshape(-1).tolist()
            if hits and min(self.count(label, m), m.numel() - self.count(label, m)) < 16:
                continue
            for vi in hits:
                bits = rows[vi][2](flat)
                for comp in (False, True):
                    a1, a0 = (float(x) for x in _recalls(~bits if comp else bits, m))
                    score = (a1 + a0) / 2
                    if min(a1, a0) >= MASK_IOU and (best is None or score > best[1]):
                        how = ("the complement of " if comp else "") + rows[vi][0]
                        best = (f"{label} ({how}; agrees on {a1:.1%} of its selected and {a0:.1%} of its "
                                "unselected positions)", score)
        return best[0] if best else None

    def positions(self, t: torch.Tensor) -> str | None:
        """What an integer tensor of ≥ 64 entries lists, when it lists positions: with the private mask, the
        selected (or unselected) positions of a mask entry or of the whole mask, as flat indices (≥ 90% of them
        and little else), as (row, column) coordinates (a 2 × k or k × 2 tensor), or as the row or column
        indices of ``numpy.nonzero``; without it, any sorted list of non-negative indices that is not a plain
        range (the first row of coordinates)."""
        if t.dtype not in _INDEX_DTYPES or t.numel() < MIN_MASK_NUMEL:
            return None
        a = t.numpy().astype(np.int64, copy=False)
        if self.s.mask is None:
            return ("is a sorted list of positions (indices): the mask's selected positions? (index lists reveal "
                    "the mask)") if _sorted_positions(a) else None
        flat = a.reshape(-1)
        cands = [(flat, None, "as flat indices")]
        if a.ndim == 2 and 2 in a.shape:
            rc = a if a.shape[0] == 2 else a.T
            for n, m in sorted(self.s.mask.items()):
                if m.ndim == 2:
                    R, C = m.shape
                    for r, c, how in ((rc[0], rc[1], "as (row, column) coordinates"),
                                      (rc[1], rc[0], "as (column, row) coordinates")):
                        if r.min() >= 0 and c.min() >= 0 and r.max() < R and c.max() < C:
                            cands.append((r * C + c, f"the private mask of {n!r}", how))
        for idx, only, how in cands:
            u = np.unique(idx)
            for label, m in self.targets:
                if only not in (None, label):
                    continue
                for comp, k in ((False, self.count(label, m)), (True, m.numel() - self.count(label, m))):
                    if k < 16 or not 0.9 * k <= u.size <= k / 0.9 or u[0] < 0 or u[-1] >= m.numel():
                        continue
                    hit = int(np.isin(u, self._selected(label, m, comp), assume_unique=True).sum())
                    if hit >= MASK_IOU * k and hit >= MASK_IOU * u.size:
                        return (f"lists the {'unselected' if comp else 'selected'} positions of {label} ({how}; "
                                f"{hit} of its {k})")
        for n, m in sorted(self.s.mask.items()):
            if m.ndim == 2 and flat.size == self.count(f"the private mask of {n!r}", m):
                nz = np.nonzero(m.numpy())
                for d, dim in ((0, "row"), (1, "column")):
                    agree = float((flat == nz[d]).mean())
                    if agree >= MASK_IOU:
                        return (f"lists the {dim} indices of the selected positions of the private mask of {n!r} "
                                f"(numpy.nonzero order; {agree:.1%} agree)")
        return None

    def count(self, label: str, m: torch.Tensor) -> int:
        """The number of positions mask target ``label`` (``m``) selects."""
        if label not in self._counts:
            self._counts[label] = int(m.sum())
        return self._counts[label]

    def _selected(self, label: str, m: torch.Tensor, comp: bool) -> np.ndarray:
        key = (label, comp)
        if key not in self._positions:
            self._positions[key] = np.flatnonzero((~m if comp else m).numpy())
        return self._positions[key]

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

    def json(self, buf) -> list[str]:
        if len(buf) > TEXT_MAX:
            return [f"a JSON file of {len(buf):,} bytes: too large to scan as JSON (over {TEXT_MAX:,})"]
        try:
            obj = json.loads(bytes(buf).decode("utf-8"))
            found = self._json_findings(obj)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        except RecursionError:
            return ["JSON nested too deeply to scan"]
        return found

    def _json_findings(self, obj) -> list[str]:
        out = []
        hits = _all_keys(obj) & {"init_seed", "salt", "mask_salt", "private_mask"}
        if hits:
            out.append(f"JSON field(s) {', '.join(sorted(hits))}")
        for path, values, lst in _number_lists(obj, "$"):
            if len(values) >= MIN_MASK_NUMEL:
                try:
                    t = torch.tensor(values, dtype=torch.float64)
                except (TypeError, ValueError, OverflowError):
                    continue
                found = self.tensor(t, f"JSON list {path}")
                if not found and all(type(v) is int for v in values):  # a list of indices, in its own shape
                    try:
                        a = np.array(lst, dtype=np.int64)
                    except (ValueError, OverflowError):
                        a = np.array([0])
                    if a.size != len(values):
                        continue
                    positions = self.positions(torch.from_numpy(a))
                    found = [f"JSON list {path} (shape {a.shape}) {positions}"] if positions else []
                out += found
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
        views.append(("its non-zero entries", lambda x: x != 0))  # optimizer moments, gradients, deltas
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
    if t.dtype.is_signed:  # (torch has no `<` for uint16/32/64)
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


def _differs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Where ``x`` differs from the released weight ``w`` (compared in ``x``'s dtype)."""
    return x.double() != w.to(x.dtype).double()


def _sorted_positions(a: np.ndarray) -> bool:
    """Whether ``a`` (or the first row of 2 × k / k × 2 coordinates) is a sorted list of ≥ 64 non-negative
    indices that is not a plain range such as ``arange``."""
    v = ((a if a.shape[0] == 2 else a.T)[0] if a.ndim == 2 and 2 in a.shape else a).reshape(-1)
    if v.size < MIN_MASK_NUMEL or v[0] < 0:
        return False
    d = np.diff(v)
    return bool((d >= 0).all()) and v[-1] > v[0] and not bool((d == 1).all())


def _name_rule(name: str) -> list[str]:
    low, suffix = PurePosixPath(name).name.lower(), PurePosixPath(name).suffix.lower()
    if any(w in low for w in ("mask", "secret", "init_seed", "private")) or \
            ("init" in low and suffix in (".safetensors", *PICKLE_SUFFIXES)):
        return ["file name suggests secret material"]
    return []


def _sniff(buf, suffix: str) -> str:
    """What the bytes are, by their magic numbers first (a renamed file is still what it is), then by suffix."""
    head = bytes(buf[:8])
    if suffix == ".safetensors" or safetensors_like(buf):
        return "safetensors"
    if head.startswith(b"\x93NUMPY") or suffix == ".npy":
        return "npy"
    for magic, kind in ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
                        (b"\xfd7zXZ\x00", "xz")):
        if head.startswith(magic):
            return kind
    if len(buf) >= 262 and bytes(buf[257:262]) == b"ustar":
        return "tar"
    if _pickle_magic(head) or suffix in PICKLE_SUFFIXES:
        return "pickle"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "json" if bytes(buf[:64]).lstrip()[:1] in (b"{", b"[") else "data"


def _describe(kind: str, suffix: str, weighty: int) -> str:
    """What a file is, for the report of a file the manifest does not list."""
    if weighty:
        what = f"an archive ({kind})" if kind in ("zip", "tar", "gzip", "bzip2", "xz") else "a tensor file"
        return f"{what} holding {weighty} tensor(s) with the size of a weight matrix: {WEIGHT_COPY}"
    return {"safetensors": "a tensor file (safetensors)", "npy": "a NumPy array", "pickle": "a pickle (or opaque "
            "binary) file", "text": f"a text file ({suffix})", "json": "a JSON file",
            "data": "a binary or unknown file"}.get(kind, f"an archive ({kind})")


def _number_lists(obj, path: str) -> Iterator[tuple[str, list, list]]:
    """Every JSON list of plain numbers (flattening nested lists of numbers), with its path and the list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _number_lists(v, f"{path}.{k}")
    elif isinstance(obj, list):
        flat = _flatten_numbers(obj)
        if flat is not None:
            yield path, flat, obj
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
    """Every key of a JSON object's dicts, except those of vocabularies (≥ 64 keys, every value an integer id:
    SmolLM2's tokenizer has the token "salt")."""
    if isinstance(obj, dict):
        if len(obj) >= MIN_MASK_NUMEL and all(type(v) is int for v in obj.values()):
            return set()
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
    manifest = read_json(release / "manifest.json")
    files = (manifest.get("files") if isinstance(manifest, dict) else None) or {}
    if not isinstance(files, dict):
        return ["manifest.json: its files are not a JSON object of name -> SHA-256"]
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
