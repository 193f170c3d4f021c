"""One registry type for every kind of plug-in: attacks, defenses, tasks (and whatever comes next).

A :class:`Registry` maps names to registered objects, in registration order, and is a read-only
``Mapping`` (``name in reg``, ``reg[name]``, ``list(reg)``, ``reg.items()``)::

    from weightlock.registry import Registry

    ATTACKS = Registry("attack", Attack, group="weightlock.attacks")

    @ATTACKS.register("full")            # a decorator; or ATTACKS.register("full", FullAttack)
    class FullAttack(Attack): ...

    ATTACKS.get("full")                  # the class; an unknown name is a WeightlockError listing the names
    ATTACKS.get("nope", None)            # None (a default turns the error off, as dict.get does)
    ATTACKS.names()                      # ["full", ...], registration order

Rules, the same for every kind:

* a name is a non-empty string without ``/`` or whitespace (``reserved`` names are refused);
* registering a name twice is an error (:class:`DuplicateName`), unless it is the very same object again,
  or the same class re-created by re-importing its module (``importlib.reload``), which replaces it;
* the object is checked against ``base``: a subclass of it (``instances=False``, the default: attacks and
  defenses register classes) or an instance of it (``instances=True``: tasks register zero-argument
  factories, ``base=collections.abc.Callable``); anything else is a :class:`WeightlockError`;
* a registered class gets its name as the attribute ``name`` (``FullAttack.name == "full"``);
* third-party plug-ins register through Python entry points in the registry's ``group``
  (``weightlock.attacks``, ``weightlock.defenses``, ``weightlock.tasks``), loaded lazily the first time
  the registry is read (``get``, ``names``, ``in``, iteration), once per process. In the plug-in's
  ``pyproject.toml``::

      [project.entry-points."weightlock.attacks"]
      noisy = "my_package.attacks:NoisyAttack"     # registered under the entry point's name
      more = "my_package.more_attacks"             # a module: importing it registers what it decorates

  A plug-in that fails to import, or whose object is refused (a duplicate name, the wrong base), is
  skipped with a warning that names it; it never breaks the built-ins.
"""
from __future__ import annotations

import importlib.metadata
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from .errors import WeightlockError

T = TypeVar("T")
_MISSING: Any = object()


class DuplicateName(WeightlockError):
    """A name registered twice in one registry."""


