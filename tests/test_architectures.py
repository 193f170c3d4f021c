"""Issue #13, architectures: every built-in family locks, its release loads without weightlock and generates,
the DLR-Net stands exactly where the feed-forward was; families registered at lock time travel with the
release; mixture-of-experts models are refused; a lock whose layers are not fitted fails its quality gate."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from dlr_helpers import MOE_FAMILIES, NEW_FAMILIES, tiny_model
from weightlock.dlr import ADAPTERS, ArchAdapter, DLRNet, LockConfig, apply_dlr, lock, register_adapter
from weightlock.dlr import modeling_weightlock_dlr as M
from weightlock.dlr.distill import capture, check_layer_errors, specs_for
from weightlock.errors import WeightlockError

# the original feed-forward contribution of each family's layer, written out from its transformers source
# (independent of the adapters): what the DLR-Net has to stand in for, input → output
FEED_FORWARD = {
    "falcon": lambda l: l.mlp,
    "stablelm": lambda l: l.mlp,
    "olmo": lambda l: l.mlp,
    "olmo2": lambda l: l.mlp,
    "gemma3": lambda l: l.mlp,
    "phi": lambda l: l.mlp,
    "gptj": lambda l: lambda x: l.mlp.fc_out(l.mlp.act(l.mlp.fc_in(x))),  # the MLP's dropout stays in place
    "opt": lambda l: lambda x: l.fc2(l.activation_fn(l.fc1(x))),  # fc1/fc2 sit on the decoder layer
    "bloom": lambda l: lambda x: l.mlp.dense_4h_to_h(l.mlp.gelu_impl(l.mlp.dense_h_to_4h(x))),  # + residual inside
}
# the parameters that make up each family's feed-forward (everything else must survive surgery bit for bit)
MLP_PARAMS = {f: r"\.mlp\." for f in ("falcon", "stablelm", "olmo", "olmo2", "gemma3", "phi", "gptj", "bloom")}
MLP_PARAMS["opt"] = r"\.fc[12]\."

GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert 'weightlock' not in sys.modules
ids = torch.tensor([[5, 6, 7]])
g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
assert g.shape == (1, 7), g.shape
assert any(type(x).__name__ == 'DLRNet' for x in m.modules())
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[2])
"""


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _run(code: str, *args, cwd) -> subprocess.CompletedProcess:
    """A fresh interpreter that does not see this checkout's test helpers (nor weightlock unless it imports it)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}, timeout=300)


def _lock_tiny(family_or_model, tmp_path, tokenizer, **cfg):
    """Save a tiny random model (vocabulary of the built-in tokenizer) and lock it with a few steps."""
    model = tiny_model(family_or_model, vocab_size=len(tokenizer)) if isinstance(family_or_model, str) \
        else family_or_model
    src, out = tmp_path / "base", tmp_path / "locked"
    model.save_pretrained(str(src))
    settings = dict(rank=2, steps=3, calib_tokens=1024, block_size=32, batch_tokens=256, progress=False,
                    max_rel_error=None) | cfg
    report = lock(src, out, LockConfig(**settings))
    return out, report


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_dlr_net_stands_exactly_where_the_feed_forward_was(family):
    """Surgery keeps every non-MLP weight bit-identical, and with each DLR-Net swapped for a module that
    computes the original feed-forward, the locked model's logits are the original's — in eval mode and in
    training mode (same dropout draws), so a lost residual, dropout or activation would show."""
    original = tiny_model(family)
    locked = copy.deepcopy(original)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    adapter, specs, _ = specs_for(locked, LockConfig(rank=2))
    apply_dlr(locked, [s.__dict__ for s in specs])
    after = locked.state_dict()
    is_mlp = re.compile(MLP_PARAMS[family]).search
    assert any(map(is_mlp, before))
    assert all(torch.equal(before[k], after[k]) for k in before if not is_mlp(k)), "non-MLP weights bit-identical"
    assert not [k for k in before if is_mlp(k) and k in after], "every MLP weight is gone"
    assert sum(p.numel() for n, p in locked.named_parameters() if ".blocks." in n or ".sink." in n) == sum(
        s.num_parameters() for s in specs)

    orig_layers, locked_layers = M.find_layers(original, adapter), M.find_layers(locked, adapter)
    for lo, ll in zip(orig_layers, locked_layers):
        assert isinstance(M.get_path(ll, adapter.mlp), DLRNet)
        M.set_path(ll, adapter.mlp, _Fn(FEED_FORWARD[family](lo)))
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, locked(input_ids=ids).logits)
        original.train(), locked.train()
        torch.manual_seed(5)
        a = original(input_ids=ids).logits
        torch.manual_seed(5)
        b = locked(input_ids=ids).logits
        original.eval()
        assert not torch.equal(a, original(input_ids=ids).logits) or family not in ("opt", "bloom", "gptj"), \
            "the training-mode check must see dropout"
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_locked_release_loads_without_weightlock_and_generates(family, tmp_path, tokenizer):
    out, report = _lock_tiny(family, tmp_path, tokenizer)
    assert report["family"] == M.ADAPTERS[tiny_model(family).config.model_type].family
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weightlock_dlr"]["adapter"]["family"] == report["family"]
    r = _run(GENERATE, out, tmp_path / "logits.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from weightlock.dlr import load

    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        ref = load(out)(input_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), ref)


def test_capture_copies_what_the_layer_changes_in_place():
    """Falcon adds the attention output into the MLP's output tensor in place (``mlp_output +=``): captured
    outputs must be copies, or a float32 capture records the sum instead of the MLP's output."""
    model = tiny_model("falcon")
    ids = torch.randint(3, 128, (2, 10))
    x, y = capture(model, ids, [1], dtype=torch.float32)[1]
    with torch.no_grad():
        assert torch.allclose(model.transformer.h[1].mlp(x), y, atol=1e-6)


