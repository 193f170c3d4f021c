"""Configs that validate themselves: field types and choices checked at construction, JSON overrides merged
deeply, and the one place a field's default is read from (the CLI uses it instead of repeating literals)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import WeightlockError

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def check_value(what: str, name: str, hint: Any, value: Any, label: str | None = None) -> Any:
    """``value`` checked against the annotation ``hint`` of the option ``name`` (returned, ints converted to
    float where a float is expected); a clear :class:`WeightlockError` otherwise. Understood: ``int``,
    ``float``, ``str``, ``bool``, ``typing.Literal[...]`` (a fixed set of choices; ``label`` names the
    option in the error, e.g. ``"LoRA targets"``), a dataclass type (an instance of it), each optionally
    ``| None``. Other annotations are left to the config's own checks."""
    args = typing.get_args(hint)
    optional = type(None) in args and typing.get_origin(hint) is not typing.Literal
    if optional:
        rest = [a for a in args if a is not type(None)]
        if value is None:
            return value
        if len(rest) != 1:
            return value
        hint = rest[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise WeightlockError(f"unknown {label or name} {value!r} ({', '.join(map(str, choices))})")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, hint):
            raise WeightlockError(f"{what}: option {name!r} expects a {hint.__name__}, got {value!r}")
        return value
    if hint not in _SCALARS.values():
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise WeightlockError(f"{what}: option {name!r} expects {hint.__name__}"
                              f"{' or None' if optional else ''}, got {value!r}")
    return value


def check_types(obj: Any, what: str | None = None) -> None:
    """Raise a clear :class:`WeightlockError` if a field of the dataclass ``obj`` holds a value of the wrong
    type or outside its ``Literal`` choices (see :func:`check_value`); ints are accepted for floats and
    converted. A field's ``metadata["label"]`` names it in choice errors."""
    what = what or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(what, f.name, hints.get(f.name), value, f.metadata.get("label"))
        if checked is not value:
            object.__setattr__(obj, f.name, checked)  # also a frozen config, while it validates itself


def choice(default: str, label: str, help: str | None = None) -> Any:
    """A ``Literal`` field's default with the name its errors use, e.g. ``unknown LoRA targets 'x' (...)``,
    and optionally its help text (``metadata["help"]``, what the command line shows)."""
    return dataclasses.field(default=default, metadata={"label": label, **({"help": help} if help else {})})


def option(default: Any, help: str, label: str | None = None) -> Any:
    """A config field's default with its help text (``metadata["help"]``): the one place a setting is
    described; the command line's options are generated from it (:mod:`weightlock.cli_options`). ``label``
    names a ``Literal`` field in its errors, as :func:`choice` does."""
    return dataclasses.field(default=default, metadata={"help": help, **({"label": label} if label else {})})


def default(cls: type, name: str) -> Any:
    """The default of the dataclass field ``name`` of ``cls`` (a ``default_factory`` is called)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def merge(base: dict, override: dict, where: str = "") -> dict:
    """``override`` merged into ``base`` key by key, nested dicts recursively (a partial ``{"train":
    {"lr": 1e-3}}`` keeps every other train field); a key ``base`` does not have is an error."""
    out = dict(base)
    for k, v in override.items():
        path = f"{where}.{k}" if where else k
        if k not in base:
            raise WeightlockError(f"unknown config key {path!r}; known keys{' of ' + where if where else ''}: "
                                  f"{', '.join(sorted(base))}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            out[k] = merge(base[k], v, path)
        else:
            out[k] = v
    return out
