import json
import os
import subprocess
import sys

import pytest
import torch

from dlr_helpers import FAMILIES, mlp_parameter_names, tiny_model
from weightlock.dlr import DLRNet, DLRSpec, LockConfig, apply_dlr, fit_layer, match_depth, relative_error
from weightlock.dlr.distill import capture, specs_for
from weightlock.dlr.lock import _write_release, load
from weightlock.errors import WeightlockError


def test_dlr_net_shape_init_and_parameter_count():
    spec = DLRSpec(width=48, rank=6, depth=5, norm=True, bias=True)
    net = DLRNet(spec)
    assert sum(p.numel() for p in net.parameters()) == spec.num_parameters() == 5 * (2 * 48 * 6 + 48 + 6 + 48)
    x = torch.randn(3, 7, 48)
    assert net(x).shape == x.shape
    assert torch.equal(net(x), torch.zeros_like(x)), "U starts at zero: the net starts as the zero map"
    net2 = DLRNet(DLRSpec(48, 6, 5, init_scale=1.0))
    y = net2(x)
    # output is z_L - z_0: check against a manual unrolled computation
    z = x
    for b in net2.blocks:
        z = z + b.up(torch.nn.functional.gelu(b.down(z)))
    assert torch.allclose(y, z - x, atol=1e-6)
    with pytest.raises(ValueError, match="rank 64 must be between 1 and the width 48"):
        DLRNet(DLRSpec(48, 64, 2))


@pytest.mark.parametrize("d,d_ff,gated,rank", [(256, 688, True, 8), (256, 688, True, 32), (2048, 8192, True, 64),
                                               (768, 3072, False, 16), (384, 1536, False, 32)])
def test_match_depth_within_two_percent(d, d_ff, gated, rank):
    mlp = 3 * d * d_ff if gated else 2 * d * d_ff + d_ff + d
    depth = match_depth(mlp, d, rank)
    assert abs(depth * 2 * d * rank - mlp) / mlp <= 0.02


def test_match_depth_errors():
    with pytest.raises(WeightlockError, match="rank 300 must be between 1 and the model width 256"):
        match_depth(3 * 256 * 688, 256, 300)
    with pytest.raises(WeightlockError, match="cannot match"):
        match_depth(3 * 32 * 64, 32, 28)  # one block is already larger than 2% off


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_keeps_non_mlp_weights_and_release_round_trips(family, tmp_path):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlp_names = mlp_parameter_names(model)
    cfg = LockConfig(rank=2, readout=4.0)
    adapter, specs, sizes = specs_for(model, cfg)
    assert all(abs(s.num_parameters() - n) / n <= 0.02 for s, n in zip(specs, sizes))
    torch.manual_seed(1)
    apply_dlr(model, [s.__dict__ | {"init_scale": 1.0} for s in specs])
    after = model.state_dict()
    is_mlp = mlp_names.__contains__
    assert mlp_names and mlp_names <= set(before)
    kept = [k for k in before if not is_mlp(k)]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept), "non-MLP parameters bit-identical"
    assert not [k for k in before if is_mlp(k) and k in after]
    assert sum(".blocks." in k for k in after) > 0
    report = {"layers": [{"rel_error": 0.0}] * len(specs), "family": family, "lock_config": {},
              "parameters_before": 0, "parameters_after": 0, "calibration_data": "none",
              "ppl_before": None, "ppl_after": None, "ppl_ratio": None}
    _write_release(model, None, tmp_path / "rel", specs, report)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids)
        ref = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
        loaded = load(tmp_path / "rel")
        out = loaded(input_ids=ids)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.equal(ref, out)
    assert all(m.spec.readout == 4.0 for m in loaded.modules() if isinstance(m, DLRNet))
    manifest = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert "model.safetensors" in manifest["files"] and "modeling_weightlock_dlr.py" in manifest["files"]


