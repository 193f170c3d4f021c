"""The README and the docs site: the README stays short and starts with the two commands, its links into docs/
resolve, every `weightlock ...` command shown parses with the CLI's own parser, and the results page is rendered
from the recorded JSON (docs/hooks.py), never typed by hand. `make test` also builds the site with
`mkdocs build --strict`, which checks every link and anchor inside docs/."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import typer

from weightlock.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FIRST_BLOCK = """```bash
make demo    # creates .venv, installs weightlock (CPU torch 2.13.0), runs `weightlock demo` on the built-in corpus
make test    # creates .venv, installs weightlock with test extras, runs `ruff check` and the test suite (pytest -q)
```"""


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def load_hooks():
    spec = importlib.util.spec_from_file_location("weightlock_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- (a) the README


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, f"README.md has {len(text.splitlines())} lines; the cap is 300"
    assert text.startswith("# weightlock\n\n" + FIRST_BLOCK + "\n")


# ---------------------------------------------------------------- (b) links


def slug(heading: str) -> str:
    """The anchor MkDocs' toc gives a heading (the site is what the links are read on)."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lstrip("#").strip())
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    out, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            out.add(slug(line))
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            # the docs site publishes bench/results/* under bench-results/ (docs/hooks.py, on_files)
            if path.parent == DOCS and file.startswith("bench-results/"):
                dest = ROOT / "bench" / "results" / file.split("/", 1)[1]
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no file)")
                continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.name}: {target} (no heading with that anchor)")
    return bad


def test_readme_and_docs_links_resolve():
    assert any(t.startswith("docs/") for t in links(README)), "the README links into docs/"
    bad = [b for page in pages() for b in broken_links(page)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page.write_text("[ok](other.md#a-section) [gone](missing.md) [no anchor](other.md#nowhere) `[code](x.md)`\n")
    assert broken_links(page) == ["page.md: missing.md (no file)",
                                  "page.md: other.md#nowhere (no heading with that anchor)"]


# ---------------------------------------------------------------- (c) every command shown parses


def shell_lines(path: Path):
    """Every shell line of the page's code blocks (continuations joined), with its line number."""
    text = path.read_text()
    for m in re.finditer(r"^```([\w-]*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) not in ("", "bash", "sh", "shell", "text", "console"):
            continue
        first = text.count("\n", 0, m.start()) + 2
        joined, start = "", None
        for i, line in enumerate(m.group(2).splitlines()):
            start = first + i if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            yield start, joined + line
            joined, start = "", None


def weightlock_argv(line: str) -> list[str] | None:
    """The arguments a shown command gives weightlock's CLI, or None for another command or a placeholder."""
    if re.search(r"\.\.\.|…|<[^>]*>|\[", line):
        return None
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # OMP_NUM_THREADS=1 weightlock ...
        words = words[1:]
    if words and words[0] == "weightlock":
        return words[1:]
    if "weightlock.cli" in words and words[words.index("weightlock.cli") - 1] == "-m":  # torchrun / accelerate
        return words[words.index("weightlock.cli") + 1 :]
    return None


def parse(argv: list[str]) -> None:
    """Parse argv with the CLI's own click parser, down to the subcommand, without running anything."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("weightlock", list(argv))
    while hasattr(cmd, "resolve_command"):  # a group: on to the subcommand
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)


def shown_commands():
    for path in pages():
        for lineno, line in shell_lines(path):
            argv = weightlock_argv(line)
            if argv is not None:
                yield f"{path.relative_to(ROOT)}:{lineno}", argv


def test_every_shown_weightlock_command_parses():
    commands = list(shown_commands())
    assert len(commands) >= 30, "the docs show the CLI: the extraction found too few commands"
    bad = []
    for where, argv in commands:
        try:
            parse(argv)
        except typer.Exit:  # --help, --version: parsed, then exit 0
            pass
        except typer.TyperException as e:  # typer's click: UsageError, BadParameter, NoSuchOption, ...
            bad.append(f"{where}: weightlock {shlex.join(argv)}\n    {e.format_message()}")
    assert not bad, "commands in the docs that the CLI refuses:\n" + "\n".join(bad)


def test_the_command_check_refuses_a_wrong_command():
    assert weightlock_argv("OMP_NUM_THREADS=1 weightlock lock --model m --out o   # note") == ["lock", "--model", "m",
                                                                                          "--out", "o"]
    assert weightlock_argv("torchrun --nproc-per-node 2 -m weightlock.cli lock --model m") == ["lock", "--model", "m"]
    assert weightlock_argv("weightlock pretrain ... --resume") is None
    assert weightlock_argv("python bench/frontier.py") is None
    parse(["lock", "--model", "runs/base", "--rank", "32", "--out", "runs/locked"])
    for wrong in (["lock", "--model", "m", "--rnak", "32"], ["lokc", "--model", "m"], ["lock", "--rank", "many"]):
        with pytest.raises(typer.TyperException):
            parse(wrong)


# ---------------------------------------------------------------- (d) the results are generated


def test_results_page_is_generated_from_the_recorded_json():
    hooks = load_hooks()
    page = (DOCS / "results.md").read_text()
    assert re.sub(r"\{\{\s*results_page\(\)\s*\}\}", "", page).strip() == "# Results", \
        "the results page holds only the generated figures"
    record = json.loads((ROOT / "bench" / "results" / "real_lock_smollm2.json").read_text())
    value = record["manifest_fidelity"]["by_data"]["builtin:prose"]["lock"]["ppl_ratio"]
    path = "manifest_fidelity.by_data.builtin:prose.lock.ppl_ratio"
    assert hooks.result("real_lock_smollm2", path) == f"{value:.4g}"
    rendered = hooks.results_page()
    assert f"| `{path}` | {value:.4g} |" in rendered
    assert f"| `wall_seconds` | {record['wall_seconds']:.4g} |" in rendered
    assert "{{" not in hooks.expand(page)


def test_the_generator_follows_the_json_it_reads(tmp_path):
    """Rendered from another root, the figures are that root's: change the record and the page changes."""
    hooks = load_hooks()
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "toy.json").write_text(json.dumps({"kind": "bench.toy", "speed": {"decode_ratio": 1.0251},
                                                  "rows": [{"rank": 32, "ppl": 0.99971}]}))
    assert hooks.result("toy", "speed.decode_ratio", root=tmp_path) == "1.025"
    assert hooks.result("toy", "rows.0.ppl", "{:.2f}", root=tmp_path) == "1.00"
    assert "| `speed.decode_ratio` | 1.025 |" in hooks.results_page(tmp_path)
    assert "| 32 | 0.9997 |" in hooks.results_page(tmp_path)
    (results / "toy.json").write_text(json.dumps({"speed": {"decode_ratio": 1.5}}))
    assert hooks.expand('x {{ result("toy", "speed.decode_ratio") }} y', tmp_path) == "x 1.5 y"
    for name, path in (("toy", "speed.prefill_ratio"), ("gone", "speed"), ("toy", "speed")):
        with pytest.raises(hooks.ResultError):
            hooks.result(name, path, root=tmp_path)
