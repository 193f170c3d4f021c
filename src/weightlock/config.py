"""Configs that validate themselves: field types checked at construction, JSON overrides merged deeply."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import WeightlockError

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def check_types(obj: Any, what: str | None = None) -> None:
    """Raise a clear :class:`WeightlockError` if a field of the dataclass ``obj`` holds a value of the wrong
    scalar type (``int``/``float``/``str``/``bool``, optionally ``| None``); ints are accepted for floats
    and converted. Other annotations are left to the config's own checks."""
    what = what or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
        optional = type(None) in typing.get_args(hint)
        if len(args) != 1 or args[0] not in _SCALARS.values():
            continue
        want, value = args[0], getattr(obj, f.name)
        if value is None and optional:
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
            continue
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise WeightlockError(f"{what}: option {f.name!r} expects {want.__name__}"
                                  f"{' or None' if optional else ''}, got {value!r}")


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
