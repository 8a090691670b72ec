"""Name -> object registries: models, connectors, losses, data sources, tokenizers, tasks.

Configs refer to components by a short name; adding a component is one file and one
registration line. Unknown names fail with the list of valid ones.

Where the registry is defined, `modules=` lists the modules that register into it with
`@REGISTRY.register("name")`; they are imported on the first lookup (`get`, `names`, `in`),
so the package that holds the registry never imports its plug-ins at import time and no import
cycle runs through it. Adding a plug-in file is adding its module name to that tuple:

    TASKS = Registry("task", modules=("vlm_jax.train.tasks.contrastive", ...))

A component can also register from anywhere else (a test, an experiment script) by calling
`REGISTRY.register("name")` before the lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """A case-sensitive map from short names to components of one kind."""

    def __init__(self, kind: str, modules: Sequence[str] = ()):
        self.kind = kind
        self.modules = tuple(modules)
        self._entries: dict[str, Any] = {}
        self._loaded = not self.modules

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._entries:
            raise ValueError(f"{self.kind}={name!r} is not one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def _load(self) -> None:
        """Import the plug-in modules once (each registers its components as it is imported)."""
        if self._loaded:
            return
        for module in self.modules:
            importlib.import_module(module)
        self._loaded = True
