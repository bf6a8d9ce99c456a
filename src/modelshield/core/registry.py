"""Name → component registries, one per component kind (DESIGN.md "Registries").

The CLI (``modelshield list``), the scan plan, docs and contract tests iterate them.
Unknown names fail with the list of known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from modelshield.core.errors import InvalidConfigError, UnknownComponentError

T = TypeVar("T")

_KINDS: dict[str, Registry[Any]] = {}


class Registry(Generic[T]):
    """A named collection of components of one kind (attacks, probes, architectures...)."""

    def __init__(self, kind: str, singular: str | None = None) -> None:
        if kind in _KINDS:
            raise InvalidConfigError(f"a registry for kind {kind!r} already exists")
        self.kind = kind
        self.singular = singular or (kind[:-1] if kind.endswith("s") else kind)
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        _KINDS[kind] = self

    def register(self, name: str, *, help: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@ATTACKS.register("pgd")``."""

        def deco(obj: T) -> T:
            self.add(name, obj, help=help)
            return obj

        return deco

    def add(self, name: str, obj: T, *, help: str | None = None) -> None:
        if not name or name != name.strip() or " " in name:
            raise InvalidConfigError(f"{self.singular} name must be a non-empty word, got {name!r}")
        if name in self._items:
            raise InvalidConfigError(f"{self.singular} {name!r} is already registered")
        self._items[name] = obj
        doc = help if help is not None else (getattr(obj, "__doc__", None) or "")
        self._help[name] = doc.strip().splitlines()[0] if doc.strip() else ""

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownComponentError(
                f"unknown {self.singular} {name!r}{hint}; known: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self, name: str) -> str:
        self.get(name)
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def registry_kinds() -> list[str]:
    """Every registry kind that exists once the capability packages are imported."""
    return sorted(_KINDS)


def get_registry(kind: str) -> Registry[Any]:
    try:
        return _KINDS[kind]
    except KeyError:
        raise UnknownComponentError(
            f"unknown component kind {kind!r}; known: {', '.join(registry_kinds())}"
        ) from None
