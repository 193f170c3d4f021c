"""Typed records of experiment results: one :class:`AttackRun` per attack run, its cost curve as
:class:`CostPoint` s. The demo summary's attack rows and the lock cost multiplier read only these records.

A record is written as ``record.json`` (kind ``attack_record``) beside the attack's ``result.json``; it
converts to and from a plain dict (:meth:`AttackRun.to_dict`, :meth:`AttackRun.from_dict`, versioned: a
record from a newer schema is refused with one line that says to upgrade). :meth:`AttackRun.from_result`
reads an attack's ``result.json`` as written by :func:`weightlock.attacks.run_attack`, including records from
before the attacked model's run was called the *target* (stored under ``"locked"``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import WeightlockError
from ..io import jsonable
from ..schema import ATTACK_RECORD, ATTACK_RUN, kind_of, schema_version, target_run

RECORD_VERSION = schema_version(ATTACK_RECORD)


@dataclass(frozen=True)
class CostPoint:
    """One point of an attack's cost curve: the cumulative cost so far (training steps, tokens, seconds of
    preparation + training steps, FLOPs; ``None`` where not measured) and the held-out task score there."""

    step: int
    tokens: int | None
    seconds: float | None
    flops: float | None
    score: float

    def to_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds, "flops": self.flops,
                "score": self.score}

    @classmethod
    def from_dict(cls, d: dict) -> "CostPoint":
        try:
            return cls(step=int(d["step"]), tokens=_opt(int, d.get("tokens")), seconds=_opt(float, d.get("seconds")),
                       flops=_opt(float, d.get("flops")), score=float(d["score"]))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightlockError(f"a cost point needs step and score (and tokens, seconds, flops), got {d!r}") from e


def _opt(cast, v):
    return None if v is None else cast(v)


@dataclass(frozen=True)
class AttackRun:
    """One attack run on one model: what was attacked (``target``, the model directory; ``defense``: the
    defense whose release it is, ``"reference"`` for the unlocked original, ``None`` outside an experiment),
    how (``attack``: its label in the plan, ``attack_name``: the registered attack, ``config``: every option
    as run, ``seed``), on which ``task``, what it gained and what it paid (``curve`` of :class:`CostPoint`;
    counted training memory and measured peaks, time, FLOPs). ``cost`` keeps the run's whole cost record
    (forward/backward split, memory parts) and ``extra`` what a particular attack adds (reverse
    distillation's costs, a recovered mask's density, the task's before/after details)."""

    target: str
    attack: str
    task: str
    config: dict
    curve: tuple[CostPoint, ...]
    score_before: float
    score_after: float
    gain: float
    defense: str | None = None
    attack_name: str | None = None
    seed: int = 0
    steps: int | None = None  # training steps run (fewer than the budget when patience stopped the attack)
    stopped_early: bool | None = None
    tokens: int | None = None
    parameters: int | None = None
    trainable_parameters: int | None = None
    capability_data: str | None = None
    capability_ppl_before: float | None = None
    capability_ppl_after: float | None = None
    # memory: counted (the budget) and measured (reported)
    training_memory_bytes: int | None = None
    saved_activation_bytes: int | None = None
    peak_rss_bytes: int | None = None
    peak_rss_delta_bytes: int | None = None
    # time: the median training step, the preparation (reverse distillation...), all training steps
    step_time_s: float | None = None
    prepare_seconds: float | None = None
    train_seconds: float | None = None
    flops_estimate: float | None = None
    flops_counted: float | None = None
    cost: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    schema_version: int = RECORD_VERSION

    # ---- derived views ----------------------------------------------------------------------------
    @property
    def has_costs(self) -> bool:
        """Whether the curve records costs (records from before cost curves hold scores only)."""
        return bool(self.curve) and all(p.seconds is not None for p in self.curve)

    @property
    def score_curve(self) -> list[list]:
        """``[[step, score], ...]``: the model as released, then every scored training step."""
        return [[p.step, p.score] for i, p in enumerate(self.curve) if p.step or i == 0]

    def cost_curve(self) -> list[dict] | None:
        """The cost curve as dicts (what :mod:`weightlock.eval.cost_to_target` reads), or None without costs."""
        return [p.to_dict() for p in self.curve] if self.has_costs else None

    def total_seconds(self, budget_steps: int | None = None) -> float | None:
        """The attacker's time: the median step × steps run (robust to one-off first-step costs) plus the
        preparation; ``budget_steps`` stands in for the steps of a record that does not say."""
        steps = self.steps if self.steps is not None else budget_steps
        if self.step_time_s is None or steps is None:
            return None
        return self.step_time_s * steps + (self.prepare_seconds or 0.0)

    def memory(self, optimizer: str | None = None) -> dict:
        """Training memory, ``counted`` (this record's exact count, None in records from before weightlock
        counted it) and ``estimated`` from the parameter counts (see
        :func:`weightlock.eval.cost_to_target.run_training_memory`; ``optimizer`` default: the run's)."""
        return run_training_memory({"cost": self.cost, "parameters": self.parameters,
                                    "trainable_parameters": self.trainable_parameters},
                                   optimizer or self.config.get("optimizer"))

    # ---- to and from plain data -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["curve"] = [p.to_dict() for p in self.curve]
        return {"kind": ATTACK_RECORD, **jsonable(d)}

    @classmethod
    def from_dict(cls, d: dict, source: object = "attack record") -> "AttackRun":
        """A record written by :meth:`to_dict` (any schema version up to this weightlock's)."""
        kind = kind_of(d, source)
        if kind != ATTACK_RECORD:
            raise WeightlockError(f"{source}: not an attack record (kind {kind!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise WeightlockError(f"{source}: attack record without {', '.join(sorted(missing))}")
        kw = {k: v for k, v in d.items() if k in names}  # fields of a later minor addition are ignored
        kw["curve"] = tuple(CostPoint.from_dict(p) for p in d["curve"])
        return cls(**kw)

    @classmethod
    def from_run(cls, run: dict, *, attack: str, task: str, config: dict | None = None,
                 defense: str | None = None, attack_name: str | None = None, target: str | None = None) -> "AttackRun":
        """A record from one run of :func:`weightlock.attacks.run.attack_one` (``result.json``'s ``target`` or
        ``reference_run``)."""
        config = dict(config or {})
        cost = dict(run.get("cost") or {})
        if run.get("cost_curve"):
            curve = tuple(CostPoint.from_dict(p) for p in run["cost_curve"])
        else:  # before cost curves: the scores only
            curve = tuple(CostPoint(int(s), None, None, None, float(v)) for s, v in run.get("score_curve") or [])
        steps = curve[-1].step if curve and run.get("cost_curve") else None
        known = {"model", "before", "after", "gain", "capability_ppl_before", "capability_ppl_after",
                 "capability_data", "parameters", "trainable_parameters", "tokens", "loss_curve", "score_curve",
                 "cost_curve", "stopped_early", "cost"}
        extra = {k: v for k, v in run.items() if k not in known}
        extra.update(before=run.get("before"), after=run.get("after"), loss_curve=run.get("loss_curve"))
        # a minimal record (a curve only) reads its scores off the curve (NaN: neither; readers that need a
        # curve say so, e.g. the cost multiplier)
        before = float((run.get("before") or {}).get("score", curve[0].score if curve else math.nan))
        after = float((run.get("after") or {}).get("score", curve[-1].score if curve else math.nan))
        return cls(
            target=str(target or run.get("model")), attack=attack, task=task, config=config, curve=curve,
            score_before=before, score_after=after, gain=float(run.get("gain", after - before)), defense=defense,
            attack_name=attack_name, seed=int(config.get("seed", 0)),
            steps=steps, stopped_early=run.get("stopped_early"), tokens=run.get("tokens"),
            parameters=run.get("parameters"), trainable_parameters=run.get("trainable_parameters"),
            capability_data=run.get("capability_data"), capability_ppl_before=run.get("capability_ppl_before"),
            capability_ppl_after=run.get("capability_ppl_after"),
            training_memory_bytes=cost.get("training_memory_bytes"),
            saved_activation_bytes=cost.get("saved_activation_bytes_per_step"),
            peak_rss_bytes=cost.get("peak_rss_bytes"), peak_rss_delta_bytes=cost.get("peak_rss_delta_bytes"),
            step_time_s=cost.get("step_time_s"), prepare_seconds=cost.get("prepare_seconds"),
            train_seconds=cost.get("train_seconds"), flops_estimate=cost.get("flops_estimate"),
            flops_counted=cost.get("flops_counted"), cost=cost, extra=extra)

    @classmethod
    def from_result(cls, result: dict, side: str = "target", *, defense: str | None = None,
                    label: str | None = None, source: object = "result") -> "AttackRun":
        """The record of one side of an attack's ``result.json``: ``side="target"`` the attacked model's run
        (stored under ``"locked"`` before schema 2 of ``attack_run``: still read), ``"reference"`` the run on
        the unlocked reference recorded beside it."""
        if kind_of(result, source) not in (ATTACK_RUN, None):
            raise WeightlockError(f"{source}: not an attack result (kind {result.get('kind')!r})")
        if side in ("target", "locked"):
            run, name = target_run(result, source), result.get("attack")
        elif side == "reference":
            run, name = result.get("reference_run"), result.get("reference_attack") or result.get("attack")
            if run is None:
                raise WeightlockError(f"{source}: no reference run recorded (run the attack with --reference)")
        else:
            raise WeightlockError(f"side must be 'target' or 'reference', got {side!r}")
        return cls.from_run(run, attack=label or name or "attack", task=result.get("task", ""),
                            config=result.get("options") if side != "reference" else {},
                            defense=defense, attack_name=name)


def mean_run(runs: Sequence[AttackRun]) -> dict[str, float]:
    """Means over seeds of the scores and the gain of ``runs`` (the same attack and configuration)."""
    if not runs:
        raise WeightlockError("no runs to average")
    return {k: math.fsum(getattr(r, k) for r in runs) / len(runs) for k in ("score_before", "score_after", "gain")}


__all__ = ["AttackRun", "CostPoint", "RECORD_VERSION", "mean_run"]


def run_training_memory(run: dict, optimizer: str | None = None) -> dict:
    """The training memory of one attack run record (``result.json``'s ``locked`` or ``reference_run``):
    ``counted`` (the record's exact ``cost["training_memory_bytes"]``, None in records from before weightlock
    counted it) and ``estimated`` from its parameter counts and saved-activation bytes, as weightlock's attacks
    train (float32 parameters; ``optimizer``, default the record's or AdamW, 8 bytes of state per trainable
    parameter; SGD 4; the per-tensor step counters, which older records cannot tell, not counted); None
    when the record lacks what it needs."""
    cost = run.get("cost") or {}
    opt = optimizer or (cost.get("training_memory") or {}).get("optimizer") or "adamw"
    per = {"adamw": 8, "sgd": 4}.get(opt)
    n, t = run.get("parameters"), run.get("trainable_parameters")
    saved = cost.get("saved_activation_bytes_per_step")
    estimated = None if None in (n, t, saved, per) else 4 * n + (4 + per) * t + saved
    return {"counted": cost.get("training_memory_bytes"), "estimated": estimated}
