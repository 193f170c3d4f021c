"""MkDocs hook: every measured figure on the site is rendered from the recorded JSON at build time.

Registered in mkdocs.yml (`hooks: [docs/hooks.py]`). It does three things:

* `on_files` publishes every `bench/results/*` file under `bench-results/` on the site, so a page links to
  the record a figure comes from (`[record](bench-results/NAME.json)`) and the link is checked by
  `mkdocs build --strict`;
* `on_page_markdown` expands two macros in any page:
  `{{ result("NAME", "dotted.path") }}` is the value at that path of `bench/results/NAME.json`
  (`demo_summary` is `docs/demo/summary.json`), formatted by `fmt` or by an optional format spec
  (`{{ result("NAME", "a.b", "{:.3f}") }}`); path parts are dict keys or list indices;
  `{{ results_page() }}` is the whole results page, one section per record;
* a macro that names a record or a path that does not exist fails the build (`PluginError`): a page can
  not quote a figure its record no longer holds.

The functions take the repository root as an argument, so tests render from a directory of their own.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("bench") / "results"
DEMO_SUMMARY = Path("docs") / "demo" / "summary.json"
SITE_RESULTS = "bench-results"  # where bench/results/* are published on the site

MAX_ROWS = 60
MAX_COLUMNS = 14
MAX_TEXT = 240
MAX_SCALARS = 120

MACRO = re.compile(r"\{\{\s*(result|results_page)\((.*?)\)\s*\}\}")


class ResultError(LookupError):
    """A macro names a record or a path that the recorded JSON does not hold."""


# ---------------------------------------------------------------- reading


def record_paths(root: Path = ROOT) -> dict[str, Path]:
    """Every record the site renders: NAME -> file (bench/results/NAME.json, and demo_summary)."""
    paths = {p.stem: p for p in sorted((Path(root) / RESULTS).glob("*.json"))}
    demo = Path(root) / DEMO_SUMMARY
    if demo.exists():
        paths["demo_summary"] = demo
    return paths


def load_record(name: str, root: Path = ROOT):
    paths = record_paths(root)
    if name not in paths:
        raise ResultError(f"no recorded result {name!r} (known: {', '.join(paths)})")
    return json.loads(paths[name].read_text())


def lookup(data, path: str):
    """The value at a dotted path: dict keys, or list indices (`runs.0.gain`)."""
    value = data
    for part in path.split(".") if path else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise ResultError(f"path {path!r}: no {part!r} here")
    return value


# ---------------------------------------------------------------- formatting


def fmt(value) -> str:
    """One value as a table cell: floats to 4 significant digits, NaN/inf spelled out."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    if isinstance(value, str):
        text = " ".join(value.split())
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT - 1] + "…"
        return text.replace("|", "\\|").replace("{{", "{ {")
    if isinstance(value, list):
        return summarize_list(value)
    return fmt(json.dumps(value, sort_keys=True))


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def summarize_list(values: list) -> str:
    if all(is_scalar(v) for v in values):
        if len(values) <= 8:
            return ", ".join(fmt(v) for v in values)
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        finite = [v for v in nums if not math.isnan(v)]
        if len(nums) == len(values) and finite:
            return f"{len(values)} values, {fmt(min(finite))} … {fmt(max(finite))}"
        return f"{len(values)} values: " + ", ".join(fmt(v) for v in values[:4]) + ", …"
    return f"{len(values)} entries"


def result(name: str, path: str, spec: str | None = None, root: Path = ROOT) -> str:
    """What the macro `{{ result(NAME, PATH[, SPEC]) }}` expands to."""
    value = lookup(load_record(name, root), path)
    if spec is not None:
        return spec.format(value)
    if not is_scalar(value):
        raise ResultError(f"{name}: {path!r} is not a single value")
    return fmt(value)


