"""The demo's tables as rows of strings, shared by the terminal summary (``weightlock.demo``) and the
report (``weightlock.report``), so both show the same numbers the same way; and the parts a report is made
of (:class:`Table`, :class:`Figure`, :class:`Panels`), which defenses' report hooks return."""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

# demo summaries recorded before defenses were plug-ins list no "defenses": these were the two
LEGACY_DEFENSES = [{"name": "dlr", "title": "DLR-Lock", "label": "DLR-locked"},
                   {"name": "pmp", "title": "PMP", "label": "PMP (hardened)"}]
REFERENCE_LABEL = "original (dense)"

CAPABILITY_HEAD = ["model", "code (pretraining domain)", "prose"]
ATTACK_HEAD = ["defense", "attack", "task", "gain", "reference gain", "gain ratio", "activation ×", "memory ×",
               "RSS peak ×", "time ×"]
ATTACK_CAPTION = ("activation × = saved-activation bytes of a step ÷ the same attack's on the original; memory × = "
                  "training memory (parameters + gradients + optimizer state + saved activations, counted) ÷ the "
                  "original's full fine-tune's: ≤ 1.00 fits within the original's memory, as the verdicts count it; "
                  "RSS peak × = the runs' measured peak growth (allocator-dependent, never the budget)")


def fmt(v, spec: str) -> str:
    """``v`` formatted with ``spec``; ``n/a`` for a missing or NaN value."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def defenses_of(summary: dict) -> list[dict]:
    """The defenses a demo summary covers, in run order: ``{name, title, label, ...}`` each."""
    recorded = summary.get("defenses")
    if recorded:
        return recorded
    return [d for d in LEGACY_DEFENSES if d["name"] in summary.get("capability", {})]


def capability_rows(summary: dict) -> list[list[str]]:
    """One row per model: the original, then each defense's release (validation perplexity)."""
    cap = summary["capability"]
    models = [("reference", REFERENCE_LABEL)] + [(d["name"], d["label"]) for d in defenses_of(summary)]
    return [[label, f"{cap[k]['code']:.2f}", f"{cap[k]['prose']:.2f}"] for k, label in models if k in cap]


def memory_cell(row: dict) -> str:
    """A row's ``memory ×`` (training memory ÷ the original full fine-tune's): ``>1.00`` where the ratio is
    above 1 but would print as 1.00, so the cell never shows an attack that does not fit as fitting; ``n/a``
    for rows recorded before weightlock counted training memory."""
    ratio = row.get("training_memory_ratio")
    if ratio is None:
        return "n/a"
    text = f"{ratio:.2f}"
    return ">1.00" if row.get("fits_memory") is False and float(text) <= 1 else text


def attack_rows(summary: dict) -> list[list[str]]:
    """One row per attack on a defense (the reference runs on the original are the denominators)."""
    return [[r["defense"], r["attack"], r["task"], f"{r['gain']:+.4f}", f"{r['reference_gain']:+.4f}",
             fmt(r["gain_ratio"], ".2f"), fmt(r["memory_ratio"], ".2f"), memory_cell(r),
             fmt(r.get("peak_ratio"), ".2f"), fmt(r["time_ratio"], ".2f")]
            for r in summary["attacks"] if r["defense"] != "reference"]


# ---- the parts of a report (weightlock.report; a defense's DefenseHooks.report returns them) ----------

class Table(NamedTuple):
    """A table of the report: its title, column heads and rows of strings."""

    title: str
    head: list[str]
    rows: list[list[str]]


class Figure(NamedTuple):
    """A figure of the report, one PNG: one subplot per panel, ``draw(ax, panel)`` drawing each.

    ``panels``: in a registered :class:`Section`, a function of the records found (record kind → [(path,
    record)]) returning its items; in what a defense's :meth:`~weightlock.defenses.DefenseHooks.report` returns,
    the items themselves. ``arrange(items) -> panels`` turns the items (the records', then those defenses add
    with :class:`Panels`) into the panels (default: one panel per item). ``file`` is the PNG's name (a name
    already taken gets a suffix); ``size`` one panel's inches; ``cols`` the panels per row (default: all)."""

    file: str
    title: str
    panels: Callable[[dict], list] | list
    draw: Callable[[Any, Any], None]
    size: tuple[float, float] = (5, 3.8)
    cols: int | None = None
    caption: str | None = ""  # None: the built-in figure's caption from report_captions.json
    arrange: Callable[[list], list] | None = None


class Panels(NamedTuple):
    """Items a defense adds to a registered figure (its ``file``), drawn after the records' own."""

    figure: str
    items: list
