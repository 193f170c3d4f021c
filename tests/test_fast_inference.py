"""The fast DLR inference path computes what the reference path computes, and only runs where it may."""
import pytest
import torch

from dlr_helpers import tiny_model
from triton_cases import random_net, rel
from weightlock.dlr import apply_dlr
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec
from weightlock.eval.cost import saved_bytes_of_step


@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"norm": True}, {"norm": True, "bias": True},
                                {"activation": "relu"}, {"activation": "silu", "bias": True},
                                {"activation": "tanh"}, {"readout": 16.0, "bias": True}])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5,), (2, 3, 4)])
def test_fast_path_matches_reference_fp32(kw, shape):
    net = random_net(**kw)
    x = torch.randn(*shape, 48)
    with torch.no_grad():
        ref = net.forward_reference(x)
        fast = net.forward_fast(x)
    assert fast.shape == ref.shape == x.shape
    assert rel(fast, ref) <= 1e-5
    assert ref.abs().max() > 0.1  # the comparison is not between two zeros


@pytest.mark.parametrize("kw", [{}, {"norm": True, "bias": True}, {"readout": 16.0}])
@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_fast_path_bf16_within_1e2_of_exact(kw, scale):
    """bf16: both paths keep the residual state in fp32, so each is within 1e-2 of the exact (fp32) result of
    the same bf16 weights (a bf16 state loses 1–3% to cancellation in z_L − z_0: tests/test_gated.py), and
    the two agree to within bf16 matmul rounding."""
    net = random_net(init_scale=scale, **kw).to(torch.bfloat16)
    x = torch.randn(4, 9, 48).bfloat16()
    with torch.no_grad():
        exact = net.float().forward_reference(x.float())
        net.to(torch.bfloat16)
        ref, fast = net.forward_reference(x), net.forward_fast(x)
    assert fast.dtype == torch.bfloat16
    assert rel(fast, exact) <= 1e-2 and rel(ref, exact) <= 1e-2
    assert rel(fast, ref) <= 1e-2


def test_fast_path_is_used_only_without_autograd(monkeypatch):
    net = random_net()
    net.use_cpu_kernel = False  # decode-sized inputs would take the C kernel (tested below)
    calls = []
    monkeypatch.setattr(DLRNet, "forward_fast", lambda self, x: calls.append("fast") or self.forward_reference(x))
    x = torch.randn(2, 48)
    with torch.no_grad():
        net(x)
    assert calls == ["fast"]
    y = net(x)  # grad mode with trainable parameters: reference path, differentiable
    assert calls == ["fast"] and y.requires_grad
    net.fast = False
    with torch.no_grad():
        net(x)
    assert calls == ["fast"]


def test_training_still_saves_every_block():
    """The fast path must not change the fine-tuning cost: a training step saves per-block tensors."""
    x = torch.randn(16, 48)
    saved = {}
    for depth in (6, 12):
        net = random_net(depth=depth)
        saved[depth] = saved_bytes_of_step(net, lambda: net(x))  # noqa: B023  (called within this iteration)
        ref = saved_bytes_of_step(net, lambda: net.forward_reference(x))  # noqa: B023  (called within this iteration)
        assert saved[depth] == ref
    # per block: the input z (48) and the pre-activation (8) of 16 tokens in fp32 (activation output
    # is the up-projection's input: 8 more)
    assert saved[12] - saved[6] == 6 * 16 * (48 + 8 + 8) * 4


def test_cache_follows_new_weights_and_dtype():
    net = random_net()
    x = torch.randn(3, 48)
    with torch.no_grad():
        net(x)  # fills the weight cache
        other = random_net(seed=1)
        net.load_state_dict(other.state_dict())
        assert rel(net(x), other.forward_reference(x)) <= 1e-5
        net.double()
        out = net(x.double())
        assert out.dtype == torch.float64
        assert rel(out, other.double().forward_reference(x.double())) <= 1e-10


