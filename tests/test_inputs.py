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
