"""The stacked engine: every layer's DLR-Net fitted at once equals the per-layer fits, and resumes after a kill."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from weightlock.dlr.distill import capture, fit_module, holdout_split
from weightlock.dlr.engine import StackedNets, fit_stacked
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec
from weightlock.errors import WeightlockError

SPEC = DLRSpec(32, 8, 4, activation="silu", init_scale=0.5, readout=2.0, form="gated")


def _captures(n_layers=3, tokens=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                m.weight.normal_(0, 1.0 / m.weight.shape[1] ** 0.5)
    blocks = torch.randint(0, 64, (tokens // 32, 32))
    caps = capture(model, blocks, list(range(n_layers)), dtype=torch.float32)
    return [caps[k][0] for k in range(n_layers)], [caps[k][1] for k in range(n_layers)]


def test_stacked_forward_is_every_net():
    torch.manual_seed(0)
    nets = [DLRNet(SPEC) for _ in range(3)]
    x = torch.randn(3, 10, 32)
    stacked = StackedNets(nets)
    want = torch.stack([n(x[i]) for i, n in enumerate(nets)])
    assert torch.allclose(stacked(x), want, atol=1e-5)
    back = stacked.unstack()
    assert all(torch.equal(a.blocks[1].gate.weight, b.blocks[1].gate.weight) for a, b in zip(nets, back))
    with pytest.raises(WeightlockError, match="one spec without per-block norms, biases or sink"):
        StackedNets([DLRNet(DLRSpec(32, 8, 4, sink=True))])


@pytest.mark.parametrize("form", ["gated", "plain"])
def test_hand_written_backward_is_autograd_through_the_stacked_forward(form):
    """The engine's forward + backward without a graph (loss_backward) gives autograd's losses and gradients
    in fp32; in bf16, autocast's within bf16 rounding."""
    from weightlock.dlr.distill import distill_loss

    spec = DLRSpec(32, 8, 5, activation="silu" if form == "gated" else "gelu", init_scale=0.5, readout=3.0, form=form)
    torch.manual_seed(0)
    stacked = StackedNets([DLRNet(spec) for _ in range(3)])
    x, y = torch.randn(3, 40, 32), torch.randn(3, 40, 32)
    for bf16, tol in ((False, 1e-5), (True, 5e-2)):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = stacked(x)
        ref = [distill_loss(out[i].float(), y[i], "row") for i in range(3)]
        want = torch.autograd.grad(sum(ref), list(stacked.parameters()))
        got = stacked.loss_backward(x, y, "row", bf16)
        assert torch.allclose(got, torch.stack(ref).detach(), rtol=tol)
        for w, p in zip(want, stacked.parameters()):
            assert (p.grad - w).norm() <= tol * w.norm(), (bf16, p.shape)


def test_stacked_fit_matches_the_per_layer_fits():
    """Same starts, same batches, same schedule and per-layer clipping: the stacked fit's nets equal what
    fit_module gives layer by layer (fp32)."""
    xs, ys = _captures()
    split = holdout_split(xs[0].shape[0], 0.1, 0, 32)
    make = lambda k: DLRNet(SPEC)  # noqa: E731
    kw = dict(steps=40, lr=3e-3, batch_tokens=64, loss="row", grad_clip=0.5)
    nets, stats = fit_stacked(make, [0, 1, 2], xs, ys, split=split, **kw)
    for k in range(3):
        ref, st = fit_module(lambda: DLRNet(SPEC), xs[k], ys[k], progress=False, split=split, **kw)
        assert st["restarts"] == 0
        for a, b in zip(ref.parameters(), nets[k].parameters()):
            assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)
        assert stats["layers"][k]["rel_error_tokens"] == pytest.approx(st["rel_error_tokens"], rel=1e-3)
        assert st["rel_error_tokens"] < st["rel_error_init"]


def test_layers_dealt_to_two_processes_give_the_one_process_fit():
    """processes=2: each worker fits its share of the layers; the layers' fits are independent, so the nets are
    the one-process fit's, in the layers' order."""
    xs, ys = _captures()
    split = holdout_split(xs[0].shape[0], 0.1, 0, 32)
    kw = dict(steps=12, lr=3e-3, batch_tokens=64, loss="row", grad_clip=0.5, split=split)
    one, st1 = fit_stacked(lambda k: DLRNet(SPEC), [0, 1, 2], xs, ys, **kw)
    two, st2 = fit_stacked(lambda k: DLRNet(SPEC), [0, 1, 2], xs, ys, processes=2, **kw)
    assert st2["processes"] == 2 and [r["layer"] for r in st2["layers"]] == [0, 1, 2]
    for a, b in zip(one, two):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6)
    assert [r["rel_error"] for r in st2["layers"]] == pytest.approx([r["rel_error"] for r in st1["layers"]], rel=1e-4)


