"""Reading what a release directory holds without trusting it: safetensors and ``.npy`` from bytes (headers
checked, data copied out tensor by tensor, never a pickle), and the members of archives in memory (zip, tar, gzip,
bzip2, xz; sizes capped, nothing extracted to disk)."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import math
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch

ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}


def safetensors_like(buf) -> bool:
    n = int.from_bytes(bytes(buf[:8]), "little") if len(buf) >= 10 else 0
    return 2 <= n <= len(buf) - 8 and bytes(buf[8:9]) == b"{"


def st_header(buf) -> tuple[dict, dict, int]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets), its metadata and where its data
    starts; ValueError when the header is not one."""
    if len(buf) < 8:
        raise ValueError("too short")
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n > min(len(buf) - 8, 100 << 20):
        raise ValueError("header larger than the file")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"header is not JSON: {e}") from None
    except RecursionError:
        raise ValueError("header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ValueError("malformed header")
    return header, meta, 8 + n


def st_file_header(path: Path) -> tuple[dict, dict]:
    """The tensors and metadata of a safetensors file, reading its header only."""
    header, meta, _ = st_file_parts(path)
    return header, meta


def st_file_parts(path: Path) -> tuple[dict, dict, int]:
    """The tensors and metadata of a safetensors file and the size of its data (the bytes after the header),
    reading its header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ValueError("not a safetensors file")
        header, meta, start = st_header(head + f.read(n))
    return header, meta, size - start


def st_layout(header: dict, data_size: int) -> list[str]:
    """How a safetensors header's tensor entries differ from what the format writes: each entry exactly
    ``dtype``, ``shape`` and ``data_offsets``, with a known dtype and offsets spanning its bytes, and the
    tensors' data contiguous from the start of the data to its end (no gap, no overlap, nothing after)."""
    out, spans = [], []
    for k, info in header.items():
        if set(info) != {"dtype", "shape", "data_offsets"}:
            out.append(f"tensor {k!r}: its header entry holds {', '.join(sorted(map(repr, info)))}; the format "
                       "writes exactly 'data_offsets', 'dtype', 'shape'")
            continue
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES or not (
                isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape) and
                isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
            out.append(f"tensor {k!r}: malformed header entry")
            continue
        b, e = offsets
        if e - b != math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize:
            out.append(f"tensor {k!r}: its data_offsets span {e - b} bytes, not the {dtype} {shape} it declares")
            continue
        spans.append((b, e, k))
    end = 0
    for b, e, k in sorted(spans):
        if b != end:
            out.append(f"tensor {k!r}: its data starts at byte {b}, not where the previous tensor's ends ({end}): "
                       f"{'a gap' if b > end else 'overlapping data'}")
        end = max(end, e)
    if len(spans) == len(header) and end != data_size:
        out.append(f"its data is {data_size:,} bytes, but its tensors span {end:,}: "
                   f"{'bytes after the last tensor' if data_size > end else 'truncated'}")
    return out


def st_tensor(buf, info: dict, start: int) -> torch.Tensor:
    """One tensor of a safetensors buffer, copied out of it (bfloat16 kept; unsigned widened to signed)."""
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ST_DTYPES:
        raise ValueError(f"dtype {dtype}")
    if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape) and
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
        raise ValueError("malformed entry")
    np_dtype = np.dtype(ST_DTYPES[dtype])
    count = int(np.prod(shape)) if shape else 1
    b, e = offsets
    if not 0 <= b <= e <= len(buf) - start or e - b != count * np_dtype.itemsize:
        raise ValueError("data outside the file")
    a = np.frombuffer(buf, dtype=np_dtype, count=count, offset=start + b).copy()
    if dtype == "BF16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).reshape(shape)
    if dtype in ("U16", "U32", "U64"):
        a = a.astype(np.int64) if dtype != "U64" else a.view(np.int64)
    return torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=False)).reshape(shape)


def npy_array(buf) -> np.ndarray:
    """The array of a ``.npy`` buffer, without copying it or loading pickles; ValueError when it is not one."""
    f = io.BytesIO(bytes(buf[:1 << 16]))
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read(f)
    except (ValueError, SyntaxError, EOFError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    if dtype.hasobject:
        raise ValueError("Python objects: a pickle")
    count = int(np.prod(shape)) if shape else 1
    if f.tell() + count * dtype.itemsize > len(buf):
        raise ValueError("truncated")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=f.tell()).reshape(shape, order="F" if fortran else "C")


def archive_members(kind: str, name: str, fh, limit, max_members: int = 100_000
                    ) -> Iterator[tuple[str, bytes | str]]:
    """(name, bytes) of every member of an archive or compressed stream read from ``fh``, or (name, why it
    is not read), at most ``max_members``. ``limit()``: how many decompressed bytes a member may have; nothing
    is extracted to disk and no path in the archive is ever opened."""
    if kind == "zip":
        with zipfile.ZipFile(fh) as z:
            for i, info in enumerate(z.infolist()):
                if i == max_members:
                    yield "...", f"more than {max_members} members: the rest not checked"
                    return
                if info.is_dir():
                    continue
                if _unsafe_member(info.filename):
                    yield info.filename, "its path leaves the archive (absolute or '..')"
                mode = info.external_attr >> 16  # a Unix file mode, where the zip was written on Unix
                if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                    yield info.filename, "a link or special file inside an archive"
                    continue
                if info.flag_bits & 0x1:
                    yield info.filename, "encrypted: cannot be checked"
                    continue
                with z.open(info) as f:
                    yield info.filename, _read_capped(f, limit())
    elif kind == "tar":
        with tarfile.open(fileobj=fh, mode="r:") as tf:
            for i, m in enumerate(tf):
                if i == max_members:
                    yield "...", f"more than {max_members} members: the rest not checked"
                    return
                if _unsafe_member(m.name):
                    yield m.name, "its path leaves the archive (absolute or '..')"
                if m.isfile():
                    yield m.name, _read_capped(tf.extractfile(m), limit())
                elif not m.isdir():
                    yield m.name, "a link or special file inside an archive"
    else:
        base = PurePosixPath(name).name
        inner = {".gz": "", ".tgz": ".tar", ".bz2": "", ".tbz2": ".tar", ".xz": "", ".txz": ".tar"}
        suffix = PurePosixPath(base).suffix.lower()
        inner_name = base[:-len(suffix)] + inner[suffix] if suffix in inner else base + " (decompressed)"
        opener = {"gzip": lambda: gzip.GzipFile(fileobj=fh), "bzip2": lambda: bz2.BZ2File(fh),
                  "xz": lambda: lzma.LZMAFile(fh)}[kind]
        with opener() as f:
            yield inner_name, _read_capped(f, limit())


def _read_capped(f, limit: int) -> bytes | str:
    data = f.read(limit + 1)
    if len(data) > limit:
        return f"not checked: more than {limit:,} bytes once decompressed (a zip bomb?)"
    return data


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts
