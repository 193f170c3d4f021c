"""Command-line options generated from a config dataclass: one source of truth for a setting's type, default
and help text (the field's ``metadata["help"]``).

* :func:`config_options` — a decorator that gives a typer command one ``--option`` per field of a config
  class (``weightlock lock`` has every :class:`~weightlock.dlr.config.LockConfig` field this way, ``weightlock
  pretrain`` every :class:`~weightlock.pmp.train.PMPConfig` field);
* :func:`parse_settings` — ``KEY=VALUE`` strings (``weightlock defend NAME --set k=v``) parsed against a
  config's fields; an unknown key is refused with the list of valid ones;
* :func:`parse_field` — one command-line string converted to a field's type (``'none'`` for an optional
  field), with one clear :class:`~weightlock.errors.WeightlockError` line when it does not parse.

Values arrive as text and are parsed here, not by click, so that every bad value — a malformed number as
much as a value the config's own validation refuses — is the same one red ``error:`` line of the CLI.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from typing import Any, Callable

import typer

from .errors import WeightlockError

_NONE = ("none", "null")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of the dataclass ``cls``'s fields."""
    return typing.get_type_hints(cls)


def _optional(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(hint, False)``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not typing.Literal and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def type_label(hint: Any) -> str:
    """What a value of the annotation ``hint`` looks like on the command line (a metavar)."""
    hint, optional = _optional(hint)
    if typing.get_origin(hint) is typing.Literal:
        label = "|".join(map(str, typing.get_args(hint)))
    else:
        label = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "BOOLEAN"}.get(hint, "JSON")
    return f"{label}|none" if optional else label


def parse_field(cls: type, name: str, text: str, flag: str | None = None) -> Any:
    """The command-line string ``text`` as a value of the field ``name`` of the dataclass ``cls``: a number,
    a boolean (true/false, yes/no, on/off, 1/0), a choice, ``none``/``null`` for an optional field, JSON for
    anything else. The config's own validation runs later, when it is built. ``flag`` names the option in
    the error (default: the field's name)."""
    hint = field_hints(cls)[name]
    return _parse(hint, text, flag or name)


def _parse(hint: Any, text: str, what: str) -> Any:
    base, optional = _optional(hint)
    if optional and text.strip().lower() in _NONE:
        return None
    try:
        if base is bool:
            t = text.strip().lower()
            if t in _TRUE or t in _FALSE:
                return t in _TRUE
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            return text
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            for c in choices:  # a non-string choice (a number) from its text
                if str(c) == text:
                    return c
            return text  # the config names the choices in its error
        return json.loads(text)
    except (ValueError, TypeError):
        raise WeightlockError(f"{what} expects {_expected(hint)}, got {text!r}") from None


def _expected(hint: Any) -> str:
    base, optional = _optional(hint)
    what = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base)
    if what is None:
        what = ("one of " + ", ".join(map(str, typing.get_args(base)))
                if typing.get_origin(base) is typing.Literal else "a JSON value")
    return what + (" or 'none'" if optional else "")


def parse_settings(cls: type, items: list[str], what: str | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (repeatable ``--set``) as ``{field: value}`` for the dataclass ``cls``, each value
    parsed to its field's type (:func:`parse_field`); a malformed item or an unknown key is a
    :class:`WeightlockError` that lists the valid keys. ``what`` names the config in errors."""
    what = what or cls.__name__
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise WeightlockError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in valid:
            raise WeightlockError(f"{what} has no setting {key!r}; valid: {', '.join(valid) or 'none'}")
        out[key] = parse_field(cls, key, value, key)
    return out


def config_options(cls: type, *, into: str = "settings", exclude: tuple[str, ...] = (),
                   flags: dict[str, str] | None = None, help_prefix: str = "", given_only: bool = False) -> Callable:
    """Decorate a typer command: its parameter ``into`` (a dict) is replaced by one ``--option`` per field of
    the dataclass ``cls`` (but ``exclude``), at that place in its signature, each with the field's default
    and its ``metadata["help"]`` (after ``help_prefix``); a bool field is a ``--flag/--no-flag`` pair.
    ``flags`` renames a field's option (``{"variant": "pmp-variant"}``: ``--pmp-variant``; default: the
    field's name with dashes). The command receives ``into`` as ``{field: value}`` with every value parsed
    to its field's type (bad values: one :class:`WeightlockError` line, which the CLI prints as
    ``error: ...``); with ``given_only``, only the options given on the command line (the command starts
    from a config of its own choosing). It builds the config itself.

    Apply it below ``@user_errors`` (so that the parse errors are printed as one line)::

        @app.command("lock")
        @user_errors
        @config_options(LockConfig)
        def lock_cmd(model: Path = typer.Option(...), settings: dict = None) -> None:
            cfg = LockConfig(**settings)
    """
    hints = field_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    flag = {f.name: (flags or {}).get(f.name, f.name.replace("_", "-")) for f in fields}

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        if into not in sig.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {into!r} to receive {cls.__name__}'s options")
        clash = {f.name for f in fields} & (set(sig.parameters) - {into})
        if clash:
            raise TypeError(f"{fn.__name__}: parameter(s) {', '.join(sorted(clash))} clash with {cls.__name__} "
                            "fields (exclude them)")
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                       default=_option(f, hints[f.name], flag[f.name], help_prefix, given_only),
                                       annotation=bool if hints[f.name] is bool else str) for f in fields]
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name == into:
                params.extend(generated)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [f.name for f in fields]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            raw = {n: kwargs.pop(n) for n in names}
            values = {}
            for f in fields:
                v = raw[f.name]
                if v is None and given_only:
                    continue
                hint = hints[f.name]
                if isinstance(v, str) and hint is not str:
                    v = _parse(hint, v, "--" + flag[f.name])
                values[f.name] = v
            return fn(**kwargs, **{into: values})

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return deco


def _option(f: dataclasses.Field, hint: Any, flag: str, help_prefix: str = "", given_only: bool = False) -> Any:
    """The typer option ``--flag`` of the dataclass field ``f``: its default, its help, its type as the metavar.
    ``given_only``: the option's value is None unless given (the field's default is still shown)."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
    help_text = help_prefix + f.metadata.get("help", "")
    if hint is bool:
        names = f"--{flag}/--no-{flag}"
        if given_only:
            return typer.Option(None, names, help=help_text, show_default=str(default))
        return typer.Option(default, names, help=help_text)
    shown: bool | str = "none" if default is None else (str(default) if given_only else True)
    return typer.Option(None if default is None or given_only else default, f"--{flag}", help=help_text,
                        metavar=type_label(hint), parser=_keep_text, show_default=shown)


def _keep_text(value: str) -> str:
    """The option's command-line text as it is: :func:`config_options` parses it inside the command, so that a
    bad value is one ``error:`` line like every other user mistake."""
    return value


__all__ = ["config_options", "field_hints", "parse_field", "parse_settings", "type_label"]