def test_generate_with_kv_cache_is_unchanged_and_lora_keeps_reference():
    model = tiny_model("llama")
    apply_dlr(model, [DLRSpec(32, 4, 10, init_scale=1.0).__dict__] * 2)
    model.eval()
    prompt = torch.tensor([[1, 5, 9, 3]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        fast_logits = model(prompt).logits
        fast_tokens = model.generate(prompt, **kw)
        DLRNet.fast = False
        try:
            ref_logits = model(prompt).logits
            ref_tokens = model.generate(prompt, **kw)
        finally:
            DLRNet.fast = True
    assert rel(fast_logits, ref_logits) <= 1e-5
    assert torch.equal(fast_tokens, ref_tokens)

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down", "up"], init_lora_weights=False))
    net = next(m for m in peft_model.modules() if isinstance(m, DLRNet))
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert not net._fast_ok(x)  # LoRA-wrapped blocks: the reference path runs, with the adapters
        with_lora = net(x)
        with peft_model.disable_adapter():
            without = net.forward_reference(x)
    assert rel(with_lora, without) > 1e-3


def test_compiled_decode_path_matches_reference_and_falls_back(monkeypatch):
    """``compile_small``: steps of ≤ COMPILE_MAX_ROWS tokens run one torch.compile'd function (when a C++
    compiler is there); it computes what the reference computes and is used only for small steps. If
    compilation fails the eager fast path answers instead, with a warning."""
    import shutil

    from weightlock.dlr import modeling_weightlock_dlr as M

    net = random_net(norm=True, bias=True)
    net.compile_small = True
    used = []
    real = DLRNet.forward_compiled
    monkeypatch.setattr(DLRNet, "forward_compiled", lambda self, x: used.append(x.shape) or real(self, x))
    with torch.no_grad():
        if shutil.which("c++") or shutil.which("g++"):
            monkeypatch.setattr(M, "_COMPILED", [])
            x = torch.randn(1, 1, 48)
            assert rel(net(x), net.forward_reference(x)) <= 1e-5
            assert used == [x.shape]
        big = torch.randn(DLRNet.COMPILE_MAX_ROWS + 1, 48)
        net(big)
        assert len(used) <= 1  # large steps stay on the eager fast path
        used.clear()
        monkeypatch.setattr(M, "_COMPILED", [lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler"))])
        x = torch.randn(2, 48)
        with pytest.warns(UserWarning, match="no compiler"):
            out = net(x)
        assert rel(out, net.forward_reference(x)) <= 1e-5
        assert M._COMPILED == [None]  # disabled from then on


# ---- the fused CPU kernel (weightlock.dlr.cpu_kernel): the default decode path on CPU ----------------------

def _kernel():
    from weightlock.dlr import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C compiler: the CPU kernel is unavailable (its fallback is tested below)")
    return cpu_kernel


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"norm": True}, {"norm": True, "bias": True},
                                {"activation": "relu"}, {"activation": "silu", "bias": True},
                                {"activation": "tanh", "norm": True}, {"readout": 16.0, "bias": True},
                                {"form": "gated", "activation": "silu"},
                                {"form": "gated", "activation": "gelu", "bias": True, "readout": 1024.0},
                                {"form": "gated", "norm": True, "bias": True}])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (16,)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_kernel_matches_reference_fp32(kw, shape, n_threads, threads):
    """Decode-sized inputs (≤ MAX_ROWS tokens) take the kernel and compute what the reference computes, on one
    thread and split over two."""
    _kernel()
    threads(n_threads)
    net = random_net(**kw)
    x = torch.randn(*shape, 48)
    with torch.no_grad():
        assert net.inference_path(x) == "kernel"
        out, ref = net(x), net.forward_reference(x)
    assert out.shape == x.shape and rel(out, ref) <= 1e-5
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("kw", [{}, {"bias": True, "readout": 16.0}, {"activation": "silu"},
                                {"form": "gated", "activation": "silu"},
                                {"form": "gated", "bias": True, "readout": 1024.0}])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_kernel_bf16_rounds_like_the_fast_path(kw, n_threads, threads):
    """bf16: the kernel keeps the residual state in fp32 and rounds the matmul results to bf16 as the eager fast
    path does, so it stays within bf16 rounding of the fast path and of the exact fp32 result."""
    _kernel()
    threads(n_threads)
    net = random_net(init_scale=1.0, **kw).to(torch.bfloat16)
    x = torch.randn(3, 4, 48).bfloat16()
    with torch.no_grad():
        assert net.inference_path(x) == "kernel"
        out, fast = net(x), net.forward_fast(x)
        exact = random_net(init_scale=1.0, **kw).to(torch.bfloat16).float().forward_reference(x.float())
    assert out.dtype == torch.bfloat16
    assert rel(out, fast) <= 1e-2
    assert rel(out, exact) <= 1e-2


def test_cpu_kernel_only_where_it_applies():
    """Long inputs (prefill), autograd, float64, a per-block norm in bf16 and ``use_cpu_kernel = False`` keep
    their own paths."""
    kernel = _kernel()
    net = random_net(norm=True)
    small, big = torch.randn(1, 48), torch.randn(kernel.MAX_ROWS + 1, 48)
    with torch.no_grad():
        assert net.inference_path(small) == "kernel"
        assert net.inference_path(big) == "fast"
        net.use_cpu_kernel = False
        assert net.inference_path(small) == "fast"
        net.use_cpu_kernel = True
        assert net.double().inference_path(small.double()) == "fast"
        assert net.bfloat16().inference_path(small.bfloat16()) == "fast"  # norm in bf16: eager
        gated = random_net(form="gated")
        assert gated.inference_path(small) == "kernel" and gated.inference_path(big) == "fast"  # prefill: eager
    assert net.float().inference_path(small) == "reference"  # grad mode, trainable parameters


def test_cpu_kernel_follows_new_weights():
    """The kernel reads the parameters' memory through pointer tables built once; new weights (in place or
    replaced) are what it computes with."""
    _kernel()
    net = random_net(bias=True)
    x = torch.randn(2, 48)
    with torch.no_grad():
        net(x)  # builds the tables
        other = random_net(seed=1, bias=True)
        net.load_state_dict(other.state_dict())  # in place
        assert rel(net(x), other.forward_reference(x)) <= 1e-5
        net.blocks[3].up.weight = torch.nn.Parameter(torch.randn(48, 8))  # replaced
        net.__dict__.pop("_fast_weights", None)
        assert rel(net(x), net.forward_reference(x)) <= 1e-5
        net.blocks[0].down.weight.data = torch.randn(8, 48)  # the first weight replaced: tables rebuilt
        assert rel(net(x), net.forward_reference(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("form", ["plain", "gated"])
def test_cpu_kernel_generate_matches_reference(dtype, batch, n_threads, form, threads):
    """Greedy generation with the KV cache on the default path (the kernel for every decode step) gives the
    reference path's tokens; the fp32 logits agree to 1e-5."""
    _kernel()
    threads(n_threads)
    model = tiny_model("llama")
    apply_dlr(model, [DLRSpec(32, 4, 10, init_scale=1.0, readout=4.0, form=form,
                              activation="silu" if form == "gated" else "gelu").__dict__] * 2)
    model = model.eval().to(dtype)
    prompt = torch.tensor([[1, 5, 9, 3], [2, 2, 7, 8], [4, 1, 1, 6]])[:batch]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    net = next(m for m in model.modules() if isinstance(m, DLRNet))
    with torch.no_grad():
        assert net.inference_path(torch.zeros(batch, 1, 32, dtype=dtype)) == "kernel"
        logits, tokens = model(prompt).logits.float(), model.generate(prompt, **kw)
        DLRNet.fast = False
        try:
            ref_logits, ref_tokens = model(prompt).logits.float(), model.generate(prompt, **kw)
        finally:
            DLRNet.fast = True
    assert torch.equal(tokens, ref_tokens)
    assert rel(logits, ref_logits) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_cpu_kernel_without_a_compiler_falls_back_once(monkeypatch, tmp_path):
    """No C compiler: one warning saying so, then the eager fast path, with the same results."""
    from weightlock.dlr import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "_STATE", {})
    monkeypatch.setenv("WEIGHTLOCK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    net = random_net()
    x = torch.randn(1, 48)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="CPU kernel unavailable"):
            assert net.inference_path(x) == "fast"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            out = net(x)
    assert rel(out, net.forward_reference(x)) <= 1e-5
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def _packed():
    kernel = _kernel()
    if kernel._STATE["lib"].dlr_has_packed() != 3:
        pytest.skip("the packed kernel needs AVX-512 with BF16")
    return kernel


PACKED_CASES = [{}, {"bias": True}, {"activation": "relu"}, {"activation": "silu", "bias": True},
                {"activation": "tanh", "readout": 4.0}, {"form": "gated", "activation": "silu"},
                {"form": "gated", "activation": "gelu", "bias": True, "readout": 1024.0},
                {"sink": True, "readout": 4.0}, {"form": "gated", "activation": "silu", "sink": True}]


def packed_net(dtype=torch.float32, **kw):
    """A random net for the packed kernel; with a sink that is switched on (a fresh one adds nothing): its
    value, amplitude and gate random, the gate open for about half the inputs."""
    net = random_net(width=64, **kw)
    if net.spec.sink:
        with torch.no_grad():
            for p in net.sink.parameters():
                p.normal_(0, 1.0)
            net.sink.gate.bias.zero_()
    return net.to(dtype)


def with_sink(net, x, out):
    """What DLRNet.forward returns given its blocks' output ``out``: the sink's term added."""
    return out + net.sink(x) if net.spec.sink else out


@pytest.mark.parametrize("kw", PACKED_CASES)
@pytest.mark.parametrize("rows", [1, 6, 16, 17, 300])
@pytest.mark.parametrize("rank", [16, 32])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_packed_kernel_matches_reference_fp32(kw, rows, rank, n_threads, threads):
    """Width and rank multiples of 16, no per-block norm: every input size (decoding steps, shared by a team of
    threads that splits the columns; prefill, in chunks) takes the packed AVX-512 kernel, within 1e-5 of the
    reference for both block forms — row counts that fill no tile exactly, and several chunks over 2 threads,
    included. A norm or a rank that is no multiple of 16 keeps the other paths."""
    kernel = _packed()
    threads(n_threads)
    net = packed_net(rank=rank, **kw)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        assert net.inference_path(x) == "kernel" and kernel._packed_ok(net, x)
        out, ref = net(x), with_sink(net, x, net.forward_reference(x))
    assert rel(out, ref) <= 1e-5 and ref.abs().max() > 0.1
    if net.spec.sink:  # the fused sink adds what the sink module adds
        assert rel(ref, net.forward_reference(x)) > 1e-2
    with torch.no_grad():
        assert not kernel._packed_ok(random_net(width=64, rank=rank, norm=True), x)
        assert not kernel._packed_ok(random_net(width=64, rank=8), x)


@pytest.mark.parametrize("kw", PACKED_CASES)
@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_packed_kernel_bf16_rounds_like_the_fast_path(kw, rows, n_threads, threads):
    """bf16 through VDPBF16PS: the residual state in fp32, every product, activation and gate product rounded to
    bf16 where the eager fast path rounds them, so the two agree to within bf16 rounding (in practice
    bit for bit: the fp32 sums differ only in order) and both stay within bf16 rounding of the exact result."""
    _packed()
    threads(n_threads)
    net = packed_net(torch.bfloat16, rank=32, **kw)
    x = torch.randn(rows, 64).bfloat16()
    with torch.no_grad():
        assert net.inference_path(x) == "kernel"
        out, fast = net(x), with_sink(net, x, net.forward_fast(x))
        net32 = packed_net(rank=32, **kw)
        exact = with_sink(net32, x.float(), net32.forward_reference(x.float()))
    assert out.dtype == torch.bfloat16
    assert rel(out, fast) <= 2e-3
    assert rel(out, exact) <= 2e-2


@pytest.mark.parametrize("width", [48, 64, 80, 96, 112])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("form", ["plain", "gated"])
def test_cpu_packed_kernel_bf16_at_every_width(width, n_threads, form, threads):
    """The bf16 up pass packs U's columns in groups of 32 when the width allows (d % 32 == 0) and reads them two
    vectors at a time; widths with a group of 16 left over (48, 80, 112: plain order) and every thread split of
    the columns must give the eager path's result all the same (it scrambled widths 48/80/112 once)."""
    _packed()
    threads(n_threads)
    net = random_net(width=width, rank=32, form=form, activation="silu", bias=True).to(torch.bfloat16)
    for rows in (1, 8, 300):
        x = torch.randn(rows, width).bfloat16()
        with torch.no_grad():
            assert net.inference_path(x) == "kernel"
            assert rel(net(x), net.forward_fast(x)) <= 2e-3


@pytest.mark.parametrize("rank,n_threads,rows", [(16, 2, 2), (16, 2, 16), (16, 3, 9), (48, 1, 300), (48, 1, 5),
                                                 (48, 2, 7), (64, 2, 12)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_packed_kernel_bf16_activation_at_every_tile_split(rank, n_threads, rows, bias, threads):
    """The bf16 activation runs in the down pass's tiles only when one thread's one tile holds all the block's
    down columns (R = 16, 32 or 64); a team splitting R = 16 columns (one thread had all of them, the others
    applied the activation to sums nobody wrote) or R = 48 (two tiles of 32 and 16 columns, the second written
    over the first's) gave wrong outputs once."""
    _packed()
    threads(n_threads)
    net = random_net(width=64, rank=rank, activation="gelu", bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 64).bfloat16()
    with torch.no_grad():
        assert net.inference_path(x) == "kernel"
        for _ in range(2):  # the scratch is reused: stale sums from the first call must not leak into the second
            assert rel(net(x), net.forward_fast(x)) <= 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_packed_kernel_scratch_is_per_chunk_and_reused(dtype, n_threads, threads):
    """The packed kernels keep their state in a per-thread scratch of one chunk per OpenMP thread, reused by every
    call: a prefill of many chunks (each thread reusing its chunk's state) equals the same rows run one chunk at a
    time, a later call never changes an earlier call's output, and the scratch does not grow with the input."""
    kernel = _kernel()
    _packed()
    threads(n_threads)
    net = random_net(width=64, rank=16, form="gated", activation="silu", bias=True, sink=True, readout=8.0).to(dtype)
    rows = 3 * kernel.PREFILL_CHUNK + 37  # more chunks than threads, the last one short
    x = torch.randn(rows, 64).to(dtype)
    with torch.no_grad():
        whole = net(x)
        kept = whole.clone()
        parts = torch.cat([net(x[i:i + kernel.PREFILL_CHUNK]) for i in range(0, rows, kernel.PREFILL_CHUNK)])
        size = kernel._LOCAL.buf.numel()
        net(torch.randn(2 * rows, 64).to(dtype))  # a longer input needs no more scratch
        assert kernel._LOCAL.buf.numel() == size
    assert torch.equal(whole, parts)
    assert torch.equal(whole, kept)  # the output is never a view of the scratch
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(whole, net.forward_fast(x)) <= tol


def test_cpu_packed_kernel_python_threads_do_not_share_scratch():
    """Two Python threads running nets at once each get their own scratch (a shared one would mix their states)."""
    import threading

    _kernel()
    _packed()
    nets = [random_net(width=64, rank=16, seed=s).to(torch.bfloat16) for s in (0, 1)]
    xs = [torch.randn(300, 64).bfloat16() for _ in nets]
    with torch.no_grad():
        expected = [net(x) for net, x in zip(nets, xs)]
    failures = []

    def work(i):
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(nets[i](xs[i]), expected[i]):
                    failures.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_packed_kernel_follows_weights_changed_in_place(dtype):
    """The packed copy is rebuilt when a parameter changes in place (an optimizer step between two
    evaluations, as the attacks do) or is replaced, so the kernel never computes with stale weights."""
    _packed()
    net = random_net(width=64, rank=16, form="gated", activation="silu", bias=True).to(dtype)
    x = torch.randn(4, 64).to(dtype)
    with torch.no_grad():
        before = net(x)
        net.blocks[5].gate.weight.mul_(-1.5)  # one weight of one block, in place
        after, ref = net(x), net.forward_fast(x)
    assert rel(after, before) > 1e-2 and rel(after, ref) <= (1e-5 if dtype == torch.float32 else 2e-3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loss = net.forward_reference(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        stepped, ref = net(x), net.forward_fast(x)
    assert rel(stepped, after) > 1e-3 and rel(stepped, ref) <= (1e-5 if dtype == torch.float32 else 2e-3)
    net.load_state_dict(random_net(width=64, rank=16, form="gated", activation="silu", bias=True, seed=3)
                        .to(dtype).state_dict())
    with torch.no_grad():
        assert rel(net(x), net.forward_fast(x)) <= (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_from_pretrained_runs_the_packed_kernel_by_default(tmp_path, dtype):
    """A release loaded with ``from_pretrained(..., trust_remote_code=True)`` while weightlock is importable runs
    the packed C kernel (decode and prefill) with no opt-in, and its 32 greedy tokens — one prompt and a batch
    of 4 — are the reference path's, in fp32 and bf16 (a gated lock with a switched-on sink and a large read-out,
    as the faithful SmolLM2 release is; without weightlock the same release runs the eager path:
    test_dlr.py::test_trust_remote_code_load_generate_and_peft)."""
    from transformers import AutoModelForCausalLM

    from weightlock.dlr.lock import _write_release

    _packed()
    model = tiny_model("llama")
    spec = DLRSpec(32, 16, 6, activation="silu", form="gated", readout=256.0, sink=True, init_scale=1.0)
    apply_dlr(model, [spec.__dict__] * 2)
    torch.manual_seed(0)
    with torch.no_grad():
        for net in (m for m in model.modules() if isinstance(m, DLRNet)):
            for p in net.parameters():
                p.normal_(0, 0.3 / spec.readout if p.dim() == 2 and p.shape[1] == spec.rank else 0.3)
    report = {"layers": [{"rel_error": 0.0}] * 2, "family": "llama", "lock_config": {}, "parameters_before": 0,
              "parameters_after": 0, "calibration_data": "none", "ppl_before": None, "ppl_after": None,
              "ppl_ratio": None}
    _write_release(model, None, tmp_path / "rel", [spec] * 2, report)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rel"), trust_remote_code=True).eval().to(dtype)
    nets = [mod for mod in m.modules() if type(mod).__name__ == "DLRNet"]
    assert len(nets) == 2
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (1, 8), generator=g), torch.randint(3, 128, (4, 8), generator=g)]
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    cls = type(nets[0])
    with torch.no_grad():
        assert nets[0].inference_path(torch.zeros(1, 1, 32, dtype=dtype)) == "kernel"
        assert nets[0].inference_path(torch.zeros(4, 64, 32, dtype=dtype)) == "kernel"
        fast = [m.generate(p, attention_mask=torch.ones_like(p), **gen) for p in prompts]
        cls.fast = False
        try:
            ref = [m.generate(p, attention_mask=torch.ones_like(p), **gen) for p in prompts]
        finally:
            cls.fast = True
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    assert len(set(fast[1][:, 8:].flatten().tolist())) > 4  # the tokens are not one repeated token


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "dlr_inference.py"
    spec = importlib.util.spec_from_file_location("bench_dlr_inference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_deep_copies_after_running_the_cpu_kernel(dtype):
    """copy.deepcopy of a locked model after the CPU kernel ran (its nets hold ctypes pointer tables and packed
    weights) gives an equal, independent model (it used to fail: ctypes objects cannot be pickled)."""
    import copy

    _kernel()
    model = tiny_model("llama")
    apply_dlr(model, [DLRSpec(32, r, 6, init_scale=1.0, readout=4.0).__dict__ for r in (4, 16)])
    model = model.eval().to(dtype)
    prompt = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        out = model(prompt).logits  # rank 4: the portable kernel's pointer tables; rank 16: the packed copy
        twin = copy.deepcopy(model)
        assert torch.equal(twin(prompt).logits, out)
        next(p for n, p in twin.named_parameters() if "blocks.0.up" in n).zero_()
        assert torch.equal(model(prompt).logits, out) and not torch.equal(twin(prompt).logits, out)


def test_bench_meters_never_convert_the_models_they_are_given(monkeypatch):
    """The inference bench's agreement and fidelity meters run on copies in each dtype: the fp32 models they are
    given keep their fp32 weights bit for bit (a bf16 round trip used to round the lock's weights before the
    fidelity meter read its "fp32" perplexity). The fp32 greedy-agreement count is that of two exact paths."""
    import weightlock.data

    bench = _bench_module()
    model = tiny_model("llama")
    apply_dlr(model, [DLRSpec(32, 4, 6, init_scale=1.0, readout=4.0).__dict__] * 2)
    original = tiny_model("llama", seed=1)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, original)]

    def unchanged():
        for m, b in zip((model, original), before):
            assert all(p.dtype == torch.float32 for p in m.parameters())
            assert all(torch.equal(b[k], v) for k, v in m.state_dict().items())

    a = bench.path_agreement(model, torch.bfloat16)
    assert a["greedy_tokens"] == 32 and 0 <= a["short_logits_rel_diff"] < 2e-2
    unchanged()
    monkeypatch.setattr(weightlock.data, "load_tokenizer", lambda d: None)
    monkeypatch.setattr(weightlock.data, "load_blocks", lambda *a, **k: torch.randint(3, 128, (4, 16),
                                                                                      generator=torch.Generator()))
    f = bench.fidelity("unused", original, model, 64)
    unchanged()
    for data in ("builtin:prose", "builtin:code"):  # fp32 and bf16 perplexities of the same blocks, both models
        row = f[data]
        assert row["float32"]["original"] != row["bfloat16"]["original"]
        assert row["bf16_minus_fp32_ratio"] == row["bfloat16"]["ratio"] - row["float32"]["ratio"]
    g = bench.greedy_vs_fp32(model, torch.float32, prompts=8, batch=4, tokens=8)
    unchanged()
    assert g["rows_identical_to_fp32"] == {"default": 8, "reference": 8} and g["rows_default_equal_reference"] == 8
    assert g["tokens_equal_to_fp32"] == {"default": 64, "reference": 64}


def test_recorded_inference_runs_are_complete_and_their_summary_is_theirs():
    """bench/results/dlr_inference_smollm2.json (issue #36's record): its last two runs cover both block forms
    at rank 32, fp32 and bf16, batch 1 and 8, one thread, on the kernel paths (decode and prefill); the 32
    greedy tokens of every lock match the reference path's at batch 1 and 8 in both dtypes, fp32 logits within
    1e-5; each run records the CPU, its read bandwidth and the bytes and FLOPs per token of both models; and the
    summary (which the docs quote) is what the bench's own summary() computes from those runs and the bars."""
    import json
    from pathlib import Path

    bench = _bench_module()
    rec = json.loads((Path(__file__).resolve().parent.parent / "bench/results/dlr_inference_smollm2.json").read_text())
    runs = rec["runs"][-2:]
    assert len(runs) == 2
    want = {(f"r32-{form}", dt, 1, b) for form in ("plain", "gated") for dt in ("float32", "bfloat16") for b in (1, 8)}
    for run in runs:
        assert {(s["target"], s["dtype"], s["threads"], s["batch"]) for s in run["settings"]} == want
        assert run["cpu_model"] and "avx512f" in run["flags"] and run["read_bandwidth_gb_s"] > 1
        for label in ("r32-plain", "r32-gated"):
            for dt in ("fp32", "bf16"):
                a = run["agreement"][label][dt]
                assert a["decode_path"] == a["prefill_path"] == "kernel"
                assert a["greedy_identical"] and a["greedy_batch8_identical"] and a["greedy_tokens"] == 32
            assert run["agreement"][label]["fp32"]["prefill_logits_rel_diff"] <= 1e-5
            assert run["agreement"][label]["fp32"]["short_logits_rel_diff"] <= 1e-5
        for cost in run["cost_per_token"].values():  # the lock has the original's weights and FLOPs (±2%)
            assert abs(cost["locked"]["bytes"] / cost["original"]["bytes"] - 1) < 0.02
            assert abs(cost["locked"]["flops"] / cost["original"]["flops"] - 1) < 0.02
        for s in run["settings"]:
            assert s["met"] == {w: s[f"{w}_ratio"] <= bench.BARS[w] for w in ("decode", "prefill")}
    assert rec["summary"] == json.loads(json.dumps(bench.summary(rec["runs"])))


@pytest.mark.parametrize("kw,rows", [({"form": "gated", "activation": "silu", "bias": True}, 1),
                                     ({"form": "gated", "activation": "silu", "bias": True}, 40),
                                     ({"activation": "silu", "bias": True}, 40)])
def test_cpu_kernel_adds_each_block_once_at_a_large_readout(kw, rows):
    """At the faithful lock's read-out (4096) every block adds ~1/4096 of the residual stream, and the output
    s·(z_L − z_0) multiplies every rounding of z by s: the kernel must round z once per block, z + (U·h + c),
    as the reference does. Accumulating the up products onto z itself (32 roundings at z's scale) put the
    faithful SmolLM2 release's nets 1.6–4.6e-4 from the reference (the reference 0.3–0.8e-4 from exact);
    fixed, within 1e-5. (gelu and per-block norms are left out: there the kernels' erf/exp and norm differ from
    torch's at the last bit, which this setting lifts to 3–9e-5 — while the reference itself is ~1e-3 from the
    exact output here.)"""
    _kernel()
    net = random_net(width=64, rank=16, depth=48, readout=4096.0, **kw)
    with torch.no_grad():
        for blk in net.blocks:
            blk.up.weight.mul_(1 / 4096)
            if blk.up.bias is not None:
                blk.up.bias.mul_(1 / 4096)
    x = 3 * torch.randn(rows, 64)
    with torch.no_grad():
        assert net.inference_path(x) == "kernel"
        out, ref = net(x), net.forward_reference(x)
    assert rel(out, ref) <= 1e-5 and ref.abs().max() > 0.1