def test_trust_remote_code_load_generate_and_peft(tmp_path):
    model = tiny_model("llama")
    _, specs, _ = specs_for(model, LockConfig(rank=4))
    apply_dlr(model, [s.__dict__ | {"init_scale": 1.0} for s in specs])
    report = {"layers": [{"rel_error": 0.0}] * 2, "family": "llama", "lock_config": {}, "parameters_before": 0,
              "parameters_after": 0, "calibration_data": "none", "ppl_before": None, "ppl_after": None,
              "ppl_ratio": None}
    _write_release(model, None, tmp_path / "rel", specs, report)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'rel')!r}, trust_remote_code=True)\n"
        "assert 'weightlock' not in sys.modules\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)\n"
        "assert g.shape == (1, 7)\n"
        "torch.save(m(input_ids=ids).logits, sys.argv[1])\n"
        "print(type(m.model.layers[0].mlp).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logits.pt")], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "DLRNet"
    # the script's forward runs in grad mode (the reference path), so this one does too: bit-identical
    ref = model(input_ids=torch.tensor([[1, 2, 3]])).logits.detach()
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), ref)

    from peft import LoraConfig, get_peft_model

    locked = load(tmp_path / "rel")
    peft_model = get_peft_model(locked, LoraConfig(r=2, target_modules=["down", "up"]))
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)
    assert n_lora > 0 and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_distillation_lowers_the_error():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    x = torch.randn(4096, 16)
    with torch.no_grad():
        y = mlp(x)
    net, stats = fit_layer(x, y, DLRSpec(16, 4, 12), LockConfig(steps=300, batch_tokens=512, progress=False))
    assert stats["rel_error_init"] == pytest.approx(1.0)
    assert stats["rel_error"] < 0.1 * stats["rel_error_init"]
    assert relative_error(net, x[:100], y[:100]) < 0.2


def test_capture_matches_the_mlp(tokenizer):
    model = tiny_model("llama")
    ids = torch.randint(0, 100, (3, 10))
    caps = capture(model, ids, [0, 1], dtype=torch.float32)
    x, y = caps[1]
    assert x.shape == (30, 32) and y.shape == (30, 32)
    with torch.no_grad():
        assert torch.allclose(model.model.layers[1].mlp(x), y, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "gpt_neox"])
def test_mlp_slice_init_copies_the_most_important_hidden_units(family):
    """Plain-MLP families: block 0 starts as the MLP's top hidden units; gated MLPs are refused."""
    from weightlock.dlr.distill import mlp_slice_init, plain_mlp_weights
    from weightlock.dlr.modeling_weightlock_dlr import adapter_for, find_layers

    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = find_layers(model, adapter)[0]
    w1, b1, w2, b2 = plain_mlp_weights(layer, adapter)
    assert w1.shape == (64, 32) and w2.shape == (32, 64)
    act = {"bert": "gelu", "gpt2": "gelu", "gpt_neox": "gelu"}[family]
    net = DLRNet(DLRSpec(32, 32, 2, activation=act, bias=True))
    mlp_slice_init((w1, b1, w2, b2))(net)
    first = net.blocks[0]
    order = (w2.norm(dim=0) * w1.norm(dim=1)).argsort(descending=True)
    assert torch.equal(first.down.weight, w1[order[:32]]) and torch.equal(first.up.weight, w2[:, order[:32]])
    assert torch.equal(first.down.bias, b1[order[:32]]) and torch.allclose(first.up.bias, b2 / 2)
    with pytest.raises(WeightlockError, match="gated MLP"):
        specs_for(tiny_model("llama"), LockConfig(rank=2, init="mlp"))
    _, specs, _ = specs_for(model, LockConfig(rank=2, init="mlp"))
    assert specs[0].bias


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_refine_moves_the_locked_model_toward_the_original(family, tmp_path):
    """End-to-end refinement trains only the DLR-Nets: KL to the logits of a causal LM, the normalised
    error of the last hidden states of an encoder; the output gap shrinks and nothing else changes."""
    from weightlock.dlr.distill import distill_model, refine

    original, locked = tiny_model(family), tiny_model(family)
    torch.manual_seed(1)
    blocks = torch.randint(5, 128, (32, 16))
    cfg = LockConfig(rank=8, depth=8, steps=2, batch_tokens=256, calib_tokens=512, block_size=16,
                     refine_steps=60, refine_lr=3e-4, progress=False,
                     max_rel_error=None)  # a rough distillation (past the quality gate) leaves a gap
    distill_model(locked, blocks, cfg, tmp_path / "work")
    key = "logits" if family == "llama" else "last_hidden_state"

    def gap() -> float:
        with torch.no_grad():
            a, b = getattr(original(input_ids=blocks), key), getattr(locked(input_ids=blocks), key)
        return ((a - b).pow(2).sum() / a.pow(2).sum()).item()

    frozen = {n: p.detach().clone() for n, p in locked.named_parameters() if ".blocks." not in n}
    before = gap()
    history = refine(locked, original, blocks, cfg)
    assert len(history) == 60 and gap() < 0.5 * before
    assert all(torch.equal(p, frozen[n]) for n, p in locked.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in locked.parameters())


