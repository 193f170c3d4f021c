"""The defense interface and its registry (the counterpart of ``weightlock.attacks``' attack registry)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import check_types
from ..errors import WeightlockError
from ..io import jsonable, read_json, write_json
from ..registry import Registry
from ..schema import DEFENSE_BUILD, stamp


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
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    bad = set(options) - valid
    if bad:
        raise WeightlockError(f"defense {name!r} has no option(s) {', '.join(sorted(bad))}; "
                              f"options: {', '.join(sorted(valid)) or 'none'}")
    return cls(cls.Config(**options))


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


@dataclass
class AttackSpec:
    """One attack of a defense's plan: ``attack`` (a name in ``weightlock.attacks.ATTACKS``) with
    ``options``, at the learning rate the harness keeps under ``lr`` (``full``, ``lora`` or ``masked``),
    measured against ``reference``: the label of the ``none`` defense's attack run on the original."""

    label: str
    attack: str
    options: dict = field(default_factory=dict)
    lr: str = "full"
    reference: str | None = "full"


class Defense:
    """A defense: a typed config (``Config``, validated) plus what the harness needs to run it.

    * ``apply(source, out) -> release dir`` builds the release. A post-hoc defense (``pretraining =
      False``) takes a model directory (or a ``.gguf`` file); a pretraining-time one (``pretraining = True``)
      takes a :class:`weightlock.train.pretrain.PretrainConfig` and pretrains its own model. Run-time
      switches that are not part of the release's settings (``overwrite``, ``resume``...) are the keyword
      arguments of ``apply`` named in ``build_options``; :meth:`build` (what ``weightlock defend``,
      ``lock`` and ``pretrain --method pmp`` call) passes them on and refuses others.
    * ``attacks``: the attacks that make sense against it, each with its reference attack on the original;
      ``authorized``: the owner's own fine-tuning (the yardstick a defense that allows one is measured
      by; not counted as an attack).
    * optional extra evaluations (``evaluate``, filling the summary keys in ``evaluations``), summary
      fields derived from the attack rows (``summarize``), and notes for the verdict and the terminal.
    """

    name: ClassVar[str] = "defense"
    title: ClassVar[str] = ""  # the verdict's name ("DLR-Lock"); default: the registry name
    description: ClassVar[str] = ""
    Config: ClassVar[type] = DefenseConfig
    pretraining: ClassVar[bool] = False
    workdir: ClassVar[str | None] = None  # the harness's directory name for its build; default: the name
    build_options: ClassVar[tuple[str, ...]] = ()  # keyword arguments of apply() besides source and out
    attacks: ClassVar[tuple[AttackSpec, ...]] = (
        AttackSpec("full", "full", {}, "full", "full"),
        AttackSpec("lora", "lora", {"targets": "attention"}, "lora", "lora"),
    )
    authorized: ClassVar[AttackSpec | None] = None
    evaluations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: DefenseConfig | None = None) -> None:
        cfg = self.Config() if cfg is None else cfg
        if not isinstance(cfg, self.Config):
            raise WeightlockError(f"defense {self.name!r} takes a {self.Config.__name__}, got {type(cfg).__name__}")
        cfg.validate()
        self.cfg = cfg

    # ---- naming -----------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        """The defense's ``title``, or its registered name."""
        return self.title or self.name

    @property
    def label(self) -> str:
        """The released model's name in tables and figures."""
        return self.display_name

    def build_title(self) -> str:
        """What building the release does, in a few words (the harness's stage title)."""
        if self.pretraining:
            return f"pretrain a {self.display_name} model, same settings"
        return f"apply {self.display_name} to the base model"

    def record(self) -> dict:
        """What a summary records about this defense."""
        return {"name": self.name, "title": self.display_name, "label": self.label, "description": self.description,
                "pretraining": self.pretraining, "config": jsonable(dataclasses.asdict(self.cfg))}

    # ---- building the release ---------------------------------------------------------------------
    def apply(self, source, out: Path, **options) -> Path:
        """Build the release into ``out`` from ``source``; return the release directory. ``options``: the
        run-time switches named in ``build_options``."""
        raise NotImplementedError(f"defense {self.name!r} does not implement apply()")

    def check_source(self, source) -> None:
        """Refuse a source of the wrong sort (a model directory vs a pretraining config)."""
        if self.pretraining:
            from ..train.pretrain import PretrainConfig

            if not isinstance(source, PretrainConfig):
                raise WeightlockError(f"defense {self.name!r} is applied at pretraining time: its source is a "
                                      f"PretrainConfig, got {type(source).__name__}")
        else:
            what = (f"defense {self.name!r} is applied to a finished model: its source is a model directory "
                    "or a .gguf file")
            if not isinstance(source, (str, os.PathLike)):
                raise WeightlockError(f"{what}, got {source!r}")
            p = Path(source)
            if not p.exists():
                raise WeightlockError(f"{p}: model directory not found ({what})")
            if not (p.is_dir() or p.suffix.lower() == ".gguf"):
                raise WeightlockError(f"{what}, got the file {p}")

    def build(self, source, out: str | os.PathLike, **options) -> Path:
        """:meth:`apply` (with the run-time ``options`` named in ``build_options``), then record the finished
        build beside ``out`` (what :meth:`release` reads; the main process of a distributed run only)."""
        bad = set(options) - set(self.build_options)
        if bad:
            raise WeightlockError(f"defense {self.name!r} has no build option(s) {', '.join(sorted(bad))}; "
                                  f"it takes: {', '.join(self.build_options) or 'none'}")
        self.check_source(source)
        out = Path(out)
        release = Path(self.apply(source, out, **options))
        from ..train.finetune import is_main_process

        if not is_main_process():
            return release
        if not release.is_dir():
            raise WeightlockError(f"defense {self.name!r}: apply() returned {release}, not a directory")
        write_json(self.build_file(out), stamp(DEFENSE_BUILD, {
            "defense": self.name, "config": jsonable(dataclasses.asdict(self.cfg)), "release": str(release),
            "source": str(source) if not self.pretraining else None}))
        return release

    @staticmethod
    def build_file(out: Path) -> Path:
        """Where a build into ``out`` records what it built (``OUT.defense.json``, beside ``out``)."""
        return Path(out).with_name(Path(out).name + ".defense.json")

    def release(self, out: str | os.PathLike) -> Path | None:
        """The finished release a build with this config left in ``out``, or None (build it)."""
        out = Path(out)
        record = self.build_file(out)
        if record.exists():
            r = read_json(record)
            same = r.get("defense") == self.name and r.get("config") == jsonable(dataclasses.asdict(self.cfg))
            return Path(r["release"]) if same and Path(r["release"]).is_dir() else None
        return self.finished(out)

    def finished(self, out: Path) -> Path | None:
        """A finished release in ``out`` built without the record (by the defense's own command)."""
        return None

    # ---- what the harness runs against it --------------------------------------------------------
    def plan(self) -> tuple[AttackSpec, ...]:
        """The attacks, then the authorized fine-tuning if the defense has one."""
        return self.attacks + ((self.authorized,) if self.authorized else ())

    def attack_options(self, spec: AttackSpec, out: Path, plan: Any) -> dict:
        """Options an attack needs from this build (the private mask...) or from the harness's plan."""
        return {}

    def evaluate(self, release: Path, out: Path, plan: Any) -> dict:
        """Extra evaluations of the release: the summary keys named in ``evaluations``."""
        return {}

    def summarize(self, rows: list[dict], out: Path, plan: Any) -> dict:
        """Summary fields derived from the attack rows (all defenses' and the reference's) and the build."""
        return {}

    def verdict_notes(self, rows: list[dict], summary: dict) -> list[str]:
        """Facts the verdict line adds after the per-task results."""
        return []

    def summary_lines(self, summary: dict) -> list[str]:
        """Extra lines of the terminal summary (before the verdicts)."""
        return []


DEFENSES: Registry[type[Defense]] = Registry("defense", Defense, group="weightlock.defenses", reserved=("reference",))
