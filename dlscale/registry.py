"""Named parts that users extend without editing dlscale: training tasks, loss weightings, downstream tasks (each a
class with a `name`)."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> class, in registration order. `register` is a class decorator; `get_class` raises naming the known
    names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__}: a {self.kind} needs a `name`")
        self[name] = cls
        return cls

    def get_class(self, name: str) -> type[T]:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}: expected one of {', '.join(self)}")
        return self[name]