def test_readout_scale_with_mlp_init_approaches_the_mlp():
    """init=mlp: with the read-out s·(z_L − z_0) and U/s, the residual state barely drifts, so a net that
    holds all d_ff hidden units starts as the MLP itself (error → 0 as s grows); the scale is not a
    parameter."""
    from weightlock.dlr.distill import mlp_slice_init

    torch.manual_seed(0)  # an MLP whose output is as large as its input (d=32, d_ff=64), as in real models
    w1, b1, w2, b2 = torch.randn(64, 32) / 32 ** 0.5, torch.randn(64), torch.randn(32, 64) / 8, torch.randn(32)
    weights = (w1, b1, w2, b2)
    x = torch.randn(512, 32)
    y = torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + b2
    assert 0.3 < (y.norm() / x.norm()).item() < 3
    errors = {}
    for s in (1.0, 16.0, 1000.0):
        net = DLRNet(DLRSpec(32, 8, 8, bias=True, readout=s))  # 8 × 8 = all 64 hidden units
        mlp_slice_init(weights)(net)
        errors[s] = relative_error(net, x, y)
        assert sum(p.numel() for p in net.parameters()) == DLRSpec(32, 8, 8, bias=True).num_parameters()
    assert errors[1000.0] < 1e-4 < errors[1.0] and errors[16.0] < 0.1 * errors[1.0]
    with pytest.raises(ValueError, match="readout"):
        DLRSpec(32, 8, 8, readout=0.0)
    with pytest.raises(WeightlockError, match="readout"):
        LockConfig(readout=-1.0).validate()


def test_row_loss_weighs_every_token_alike():
    from weightlock.dlr.distill import distill_loss

    y = torch.tensor([[1.0, 0.0], [0.0, 100.0]])
    out = torch.tensor([[0.0, 0.0], [0.0, 100.0]])  # the small row entirely wrong, the massive one right
    assert distill_loss(out, y, "energy").item() == pytest.approx(1 / 10001)
    # the floor is the median row energy, which the massive rows do not inflate (a mean floor was 3,334
    # here, so the wrong ordinary row weighed 1/3335 of what it does now, and swung with how many massive
    # rows a batch held)
    y3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 100.0]])
    out3 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 100.0]])
    assert distill_loss(out3, y3, "row").item() == pytest.approx(1 / 3 * 1 / (1 + 1))
    out4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 99.0]])  # now the massive row is off by 1
    assert distill_loss(out4, y3, "row").item() == pytest.approx(1 / 3 * 1 / (10000 + 1))
    with pytest.raises(WeightlockError, match="unknown distillation loss"):
        distill_loss(out, y, "l1")
    with pytest.raises(WeightlockError, match="distillation loss"):
        LockConfig(loss="l1")


def test_row_loss_and_clipping_fit_the_ordinary_tokens_of_an_outlier_heavy_mlp():
    """Massive activations on 1% of tokens: the energy loss spends the budget on them, the row loss fits the
    ordinary tokens (what most of the model's positions see) far better."""
    from weightlock.dlr.distill import fit_module

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) * 0.1
    w1, w2 = torch.randn(64, 16, generator=g), torch.randn(16, 64, generator=g) / 8
    y = torch.nn.functional.gelu(x @ w1.T * 10) @ w2.T
    x[::100] += 1.0  # 1% of the tokens (a sink token, say) produce a massive activation in one channel
    y = torch.nn.functional.gelu(x @ w1.T * 10) @ w2.T
    y[::100, 0] += 300
    ordinary = torch.ones(4000, dtype=torch.bool)
    ordinary[::100] = False

    def fit(loss):
        net, _ = fit_module(lambda: DLRNet(DLRSpec(16, 4, 16)), x, y, steps=200, lr=1e-2, batch_tokens=256,
                            progress=False, loss=loss, grad_clip=1.0)
        return relative_error(net, x[ordinary], y[ordinary])

    energy, row = fit("energy"), fit("row")
    assert row < 0.75 * energy, (row, energy)


