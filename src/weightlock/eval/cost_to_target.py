"""The security verdict as a cost: what an attacker pays to reach a target gain.

An attack's *curve* is a list of points, each the cumulative cost so far (``step``, ``tokens``,
``seconds``, ``flops``) and the held-out task ``score`` there; the first point is the model before any
training. The *target* is a fraction ``q`` (default 0.9) of the best converged gain the unlocked attacker
reaches on the task; the *cost to target* is the cost at which a curve first reaches it, linearly
interpolated between the two points around the crossing, or ``None`` ("never") if it does not within its
budget. The *lock cost multiplier* is the cheapest attack on the lock's cost to target divided by the
cheapest attack on the original's — optionally only among attacks whose memory fits a budget: the *training
memory* of the unlocked full fine-tune (:data:`~weightlock.eval.cost.TRAINING_MEMORY`: parameters + gradients
+ optimizer state + the saved activations of a step, counted exactly, never a measured RSS peak, which varies
run to run by more than the differences it would have to show). An attacker who does not fit must use a
memory-saving counter-measure and pay for it in time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import WeightlockError
from .records import AttackRun, run_training_memory

COSTS = ("step", "tokens", "seconds", "flops")


def _check_curve(curve: Sequence[dict], cost: str) -> None:
    if cost not in COSTS:
        raise WeightlockError(f"unknown cost {cost!r} ({', '.join(COSTS)})")
    if not curve:
        raise WeightlockError("empty score curve")
    costs = [p[cost] for p in curve]
    if any(b < a for a, b in zip(costs, costs[1:])):
        raise WeightlockError(f"a score curve's {cost} must not decrease")


def gain_curve(curve: Sequence[dict], start: float | None = None) -> list[float]:
    """The gain at every point: score minus the score before training (or minus ``start`` when given)."""
    start = curve[0]["score"] if start is None else start
    return [p["score"] - start for p in curve]


def best_gain(curve: Sequence[dict], start: float | None = None) -> float:
    """The best gain a curve reaches (its converged gain when it ran to a plateau), from ``start`` when given."""
    return max(gain_curve(curve, start))


def cost_to_target(curve: Sequence[dict], target_gain: float, cost: str = "seconds",
                   start: float | None = None) -> float | None:
    """The cost at which ``curve`` first reaches ``target_gain`` (linear interpolation between the points
    around the crossing); ``None`` if it never does. Gains count from the curve's own first score, or from
    ``start`` when given (e.g. the original release's score: the target is then a score level)."""
    _check_curve(curve, cost)
    gains = gain_curve(curve, start)
    if gains[0] >= target_gain:
        return float(curve[0][cost])
    for (p0, g0), (p1, g1) in zip(zip(curve, gains), zip(curve[1:], gains[1:])):
        if g1 >= target_gain:
            frac = (target_gain - g0) / (g1 - g0)
            return float(p0[cost] + frac * (p1[cost] - p0[cost]))
    return None


@dataclass
class AttackCurve:
    """One attack's run: its name, score curve, the run's own measured peak memory growth (``peak_bytes``, a
    measurement, reported only) and its training memory (``memory_bytes``, counted: what a memory budget
    compares; None when the run has no count)."""

    attack: str
    curve: list[dict]
    peak_bytes: int | None = None
    extra: dict = field(default_factory=dict)
    memory_bytes: int | None = None


# how the training memory of a set of runs was obtained (see :func:`on_one_basis`)
MEMORY_BASIS = {
    "counted": "training memory counted exactly (parameters + gradients + optimizer state + saved activations)",
    "estimated": "training memory estimated from older records' parameter counts (float32 parameters; the "
                 "optimizer's per-tensor step counters not counted), the same way for every run compared",
    "unknown": "no training-memory count (runs recorded before weightlock counted it, without parameter "
               "counts): run the attacks again",
}


def counted_training_memory(model, optimizer: str = "adamw", saved_activation_bytes: int | None = None) -> dict:
    """The training memory of ``model`` as it is set up to train (its parameters' ``requires_grad``), in
    :func:`run_training_memory`'s shape (``counted``, ``estimated``) plus its ``parts``
    (:func:`~weightlock.eval.cost.training_memory`): exactly what an attack run records for a model with this
    architecture and trainable set and these saved-activation bytes (the run's own, e.g. from a record made
    before weightlock counted the rest) — a run counted again without running it."""
    from .cost import training_memory

    parts = training_memory(model, optimizer, saved_activation_bytes)
    total = parts.pop("training_memory_bytes")
    record = {"parameters": parts["parameters"], "trainable_parameters": parts["trainable_parameters"],
              "cost": {"training_memory_bytes": total, "training_memory": parts,
                       "saved_activation_bytes_per_step": saved_activation_bytes}}
    return {**run_training_memory(record, optimizer), "parts": parts}


def on_one_basis(memories: Sequence[dict]) -> tuple[list[int | None], str]:
    """Comparable training memories of runs (each a :func:`run_training_memory`): the counted bytes when
    every run has them (``"counted"``), else every run's estimate (``"estimated"``; ``"unknown"`` when no run
    has one), so that a run is never compared on one basis against a budget on another. Returns the bytes
    (None where unknown) and the basis (a key of :data:`MEMORY_BASIS`)."""
    if all(m.get("counted") is not None for m in memories):
        return [m["counted"] for m in memories], "counted"
    est = [m.get("estimated") for m in memories]
    return est, "unknown" if all(v is None for v in est) else "estimated"


def put_on_one_basis(*sets: Sequence[AttackCurve]) -> str:
    """Set ``memory_bytes`` of every curve read by :func:`load_attack_curves` (which keeps its record's
    :func:`run_training_memory` in ``extra["memory"]``) on one basis, across all ``sets``; returns the basis."""
    curves = [a for s in sets for a in s if "memory" in a.extra]
    values, basis = on_one_basis([a.extra["memory"] for a in curves])
    for a, v in zip(curves, values):
        a.memory_bytes = v
    return basis


def lock_cost_multiplier(locked: Sequence[AttackCurve], original: Sequence[AttackCurve], q: float = 0.9,
                         cost: str = "seconds", memory_budget: int | None = None, level: bool = False) -> dict:
    """Cheapest cost to target on the lock ÷ cheapest on the original.

    The target is ``q`` × the best gain of any attack on the original, each curve's gain counted from its
    own release's score; with ``level`` it counts from the *original* release's score on both sides, so
    the target is a score level (``target_score``): a lock that starts below the original must first
    climb back to it (the gain-based target lets a degraded release reach the target well below the
    fine-tuned original's level). With ``memory_budget`` (bytes of training memory), attacks whose training
    memory (``memory_bytes``) exceeds it, or that have none, do not count (on either side). The multiplier
    is ``inf`` when no attack on the lock reaches the target (the lock holds within the attacks' budgets)."""
    if not 0 < q <= 1:
        raise WeightlockError(f"q must be in (0, 1], got {q}")
    if not original:
        raise WeightlockError("no attack on the original: the target is undefined")
    best = max(best_gain(a.curve) for a in original)
    if not best > 0:
        raise WeightlockError(f"the unlocked attacker gains nothing (best gain {best:.4g}): no target to reach")
    target = q * best
    start = original[0].curve[0]["score"] if level else None
    if level and any(abs(a.curve[0]["score"] - start) > 1e-6 * max(1.0, abs(start)) for a in original):
        raise WeightlockError("level target: the attacks on the original start from different scores")

    def fits(a: AttackCurve) -> bool:
        return memory_budget is None or (a.memory_bytes is not None and a.memory_bytes <= memory_budget)

    def table(runs):
        return {a.attack: (cost_to_target(a.curve, target, cost, start) if fits(a)
                           else "memory not counted" if a.memory_bytes is None else "over memory budget")
                for a in runs}

    lk, og = table(locked), table(original)
    lk_min = min((v for v in lk.values() if isinstance(v, float)), default=None)
    og_min = min((v for v in og.values() if isinstance(v, float)), default=None)
    if og_min is None:
        raise WeightlockError("no attack on the original reaches the target within the memory budget")
    mult = math.inf if lk_min is None else (lk_min / og_min if og_min > 0 else math.inf)
    return {"q": q, "cost": cost, "target_gain": target, "best_original_gain": best, "memory_budget": memory_budget,
            "level": level, "target_score": None if start is None else start + target,
            "locked": lk, "original": og, "locked_min": lk_min, "original_min": og_min, "multiplier": mult,
            # with ``level``, counted from the original release's score like the target
            "best_locked_gain": max((best_gain(a.curve, start) for a in locked), default=None)}


def multiplier_note(locked: Sequence[AttackCurve], original: Sequence[AttackCurve], q: float = 0.9,
                    memory_budget: int | None = None, memory_basis: str = "counted") -> str:
    """One verdict clause: what reaching ``q`` of the unlocked attacker's best gain costs on the lock, as
    multipliers of the original's cost in training seconds and FLOPs, plus the time multiplier when the
    attacker may use no more training memory than ``memory_budget`` (the unlocked full fine-tune's: an
    attack fits when its ``memory_bytes`` is at most the budget, the one test the tables' ``memory ×`` ≤ 1
    shows), naming the cheapest attack that fits. ``memory_basis`` (:data:`MEMORY_BASIS`): ``"estimated"``
    says so; ``"unknown"`` says that no memory clause can be given."""
    try:
        sec = lock_cost_multiplier(locked, original, q, "seconds")
    except WeightlockError as e:
        return f"no cost multiplier ({e})"
    if math.isinf(sec["multiplier"]):
        return (f"no attack on the lock reaches {q:.0%} of the best unlocked gain (any attack) within its budget "
                f"(cost multiplier ∞)")
    best = min((k for k, v in sec["locked"].items() if isinstance(v, float)), key=lambda k: sec["locked"][k])
    line = f"reaching {q:.0%} of the best unlocked gain costs {sec['multiplier']:.2f}× the time ({best})"
    if all(a.curve[-1].get("flops") is not None for a in (*locked, *original)):
        line += f", {lock_cost_multiplier(locked, original, q, 'flops')['multiplier']:.2f}× the FLOPs"
    if memory_basis == "unknown" or (memory_budget is None and memory_basis != "counted"):
        return line + ", within the unlocked full fine-tune's memory: unknown (" + MEMORY_BASIS["unknown"] + ")"
    if memory_budget is not None:
        try:
            mb = lock_cost_multiplier(locked, original, q, "seconds", memory_budget)
        except WeightlockError:  # no attack on the original fits: nothing to compare with
            return line
        where = "within the unlocked full fine-tune's training memory"
        if math.isfinite(mb["multiplier"]):
            fit = min((k for k, v in mb["locked"].items() if isinstance(v, float)), key=lambda k: mb["locked"][k])
            line += f", {mb['multiplier']:.2f}× the time {where} ({fit})"
        else:
            line += f", never {where}"
        uncounted = [k for k, v in mb["locked"].items() if v == "memory not counted"]
        if uncounted:
            line += f" ({', '.join(uncounted)}: no memory count)"
        if memory_basis == "estimated":
            line += " (memory estimated from older records' parameter counts)"
    return line


def load_attack_curves(paths: Sequence, side: str = "target") -> list[AttackCurve]:
    """The cost curves of the attack runs (``result.json`` of :func:`~weightlock.attacks.run_attack`, read as
    :class:`~weightlock.eval.records.AttackRun` records) in ``paths`` (run directories, directories
    holding them, or result files): ``side="target"`` (or ``"locked"``) reads the attacked model's run,
    ``"reference"`` the unlocked reference run recorded beside it (``--reference``).
    Each curve is named by its run directory; ``memory_bytes`` is the run's counted training memory (else
    its estimate: call :func:`put_on_one_basis` on every set compared), ``peak_bytes`` its measured peak
    growth (reported only)."""
    from pathlib import Path

    from ..io import read_json
    from ..schema import ATTACK_RUN, kind_of

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("result.json"))
        else:
            raise WeightlockError(f"{p}: no such file or directory")

    target = side in ("target", "locked")  # "locked": the attacked model's run, as records before schema 2 call it
    curves = []
    for f in files:
        d = read_json(f)
        if kind_of(d, f) != ATTACK_RUN or (not target and d.get("reference_run") is None):
            continue
        run = AttackRun.from_result(d, "target" if target else "reference", source=f)  # the typed record
        if not run.has_costs:
            raise WeightlockError(f"{f}: no cost curve (recorded before weightlock kept one); run the attack again "
                                  "with score_every=N")
        name = d.get("attack", "attack") + f" ({f.parent})"
        memory = run.memory(d.get("options", {}).get("optimizer"))
        curves.append(AttackCurve(name, run.cost_curve(), run.peak_rss_delta_bytes,
                                  {"attack": d.get("attack"), "options": d.get("options", {}), "memory": memory},
                                  memory["counted"] if memory["counted"] is not None else memory["estimated"]))
    if not curves:
        raise WeightlockError(f"no attack runs{' with a reference run' if not target else ''} under "
                              + ", ".join(map(str, paths)))
    return curves


def full_finetune_budget(original: Sequence[AttackCurve]) -> int | None:
    """The memory budget: the training memory (``memory_bytes``) of the original's plain full fine-tuning runs
    (no counter-measure; the largest, should they differ in batch or block size), or None when there is none
    or none has a memory count."""
    def plain(options: dict) -> bool:  # run_attack records checkpointing="none" for no checkpointing
        return options.get("checkpointing") in (None, "none") and not options.get("offload")

    counts = [a.memory_bytes for a in original if a.extra.get("attack") == "full" and a.memory_bytes is not None
              and plain(a.extra.get("options", {}))]
    return max(counts) if counts else None
