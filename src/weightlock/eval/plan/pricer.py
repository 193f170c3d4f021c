"""Pricing: every traced op replayed on this machine (:class:`Pricer`), the machine's calibration
(:func:`calibrate`) and the time of a whole trace (:func:`predict_time`)."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .config import DTYPES
from .trace import flat, op_trace

# ---- pricing: every op replayed on this machine ---------------------------------------------------

ELEM_SIZES = (2 ** 14, 2 ** 17, 2 ** 20, 2 ** 23)
REPLAY_BYTES = 256 * 2 ** 20  # larger ops are replayed shrunk (along their leading dims) and scaled up
REPLAY_FLOPS = 4e8  # larger matmuls are replayed with their widest dimension shrunk and scaled up
COLD_BYTES = 64 * 2 ** 20  # operands rotated over copies of at least this many bytes in all (at most 8)


def _fingerprint(device: str, dtype: torch.dtype, keep_freed: bool = False) -> str:
    from ...io import machine_info

    mi = machine_info()
    parts = [device, str(dtype), torch.__version__, str(torch.get_num_threads()),
             str(mi.get("cpu") or mi.get("processor")), str(mi.get("cuda_device")),
             "keeps-freed-memory" if keep_freed else "allocator-default"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def keep_freed_memory() -> bool:
    """Make this process's allocator (glibc malloc, Linux) keep the memory it frees instead of returning it
    to the system (no mmap'd chunks, no trimming): a training step then reuses its previous step's pages,
    as under PyTorch's caching allocator on GPU, instead of faulting them in anew (the kernel zeroes every
    page: ~0.3 ns per byte here, paid on whatever glibc's heuristics gave back).

    Process-wide and irreversible (``mallopt``): the rest of the process keeps every page it ever freed.
    Nothing in weightlock calls it unless asked: ``plan(..., keep_freed=True)`` / ``weightlock plan
    --keep-freed-memory`` prices steps in that steady state (calibration and replays), and
    ``bench/plan.py validation`` measures under it. Returns whether it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-4, 0)  # M_MMAP_MAX: never mmap
        return bool(ok and libc.mallopt(-1, 2 ** 31 - 1))  # M_TRIM_THRESHOLD: never trim
    except (OSError, AttributeError):
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` (the median, not the minimum: a training step's ops do not all run at
    the best case, and this machine may be shared)."""
    fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _tensor_bytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in flat(x) if isinstance(t, torch.Tensor))


def sig_key(sig) -> str:
    """A replay signature's identity: the op, every tensor's shape, strides and dtype, the other arguments."""
    func, args, kwargs = sig

    def show(x):
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{tuple(x.stride())}{x.storage_offset()}{str(x.dtype)[6:]}"
        if isinstance(x, (list, tuple)):
            return "[" + ",".join(show(y) for y in x) + "]"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}={show(v)}" for k, v in sorted(x.items())) + "}"
        if isinstance(x, torch.device):
            return "dev"
        return repr(x)

    return f"{func._schema.name}({show(args)};{show(kwargs)})"


def materialize(x, dev: torch.device, shape=None):
    """A real tensor laid out like the meta tensor ``x`` (same strides, expanded and transposed operands
    included; ``shape`` overrides the sizes, strides then follow ``x``'s dimension order): random normal
    values for floating point, zeros (valid indices, no ignored labels) otherwise. Other arguments pass
    through, devices become ``dev``."""
    if isinstance(x, torch.device):
        return dev
    if isinstance(x, (list, tuple)):
        return type(x)(materialize(y, dev) for y in x)
    if isinstance(x, dict):
        return {k: materialize(v, dev) for k, v in x.items()}
    if not isinstance(x, torch.Tensor):
        return x
    shape = tuple(x.shape) if shape is None else tuple(shape)
    stride = list(x.stride())
    if shape != tuple(x.shape):  # recompute strides in x's dimension order (stride 0 stays 0: expanded)
        order = sorted(range(x.dim()), key=lambda i: (x.stride(i), x.shape[i]))
        acc = 1
        for i in order:
            if x.stride(i) != 0:
                stride[i] = acc
                acc *= shape[i]
            else:
                stride[i] = 0
    n = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    buf = torch.empty(max(n, 1), dtype=x.dtype, device=dev)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        buf.normal_()
    else:
        buf.zero_()
    return buf.as_strided(shape, stride)


def shrunk(sig, budget: float, kind: str):
    """``sig`` made small enough to replay (total tensor bytes ≤ ``budget``, or FLOPs for matmuls), and
    the factor its time scales by: a matmul loses from its widest dimension, any other op from its
    leading dimensions (b, then h or T: attention, rows of elementwise ops), every tensor that has that
    size there alike. Returns (args, kwargs, scale) of meta templates, or None when the op does not shrink
    that way."""
    func, args, kwargs = sig
    tensors = [t for t in flat([args, kwargs]) if isinstance(t, torch.Tensor)]
    if kind == "mm" and func._schema.name.split("::")[-1] in ("mm", "addmm"):
        a, bm = (args[1], args[2]) if len(args) > 2 else (args[0], args[1])
        m, k, n = a.shape[0], a.shape[1], bm.shape[1]
        flops = 2 * m * k * n
        new = {"m": m, "k": k, "n": n}
        while 2 * new["m"] * new["k"] * new["n"] > budget:
            widest = max(new, key=new.get)
            if new[widest] <= 64:
                break
            new[widest] = max(64, int(new[widest] * budget / (2 * new["m"] * new["k"] * new["n"])))
        shapes = {id(a): (new["m"], new["k"]), id(bm): (new["k"], new["n"])}
        if len(args) > 2:  # addmm's bias: [n] or [m, n]
            bias = args[0]
            shapes[id(bias)] = (new["n"],) if bias.dim() == 1 else (new["m"], new["n"])
        new_args = tuple(_Resized(t, shapes[id(t)]) if isinstance(t, torch.Tensor) and id(t) in shapes else t
                         for t in args)
        return new_args, kwargs, flops / (2 * new["m"] * new["k"] * new["n"])
    total = _tensor_bytes(tensors)
    scale, sizes = 1.0, {id(t): list(t.shape) for t in tensors}
    for dim in (0, 1):
        if total / scale <= budget:
            break
        D = max((t.shape[dim] for t in tensors if t.dim() > dim), default=1)
        if D <= 1:
            continue
        D2 = max(1, int(D * budget * scale / total))
        if D2 >= D:
            continue
        for t in tensors:
            if t.dim() > dim and t.shape[dim] == D:
                sizes[id(t)][dim] = D2
        scale *= D / D2
    if scale == 1.0:
        return None

    def sub(x):
        if isinstance(x, torch.Tensor):
            return _Resized(x, sizes[id(x)])
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        return x

    return sub(args), sub(kwargs), scale


class _Resized:
    """A meta tensor to materialize with other sizes (see :func:`materialize`)."""

    def __init__(self, t: torch.Tensor, shape):
        self.t, self.shape = t, tuple(shape)


def _build(x, dev):
    if isinstance(x, _Resized):
        return materialize(x.t, dev, x.shape)
    if isinstance(x, (list, tuple)):
        return type(x)(_build(y, dev) for y in x)
    if isinstance(x, dict):
        return {k: _build(v, dev) for k, v in x.items()}
    return materialize(x, dev)


def replay_seconds(func, args, kwargs, device: str = "cpu", target_s: float = 0.02) -> float:
    """Median seconds of one call of ``func`` on fresh real operands laid out like the meta templates
    ``args`` / ``kwargs``. The operands rotate over copies (``COLD_BYTES`` in all, at most 8) so that, as
    in a training step where an op reads what another op wrote long before, they do not stay in cache."""
    dev = torch.device(device)
    nbytes = max(1, sum(_materialize_bytes(x) for x in flat([args, kwargs])))
    copies = max(1, min(8, COLD_BYTES // nbytes))
    sets = [(_build(args, dev), _build(kwargs, dev)) for _ in range(copies)]
    t0 = time.perf_counter()
    func(*sets[0][0], **sets[0][1])
    _sync(device)
    first = time.perf_counter() - t0
    reps = max(5, min(40, int(target_s / max(first, 1e-7))))
    ts = []
    for i in range(reps):
        a, k = sets[(i + 1) % copies]
        t0 = time.perf_counter()
        func(*a, **k)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _materialize_bytes(x) -> int:
    if isinstance(x, _Resized):
        return math.prod(x.shape) * x.t.element_size()
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0


class Pricer:
    """Seconds of traced ops on this machine: every distinct op signature (op, operand shapes, strides,
    dtypes, arguments) is replayed once on real operands (:func:`replay_seconds`; shrunk and scaled
    above ``REPLAY_BYTES`` / ``REPLAY_FLOPS``) and cached on disk with the calibration; views cost only a
    call. Every op, views included, also pays the calibration's per-op framework cost (autograd's graph
    and engine, module calls) that a bare call does not show."""

    def __init__(self, cal: dict, device: str = "cpu", cache_path: Path | None = None):
        self.cal, self.device, self.path = cal, device, cache_path
        # replay in the allocator state the calibration was measured in (opt-in: see keep_freed_memory)
        self.keep_freed = bool(cal.get("keep_freed_memory", False))
        self.progress = False  # a progress bar on stderr while replaying (the CLI turns it on)
        self.seconds: dict[str, float] = {}
        if cache_path is not None and cache_path.exists():
            try:
                self.seconds = json.loads(cache_path.read_text())
            except (OSError, json.JSONDecodeError):
                self.seconds = {}
        self.dirty = False

    def op(self, op) -> float:
        kind, q, _, _, sig = op
        if kind == "view":
            return self.cal["view_s"]
        key = sig_key(sig)
        if key not in self.seconds:
            self.seconds[key] = self._measure(kind, q, sig)
            self.dirty = True
        return self.seconds[key]

    def measure_all(self, ops: list, passes: int = 2) -> None:
        """Replay every signature of ``ops`` not yet priced, in ``passes`` separate passes over them all,
        keeping each one's smallest median: on a shared machine a burst of load then cannot stick to
        one op."""
        todo = {}
        for op in ops:
            if op[0] != "view":
                key = sig_key(op[4])
                if key not in self.seconds:
                    todo[key] = op
        if not todo:
            return
        if self.device == "cpu" and self.keep_freed:
            keep_freed_memory()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        best = {k: math.inf for k in todo}
        saved_at = time.perf_counter()
        with Progress(TextColumn("[bold]timing operations"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True, disable=not self.progress) as bar:
            task = bar.add_task("replay", total=passes * len(todo))
            for p in range(passes):
                for k, (kind, q, _, _, sig) in todo.items():
                    best[k] = min(best[k], self._measure(kind, q, sig))
                    if p == 0:  # cached as soon as measured once: an interrupted run keeps what it priced
                        self.seconds[k] = best[k]
                        self.dirty = True
                    bar.advance(task)
                    if time.perf_counter() - saved_at > 10:
                        self.save()
                        saved_at = time.perf_counter()
        self.seconds.update(best)
        self.dirty = True
        self.save()

    def _measure(self, kind: str, q: float, sig) -> float:
        func, args, kwargs = sig
        budget = REPLAY_FLOPS if kind == "mm" else REPLAY_BYTES
        big = (q if kind == "mm" else _tensor_bytes([args, kwargs])) > budget
        try:
            if not big:
                return replay_seconds(func, args, kwargs, self.device)
            small = shrunk(sig, budget, kind)
            if small is not None:
                a, k, scale = small
                return scale * replay_seconds(func, a, k, self.device)
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass
        if kind == "mm":  # not replayable: the calibration's wide-matmul rate
            return q / self.cal["matmul_flops_per_s"]
        return _bandwidth_seconds(_tensor_bytes([args, kwargs]), self.cal)

    def save(self) -> None:
        if self.dirty and self.path is not None:
            from ...io import write_json

            write_json(self.path, self.seconds)
            self.dirty = False


def _bandwidth_seconds(nbytes: float, cal: dict) -> float:
    """Seconds to stream ``nbytes`` through an elementwise op (cold operands, fresh output)."""
    sizes = sorted((float(k), v) for k, v in cal["elementwise_seconds_by_bytes"].items())
    if nbytes <= sizes[0][0]:
        return max(cal["view_s"], sizes[0][1] * nbytes / sizes[0][0])
    for (x0, y0), (x1, y1) in zip(sizes, sizes[1:]):
        if nbytes <= x1:
            w = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return nbytes / math.exp((1 - w) * math.log(x0 / y0) + w * math.log(x1 / y1))
    return nbytes * sizes[-1][1] / sizes[-1][0]


def probe_model(width: int = 16, depth: int = 24):
    """The framework-overhead probe: a stack of tiny residual blocks (norm, two linear maps, activation),
    every kernel negligible, so a training step's time is almost all per-op cost."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(width)
            self.a = nn.Linear(width, width, bias=False)
            self.b = nn.Linear(width, width, bias=False)

        def forward(self, x):
            return x + self.b(nn.functional.gelu(self.a(self.norm(x))))

    return nn.Sequential(*(Block() for _ in range(depth)))


def probe_trace(model: nn.Module, x: torch.Tensor) -> list:
    tr = op_trace()
    with tr:
        model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return tr.ops


def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, remeasure: bool = False,
              repeats: int = 5, keep_freed: bool = False) -> dict:
    """What pricing needs besides op replays, cached in the weightlock cache dir per machine, device,
    dtype, torch version and thread count (``remeasure`` re-runs it and drops the cached op replays):
    a wide matmul's rate and elementwise bandwidth (cold operands) at a few sizes, the fallbacks for ops
    that cannot be replayed; the cost of a view call; the framework's cost per op in a training step
    beyond the op's own call: one step of a stack of tiny residual blocks (kernels negligible) minus its
    ops' replays, over its op count. ``keep_freed``: first make this process's allocator keep freed memory
    (:func:`keep_freed_memory`, process-wide; off by default), calibrated and cached apart from the default."""
    from ...io import cache_dir, read_json, write_json

    fp = _fingerprint(device, dtype, keep_freed)
    path = cache_dir() / f"plan_calibration_{fp}.json"
    replays = cache_dir() / f"plan_replays_{fp}.json"
    if path.exists() and not remeasure:
        cal = read_json(path)
        if "framework_s_per_op" in cal:
            return cal
    if replays.exists():
        replays.unlink()
    if device == "cpu" and keep_freed:
        keep_freed_memory()
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    n = 1024
    pairs = [(rnd(n, n), rnd(n, n)) for _ in range(4)]
    it = iter(range(10 ** 9))
    mm_rate = 2 * n ** 3 / _time(lambda: torch.mm(*pairs[next(it) % 4]), max(repeats, 10), device)
    elem = {}
    for size in ELEM_SIZES:
        xs = [(rnd(size), rnd(size)) for _ in range(max(1, min(8, COLD_BYTES // (8 * size))))]
        it = iter(range(10 ** 9))
        elem[str(size * 3 * xs[0][0].element_size())] = _time(lambda: torch.add(*xs[next(it) % len(xs)]),  # noqa: B023
                                                                max(repeats, 20), device)
    view = rnd(8, 8)
    view_s = _time(lambda: view.t(), 200, device)
    cal = {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "matmul_flops_per_s": mm_rate,
           "elementwise_seconds_by_bytes": elem, "view_s": view_s, "framework_s_per_op": 0.0,
           "keep_freed_memory": bool(keep_freed)}
    # the framework's per-op cost: a step of tiny blocks, measured, minus its ops priced as replays
    torch.manual_seed(0)
    model = probe_model().to(dev, dtype)
    x = rnd(4, 16).requires_grad_()

    def step():
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)

    measured = min(_time(step, 20, device) for _ in range(3))
    meta = probe_model().to("meta", dtype)
    ops = probe_trace(meta, torch.empty(4, 16, device="meta", dtype=dtype, requires_grad=True))
    pricer = Pricer(cal, device)
    replayed = sum(pricer.op(o) for o in ops)
    cal["framework_s_per_op"] = max(0.0, (measured - replayed) / len(ops))
    cal["framework_probe"] = {"step_s": measured, "replayed_s": replayed, "ops": len(ops)}
    write_json(path, cal)
    return cal


def pricer_for(cal: dict) -> Pricer:
    """The op pricer of calibration ``cal`` (its replays cached next to it)."""
    from ...io import cache_dir

    key = (cal["device"], cal["dtype"], cal["measured_at"], bool(cal.get("keep_freed_memory", False)))
    if key not in _PRICERS:
        dt = DTYPES.get(cal["dtype"], torch.float32)
        fp = _fingerprint(cal["device"], dt, cal.get("keep_freed_memory", False))
        path = cache_dir() / f"plan_replays_{fp}.json"
        _PRICERS[key] = Pricer(cal, cal["device"], path)
    return _PRICERS[key]


_PRICERS: dict = {}


def op_seconds(op, cal: dict) -> float:
    """Predicted seconds of one traced op in a training step: its replay (or a view call) plus the
    framework's per-op cost."""
    return pricer_for(cal).op(op) + cal["framework_s_per_op"]


def predict_time(ops: list, cal: dict) -> dict:
    """Seconds of an op trace priced by the calibration ``cal``: the total, by kind of op, and the op count."""
    parts = {"mm": 0.0, "attention": 0.0, "elementwise": 0.0, "views": 0.0, "framework": 0.0}
    pricer = pricer_for(cal)
    pricer.measure_all(ops)
    for op in ops:
        kind = "attention" if op[0].startswith("sdpa") else ("views" if op[0] == "view" else op[0])
        parts[kind] += pricer.op(op)
        parts["framework"] += cal["framework_s_per_op"]
    pricer.save()
    return {"seconds": sum(parts.values()), "parts": parts, "ops": len(ops)}