_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_engine import _captures, SPEC
from weightlock.dlr.distill import holdout_split
from weightlock.dlr.engine import fit_stacked
from weightlock.dlr.modeling_weightlock_dlr import DLRNet
xs, ys = _captures()
split = holdout_split(xs[0].shape[0], 0.1, 0, 32)
nets, _ = fit_stacked(lambda k: DLRNet(SPEC), [0, 1, 2], xs, ys, steps={steps}, lr=3e-3, batch_tokens=64,
                      split=split, checkpoint={ckpt!r}, checkpoint_every=5)
torch.save([n.state_dict() for n in nets], {out!r})
"""


def test_stacked_fit_resumes_after_a_kill(tmp_path):
    """Killed mid-fit, the stacked fit resumes from its last checkpoint and ends where an uninterrupted fit ends."""
    steps = 400
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "nets.pt"
    script = _SCRIPT.format(tests=os.path.dirname(__file__), steps=steps, ckpt=str(ckpt), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 600
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists(), "killed after its first checkpoint, before the end"
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < steps
    xs, ys = _captures()
    split = holdout_split(xs[0].shape[0], 0.1, 0, 32)
    kw = dict(steps=steps, lr=3e-3, batch_tokens=64, split=split)
    resumed, st = fit_stacked(lambda k: DLRNet(SPEC), [0, 1, 2], xs, ys, checkpoint=ckpt, **kw)
    assert st["steps_run"] == steps - killed_at
    whole, _ = fit_stacked(lambda k: DLRNet(SPEC), [0, 1, 2], xs, ys, **kw)
    # a checkpoint of a fit with other settings is refused, not silently resumed
    with pytest.raises(WeightlockError, match=r"other settings \(lr differ\)"):
        fit_stacked(lambda k: DLRNet(SPEC), [0, 1, 2], xs, ys, checkpoint=ckpt, **{**kw, "lr": 1e-3})
    for a, b in zip(resumed, whole):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_bf16_fits_learn_per_layer_and_stacked():
    """Under bf16 autocast (the residual state stays fp32) both paths fit, and end near the fp32 fit."""
    xs, ys = _captures(n_layers=2)
    split = holdout_split(xs[0].shape[0], 0.1, 0, 32)
    kw = dict(steps=60, lr=3e-3, batch_tokens=64, loss="row", grad_clip=0.5, split=split)
    fp32, _ = fit_module(lambda: DLRNet(SPEC), xs[0], ys[0], progress=False, **kw)
    low, st = fit_module(lambda: DLRNet(SPEC), xs[0], ys[0], progress=False, bf16=True, **kw)
    _, stacked = fit_stacked(lambda k: DLRNet(SPEC), [0, 1], xs, ys, bf16=True, **kw)
    ref = fit_module(lambda: DLRNet(SPEC), xs[0], ys[0], progress=False, **kw)[1]["rel_error"]
    assert st["rel_error"] < 0.75 * st["rel_error_init"]  # energy-weighted, as rel_error_init
    assert st["rel_error"] == pytest.approx(ref, rel=0.1)
    assert stacked["layers"][0]["rel_error"] == pytest.approx(ref, rel=0.1) and stacked["bf16"]
    assert not all(torch.equal(a, b) for a, b in zip(fp32.parameters(), low.parameters()))  # bf16 did run


def test_add_round_is_the_torch_add_and_cast_bit_for_bit():
    """The engine's one-pass residual step (C kernel) = ``z.add_(inc); z.to(bf16)``, rounding ties to even,
    NaN and infinities kept; the torch ops when the kernel is off."""
    from weightlock.dlr import cpu_kernel

    torch.manual_seed(0)
    z = torch.randn(64, 96) * 100
    z[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0 + 2**-8])  # the last: a tie
    inc = torch.randn(64, 96).bfloat16()
    inc[0, 3] = 0
    ref = z.clone()
    ref.add_(inc)
    got = z.clone()
    out = cpu_kernel.add_round(got, inc)
    assert cpu_kernel.available()
    assert torch.equal(got.nan_to_num(), ref.nan_to_num()) and torch.isnan(got[0, 0])
    assert torch.equal(out.view(torch.int16)[1:], ref.bfloat16().view(torch.int16)[1:])
    assert torch.equal(out[0, 1:].float(), ref[0, 1:].bfloat16().float()) and torch.isnan(out[0, 0])
