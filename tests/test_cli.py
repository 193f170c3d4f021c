import json
import math
import re
from pathlib import Path

from typer.testing import CliRunner

from weightlock import __version__
from weightlock.cli import app

runner = CliRunner()


def test_help_lists_every_command_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("pretrain", "eval", "generate", "demo", "data"):
        assert cmd in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"weightlock {__version__}"


def test_eval_ppl_and_generate(tiny_model_dir):
    out, metrics = tiny_model_dir
    r = runner.invoke(app, ["eval", "ppl", "--model", str(out), "--data", "builtin:code", "--split", "validation",
                            "--max-tokens", "4096", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # status lines go to stderr
    assert res["block_size"] == 64 and res["tokens"] == (4096 // 64) * 63
    assert 1 < res["perplexity"] < 4096
    r = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "import ", "--max-new-tokens", "5"])
    assert r.exit_code == 0 and r.output.startswith("import ")


def test_user_errors_exit_2_without_traceback(tmp_path):
    r = runner.invoke(app, ["eval", "ppl", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "model directory not found" in r.output and "Traceback" not in r.output
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    r = runner.invoke(app, ["eval", "ppl", "--model", str(tmp_path / "m")])
    assert r.exit_code == 2 and "no .safetensors weights" in r.output
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    r = runner.invoke(app, ["eval", "ppl", "--model", str(tmp_path / "m")])
    assert r.exit_code == 2 and "cannot load the model" in r.output
    r = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "o"), "--preset", "huge"])
    assert r.exit_code == 2 and "unknown preset" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    r = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "full"), "--preset", "tiny"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "tiny"
    # issue 24: `demo --quick` is `run demo-quick` now; the same summary fields as the demo before it
    # (tests/fixtures/demo_quick_fields.json, from `demo --quick` before the change), every row from a record
    fields = json.loads((Path(__file__).parent / "fixtures" / "demo_quick_fields.json").read_text())
    assert set(summary) == set(fields["summary"]) and set(summary["plan"]) == set(fields["plan"])
    assert all(set(r) == set(fields["row"]) for r in summary["attacks"])
    assert json.loads((out / "spec.json").read_text())["name"] == "demo-quick"
    assert len(list((out / "attacks").rglob("record.json"))) == len(summary["attacks"])
    cap = summary["capability"]
    assert set(cap) == {"reference", "dlr", "pmp"} and all(v["code"] > 1 for v in cap.values())
    # the locked model is evaluated with its DLR-Nets (not a plain load with re-initialised MLPs)
    assert cap["dlr"]["code"] < 1.1 * cap["reference"]["code"]
    rows = summary["attacks"]
    assert {(r["defense"], r["attack"]) for r in rows} >= {
        ("dlr", "full"), ("dlr", "lora"), ("dlr", "checkpointing"), ("dlr", "reverse-distill"),
        ("pmp", "full"), ("pmp", "lora"), ("pmp", "mask-recover"), ("pmp", "masked (authorized)")}
    assert {r["task"] for r in rows} == {"prose", "recall-loglik"}
    # issue 23: every attack moves every task's score within the quick budget (recall scored by its answers'
    # likelihood: its greedy exact match stayed 0 → 0 in 6 steps, so every recall gain was 0 and showed n/a)
    for a in rows:
        assert math.isfinite(a["gain"]) and a["gain"] != 0 and a["gain_ratio"] is not None, a
    assert "no measurable reference gain" not in " ".join(summary["verdicts"].values())
    full = next(r for r in rows if r["defense"] == "dlr" and r["attack"] == "full" and r["task"] == "prose")
    assert full["memory_ratio"] > 1.2  # the locked model stores every DLR block's activations
    assert full["peak_delta_bytes"] > 0 and full["peak_ratio"] is not None  # each run's own peak
    assert len({r["peak_rss_bytes"] for r in rows}) > 1, "not one process-wide high for every run"
    # the memory budget is counted training memory, not the measured peaks: PMP's model has the original's
    # architecture, so its full fine-tune and mask recovery fit exactly; the DLR lock's full fine-tune does not
    assert summary["training_memory"]["basis"] == "counted"
    for a in rows:
        assert a["fits_memory"] == (a["training_memory_bytes"] <= summary["training_memory"]["budget_bytes"][a["task"]])
    pmp = {(r["attack"], r["task"]): r for r in rows if r["defense"] == "pmp"}
    for task in ("prose", "recall-loglik"):
        assert pmp["full", task]["training_memory_ratio"] == 1.0 and pmp["full", task]["fits_memory"]
        assert pmp["mask-recover", task]["fits_memory"]
    assert full["fits_memory"] is False
    # a verdict's cheapest attack that fits (memory × ≤ 1.00) is also its cheapest within memory: never "never"
    for name, defense in (("DLR-Lock", "dlr"), ("PMP", "pmp")):
        for task, m, attack in re.findall(r"([\w-]+): best attack [^;]*?costs ([\d.]+)× the time \(([^)]+)\)",
                                           summary["verdicts"][name]):
            hit = next(a for a in rows if (a["defense"], a["attack"], a["task"]) == (defense, attack, task))
            if hit["fits_memory"]:
                assert f"{m}× the time within the unlocked full fine-tune's training memory ({attack})" \
                    in summary["verdicts"][name], summary["verdicts"][name]
    assert summary["memory_vs_depth"]["r2"] > 0.99
    assert 0 <= summary["mask_recovery"]["best"]["iou"] <= 1
    assert set(summary["verdicts"]) == {"DLR-Lock", "PMP"}
    # the terminal summary shows the JSON's numbers
    assert all(f"{row['gain']:+.4f}" in r.output for row in rows)
    assert all(f"{name}: {text.split(' — ')[0]}" in r.output for name, text in summary["verdicts"].items())
    for name in ("index.html", "README.md", "curves.png", "memory_vs_depth.png", "frontier.png",
                 "gain_vs_ratio.png", "mask_recovery.png", "layer_error.png"):
        assert (out / "report" / name).stat().st_size > 500, name
    # a second run reuses every model and attack
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0 and r.output.count("reusing") == 3
    assert json.loads((out / "summary.json").read_text())["attacks"] == rows


