"""What every result JSON weightlock writes says about itself: its ``kind`` and ``schema_version``.

Readers (the report) dispatch on ``kind`` instead of guessing from a file's fields, through the registry of
record kinds at the end of this module (:data:`RECORD_KINDS`, :func:`record_kind`): each kind a reader knows,
the kinds the same records carried before (``bench.NAME``), and how to recognise a file written before
results carried a kind at all, by its fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import WeightlockError
from .registry import DuplicateName, Registry

SCHEMA_VERSION = 1

# the kinds of result files; a bench result saved without a kind is ``bench.<name>``
# (weightlock.experiments.harness.save), a record no reader draws
DEMO = "demo"  # weightlock demo: summary.json
ATTACK_RUN = "attack_run"  # run_attack: result.json
ATTACK_SUITE = "attack_suite"  # run_suite: summary.json
LOCK_REPORT = "lock_report"  # weightlock lock: lock_report.json in the release
PMP_RUN = "pmp_run"  # PMP pretraining: pmp_run.json
DEFENSE_BUILD = "defense_build"  # a defense's finished build (weightlock.defenses)
ATTACK_RECORD = "attack_record"  # one typed AttackRun record (weightlock.eval.records): record.json
EXPERIMENT_SPEC = "experiment_spec"  # the resolved spec an experiment ran (weightlock run): spec.json
BENCH_PREFIX = "bench."
# records of measurements, named for what they hold (written by the scripts in bench/; drawn by the report)
ATTACK_CURVES = "attack_curves"  # every attack × task × seed, score curves on the lock and on the original
MEMORY_VS_DEPTH = "memory_vs_depth"  # saved-activation meter: MLP vs DLR-Net, bytes vs DLR depth, model steps
MEMORY_TIME_FRONTIER = "memory_time_frontier"  # activation memory vs step time per memory-saving strategy
PMP_GAIN_VS_RATIO = "pmp_gain_vs_ratio"  # fine-tuning gains of a PMP model per mask ratio and method
MASK_RECOVERY = "mask_recovery"  # IoU of the PMP masks attacks recover, against chance
LOCK_FIDELITY = "lock_fidelity"  # DLR-Lock per rank: per-layer error, perplexity ratio, lock time
LOCK_COST = "lock_cost"  # attacks to convergence on locks and originals: the lock cost multiplier
LOCK_REGIME = "lock_regime"  # DLR-Lock rank sweep: memory, time and gain multipliers per rank
REAL_LOCK = "real_lock"  # DLR-Lock on a real LLM: fidelity against the bars, lock time, speed
REAL_ATTACKS = "real_attacks"  # the red team on a real LLM: score curves and cost multipliers
ERROR_BUDGET = "error_budget"  # a real LLM with every MLP at a scaled DLR error: fidelity vs layer error

# kinds whose schema moved past SCHEMA_VERSION (the others are at SCHEMA_VERSION):
# attack_run 2: the attacked model's run is stored under "target" (1: under "locked", still read)
KIND_VERSIONS = {ATTACK_RUN: 2}


def schema_version(kind: str) -> int:
    """The schema version this weightlock writes for ``kind`` (and the newest it reads)."""
    return KIND_VERSIONS.get(kind, SCHEMA_VERSION)


def stamp(kind: str, obj: dict) -> dict:
    """``obj`` with its ``kind`` and that kind's current ``schema_version`` (a new dict; ``obj`` is unchanged)."""
    return {**obj, "kind": kind, "schema_version": schema_version(kind)}


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
    newest = schema_version(data["kind"])
    if version > newest:
        raise WeightlockError(f"{source}: written with result schema {version}, this weightlock reads up to "
                              f"{newest}; upgrade weightlock to read it")
    return data["kind"]


def target_run(result: dict, source: object = "result") -> dict:
    """The attacked model's run in an attack's ``result.json``: ``"target"`` (schema 2), or ``"locked"`` as
    records written before schema 2 of ``attack_run`` call it (the attacked model, locked or not)."""
    run = result.get("target", result.get("locked")) if isinstance(result, dict) else None
    if not isinstance(run, dict):
        raise WeightlockError(f"{source}: no attacked model's run (neither 'target' nor 'locked') in the result")
    return run


# ---- the record kinds weightlock reads --------------------------------------------------------------

@dataclass(frozen=True)
class RecordKind:
    """A kind of result record a reader of this library understands: its ``name`` (the recorded ``kind``),
    what it holds, the kinds the same records carried when written before (``aliases``, and ``alias_prefix``
    for a family of them: ``bench.real_model_NAME``) and, for files from before results carried a kind at
    all, how to ``recognise`` one by its fields."""

    name: str
    what: str
    aliases: tuple[str, ...] = ()
    alias_prefix: str | None = None
    recognise: Callable[[dict], bool] | None = None


