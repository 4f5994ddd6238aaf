"""Named registries for the extension points (observers, quantizer algorithms, layers,
post-training weight algorithms).

A registry maps a short name to a class. A missing name raises a ``ValueError`` that lists
what is registered, so a typo in a config is a clear message rather than a ``KeyError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with a decorator to fill it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@OBSERVERS.register("minmax")`` adds the decorated class."""

        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str, *, field: str | None = None) -> T:
        """The object registered as ``name``; a ``ValueError`` naming the choices otherwise."""
        try:
            return self._items[name]
        except KeyError:
            label = f"`{field}`" if field else f"{self.kind}"
            raise ValueError(
                f"{label} must be one of {self.names()}, got {name!r}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


# The extension points. Modules fill them with ``@REGISTRY.register(name)`` at import time;
# ``lowbit/__init__.py`` imports every such module, so they are full before any config is built.
OBSERVERS: Registry = Registry("observer")
QUANTIZERS: Registry = Registry("quantizer method")
LAYERS: Registry = Registry("layer type")
WEIGHT_ALGORITHMS: Registry = Registry("weight algorithm")
