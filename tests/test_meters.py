"""The meters report the figures they claim: per-run peak memory, forward+backward FLOPs, checkpointing."""
import pytest
import torch

from dlr_helpers import tiny_model
from weightlock.attacks import apply_checkpointing, finetune, make_attack, run_attack
from weightlock.dlr import LockConfig, apply_dlr
from weightlock.dlr.distill import specs_for
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec
from weightlock.eval.cost import PeakMemory, analytic_train_flops

BLOCKS = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(0))


def test_peak_memory_is_the_blocks_own_not_the_process_high():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    with PeakMemory() as small:
        x = torch.ones(4 * 2**20 // 4)
        del x
    with PeakMemory() as large:
        y = torch.ones(48 * 2**20 // 4)
        del y
    assert small.delta_bytes < 24 * 2**20, "an earlier, larger allocation is not this block's peak"
    assert large.delta_bytes > 40 * 2**20
    assert large.peak_bytes > small.peak_bytes


def test_locked_full_finetune_peaks_above_the_reference(tiny_model_dir, tiny_locked_dir, tmp_path):
    # the locked model runs first: with the process's all-time high the reference would report at least as much.
    # Batch 64: the step's activations must stand above the run's other transients (data loading, evaluation:
    # ~200 MB each side), or the two peaks are the same transient (at batch 16 they were, once, in the full suite)
    r = run_attack(tiny_locked_dir, "prose", "full", reference=tiny_model_dir[0], steps=2, batch_size=64,
                   block_size=128, train_tokens=40_000, warmup_steps=1)
    locked, ref = r["target"]["cost"], r["reference_run"]["cost"]
    assert locked["saved_activation_bytes_per_step"] > 1.3 * ref["saved_activation_bytes_per_step"]
    assert locked["peak_rss_delta_bytes"] > ref["peak_rss_delta_bytes"]
    assert locked["peak_rss_bytes"] > ref["peak_rss_bytes"]
    extra = locked["saved_activation_bytes_per_step"] - ref["saved_activation_bytes_per_step"]
    assert locked["peak_rss_delta_bytes"] - ref["peak_rss_delta_bytes"] > 0.5 * extra


@pytest.mark.parametrize("locked", [False, True])
def test_flops_count_forward_and_backward(locked):
    model = tiny_model("llama")
    if locked:
        _, specs, _ = specs_for(model, LockConfig(rank=2))
        apply_dlr(model, [s.__dict__ | {"init_scale": 1.0} for s in specs])
    atk = make_attack("full", steps=1, batch_size=4, block_size=16, lr=1e-3, warmup_steps=1)
    _, trainer = finetune(model, BLOCKS, atk.cfg)
    ratio = trainer.flops_per_micro_batch / analytic_train_flops(model, 4, 16)
    assert 0.8 < ratio < 1.2, ratio


def test_end_to_end_flops_match_the_analytic_estimate(tiny_model_dir):
    r = run_attack(tiny_model_dir[0], "prose", "full", steps=2, batch_size=4, block_size=64, train_tokens=20000)
    c = r["target"]["cost"]
    assert 0.8 < c["flops_counted"] / c["flops_estimate"] < 1.2


@pytest.mark.parametrize("readout", [1.0, 16.0])
@pytest.mark.parametrize("mode", ["dlr", "group:3"])
def test_dlr_checkpointing_keeps_outputs_and_gradients(readout, mode):
    torch.manual_seed(0)
    model = tiny_model("llama")
    _, specs, _ = specs_for(model, LockConfig(rank=2))
    apply_dlr(model, [s.__dict__ | {"init_scale": 1.0, "readout": readout} for s in specs])
    x = BLOCKS[:4]

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, g0 = grads()
    apply_checkpointing(model, mode)
    nets = [m for m in model.modules() if isinstance(m, DLRNet)]
    assert nets and all(n.checkpoint_blocks > 0 for n in nets), "a flag the net's own forward reads"
    assert all("forward" not in vars(n) for n in nets), "no per-instance monkeypatched forward"
    loss1, g1 = grads()
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_checkpointed_net_saves_less_and_matches_reference():
    torch.manual_seed(0)
    net = DLRNet(DLRSpec(16, 2, 12, init_scale=1.0, readout=4.0))
    x = torch.randn(8, 16, requires_grad=True)
    ref = net(x)
    net.checkpoint_blocks = 4
    out = net(x)
    assert torch.allclose(ref, out, atol=1e-6)
    from weightlock.eval.cost import saved_bytes_of_step

    ck = saved_bytes_of_step(net, lambda: net(x))
    net.checkpoint_blocks = 0
    assert ck < saved_bytes_of_step(net, lambda: net(x)) / 2
