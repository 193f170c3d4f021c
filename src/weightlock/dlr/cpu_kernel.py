"""A fused C kernel for DLR-Net inference on CPU: one call carries the tokens through all the blocks of a net.

    z_0 = x;  z_{l+1} = z_l + σ(n_l(z_l)·V_lᵀ + b_l)·U_lᵀ + c_l;  out = s·(z_L − z_0)

and the gated form, ``σ(n_l(z_l)·G_lᵀ + g_l) ⊙ (n_l(z_l)·V_lᵀ + b_l)`` in place of the activation.

Decoding is bound by reading the weights once per token, and a locked MLP has the original's parameters and
FLOPs, so the physical limit is the original's speed. The eager fast path (:meth:`DLRNet.forward_fast`) pays
three PyTorch kernel launches per block (72 blocks × 30 nets per token on SmolLM2 at rank 32). Here one call
per net runs every block in C (the source is ``dlr_cpu.c``, shipped beside this module):

* **packed kernels** (``dlr_run_f32`` / ``dlr_run_bf16``, AVX-512; no per-block norm, d % 16 == 0, r % 16 == 0): the
  weights are copied once into a layout the kernel streams (the down weights ``[V; G]`` transposed to d × R, U
  transposed to r × d; in bf16 pair-interleaved for ``VDPBF16PS``), so both products are broadcast-FMA tiles of up
  to 8 rows with no horizontal sums. Prefill carries rows through all blocks in chunks of :data:`PREFILL_CHUNK` that
  stay in L2 (threads take whole chunks, each reusing one chunk's state in a per-thread scratch buffer that every
  call reuses); decode (few rows) splits each pass's columns over an OpenMP team with one barrier per pass. In bf16
  on one thread the activation is the down pass's tile finish when a block's R down columns fit one tile (R = 16, 32
  or 64). The copy costs the net's weight bytes once more; it is cached on the net and rebuilt when a parameter is
  replaced or changed in place (an optimizer step), so the kernel never runs stale weights. bf16 keeps PyTorch's
  rounding: products accumulated in fp32 and rounded to bf16, the residual stream kept in fp32 (``z += bf16(acc)``)
  as the eager fast path keeps it, and its bf16 rounding fed to the next block.
* **portable kernels** (any CPU, per-block RMSNorm, any width): up to :data:`MAX_ROWS` rows per call (decode),
  reading the parameters' memory directly; longer inputs there keep the eager fast path.

The activation is vectorized (erf after Abramowitz & Stegun 7.1.26 and a Cephes exp, within 2e-7). The source
is compiled on first use with the system's C compiler (``cc``, or ``$CC``) into ``$WEIGHTLOCK_CACHE``
(default ``~/.cache/weightlock/kernels``), keyed by a hash of the source, the flags and the CPU, and loaded
with :mod:`ctypes`; nothing is compiled at install time. Without a compiler (or with
``WEIGHTLOCK_CPU_KERNEL=0``) :func:`available` is False, one warning says why, and the nets run the eager
fast path. Imported by name from :mod:`weightlock.dlr.modeling_weightlock_dlr`, so a release loaded without
weightlock also runs the eager path.
"""
from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3}
MAX_ROWS = 16  # tokens per call: above this the eager path's BLAS matmuls are as fast
PREFILL_CHUNK = 256  # rows a prefill chunk carries through all blocks (its state, 256·d·4 bytes, stays in L2)
NORM_EPS = 1e-6  # DLRBlock's nn.RMSNorm(eps=1e-6)
_CACHE = "_cpu_kernel_args"  # the instance attribute holding the pointer tables (dropped by DLRNet._apply)

