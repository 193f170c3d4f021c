"""Cases of the fused Triton DLR kernel, run on CPU by Triton's interpreter in a subprocess.

``TRITON_INTERPRET=1`` must be set before triton is imported and would turn every later Triton kernel of
the process into interpreted Python, so ``tests/test_triton.py`` runs ``python tests/triton_cases.py``
(which sets it) and checks the JSON it prints: for every case the relative difference of the kernel's
output to the reference it is compared with. Importing this module imports neither triton nor weightlock.
"""
from __future__ import annotations

import json
import os
import sys

# name: (width, rank, depth, input shape without the width, DLRSpec options, dtype, BLOCK_T, BLOCK_D)
# BLOCK_D=16 splits every row into several column chunks (d=40, 48: the last chunk is masked); shapes cover
# a single token, token counts that are not multiples of the tile and one that fills two tiles exactly.
CASES = {
    "gelu": (48, 8, 4, (5, 7), {}, "float32", 16, 16),
    "relu": (48, 8, 4, (5, 7), {"activation": "relu"}, "float32", 16, 16),
    "silu": (48, 8, 4, (5, 7), {"activation": "silu"}, "float32", 16, 16),
    "tanh": (48, 8, 4, (5, 7), {"activation": "tanh"}, "float32", 16, 16),
    "gelu_norm_bias_readout": (48, 8, 4, (5, 7), {"norm": True, "bias": True, "readout": 4.0}, "float32", 16, 16),
    "relu_norm": (48, 8, 4, (5, 7), {"activation": "relu", "norm": True}, "float32", 16, 16),
    "silu_bias": (48, 8, 4, (5, 7), {"activation": "silu", "bias": True}, "float32", 16, 16),
    "tanh_norm_bias_readout": (48, 8, 4, (5, 7), {"activation": "tanh", "norm": True, "bias": True,
                                                   "readout": 16.0}, "float32", 16, 16),
    "one_token": (40, 5, 3, (1, 1), {"norm": True, "bias": True}, "float32", 16, 16),
    "two_full_tiles": (40, 5, 3, (32,), {}, "float32", 16, 16),
    "rank_equals_width_d24": (24, 24, 3, (3, 3), {"activation": "silu"}, "float32", 16, 16),
    "default_tiles_d100_r33": (100, 33, 2, (2, 9), {"norm": True, "readout": 2.0}, "float32", None, None),
    "bf16": (48, 8, 4, (3, 7), {}, "bfloat16", 16, 16),
    "bf16_norm_bias_readout16": (48, 8, 4, (3, 7), {"norm": True, "bias": True, "readout": 16.0}, "bfloat16",
                                 16, 16),
    "fp16_silu_bias": (48, 8, 4, (3, 7), {"activation": "silu", "bias": True}, "float16", 16, 16),
    # the gated form: U·(σ(G·z) ⊙ V·z), both products from the same z chunk
    "gated_silu": (48, 8, 4, (5, 7), {"form": "gated", "activation": "silu"}, "float32", 16, 16),
    "gated_gelu_norm_bias_readout": (48, 8, 4, (5, 7), {"form": "gated", "norm": True, "bias": True,
                                                         "readout": 4.0}, "float32", 16, 16),
    "gated_default_tiles_d100_r33": (100, 33, 2, (2, 9), {"form": "gated", "activation": "silu", "bias": True},
                                     "float32", None, None),
    "gated_bf16_bias_readout1024": (48, 8, 4, (3, 7), {"form": "gated", "activation": "silu", "bias": True,
                                                        "readout": 1024.0}, "bfloat16", 16, 16),
}


def random_net(width=48, rank=8, depth=12, seed=0, **kw):
    """A DLR-Net with random U (init_scale 1) and non-trivial biases and norm weights (also used by
    tests/test_fast_inference.py)."""
    import torch

    from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec

    torch.manual_seed(seed)
    net = DLRNet(DLRSpec(width, rank, depth, **{"init_scale": 1.0, **kw})).eval()
    with torch.no_grad():
        for b in net.blocks:  # non-trivial biases and norm weights
            for p in b.parameters():
                if p.dim() == 1:
                    p.normal_(0, 0.1).add_(1.0 if p is getattr(b.norm, "weight", None) else 0.0)
    return net


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_case(name: str) -> dict:
    """The kernel vs the fp32 reference; for 16-bit weights vs the exact (fp32) output of the same rounded
    weights, next to the error of the 16-bit reference and fast paths."""
    import torch

    from weightlock.dlr import triton_dlr as K

    width, rank, depth, shape, kw, dtype, bt, bd = CASES[name]
    dtype = getattr(torch, dtype)
    net = random_net(width, rank, depth, **kw).to(dtype)
    torch.manual_seed(1)
    x = torch.randn(*shape, width).to(dtype)
    with torch.no_grad():
        out = K.forward(net, x, block_t=bt, block_d=bd)
        res = {"dtype_ok": out.dtype == dtype, "shape_ok": out.shape == x.shape,
               "supported": K.supported(net, x)}
        if dtype != torch.float32:
            res["rel_ref16"] = rel(net.forward_reference(x), net.float().forward_reference(x.float()))
            res["rel_fast16"] = rel(net.to(dtype).forward_fast(x), net.float().forward_reference(x.float()))
            net, x = net.float(), x.float()
        ref = net.forward_reference(x)
    return {**res, "rel": rel(out, ref), "ref_max": ref.abs().max().item()}


