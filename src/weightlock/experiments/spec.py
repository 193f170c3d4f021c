"""An experiment as data: :class:`ExperimentSpec`, loaded from YAML or JSON and checked before any work.

A spec names the model(s) to attack (a pretraining preset, or a local model directory), the defenses
with their configs, the attacks (by their label in the defenses' plans, with options and a learning-rate
sweep), the tasks, the seeds, the budget (steps, batch, scoring, patience) and what to measure. Every
section is a frozen dataclass that validates itself; a key the spec does not know is refused with one
line that names it and the valid ones. ``weightlock run SPEC.yaml|NAME --out DIR`` runs it
(:func:`weightlock.experiments.runner.run_experiment`); the specs shipped in the package
(:func:`shipped_specs`: ``demo``, ``demo-quick``) are what ``weightlock demo [--quick]`` runs.
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


@dataclass(frozen=True)
class ModelSpec:
    """A model to defend and attack: ``preset`` (pretrained by the run on builtin:code, as
    ``weightlock pretrain --preset``) or ``path`` (a local model directory, used as it is; the preset then
    only sets the block size and token budget of the attacks' data). ``name`` (default: the preset or the
    directory's name) names its run directory when a spec has several models."""

    preset: str = "small"
    path: str | None = None
    name: str | None = None

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
        if spec.name is not None and (not isinstance(spec.name, str) or not spec.name or "/" in spec.name):
            raise WeightlockError(f"{source}: {path}.name must be a non-empty name without '/', got {spec.name!r}")
        return spec

    @property
    def label(self) -> str:
        return self.name or (Path(self.path).name if self.path else self.preset)


@dataclass(frozen=True)
class DefenseEntry:
    """A registered defense (``weightlock.defenses``) and its config (the defense's ``Config`` fields)."""

    name: str
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def make(self):
        """The configured :class:`~weightlock.defenses.Defense` (validated)."""
        from ..defenses import make_defense

        return make_defense(self.name, **thaw(self.config))


@dataclass(frozen=True)
class AttackEntry:
    """An attack of the defenses' plans, by its label (``full``, ``lora``, ``checkpointing``,
    ``reverse-distill``, ``mask-recover``, ``masked (authorized)``, ...): ``lr`` a learning rate or a
    sweep (default: the plan's learning rate for the attack's group, see ``learning_rates``) and
    ``options`` of the registered attack (``weightlock attack --list``) that override the plan's."""

    lr: tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def parse(cls, data: Any, path: str, source: str) -> "AttackEntry":
        d = _check_keys(data, cls, path, source)
        lr = _lrs(d["lr"], f"{path}.lr", source) if d.get("lr") is not None else None
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise WeightlockError(f"{source}: {path}.options must be a mapping of attack options")
        if "lr" in options or "seed" in options:
            raise WeightlockError(f"{source}: {path}.options: give the learning rate as {path}.lr and seeds as "
                                  "the spec's seeds")
        return cls(lr, _freeze(options))


@dataclass(frozen=True)
class Budget:
    """The attacks' budget: at most ``steps`` training steps of ``batch`` sequences, the task scored every
    ``score_every`` steps, stopped after ``patience`` scores without a new best (0: run every step);
    reverse distillation's own distillation steps."""

    steps: int = 150
    batch: int = 8
    score_every: int = 15
    patience: int = 3
    reverse_distill_steps: int = 300

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _int(getattr(self, f.name), f"budget.{f.name}", "experiment spec",
                 0 if f.name in ("patience", "score_every") else 1)
        if self.patience and not self.score_every:
            raise WeightlockError("experiment spec: budget.patience needs budget.score_every > 0")


@dataclass(frozen=True)
class Measure:
    """What is measured beside the attacks: the capability perplexity's held-out tokens, the DLR memory
    against depth at these depths, and whether the HTML/Markdown report is written."""

    capability_tokens: int = 32768
    memory_depths: tuple[int, ...] = (8, 16, 24, 32)
    report: bool = True

    def __post_init__(self) -> None:
        _int(self.capability_tokens, "measure.capability_tokens", "experiment spec", 1)
        if len(self.memory_depths) < 2:
            raise WeightlockError("experiment spec: measure.memory_depths needs at least two depths")
        for d in self.memory_depths:
            _int(d, "measure.memory_depths", "experiment spec", 1)
        if not isinstance(self.report, bool):
            raise WeightlockError(f"experiment spec: measure.report must be true or false, got {self.report!r}")


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment: ``models`` × ``defenses`` (each against the unlocked original, the reference) ×
    ``attacks`` (default: every attack of the defenses' plans) × ``tasks`` × ``seeds``, within ``budget``,
    with ``learning_rates`` per attack group (``full``, ``lora``, ``masked``: one value or a sweep), and
    ``measure``. Built by :meth:`from_dict` / :func:`load_spec`, which check everything; frozen."""

    name: str
    description: str = ""
    models: tuple[ModelSpec, ...] = (ModelSpec(),)
    defenses: tuple[DefenseEntry, ...] = ()
    attacks: Mapping[str, AttackEntry] | None = None
    learning_rates: Mapping[str, tuple[float, ...]] = field(
        default_factory=lambda: MappingProxyType({"full": (2e-3,), "lora": (1e-2,), "masked": (2e-3,)}))
    tasks: tuple[str, ...] = ("prose", "recall")
    seeds: tuple[int, ...] = (0,)
    budget: Budget = field(default_factory=Budget)
    measure: Measure = field(default_factory=Measure)

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

        defenses = d.get("defenses")
        if isinstance(defenses, list):  # [dlr, pmp] or [{dlr: {...}}]
            items: dict = {}
            for x in defenses:
                for k, v in ({x: {}} if isinstance(x, str) else dict(x)).items():
                    if k in items:
                        raise WeightlockError(f"{source}: defense {k!r} is named twice")
                    items[k] = v
            defenses = items
        if not isinstance(defenses, Mapping) or not defenses:
            raise WeightlockError(f"{source}: defenses must name at least one registered defense with its config "
                                  "(e.g. defenses: {dlr: {rank: 8}})")
        entries = []
        for k, v in defenses.items():
            if v is not None and not isinstance(v, Mapping):
                raise WeightlockError(f"{source}: defenses.{k} must be a mapping of the defense's config")
            entries.append(DefenseEntry(str(k), _freeze(dict(v or {}))))

        attacks = d.get("attacks")
        if attacks is not None:
            if isinstance(attacks, list):
                attacks = {a: {} for a in attacks}
            if not isinstance(attacks, Mapping) or not attacks:
                raise WeightlockError(f"{source}: attacks must map attack labels to their settings "
                                      "(e.g. attacks: {full: {lr: [1e-3, 3e-3]}}), or be left out for every attack")
            attacks = MappingProxyType({str(k): AttackEntry.parse(v, f"attacks.{k}", source)
                                        for k, v in attacks.items()})

        lrs = d.get("learning_rates")
        if lrs is None:
            lrs = cls.__dataclass_fields__["learning_rates"].default_factory()
        else:
            if not isinstance(lrs, Mapping):
                raise WeightlockError(f"{source}: learning_rates must map {', '.join(LR_GROUPS)} to a rate or a list")
            for k in lrs:
                if k not in LR_GROUPS:
                    raise WeightlockError(f"{source}: unknown key {k!r} in learning_rates; valid keys: "
                                          f"{', '.join(LR_GROUPS)}")
            default = cls.__dataclass_fields__["learning_rates"].default_factory()
            lrs = MappingProxyType({g: _lrs(lrs[g], f"learning_rates.{g}", source) if g in lrs else default[g]
                                    for g in LR_GROUPS})

        tasks = d.get("tasks", list(cls.tasks))
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
                   defenses=tuple(entries), attacks=attacks, learning_rates=lrs, tasks=tuple(tasks), seeds=seeds,
                   budget=budget, measure=measure)
        spec.check(source)
        return spec

    def check(self, source: str = "experiment spec") -> None:
        """What needs the registries: the defenses and their configs, the tasks, the attack labels and each
        attack's options (every one refused before any work)."""
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
                raise WeightlockError(f"{source}: defenses.{e.name}: {err}") from None
        if any(d.spec.pretraining for d in defenses):
            for m in self.models:
                if m.path:
                    names = [d.name for d in defenses if d.spec.pretraining]
                    raise WeightlockError(f"{source}: {', '.join(names)} pretrains its own model, which needs a "
                                          f"preset model (models: [{{preset: ...}}]), not the directory {m.path}")
        if self.attacks is not None:
            reference = make_defense("none")
            planned = {s.label: s for d in (*defenses, reference) for s in d.plan()}
            for label, entry in self.attacks.items():
                if label not in planned:
                    raise WeightlockError(f"{source}: unknown attack {label!r} in attacks; the defenses' attacks: "
                                          f"{', '.join(planned)}")
                from ..attacks import make_attack

                try:
                    make_attack(planned[label].attack, **{**planned[label].options, **thaw(entry.options)})
                except WeightlockError as err:
                    raise WeightlockError(f"{source}: attacks.{label}: {err}") from None

    # ---- views ------------------------------------------------------------------------------------
    def with_defenses(self, names) -> "ExperimentSpec":
        """This spec with only the named defenses (a defense the spec does not configure runs with its
        config's defaults); attack entries no chosen defense plans are dropped."""
        configured = {e.name: e for e in self.defenses}
        entries = tuple(configured.get(n, DefenseEntry(n)) for n in names)
        if len({e.name for e in entries}) != len(entries):
            raise WeightlockError(f"a defense is named twice: {', '.join(names)}")
        attacks = self.attacks
        if attacks is not None:
            planned = {s.label for e in entries for s in e.make().plan()}
            attacks = MappingProxyType({k: v for k, v in attacks.items() if k in planned})
            if not attacks:
                raise WeightlockError(f"none of the spec's attacks ({', '.join(self.attacks)}) is planned against "
                                      f"{', '.join(names)} (their attacks: {', '.join(sorted(planned))})")
        spec = dataclasses.replace(self, defenses=entries, attacks=attacks)
        spec.check()
        return spec

    def lrs(self, label: str, group: str) -> tuple[float, ...]:
        """The learning rates the attack ``label`` (of the plan's learning-rate ``group``) runs at."""
        entry = (self.attacks or {}).get(label)
        return entry.lr if entry is not None and entry.lr is not None else self.learning_rates[group]

    def to_dict(self) -> dict:
        """The spec as plain data (what :meth:`from_dict` reads back to an equal spec)."""
        d = {"name": self.name, "description": self.description,
             "models": [{k: v for k, v in dataclasses.asdict(m).items() if v is not None} for m in self.models],
             "defenses": {e.name: thaw(e.config) for e in self.defenses},
             "learning_rates": {k: list(v) for k, v in self.learning_rates.items()},
             "tasks": list(self.tasks), "seeds": list(self.seeds),
             "budget": dataclasses.asdict(self.budget),
             "measure": {**dataclasses.asdict(self.measure), "memory_depths": list(self.measure.memory_depths)}}
        if self.attacks is not None:
            d["attacks"] = {k: {**({"lr": list(a.lr)} if a.lr is not None else {}),
                                **({"options": thaw(a.options)} if a.options else {})}
                            for k, a in self.attacks.items()}
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
