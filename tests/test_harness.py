"""lm-evaluation-harness as the capability engine, on local tasks generated from the built-in corpus."""
import json

import pytest
from typer.testing import CliRunner

from weightlock.cli import app
from weightlock.eval.harness import TASKS, write_tasks

pytest.importorskip("lm_eval")
runner = CliRunner()


def test_local_tasks_are_built_from_held_out_text(tmp_path):
    d = write_tasks(tmp_path / "t", n=30)
    meta = json.loads((d / "tasks.json").read_text())
    assert meta["tasks"] == list(TASKS) and all(v == 30 for v in meta["examples"].values())
    docs = [json.loads(x) for x in (d / "wl_code_next_line.jsonl").read_text().splitlines()]
    assert all(len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4 for doc in docs)
    assert len({doc["label"] for doc in docs}) > 1, "the answer's position is shuffled"
    from weightlock.data import load_texts

    test_code = "\n".join(load_texts("builtin:code", "test"))
    assert all(doc["context"].strip().splitlines()[0] in test_code for doc in docs[:10])
    assert write_tasks(tmp_path / "again", n=30).joinpath("wl_recall.jsonl").read_text() == \
        (d / "wl_recall.jsonl").read_text(), "deterministic"


def test_harness_scores_a_model_in_memory(tiny_model_dir):
    model, _ = tiny_model_dir
    r = runner.invoke(app, ["eval", "harness", "--model", str(model), "--limit", "12", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert set(res) == set(TASKS)
    for name in ("wl_code_next_line", "wl_prose_next_sentence"):
        assert res[name]["samples"] == 12 and 0.0 <= res[name]["acc"] <= 1.0
    assert res["wl_recall"]["samples"] == 12 and 0.0 <= res["wl_recall"]["exact_match"] <= 1.0
    r = runner.invoke(app, ["eval", "harness", "--model", str(model), "--tasks", "mmlu"])
    assert r.exit_code == 2 and "unknown task" in r.output