class UnknownName(WeightlockError, KeyError):
    """A name no plug-in registered (also a ``KeyError``, so a registry reads like a dict)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """Named plug-ins of one ``kind`` (``"attack"``, ``"defense"``, ``"task"``), checked against ``base``.

    ``Registry(kind, base, group=None, instances=False, reserved=())``:

    * ``register(name, obj=None)``: register ``obj`` (returned), or return a decorator when ``obj`` is
      omitted; :class:`DuplicateName` for a taken name, :class:`WeightlockError` for a bad name or an
      object that is not a ``base`` subclass (instance, with ``instances=True``);
    * ``get(name, default=<none>)``: the object; without a default an unknown name raises
      :class:`UnknownName` whose message lists the registered names;
    * ``names()``: the registered names, in registration order; ``unregister(name)`` / ``pop(name,
      default)`` remove one (tests, interactive use);
    * ``load_plugins()``: load the entry points of ``group`` now (otherwise done on first read; once);
      ``plugin_errors``: what the skipped plug-ins said.
    """

    def __init__(self, kind: str, base: type | tuple[type, ...], *, group: str | None = None,
                 instances: bool = False, reserved: tuple[str, ...] = ()) -> None:
        self.kind, self.base, self.group, self.instances, self.reserved = kind, base, group, instances, reserved
        self._items: dict[str, T] = {}
        self._plugins_loaded = group is None
        self.plugin_errors: list[str] = []

    # ---- registering ------------------------------------------------------------------------------
    def register(self, name: str, obj: Any = _MISSING) -> Any:
        """Register ``obj`` under ``name`` and return it; without ``obj``, a decorator that does."""
        self._check_name(name)
        if obj is _MISSING:
            def deco(o):
                return self.register(name, o)

            return deco
        self._check_base(name, obj)
        old = self._items.get(name, _MISSING)
        if old is not _MISSING and old is not obj and not _same_definition(old, obj):
            raise DuplicateName(f"{self.kind} {name!r} is already registered ({_describe(old)}); "
                                f"register {_describe(obj)} under another name")
        if isinstance(obj, type):
            obj.name = name
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what was registered under it (:class:`UnknownName` if nothing was)."""
        if name not in self._items:
            raise self._unknown(name)
        return self._items.pop(name)

    def pop(self, name: str, default: Any = _MISSING) -> Any:
        """``unregister(name)``, or ``default`` when ``name`` is not registered (as ``dict.pop``)."""
        if name not in self._items and default is not _MISSING:
            return default
        return self.unregister(name)

    # ---- reading ----------------------------------------------------------------------------------
    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The object registered as ``name``; an unknown name is an :class:`UnknownName` listing the
        registered ones, or ``default`` when one is given."""
        self.load_plugins()
        if name in self._items:
            return self._items[name]
        if default is not _MISSING:
            return default
        raise self._unknown(name)

    def names(self) -> list[str]:
        """The registered names, in registration order (built-ins first, then plug-ins)."""
        self.load_plugins()
        return list(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {', '.join(self._items)})"

    # ---- plug-ins ---------------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Load the entry points of ``group`` (once per process; later calls do nothing)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first: a plug-in module that reads the registry must not recurse
        for ep in importlib.metadata.entry_points(group=self.group):
            where = f"{self.kind} plug-in {ep.name!r} ({ep.value}"
            if ep.dist is not None:
                where += f", from {ep.dist.name}"
            where += ")"
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001  (a broken plug-in must not break the built-ins)
                self._skip(f"{where} failed to load: {type(e).__name__}: {e}")
                continue
            if isinstance(obj, types.ModuleType) or any(o is obj for o in self._items.values()):
                continue  # a module registered what it decorates on import; or the object registered itself
            try:
                self.register(ep.name, obj)
            except WeightlockError as e:
                self._skip(f"{where} skipped: {e}")

    def _skip(self, message: str) -> None:
        self.plugin_errors.append(message)
        warnings.warn(f"weightlock: {message}", RuntimeWarning, stacklevel=3)

    # ---- checks -----------------------------------------------------------------------------------
    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name or "/" in name or any(c.isspace() for c in name):
            raise WeightlockError(f"a {self.kind} name must be a non-empty string without '/' or spaces, "
                                  f"got {name!r}")
        if name in self.reserved:
            raise WeightlockError(f"{name!r} is reserved; choose another {self.kind} name")

    def _check_base(self, name: str, obj: Any) -> None:
        base = self.base if isinstance(self.base, tuple) else (self.base,)
        what = " or ".join(b.__name__ for b in base)
        if self.instances:
            if not isinstance(obj, base):
                raise WeightlockError(f"a {self.kind} registers a {what}; {name!r} is {_describe(obj)}")
        elif not (isinstance(obj, type) and issubclass(obj, base)):
            raise WeightlockError(f"a {self.kind} registers a {what} subclass; {name!r} is {_describe(obj)}")

    def _unknown(self, name: str) -> UnknownName:
        return UnknownName(f"unknown {self.kind} {name!r}; available: {', '.join(self._items) or 'none'}")


def _describe(obj: Any) -> str:
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{mod}.{qual}" if mod and qual else repr(obj)


def _same_definition(old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` defined again by re-importing its module (a reload), not another object."""
    return (isinstance(old, type) and isinstance(new, type) and old.__module__ == new.__module__
            and old.__qualname__ == new.__qualname__ and "<locals>" not in old.__qualname__)


__all__ = ["DuplicateName", "Registry", "UnknownName"]
