"""`weightlock report`: figures and documents from recorded JSON only, local files only, renders headless."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from weightlock import report as R
from weightlock import schema
from weightlock.cli import app
from weightlock.errors import WeightlockError
from weightlock.report import FIGURES, build_report, collect

FIX = Path(__file__).parent / "fixtures" / "report"
runner = CliRunner()


def test_collect_recognises_every_kind_by_content():
    found = collect([FIX])
    assert set(found) == {schema.DEMO, schema.ATTACK_CURVES, schema.MEMORY_VS_DEPTH, schema.MEMORY_TIME_FRONTIER,
                          schema.PMP_GAIN_VS_RATIO, schema.MASK_RECOVERY, schema.LOCK_FIDELITY, schema.REAL_LOCK,
                          schema.LOCK_COST, schema.LOCK_REGIME, schema.REAL_ATTACKS, schema.ERROR_BUDGET}
    assert all(len(v) == (2 if k in (schema.REAL_LOCK, schema.REAL_ATTACKS) else 1) for k, v in found.items())
    # unrelated.json is no weightlock record: passed over


def test_a_known_kind_is_read_under_any_file_name_and_an_unknown_kind_gets_a_generic_section(tmp_path):
    """The report finds records by their kind (the library's registry of record kinds), not by a bench script's
    file name: a lock-cost record called anything is drawn; a record of a kind no section draws gets the generic
    section (a table of its fields; with standard attack rows, the attacker-gain figure) instead of being
    skipped."""
    shutil.copy(FIX / "bench" / "cost_to_target.json", tmp_path / "whatever-i-called-it.json")
    d = json.loads((FIX / "bench" / "dlr_memory.json").read_text())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.json").write_text(json.dumps(schema.stamp(schema.MEMORY_VS_DEPTH, d)))
    rows = [{"defense": d, "attack": "full", "task": "prose", "gain": g, "reference_gain": 0.5}
            for d, g in (("reference", 0.5), ("mine", 0.1))]
    (tmp_path / "sub" / "new.json").write_text(json.dumps(schema.stamp("bench.something_new",
                                                                      {"x": 1.25, "attacks": rows})))
    # an experiment directory's parts (a run's typed record, the resolved spec) are neither drawn nor "skipped"
    (tmp_path / "sub" / "record.json").write_text(json.dumps(schema.stamp(schema.ATTACK_RECORD, {"x": 1})))
    (tmp_path / "sub" / "spec.json").write_text(json.dumps(schema.stamp(schema.EXPERIMENT_SPEC, {"x": 1})))
    found = collect([tmp_path])
    assert {k: [f.name for f, _ in v] for k, v in found.items()} == {
        schema.LOCK_COST: ["whatever-i-called-it.json"], schema.MEMORY_VS_DEPTH: ["m.json"],
        "bench.something_new": ["new.json"]}
    new = tmp_path / "sub" / "new.json"
    index = build_report([tmp_path], tmp_path / "rep")
    md, page = index.with_name("README.md").read_text(), index.read_text()
    assert "![Gain vs the attacker's cost, locked vs unlocked](cost_curves.png)" in md
    assert f"## {new} (record kind 'bench.something_new', no report section): its fields" in md
    assert "| x | 1.25 |" in md and "Skipped" not in md
    assert '<img src="mine_gain.png" alt="mine: attacker gain on the release vs on the original">' in page
    assert (tmp_path / "rep" / "mine_gain.png").stat().st_size > 2000


def test_every_kind_the_report_draws_is_a_registered_record_kind():
    assert set(R.drawn()) <= set(schema.RECORD_KINDS)
    assert {name for name, *_ in FIGURES} == set(R.FIGURE_KINDS)
    with pytest.raises(WeightlockError, match="unregistered record kinds: nope"):
        R.register_section("nope", R.Section(("nope",), "a kind no reader registered"))
    assert schema.record_kind({"kind": "bench.real_model_anything", "schema_version": 1}) == schema.REAL_LOCK
    assert schema.record_kind({"kind": "bench.cost_to_target", "schema_version": 1}) == schema.LOCK_COST
    with pytest.raises(WeightlockError, match="already registered"):
        schema.register_kind(schema.RecordKind(schema.LOCK_COST, "a duplicate"))


def test_report_from_fixture_json_has_every_figure_and_local_references_only(tmp_path):
    r = runner.invoke(app, ["report", str(FIX / "bench"), str(FIX / "demo"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "rep"
    page = (out / "index.html").read_text()
    md = (out / "README.md").read_text()
    for name, *_ in FIGURES:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f'src="{name}"' in page and f"]({name})" in md
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all("://" not in u and not u.startswith("//") and (out / u).is_file() for u in refs)
    assert "Not in these results" not in page
    # every figure has a caption; the demo's tables and verdicts are there, with the demo's numbers
    assert page.count("<figcaption>") == len(FIGURES)
    assert "DLR-Lock" in page and "Verdicts" in md
    import json

    demo = json.loads((FIX / "demo" / "summary.json").read_text())
    row = next(r for r in demo["attacks"] if r["defense"] == "dlr" and r["attack"] == "full" and r["task"] == "prose")
    assert f"{row['gain']:+.4f}" in md


def test_report_leads_with_the_real_model_against_the_bars(tmp_path):
    md = build_report([FIX / "bench", FIX / "demo"], tmp_path / "rep").with_name("README.md").read_text()
    first = md.index("## ", md.index("# weightlock report") + 2)
    assert md[first:].startswith("## Real LLM (SmolLM2-135M)")
    row = next(line for line in md.splitlines() if line.startswith("| r32-row-clip-b256 |"))
    # the recorded run: prose perplexity 17.0 → 8.1e7, top-1 agreement 0, prefill 1.09×, decode 1.73×
    assert "17.0 → 8.11e+07" in row and "| 1.09× | 1.73× | MISSES |" in row
    # a lock with a diverged layer says which, rather than a NaN maximum
    row = next(line for line in md.splitlines() if line.startswith("| r16-row-clip-b256 |"))
    assert "| 0.39 / NaN (layer 29 diverged) |" in row and "17.0 → nan" in row and row.endswith("MISSES |")


def test_report_leads_with_the_red_team_verdicts_on_faithful_releases(tmp_path):
    """Issue #35: the report's first table is the red team on the faithful releases — per release and task the
    release's fidelity and read-back, the multipliers and the verdict sentence the bench wrote — and it draws
    score vs seconds and every attack's memory vs time; the older broken-lock red team follows as history."""
    md = build_report([FIX / "bench"], tmp_path / "rep").with_name("README.md").read_text()
    ra = json.loads((FIX / "bench" / "real_attacks_synthetic.json").read_text())
    first = md.index("## ", md.index("# weightlock report") + 2)
    assert md[first:].startswith("## Real LLM (SmolLM2-135M): the red team on faithful releases")
    for a in ra["analysis"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {a['release']} | {a['task']} |"))
        assert a["verdict"] in row and f"| {a['seconds_level']['multiplier']:.2f}× |" in row
        assert f"{a['release_fidelity']['ppl_ratio']:.4f} / {a['release_fidelity']['readback_ppl_ratio']:.4f}" in row
    assert md.index("the red team on faithful releases") < md.index("the red team, lock vs unlocked original")
    panels = R._real_frontier_panels(collect([FIX / "bench"]))
    assert [(t, r) for t, r, _ in panels] == [(a["task"], a["release"]) for a in ra["analysis"]]
    assert all(len(p) == len(a["per_step"]) for (_, _, p), a in zip(panels, ra["analysis"]))
    assert "](real_attacks_frontier.png)" in md


def test_report_shows_the_real_model_red_team_and_error_budget(tmp_path):
    import json

    build_report([FIX / "bench"], tmp_path / "rep")
    md = (tmp_path / "rep" / "README.md").read_text()
    assert "the red team, lock vs unlocked original" in md and "per-layer error budget" in md
    ra = json.loads((FIX / "bench" / "real_attacks.json").read_text())
    prose = next(a for a in ra["analysis"] if a["task"] == "prose")
    row = next(line for line in md.splitlines() if line.startswith("| prose | dlr-32 |"))
    assert f"{prose['gain_ratio_at_convergence']:.2f}" in row
    assert f"{prose['seconds_level']['multiplier']:.2f}×" in row
    # a task where the unlocked attacker gains nothing has no target: n/a, not a number
    recall = next(line for line in md.splitlines() if line.startswith("| recall | dlr-32 |"))
    assert recall.count("n/a") >= 4
    eb = json.loads((FIX / "bench" / "real_error_budget.json").read_text())
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in md.splitlines()
                if line.startswith("| ") and line.count("|") == 6 and line.split("|")[1].strip()[:1] in "0123456789"]
    expect = ["meets" if g["ppl_ratio"] <= 1.05 and g["top1_agreement"] >= 0.95 else "MISSES" for g in eb["all_layers"]]
    assert verdicts == expect and "meets" in expect and "MISSES" in expect


def test_report_shows_the_lock_cost_multiplier_and_the_regime(tmp_path):
    import json

    md = build_report([FIX / "bench"], tmp_path / "rep").with_name("README.md").read_text()
    a = json.loads((FIX / "bench" / "cost_to_target.json").read_text())["analysis"][0]
    row = next(line for line in md.splitlines() if line.startswith("| prose | dlr-16 |"))
    assert f"| {a['seconds_any_memory']['multiplier']:.2f}× |" in row
    assert f"| {a['gain_ratio_at_convergence']:.2f} |" in row
    assert "![Gain vs the attacker's cost, locked vs unlocked](cost_curves.png)" in md
    rows = [line for line in md.splitlines() if line.startswith("| dlr-")]
    assert "| dlr-32 | 32 | 1.0020 | 130 | 3.4× |" in md and any("∞ (never)" in r for r in rows)
    assert any(r.startswith("| dlr-32-norm | 32 |") and "| n/a |" in r for r in rows)


def test_report_lists_missing_figures_and_rejects_empty_input(tmp_path):
    index = build_report([FIX / "bench" / "dlr_memory.json"], tmp_path / "one")
    page = index.read_text()
    assert 'src="memory_vs_depth.png"' in page and "Not in these results" in page
    assert not (tmp_path / "one" / "curves.png").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightlockError, match="no weightlock results"):
        build_report([tmp_path / "empty"], tmp_path / "x")
    with pytest.raises(WeightlockError, match="no such file"):
        build_report([tmp_path / "missing"], tmp_path / "x")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium_with_all_images(tmp_path):
    index = build_report([FIX], tmp_path / "rep")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120).stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, dom[:500]
    assert int(total.group(1)) == len(FIGURES) and loaded.group(1) == total.group(1)
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,4000", f"--screenshot={shot}", index.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert img.size == (1200, 4000) and hi - lo > 100  # a rendered page, not a blank one


