"""Registries: small name -> entry dicts that decorators fill (as timm's ``@register_model``).

Five stages keep one each: selection criteria (:func:`shrink.selection.register_criterion`), lambda
schedules (:func:`shrink.blocks.register_schedule`), data sets (:func:`shrink.data.register_data_set`),
block families (:func:`shrink.blocks.register_family`) and export formats
(:func:`shrink.deploy.register_format`). docs/extending.md shows one of each being added.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from shrink.errors import ShrinkError

__all__ = ["Names", "Registry"]

T = TypeVar("T")


class Names(Sequence[str]):
    """The registered names, in registration order: a live, read-only tuple-like view (argparse
    ``choices`` given it stay right when an entry is added later)."""

    def __init__(self, registry: Registry, keep: Callable[[Any], bool] | None = None):
        self._registry = registry
        self._keep = keep  # only the names whose entry passes ``keep`` (e.g. the scored criteria)

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, e in self._registry.items() if self._keep is None or self._keep(e))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Names, tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


class Registry(dict, Generic[T]):
    """``name -> entry`` for one kind of thing (``what``: 'lambda schedule', 'data set', ...)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.names = Names(self)

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name taken already is a ShrinkError."""
        if not isinstance(name, str) or not name:
            raise ShrinkError(f"a {self.what} needs a non-empty name, got {name!r}")
        if name in self:
            raise ShrinkError(f"{self.what} {name!r} is registered already")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry of ``name``, or a one-line ShrinkError listing the known names."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ShrinkError(f"unknown {self.what} {name!r}; choose one of {', '.join(self)}") from None

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests register throw-away entries and take them out again)."""
        self.lookup(name)
        return self.pop(name)
