"""Results carry ``kind`` and ``schema_version``; the report dispatches on the kind, old files by content."""
import json
import shutil
from pathlib import Path

import pytest

from weightlock import schema
from weightlock.errors import WeightlockError
from weightlock.report import build_report, collect

FIX = Path(__file__).parent / "fixtures" / "report"


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_report_dispatches_on_recorded_kind_not_on_fields(tmp_path):
    demo = json.loads((FIX / "demo" / "summary.json").read_text())
    memory = json.loads((FIX / "bench" / "dlr_memory.json").read_text())
    _write(tmp_path / "a" / "summary.json", schema.stamp(schema.DEMO, {k: v for k, v in demo.items()
                                                                        if k != "weightlock_demo"}))
    _write(tmp_path / "b" / "dlr_memory.json", schema.stamp(schema.bench_kind("dlr_memory"), memory))
    # fields of a demo summary, but recorded as a kind no report section draws: the generic section, not the demo's
    _write(tmp_path / "c" / "summary.json", schema.stamp(schema.ATTACK_SUITE, demo))
    # an old file without a kind is still recognised by its fields
    shutil.copy(FIX / "bench" / "frontier.json", tmp_path / "frontier.json")
    found = collect([tmp_path])
    assert {k: [f.parent.name for f, _ in v] for k, v in found.items()} == {
        schema.DEMO: ["a"], schema.MEMORY_VS_DEPTH: ["b"], schema.MEMORY_TIME_FRONTIER: [tmp_path.name],
        schema.ATTACK_SUITE: ["c"]}
    index = build_report([tmp_path], tmp_path / "rep")
    assert (index.parent / "curves.png").exists() and (index.parent / "memory_vs_depth.png").exists()
    md = index.with_name("README.md").read_text()
    assert md.count("Capability (") == 1  # the demo's tables once: the attack suite's record is drawn generically
    assert f"## {tmp_path / 'c' / 'summary.json'} (record kind 'attack_suite', no report section): its fields" in md


def test_newer_schema_is_refused_with_one_clear_line(tmp_path):
    f = _write(tmp_path / "summary.json", {"kind": schema.DEMO, "schema_version": schema.SCHEMA_VERSION + 1})
    with pytest.raises(WeightlockError, match="upgrade weightlock") as e:
        collect([tmp_path])
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_stamp_adds_kind_and_version_without_touching_the_input():
    d = {"a": 1}
    s = schema.stamp(schema.PMP_RUN, d)
    assert s == {"a": 1, "kind": "pmp_run", "schema_version": schema.SCHEMA_VERSION} and d == {"a": 1}
    assert schema.kind_of(s) == "pmp_run" and schema.kind_of(d) is None
    assert schema.kind_of({"kind": "weightlock-dlr-lock"}) is None  # a manifest: no schema version
