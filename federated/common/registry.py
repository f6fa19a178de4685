"""Things registered by name (strategies, aggregation rules), looked up by the name a flag or a peer gives."""

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by name, in the order they were registered; a name from a flag or the network is only a key."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A class decorator: register the class under name (and give it that name)."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            entry.name = name  # type: ignore[attr-defined]
            self._entries[name] = entry
            return entry

        return add

    def named(self, name: str) -> T:
        """The entry registered under name; ValueError, listing the names, for any other."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name[:40]!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
