"""Name -> object registries: models, connectors, fusions, losses, sources, tokenizers, tasks.

Configs refer to components by a short name; adding a component is one file and one
`@REGISTRY.register("name", schema=SCHEMA)` line. Unknown names fail with the list of valid ones.

Where the registry is defined, `modules=` lists the modules that register into it; they are
imported on the first lookup (`get`, `schema`, `names`, `in`), so the package that holds the
registry never imports its plug-ins at import time and no import cycle runs through it. Adding a
plug-in file is adding its module name to that tuple:

    TASKS = Registry("task", modules=("vlm_jax.train.tasks.contrastive", ...))

A component can also register from anywhere else (a test, an experiment script) by calling
`REGISTRY.register("name")` before the lookup.

Schemas (vlm_jax/schema.py): each component declares the keys of its config section next to its
code, either as `register(name, schema=Schema({...}))` or as a `SCHEMA` class attribute; a
component without one reads no keys of its own. The section that selects among a registry's
components is declared by its parent as `Select(REGISTRY, by="name", base=...)` (`base`: keys
every component of the section shares, such as data's pipeline keys), and
`vlm_jax.train.validate` resolves every such section before anything compiles: evaluators and
metric writers (or any new kind) declare their keys the same way, and the parent that reads
them (a task's `SCHEMA`) names their section with a `Select` or a nested `Schema`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from vlm_jax.schema import EMPTY, Schema

T = TypeVar("T")


class Registry:
    """A case-sensitive map from short names to components of one kind (and their schemas)."""

    instances: ClassVar[list[Registry]] = []  # every registry made (checks over them all)

    def __init__(self, kind: str, modules: Sequence[str] = ()):
        self.kind = kind
        self.modules = tuple(modules)
        self._entries: dict[str, Any] = {}
        self._schemas: dict[str, Schema] = {}
        self._loaded = not self.modules
        Registry.instances.append(self)

    def register(self, name: str, schema: Schema | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            if schema is not None:
                self._schemas[name] = schema
            return obj

        return decorator

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._entries:
            raise ValueError(f"{self.kind}={name!r} is not one of: {', '.join(self.names())}")
        return self._entries[name]

    def schema(self, name: str) -> Schema:
        """The keys component `name` reads from its section (EMPTY if it declares none)."""
        component = self.get(name)  # loads the plug-in modules first
        return self._schemas.get(name) or getattr(component, "SCHEMA", None) or EMPTY

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def _load(self) -> None:
        """Import the plug-in modules once (each registers its components as it is imported).

        Marked loaded first: a plug-in that looks the registry up while it is imported sees
        the components registered so far instead of importing the plug-ins again; a failed
        import unmarks it (the next lookup raises the import error again)."""
        if self._loaded:
            return
        self._loaded = True
        try:
            for module in self.modules:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False
            raise
