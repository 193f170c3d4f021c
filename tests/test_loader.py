"""One loader for every command: DLR releases load with their DLR-Nets, missing weights and changed files
are refused with an error naming them."""
import pytest
import torch
from typer.testing import CliRunner

import weightlock
from weightlock.cli import app
from weightlock.dlr.modeling_weightlock_dlr import DLRNet
from weightlock.errors import WeightlockError

runner = CliRunner()


def _greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0]


def test_generate_on_a_locked_release_uses_its_dlr_nets(tiny_locked_dir):
    from weightlock.data import load_tokenizer

    model = weightlock.load(tiny_locked_dir)
    assert any(isinstance(m, DLRNet) for m in model.modules())
    tok = load_tokenizer(tiny_locked_dir)
    ids = tok("def ", return_tensors="pt", add_special_tokens=False)["input_ids"]
    want = tok.decode(_greedy(model, ids, 16), skip_special_tokens=True)
    r = runner.invoke(app, ["generate", "--model", str(tiny_locked_dir), "--prompt", "def ", "--temperature", "0",
                            "--max-new-tokens", "16"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == want.strip()


def test_facade_load_is_the_one_loader_and_compiles(tiny_locked_dir):
    from weightlock.models.hub import load

    assert weightlock.load is load
    model = weightlock.load(tiny_locked_dir, compile=True)
    nets = [m for m in model.modules() if isinstance(m, DLRNet)]
    assert nets and all(n.compile_small for n in nets)


def test_missing_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from dlr_helpers import tiny_model

    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(str(d))
    state = load_file(str(d / "model.safetensors"))
    dropped = "model.layers.1.mlp.down_proj.weight"
    del state[dropped]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightlockError, match="weights missing.*mlp.down_proj"):
        weightlock.load(d)


def test_missing_dlr_weights_are_refused(tiny_locked_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "rel"
    shutil.copytree(tiny_locked_dir, d)
    state = load_file(str(d / "model.safetensors"))
    state = {k: v for k, v in state.items() if ".mlp.blocks.3." not in k}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightlockError, match="missing"):
        weightlock.load(d, verify=False)
    r = runner.invoke(app, ["generate", "--model", str(d), "--no-verify"])
    assert r.exit_code == 2 and "missing" in r.output


def test_manifest_hashes_are_checked(tiny_locked_dir, tmp_path):
    import shutil

    d = tmp_path / "rel"
    shutil.copytree(tiny_locked_dir, d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # one bit, inside a tensor
    f.write_bytes(bytes(data))
    with pytest.raises(WeightlockError, match="model.safetensors: SHA-256 does not match"):
        weightlock.load(d)
    r = runner.invoke(app, ["eval", "ppl", "--model", str(d), "--max-tokens", "512"])
    assert r.exit_code == 2 and "model.safetensors" in r.output and "SHA-256" in r.output
    assert weightlock.load(d, verify=False) is not None, "the opt-out loads it anyway"


def test_locked_skeleton_is_built_on_meta_and_filled_from_the_file(tiny_locked_dir, monkeypatch):
    """No parameter of a locked release is allocated or randomly initialised before its weights are read."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from weightlock.dlr import modeling_weightlock_dlr as M

    config = AutoConfig.from_pretrained(str(tiny_locked_dir))
    skeleton = M.build_locked_model(config, empty=True)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers()), "buffers (rotary frequencies) stay real"
    inits = []
    original = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: (inits.append(t.is_meta), original(t, *a, **k))[1])
    model = weightlock.load(tiny_locked_dir)
    assert inits and all(inits), "every initialisation ran on meta tensors only"
    state = load_file(str(tiny_locked_dir / "model.safetensors"))
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert all(torch.equal(params[k], v) for k, v in state.items() if k in params)
    assert model.lm_head.weight is model.model.embed_tokens.weight or "lm_head.weight" in state
