"""One registry class; every kind of component (datasets, attacks, models, ...) is an instance of it."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any


class Registry:
    """A name -> component map, filled by a decorator.

    Args:
        kind: what the registry holds ("dataset", "attack", ...); used in error messages.
        names_classes: give each registered class its registry name as its ``name`` attribute, so that the
            name is written once (in the decorator) and the class's messages can still say it.
    """

    def __init__(self, kind: str, names_classes: bool = False) -> None:
        self.kind = kind
        self.names_classes = names_classes
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator that registers a component under ``name`` with optional metadata."""

        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice; pick another name")
            self._items[name] = obj
            self._meta[name] = dict(meta)
            if self.names_classes and isinstance(obj, type):
                obj.name = name
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in's tests register a component for a test and remove it after)."""
        self.get(name)
        del self._items[name], self._meta[name]

    def get(self, name: str) -> Any:
        """The component called ``name``; an unknown name raises a ValueError listing the known ones."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


DATASETS = Registry("dataset")
ATTACKS = Registry("attack")
MODELS = Registry("model")
SYNTHESIZERS = Registry("synthesizer", names_classes=True)
DEFENSES = Registry("defense", names_classes=True)


def import_package_modules(package: str, path: list[str]) -> None:
    """Import every module of a component package, so that a new component is one new file that registers itself.

    Args:
        package: the package's ``__name__``.
        path: the package's ``__path__``.
    """
    for module in sorted(m.name for m in pkgutil.iter_modules(path)):
        importlib.import_module(f"{package}.{module}")


def load_all() -> None:
    """Import every component module so that the registries are full."""
    import abd_ray.attacks  # noqa: F401
    import abd_ray.data  # noqa: F401
    import abd_ray.defenses  # noqa: F401
    import abd_ray.models  # noqa: F401
    import abd_ray.synthesizers  # noqa: F401
