"""A fused Triton kernel for DLR-Net inference on CUDA: one program carries a tile of tokens through all blocks.

    z_0 = x;  z_{l+1} = z_l + σ(n_l(z_l)·V_lᵀ + b_l)·U_lᵀ + c_l;  out = s·(z_L − z_0)

and the gated form, ``σ(n_l(z_l)·G_lᵀ + g_l) ⊙ (n_l(z_l)·V_lᵀ + b_l)`` in place of the activation (the
down pass then accumulates both products from the same z chunk).

One program per tile of ``BLOCK_T`` tokens loops over the L blocks. Per block it streams V_l (r×d) and U_l
(d×r) once, in chunks of ``BLOCK_D`` columns (d is padded to whole chunks with masks, so any d works and
no operand tile grows with d): the down pass accumulates h = n(z)·V_lᵀ (BLOCK_T × r) in fp32 registers,
the activation runs in fp32, and the up pass adds h·U_lᵀ + c to z chunk by chunk. The residual state z
is fp32 throughout; it lives in a per-tile fp32 scratch (the output buffer itself for fp32 inputs), which
the program alone reads and writes, so it stays in L1/L2 between blocks — a register-resident z of a
whole d=2048 row tile would not fit next to the dot operands. Matmul inputs are in the weights' dtype
(fp32 matmuls in IEEE precision, as torch's default; bf16/fp16 accumulate in fp32). The RMSNorm's
per-token scale is accumulated while z is written (the sum of squares of the new z), so the norm costs no
extra pass. The output is written in the input dtype.

The per-block weights are stacked once into contiguous [L, r, d] / [L, d, r] tensors per net (a copy:
the weight memory of the DLR-Nets doubles on the GPU), refreshed in place when a parameter changed in
place (checked by the tensors' version counters) and rebuilt when the parameters were replaced.

Imported lazily by :mod:`weightlock.dlr.modeling_weightlock_dlr` (only when weightlock and triton are
importable; a release loaded without weightlock uses the eager fast path). ``TRITON_INTERPRET=1`` (set
before triton is imported) runs the kernel on CPU tensors with Triton's interpreter: that is how the
tests check it without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATED_BLOCK_D = 32  # the gated form's column chunk (see launch_config)
MAX_RANK = 256  # h (BLOCK_T × r, fp32) and one V/U chunk stay in registers
NORM_EPS = 1e-6  # DLRBlock's nn.RMSNorm(eps=1e-6)
_CACHE = "_triton_stack"  # the instance attribute holding the stacked weights (dropped by DLRNet._apply)


@triton.jit
def _activation(h, ACT: tl.constexpr):
    if ACT == 0:  # gelu, erf form (torch's default)
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = h * tl.sigmoid(h)
    else:  # tanh(h) = 2σ(2h) − 1
        h = 2.0 * tl.sigmoid(2.0 * h) - 1.0
    return h


@triton.jit
def _round(a, DTYPE: tl.constexpr, WIDEN: tl.constexpr):
    """fp32 ``a`` rounded to nearest-even in DTYPE. WIDEN (the interpreter, whose fp32 → bf16 cast truncates):
    bf16 rounding done on the fp32 bits, the value kept in fp32 (exactly representable in bf16)."""
    if WIDEN:
        if DTYPE == tl.bfloat16:
            bits = a.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            a = bits.to(tl.float32, bitcast=True)
        else:
            a = a.to(DTYPE)
    else:
        a = a.to(DTYPE)
    return a


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    """acc + a·b with fp32 accumulation. WIDEN (Triton's CPU interpreter only, whose tl.dot multiplies the
    bit patterns of bf16 operands: numpy has no bf16): the operands, already rounded to the weights' dtype,
    are widened to fp32 first, which gives the exact products an MMA with fp32 accumulation sums."""
    if WIDEN:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dlr_kernel(x_ptr, out_ptr, z_ptr, v_ptr, u_ptr, b_ptr, c_ptr, w_ptr, gw_ptr, gb_ptr, T, D, R, L, readout, eps,
                ACT: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr,
                WIDEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    row_off = rows * D
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R

    # z ← x in fp32; the sum of squares feeds block 0's norm
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for ch in range(CHUNKS):
        cols = ch * BLOCK_D + offs_d
        m = row_ok[:, None] & (cols < D)[None, :]
        off = row_off[:, None] + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(z_ptr + off, x, mask=m)
        ss += tl.sum(x * x, axis=1)
    tl.debug_barrier()

    for l in range(L):
        rstd = 1.0 / tl.sqrt(ss / D + eps)
        # down pass: h = n(z)·Vᵀ, V_l read as [BLOCK_D, BLOCK_R] chunks of its transpose
        h = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        hg = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)  # the gated form's gate product (unused otherwise)
        for ch in range(CHUNKS):
            cols = ch * BLOCK_D + offs_d
            c_ok = cols < D
            m = row_ok[:, None] & c_ok[None, :]
            z = tl.load(z_ptr + row_off[:, None] + cols[None, :], mask=m, other=0.0, cache_modifier=".cg")
            if NORM:
                g = tl.load(w_ptr + l * D + cols, mask=c_ok, other=0.0).to(tl.float32)
                z = z * rstd[:, None] * g[None, :]
            vt = tl.load(v_ptr + l * R * D + offs_r[None, :] * D + cols[:, None],
                         mask=c_ok[:, None] & r_ok[None, :], other=0.0)
            zr = _round(z, vt.dtype, WIDEN)
            h = _mm(zr, vt, h, IEEE, WIDEN)
            if GATED:
                gt = tl.load(gw_ptr + l * R * D + offs_r[None, :] * D + cols[:, None],
                             mask=c_ok[:, None] & r_ok[None, :], other=0.0)
                hg = _mm(zr, gt, hg, IEEE, WIDEN)
        if BIAS:
            h += tl.load(b_ptr + l * R + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                hg += tl.load(gb_ptr + l * R + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            h = _activation(hg, ACT) * h
        else:
            h = _activation(h, ACT)
        tl.debug_barrier()
        # up pass: z += h·Uᵀ + c, U_l read as [BLOCK_R, BLOCK_D] chunks of its transpose
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        for ch in range(CHUNKS):
            cols = ch * BLOCK_D + offs_d
            c_ok = cols < D
            m = row_ok[:, None] & c_ok[None, :]
            ut = tl.load(u_ptr + l * D * R + cols[None, :] * R + offs_r[:, None],
                         mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            upd = _mm(_round(h, ut.dtype, WIDEN), ut, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), IEEE, WIDEN)
            if BIAS:
                upd += tl.load(c_ptr + l * D + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            off = row_off[:, None] + cols[None, :]
            z = tl.load(z_ptr + off, mask=m, other=0.0, cache_modifier=".cg") + upd
            tl.store(z_ptr + off, z, mask=m)
            ss += tl.sum(z * z, axis=1)
        tl.debug_barrier()

    for ch in range(CHUNKS):
        cols = ch * BLOCK_D + offs_d
        m = row_ok[:, None] & (cols < D)[None, :]
        off = row_off[:, None] + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=m, other=0.0, cache_modifier=".cg")
        y = _round(readout * (z - x), out_ptr.dtype.element_ty, WIDEN)
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


def _params(net) -> list[torch.Tensor]:
    out = []
    for b in net.blocks:
        out += [b.down.weight, b.up.weight]
        out += [t for t in (b.down.bias, b.up.bias) if t is not None]
        if net.spec.form == "gated":
            out += [t for t in (b.gate.weight, b.gate.bias) if t is not None]
        if net.spec.norm:
            out.append(b.norm.weight)
    return out


def supported(net, x: torch.Tensor) -> bool:
    """Whether :func:`forward` computes ``net(x)``: x on CUDA (or any device under ``TRITON_INTERPRET=1``,
    which only tests use), a floating dtype of :data:`DTYPES` shared by x and every weight on x's device,
    a known activation, rank ≤ :data:`MAX_RANK`, blocks that are plain ``nn.Linear`` pairs and (with
    ``norm``) ``nn.RMSNorm(eps=1e-6)`` with a weight; both block forms. Anything else keeps the eager fast
    path."""
    spec = net.spec
    if x.dtype not in DTYPES or x.numel() == 0 or spec.activation not in ACTIVATIONS or spec.rank > MAX_RANK:
        return False
    if getattr(spec, "form", "plain") not in ("plain", "gated"):
        return False
    b = net.blocks[0]
    if spec.norm and not (isinstance(b.norm, torch.nn.RMSNorm) and b.norm.eps == NORM_EPS
                          and b.norm.weight is not None):
        return False
    w = b.down.weight  # int32 offsets in the kernel: fewer registers, at most 2³¹ − 1 elements
    return w.dtype == x.dtype and w.device == x.device and x.numel() < 2 ** 31


def stacked(net) -> tuple:
    """(V [L, r, d], U [L, d, r], b [L, r] | None, c [L, d] | None, norm weight [L, d] | None, gate G [L, r, d]
    | None, gate bias [L, r] | None), contiguous, in the weights' dtype. Built once per net; refreshed in place
    (same storage, so a captured CUDA graph stays valid) when a parameter was changed in place, rebuilt when
    parameters were replaced."""
    params = None
    entry = net.__dict__.get(_CACHE)
    if entry is not None and entry[0] is net.blocks[0].down.weight:
        params, version, tensors = entry[1], entry[2], entry[3]
        now = sum(p._version for p in params)
        if now == version:
            return tensors
        _fill(net, tensors)
        net.__dict__[_CACHE] = (params[0], params, now, tensors)
        return tensors
    params = _params(net)
    b0 = net.blocks[0]
    gated = net.spec.form == "gated"
    tensors = (torch.stack([b.down.weight.detach() for b in net.blocks]),
               torch.stack([b.up.weight.detach() for b in net.blocks]),
               torch.stack([b.down.bias.detach() for b in net.blocks]) if b0.down.bias is not None else None,
               torch.stack([b.up.bias.detach() for b in net.blocks]) if b0.up.bias is not None else None,
               torch.stack([b.norm.weight.detach() for b in net.blocks]) if net.spec.norm else None,
               torch.stack([b.gate.weight.detach() for b in net.blocks]) if gated else None,
               torch.stack([b.gate.bias.detach() for b in net.blocks]) if gated and b0.gate.bias is not None
               else None)
    net.__dict__[_CACHE] = (params[0], params, sum(p._version for p in params), tensors)
    return tensors


@torch.no_grad()
def _fill(net, tensors) -> None:
    v, u, b, c, g, gv, gb = tensors
    for i, blk in enumerate(net.blocks):
        if gv is not None:
            gv[i].copy_(blk.gate.weight)
        if gb is not None:
            gb[i].copy_(blk.gate.bias)
        v[i].copy_(blk.down.weight)
        u[i].copy_(blk.up.weight)
        if b is not None:
            b[i].copy_(blk.down.bias)
        if c is not None:
            c[i].copy_(blk.up.bias)
        if g is not None:
            g[i].copy_(blk.norm.weight)


def launch_config(tokens: int, width: int, rank: int, dtype: torch.dtype, gated: bool = False
                  ) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_R, num_warps, num_stages). Tiles are ≥ 16 (tl.dot's minimum). Chosen so that
    ptxas reports no register spills for sm_90 at r ≤ 64 (checked without a GPU by compiling ahead of time,
    tests/test_triton.py); speed is not tuned yet (no GPU was available): decode steps (≤ 16 tokens) use
    one 16-token tile, longer 16-bit inputs 64-token tiles so that each streamed weight serves more tokens.
    The gated form holds two down-pass accumulators and reads two weight chunks per step: half the column
    chunk (and half the prefill tile) keeps it within the registers."""
    block_r = max(16, triton.next_power_of_2(rank))
    if dtype == torch.float32:
        return 16, (GATED_BLOCK_D if gated else 32), block_r, 4, 2
    block_d = min(64 if block_r <= 64 else 32, max(16, triton.next_power_of_2(width)))
    if gated:
        block_d = min(block_d, GATED_BLOCK_D)
    if tokens <= 16:
        return 16, block_d, block_r, 4, 2
    return (64 if block_r <= 64 else 32) // (2 if gated else 1), block_d, block_r, 8, 1