def run_cache_and_dispatch() -> dict:
    """The stacked weights follow in-place changes (same storage), load_state_dict and a dtype change, and
    ``net(x)`` dispatches to the kernel when :meth:`DLRNet.inference_path` says ``"triton"``."""
    import torch

    from weightlock.dlr import triton_dlr as K

    net = random_net(48, 8, 4, bias=True, norm=True)
    x = torch.randn(6, 48)
    res = {}
    with torch.no_grad():
        K.forward(net, x)
        v0 = K.stacked(net)[0]
        net.blocks[2].up.weight.mul_(3.0)
        net.blocks[1].norm.weight.add_(0.5)
        res["in_place"] = rel(K.forward(net, x), net.forward_reference(x))
        res["same_storage"] = K.stacked(net)[0] is v0
        other = random_net(48, 8, 4, bias=True, norm=True)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        net.load_state_dict(other.state_dict())
        res["load_state_dict"] = rel(K.forward(net, x), other.forward_reference(x))
        net.to(torch.bfloat16)
        res["to_bf16_dtype"] = str(K.stacked(net)[0].dtype)
        net.float()
        net.inference_path = lambda t: "triton"  # what a CUDA tensor gets; the interpreter runs it on CPU
        calls = []
        real = K.forward
        K.forward = lambda n, t: calls.append(t.shape) or real(n, t)
        try:
            y = net(x)
        finally:
            K.forward = real
        res["dispatch_calls"] = len(calls)
        res["dispatch"] = rel(y, net.forward_reference(x))
    return res


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        sys.exit("triton was imported before TRITON_INTERPRET was set")
    names = sys.argv[1:] or list(CASES)
    out = {name: run_case(name) for name in names if name in CASES}
    if not sys.argv[1:] or "cache_and_dispatch" in names:
        out["cache_and_dispatch"] = run_cache_and_dispatch()
    print(json.dumps(out))


if __name__ == "__main__":
    main()


def compile_for_gpus() -> list[dict]:
    """Compile the kernel ahead of time (no GPU needed: Triton's own ptxas) for sm_90 and sm_80 at the
    launch configurations :func:`launch_config` picks, bf16 decode and prefill and fp32; what ptxas reports.
    Catches what the interpreter cannot: lowering errors, tiles that exceed shared memory, register spills."""
    import glob
    import subprocess
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from weightlock.dlr import triton_dlr as K

    ptxas = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")))
    out = []
    for cap in (90, 80):
        configs = ((torch.bfloat16, 1, False), (torch.bfloat16, 4096, False), (torch.float32, 1, False),
                   (torch.bfloat16, 1, True), (torch.bfloat16, 4096, True))
        for dtype, tokens, gated in configs:
            bt, bd, br, warps, stages = K.launch_config(tokens, 2048, 64, dtype, gated=gated)
            ty = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
            sig = {**{k: ty for k in ("x_ptr", "out_ptr", "v_ptr", "u_ptr", "b_ptr", "c_ptr", "w_ptr", "gw_ptr",
                                      "gb_ptr")},
                   "z_ptr": "*fp32", "T": "i32", "D": "i32", "R": "i32", "L": "i32", "readout": "fp32", "eps": "fp32"}
            const = dict(ACT=0, NORM=True, BIAS=True, GATED=gated, IEEE=dtype == torch.float32, WIDEN=False,
                         BLOCK_T=bt, BLOCK_D=bd, BLOCK_R=br, CHUNKS=2048 // bd)
            src = ASTSource(fn=K._dlr_kernel, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const)
            c = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                               options={"num_warps": warps, "num_stages": stages})
            row = {"cap": cap, "dtype": str(dtype), "tokens": tokens, "gated": gated, "shared": c.metadata.shared,
                   "cubin": bool(c.asm.get("cubin"))}
            if ptxas:
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                    f.write(c.asm["ptx"])
                    f.flush()
                    for exe, arch in ((e, a) for e in ptxas for a in (f"sm_{cap}a", f"sm_{cap}")):
                        rep = subprocess.run([exe, "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                                             capture_output=True, text=True)
                        rep = rep.stderr + rep.stdout
                        if "Used" in rep:
                            break
                row["ptxas"] = [line.strip() for line in rep.splitlines() if "spill" in line or "Used" in line]
            out.append(row)
    return out
