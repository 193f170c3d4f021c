"""The defense interface and its registry (the counterpart of ``weightlock.attacks``' attack registry)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import check_types
from ..errors import WeightlockError
from ..io import jsonable, read_json, write_json
from ..registry import Registry
from ..schema import DEFENSE_BUILD, stamp
from .plan import FULL, LORA, AttackSpec, HarnessPlan


def register_defense(name: str):
    """Class decorator: register a :class:`Defense` subclass under ``name`` (a taken name is an error; so is
    ``reference``, the name the harness gives the original's attack runs)."""
    return DEFENSES.register(name)


def get_defense(name: str) -> type["Defense"]:
    """The registered defense class called ``name``."""
    return DEFENSES.get(name)


def make_defense(name: str, **options) -> "Defense":
    """The defense ``name`` with its config built from ``options`` (validated; unknown options refused)."""
    cls = get_defense(name)
    Config = cls.spec.Config
    valid = {f.name for f in dataclasses.fields(Config)}
    bad = set(options) - valid
    if bad:
        raise WeightlockError(f"defense {name!r} has no option(s) {', '.join(sorted(bad))}; "
                              f"options: {', '.join(sorted(valid)) or 'none'}")
    return cls(Config(**options))


@dataclass
class DefenseConfig:
    """Base of defense configs: scalar field types are checked at construction; subclasses add checks in
    :meth:`validate` (raise :class:`WeightlockError`)."""

    def __post_init__(self) -> None:
        check_types(self, f"{type(self).__name__}")

    def validate(self) -> None:
        """Check the config's values (field types are checked at construction; :func:`make_defense` calls this);
        raise :class:`WeightlockError`. The base accepts everything."""
        pass


class DefenseHooks:
    """What the experiment harness (``weightlock demo`` / ``run``) asks of a defense beyond building it: its
    names in tables and stage titles, options its attacks need, extra evaluations, summary fields and notes;
    and what the report draws from its summary fields (:meth:`report`).
    The base adds nothing; a defense names its subclass in :attr:`DefenseInfo.hooks` and reaches it as
    ``defense.hooks()``."""

    def __init__(self, defense: Defense) -> None:
        self.defense = defense
        self.cfg = defense.cfg

    @property
    def title(self) -> str:
        """The verdict's name: the defense's ``spec.title``, or its registered name."""
        return self.defense.spec.title or self.defense.name

    @property
    def label(self) -> str:
        """The released model's name in tables and figures."""
        return self.title

    def build_title(self) -> str:
        """What building the release does, in a few words (the harness's stage title)."""
        if self.defense.spec.pretraining:
            return f"pretrain a {self.title} model, same settings"
        return f"apply {self.title} to the base model"

    def attack_options(self, spec: AttackSpec, out: Path, plan: HarnessPlan) -> dict:
        """Options an attack needs from this build (the private mask...) or from the harness's plan."""
        return {}

    def evaluate(self, release: Path, out: Path, plan: HarnessPlan) -> dict:
        """Extra evaluations of the release: the summary keys named in ``spec.evaluations``."""
        return {}

    def summarize(self, rows: list[dict], out: Path, plan: HarnessPlan) -> dict:
        """Summary fields derived from the attack rows (all defenses' and the reference's) and the build."""
        return {}

    def verdict_notes(self, rows: list[dict], summary: dict) -> list[str]:
        """Facts the verdict line adds after the per-task results."""
        return []

    def summary_lines(self, summary: dict) -> list[str]:
        """Extra lines of the terminal summary (before the verdicts)."""
        return []

    def report(self, summary: dict) -> list:
        """What ``weightlock report`` draws from this defense's part of a recorded summary (``summary``: the
        demo's or ``weightlock run``'s ``summary.json``): :class:`weightlock.tables.Table` s and
        :class:`weightlock.tables.Figure` s of its own (a figure's ``panels`` the items themselves), and
        :class:`weightlock.tables.Panels` that add items to a registered figure (``"memory_vs_depth.png"``...).
        The base brings nothing: the report then shows the generic section (a table of what the summary
        records about the defense and its attacker-gain figure)."""
        return []


@dataclass(frozen=True)
class DefenseInfo:
    """What a defense is, as data (a defense class's ``spec``)."""

    Config: type[DefenseConfig] = DefenseConfig  # its settings (a dataclass that validates itself)
    title: str = ""  # the verdict's name ("DLR-Lock"); default: the registry name
    description: str = ""
    # True: applied at pretraining time (its source is a PretrainConfig); False: to a finished model
    pretraining: bool = False
    workdir: str | None = None  # the harness's directory name for its build; default: the name
    build_options: tuple[str, ...] = ()  # keyword arguments of apply() besides source and out
    # the attacks that make sense against it, each with its reference attack on the original
    attacks: tuple[AttackSpec, ...] = (FULL, LORA)
    authorized: AttackSpec | None = None  # the owner's own fine-tuning (a yardstick, not an attack)
    evaluations: tuple[str, ...] = ()  # the summary keys its hooks' evaluate() fills
    # a build by the defense's own command (no build record) is finished when this file is in its out
    # directory; its release is then ``out / release_subdir``
    finished_file: str | None = None
    release_subdir: str = ""
    hooks: type[DefenseHooks] = DefenseHooks

    def plan(self) -> tuple[AttackSpec, ...]:
        """The attacks, then the authorized fine-tuning if the defense has one."""
        return self.attacks + ((self.authorized,) if self.authorized else ())


# class attributes of a defense written before DefenseInfo (the README's example): folded into its spec
_LEGACY = tuple(f.name for f in dataclasses.fields(DefenseInfo) if f.name not in ("finished_file", "release_subdir",
                                                                                   "hooks"))


class Defense:
    """A defense: a typed config (``spec.Config``, validated) plus what the harness needs to run it.

    * ``spec``: what the defense is (:class:`DefenseInfo`: its config class, title, whether it is applied
      at pretraining time, the attacks that make sense against it, the owner's authorized fine-tuning...).
    * ``apply(source, out) -> release dir`` builds the release. A post-hoc defense (``pretraining =
      False``) takes a model directory (or a ``.gguf`` file); a pretraining-time one (``pretraining = True``)
      takes a :class:`weightlock.train.pretrain.PretrainConfig` and pretrains its own model. Run-time
      switches that are not part of the release's settings (``overwrite``, ``resume``...) are the keyword
      arguments of ``apply`` named in ``spec.build_options``; :meth:`build` (what ``weightlock defend``,
      ``lock`` and ``pretrain --method pmp`` call) passes them on and refuses others.
    * ``hooks()``: what the harness asks beyond the build (:class:`DefenseHooks`: extra evaluations, summary
      fields, notes for the verdict and the terminal), the class named in ``spec.hooks``.

    A subclass that sets the older class attributes (``description = ...``, ``Config = ...``, ``attacks``...)
    instead of ``spec`` gets them folded into its ``spec``.
    """

    name: ClassVar[str] = "defense"
    spec: ClassVar[DefenseInfo] = DefenseInfo()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = {k: cls.__dict__[k] for k in _LEGACY if k in cls.__dict__}
        if legacy:
            cls.spec = dataclasses.replace(cls.spec, **legacy)

    def __init__(self, cfg: DefenseConfig | None = None) -> None:
        Config = self.spec.Config
        cfg = Config() if cfg is None else cfg
        if not isinstance(cfg, Config):
            raise WeightlockError(f"defense {self.name!r} takes a {Config.__name__}, got {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg

    def plan(self) -> tuple[AttackSpec, ...]:
        """The attacks, then the authorized fine-tuning if the defense has one."""
        return self.spec.plan()

    def hooks(self) -> DefenseHooks:
        """What the harness asks of this defense beyond its build (``spec.hooks``, bound to it)."""
        return self.spec.hooks(self)

    def record(self) -> dict:
        """What a summary records about this defense."""
        hooks = self.hooks()
        return {"name": self.name, "title": hooks.title, "label": hooks.label, "description": self.spec.description,
                "pretraining": self.spec.pretraining, "config": jsonable(dataclasses.asdict(self.cfg))}

    # ---- building the release ---------------------------------------------------------------------
    def apply(self, source, out: Path, **options) -> Path:
        """Build the release into ``out`` from ``source``; return the release directory. ``options``: the
        run-time switches named in ``spec.build_options``."""
        raise NotImplementedError(f"defense {self.name!r} does not implement apply()")

    def build(self, source, out: str | os.PathLike, **options) -> Path:
        """:meth:`apply` (with the run-time ``options`` named in ``spec.build_options``), then record the
        finished build beside ``out`` (what :meth:`release` reads; the main process of a distributed run
        only)."""
        bad = set(options) - set(self.spec.build_options)
        if bad:
            raise WeightlockError(f"defense {self.name!r} has no build option(s) {', '.join(sorted(bad))}; "
                                  f"it takes: {', '.join(self.spec.build_options) or 'none'}")
        _check_source(self, source)
        out = Path(out)
        release = Path(self.apply(source, out, **options))
        from ..train.finetune import is_main_process

        if not is_main_process():
            return release
        if not release.is_dir():
            raise WeightlockError(f"defense {self.name!r}: apply() returned {release}, not a directory")
        write_json(build_file(out), stamp(DEFENSE_BUILD, {
            "defense": self.name, "config": jsonable(dataclasses.asdict(self.cfg)), "release": str(release),
            "source": str(source) if not self.spec.pretraining else None}))
        return release

    def release(self, out: str | os.PathLike) -> Path | None:
        """The finished release a build with this config left in ``out``, or None (build it): the one its
        build record names, or (no record) one the defense's own command finished (``spec.finished_file``)."""
        out = Path(out)
        record = build_file(out)
        if record.exists():
            r = read_json(record)
            same = r.get("defense") == self.name and r.get("config") == jsonable(dataclasses.asdict(self.cfg))
            return Path(r["release"]) if same and Path(r["release"]).is_dir() else None
        done = self.spec.finished_file
        return out / self.spec.release_subdir if done and (out / done).exists() else None


def build_file(out: str | os.PathLike) -> Path:
    """Where a build into ``out`` records what it built (``OUT.defense.json``, beside ``out``)."""
    return Path(out).with_name(Path(out).name + ".defense.json")


def _check_source(defense: Defense, source) -> None:
    """Refuse a source of the wrong sort (a model directory vs a pretraining config)."""
    if defense.spec.pretraining:
        from ..train.pretrain import PretrainConfig

        if not isinstance(source, PretrainConfig):
            raise WeightlockError(f"defense {defense.name!r} is applied at pretraining time: its source is a "
                                  f"PretrainConfig, got {type(source).__name__}")
    else:
        what = (f"defense {defense.name!r} is applied to a finished model: its source is a model directory "
                "or a .gguf file")
        if not isinstance(source, (str, os.PathLike)):
            raise WeightlockError(f"{what}, got {source!r}")
        p = Path(source)
        if not p.exists():
            raise WeightlockError(f"{p}: model directory not found ({what})")
        if not (p.is_dir() or p.suffix.lower() == ".gguf"):
            raise WeightlockError(f"{what}, got the file {p}")


DEFENSES: Registry[type[Defense]] = Registry("defense", Defense, group="weightlock.defenses", reserved=("reference",))


def registered_in(summary: dict) -> list[Defense]:
    """The registered defenses a recorded summary (the demo's or ``weightlock run``'s ``summary.json``) names,
    each with its recorded config where that still loads (else its defaults); defenses not installed here
    are left out."""
    from ..tables import defenses_of

    out = []
    for rec in defenses_of(summary):
        cls = DEFENSES.get(rec["name"], None)
        if cls is None:
            continue
        for make in (lambda: cls(cls.spec.Config(**rec.get("config", {}))), cls):  # noqa: B023  (called within this iteration)
            try:
                out.append(make())
                break
            except (TypeError, WeightlockError):
                continue
    return out