def flatten(data, prefix: str = "", depth: int = 0, tables: list | None = None):
    """Scalar leaves as (dotted key, value); lists of dicts are collected into `tables` instead."""
    items = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and depth < 4:
            items += flatten(value, name + ".", depth + 1, tables)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if tables is not None:
                tables.append((name, value))
            else:
                items.append((name, f"{len(value)} entries"))
        elif isinstance(value, dict):
            items.append((name, "—" if not value else f"{len(value)} entries"))
        else:
            items.append((name, value))
    return items


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def render_rows(name: str, rows: list[dict]) -> list[str]:
    flat = [dict(flatten(r, depth=2)) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns += [k for k in r if k not in columns]
    shown = columns[:MAX_COLUMNS]
    out = [f"**{name}** ({len(rows)} rows)", ""]
    out += table(shown, [[fmt(r.get(c)) if c in r else "" for c in shown] for r in flat[:MAX_ROWS]])
    notes = []
    if len(rows) > MAX_ROWS:
        notes.append(f"first {MAX_ROWS} of {len(rows)} rows")
    if len(columns) > len(shown):
        notes.append(f"{len(columns) - len(shown)} more columns: {', '.join(columns[len(shown):])}")
    if notes:
        out += ["", f"*Shown: {'; '.join(notes)} — the rest is in the record.*"]
    return out + [""]


def render_record(name: str, path: Path, data, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    link = f"{SITE_RESULTS}/{path.name}" if path.parent == Path(root) / RESULTS else "demo/summary.json"
    out = [f"## {name}", "", f"Record: [`{rel}`]({link})"]
    if not isinstance(data, dict):
        return out + ["", fmt(data), ""]
    if data.get("kind"):
        out[-1] += f" · kind `{data['kind']}`, schema {data.get('schema_version', '—')}"
    out.append("")
    if isinstance(data.get("command"), str):
        out += ["```text", data["command"], "```", ""]
    machine = data.get("machine")
    if isinstance(machine, dict):
        out += ["Machine: " + "; ".join(f"{k} {fmt(v)}" for k, v in flatten(machine)), ""]
    tables: list = []
    body = {k: v for k, v in data.items() if k not in ("command", "machine", "kind", "schema_version")}
    markdown_tables = {k: body.pop(k) for k in list(body)
                       if isinstance(body[k], str) and body[k].lstrip().startswith("|")}
    scalars = flatten(body, tables=tables)
    if scalars:
        out += table(["field", "value"], [[f"`{k}`", fmt(v)] for k, v in scalars[:MAX_SCALARS]])
        if len(scalars) > MAX_SCALARS:
            out += ["", f"*Shown: first {MAX_SCALARS} of {len(scalars)} fields — the rest is in the record.*"]
        out.append("")
    for key, text in markdown_tables.items():  # tables the bench itself rendered (plan_table.json → table)
        out += [f"**{key}** (as the bench rendered it)", "", text.strip(), ""]
    for key, rows in tables:
        out += render_rows(key, rows)
    return out


def results_page(root: Path = ROOT) -> str:
    """The whole results page: one section per record, every figure read from its JSON."""
    paths = record_paths(root)
    out = [
        f"Every figure below is read from the {len(paths)} recorded JSON files when the site is built "
        "(`docs/hooks.py`); none is typed by hand. Floats are shown to 4 significant digits; "
        "the linked record holds the full values.",
        "",
        "| record | kind | machine |",
        "|---|---|---|",
    ]
    records = {}
    for name, path in paths.items():
        records[name] = data = json.loads(path.read_text())
        kind = data.get("kind", "—") if isinstance(data, dict) else "—"
        machine = data.get("machine", {}) if isinstance(data, dict) else {}
        machine = machine if isinstance(machine, dict) else {}
        when = ", ".join(fmt(machine[k]) for k in ("date", "cpu", "torch") if k in machine)
        out.append(f"| [{name}](#{slug(name)}) | {fmt(kind)} | {when or '—'} |")
    out.append("")
    for name, path in paths.items():
        out += render_record(name, path, records[name], root)
    return "\n".join(out)


def slug(text: str) -> str:
    """The anchor Python-Markdown's toc gives a heading of this text."""
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def expand(markdown: str, root: Path = ROOT) -> str:
    """Expand every `{{ result(...) }}` and `{{ results_page() }}` macro in a page's Markdown."""

    def one(match: re.Match) -> str:
        fn, args = match.group(1), match.group(2).strip()
        try:
            values = ast.literal_eval(f"({args},)") if args else ()
        except (ValueError, SyntaxError) as e:
            raise ResultError(f"cannot read the macro {match.group(0)!r}: {e}") from None
        if fn == "results_page":
            return results_page(root)
        return result(*values, root=root)

    return MACRO.sub(one, markdown)


# ---------------------------------------------------------------- MkDocs events


def on_files(files, config):
    from mkdocs.structure.files import File

    for path in sorted((ROOT / RESULTS).iterdir()):
        if path.is_file():
            files.append(File.generated(config, f"{SITE_RESULTS}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown)
    except ResultError as e:
        raise PluginError(f"{page.file.src_uri}: {e}") from None