@torch.no_grad()
def forward(net, x: torch.Tensor, block_t: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """``net(x)`` through the fused kernel (the caller checks :func:`supported`); ``block_t``/``block_d``
    override the tile sizes (powers of two ≥ 16; tests use them to cover several tiles and chunks)."""
    spec = net.spec
    d, r = spec.width, spec.rank
    v, u, b, c, g, gv, gb = stacked(net)
    x2 = x.reshape(-1, d).contiguous()
    tokens = x2.shape[0]
    out = torch.empty_like(x2)
    if tokens == 0:
        return out.view(x.shape)
    z = out if x2.dtype == torch.float32 else torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
    bt, bd, br, warps, stages = launch_config(tokens, d, r, x2.dtype, gated=gv is not None)
    bt, bd = block_t or bt, block_d or bd
    grid = (triton.cdiv(tokens, bt),)
    _dlr_kernel[grid](x2, out, z, v, u, v if b is None else b, v if c is None else c, v if g is None else g,
                      v if gv is None else gv, v if gb is None else gb,
                      tokens, d, r, spec.depth, float(spec.readout), NORM_EPS,
                      ACT=ACTIVATIONS[spec.activation], NORM=g is not None, BIAS=b is not None, GATED=gv is not None,
                      IEEE=x2.dtype == torch.float32,
                      WIDEN=x2.device.type != "cuda", BLOCK_T=bt, BLOCK_D=bd, BLOCK_R=br,
                      CHUNKS=triton.cdiv(d, bd), num_warps=warps, num_stages=stages)
    return out.view(x.shape)
