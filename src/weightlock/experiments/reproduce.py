"""Does a rerun reproduce a record? A recorded result (one run, e.g. ``bench/results/pmp_recovery.json``) against
the same spec rerun at several seeds (``weightlock run SPEC --seed N``): for each of the record's headline
figures, the reruns' mean, standard deviation and range, and the 95% prediction interval of one more run
(mean ± t₀.₉₇₅,ₙ₋₁ · s · √(1 + 1/n)): the record is reproduced when every figure lies inside its interval.

The headline figures of a record kind are the ``figures`` its analysis registers (dotted paths with ``*``
wildcards; a list of rows is keyed by the row's ``rank``/``label``/``name``/``attack`` field, else its index)::

    weightlock run pmp-recovery --seed 1      # writes runs/pmp-recovery-seed1/results/pmp_recovery.json; 2, 3 too
    weightlock compare bench/results/pmp_recovery.json runs/pmp-recovery-seed*/results/pmp_recovery.json
"""
from __future__ import annotations

import fnmatch
import math
from numbers import Real

from ..errors import WeightlockError

# two-sided 95% Student t quantiles, 1-30 degrees of freedom (beyond: 1.96, the normal quantile)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
ROW_KEYS = ("rank", "label", "name", "attack")


def _row_key(rows: list) -> str | None:
    """The field that names ``rows`` (the first of ROW_KEYS every row has, distinct across rows), or None."""
    for k in ROW_KEYS:
        names = [str(x.get(k)) if isinstance(x, dict) and x.get(k) is not None else None for x in rows]
        if None not in names and len(set(names)) == len(names):
            return k
    return None


def flatten(record, prefix: str = "") -> dict[str, float]:
    """Every number in ``record`` by its dotted path (booleans and non-finite numbers left out); a list of rows
    that one field names (``rank``...) is keyed by that field, which is then not a figure itself."""
    out: dict[str, float] = {}
    if isinstance(record, dict):
        items = record.items()
    elif isinstance(record, list):
        key = _row_key(record) if record else None
        items = [(str(x[key]), {k: v for k, v in x.items() if k != key}) if key else (str(i), x)
                 for i, x in enumerate(record)]
    else:
        if isinstance(record, Real) and not isinstance(record, bool) and math.isfinite(record):
            out[prefix] = float(record)
        return out
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def figures(record: dict, patterns) -> dict[str, float]:
    """The numbers of ``record`` whose dotted path matches one of ``patterns`` (fnmatch: ``*`` spans dots)."""
    return {k: v for k, v in flatten(record).items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def compare(recorded: dict, reruns: list[dict], patterns) -> dict:
    """Each headline figure of ``recorded`` against its values in ``reruns``: mean, std, range, the 95%
    prediction interval and whether the recorded value lies inside (``within``; None with fewer than two
    reruns holding the figure; reruns that all agree get an interval of float rounding, 1e-9 relative).
    ``reproduced``: every judged figure lies inside (None when none is judged); ``counts``: figures, judged,
    inside and beyond the reruns' range."""
    if not patterns:
        raise WeightlockError("no figures to compare: name them with --figure (dotted paths, * wildcards)")
    mine = figures(recorded, patterns)
    if not mine:
        raise WeightlockError(f"the record has no figure matching {', '.join(patterns)}")
    theirs = [flatten(r) for r in reruns]
    rows = []
    for key, value in mine.items():
        vals = [f[key] for f in theirs if key in f]
        row = {"figure": key, "recorded": value, "reruns": vals, "n": len(vals)}
        if len(vals) >= 2:
            n = len(vals)
            mean = sum(vals) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
            half = max((T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd * math.sqrt(1 + 1 / n),
                       1e-9 * abs(mean))
            row.update(mean=mean, std=sd, min=min(vals), max=max(vals), low=mean - half, high=mean + half,
                       within=mean - half <= value <= mean + half, in_range=min(vals) <= value <= max(vals))
        else:
            row["within"] = None
        rows.append(row)
    judged = [r for r in rows if r["within"] is not None]
    counts = {"figures": len(rows), "judged": len(judged), "inside": sum(bool(r["within"]) for r in judged),
              "beyond_range": sum(not r["in_range"] for r in judged)}
    return {"counts": counts, "figures": rows, "patterns": list(patterns), "reruns": len(reruns),
            "outside": [r["figure"] for r in judged if not r["within"]],
            # beyond the reruns' own range: for one more draw from the same spread, expected 2/(n+1) of the time
            "outside_range": [r["figure"] for r in judged if not r["in_range"]],
            "reproduced": all(r["within"] for r in judged) if judged else None}


def headline_patterns(kind: str | None = None, analysis: str | None = None) -> tuple[str, ...]:
    """The headline figures the analysis ``analysis`` registers, or the one that writes records of ``kind``
    (empty when none does)."""
    from .analyses import ANALYSES

    if analysis is not None:
        return ANALYSES.get(analysis).figures
    for name in ANALYSES.names():
        a = ANALYSES.get(name)
        if kind is not None and a.kind == kind and a.figures:
            return a.figures
    return ()
