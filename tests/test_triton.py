"""The CUDA inference paths of DLR-Nets: the fused Triton kernel computes what the reference path computes
(checked on CPU by Triton's interpreter, in a subprocess: see tests/triton_cases.py), CUDA-graph decoding
replays it, and the path selection never picks a CUDA path for CPU tensors. Tests that need a GPU are
skipped without one; `bench/timing.py gpu` refuses to run without one."""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from triton_cases import CASES, random_net, rel
from weightlock.dlr import modeling_weightlock_dlr as M
from weightlock.dlr.modeling_weightlock_dlr import DLRNet

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def interpreted():
    """Every case of tests/triton_cases.py, run once by Triton's CPU interpreter in a subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_cases.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(interpreted, case):
    r = interpreted[case]
    assert r["supported"] and r["dtype_ok"] and r["shape_ok"]
    assert r["ref_max"] > 0.1  # the comparison is not between two zeros
    if CASES[case][5] == "float32":
        assert r["rel"] <= 1e-6
    else:  # 16-bit weights: within 5e-3 of the exact output, and no worse than the eager fast path
        assert r["rel"] <= 5e-3
        # and no worse than the eager fast path (2% slack: with both errors set by the same bf16 rounding of the
        # products' inputs, which of the two lands nearer the exact output is chance at that level)
        assert r["rel"] <= 1.02 * r["rel_fast16"]


@needs_triton
@pytest.mark.slow
def test_kernel_weight_cache_and_dispatch(interpreted):
    r = interpreted["cache_and_dispatch"]
    assert r["in_place"] <= 1e-6 and r["same_storage"]  # refreshed in place: a captured graph stays valid
    assert r["load_state_dict"] <= 1e-6
    assert r["to_bf16_dtype"] == "torch.bfloat16"
    assert r["dispatch_calls"] == 1 and r["dispatch"] <= 1e-6


def _stand_in(device: str, rows: int, width: int):
    """Enough of a tensor for DLRNet.inference_path (no CUDA tensor can be made on a CPU-only machine)."""
    return types.SimpleNamespace(device=torch.device(device), requires_grad=False, dtype=torch.float32,
                                 numel=lambda: rows * width)


def test_cpu_never_takes_a_cuda_path_nor_imports_the_kernel(monkeypatch):
    monkeypatch.setattr(M, "_TRITON", [])
    monkeypatch.setattr(M, "_compiled_stack", lambda: None)  # no compilation here: the choice is what counts
    net = random_net(48, 8, 4)
    net.compile_small = True
    net.use_cpu_kernel = False  # the CPU C kernel is a CPU path too (tests/test_fast_inference.py); not this test's
    with torch.no_grad():
        for rows in (1, DLRNet.COMPILE_MAX_ROWS, DLRNet.COMPILE_MAX_ROWS + 1, 100):
            x = torch.randn(rows, 48)
            assert net.inference_path(x) == "fast"
            assert rel(net(x), net.forward_reference(x)) <= 1e-5
        monkeypatch.setattr(M, "_compiled_stack", lambda: object())
        assert net.inference_path(torch.randn(1, 48)) == "compiled"
        assert net.inference_path(torch.randn(100, 48)) == "fast"
    assert M._TRITON == []  # the kernel module was never even imported for CPU tensors


def test_cuda_path_selection(monkeypatch):
    supported = {"ok": True}
    monkeypatch.setattr(M, "_TRITON", [types.SimpleNamespace(supported=lambda net, x: supported["ok"])])
    monkeypatch.setattr(M, "_GRAPHS_OFF", [])
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    net = random_net(48, 8, 4)
    small, large = _stand_in("cuda", 1, 48), _stand_in("cuda", DLRNet.COMPILE_MAX_ROWS + 1, 48)
    with torch.no_grad():
        assert net.inference_path(small) == net.inference_path(large) == "triton"
        net.compile_small = True  # weightlock.load(..., compile=True)
        assert net.inference_path(small) == "graph"
        assert net.inference_path(large) == "triton"  # prefill: one kernel launch anyway
        capturing["on"] = True  # inside someone else's graph capture: no nested capture
        assert net.inference_path(small) == "triton"
        capturing["on"] = False
        monkeypatch.setattr(M, "_GRAPHS_OFF", [RuntimeError("capture failed")])
        assert net.inference_path(small) == "triton"
        net.compile_small = False
        supported["ok"] = False  # e.g. fp64, rank > MAX_RANK: the eager fast path
        assert net.inference_path(small) == "fast"
        supported["ok"] = True
        net.use_triton = False
        assert net.inference_path(small) == "fast"
        net.use_triton = True
        monkeypatch.setattr(M, "_TRITON", [None])  # a release loaded without weightlock (or without triton)
        assert net.inference_path(small) == "fast"
        assert net.inference_path(_stand_in("meta", 1, 48)) == "fast"
        net.fast = False
        assert net.inference_path(small) == "reference"
        net.fast = True
    assert net.inference_path(small) == "reference"  # grad mode with trainable parameters: training


def test_kernel_module_absent_means_fast_path(monkeypatch):
    """A release loaded without weightlock cannot import the kernel: the modeling file carries on without it."""
    monkeypatch.setattr(M, "_TRITON", [])
    monkeypatch.setitem(sys.modules, "weightlock.dlr.triton_dlr", None)  # makes the import raise ImportError
    assert M._triton_module() is None


@needs_triton
def test_supported_refuses_what_the_kernel_does_not_compute():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = """
import torch
from triton_cases import random_net
from weightlock.dlr import triton_dlr as K
net = random_net(48, 8, 2, norm=True)
x = torch.randn(3, 48)
out = [K.supported(net, x), K.supported(net, x.double()), K.supported(net.double(), x.double()),
       K.supported(net.float(), torch.randn(0, 48)), K.supported(random_net(300, 300, 1), torch.randn(2, 300))]