SOURCE = (Path(__file__).with_name("dlr_cpu.c")).read_text()  # shipped beside this module

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]
_STATE: dict = {}  # "lib": the loaded library, or "error": why it is unavailable


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("WEIGHTLOCK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "weightlock" / "kernels"


def library_path() -> Path:
    """Where the compiled kernel for this source, these flags and this CPU lives."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, _cpu_id(), platform.machine(), sys.platform]).encode())
    return cache_dir() / f"dlr_cpu_{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "dlr_cpu.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise RuntimeError(f"{cc} failed: {why}")
        os.replace(out, target)  # atomic: concurrent processes never load a half-written library


def _load() -> ctypes.CDLL:
    path = library_path()
    if not path.is_file():
        _compile(path)
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.dlr_f32.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32]
    lib.dlr_f32.restype = None
    lib.dlr_bf16.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32]
    lib.dlr_bf16.restype = None
    lib.dlr_has_packed.restype = i32
    if lib.dlr_has_packed() & 1:
        lib.dlr_run_f32.argtypes = [i64, i64, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i64,
                                    ctypes.c_float, ptr]
        lib.dlr_run_f32.restype = None
    if lib.dlr_has_packed() & 2:
        lib.dlr_run_bf16.argtypes = [i64, i64, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32,
                                     i32, i64, ctypes.c_float, ptr, ptr]
        lib.dlr_run_bf16.restype = None
    lib.dlr_add_round.argtypes = [i64, ptr, ptr, ptr]
    lib.dlr_add_round.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded (compiling it on the first call). Says once why not."""
    if "lib" in _STATE:
        return True
    if "error" in _STATE:
        return False
    if os.environ.get("WEIGHTLOCK_CPU_KERNEL", "1") == "0":
        _STATE["error"] = "WEIGHTLOCK_CPU_KERNEL=0"
        return False
    try:
        _STATE["lib"] = _load()
        return True
    except Exception as e:  # no compiler, a sandbox refusing to load: the eager fast path is exact too
        _STATE["error"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"DLR-Net CPU kernel unavailable ({_STATE['error']}); using the eager fast path",
                      stacklevel=2)
        return False


def add_round(z: torch.Tensor, inc: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``z += inc`` (fp32 ``z``, bf16 ``inc``, both contiguous, one shape) and ``z`` rounded to bf16 into
    ``out`` (a new tensor when None), in one pass (the residual step of the stacked engine and of bf16 nets'
    eager path); the torch ops when the kernel is unavailable. Returns ``out``."""
    out = torch.empty(z.shape, dtype=torch.bfloat16) if out is None else out
    if not (available() and z.is_contiguous() and inc.is_contiguous() and out.is_contiguous()
            and z.dtype == torch.float32 and inc.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
            and z.shape == inc.shape == out.shape and z.device.type == "cpu"):
        z.add_(inc)
        return out.copy_(z)
    _STATE["lib"].dlr_add_round(z.numel(), z.data_ptr(), inc.data_ptr(), out.data_ptr())
    return out


def disable(reason: str) -> None:
    """Stop using the kernel in this process (tests, or a caller that wants the eager path)."""
    _STATE.pop("lib", None)
    _STATE["error"] = reason


def packed_kinds() -> list[str]:
    """The dtypes this CPU runs on the packed kernels (``float32``: AVX-512F; ``bfloat16``: AVX-512 BF16)."""
    if not available():
        return []
    bits = _STATE["lib"].dlr_has_packed()
    return [name for bit, name in ((1, "float32"), (2, "bfloat16")) if bits & bit]


def _packed_ok(net, x: torch.Tensor) -> bool:
    """The packed AVX-512 kernel: no per-block norm, width and rank multiples of 16, fp32 (AVX-512F) or bf16
    (AVX-512 BF16) — any number of tokens."""
    s = net.spec
    bit = 1 if x.dtype == torch.float32 else 2
    return not s.norm and s.width % 16 == 0 and s.rank % 16 == 0 and bool(_STATE["lib"].dlr_has_packed() & bit)


def supported(net, x: torch.Tensor) -> bool:
    """Whether :func:`forward` handles ``net`` on ``x``: CPU, fp32 or bf16 with the weights in the input's dtype,
    a known activation, the kernel available, and either the packed kernel's conditions (:func:`_packed_ok`,
    any number of tokens) or at most MAX_ROWS tokens (the portable decode kernel; in bf16 without a per-block
    norm)."""
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or net.spec.activation not in ACTIVATIONS:
        return False
    w = net.blocks[0].down.weight
    if not (w.dtype == x.dtype and w.device.type == "cpu" and available()):
        return False
    if _packed_ok(net, x):
        return True
    return x.numel() <= MAX_ROWS * net.spec.width and not (x.dtype == torch.bfloat16 and net.spec.norm)


# packed lane j of a group of 32 columns holds column _UP_GROUP[j] (lanes 0-15 and 16-31: two sums' vectors)
_UP_GROUP = (0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23,
             8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31)


def up_permutation(d: int) -> torch.Tensor:
    """The column order of the bf16 kernel's packed U (``d`` % 32 == 0): each group of 32 columns permuted so that
    the up pass's epilogue, which widens its rounded sums with 128-bit-lane unpacks, gets them back in order."""
    return (torch.arange(0, d, 32).view(-1, 1) + torch.tensor(_UP_GROUP)).reshape(-1)


_VERSION = operator.attrgetter("_version")
_PACKED = "_cpu_kernel_packed"  # the instance attribute holding the packed weights (dropped by DLRNet._apply)


@torch.no_grad()
def _packed(net) -> tuple:
    """``net``'s weights packed for the AVX-512 kernel (see dlr_cpu.c): (W, bW, U, bU, sk) with W = [V; G]ᵀ per
    block (L × d × R) and U transposed (L × r × d) in fp32, or with the reduction dimension interleaved in pairs
    in bf16 (L × d/2 × R × 2, L × r/2 × d × 2); biases stacked (L × R, L × d) or None; sk the sink's parameters
    in fp32 ([value, a, g, a0, g0], or None without a sink). A copy (as much memory as
    the net's weights), built once and rebuilt when a parameter was replaced or changed in place (the sum of
    the parameters' version counters moved: an optimizer step, ``load_state_dict``, ``copy_``)."""
    w = net._weights()
    params = [t for blk in w for t in blk[1:] if t is not None] + (list(net.sink.parameters()) if net.spec.sink else [])
    version = sum(map(_VERSION, params))
    entry = net.__dict__.get(_PACKED)
    if entry is not None and entry[0] is w and entry[1] == version:
        return entry[2]
    net.__dict__.pop(_PACKED, None)  # free the old copy before building the new one
    s = net.spec
    gated = s.form == "gated"
    L, d, r = s.depth, s.width, s.rank
    rows = torch.stack([blk[1].detach() for blk in w])  # L × r × d
    if gated:
        rows = torch.cat([rows, torch.stack([blk[5].detach() for blk in w])], 1)  # L × 2r × d
    up = torch.stack([blk[3].detach() for blk in w])  # L × d × r
    if rows.dtype == torch.float32:
        W, U = rows.transpose(1, 2).contiguous(), up.transpose(1, 2).contiguous()
    else:
        W = rows.view(L, -1, d // 2, 2).permute(0, 2, 1, 3).contiguous()
        U = up.view(L, d, r // 2, 2).permute(0, 2, 1, 3)
        if d % 32 == 0:  # the bf16 up pass's epilogue reads its sums' columns permuted (dlr_cpu.c, up_epilogue2)
            U = U[:, :, up_permutation(d)]
        U = U.contiguous()
    bW = None
    if w[0][2] is not None:
        bW = torch.stack([torch.cat([blk[2], blk[6]]) if gated else blk[2] for blk in w]).detach().contiguous()
    bU = torch.stack([blk[4] for blk in w]).detach().contiguous() if w[0][4] is not None else None
    sk = None
    if s.sink:  # [value, a, g, a0, g0] in fp32, as DLRSink computes
        k = net.sink
        sk = torch.cat([k.value.detach().float(), k.amp.weight.detach().float().reshape(-1),
                        k.gate.weight.detach().float().reshape(-1), k.amp.bias.detach().float().reshape(-1),
                        k.gate.bias.detach().float().reshape(-1)]).contiguous()
    packed = (W, bW, U, bU, sk)
    net.__dict__[_PACKED] = (w, version, packed)
    return packed


_LOCAL = threading.local()  # the calling thread's scratch buffer (one kernel call at a time per thread)


def _scratch(*parts: tuple[int, torch.dtype]) -> list[torch.Tensor]:
    """Views of the calling thread's scratch buffer, one per ``(numel, dtype)``, each starting on a 64-byte
    boundary. The buffer grows to the largest call seen, is reused and never shrinks (it lives as long as the
    thread): a prefill's per-chunk state (256 rows × d × 6 bytes per OpenMP thread in bf16, 0.9 MiB at d = 576)
    is then warm in cache and costs no fresh pages on every net's call."""
    offsets, total = [], 0
    for numel, dtype in parts:
        offsets.append(total)
        total += -(-numel * dtype.itemsize // 64) * 64
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.numel() < total:
        _LOCAL.buf = buf = torch.empty(total, dtype=torch.uint8)
    return [buf[o:o + numel * dtype.itemsize].view(dtype) for o, (numel, dtype) in zip(offsets, parts)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pointer_table(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def _args(net) -> tuple:
    """The per-block pointer tables of ``net``'s weights, built once (the weights must be contiguous: a
    non-contiguous one is copied, and the copy kept alive here). Rebuilt when parameters were replaced."""
    w = net._weights()  # (norm, V, b, U, c, G, g) per block; DLRNet drops it when parameters are swapped
    cached = net.__dict__.get(_CACHE)
    if cached is not None and cached[0] is w and all(t[1].data_ptr() == p for t, p in zip(w[:1], cached[2])):
        return cached[1]
    keep = []

    def c(t):
        if t is None:
            return None
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        keep.append(t)
        return t

    tables = tuple(_pointer_table([c(blk[i]) for blk in w]) for i in (1, 2, 3, 4))
    norms = _pointer_table([None if blk[0] is None else c(blk[0].weight) for blk in w])
    gates = tuple(_pointer_table([c(blk[i]) for blk in w]) if w[0][5] is not None else None for i in (5, 6))
    args = (tables, norms, gates, keep)
    net.__dict__[_CACHE] = (w, args, [w[0][1].data_ptr()])
    return args


@torch.no_grad()
def forward(net, x: torch.Tensor, sink: bool = False) -> torch.Tensor:
    """``net``'s DLR output for ``x`` (…, d): the same maths as the eager fast path; with ``sink`` the net's
    sink component added as :meth:`DLRNet.forward` adds it (the packed kernels fuse it into their last pass).
    Releases saved before the sink was fused call this without ``sink`` and add it themselves."""
    lib = _STATE["lib"]
    s = net.spec
    shape = x.shape
    x2 = x.reshape(-1, s.width)
    n = x2.shape[0]
    threads = torch.get_num_threads()
    act = ACTIVATIONS[s.activation]
    if _packed_ok(net, x):
        W, bW, U, bU, sk = _packed(net)
        sk = sk if sink and s.sink else None
        gated = s.form == "gated"
        # decoding steps: one chunk (a team shares it); prefill: chunks that stay in L2, whole ones per thread
        chunk = n if n <= MAX_ROWS else min(PREFILL_CHUNK, -(-n // threads))
        x2 = x2.contiguous()
        out = torch.empty_like(x2)
        rows, R = threads * chunk, (2 if gated else 1) * s.rank  # scratch: one chunk per thread
        if x.dtype == torch.float32:
            (hd,) = _scratch((rows * R, torch.float32))
            lib.dlr_run_f32(n, s.width, s.rank, s.depth, int(gated), W.data_ptr(), _ptr(bW), U.data_ptr(), _ptr(bU),
                            x2.data_ptr(), out.data_ptr(), hd.data_ptr(), act, threads, chunk, s.readout, _ptr(sk))
        else:
            z, zl, hd, hb, xf = _scratch((rows * s.width, torch.float32), (rows * s.width, torch.bfloat16),
                                         (rows * R, torch.float32), (rows * s.rank, torch.bfloat16),
                                         (threads * s.width, torch.float32))
            lib.dlr_run_bf16(n, s.width, s.rank, s.depth, int(gated), W.data_ptr(), _ptr(bW), U.data_ptr(),
                             _ptr(bU), x2.data_ptr(), out.data_ptr(), z.data_ptr(), zl.data_ptr(), hd.data_ptr(),
                             hb.data_ptr(), act, threads, chunk, s.readout, _ptr(sk), xf.data_ptr())
        return out.view(shape)
    (vs, bvs, us, bus), norms, (gs, bgs), _ = _args(net)  # the portable decode kernels
    h = torch.empty(n, s.rank, dtype=torch.float32)
    if x.dtype == torch.float32:
        z = x2.contiguous().clone()
        zn = torch.empty_like(z) if s.norm else z
        lib.dlr_f32(n, s.width, s.rank, s.depth, vs, bvs, us, bus, norms, gs, bgs, z.data_ptr(), h.data_ptr(),
                    zn.data_ptr(), act, threads)
        out = z.sub_(x2)
    else:
        z = x2.float()
        zl = torch.empty_like(z)
        lib.dlr_bf16(n, s.width, s.rank, s.depth, vs, bvs, us, bus, gs, bgs, z.data_ptr(), zl.data_ptr(),
                     h.data_ptr(), act, threads)
        out = z.sub_(x2.float())
    if s.readout != 1.0:
        out.mul_(s.readout)
    out = out.to(x.dtype).view(shape)
    return out + net.sink(x) if sink and s.sink else out
