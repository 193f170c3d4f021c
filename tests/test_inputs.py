"""Bad input is one clear line (exit 2, no traceback), and config files merge deeply."""
import json
import subprocess
import sys

import pytest

from weightlock.attacks import make_attack
from weightlock.config import merge
from weightlock.errors import WeightlockError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "weightlock.cli", *args], capture_output=True, text=True)


def test_attack_options_are_typed(tmp_path):
    with pytest.raises(WeightlockError, match="option 'steps' expects int, got 'abc'"):
        make_attack("full", steps="abc")
    with pytest.raises(WeightlockError, match="unknown checkpointing"):
        make_attack("full", checkpointing="sometimes")
    assert make_attack("full", lr=1).cfg.lr == 1.0 and isinstance(make_attack("full", lr=1).cfg.lr, float)
    r = _cli("attack", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "steps=abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'steps' expects int" in r.stderr, r.stderr[-1500:]


@pytest.mark.parametrize("line,msg", [
    ('{"text": 42}', "field 'text' must be a string, got 42"),
    ('{"text": null}', "field 'text' must be a string, got null"),
    ('{"prompt": 1, "completion": " a"}', "field 'prompt' must be a string, got 1"),
    ("42", "expected a JSON object, got int"),
])
def test_jsonl_tasks_with_non_string_values_are_one_line(tmp_path, line, msg):
    f = tmp_path / "task.jsonl"
    f.write_text("\n".join([line] * 300) + "\n")
    r = _cli("attack", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--task", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr[-1500:]


def test_jsonl_with_bad_utf8_is_one_line(tmp_path):
    from weightlock.data import load_texts

    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "ok \xff\xfe"}\n' * 300)
    r = _cli("attack", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--task", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not UTF-8" in r.stderr, r.stderr[-1500:]
    with pytest.raises(WeightlockError, match="not UTF-8"):
        load_texts(str(f), "train")
    g = tmp_path / "num.jsonl"
    g.write_text('{"text": 3.5}\n')
    with pytest.raises(WeightlockError, match=r"num.jsonl:1: .*string field 'text' \(got 3.5\)"):
        load_texts(str(g), "train")


def test_config_merge_is_deep_and_rejects_unknown_keys():
    base = {"lr": 1.0, "train": {"lr": 3e-3, "warmup_steps": 10, "batch_size": 16}, "model": None}
    assert merge(base, {"train": {"lr": 1e-3}}) == {"lr": 1.0, "model": None,
                                                     "train": {"lr": 1e-3, "warmup_steps": 10, "batch_size": 16}}
    with pytest.raises(WeightlockError, match="unknown config key 'train.lrr'"):
        merge(base, {"train": {"lrr": 1}})
    with pytest.raises(WeightlockError, match="unknown config key 'bogus'"):
        merge(base, {"bogus": 1})


def test_pretrain_config_file_keeps_the_presets_other_fields(tmp_path):
    from weightlock.train.pretrain import default_config

    tiny = default_config("tiny").train
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"lr": 1e-3}}))
    out = tmp_path / "run"
    r = _cli("pretrain", "--preset", "tiny", "--config", str(cfg), "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "weightlock_run.json").read_text())
    t = run["config"]["train"] if "config" in run else run["train"]
    assert t["lr"] == 1e-3 and t["max_steps"] == 2
    assert t["warmup_steps"] == tiny.warmup_steps and t["eval_every"] == tiny.eval_every, "the preset's, not defaults"
    cfg.write_text(json.dumps({"train": {"learning_rate": 1e-3}}))
    r = _cli("pretrain", "--preset", "tiny", "--config", str(cfg), "--steps", "2", "--out", str(tmp_path / "r2"))
    assert r.returncode == 2 and "unknown config key 'train.learning_rate'" in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "r2").exists()
    r = _cli("pretrain", "--preset", "tiny", "--steps", "abc", "--out", str(tmp_path / "r3"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_threads_per_process_divides_cores_and_respects_the_environment(monkeypatch):
    import os

    from weightlock.io import threads_per_process

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_process(1) == cores
    assert threads_per_process(2) * 2 <= max(2, cores) and threads_per_process(2) >= 1
    assert threads_per_process(4 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(2) == 3, "an explicit OMP_NUM_THREADS wins"


def test_torchrun_workers_share_the_cores(tmp_path):
    """Each gloo worker of a 2-process job runs with at most cores/2 threads (torchrun without an explicit
    OMP_NUM_THREADS: the library divides the cores itself)."""
    import os

    script = tmp_path / "w.py"
    script.write_text("import sys, torch\nfrom pathlib import Path\nfrom weightlock.io import dist_or_none\n"
                      "d = dist_or_none()\n"
                      "Path(sys.argv[1], f'rank{d.get_rank()}').write_text(str(torch.get_num_threads()))\n"
                      "d.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    counts = [int((tmp_path / f"rank{k}").read_text()) for k in (0, 1)]
    assert all(1 <= c <= max(1, len(os.sched_getaffinity(0)) // 2) for c in counts), counts


def test_non_empty_output_hints_only_options_the_command_has(tiny_model_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = _cli("lock", "--model", str(tiny_model_dir[0]), "--out", str(out), "--steps", "1")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "--resume" not in r.stderr, r.stderr[-1500:]
    r = _cli("pretrain", "--method", "pmp", "--preset", "tiny", "--out", str(out))
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr[-1500:]
    assert (out / "keep.txt").read_text() == "precious"


# ---- "The first hour of a new user": bad input that slipped through -----------------------------------------

_ATTACK_FAST = ["--set", "steps=1", "--set", "batch_size=2", "--set", "block_size=64", "--set", "train_tokens=2000",
                "--set", "eval_tokens=256"]


def _one_error_line(r, *needles: str, allow: tuple = ()) -> str:
    """The command failed with exit 2 and wrote exactly one line (besides progress lines starting with
    ``allow``): ``error: ...`` holding every needle; returns it."""
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(allow or ("\0",))]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _tree(d) -> dict:
    from pathlib import Path

    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(Path(d).rglob("*"))}


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the session's tiny model (tests may try to write into it)."""
    import shutil

    d = tmp_path / "models" / "model"
    shutil.copytree(tiny_model_dir[0], d)
    return d


def test_attack_output_is_never_the_model_inside_it_or_around_it(model_copy):
    before = _tree(model_copy)
    for out, what in [(model_copy, "is or contains the input"), (model_copy / "runs", "lies inside the input"),
                      (model_copy.parent, "is or contains the input")]:
        r = _cli("attack", "--model", str(model_copy), "--out", str(out), *_ATTACK_FAST)
        _one_error_line(r, str(out), what, "choose an output outside it")
        assert _tree(model_copy) == before, "nothing was written into the model"
    assert not (model_copy / "runs").exists()


def test_generate_refuses_meaningless_sampling_settings(model_copy):
    for args, msg in [(["--temperature", "-1"], "temperature must be a finite number ≥ 0 (0: greedy), got -1.0"),
                      (["--temperature", "nan"], "temperature must be a finite number ≥ 0"),
                      (["--max-new-tokens", "0"], "max new tokens must be a whole number ≥ 1, got 0")]:
        r = _cli("generate", "--model", str(model_copy), *args)
        _one_error_line(r, msg)
        assert r.stdout == "", "nothing was generated"
    from weightlock.eval.perplexity import check_sampling, generate_text

    for kw, msg in [(dict(top_p=0.0), r"top-p must be in \(0, 1\], got 0.0"), (dict(top_p=1.5), "top-p"),
                    (dict(top_k=0), "top-k must be a whole number ≥ 1"), (dict(temperature=float("inf")), "finite")]:
        with pytest.raises(WeightlockError, match=msg):
            generate_text(model_copy / "missing", "x", **kw)  # refused before the model is even looked for
    check_sampling(1, 0.0)  # greedy
    check_sampling(8, 0.7, top_k=1, top_p=1.0)


def test_truncated_gguf_is_one_line_naming_the_file(tmp_path, tokenizer):
    from gguf_helpers import write_tiny_llama_gguf
    from weightlock.models.gguf import load_gguf

    whole = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(whole, tokenizer)
    data = whole.read_bytes()
    for name, cut in [("cut.gguf", len(data) * 2 // 3), ("short.gguf", len(data) - 7), ("head.gguf", 200)]:
        f = tmp_path / name
        f.write_bytes(data[:cut])
        out = tmp_path / f"out-{name}"
        line = _one_error_line(_cli("convert", str(f), "--out", str(out)),
                               f"{f}: the GGUF file is truncated or corrupt")
        assert "reshape" not in line and "dtype" not in line and "unpack" not in line, line
        assert not out.exists()
        with pytest.raises(WeightlockError, match="truncated or corrupt"):
            load_gguf(f)
    assert load_gguf(whole, with_tokenizer=False) is not None, "a whole file still loads"


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_under_proc_says_it_cannot_be_created_there(model_copy, tmp_path, tokenizer):
    from gguf_helpers import write_tiny_llama_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf, tokenizer)
    for args in (["finetune", "--model", str(model_copy), "--steps", "1"],
                 ["pretrain", "--preset", "tiny", "--steps", "1"],
                 ["attack", "--model", str(model_copy), *_ATTACK_FAST],
                 ["convert", str(gguf)]):
        line = _one_error_line(_cli(*args, "--out", "/proc/weightlock-x"),
                               "/proc/weightlock-x: the output directory cannot be created there (/proc ")
        assert "No such file or directory" not in line, line


def test_manifest_mismatch_suggests_only_options_the_command_has(model_copy):
    (model_copy / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    m = str(model_copy)
    for args, has_no_verify in [(["finetune", "--model", m, "--out", str(model_copy.parent / "ft")], False),
                                (["attack", "--model", m, "--out", str(model_copy.parent / "atk"), *_ATTACK_FAST],
                                 False),
                                (["lock", "--model", m, "--out", str(model_copy.parent / "lk")], False),
                                (["generate", "--model", m], True),
                                (["eval", "ppl", "--model", m], True)]:
        line = _one_error_line(_cli(*args), "model.safetensors: SHA-256 does not match manifest.json",
                               allow=("weightlock ",))
        assert ("--no-verify" in line) == has_no_verify, (args[0], line)
        assert "verify=False" not in line, line


def test_failed_finetune_leaves_nothing_behind(model_copy, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from weightlock.cli import app

    out = tmp_path / "new" / "ft"
    r = _cli("finetune", "--model", str(model_copy), "--data", "builtin:nope", "--out", str(out), "--steps", "1")
    _one_error_line(r, "builtin:nope")
    assert not out.exists() and not out.parent.exists(), "not even an empty directory"

    def boom(*a, **k):
        raise WeightlockError("training diverged (simulated)")

    monkeypatch.setattr("weightlock.train.finetune.finetune", boom)
    r = CliRunner().invoke(app, ["finetune", "--model", str(model_copy), "--out", str(out), "--steps", "1"])
    assert r.exit_code == 2 and "training diverged" in r.output, r.output
    assert not out.exists() and not out.parent.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous run")
    r = CliRunner().invoke(app, ["finetune", "--model", str(model_copy), "--out", str(old), "--steps", "1",
                                 "--overwrite"])
    assert r.exit_code == 2 and (old / "keep.txt").read_text() == "previous run", "replaced only on success"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "old"], "no temporary directory left"
    monkeypatch.undo()
    r = CliRunner().invoke(app, ["finetune", "--model", str(model_copy), "--out", str(old), "--steps", "1",
                                 "--batch-size", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (old / "model.safetensors").exists() and not (old / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "old"]


def test_unsupported_architecture_is_weightlocks_one_line_without_transformers_tables(tmp_path):
    """A checkpoint with keys its class does not use (here a classifier head) of a family DLR-Lock does not
    support: transformers' load report (a table of keys) is not shown, only weightlock's line; a checkpoint
    whose shapes do not fit its config is one line naming the tensor."""
    import torch
    import transformers as T
    from safetensors.torch import load_file, save_file

    cfg = T.RobertaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=70)
    d = tmp_path / "roberta"
    T.RobertaModel(cfg).save_pretrained(str(d))
    state = load_file(str(d / "model.safetensors"))
    state["classifier.dense.weight"] = torch.zeros(32, 32)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    _one_error_line(_cli("lock", "--model", str(d), "--out", str(tmp_path / "o")),
                    "model type 'roberta' is not supported by DLR-Lock", allow=("weightlock ",))
    assert not (tmp_path / "o").exists()

    from dlr_helpers import tiny_model

    w = tmp_path / "wrong"
    tiny_model("llama").save_pretrained(str(w))
    c = json.loads((w / "config.json").read_text())
    c["intermediate_size"] = 48
    (w / "config.json").write_text(json.dumps(c))
    _one_error_line(_cli("generate", "--model", str(w)), "weights of the wrong shape for the config: "
                    "model.layers.0.mlp.down_proj.weight is [32, 64] in the checkpoint, the config needs [32, 48]")