net.float().blocks[0].norm.eps = 1e-5
out.append(K.supported(net, x))
print(out)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT / "tests", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[True, False, False, False, False, False]"


def test_gpu_bench_refuses_without_cuda(tmp_path):
    if CUDA:
        pytest.skip("a GPU is present: bench/timing.py gpu would run")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "timing.py"), "gpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], proc.stderr


# ---- on a GPU -------------------------------------------------------------------------------------

@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("kw", [{}, {"norm": True, "bias": True, "readout": 16.0, "activation": "silu"},
                                {"form": "gated", "activation": "silu", "bias": True, "readout": 16.0}])
@pytest.mark.parametrize("tokens", [1, 37, 3000])
def test_cuda_kernel_matches_reference(dtype, tol, kw, tokens):
    """On the GPU: the kernel vs the exact (fp32) output of the same rounded weights."""
    import copy

    net = random_net(200, 24, 6, **kw).cuda().to(dtype)
    x = torch.randn(tokens, 200, device="cuda").to(dtype)
    with torch.no_grad():
        exact = copy.deepcopy(net).float().forward_reference(x.float())
        assert net.inference_path(x) == "triton"
        out = net(x)
    assert out.dtype == dtype and rel(out, exact) <= tol


@needs_cuda
def test_cuda_graph_decode_matches_eager():
    from dlr_helpers import tiny_model
    from weightlock.dlr import apply_dlr
    from weightlock.dlr.modeling_weightlock_dlr import DLRSpec

    model = tiny_model("llama")
    apply_dlr(model, [DLRSpec(32, 4, 10, init_scale=1.0, norm=True).__dict__] * 2)
    model = model.cuda().eval()
    nets = [m for m in model.modules() if isinstance(m, DLRNet)]
    prompt = torch.tensor([[1, 5, 9, 3]], device="cuda")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(prompt, **kw)
        for n in nets:
            n.compile_small = True
        assert nets[0].inference_path(torch.randn(1, 1, 32, device="cuda")) == "graph"
        graphed = model.generate(prompt, **kw)
        assert torch.equal(eager, graphed)
        assert all(len(n.__dict__.get("_cuda_graphs", {})) > 1 for n in nets)  # graphs were captured
        x = torch.randn(1, 1, 32, device="cuda")
        nets[0].blocks[3].up.weight.mul_(2.0)  # an in-place change reaches the captured graph
        assert rel(nets[0](x), nets[0].forward_reference(x)) <= 1e-5


@needs_cuda
@pytest.mark.slow
def test_load_compile_true_on_cuda_decodes_like_eager(tiny_locked_dir):
    import weightlock

    prompt = torch.tensor([[1, 5, 9, 3]], device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = weightlock.load(tiny_locked_dir, device="cuda").generate(prompt, **kw)
        model = weightlock.load(tiny_locked_dir, device="cuda", compile=True)
        assert all(m.compile_small for m in model.modules() if isinstance(m, DLRNet))
        assert torch.equal(model.generate(prompt, **kw), eager)


@needs_triton
@pytest.mark.slow
def test_kernel_compiles_for_gpus():
    """The kernel lowers to a cubin for sm_90 and sm_80 at the launch configurations it uses (no GPU needed),
    within the shared memory of an SM; spills are reported, not asserted (they depend on the triton version)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, triton_cases; print(json.dumps(triton_cases.compile_for_gpus()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT / "tests", capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 10 and sum(row["gated"] for row in rows) == 4
    for row in rows:
        assert row["cubin"], row
        assert row["shared"] <= (227 if row["cap"] == 90 else 163) * 1024, row
    print(rows)
