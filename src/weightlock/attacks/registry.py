"""The attack registry: attacks register themselves by name; :func:`make_attack` builds one from flat options.

``ATTACKS`` is a :class:`weightlock.registry.Registry` of :class:`~weightlock.attacks.base.Attack` subclasses;
third-party attacks register through the entry-point group ``weightlock.attacks``."""
from __future__ import annotations

from typing import Any

from ..errors import WeightlockError
from ..registry import Registry
from .base import Attack

ATTACKS: Registry[type[Attack]] = Registry("attack", Attack, group="weightlock.attacks")


def register(name: str):
    """Class decorator: register an :class:`~weightlock.attacks.base.Attack` subclass under ``name`` (a taken
    name or another base class is an error)."""
    return ATTACKS.register(name)


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
    return ATTACKS.get(name)
