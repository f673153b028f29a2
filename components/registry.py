"""Name → class registries: a concept's implementations (losses, miners, samplers, poolings, ...) are selected by a
`Spec` — a name and its constructor arguments, as params files write `{name: ..., args: {...}}`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    """One registry entry to build: `name` and the keyword arguments of its constructor."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """The implementations of one concept by name; `build(spec, **context)` makes one."""

    def __init__(self, kind: str, entries: Mapping[str, Callable[..., T]]) -> None:
        self.kind, self._entries = kind, dict(entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}") from None

    def build(self, spec: Spec, **context: Any) -> T:
        """`spec.name`'s class called with `spec.args`, plus those `context` values (e.g. `num_classes`,
        `embedding_size`) that its constructor names as parameters."""
        factory = self[spec.name]
        wanted = inspect.signature(factory).parameters
        extra = {k: v for k, v in context.items() if k in wanted and k not in spec.args}
        return factory(**spec.args, **extra)
