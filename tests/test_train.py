import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from weightlock.errors import WeightlockError
from weightlock.train.loop import LambdaHook, TrainConfig, lr_factor
from weightlock.train.pretrain import pretrain


def test_tiny_pretraining_lowers_validation_loss(tiny_model_dir):
    out, metrics = tiny_model_dir
    evals = [h["val_loss"] for h in metrics["history"] if "val_loss" in h]
    assert len(evals) >= 2
    import math

    assert metrics["history"][0]["loss"] > evals[-1] + 1.0, "validation loss far below the initial loss"
    assert math.log(4096) - metrics["val_loss"] > 1.0, "better than a uniform guess by > 1 nat"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "weightlock_run.json", "metrics.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint").exists(), "training checkpoint removed after a finished run"


def test_saved_dir_loads_with_plain_transformers_and_generates(tiny_model_dir):
    out, _ = tiny_model_dir
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t('def main(', return_tensors='pt').input_ids\n"
        "g = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "assert g.shape[1] == ids.shape[1] + 8, g.shape\n"
        "assert 'weightlock' not in sys.modules\n"
        "print(type(m).__name__, t.decode(g[0]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("LlamaForCausalLM def main(")


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_resume_after_interrupt_gives_identical_weights(tmp_path):
    cfg = tiny_config(max_steps=24, checkpoint_every=10, eval_every=8, train_tokens=60_000)
    straight = pretrain(cfg, tmp_path / "a")

    def ctrl_c(trainer, metrics):
        if trainer.step == 13:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "b", hooks=[LambdaHook(on_step_end=ctrl_c)])
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 13, "the interrupted step finished and was checkpointed"
    assert not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(WeightlockError, match="not empty"):
        pretrain(cfg, tmp_path / "b")
    resumed = pretrain(cfg, tmp_path / "b", resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights equal the uninterrupted run bit for bit"
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["tokens_seen"] == straight["tokens_seen"]


def test_same_seed_same_weights_and_overwrite(tmp_path):
    cfg = tiny_config(max_steps=5, train_tokens=20_000)
    pretrain(cfg, tmp_path / "x")
    pretrain(cfg, tmp_path / "x", overwrite=True)
    pretrain(cfg, tmp_path / "y")
    a, b = _weights(tmp_path / "x"), _weights(tmp_path / "y")
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg.train.seed = 1
    pretrain(cfg, tmp_path / "z")
    c = _weights(tmp_path / "z")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_gradient_accumulation_matches_large_batch(tmp_path, tokenizer):
    """accum=2 × batch 4 gives the same gradient as batch 8 on the same blocks."""
    from weightlock.data import load_blocks
    from weightlock.train.loop import Trainer
    from weightlock.train.pretrain import build_model

    cfg = tiny_config()
    blocks = load_blocks("builtin:code", "train", tokenizer, 64, 8 * 64 * 4)
    results = []
    for bs, acc in ((8, 1), (4, 2)):
        model = build_model(cfg, tokenizer)
        tc = TrainConfig(max_steps=1, batch_size=bs, grad_accum=acc, progress=False, warmup_steps=1, grad_clip=0)
        grads = []
        hook = LambdaHook(transform_gradients=lambda t: grads.append(  # noqa: B023  (called within this iteration)
            torch.cat([p.grad.reshape(-1) for p in t.raw_model.parameters()])))
        tr = Trainer(model, blocks, tc, hooks=[hook])
        tr._perm = torch.arange(blocks.shape[0])  # same blocks in both set-ups
        tr._perm_epoch = 0
        tr.fit(resume=False)
        results.append(grads[0])
    assert results[0].abs().max() > 0
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-7)


def test_lr_schedule_shape():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=0.01)
    with pytest.raises(WeightlockError, match="schedule"):
        TrainConfig(schedule="step").validate()


def test_config_errors(tmp_path):
    from weightlock.models.presets import ModelConfig, preset

    with pytest.raises(WeightlockError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(WeightlockError, match="not divisible"):
        ModelConfig(hidden_size=65, num_attention_heads=4).validate()
    with pytest.raises(WeightlockError, match="learning rate"):
        TrainConfig(lr=0).validate()
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightlockError, match="not a directory"):
        pretrain(tiny_config(), tmp_path / "file")
