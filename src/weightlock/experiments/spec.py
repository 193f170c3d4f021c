"""An experiment as data: :class:`ExperimentSpec`, loaded from YAML or JSON and checked before any work.

A spec names the model(s) to attack (a pretraining preset, or a local model directory), the defenses with their
configs or sweeps of them (:class:`DefenseEntry`: one entry per point, labelled), given releases to attack as
they are (:class:`TargetEntry`: a release directory or a ``.gguf`` file), the attacks (:class:`AttackEntry`: by
their label in the defenses' plans, or explicit with a registered attack and its settings; a learning-rate sweep,
a sweep over options, or the best rate of another attack, a later stage; their own seeds and tasks), the tasks,
the seeds, the budget (steps, batch, scoring, patience, sequence length, tokens), what to measure, the analyses
(:class:`AnalysisEntry`) and the stages that run (build → attack → analyse). Every section is a frozen dataclass
that validates itself and holds its defaults and help text (:func:`field_help`); a key the spec does not know is
refused with one line that names it and the valid ones. ``weightlock run SPEC.yaml|NAME --out DIR`` runs it
(:func:`weightlock.experiments.runner.run_experiment`); the specs shipped in the package (:func:`shipped_specs`)
are the demo (``weightlock demo [--quick]`` runs ``demo``/``demo-quick``) and the bench's grid experiments.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import WeightlockError

SPEC_DIR = Path(__file__).parent / "specs"
LR_GROUPS = ("full", "lora", "masked")  # the learning rates a defense's attack plan names (AttackSpec.lr)


def _where(path: str) -> str:
    return path or "the spec"


def _check_keys(data: Any, cls, path: str, source: str) -> dict:
    """``data`` as a mapping whose keys are fields of ``cls``; an unknown key is one clear line."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise WeightlockError(f"{source}: {_where(path)} must be a mapping of {', '.join(_names(cls))}, "
                              f"got {type(data).__name__}")
    valid = _names(cls)
    for k in data:
        if k not in valid:
            raise WeightlockError(f"{source}: unknown key {k!r} in {_where(path)}; valid keys: {', '.join(valid)}")
    return dict(data)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _int(v, what: str, source: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise WeightlockError(f"{source}: {what} must be an integer ≥ {low}, got {v!r}")
    return v


def _name_list(value, path: str, source: str, must: str) -> tuple[str, ...] | None:
    """A name or a non-empty list of names as a tuple (None stays None); anything else is refused."""
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise WeightlockError(f"{source}: {path} must {must}")
    return tuple(value)


def _lrs(v, what: str, source: str) -> tuple[float, ...]:
    """A learning rate or a list of them (a sweep): positive finite numbers."""
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    if not values:
        raise WeightlockError(f"{source}: {what} is an empty list (give one learning rate or several)")
    out = []
    for x in values:
        if isinstance(x, str):  # YAML reads 2e-3 (no dot) as a string
            try:
                x = float(x)
            except ValueError:
                pass
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
            raise WeightlockError(f"{source}: {what} must be positive numbers, got {v!r}")
        out.append(float(x))
    if len(set(out)) != len(out):
        raise WeightlockError(f"{source}: {what} repeats a learning rate: {out}")
    return tuple(out)


def _freeze(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [thaw(v) for v in obj]
    return obj


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    """A spec field with its help text (``field.metadata["help"]``, what ``weightlock run --list`` and the
    docs show): the spec dataclasses are the one home of every default."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def field_help(cls) -> dict[str, str]:
    """Each field of a spec dataclass with its help text."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def _number(x: Any) -> Any:
    if isinstance(x, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(x)
        except ValueError:
            return x
    return x


def expand_sweep(sweep: Any, what: str, source: str) -> list[dict]:
    """The points of a sweep: a grid (``{rank: [8, 16], steps: [100, 200]}``: every combination, the first
    key varying slowest) or a list of points (``[{rank: 8}, {rank: 16, steps: 50}]``); ``None``: one empty
    point. A value that is not a list is one fixed setting."""
    if sweep is None:
        return [{}]
    if isinstance(sweep, Mapping):
        if not sweep:
            raise WeightlockError(f"{source}: {what} is empty (give settings and their values)")
        points: list[dict] = [{}]
        for k, values in sweep.items():
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise WeightlockError(f"{source}: {what}.{k} is an empty list")
            points = [{**p, str(k): _number(v)} for p in points for v in values]
    elif isinstance(sweep, list) and sweep and all(isinstance(p, Mapping) and p for p in sweep):
        points = [{str(k): _number(v) for k, v in p.items()} for p in sweep]  # a point's `label` names it
    else:
        raise WeightlockError(f"{source}: {what} must be a grid (a mapping of settings to lists of values) or a "
                              f"non-empty list of points (mappings), got {sweep!r}")
    labels = [point_label("", p) for p in points]
    if len(set(labels)) != len(labels):
        raise WeightlockError(f"{source}: {what} repeats a point: {points}")
    return points


def point_label(base: str, point: Mapping) -> str:
    """A sweep point's label: its own ``label`` (a list point may name itself), else generated: ``dlr`` +
    ``{rank: 8}`` → ``dlr-rank8``."""
    if "label" in point:
        return str(point["label"])

    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v).replace("/", "_").replace(" ", "_")

    return "-".join([base, *(f"{k}{fmt(v)}" for k, v in point.items())]) if point else base


def _name(v: Any, what: str, source: str) -> str:
    if not isinstance(v, str) or not v or "/" in v or v != v.strip():
        raise WeightlockError(f"{source}: {what} must be a non-empty name without '/', got {v!r}")
    return v


@dataclass(frozen=True)
class ModelSpec:
    """A model to defend and attack: ``preset`` (pretrained by the run on builtin:code, as
    ``weightlock pretrain --preset``) or ``path`` (a local model directory, used as it is; the preset then
    only sets the block size and token budget of the attacks' data). ``name`` (default: the preset or the
    directory's name) names its run directory when a spec has several models."""

    preset: str = _f("small", "a pretraining preset (weightlock pretrain --preset): the model pretrained when no "
                              "path is given, and the attacks' block size and token budget")
    path: str | None = _f(None, "a local model directory used as the original (the reference) instead of "
                                "pretraining the preset")
    name: str | None = _f(None, "the model's run directory when a spec has several (default: the preset or the "
                                "directory's name)")
    seed: int | None = _f(None, "pretraining seed of the preset and of models defenses pretrain (default 0)")

    @classmethod
    def parse(cls, data: Any, path: str, source: str) -> "ModelSpec":
        if isinstance(data, str):  # a bare preset name
            data = {"preset": data}
        d = _check_keys(data, cls, path, source)
        spec = cls(**d)
        from ..models.presets import PRESETS

        if spec.preset not in PRESETS:
            raise WeightlockError(f"{source}: {path}.preset: unknown preset {spec.preset!r}; presets: "
                                  f"{', '.join(PRESETS)}")
        if spec.path is not None and not isinstance(spec.path, str):
            raise WeightlockError(f"{source}: {path}.path must be a directory name, got {spec.path!r}")
        if spec.name is not None:
            _name(spec.name, f"{path}.name", source)
        if spec.seed is not None:
            _int(spec.seed, f"{path}.seed", source)
            if spec.path is not None:
                raise WeightlockError(f"{source}: {path}.seed seeds the preset's pretraining; the model {spec.path} "
                                      "is used as it is")
        return spec

    @property
    def label(self) -> str:
        return self.name or (Path(self.path).name if self.path else self.preset)


DEFENSE_KEYS = ("name", "label", "config", "sweep")


@dataclass(frozen=True)
class DefenseEntry:
    """A registered defense (``weightlock.defenses``) and its config (the defense's ``Config`` fields), built
    from the original; ``label`` names it in rows, directories and verdicts when a spec builds the same defense
    more than once (a sweep's points get ``dlr-rank8``...)."""

    name: str = _f(help="a registered defense (weightlock run --list)")
    config: Mapping[str, Any] = _f(help="the defense's config (its Config fields; the rest keep their defaults)",
                                   factory=lambda: MappingProxyType({}))
    label: str | None = _f(None, "its name in rows, directories and verdicts (default: the defense's name; a "
                                 "sweep's points: NAME-KEYVALUE...)")

    @property
    def key(self) -> str:
        return self.label or self.name

    def make(self):
        """The configured :class:`~weightlock.defenses.Defense` (validated), called by its label."""
        from ..defenses import make_defense

        d = make_defense(self.name, **thaw(self.config))
        if self.key != d.name:
            d.name = self.key  # its rows, build record and hooks go by the label
        return d

    @classmethod
    def parse_all(cls, defenses: Any, source: str) -> tuple["DefenseEntry", ...]:
        """The ``defenses`` section: a mapping ``{dlr: {rank: 8}}``, or a list of names, of ``{dlr: {...}}``
        and of ``{name: dlr, config: {...}, sweep: {rank: [8, 16]}, label: ...}`` (one entry per sweep point)."""
        if defenses is None:
            return ()
        if isinstance(defenses, Mapping):
            defenses = [{k: v} for k, v in defenses.items()]
        if not isinstance(defenses, list):
            raise WeightlockError(f"{source}: defenses must be a list or a mapping of registered defenses "
                                  "(e.g. defenses: [{name: dlr, config: {rank: 8}}])")
        out: list[DefenseEntry] = []
        for i, x in enumerate(defenses):
            where = f"defenses[{i}]"
            if isinstance(x, str):
                x = {"name": x}
            elif isinstance(x, Mapping) and "name" not in x and len(x) == 1:
                (k, v), = x.items()
                if v is not None and not isinstance(v, Mapping):
                    raise WeightlockError(f"{source}: defenses.{k} must be a mapping of the defense's config")
                x = {"name": k, "config": v or {}}
            if not isinstance(x, Mapping):
                raise WeightlockError(f"{source}: {where} must be a defense name or a mapping of "
                                      f"{', '.join(DEFENSE_KEYS)}")
            for k in x:
                if k not in DEFENSE_KEYS:
                    raise WeightlockError(f"{source}: unknown key {k!r} in {where}; valid keys: "
                                          f"{', '.join(DEFENSE_KEYS)}")
            name = _name(x.get("name"), f"{where}.name", source)
            config = x.get("config") or {}
            if not isinstance(config, Mapping):
                raise WeightlockError(f"{source}: {where}.config must be a mapping of the defense's config")
            label = x.get("label")
            if label is not None:
                _name(label, f"{where}.label", source)
            points = expand_sweep(x.get("sweep"), f"{where}.sweep", source)
            for p in points:
                key = point_label(label or name, p) if "sweep" in x else label
                p = {k: v for k, v in p.items() if k != "label"}
                out.append(cls(name, _freeze({**dict(config), **p}), None if key == name else key))
        keys = [e.key for e in out]
        for k in keys:
            if keys.count(k) > 1:
                raise WeightlockError(f"{source}: defense {k!r} is named twice (give each a label)")
            if k in ("reference", "base"):
                raise WeightlockError(f"{source}: {k!r} is the original's name; label the defense otherwise")
        return tuple(out)

    def to_dict(self) -> dict:
        return {"name": self.name, **({"label": self.label} if self.label else {}), "config": thaw(self.config)}


ATTACK_KEYS = ("attack", "lr", "group", "options", "reference", "against", "seeds", "tasks", "sweep")


@dataclass(frozen=True)
class AttackEntry:
    """An attack, by its label: one of the defenses' plans (``full``, ``lora``, ``checkpointing``,
    ``reverse-distill``, ``mask-recover``, ``masked (authorized)``, ...), or, with ``attack``, any registered
    attack with its settings (run on every defense and target, and on the original as its reference).
    ``sweep`` over its options expands to one attack per point (labelled ``LABEL-KEYVALUE``)."""

    lr: tuple[float, ...] | None = _f(None, "a learning rate or a sweep of them (default: the spec's "
                                            "learning_rates of the attack's group)")
    options: Mapping[str, Any] = _f(help="options of the registered attack (weightlock attack --list); they "
                                         "override the plan's", factory=lambda: MappingProxyType({}))
    attack: str | None = _f(None, "a registered attack: this label is an attack of its own, not one of the "
                                  "defenses' plans")
    group: str | None = _f(None, "the learning-rate group of an explicit attack (full, lora, masked; default: "
                                 "its attack's name when a group, else full)")
    reference: str | None = _f(None, "the label of the attack on the original it is compared with (an explicit "
                                     "attack's default: itself)")
    against: tuple[str, ...] | None = _f(None, "the defenses and targets (labels) it runs on (default: all); "
                                               "`reference` runs it on the original even when nothing compares with it")
    best_of: str | None = _f(None, "lr: best:LABEL (or best:reference:LABEL) runs at the attacker's best learning "
                                   "rate of the attack LABEL on the same model (on the original), a later stage")
    seeds: tuple[int, ...] | None = _f(None, "its own seeds (default: the spec's)")
    tasks: tuple[str, ...] | None = _f(None, "the tasks it runs on (default: the spec's)")

    @classmethod
    def parse_all(cls, attacks: Any, source: str) -> Mapping[str, "AttackEntry"] | None:
        if attacks is None:
            return None
        if attacks == [] or attacks == {}:  # none: the build, the capability and the defenses' own evaluations
            return MappingProxyType({})
        if isinstance(attacks, list):
            attacks = {a: {} for a in attacks} if all(isinstance(a, str) for a in attacks) else attacks
        if not isinstance(attacks, Mapping) or not attacks:
            raise WeightlockError(f"{source}: attacks must map attack labels to their settings "
                                  "(e.g. attacks: {full: {lr: [1e-3, 3e-3]}}), be left out for every attack, or be "
                                  "[] for none")
        out: dict[str, AttackEntry] = {}
        for k, v in attacks.items():
            for label, entry in cls.parse(v, str(k), f"attacks.{k}", source):
                if label in out:
                    raise WeightlockError(f"{source}: attack {label!r} is named twice")
                out[label] = entry
        return MappingProxyType(out)

    @classmethod
    def parse(cls, data: Any, label: str, path: str, source: str) -> list[tuple[str, "AttackEntry"]]:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise WeightlockError(f"{source}: {path} must be a mapping of {', '.join(ATTACK_KEYS)}, "
                                  f"got {type(data).__name__}")
        for k in data:
            if k not in ATTACK_KEYS:
                raise WeightlockError(f"{source}: unknown key {k!r} in {path}; valid keys: {', '.join(ATTACK_KEYS)}")
        d = dict(data)
        best_of = None
        if isinstance(d.get("lr"), str) and d["lr"].startswith("best:"):
            best_of = d.pop("lr")[5:]
            if not best_of or best_of == "reference:":
                raise WeightlockError(f"{source}: {path}.lr: best: needs an attack label (best:full, "
                                      "best:reference:full)")
        lr = _lrs(d["lr"], f"{path}.lr", source) if d.get("lr") is not None else None
        seeds = d.get("seeds")
        if seeds is not None:
            seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
            if not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds):
                raise WeightlockError(f"{source}: {path}.seeds must be a non-empty list of distinct integers")
            seeds = tuple(_int(x, f"{path}.seeds", source) for x in seeds)
        tasks = _name_list(d.get("tasks"), f"{path}.tasks", source, "be a non-empty list of the spec's tasks")
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise WeightlockError(f"{source}: {path}.options must be a mapping of attack options")
        if "lr" in options or "seed" in options:
            raise WeightlockError(f"{source}: {path}.options: give the learning rate as {path}.lr and seeds as "
                                  "the spec's seeds")
        attack = d.get("attack")
        if attack is not None:
            _name(attack, f"{path}.attack", source)
        group = d.get("group")
        if group is not None and group not in LR_GROUPS:
            raise WeightlockError(f"{source}: {path}.group must be one of {', '.join(LR_GROUPS)}, got {group!r}")
        if group is not None and attack is None:
            raise WeightlockError(f"{source}: {path}.group is for an explicit attack (give {path}.attack)")
        if attack is not None and group is None:
            group = attack if attack in LR_GROUPS else "full"
        reference = d.get("reference")
        if reference is not None:
            _name(reference, f"{path}.reference", source)
        on = _name_list(d.get("against"), f"{path}.against", source, "name defenses or targets (a list of labels)")
        points = expand_sweep(d.get("sweep"), f"{path}.sweep", source)
        for p in points:
            if "lr" in p or "seed" in p:
                raise WeightlockError(f"{source}: {path}.sweep: sweep learning rates as {path}.lr and seeds as the "
                                      "spec's seeds")
        if "sweep" in d and attack is None:
            attack = "?"  # resolved by check(): a planned attack swept is an explicit attack of the same kind
        return [(point_label(label, p) if "sweep" in d else label,
                 cls(lr, _freeze({k: v for k, v in {**dict(options), **p}.items() if k != "label"}), attack, group,
                     reference, on, best_of, seeds, tasks)) for p in points]

    def to_dict(self) -> dict:
        d = {"lr": list(self.lr) if self.lr is not None else f"best:{self.best_of}" if self.best_of else None,
             "options": thaw(self.options) or None, "seeds": list(self.seeds) if self.seeds else None,
             "tasks": list(self.tasks) if self.tasks else None,
             "attack": self.attack, "group": self.group, "reference": self.reference,
             "against": list(self.against) if self.against else None}
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class TargetEntry:
    """A release attacked as it is, beside the built defenses: a model directory (a release dir) or a ``.gguf``
    file (converted once by the build stage), compared with the original."""

    name: str = _f(help="its label in rows and directories")
    path: str = _f(help="a model directory or a .gguf file (relative to the working directory)")
    max_ppl_ratio: float | None = _f(None, "attack it only when it is faithful: its manifest's recorded perplexity "
                                           "ratio (fidelity.ppl_ratio) at most this (checked before any work)")

    @classmethod
    def parse_all(cls, targets: Any, source: str) -> tuple["TargetEntry", ...]:
        if targets is None:
            return ()
        if isinstance(targets, Mapping):
            targets = [{"name": k, "path": v} for k, v in targets.items()]
        if not isinstance(targets, list):
            raise WeightlockError(f"{source}: targets must be a list of {{name: ..., path: ...}}")
        out = []
        for i, t in enumerate(targets):
            d = _check_keys(t, cls, f"targets[{i}]", source)
            if not isinstance(d.get("path"), str) or not d["path"]:
                raise WeightlockError(f"{source}: targets[{i}].path must be a model directory or a .gguf file")
            name = d.get("name") or Path(d["path"]).stem
            m = _number(d.get("max_ppl_ratio"))
            if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
                raise WeightlockError(f"{source}: targets[{i}].max_ppl_ratio must be a positive number, got {m!r}")
            out.append(cls(_name(name, f"targets[{i}].name", source), d["path"], None if m is None else float(m)))
        return tuple(out)


@dataclass(frozen=True)
class AnalysisEntry:
    """A registered analysis (:data:`weightlock.experiments.analyses.ANALYSES`) run by the analyse stage on what
    the attack stage recorded, with its options."""

    name: str = _f(help="a registered analysis (weightlock run --list)")
    options: Mapping[str, Any] = _f(help="the analysis's options", factory=lambda: MappingProxyType({}))

    @classmethod
    def parse_all(cls, analyses: Any, source: str) -> tuple["AnalysisEntry", ...]:
        if analyses is None:
            return ()
        if isinstance(analyses, (str, Mapping)):
            analyses = [analyses]
        if not isinstance(analyses, list):
            raise WeightlockError(f"{source}: analyses must be a list of analysis names or {{name:, options:}}")
        out = []
        for i, a in enumerate(analyses):
            d = _check_keys({"name": a} if isinstance(a, str) else a, cls, f"analyses[{i}]", source)
            options = d.get("options") or {}
            if not isinstance(options, Mapping):
                raise WeightlockError(f"{source}: analyses[{i}].options must be a mapping")
            out.append(cls(_name(d.get("name"), f"analyses[{i}].name", source), _freeze(dict(options))))
        return tuple(out)


@dataclass(frozen=True)
class Budget:
    """The attacks' budget: at most ``steps`` training steps of ``batch`` sequences, the task scored every
    ``score_every`` steps, stopped after ``patience`` scores without a new best (0: run every step);
    reverse distillation's own distillation steps."""

    steps: int = _f(150, "at most this many training steps per attack run")
    batch: int = _f(8, "sequences per step")
    score_every: int = _f(15, "score the task every this many steps (0: only at the end)")
    patience: int = _f(3, "stop after this many scores without a new best (0: run every step)")
    reverse_distill_steps: int = _f(300, "reverse distillation's own distillation steps")
    block_size: int | None = _f(None, "tokens per sequence (default: 64 on the tiny preset, else 128)")
    train_tokens: int | None = _f(None, "tokens of the attacks' training data (default: 50,000 on the tiny "
                                        "preset, else 200,000)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("block_size", "train_tokens"):
                continue
            _int(v, f"budget.{f.name}", "experiment spec", 0 if f.name in ("patience", "score_every") else 1)
        if self.patience and not self.score_every:
            raise WeightlockError("experiment spec: budget.patience needs budget.score_every > 0")


@dataclass(frozen=True)
class Measure:
    """What is measured beside the attacks: the capability perplexity's held-out tokens, the DLR memory
    against depth at these depths, and whether the HTML/Markdown report is written."""

    capability_tokens: int = _f(32768, "held-out tokens of the capability perplexity")
    memory_depths: tuple[int, ...] = _f((8, 16, 24, 32), "depths of DLR-Lock's memory-vs-depth evaluation")
    report: bool = _f(True, "write the HTML/Markdown report")

    def __post_init__(self) -> None:
        _int(self.capability_tokens, "measure.capability_tokens", "experiment spec", 1)
        if len(self.memory_depths) < 2:
            raise WeightlockError("experiment spec: measure.memory_depths needs at least two depths")
        for d in self.memory_depths:
            _int(d, "measure.memory_depths", "experiment spec", 1)
        if not isinstance(self.report, bool):
            raise WeightlockError(f"experiment spec: measure.report must be true or false, got {self.report!r}")


STAGES = ("build", "attack", "analyse")
DEFAULT_LRS = MappingProxyType({"full": (2e-3,), "lora": (1e-2,), "masked": (2e-3,)})


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment: ``models`` × (``defenses``, built from each model, + ``targets``, given releases; each
    against the unlocked original, the reference) × ``attacks`` (default: every attack of the defenses' plans)
    × ``tasks`` × ``seeds``, within ``budget``, with ``learning_rates`` per attack group (``full``, ``lora``,
    ``masked``: one value or a sweep), ``measure``, then ``analyses``. ``stages`` picks which of build → attack →
    analyse run (each reads what the one before left in the run directory). Built by :meth:`from_dict` /
    :func:`load_spec`, which check everything; frozen."""

    name: str = _f(help="the experiment's name (its default run directory, runs/NAME)")
    description: str = _f("", "one line on what it measures")
    models: tuple[ModelSpec, ...] = _f((ModelSpec(),), "the originals: presets pretrained by the run, or model "
                                                       "directories")
    defenses: tuple[DefenseEntry, ...] = _f((), "registered defenses with their configs, or sweeps of them, "
                                                "built from each model")
    targets: tuple[TargetEntry, ...] = _f((), "given releases (model directories or .gguf files) attacked as "
                                              "they are")
    attacks: Mapping[str, AttackEntry] | None = _f(None, "attacks by label (the plans' or explicit, with "
                                                         "settings and sweeps); default: every planned attack")
    learning_rates: Mapping[str, tuple[float, ...]] = _f(help="learning rate(s) per attack group: full, lora, "
                                                               "masked", factory=lambda: DEFAULT_LRS)
    tasks: tuple[str, ...] = _f(("prose", "recall"), "the tasks attacked (weightlock run --list)")
    seeds: tuple[int, ...] = _f((0,), "every attack runs once per seed")
    budget: Budget = _f(help="the attacks' budget", factory=Budget)
    measure: Measure = _f(help="what is measured beside the attacks", factory=Measure)
    analyses: tuple[AnalysisEntry, ...] = _f((), "registered analyses the analyse stage runs on the records")
    stages: tuple[str, ...] = _f(STAGES, "which stages run: build (models and releases), attack (the runs and "
                                         "summary.json), analyse (the analyses, from what is recorded)")

    # ---- building and checking ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "experiment spec") -> "ExperimentSpec":
        """A spec from plain data (a YAML/JSON document), every value checked; unknown keys refused."""
        d = _check_keys(data, cls, "", source)
        if not isinstance(d.get("name"), str) or not d["name"].strip():
            raise WeightlockError(f"{source}: the spec needs a name (name: my-experiment)")
        if not isinstance(d.get("description", ""), str):
            raise WeightlockError(f"{source}: description must be text")
        models = d.get("models", [{}])
        if not isinstance(models, list) or not models:
            raise WeightlockError(f"{source}: models must be a non-empty list (e.g. models: [{{preset: tiny}}])")
        models = tuple(ModelSpec.parse(m, f"models[{i}]", source) for i, m in enumerate(models))
        labels = [m.label for m in models]
        if len(set(labels)) != len(labels):
            raise WeightlockError(f"{source}: two models share the name {labels}; give each a name")

        entries = DefenseEntry.parse_all(d.get("defenses"), source)
        targets = TargetEntry.parse_all(d.get("targets"), source)
        if not entries and not targets:
            raise WeightlockError(f"{source}: defenses must name at least one registered defense with its config "
                                  "(e.g. defenses: {dlr: {rank: 8}}), or targets a release to attack")
        names = [e.key for e in entries] + [t.name for t in targets]
        if len(set(names)) != len(names):
            raise WeightlockError(f"{source}: a target shares its name with a defense or another target: {names}")
        attacks = AttackEntry.parse_all(d.get("attacks"), source)

        lrs = d.get("learning_rates")
        if lrs is None:
            lrs = DEFAULT_LRS
        else:
            if not isinstance(lrs, Mapping):
                raise WeightlockError(f"{source}: learning_rates must map {', '.join(LR_GROUPS)} to a rate or a list")
            for k in lrs:
                if k not in LR_GROUPS:
                    raise WeightlockError(f"{source}: unknown key {k!r} in learning_rates; valid keys: "
                                          f"{', '.join(LR_GROUPS)}")
            lrs = MappingProxyType({g: _lrs(lrs[g], f"learning_rates.{g}", source) if g in lrs else DEFAULT_LRS[g]
                                    for g in LR_GROUPS})

        tasks = d.get("tasks", list(cls.__dataclass_fields__["tasks"].default))
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise WeightlockError(f"{source}: tasks must be a non-empty list of task names")
        if len(set(tasks)) != len(tasks):
            raise WeightlockError(f"{source}: a task is named twice: {tasks}")
        seeds = d.get("seeds", [0])
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds:
            raise WeightlockError(f"{source}: seeds must be a non-empty list of integers")
        seeds = tuple(_int(s, "seeds", source) for s in seeds)
        if len(set(seeds)) != len(seeds):
            raise WeightlockError(f"{source}: a seed is named twice: {list(seeds)}")
        stages = d.get("stages", list(STAGES))
        if isinstance(stages, str):
            stages = [stages]
        if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
            raise WeightlockError(f"{source}: stages must be a non-empty list of {', '.join(STAGES)}, got {stages!r}")
        stages = tuple(s for s in STAGES if s in stages)
        try:
            budget = Budget(**_check_keys(d.get("budget"), Budget, "budget", source))
            m = _check_keys(d.get("measure"), Measure, "measure", source)
            if "memory_depths" in m:
                if not isinstance(m["memory_depths"], list):
                    raise WeightlockError("experiment spec: measure.memory_depths must be a list of depths")
                m["memory_depths"] = tuple(m["memory_depths"])
            measure = Measure(**m)
        except WeightlockError as e:
            raise WeightlockError(str(e).replace("experiment spec", source, 1)) from None
        spec = cls(name=d["name"].strip(), description=d.get("description", ""), models=models,
                   defenses=entries, targets=targets, attacks=attacks, learning_rates=lrs, tasks=tuple(tasks),
                   seeds=seeds, budget=budget, measure=measure,
                   analyses=AnalysisEntry.parse_all(d.get("analyses"), source), stages=stages)
        return spec.check(source)

    def check(self, source: str = "experiment spec") -> "ExperimentSpec":
        """What needs the registries: the defenses and their configs, the tasks, the attack labels and each
        attack's options, the analyses (every one refused before any work). Returns the spec with a swept
        planned attack resolved to its registered attack."""
        from ..attacks import make_attack
        from ..defenses import make_defense
        from ..eval.tasks import get_task

        for t in self.tasks:
            try:
                get_task(t)
            except WeightlockError as e:
                raise WeightlockError(f"{source}: tasks: {e}") from None
        defenses = []
        for e in self.defenses:
            try:
                defenses.append(e.make())
            except WeightlockError as err:
                raise WeightlockError(f"{source}: defenses.{e.key}: {err}") from None
        if any(d.spec.pretraining for d in defenses):
            for m in self.models:
                if m.path:
                    names = [d.name for d in defenses if d.spec.pretraining]
                    raise WeightlockError(f"{source}: {', '.join(names)} pretrains its own model, which needs a "
                                          f"preset model (models: [{{preset: ...}}]), not the directory {m.path}")
        spec = self
        if self.attacks is not None:
            reference = make_defense("none")
            planned = {s.label: s for d in (*defenses, reference) for s in d.plan()}
            resolved = {}
            keys = {e.key for e in self.defenses} | {t.name for t in self.targets}
            for label, entry in self.attacks.items():
                if entry.attack in (None, "?"):
                    swept = [p for p in planned if entry.attack == "?" and label.startswith(p + "-")]
                    known = label if label in planned else max(swept, key=len, default=None)
                    if known is None:
                        raise WeightlockError(f"{source}: unknown attack {label!r} in attacks; the defenses' attacks: "
                                              f"{', '.join(planned)} (or give its attack: a registered attack)")
                    if entry.attack == "?":  # a swept planned attack: the plan's attack with the sweep's options
                        p = planned[known]
                        entry = dataclasses.replace(entry, attack=p.attack, group=p.lr,
                                                    options=_freeze({**p.options, **thaw(entry.options)}))
                    name, options = (planned[known].attack, {**planned[known].options, **thaw(entry.options)}) \
                        if entry.attack is None else (entry.attack, thaw(entry.options))
                else:
                    name, options = entry.attack, thaw(entry.options)
                try:
                    make_attack(name, **options)
                except WeightlockError as err:
                    raise WeightlockError(f"{source}: attacks.{label}: {err}") from None
                if entry.best_of is not None:
                    of = entry.best_of.removeprefix("reference:")
                    if of not in self.attacks or of == label:
                        raise WeightlockError(f"{source}: attacks.{label}.lr: best:{entry.best_of} names no other "
                                              f"attack of the spec ({', '.join(self.attacks)})")
                    if self.attacks[of].best_of is not None:
                        raise WeightlockError(f"{source}: attacks.{label}.lr: best:{entry.best_of} is itself run at "
                                              "a best rate (one stage of best rates only)")
                for t in entry.tasks or ():
                    if t not in self.tasks:
                        raise WeightlockError(f"{source}: attacks.{label}.tasks: {t!r} is not one of the spec's "
                                              f"tasks ({', '.join(self.tasks)})")
                for k in entry.against or ():
                    if k not in keys | {"reference"}:
                        raise WeightlockError(f"{source}: attacks.{label}.against: {k!r} is no defense or target "
                                              f"of the spec ({', '.join(sorted(keys))})")
                resolved[label] = entry
            spec = dataclasses.replace(self, attacks=MappingProxyType(resolved))
        from .analyses import ANALYSES, check_options

        for a in self.analyses:
            try:
                check_options(ANALYSES.get(a.name), thaw(a.options))
            except WeightlockError as err:
                raise WeightlockError(f"{source}: analyses.{a.name}: {err}") from None
        return spec

    # ---- views ------------------------------------------------------------------------------------
    def with_defenses(self, names) -> "ExperimentSpec":
        """This spec with only the named defenses (a registry name or a label; a name picks every entry of
        that defense, and a defense the spec does not configure runs with its config's defaults); attack
        entries no chosen defense plans are dropped."""
        entries: list[DefenseEntry] = []
        for n in names:
            entries += [e for e in self.defenses if e.key == n] or [e for e in self.defenses if e.name == n] \
                or [DefenseEntry(n)]
        if len({e.key for e in entries}) != len(entries):
            raise WeightlockError(f"a defense is named twice: {', '.join(names)}")
        attacks = self.attacks
        if attacks is not None:
            planned = {s.label for e in entries for s in e.make().plan()}
            attacks = MappingProxyType({k: v for k, v in attacks.items() if k in planned or v.attack is not None})
            if self.attacks and not attacks:
                raise WeightlockError(f"none of the spec's attacks ({', '.join(self.attacks)}) is planned against "
                                      f"{', '.join(names)} (their attacks: {', '.join(sorted(planned))})")
        return dataclasses.replace(self, defenses=tuple(entries), attacks=attacks).check()

    def with_seed(self, seed: int) -> "ExperimentSpec":
        """This spec with every preset model pretrained at ``seed`` (a rerun that measures the seed spread of
        what the spec records); a spec whose models are all directories is refused."""
        _int(seed, "seed", "--seed")
        if all(m.path is not None for m in self.models):
            raise WeightlockError(f"spec {self.name}: --seed seeds the pretraining of preset models; this spec's "
                                  "models are all directories, used as they are")
        models = tuple(m if m.path is not None else dataclasses.replace(m, seed=seed) for m in self.models)
        return dataclasses.replace(self, models=models).check()

    def lrs(self, label: str, group: str) -> tuple[float, ...]:
        """The learning rates the attack ``label`` (of the plan's learning-rate ``group``) runs at."""
        entry = (self.attacks or {}).get(label)
        return entry.lr if entry is not None and entry.lr is not None else self.learning_rates[group]

    def to_dict(self) -> dict:
        """The spec as plain data (what :meth:`from_dict` reads back to an equal spec; sweeps expanded)."""
        d = {"name": self.name, "description": self.description,
             "models": [{k: v for k, v in dataclasses.asdict(m).items() if v is not None} for m in self.models],
             "defenses": ({e.name: thaw(e.config) for e in self.defenses} if all(not e.label for e in self.defenses)
                          else [e.to_dict() for e in self.defenses]),
             "learning_rates": {k: list(v) for k, v in self.learning_rates.items()},
             "tasks": list(self.tasks), "seeds": list(self.seeds),
             "budget": {k: v for k, v in dataclasses.asdict(self.budget).items() if v is not None},
             "measure": {**dataclasses.asdict(self.measure), "memory_depths": list(self.measure.memory_depths)},
             "stages": list(self.stages)}
        if self.targets:
            d["targets"] = [{k: v for k, v in dataclasses.asdict(t).items() if v is not None} for t in self.targets]
        if self.attacks is not None:
            d["attacks"] = {k: a.to_dict() for k, a in self.attacks.items()}
        if self.analyses:
            d["analyses"] = [{"name": a.name, "options": thaw(a.options)} for a in self.analyses]
        return d


def shipped_specs() -> list[str]:
    """The names of the specs shipped in the package (``weightlock run NAME``)."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(spec: str | Path) -> ExperimentSpec:
    """A spec from a YAML (``.yaml``/``.yml``) or JSON file, or a shipped spec's name (``demo-quick``)."""
    path = Path(spec)
    if not path.is_file():
        if isinstance(spec, str) and (SPEC_DIR / f"{spec}.yaml").is_file():
            path = SPEC_DIR / f"{spec}.yaml"
        else:
            raise WeightlockError(f"{spec}: no such spec file, nor a shipped spec (shipped: "
                                  f"{', '.join(shipped_specs())})")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WeightlockError(f"{path}: not valid JSON ({e})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise WeightlockError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return ExperimentSpec.from_dict(data, source=str(path) if path.parent != SPEC_DIR else f"spec {path.stem}")
