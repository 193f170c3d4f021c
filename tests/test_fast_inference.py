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
    """bf16: the fast path keeps the residual state in fp32, so it is within 1e-2 of the exact (fp32)
    result of the same bf16 weights and closer to it than the bf16 reference path, which loses 1–3% to
    cancellation in z_L − z_0."""
    net = random_net(init_scale=scale, **kw).to(torch.bfloat16)
    x = torch.randn(4, 9, 48).bfloat16()
    with torch.no_grad():
        exact = net.float().forward_reference(x.float())
        net.to(torch.bfloat16)
        ref, fast = net.forward_reference(x), net.forward_fast(x)
    assert fast.dtype == torch.bfloat16
    assert rel(fast, exact) <= 1e-2
    assert rel(fast, exact) < rel(ref, exact)


def test_fast_path_is_used_only_without_autograd(monkeypatch):
    net = random_net()
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