RECORD_KINDS: Registry[RecordKind] = Registry("record kind", RecordKind, instances=True)
_ALIASES: dict[str, str] = {}


def register_kind(kind: RecordKind) -> RecordKind:
    """Add ``kind`` to the record kinds readers resolve (:func:`record_kind`); a name or alias already taken
    is an error (:class:`weightlock.registry.DuplicateName`)."""
    taken = [n for n in kind.aliases if n in RECORD_KINDS or n in _ALIASES]
    if kind.name in _ALIASES or taken:
        raise DuplicateName(f"record kind {', '.join(map(repr, [kind.name] if kind.name in _ALIASES else taken))} "
                            "is already registered")
    RECORD_KINDS.register(kind.name, kind)
    _ALIASES.update(dict.fromkeys(kind.aliases, kind.name))
    return kind


def record_kind(data: Any, source: object = "result") -> str | None:
    """The registered record kind of ``data``: its recorded ``kind`` (an alias resolved to the kind's name), or,
    for a file written before results carried one, the kind whose fields it has. None for a kind no reader
    knows and for data that is not a weightlock record (:func:`kind_of` tells the two apart)."""
    recorded = kind_of(data, source)
    if recorded is not None:
        if recorded in RECORD_KINDS:
            return recorded
        if recorded in _ALIASES:
            return _ALIASES[recorded]
        return next((k.name for k in RECORD_KINDS.values()
                     if k.alias_prefix and recorded.startswith(k.alias_prefix)), None)
    if not isinstance(data, dict):
        return None
    return next((k.name for k in RECORD_KINDS.values() if k.recognise and k.recognise(data)), None)


def _first_row(d: dict, key: str, field: str) -> bool:
    rows = d.get(key)
    return isinstance(rows, list) and bool(rows) and isinstance(rows[0], dict) and field in rows[0]


# the order is the order old files are recognised in: the first whose fields match
for _kind in (
    RecordKind(DEMO, "weightlock demo: summary.json", recognise=lambda d: "weightlock_demo" in d),
    RecordKind(ATTACK_CURVES, "every attack × task × seed: score curves on the lock and the original",
               aliases=("bench.attacks",), recognise=lambda d: _first_row(d, "results", "score_curves")),
    RecordKind(ATTACK_RUN, "one attack run: result.json of run_attack",
               recognise=lambda d: any(isinstance(d.get(k), dict) and "score_curve" in d[k]
                                       for k in ("target", "locked"))),
    RecordKind(MEMORY_VS_DEPTH, "saved-activation meter: MLP vs DLR-Net, bytes vs DLR depth",
               aliases=("bench.dlr_memory",), recognise=lambda d: "depth_linearity" in d),
    RecordKind(MEMORY_TIME_FRONTIER, "activation memory vs step time per memory-saving strategy",
               aliases=("bench.frontier",), recognise=lambda d: _first_row(d, "rows", "strategy")),
    RecordKind(PMP_GAIN_VS_RATIO, "fine-tuning gains of a PMP model per mask ratio and method",
               aliases=("bench.pmp_sweep",),
               recognise=lambda d: "dense_gains" in d and isinstance(d.get("rows"), list)),
    RecordKind(MASK_RECOVERY, "IoU of the PMP masks attacks recover, against chance",
               aliases=("bench.pmp_recovery",),
               recognise=lambda d: isinstance(d.get("variants"), dict)
               and any(isinstance(v, dict) and "recovery" in v for v in d["variants"].values())),
    RecordKind(LOCK_FIDELITY, "DLR-Lock per rank: per-layer error, perplexity ratio, lock time",
               aliases=("bench.dlr_fidelity",), recognise=lambda d: _first_row(d, "ranks", "layer_rel_error")),
    RecordKind(LOCK_REPORT, "weightlock lock: lock_report.json in a release",
               recognise=lambda d: _first_row(d, "layers", "rel_error") and "base_model" in d),
    RecordKind(LOCK_COST, "attacks to convergence on locks and originals: the lock cost multiplier",
               aliases=("bench.cost_to_target",)),
    RecordKind(LOCK_REGIME, "DLR-Lock rank sweep: memory, time and gain multipliers per rank",
               aliases=("bench.dlr_regime",)),
    RecordKind(REAL_LOCK, "DLR-Lock on a real LLM: fidelity against the bars, lock time, speed",
               alias_prefix="bench.real_model_"),
    RecordKind(REAL_ATTACKS, "the red team on a real LLM: score curves and cost multipliers",
               aliases=("bench.real_attacks",)),
    RecordKind(ERROR_BUDGET, "a real LLM with every MLP at a scaled DLR error: fidelity vs layer error",
               aliases=("bench.real_error_budget",)),
):
    register_kind(_kind)

