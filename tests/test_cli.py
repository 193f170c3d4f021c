import json

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
    res = json.loads(r.output)
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
    r = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["preset"] == "tiny"
    code = summary["validation"]["code"]
    assert code["model_ppl"] < code["unigram_ppl"], "the base model beats unigram on its training domain"
    # second run reuses the cached base model
    r = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0 and "reusing" in r.output
