"""Defenses as plug-ins, the counterpart of the attack registry (``weightlock.attacks``): what turns a
model (or a pretraining run) into a release. The locks themselves live in ``weightlock.dlr`` and
``weightlock.pmp``.

A defense is a typed config (a dataclass that validates itself) plus a small :class:`Defense` class:
its name, what it is as data (``spec``, a :class:`DefenseInfo`: the config class, a description,
the attacks...), ``apply(source, out) -> release directory`` (``source`` is a model directory
for a post-hoc defense, a :class:`~weightlock.train.pretrain.PretrainConfig` for a pretraining-time
one), the attacks that make sense against it with their reference attack on the original, an optional
authorized fine-tuning (the owner's yardstick) and optional extra evaluations and notes (``spec.hooks``, a
:class:`DefenseHooks`). Built in: ``none`` (the
unlocked original), ``dlr`` (DLR-Lock) and ``pmp`` (private-mask pretraining). ``weightlock demo``
builds, evaluates and attacks every registered defense (or those named with ``--defense``);
``weightlock defend NAME --set KEY=VALUE`` builds any one of them (``lock`` and ``pretrain --method pmp``
are that path for ``dlr`` and ``pmp``). ``DEFENSES`` is a :class:`weightlock.registry.Registry`: a name
registered twice is an error, and installed packages add defenses through the entry-point group
``weightlock.defenses``::

    from dataclasses import dataclass
    from weightlock.defenses import Defense, DefenseConfig, DefenseInfo, register_defense

    @dataclass
    class NoiseConfig(DefenseConfig):
        sigma: float = 0.01

    @register_defense("noise")
    class Noise(Defense):
        spec = DefenseInfo(Config=NoiseConfig, description="Gaussian noise added to every weight")

        def apply(self, source, out):
            ...  # load the model in ``source``, add noise, save it into ``out``
            return out
"""
from .base import (
    DEFENSES,
    Defense,
    DefenseConfig,
    DefenseHooks,
    DefenseInfo,
    build_file,
    get_defense,
    make_defense,
    register_defense,
    registered_in,
)
from .builtin import DLRLockDefense, NoDefense, NoneConfig, PMPDefense
from .plan import AttackSpec, HarnessPlan

__all__ = ["DEFENSES", "AttackSpec", "Defense", "DefenseConfig", "DefenseHooks", "DefenseInfo", "HarnessPlan",
           "build_file", "get_defense", "make_defense", "register_defense", "registered_in",
           "DLRLockDefense", "NoDefense", "NoneConfig", "PMPDefense"]
