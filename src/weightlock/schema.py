"""What every result JSON weightlock writes says about itself: its ``kind`` and ``schema_version``.

Readers (the report) dispatch on ``kind`` instead of guessing from a file's fields; files written before
these keys existed carry neither and are still recognised by content (see ``weightlock.report``).
"""
from __future__ import annotations

from typing import Any

from .errors import WeightlockError

SCHEMA_VERSION = 1

# the kinds of result files; a bench script's result is ``bench.<name>`` (see bench/common.py)
DEMO = "demo"  # weightlock demo: summary.json
ATTACK_RUN = "attack_run"  # run_attack: result.json
ATTACK_SUITE = "attack_suite"  # run_suite: summary.json
LOCK_REPORT = "lock_report"  # weightlock lock: lock_report.json in the release
PMP_RUN = "pmp_run"  # PMP pretraining: pmp_run.json
DEFENSE_BUILD = "defense_build"  # a defense's finished build (weightlock.defenses)
BENCH_PREFIX = "bench."


def stamp(kind: str, obj: dict) -> dict:
    """``obj`` with its ``kind`` and the current ``schema_version`` (a new dict; ``obj`` is unchanged)."""
    return {**obj, "kind": kind, "schema_version": SCHEMA_VERSION}


def bench_kind(name: str) -> str:
    """The ``kind`` of the result of the bench script ``name`` (``bench.NAME``)."""
    return BENCH_PREFIX + name


def kind_of(data: Any, source: object = "result") -> str | None:
    """The recorded kind of a result (None for data without one: an old file, or not weightlock's).

    A file from a newer schema than this weightlock reads is an error that says to upgrade."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or "schema_version" not in data:
        return None
    version = data["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise WeightlockError(f"{source}: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise WeightlockError(f"{source}: written with result schema {version}, this weightlock reads up to "
                              f"{SCHEMA_VERSION}; upgrade weightlock to read it")
    return data["kind"]
