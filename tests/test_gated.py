"""The gated DLR block form, the structured start from a gated MLP's hidden units, the read-back an attacker
gets by laying the blocks side by side, and the fp32 residual state of 16-bit nets."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from weightlock.dlr.distill import (
    LockConfig,
    gated_mlp_weights,
    mlp_init,
    readback_model,
    resolve_activation,
    specs_for,
)
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec, find_layers, readback_net
from weightlock.errors import WeightlockError


def _llama(d=32, d_ff=96, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # MLPs whose output is comparable to their input, as in a trained LLM
        for layer in model.model.layers:
            for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                m.weight.normal_(0, 1.5 / m.weight.shape[1] ** 0.5)
    return model


def test_gated_block_is_the_swiglu_formula_on_every_path():
    torch.manual_seed(0)
    net = DLRNet(DLRSpec(48, 8, 4, activation="silu", bias=True, init_scale=1.0, readout=3.0, form="gated"))
    x = torch.randn(2, 5, 48)
    z = x
    for b in net.blocks:
        z = z + b.up(torch.nn.functional.silu(b.gate(z)) * b.down(z))
    want = 3.0 * (z - x)
    assert torch.allclose(net(x), want, atol=1e-5)  # autograd: the reference path
    with torch.no_grad():
        assert net.inference_path(x) in ("kernel", "fast")  # the C decode kernel where it builds
        assert torch.allclose(net(x), want, atol=1e-5)
        assert torch.allclose(net.forward_fast(x), want, atol=1e-5)  # the eager fast path
    assert net.spec.num_parameters() == sum(p.numel() for p in net.parameters())
    assert DLRSpec(48, 8, 4, form="gated").num_parameters() == 4 * 3 * 48 * 8
    with pytest.raises(ValueError, match="unknown block form 'glu'"):
        DLRSpec(48, 8, 4, form="glu")


def test_structured_start_is_the_mlp_and_its_read_back_is_exact():
    """Block k starts from the MLP's hidden units: the read-back (blocks side by side, U·s) is the MLP itself,
    and the net approaches it as the read-out s grows (the drift of the state shrinks as 1/s)."""
    model = _llama()
    cfg = LockConfig(block="gated", init="mlp", steps=0, readout=64.0, progress=False)
    adapter, specs, sizes = specs_for(model, cfg)
    assert specs[0].form == "gated" and specs[0].activation == "silu" and not specs[0].sink
    assert specs[0].num_parameters() == sizes[0]  # 3 blocks of rank 32: exactly the MLP's 3·d·d_ff
    layer = find_layers(model, adapter)[0]
    x = torch.randn(64, 32) * 3
    with torch.no_grad():
        y = layer.mlp(x)
        errors = []
        for s in (4.0, 64.0, 1024.0):
            net = DLRNet(DLRSpec(**{**specs[0].__dict__, "readout": s}))
            mlp_init(layer, adapter)(net)
            errors.append(((net(x) - y).pow(2).sum() / y.pow(2).sum()).item())
            rb = readback_net(net)
            assert rb.spec.depth == 1 and rb.spec.rank == 96
            assert torch.allclose(rb(x), y, atol=1e-5, rtol=1e-4), "the read-back is the original MLP"
    assert errors[0] > 10 * errors[1] > 100 * errors[2] and errors[2] < 1e-4  # squared error ∝ 1/s²


def test_read_back_folds_norms_and_biases():
    """A net that barely drifts (s large, U small) equals its read-back with per-block norms and biases too (to
    the drift, ~1e-3 here, and fp32 cancellation in z_L − z_0)."""
    torch.manual_seed(1)
    for form in ("plain", "gated"):
        net = DLRNet(DLRSpec(24, 4, 6, activation="gelu_tanh", norm=True, bias=True, init_scale=1.0,
                             readout=1e3, form=form))
        with torch.no_grad():
            for b in net.blocks:
                b.up.weight.mul_(1e-3)
                b.up.bias.mul_(1e-3)
                b.norm.weight.uniform_(0.5, 1.5)
            x = torch.randn(16, 24)
            want, got = net(x), readback_net(net)(x)
            assert (got - want).norm() / want.norm() < 5e-3
            net.blocks[0].norm.weight.mul_(2)  # the folded gain matters
            assert (readback_net(net)(x) - net(x)).norm() / net(x).norm() < 5e-3
            assert (got - net(x)).norm() / net(x).norm() > 0.05


def test_sixteen_bit_nets_keep_an_fp32_state():
    """At a large read-out every block adds ~1/s of the output: a bf16 state would round the increments away.
    The bf16 net (reference and fast paths) stays within bf16 matmul rounding of the fp32 net; a bf16 state
    computed naively loses far more."""
    torch.manual_seed(2)
    model = _llama(d=64, d_ff=128)
    cfg = LockConfig(block="gated", init="mlp", steps=0, readout=1024.0, rank=16, progress=False)
    adapter, specs, _ = specs_for(model, cfg)
    net = DLRNet(specs[0])
    mlp_init(find_layers(model, adapter)[0], adapter)(net)
    x = torch.randn(32, 64) * 4
    with torch.no_grad():
        ref = net(x)
        low = net.to(torch.bfloat16)
        xb = x.bfloat16()
        naive = xb
        for b in low.blocks:
            naive = b(naive)  # the state rounded to bf16 after every block
        naive = 1024.0 * (naive - xb)
    err = lambda t: ((t.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    with torch.no_grad():
        fast = low(xb)
    low.requires_grad_(True)
    reference = low(xb)
    assert err(fast) < 0.02 and err(reference) < 0.02
    assert err(naive) > 5 * max(err(fast), err(reference))


def test_structured_start_errors_are_one_clear_line():
    model = _llama()
    with pytest.raises(WeightlockError, match="gated MLP, so it needs --block gated"):
        specs_for(model, LockConfig(init="mlp", steps=0))
    with pytest.raises(WeightlockError, match=r"needs the MLP's own activation \(silu\), got --activation gelu"):
        resolve_activation(model, LockConfig(block="gated", init="mlp", activation="gelu"))
    with pytest.raises(WeightlockError, match="steps"):
        LockConfig(steps=0)  # only the structured start may skip distillation
    with pytest.raises(WeightlockError, match="the rank must divide 96"):  # 96 hidden units, 20 a block: not the MLP
        specs_for(model, LockConfig(block="gated", init="mlp", steps=0, rank=20, depth=5))
    assert resolve_activation(model, LockConfig()) == "gelu"
    adapter = specs_for(model, LockConfig(block="gated", init="mlp", steps=0))[0]
    w = gated_mlp_weights(find_layers(model, adapter)[0], adapter)
    assert [t.shape for t in w[::2]] == [(96, 32), (96, 32), (32, 96)]


def test_gated_structured_lock_records_its_read_back(tiny_model_dir, tmp_path):
    """``weightlock lock --block gated --init mlp --steps 0``: the release is faithful at a large read-out, and
    its report and manifest record the read-back's fidelity (here: the original, exactly)."""
    from typer.testing import CliRunner

    from weightlock import load
    from weightlock.cli import app

    model, _ = tiny_model_dir
    out = tmp_path / "gated"
    r = CliRunner().invoke(app, ["lock", "--model", str(model), "--out", str(out), "--rank", "8", "--block",
                                 "gated", "--init", "mlp", "--readout", "4096", "--steps", "0", "--calib-tokens",
                                 "4096", "--eval-tokens", "1024", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "lock_report.json").read_text())
    assert rep["parameters_after"] == rep["parameters_before"]
    # the record says what the release holds: no sink with --init mlp (it recorded the --sink default, True)
    assert rep["lock_config"]["sink"] is False and not any(l["spec"]["sink"] for l in rep["layers"])
    assert abs(rep["ppl_ratio"] - 1) < 2e-3
    rb = rep["readback"]
    assert abs(rb["ppl_ratio"] - 1) < 1e-4, "the untrained structured start reads back as the original"
    assert len(rb["layer_rel_error_tokens"]) == len(rep["layers"]) and max(rb["layer_rel_error_tokens"]) < 1e-4
    assert set(rb["by_data"]) == {"builtin:prose", "builtin:code"}
    for row in rb["by_data"].values():
        # the tiny model's next-token distributions are flat: a few near-ties flip under any rounding
        assert row["lock"]["top1_agreement"] > 0.95 and row["readback"]["top1_agreement"] > 0.95
        assert row["readback"]["kl"] < 1e-3 and abs(row["readback"]["ppl_ratio"] - 1) < 1e-4  # bf16 teacher log-probs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fidelity"]["readback_ppl_ratio"] == rb["ppl_ratio"]
    assert manifest["fidelity"]["by_data"] == rb["by_data"]
    assert "read-back" in r.output
    # the release loads with its gated nets; its read-back model is the original's function
    locked, orig = load(out), load(model)
    x = torch.randint(0, 100, (1, 32))
    with torch.no_grad():
        a = readback_model(locked)(input_ids=x).logits
        b = orig(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_recorded_smollm2_lock_is_faithful_and_records_its_read_back():
    """The recorded SmolLM2-135M lock (bench/results/real_lock_smollm2.json, made by ``weightlock lock`` on this
    kind of machine): every one of the 30 MLPs replaced by DLR blocks of equal parameter count, in under 30
    minutes, at perplexity ratio ≤ 1.02 and top-1 ≥ 0.95 on prose and code — and its read-back recorded
    beside it (here: the original model, ppl ratio 1.000: this release is readable)."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent.parent / "bench/results/real_lock_smollm2.json").read_text())
    rep = rec["lock_report"]
    assert rep["locked_layers"] == list(range(30)) and len(rep["dlr_parameters"]) == 30
    assert rep["dlr_parameters"] == rep["mlp_parameters"] and rep["parameters_after"] == rep["parameters_before"]
    assert rec["wall_seconds"] < 30 * 60 and "weightlock lock" in rec["command"]
    data = rep["readback"]["by_data"]
    assert set(data) == {"builtin:prose", "builtin:code"}
    for row in data.values():
        assert row["lock"]["ppl_ratio"] <= 1.02 and row["lock"]["top1_agreement"] >= 0.95
        assert abs(row["readback"]["ppl_ratio"] - 1) < 1e-3  # the read-back is the original: readable
    assert rec["manifest_fidelity"]["readback_ppl_ratio"] == rep["readback"]["ppl_ratio"]


def test_anneal_keeps_the_read_back_and_the_penalty_pushes_it_away():
    """``rescaled`` halves the read-out with U doubled (the read-back is unchanged); an annealed fit reports one
    stage per read-out down to ``anneal_to`` (``on_stage`` after each) and ends at that read-out; with the
    read-back penalty the read-back ends farther from the MLP than without it."""
    from weightlock.dlr.distill import anneal_readouts, capture, fit_layer, rescaled
    from weightlock.dlr.modeling_weightlock_dlr import readback_weights

    assert anneal_readouts(64.0, 8.0) == [64.0, 32.0, 16.0, 8.0] and anneal_readouts(64.0, 48.0) == [64.0, 48.0]
    assert anneal_readouts(64.0, None) == [64.0]
    model = _llama(d=32, d_ff=64, layers=1)
    adapter = specs_for(model, LockConfig(block="gated", init="mlp", steps=0, rank=8))[0]
    layer = find_layers(model, adapter)[0]
    net = DLRNet(specs_for(model, LockConfig(block="gated", init="mlp", steps=0, rank=8, readout=64.0))[1][0])
    mlp_init(layer, adapter)(net)
    half = rescaled(net, 32.0)
    assert half.spec.readout == 32.0
    for a, b in zip(readback_weights(net).values(), readback_weights(half).values()):
        assert a is None or torch.allclose(a, b)
    x, y = capture(model, torch.randint(0, 64, (32, 32)), [0], dtype=torch.float32)[0]
    results = {}
    for penalty in (0.0, 1.0):
        cfg = LockConfig(block="gated", init="mlp", rank=8, readout=16.0, anneal_to=4.0, steps=30, lr=1e-2,
                         readback_penalty=penalty, progress=False, max_rel_error=None)
        spec = specs_for(model, cfg)[1][0]
        seen = []
        out, stats = fit_layer(x, y, spec, cfg, init=mlp_init(layer, adapter), block=32,
                               on_stage=lambda n, st, seen=seen: seen.append(st["readout"]))
        assert seen == [16.0, 8.0, 4.0] and [s["readout"] for s in stats["stages"]] == seen
        assert out.spec.readout == 4.0 == spec.readout
        results[penalty] = stats["readback"]["rel_error_tokens"]
    assert results[1.0] > 3 * results[0.0]


def test_gated_gate_map_is_seen_by_the_fast_path_check_and_by_lora():
    """A hook or an adapter on the gate map keeps the reference path (as for down and up), and LoRA's ``dlr``
    targets include the gate of gated blocks."""
    from weightlock.attacks.lora import dlr_targets

    net = DLRNet(DLRSpec(16, 4, 2, activation="silu", form="gated"))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert net.inference_path(x) in ("kernel", "fast")  # the C decode kernel where it builds
        handle = net.blocks[0].gate.register_forward_hook(lambda m, i, o: None)  # the first block is checked
        assert net.inference_path(x) == "reference"
        handle.remove()
    wrapper = torch.nn.Module()
    wrapper.net = net
    assert dlr_targets(wrapper) == ["down", "up", "gate"]
    wrapper.net = DLRNet(DLRSpec(16, 4, 2))
    assert dlr_targets(wrapper) == ["down", "up"]
