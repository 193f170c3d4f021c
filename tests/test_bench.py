"""bench/: every script imports only from weightlock (no sys.path edits, no imports of another script or of a
bench-local module), and the library's bench harness writes where it says, with a record kind."""
import ast
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_no_bench_file_touches_sys_path():
    offenders = [p.name for p in SCRIPTS if "sys.path" in p.read_text(encoding="utf-8")]
    assert offenders == [], f"bench scripts that edit sys.path (import from weightlock instead): {offenders}"


def test_bench_scripts_import_no_other_bench_file():
    local = {p.stem for p in SCRIPTS}
    bad = []
    for p in SCRIPTS:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{p.name}: {n}" for n in names if n.split(".")[0] in local]
            if isinstance(node, ast.ImportFrom) and node.level:
                bad.append(f"{p.name}: relative import")
    assert bad == [], f"bench scripts import from each other (move what they share into weightlock): {bad}"


def test_results_dir(monkeypatch, tmp_path):
    from weightlock.experiments import harness

    monkeypatch.delenv(harness.RESULTS_ENV, raising=False)
    main = type(sys)("fake_main")
    main.__file__ = str(tmp_path / "bench" / "x.py")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert harness.results_dir() == (tmp_path / "bench" / "results").resolve()  # beside the running bench script
    main.__file__ = str(tmp_path / "elsewhere.py")
    monkeypatch.chdir(tmp_path)
    assert harness.results_dir() == tmp_path / "bench" / "results"
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "out"))
    assert harness.results_dir() == tmp_path / "out"


@pytest.mark.parametrize("kind", [None, "dlr_memory_depth"])
def test_save_stamps_kind_schema_and_machine(monkeypatch, tmp_path, kind):
    from weightlock import schema
    from weightlock.experiments import harness

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    path = harness.save("some_run", {"x": 1}, kind=kind)
    d = json.loads(path.read_text())
    assert path == tmp_path / "some_run.json" and d["x"] == 1 and "machine" in d
    assert d["kind"] == (kind or "bench.some_run") and schema.kind_of(d) == d["kind"]


def test_timing_key_and_max_gain():
    from weightlock.experiments.harness import max_gain, timing_key

    row = {"model": "dlr-32", "attack": "full", "options": {"lr": 1e-3, "seed": 1, "checkpointing": "layer"},
           "cost_curve": [{"step": 0, "score": -5.0}, {"step": 10, "score": -4.0}, {"step": 20, "score": -4.5}]}
    assert timing_key(row) == ("dlr-32", "full", (("checkpointing", "layer"),))
    assert max_gain(row) == pytest.approx(1.0)