def test_figures_draw_each_series_once_and_no_invented_lines():
    """layer_error.png drew one release twice (its lock report and a bench copy), gain_vs_ratio.png joined two
    measured ratios with a line, frontier.png's caption named strategies that are not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightlock import report as R

    errs = [0.1, 0.2, 0.3]
    found = {schema.LOCK_FIDELITY: [(None, {"ranks": [{"rank": 8, "layer_rel_error": errs}]})],
             schema.DEMO: [(None, {"layer_rel_error": list(errs), "capability": {"dlr": {}}})]}
    (demo,) = R._defense_parts(found)  # DLR-Lock's panels: the demo's per-layer errors
    assert demo == R.Panels("layer_error.png", [("demo", errs)])
    assert R._unique_layer_errors(R._layer_errors(found) + demo.items) == [("bench rank 8", errs)]
    fig, ax = plt.subplots()
    rows = [{"ratio": 0.3, "task": "prose", "method": "full", "gain": 0.5},
            {"ratio": 1.0, "task": "prose", "method": "full", "gain": 0.6}]
    R._draw_gain(ax, ("bench", "prose", rows))
    assert [line.get_linestyle() for line in ax.lines] == ["None"]
    plt.close(fig)
    caption = next(R._caption(f) for f in R.FIGURES if f.file == "frontier.png")
    assert caption.startswith("Memory–time frontier")
    assert all(len(R._caption(f)) > 80 for f in R.FIGURES)  # every built-in figure has its caption (from the JSON)
    assert "offload" not in caption and "micro-batching" not in caption