class _Faulty(torch.nn.Module):
    """A DLR-Net whose training forward returns ``fault(out)`` on the given training calls (0-based), so a
    divergence happens at a known step whatever the CPU's rounding."""

    def __init__(self, faults: dict):
        super().__init__()
        self.net, self.faults, self.calls = DLRNet(DLRSpec(16, 4, 8)), faults, 0

    def forward(self, x):
        out = self.net(x)
        if torch.is_grad_enabled():
            fault = self.faults.get(self.calls)
            self.calls += 1
            if fault is not None:
                return fault(out)
        return out


def test_divergence_guard_returns_finite_weights_and_counts_restarts():
    """A non-finite or exploding batch loss sends the fit back to its last healthy snapshot with half the rate;
    it used to return NaN weights that a lock without the quality gate installed. The faults are injected at
    known steps, so the outcome does not depend on a chaotic trajectory."""
    from weightlock.dlr.distill import GUARD_FACTOR, GUARD_RESTARTS, fit_module

    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tanh(x @ torch.randn(16, 16, generator=torch.Generator().manual_seed(1))) * 3
    nan = lambda out: out * float("nan")  # noqa: E731
    boom = lambda out: out * GUARD_FACTOR * 1e3  # noqa: E731  (a loss far above GUARD_FACTOR × the best)
    net, st = fit_module(lambda: _Faulty({30: nan, 60: boom}), x, y, steps=100, lr=3e-2, batch_tokens=256,
                         progress=False, loss="row")
    assert st["restarts"] == 2 and st["stopped_at_step"] is None
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert st["rel_error"] < 0.6 * st["rel_error_init"], "training goes on after the restarts"
    # faults on every step from step 10: after GUARD_RESTARTS restarts training stops at a known step and the
    # weights are the last healthy snapshot — here the one taken at step 0, the initial weights
    torch.manual_seed(0)
    initial = _Faulty({}).state_dict()
    net, st = fit_module(lambda: _Faulty({i: nan for i in range(10, 100)}), x, y, steps=100, lr=1e-2,
                         batch_tokens=256, progress=False, loss="row")
    assert st["restarts"] == GUARD_RESTARTS + 1 and st["stopped_at_step"] == 10 + GUARD_RESTARTS
    assert all(torch.equal(v, initial[k]) for k, v in net.state_dict().items())
    # a fit that never diverges is untouched by the guard
    _, calm = fit_module(lambda: _Faulty({}), x, y, steps=40, lr=3e-2, batch_tokens=256, progress=False)
    assert calm["restarts"] == 0 and calm["stopped_at_step"] is None and calm["rel_error"] < calm["rel_error_init"]


