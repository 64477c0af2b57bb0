"""One registry class for every kind of named thing (datasets, models, methods, plots)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from sobre.core.errors import ConfigError, UnknownNameError

T = TypeVar("T")
V = TypeVar("V")


def closest(name: str, choices: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """The up-to-``n`` names of ``choices`` closest to ``name`` (case-insensitive)."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ``did you mean ...?`` hint (empty when nothing is close)."""
    hits = closest(name, choices)
    return f"; did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""


def check_choice(name: str, value: V, choices: Iterable[object], owner: str = "") -> V:
    """``value`` if it is one of ``choices``, else a :class:`ConfigError` naming them (and the
    closest).

    The message reads ``"<owner>: <name>=<value> is unknown; choose one of [...]"``.
    """
    known = list(choices)
    if value not in known:
        hint = suggest(value, [str(c) for c in known]) if isinstance(value, str) else ""
        where = f"{owner}: " if owner else ""
        raise ConfigError(f"{where}{name}={value!r} is unknown; choose one of {known}{hint}")
    return value


def lazy_attributes(package: str, module: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``package.module`` when one of
    ``names`` is first used (a family's Lightning callbacks: importing the family stays
    Lightning-free)."""
    lazy = frozenset(names)

    def getattr_(name: str) -> Any:
        if name in lazy:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return getattr_


class Registry(Generic[T]):
    """Maps snake_case names to objects; unknown names fail with the closest known ones.

    Example:
        >>> MODELS: Registry[type] = Registry("model")
        >>> @MODELS.register("lenet5")
        ... class LeNet5: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that records ``obj`` under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``; an :class:`UnknownNameError` lists known names."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggest(name, list(self._items))} "
                f"Known {self.kind}s: {known}."
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