def test_ctrl_c_message_says_what_is_kept_and_the_exact_command():
    from weightlock.cli import interrupt_message

    m = interrupt_message("pretrain", ["pretrain", "--out", "runs/base"])
    assert m == ("interrupted: the last checkpoint in --out is kept; continue with: "
                 "weightlock pretrain --out runs/base --resume")
    assert interrupt_message("pretrain", ["pretrain", "--out", "x", "--resume"]).endswith("--out x --resume")
    m = interrupt_message("lock_cmd", ["lock", "--model", "my model", "--out", "o"])
    assert "--out/.weightlock-work" in m and m.endswith("continue with: weightlock lock --model 'my model' --out o")
    for command in ("eval_ppl", "generate", "finetune", "plan"):
        m = interrupt_message(command, ["x"])
        assert m.startswith("interrupted: nothing was saved; start over with: weightlock x"), m
        assert "--resume" not in m and "checkpoint" not in m


def _first_stderr_line(args: list[str]) -> str:
    """The first line a ``weightlock`` command writes to stderr (then the command is stopped): what a user
    sees before any long work."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "weightlock.cli", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        return p.stderr.readline().rstrip("\n")
    finally:
        p.kill()
        p.wait()


def test_long_commands_say_what_they_do_before_the_long_work(tiny_model_dir, tmp_path):
    """plan, eval ppl and lock print a status line before any model is loaded or measured (they used to be
    silent for minutes); read from the first line of output, not timed."""
    model, _ = tiny_model_dir
    assert _first_stderr_line(["plan", "--model", "smollm2-135m"]).startswith(
        "weightlock plan: smollm2-135m, rank 32 — memory and FLOPs first")
    assert _first_stderr_line(["eval", "ppl", "--model", str(model)]) == f"weightlock eval ppl: loading {model}"
    assert _first_stderr_line(["lock", "--model", str(model), "--out", str(tmp_path / "o")]) == \
        f"weightlock lock: loading {model}"
