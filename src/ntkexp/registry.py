"""One registry per kind (architectures, activations, datasets, experiments, optimizers).

A :class:`Registry` maps the name used in YAML configs to an object. Registering a
name twice raises; looking up an unknown name raises an error that lists what is
available (and the closest match), so a typo in a config is one clear line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate name in a registry. ``str(err)`` is one readable line."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> object map for one kind of thing.

    Example::

        ACTIVATIONS = Registry("activation")

        @ACTIVATIONS.register("relu")
        def _relu(): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is None."""

        def _add(o: T) -> T:
            if not isinstance(name, str) or not name:
                raise RegistryError(f"{self.kind} names must be non-empty strings, got {name!r}")
            if name in self._items and not overwrite:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered; pick another name "
                    "or pass overwrite=True"
                )
            self._items[name] = o
            return o

        if obj is None:
            return _add
        return _add(obj)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise RegistryError(self._unknown_message(name)) from None

    def _unknown_message(self, name) -> str:
        known = ", ".join(sorted(self._items)) or "(none)"
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; known: {known}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