def _sink_data(n_blocks=64, block=32, d=16, seed=0):
    """An MLP with an attention sink: position 0 of every block writes a vector of norm ~1,000–1,400 in one
    direction (its amplitude linear in the input) against ~1 for ordinary tokens, from an input whose
    direction marks it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks * block, d, generator=g)
    w1, w2 = torch.randn(32, d, generator=g) / d ** 0.5, torch.randn(d, 32, generator=g) / 32 ** 0.5
    y = torch.nn.functional.gelu(x @ w1.T) @ w2.T
    sink_dir = torch.randn(d, generator=g)
    out_dir = torch.randn(d, generator=g)
    out_dir /= out_dir.norm()
    a = torch.randn(d, generator=g)
    pos0 = torch.arange(0, n_blocks * block, block)
    x[pos0] = 3 * sink_dir + 0.3 * torch.randn(n_blocks, d, generator=g)
    y[pos0] = (1200 + 40 * (x[pos0] - 3 * sink_dir) @ a)[:, None] * out_dir
    return x, y, pos0


def test_sink_component_reproduces_the_massive_token_that_blocks_never_produce():
    """With the sink (fitted in closed form) the position-0 output is within 1% while the ordinary tokens keep
    their fit; without it the net cannot produce the 1,200-norm vector (energy error ≈ 1 at the sink)."""
    from weightlock.dlr.distill import error_stats, fit_layer, holdout_split

    x, y, pos0 = _sink_data()
    cfg = dict(steps=200, batch_tokens=256, lr=1e-2, loss="row", grad_clip=1.0, progress=False)
    hold, _ = holdout_split(x.shape[0], 0.1, 0, 32)
    sink_rows = torch.zeros(x.shape[0], dtype=torch.bool)
    sink_rows[pos0] = True
    results = {}
    for sink in (True, False):
        spec = DLRSpec(16, 4, 8, sink=sink)
        net, st = fit_layer(x, y, spec, LockConfig(**cfg, sink=sink), block=32)
        results[sink] = error_stats(net, x[hold], y[hold], sink_rows[hold])
        assert st["outliers"] == int(sink_rows[hold].sum()) and st["outlier_rel_error"] == pytest.approx(
            results[sink]["outlier_rel_error"], rel=1e-4)
    assert results[True]["outlier_rel_error"] < 0.01 < 0.9 < results[False]["outlier_rel_error"]
    assert results[True]["rel_error"] < 1e-3 and results[False]["rel_error"] > 0.5
    # the ordinary tokens are fitted as well with the sink as without (its gate is off for them)
    assert results[True]["rel_error_tokens"] < 1.2 * results[False]["rel_error_tokens"]
    assert DLRSpec(16, 4, 8, sink=True).num_parameters() == DLRSpec(16, 4, 8).num_parameters() + 3 * 16 + 2


def test_sink_nets_keep_the_mlp_parameter_count_and_round_trip(tmp_path):
    """specs_for gives sink nets the sink's parameters fewer blocks' worth, so the net still matches the MLP;
    a release with sinks loads back with the same outputs."""
    from weightlock.dlr.distill import specs_for

    model = tiny_model("llama")
    _, specs, sizes = specs_for(model, LockConfig(rank=8, sink=True))
    for s, n in zip(specs, sizes):
        assert s.sink and abs(s.num_parameters() - n) / n < 0.02
    net = DLRNet(specs[0])
    with torch.no_grad():
        net.sink.value.normal_()
        net.sink.gate.bias.fill_(0.0)
    x = torch.randn(2, 5, specs[0].width)
    assert not torch.allclose(net(x), net._forward_blocks(x)), "the sink adds its term"
    other = DLRNet(specs[0])
    other.load_state_dict(net.state_dict())
    assert torch.allclose(other(x), net(x))


def test_holdout_split_keeps_blocks_whole_and_gate_reads_token_errors():
    from weightlock.dlr.distill import check_layer_errors, gate_error, holdout_split

    hold, train = holdout_split(40 * 16, 0.1, 0, 16)
    assert len(hold) == 4 * 16 and set(hold.tolist()).isdisjoint(train.tolist())
    assert {int(i) // 16 for i in hold}.isdisjoint({int(i) // 16 for i in train}), "no block on both sides"
    assert len(set(hold.tolist()) | set(train.tolist())) == 40 * 16
    # the gate: energy error 0.0005 (the sink token dominates it) but ordinary tokens at 0.7 → refused
    sink_layer = {"layer": 11, "rel_error": 0.0005, "rel_error_tokens": 0.7, "outlier_rel_error": 0.01}
    assert gate_error(sink_layer) == 0.7
    with pytest.raises(WeightlockError, match=r"layer 11 \(0.7\)"):
        check_layer_errors([sink_layer], 0.5)
    # a wrong sink is refused even when the ordinary tokens fit
    assert gate_error({"rel_error": 0.9, "rel_error_tokens": 0.1, "outlier_rel_error": 0.95}) == pytest.approx(0.9025)
    assert gate_error({"rel_error": 0.3}) == 0.3  # stats recorded before the token-weighted error existed


def test_layers_spec_parses_ids_and_ranges_and_refuses_the_rest():
    from weightlock.dlr.distill import parse_layers, specs_for

    assert parse_layers("0,3,5-7", 30) == [0, 3, 5, 6, 7] and parse_layers(None, 30) is None
    assert parse_layers("all", 30) is None
    for bad, msg in (("x", "not a layer id"), ("5-3", "bad range"), ("1,40", "has 30 layers")):
        with pytest.raises(WeightlockError, match=msg):
            parse_layers(bad, 30)
    with pytest.raises(WeightlockError, match="not a layer id"):
        LockConfig(layers="1;2")
    _, specs, _ = specs_for(tiny_model("llama"), LockConfig(rank=8, layers="1"))
    assert specs[0] is None and specs[1] is not None
