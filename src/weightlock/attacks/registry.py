"""The attack registry: attacks register themselves by name; :func:`make_attack` builds one from flat options."""
from __future__ import annotations

from typing import Any

from ..errors import WeightlockError
from .base import Attack

ATTACKS: dict[str, type[Attack]] = {}


def register(name: str):
    """Class decorator: register an :class:`~weightlock.attacks.base.Attack` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


def attack_options(name: str) -> dict[str, Any]:
    """The flat options of the attack ``name`` with their defaults (what ``make_attack`` accepts)."""
    return _attack_class(name).Config.option_defaults()


def make_attack(name: str, **options) -> Attack:
    """The registered attack ``name`` configured by flat ``options``: the training aliases (``steps``,
    ``lr``, ``batch_size``, ``grad_accum``, ``warmup_steps``, ``schedule``, ``optimizer``, ``seed``,
    ``progress``) go into its nested ``TrainConfig``, the rest are the attack's own options (``attack
    --list`` shows them all). Unknown names, wrong types and bad values are a :class:`WeightlockError`."""
    cls = _attack_class(name)
    valid = set(cls.Config.option_defaults())
    bad = set(options) - valid - {"training"}
    if bad:
        raise WeightlockError(f"attack {name!r} has no option(s) {', '.join(sorted(bad))}; "
                              f"options: {', '.join(sorted(valid))}")
    return cls(cls.Config.from_options(**options))


def _attack_class(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise WeightlockError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]
