import json
import os
import signal
import subprocess
import sys

import torch
from typer.testing import CliRunner

from weightlock.cli import app

runner = CliRunner()
FAST = ["--rank", "8", "--steps", "150", "--calib-tokens", "8192", "--batch-tokens", "512"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "weightlock.cli", *args], capture_output=True, text=True, **kw)


def test_lock_cli_end_to_end(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    out = tmp_path / "locked"
    r = runner.invoke(app, ["lock", "--model", str(model), "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "lock_report.json").read_text())
    assert abs(rep["parameters_after"] - rep["parameters_before"]) / rep["parameters_before"] < 0.02
    assert all(l["rel_error"] < 0.5 * l["rel_error_init"] for l in rep["layers"])
    assert rep["ppl_ratio"] < 1.5
    manifest = json.loads((out / "manifest.json").read_text())
    from weightlock.io import sha256_file

    assert manifest["files"] and all(sha256_file(out / f) == h for f, h in manifest["files"].items())
    assert not (out / ".weightlock-work").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weightlock_dlr"]["layers"][0]["depth"] == 33 and cfg["auto_map"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|endoftext|>"
    r = runner.invoke(app, ["eval", "ppl", "--model", str(out), "--data", "builtin:code", "--split", "validation",
                            "--max-tokens", "2048", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["perplexity"] < 4096


def test_lock_with_the_stacked_engine(tiny_model_dir, tmp_path):
    """--engine stacked: every layer's net fitted together (fit_stacked, bf16 products), each layer's stats and
    read-back recorded as the per-layer path records them; settings it cannot fit are refused before any work."""
    model, _ = tiny_model_dir
    out = tmp_path / "locked"
    r = runner.invoke(app, ["lock", "--model", str(model), "--out", str(out), *FAST, "--engine", "stacked",
                            "--engine-processes", "1", "--no-sink", "--bf16"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "lock_report.json").read_text())
    assert [l["layer"] for l in rep["layers"]] == [0, 1]
    assert all(l["engine"]["layers"] == 2 and l["engine"]["bf16"] and l["engine"]["steps_run"] == 150
               for l in rep["layers"])
    assert all(l["rel_error"] < 0.5 * l["rel_error_init"] and l["readback"]["rel_error"] > 0 for l in rep["layers"])
    assert rep["ppl_ratio"] < 1.5 and rep["lock_config"]["engine"] == "stacked"
    r = runner.invoke(app, ["lock", "--model", str(model), "--out", str(tmp_path / "x"), *FAST, "--engine", "stacked"])
    assert r.exit_code != 0 and "cannot with a sink (add --no-sink)" in r.output
    assert not (tmp_path / "x").exists()


def test_lock_errors_leave_nothing(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    out = tmp_path / "o"
    cases = [
        (["--model", str(tmp_path / "missing")], "model directory not found"),
        (["--model", str(model), "--rank", "65"], "rank 65 must be between 1 and the model width 64"),
        (["--model", str(model), "--rank", "60"], "cannot match"),
    ]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (corrupt / f).write_bytes((model / f).read_bytes())
    (corrupt / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    cases.append((["--model", str(corrupt)], "cannot load the model"))
    nomlp = tmp_path / "nomlp"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=0, num_attention_heads=4,
                                 vocab_size=4096)).save_pretrained(str(nomlp))
    cases.append((["--model", str(nomlp)], "no transformer layers"))
    for args, msg in cases:
        r = runner.invoke(app, ["lock", "--out", str(out), *args])
        assert r.exit_code == 2, r.output
        assert msg in r.output, (msg, r.output)
        assert not out.exists(), "nothing written for a refused lock"


KILL_AFTER_LAYER_0 = """
import os, signal, sys
import weightlock.dlr.distill as D
_write = D.write_json
def write_json(path, obj):
    _write(path, obj)
    if path.name == "layer_0.json":  # layer 0 is saved: die the hard way, as an OOM kill would
        os.kill(os.getpid(), signal.SIGKILL)
D.write_json = write_json
from weightlock.cli import app
sys.argv = ["weightlock", *sys.argv[1:]]
app()
"""


def _lock_killed_after_layer_0(model, out, steps: int) -> list[str]:
    """Start ``weightlock lock`` (rank 8, ``steps``) and SIGKILL it once layer 0 is saved; returns its args."""
    args = ["lock", "--model", str(model), "--out", str(out), "--rank", "8", "--steps", str(steps),
            "--calib-tokens", "8192", "--batch-tokens", "256"]
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_LAYER_0, *args], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    return args


def test_lock_resumes_after_kill(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    out = tmp_path / "locked"
    args = _lock_killed_after_layer_0(model, out, 80)
    first = out / ".weightlock-work" / "layer_0.json"
    assert first.exists(), "layer 0 finished before the kill"
    assert not (out / "model.safetensors").exists() and not (out / ".weightlock-work" / "layer_1.json").exists()
    killed_stats = json.loads(first.read_text())
    # other settings: the work is not silently reused, and nothing is lost
    r = _cli(*[a if a != "80" else "60" for a in args])
    assert r.returncode == 2 and "other settings (steps differ)" in r.stderr and "--restart" in r.stderr, r.stderr
    assert first.exists()
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "lock_report.json").read_text())
    assert [l["layer"] for l in rep["layers"]] == [0, 1]
    assert rep["layers"][0] == killed_stats, "layer 0 was reused, not fitted again"
    assert rep["layers"][0]["steps"] == 80
    assert not first.exists()  # work dir cleaned up after the release was written


def test_lock_restart_discards_other_settings(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    out = tmp_path / "locked"
    args = _lock_killed_after_layer_0(model, out, 40)
    other = [*args[:-6], "--rank", "4", "--steps", "100", "--calib-tokens", "8192", "--batch-tokens", "256"]
    r = _cli(*other)
    assert r.returncode == 2 and "rank" in r.stderr
    r = _cli(*other, "--restart")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "lock_report.json").read_text())
    assert rep["lock_config"]["rank"] == 4 and all(l["spec"]["rank"] == 4 for l in rep["layers"])


def test_lock_refuses_an_output_that_is_or_contains_the_model(tiny_model_dir, tmp_path):
    import shutil

    src, _ = tiny_model_dir
    model = tmp_path / "models" / "base"
    shutil.copytree(src, model)
    before = sorted(p.name for p in model.iterdir())
    for out, msg in [(model, "is or contains the input"), (model.parent, "is or contains the input"),
                     (model / "locked", "lies inside the input")]:
        r = runner.invoke(app, ["lock", "--model", str(model), "--out", str(out), "--overwrite", *FAST])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert sorted(p.name for p in model.iterdir()) == before, "the source model is untouched"


def test_lock_unwritable_output_is_one_line_before_any_work(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = _cli("lock", "--model", str(model), "--out", str(blocker / "out"), *FAST)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "is not a directory" in r.stderr
    r = _cli("lock", "--model", str(model), "--out", "/proc/weightlock-out", *FAST)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot" in r.stderr, r.stderr[-2000:]


def test_lock_two_process_gloo(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "weightlock.cli", "lock", "--model", str(model), "--out", str(out), *FAST],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "lock_report.json").read_text())
    assert [(l["layer"], l["process"]) for l in rep["layers"]] == [(0, 0), (1, 1)]
    assert rep["ppl_ratio"] < 1.5
    # the same layers fitted in one process give the same weights (layers are independent and seeded)
    single = tmp_path / "single"
    assert runner.invoke(app, ["lock", "--model", str(model), "--out", str(single), *FAST]).exit_code == 0
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


INTERRUPT_AT_REFINE_STEP_3 = """
import os, signal, sys
import weightlock.train.loop as L
_step = L.Trainer.train_step
def train_step(self):
    m = _step(self)
    if self.step == 3:  # a Ctrl-C during refinement step 3, as a user would press it
        os.kill(os.getpid(), signal.SIGINT)
    return m
L.Trainer.train_step = train_step
from weightlock.cli import app
sys.argv = ["weightlock", *sys.argv[1:]]
app()
"""


def test_partial_lock_refinement_ctrl_c_resumes_to_the_identical_release(tiny_model_dir, tmp_path):
    """A partial lock (--layers 1) with end-to-end refinement: the first line comes at once and says what is
    happening; a Ctrl-C in refinement keeps a checkpoint and names the command that continues; that command
    finishes with exactly the weights of an uninterrupted run. The release records which layers are locked,
    loads with weightlock.load and trust_remote_code, and generates."""
    model, _ = tiny_model_dir
    common = ["--model", str(model), "--rank", "8", "--steps", "40", "--calib-tokens", "8192", "--batch-tokens",
              "256", "--layers", "1", "--refine-steps", "6", "--refine-batch", "4"]
    whole = tmp_path / "whole"
    r = _cli("lock", "--out", str(whole), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.splitlines()[0] == f"weightlock lock: loading {model}", r.stderr[:500]
    out = tmp_path / "interrupted"
    args = ["lock", "--out", str(out), *common]
    p = subprocess.run([sys.executable, "-c", INTERRUPT_AT_REFINE_STEP_3, *args], capture_output=True, text=True)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "interrupted: the captured activations, every finished layer and the refinement checkpoint are kept" \
        in p.stderr and "continue with: weightlock lock --out" in p.stderr, p.stderr[-1500:]
    assert not (out / "model.safetensors").exists()
    ckpt = [d for d in (out / ".weightlock-work").iterdir() if d.name.startswith("refine-")]
    assert len(ckpt) == 1 and json.loads((ckpt[0] / "trainer_state.json").read_text())["step"] == 3
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed = uninterrupted, bit for bit"
    rep = json.loads((out / "lock_report.json").read_text())
    assert rep["locked_layers"] == [1] and [l["layer"] for l in rep["layers"]] == [1]
    fid = rep["refine"]["fidelity"]
    assert [m["step"] for m in fid] == [0, 6] and fid[-1]["kl"] < fid[0]["kl"]
    cfg = json.loads((out / "config.json").read_text())["weightlock_dlr"]
    assert cfg["layers"][0] is None and cfg["layers"][1]["sink"] is True
    from transformers import AutoModelForCausalLM

    from weightlock import load

    for m in (load(out), AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)):
        kinds = [type(layer.mlp).__name__ for layer in m.model.layers]  # remote code: the release's own class
        assert kinds == ["LlamaMLP", "DLRNet"] and m.model.layers[1].mlp.spec.sink
        ids = torch.tensor([[1, 2, 3]])
        g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert g.shape == (1, 7)


def test_auto_layers_choose_the_most_that_keep_the_perplexity_budget(tiny_model_dir, tmp_path):
    """--layers auto: every fitted layer is measured in the original's model; the largest set (best held-out
    error first) within the ratio is locked; a budget nothing meets is one clear error."""
    import pytest

    from weightlock.dlr import LockConfig, lock
    from weightlock.errors import WeightlockError

    model, _ = tiny_model_dir
    kw = dict(rank=8, steps=40, calib_tokens=8192, batch_tokens=256, progress=False, layers="auto")
    rep = lock(model, tmp_path / "all", LockConfig(**kw, max_ppl_ratio=1e6), keep_work=True)
    assert rep["locked_layers"] == [0, 1] and rep["auto_layers"]["trail"][0] == {
        "layers": 2, "ppl_ratio": pytest.approx(rep["auto_layers"]["trail"][0]["ppl_ratio"])}
    assert rep["auto_layers"]["trail"][0]["ppl_ratio"] > 1.0  # measured, not assumed
    assert sorted(rep["auto_layers"]["order"]) == [0, 1]
    # a tight budget: the chosen layers are the best-first prefix whose measured ratio fits, the next one not
    tight = (1.0 + rep["auto_layers"]["trail"][0]["ppl_ratio"]) / 2
    try:
        r = lock(model, tmp_path / "tight", LockConfig(**kw, max_ppl_ratio=tight))
    except WeightlockError as e:  # not even the best layer alone fits
        assert "no fitted layer keeps the perplexity ratio within" in str(e)
        assert not (tmp_path / "tight" / "model.safetensors").exists()
    else:
        n = len(r["locked_layers"])
        by_n = {t["layers"]: t["ppl_ratio"] for t in r["auto_layers"]["trail"]}
        assert n == 1 and r["locked_layers"] == r["auto_layers"]["order"][:1] and by_n[1] <= tight < by_n[2]
