"""Atomic file output and small helpers shared by every writer in weightlock."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import WeightlockError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` atomically.

    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its directory."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically (paths become strings, tensor and numpy
    scalars numbers)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, anything else not JSON as its ``str``), to compare
    with a recorded value."""
    return json.loads(json.dumps(obj, default=str))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a missing or invalid file is a :class:`WeightlockError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightlockError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightlockError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MANIFEST = "manifest.json"


def write_manifest(directory: str | os.PathLike, **fields: Any) -> dict[str, str]:
    """Write ``directory/manifest.json``: ``fields`` and, under ``files``, the SHA-256 of every other file
    directly in ``directory`` (what a release's readers verify); returns that file list."""
    d = Path(directory)
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(d / MANIFEST, {**fields, "files": files})
    return files


def check_out_dir(out: str | os.PathLike, inputs: tuple = (), non_empty_ok: bool = True,
                  hint: str = "pass --overwrite to replace it") -> Path:
    """Refuse, before any work, an output directory that cannot be written or that is, contains or lies
    inside one of ``inputs`` (a model or data path): replacing it would delete or alter the input; with
    ``non_empty_ok=False`` also one that is not empty (``hint``: the ways out the command offers)."""
    out = Path(out)
    real = out.resolve()
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        src = Path(inp).resolve()
        if real == src or real in src.parents:
            raise WeightlockError(f"{out}: the output directory is or contains the input {inp}; "
                                  "choose an output outside it")
        if src in real.parents:
            raise WeightlockError(f"{out}: the output directory lies inside the input {inp}; "
                                  "choose an output outside it")
    if out.exists() and not out.is_dir():
        raise WeightlockError(f"{out}: exists and is not a directory")
    if not non_empty_ok and out.is_dir() and any(out.iterdir()):
        raise WeightlockError(f"{out}: directory is not empty; {hint}")
    parent = real
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise WeightlockError(f"{out}: cannot create it ({parent} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".weightlock-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        # an existing directory that answers "No such file or directory" (/proc, /sys) takes no new files
        why = {errno.ENOENT: "does not accept new files", errno.EACCES: "is not writable (permission denied)",
               errno.EPERM: "is not writable (operation not permitted)",
               errno.EROFS: "is on a read-only file system"}.get(e.errno, f"is not writable ({e.strerror or e})")
        if parent == real:
            raise WeightlockError(f"{out}: cannot write into this directory (it {why})") from None
        raise WeightlockError(f"{out}: the output directory cannot be created there ({parent} {why})") from None
    return out


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False, resume: bool = False, inputs: tuple = (),
                    hint: str = "pass --overwrite to replace it") -> Path:
    """Create ``out``; refuse a non-empty one unless ``overwrite`` (wipe it) or ``resume`` (keep it), and
    refuse one that is, contains or lies inside an input (see :func:`check_out_dir`). ``hint`` ends the
    error for a non-empty directory (the ways out the calling command offers)."""
    out = check_out_dir(out, inputs, non_empty_ok=overwrite or resume, hint=hint)
    if out.exists() and any(out.iterdir()) and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def staged_out_dir(out: str | os.PathLike, overwrite: bool = False, inputs: tuple = (),
                   hint: str = "pass --overwrite to replace it") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out`` to write the whole output into; on success it
    replaces ``out`` (an existing ``out`` must be empty unless ``overwrite``), on any error (Ctrl-C included)
    it is removed, with the parent directories this call created, and ``out`` is left as it was: a failed
    run leaves nothing behind. Checked first as :func:`check_out_dir` does."""
    out = check_out_dir(out, inputs, non_empty_ok=overwrite, hint=hint)
    created, p = [], out.absolute().parent
    while not p.exists():
        created.append(p)
        p = p.parent
    tmp = None
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        if out.exists():  # empty, or replaced with --overwrite: moved aside first, removed once the new one is in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=tmp.parent))
            os.replace(out, old / "out")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous output back
                os.replace(old / "out", out)
                old.rmdir()
            raise
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; stops at one that is not empty (something else wrote there)
            try:
                d.rmdir()
            except OSError:
                break
        raise


def move_dir_contents(src: Path, dst: Path) -> None:
    """Move every file of ``src`` into ``dst`` with ``os.replace`` (atomic per file), then remove ``src``."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.is_file():
            os.chmod(item, 0o666 & ~_umask())
        target = dst / item.name
        if target.is_dir() and not item.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(src, ignore_errors=True)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/weightlock`` (default ``~/.cache/weightlock``); ``WEIGHTLOCK_CACHE`` overrides."""
    env = os.environ.get("WEIGHTLOCK_CACHE")
    if env:
        p = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        p = Path(base) / "weightlock"
    p.mkdir(parents=True, exist_ok=True)
    return p


def machine_info() -> dict:
    """What produced a result: date, Python, torch, platform, CPU (model and count), threads, CUDA device."""
    import datetime
    import platform
    import sys

    import torch

    info = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def threads_per_process(processes: int) -> int:
    """Intra-op threads for each of ``processes`` processes sharing this machine: an explicit
    ``OMP_NUM_THREADS`` wins; otherwise the cores divided among the processes (at least 1), so that
    processes × threads ≤ cores (oversubscribed torch processes on 2 cores ran ~30× slower)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


def set_threads_per_process(processes: int) -> int:
    """Apply :func:`threads_per_process` to torch in this process; returns the thread count."""
    import torch

    n = threads_per_process(processes)
    torch.set_num_threads(n)
    return n


def dist_or_none():
    """``torch.distributed`` initialised for a multi-process run (``WORLD_SIZE`` > 1: NCCL on GPUs, else Gloo,
    CPU threads shared between the processes), or None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        set_threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        if not dist.is_initialized():  # one process may capture for an hour while the others wait at a barrier
            import datetime

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=datetime.timedelta(hours=6))
        return dist
    return None