def test_family_registered_at_lock_time_travels_with_the_release(tmp_path, tokenizer):
    """The README's one line for a family weightlock does not build in: the release records the adapter,
    so it loads in a fresh process without weightlock (trust_remote_code) and with weightlock.load where
    nobody registered the family."""
    import transformers as T

    assert "granite" not in ADAPTERS
    register_adapter(ArchAdapter("granite", ("granite",), layers=("model.layers",)))
    try:
        torch.manual_seed(0)
        model = T.GraniteForCausalLM(T.GraniteConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)).eval()
        out, report = _lock_tiny(model, tmp_path, tokenizer)
    finally:
        del ADAPTERS["granite"]
    assert report["family"] == "granite"
    r = _run(GENERATE, out, tmp_path / "remote.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import sys, torch, weightlock\n"
            "from weightlock.dlr import ADAPTERS, load\n"
            "assert 'granite' not in ADAPTERS\n"
            "m = load(sys.argv[1])\n"
            "ids = torch.tensor([[5, 6, 7]])\n"
            "assert m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,"
            " do_sample=False).shape == (1, 7)\n"
            "with torch.no_grad():\n"
            "    torch.save(m(input_ids=ids).logits, sys.argv[2])\n")
    r = _run(code, out, tmp_path / "wl.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "remote.pt", weights_only=True),
                       torch.load(tmp_path / "wl.pt", weights_only=True))


def test_recorded_adapter_round_trips_and_older_releases_use_the_registered_one():
    bloom = ADAPTERS["bloom"]
    assert ArchAdapter.from_dict(json.loads(json.dumps(bloom.to_dict()))) == bloom
    with pytest.raises(M.UnsupportedArchitecture, match="newer weightlock"):
        ArchAdapter.from_dict(bloom.to_dict() | {"call": "x, residual"})
    model = tiny_model("opt")
    _, specs, _ = specs_for(model, LockConfig(rank=2))
    info = {"base_class": "OPTForCausalLM", "layers": [s.__dict__ for s in specs]}  # no "adapter" key
    config = copy.deepcopy(model.config)
    setattr(config, M.DLR_CONFIG_KEY, info)
    built = M.build_locked_model(config)
    assert all(isinstance(l.fc1, DLRNet) and isinstance(l.fc2, nn.Identity) for l in built.model.decoder.layers)


def test_bloom_tensor_parallel_slow_but_exact_is_refused():
    """That mode reads dense_4h_to_h's weight directly, which the locked layer no longer has."""
    model = tiny_model("bloom", pretraining_tp=2, slow_but_exact=True)
    with pytest.raises(WeightlockError, match="bloom: DLR-Lock needs slow_but_exact=False"):
        specs_for(model, LockConfig(rank=2))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixture_of_experts_is_refused_even_with_a_registered_adapter(family):
    model = tiny_model(family)
    msg = f"{model.config.model_type}: mixture-of-experts feed-forward blocks are not supported"
    with pytest.raises(WeightlockError, match=msg):
        specs_for(model, LockConfig(rank=2))
    mt = model.config.model_type
    register_adapter(ArchAdapter(family, (mt,), layers=("model.layers",)))  # the one line would fold experts
    try:
        with pytest.raises(WeightlockError, match=msg):
            specs_for(model, LockConfig(rank=2))
    finally:
        del ADAPTERS[mt]


# ---- quality gate -------------------------------------------------------------------------------

def test_quality_gate_names_bad_layers_including_non_finite_errors():
    stats = [{"layer": 0, "rel_error": 0.01}, {"layer": 1, "rel_error": 0.93}, {"layer": 2, "rel_error": float("nan")},
             {"layer": 3, "rel_error": float("inf")}]
    with pytest.raises(WeightlockError) as e:
        check_layer_errors(stats, 0.5)
    msg = str(e.value)
    assert "layer 1 (0.93)" in msg and "layer 2 (nan)" in msg and "layer 3 (inf)" in msg and "layer 0" not in msg
    assert "--max-rel-error" in msg and "\n" not in msg
    check_layer_errors(stats[:2], 0.95)
    check_layer_errors(stats, None)
    with pytest.raises(WeightlockError, match="max_rel_error must be positive"):
        LockConfig(max_rel_error=0.0).validate()


def test_unfitted_lock_fails_without_a_release_and_passes_with_the_override(tmp_path, tokenizer):
    """One step at a tiny learning rate leaves every layer at relative error ≈ 1 (the net outputs nothing):
    the default gate (0.5) fails the lock naming the layers, no model files are written; --max-rel-error
    none accepts it."""
    from typer.testing import CliRunner

    from weightlock.cli import app

    src, out = tmp_path / "base", tmp_path / "locked"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(str(src))
    args = ["lock", "--model", str(src), "--out", str(out), "--rank", "2", "--steps", "1", "--lr", "1e-9",
            "--calib-tokens", "1024", "--batch-tokens", "256"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.split())
    assert "layer 0 (1)" in flat and "layer 1 (1)" in flat and "--max-rel-error" in flat, r.output
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    r = CliRunner().invoke(app, [*args, "--max-rel-error", "none"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists()
    assert all(l["rel_error"] > 0.5 for l in json.loads((out / "lock_report.json").read_text())["layers"])
    r = CliRunner().invoke(app, [*args[:4], str(tmp_path / "o2"), *args[5:], "--max-rel-error", "lots"])
    assert r.exit_code == 2 and "--max-rel-error expects a number or 'none'" in r.output
