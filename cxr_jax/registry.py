"""A small named registry, one instance per family of interchangeable parts.

Every choice a config makes by name (model, data set, loss, optimiser, schedule, evaluator,
stage, preprocessing op) is looked up in one of these, so an unknown name fails at start-up
with the list of valid names instead of deep inside a run.
"""

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar('T')


class Registry(Generic[T]):
  """Maps names to objects; duplicate registration and unknown names are errors."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering `obj` under `name`; a second registration of a name fails."""

    def decorator(obj: T) -> T:
      if name in self._items:
        raise ValueError(f'{self.kind} {name!r} is already registered ({self._items[name]!r}).')
      self._items[name] = obj
      return obj

    return decorator

  def get(self, name: str) -> T:
    """Returns the object registered as `name`, or raises ValueError listing the valid names."""
    try:
      return self._items[name]
    except KeyError:
      raise ValueError(
          f'Unknown {self.kind} {name!r}; valid names: {", ".join(sorted(self._items))}'
      ) from None

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: Any) -> bool:
    return name in self._items
