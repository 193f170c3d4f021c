"""A report any defense can fill: a plug-in defense installed through an entry point is built, attacked and drawn
in the HTML report with its own table and figure (``DefenseHooks.report``); without its hook the same summary
gets the generic section."""
import json
import sys
import textwrap

import pytest

PLUGIN = '''
import shutil
from dataclasses import dataclass
from pathlib import Path

from weightlock.defenses import Defense, DefenseConfig, DefenseHooks, DefenseInfo
from weightlock.defenses.plan import FULL


@dataclass
class CopyConfig(DefenseConfig):
    tag: str = "plain"


def draw_gains(ax, gains):
    ax.bar(list(gains), list(gains.values()), color="C2")
    ax.set_ylabel("gain on the copy")


class CopyHooks(DefenseHooks):
    def summarize(self, rows, out, plan):
        return {"wl_copy_gains": {r["task"]: r["gain"] for r in rows if r["defense"] == self.defense.name}}

    def report(self, summary):
        from weightlock.report import Figure, Table

        gains = summary["wl_copy_gains"]
        return [Table("Copy plug-in: gains by task", ["task", "gain"], [[t, f"{g:+.4f}"] for t, g in gains.items()]),
                Figure("copy_gains.png", "Copy plug-in: its own figure", [gains], draw_gains, (4, 3),
                       caption="Drawn by the copy plug-in's report hook.")]


class CopyDefense(Defense):
    """A plug-in defense that releases a plain copy of the model."""

    spec = DefenseInfo(Config=CopyConfig, title="Copy", description="a plain copy (a report plug-in test)",
                       attacks=(FULL,), hooks=CopyHooks)

    def apply(self, source, out):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(source).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return out
'''

SPEC = """\
name: report-plugin
models:
  - {{preset: tiny, path: {model}, name: tiny}}
defenses:
  wlcopy: {{}}
attacks:
  full: {{lr: [1.0e-3], options: {{eval_tokens: 2048}}}}
tasks: [prose]
seeds: [0]
budget: {{steps: 2, batch: 2, score_every: 1, patience: 0}}
measure: {{capability_tokens: 1024, memory_depths: [2, 4], report: true}}
"""


@pytest.fixture
def copy_plugin(tmp_path, monkeypatch):
    """The plug-in installed on a sys.path entry (a module and its dist-info with the entry point), and the
    defense registry made to read its entry points again; both undone afterwards."""
    from weightlock.defenses import DEFENSES

    site = tmp_path / "site"
    info = site / "wl_report_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wl-report-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [weightlock.defenses]
        wlcopy = wl_report_plugin:CopyDefense
        """))
    (site / "wl_report_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(DEFENSES, "_plugins_loaded", False)
    yield DEFENSES
    DEFENSES.pop("wlcopy", None)
    sys.modules.pop("wl_report_plugin", None)


def test_entry_point_defense_is_built_attacked_and_drawn_in_the_report(tmp_path, tiny_model_dir, copy_plugin):
    from weightlock.experiments import run_experiment
    from weightlock.report import build_report

    assert "wlcopy" in copy_plugin and copy_plugin["wlcopy"].__module__ == "wl_report_plugin"  # the entry point
    model, _ = tiny_model_dir
    spec = tmp_path / "plug.yaml"
    spec.write_text(SPEC.format(model=model))
    out = tmp_path / "run"
    summary = run_experiment(spec, out)["tiny"]

    # built and attacked
    assert [d["name"] for d in summary["defenses"]] == ["wlcopy"]
    assert json.loads((out / "wlcopy-tiny.defense.json").read_text())["release"] == str(out / "wlcopy-tiny")
    (row,) = [r for r in summary["attacks"] if r["defense"] == "wlcopy"]
    assert (row["attack"], row["task"]) == ("full", "prose") and len(row["curve"]) >= 2
    assert summary["wl_copy_gains"] == {"prose": row["gain"]}

    # drawn: the plug-in's own table (its numbers) and figure, beside the built-in sections
    rep = out / "report"
    page = (rep / "index.html").read_text()
    table = page[page.index("<h2>Copy plug-in: gains by task</h2>"):]
    assert table.startswith(f"<h2>Copy plug-in: gains by task</h2><table><tr><th>task</th><th>gain</th></tr>"
                            f"<tr><td>prose</td><td>{row['gain']:+.4f}</td></tr></table>")
    assert ('<h2>Copy plug-in: its own figure</h2><figure><img src="copy_gains.png" '
            'alt="Copy plug-in: its own figure"><figcaption>Drawn by the copy plug-in&#x27;s report hook.'
            '</figcaption></figure>') in page
    assert (rep / "copy_gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="curves.png"' in page and "Capability (" in page
    assert "what the summary records" not in page  # the plug-in brought its parts: no generic section

    # the same summary where the plug-in is not installed: the generic section instead, never skipped
    copy_plugin.pop("wlcopy")
    page = build_report([out], tmp_path / "rep2").read_text()
    assert "Copy plug-in" not in page and "<h2>Copy (wlcopy): what the summary records</h2>" in page
    assert '<img src="wlcopy_gain.png" alt="Copy: attacker gain on the release vs on the original">' in page
    assert (tmp_path / "rep2" / "wlcopy_gain.png").stat().st_size > 2000


def test_a_registered_record_kind_brings_its_own_section(tmp_path):
    """A new record kind and its section (what a plug-in registers, or names in the entry-point group
    ``weightlock.report``): its records are drawn by its tables and figures, after the built-in ones."""
    from weightlock import report as R
    from weightlock import schema

    def draw(ax, item):
        ax.plot(item["xs"], item["ys"], "o-")

    kind = schema.register_kind(schema.RecordKind("wl_test_sweep", "a test sweep"))
    R.register_section("wl_test_sweep", R.Section(
        (kind.name,), "a test sweep",
        lambda found: [R.Table("Test sweep: points", ["x", "y"], [[str(x), str(y)] for _, d in found[kind.name]
                                                                  for x, y in zip(d["xs"], d["ys"])])],
        (R.Figure("sweep.png", "Test sweep: y vs x", lambda found: [d for _, d in found.get(kind.name, [])], draw,
                  caption="A registered kind's own figure."),)))
    try:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "s.json").write_text(json.dumps(schema.stamp(kind.name, {"xs": [1, 2], "ys": [3, 5]})))
        index = R.build_report([tmp_path / "in"], tmp_path / "rep")
        md = index.with_name("README.md").read_text()
        assert "## Test sweep: points" in md and "| 2 | 5 |" in md and "![Test sweep: y vs x](sweep.png)" in md
        assert "no report section" not in md and (tmp_path / "rep" / "sweep.png").stat().st_size > 2000
        assert R.drawn()[kind.name] == ["sweep.png", "table: a test sweep"]
    finally:
        R.SECTIONS.pop("wl_test_sweep", None)
        schema.RECORD_KINDS.pop(kind.name, None)
