"""Config schemas: each component declares its keys once; one resolver checks and fills them.

A component's `Schema` maps each key of its config section to a `Key` (its types, default or
REQUIRED, valid choices or a validity test, a doc line), to a nested `Schema` (a fixed
sub-section such as `model.image`) or to a `Select` (a sub-section whose keys depend on the
component a key of it names, such as `model.connector.name`). Components declare it where they
register (`REGISTRY.register("name", schema=...)`, see registry.py), next to their code.

`resolve(path, section, spec)` is the one place a section is checked: it returns the section
with every default filled and raises a ConfigError naming the section path, the key, the bad
value and the valid choices (or type); unknown keys fail naming the valid ones and the closest.
Every problem of a section tree is reported at once. Resolving is idempotent, so a builder may
resolve the section it is given whether or not the caller already did.

    CONNECTOR = Select(CONNECTORS)                 # model.connector: keys of the named one
    resolve("model.connector", {"name": "pool", "pool_size": 4}, CONNECTOR)
    -> ConfigDict(name="pool", pool_size=4, pool_mode="avg")
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from vlm_jax.config import ConfigDict, ConfigError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a key that the config must set


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: `types` (int also passes for float, list for tuple, never bool for int),
    `default` (or REQUIRED), `choices` (a sequence or a zero-argument callable returning one, for
    choices a registry or table holds) or `valid` (a test) described by `expect`, and `doc`."""

    types: type | tuple[type, ...]
    default: Any = REQUIRED
    doc: str = ""
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    valid: Callable[[Any], bool] | None = None
    expect: str = ""

    def type_names(self) -> str:
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        return " or ".join("None" if t is type(None) else t.__name__ for t in types)

    def choice_list(self) -> list[Any] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def accepts_type(self, value: Any) -> bool:
        return _has_type(value, self.types)

    def problem(self, where: str, value: Any) -> str | None:
        """Why `value` is not valid for this key (None if it is)."""
        if not self.accepts_type(value):
            choices = self.choice_list()
            valid = f" (one of: {_join(choices)})" if choices is not None else ""
            return (
                f"{where}={value!r} is a {type(value).__name__}; expected {self.type_names()}"
                + valid
            )
        choices = self.choice_list()
        if choices is not None and value not in choices:
            return f"{where}={value!r} is not one of: {_join(choices)}"
        if self.valid is not None and not self.valid(value):
            return f"{where}={value!r}: expected {self.expect or 'a valid value'}"
        return None


def _join(values: Sequence[Any]) -> str:
    return ", ".join(map(str, values))


def _has_type(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    for t in types:
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is tuple and isinstance(value, tuple | list):
            return True
        if t is dict and isinstance(value, Mapping | ml_collections.ConfigDict):
            return True
        if t not in (float, int, tuple, dict, type(None)) and isinstance(value, t):
            return True
    return False


def positive(value: Any) -> bool:
    return value > 0


@dataclasses.dataclass(frozen=True)
class Schema:
    """The keys of one config section. `prepare(section dict) -> dict` rewrites a section before
    it is checked (e.g. a ViT `variant` filling the sizes); `check(path, resolved dict)` raises a
    ValueError for what no single key can say (a width that does not split over the heads).
    `open=True` leaves undeclared keys alone (the config's root, whose other sections are not
    components')."""

    keys: Mapping[str, Key | Schema | Select] = dataclasses.field(default_factory=dict)
    doc: str = ""
    prepare: Callable[[dict], dict] | None = None
    check: Callable[[str, dict], None] | None = None
    open: bool = False

    def __or__(self, other: Schema) -> Schema:
        """This schema's keys and `other`'s (other's win), both prepares and checks."""
        return Schema(
            {**self.keys, **other.keys},
            doc=other.doc or self.doc,
            prepare=_chain_prepare(self.prepare, other.prepare),
            check=_chain_check(self.check, other.check),
            open=self.open or other.open,
        )

    def schema_for(self, section: Mapping | None) -> Schema:
        return self

    def apply_overrides(self, config, overrides, apply) -> None:
        apply_overrides(self, config, overrides, apply)


def _chain_prepare(a, b):
    if a is None or b is None:
        return a or b
    return lambda section: b(a(section))


def _chain_check(a, b):
    if a is None or b is None:
        return a or b

    def both(path: str, section: dict) -> None:
        a(path, section)
        b(path, section)

    return both


EMPTY = Schema()


@dataclasses.dataclass(frozen=True)
class Select:
    """A section whose keys are `base`'s plus those of the component that its `by` key names
    in `registry` (e.g. data: the pipeline's keys + those of the source `data.source` names)."""

    registry: Any  # vlm_jax.registry.Registry
    by: str = "name"
    base: Schema = EMPTY
    default: Any = REQUIRED

    def selector(self) -> Key:
        return Key(str, self.default, f"the {self.registry.kind}", choices=self.registry.names)

    def schema_for(self, section: Mapping | None) -> Schema:
        """base + the selector key + the named component's schema (base alone if unknown)."""
        name = (section or {}).get(self.by, self.default)
        known = isinstance(name, str) and name in self.registry
        chosen = self.registry.schema(name) if known else EMPTY
        return self.base | Schema({self.by: self.selector()}) | chosen

    def apply_overrides(self, config, overrides, apply) -> None:
        apply_overrides(self, config, overrides, apply)


def resolve(
    path: str, section: Mapping | None, spec: Schema | Select, unknown: str = "error"
) -> ConfigDict:
    """`section` checked against `spec`, defaults filled, sub-sections resolved (a ConfigDict).

    Raises ConfigError naming every problem ("model.connector.num_tokens='16' is a str; expected
    int"). unknown="drop" drops undeclared keys instead of failing on them (reading a config.json
    written when a section still held every connector's keys: the code never read those).
    """
    problems: list[str] = []
    resolved = _resolve(path, section, spec, unknown, problems)
    if problems:
        head = f"{len(problems)} config problems: " if len(problems) > 1 else ""
        raise ConfigError(head + "; ".join(problems))
    return resolved


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _resolve(path, section, spec, unknown, problems) -> ConfigDict:
    given = dict(section.items()) if section is not None else {}
    schema = spec.schema_for(given)
    count = len(problems)
    for key, value in given.items():
        entry = schema.keys.get(key)
        problem = entry.problem(_dotted(path, key), value) if isinstance(entry, Key) else None
        problems.extend([problem] if problem else [])
    if schema.prepare is not None and len(problems) == count:
        try:
            given = schema.prepare(given)
        except ValueError as e:
            problems.append(str(e))
            return ConfigDict(given)
    out = {}
    for key, value in given.items():
        if key in schema.keys:
            continue
        if schema.open:
            out[key] = value
        elif unknown == "error":
            problems.append(_unknown(path, key, schema, spec, given))
    for key, entry in schema.keys.items():
        where = _dotted(path, key)
        if isinstance(entry, Schema | Select):
            if key in given or not schema.open:
                out[key] = _resolve(where, given.get(key), entry, unknown, problems)
        elif key in given:
            out[key] = given[key]
        elif entry.default is REQUIRED:
            problems.append(f"{where} is required ({entry.type_names()}): {entry.doc}")
        else:
            out[key] = entry.default
    if schema.check is not None and len(problems) == count:
        try:
            schema.check(path, out)
        except ValueError as e:
            problems.append(str(e))
    return ConfigDict(out)


def _unknown(path: str, key: str, schema: Schema, spec, given: Mapping) -> str:
    valid = sorted(schema.keys)
    close = difflib.get_close_matches(key, valid, n=1)
    where = path or "the config"
    name = given.get(spec.by) if isinstance(spec, Select) else None
    if isinstance(name, str) and name in spec.registry:
        where += f" ({spec.by}={given.get(spec.by)!r})"
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{_dotted(path, key)} is not a known key of {where} (valid: {', '.join(valid)}){hint}"


def walk(
    path: str, section: Mapping | None, spec: Schema | Select
) -> Iterator[tuple[str, Schema | Select, Schema]]:
    """(path, spec, its schema for this config) of every section the config has, depth first."""
    given = dict(section.items()) if section is not None else {}
    schema = spec.schema_for(given)
    yield path, spec, schema
    for key, entry in schema.keys.items():
        if isinstance(entry, Schema | Select) and (key in given or not schema.open):
            yield from walk(_dotted(path, key), given.get(key), entry)


def spec_at(root: Schema | Select, config: Mapping, parts: Sequence[str]):
    """The spec (Schema or Select) of the section `config[parts[0]][parts[1]]...`, or None."""
    spec, node = root, config
    for part in parts:
        entry = spec.schema_for(node).keys.get(part)
        if not isinstance(entry, Schema | Select):
            return None
        spec, node = entry, (node.get(part) if isinstance(node, Mapping | ConfigDict) else None)
    return spec


def _placeholder(key: Key) -> Any:
    """A value of the key's type, for the CLI parser to parse an override of an absent key by."""
    if key.default is not REQUIRED and key.default is not None:
        return key.default
    types = key.types if isinstance(key.types, tuple) else (key.types,)
    first = next((t for t in types if t is not type(None)), type(None))
    return {str: "", int: 0, float: 0.0, bool: False, tuple: ()}.get(first)


def _section(config: ConfigDict, parts: Sequence[str], root) -> ConfigDict | None:
    """config[parts...], creating sections the schema declares but the config lacks."""
    node = config
    for depth, part in enumerate(parts):
        if part not in node and spec_at(root, config, parts[: depth + 1]) is not None:
            node[part] = ConfigDict()
        if part not in node or not isinstance(node[part], ConfigDict):
            return None
        node = node[part]
    return node


def _is_selector(root, config: ConfigDict, parts: Sequence[str]) -> bool:
    spec = spec_at(root, config, parts[:-1])
    return isinstance(spec, Select) and spec.by == parts[-1]


def apply_overrides(
    root: Schema | Select,
    config: ConfigDict,
    overrides: Sequence[tuple[str, str]],
    apply: Callable[[ConfigDict, str, str], None],
) -> None:
    """Apply CLI overrides `[(dotted key, text)]` with `apply` (config.apply_override), knowing
    the schemas: overrides of selector keys (`model.connector.name`) go first, shallowest first;
    switching a component drops the keys only the previous one declared; a key the selected
    component declares but the section lacks is added (at its default) before it is set. So
    `--config.model.connector.num_tokens=16 --config.model.connector.name=perceiver` works on a
    config whose connector section is `{name: "mlp"}`. A key that only other components of the
    section's registry declare is ignored with a warning: the selected one never reads it (so
    command lines from when the section held every connector's keys still run, to the same
    numbers). Unknown keys still fail in `apply`."""
    selectors = [o for o in overrides if _is_selector(root, config, o[0].split("."))]
    for key, text in sorted(selectors, key=lambda o: o[0].count(".")):
        parts = key.split(".")
        section = _section(config, parts[:-1], root)
        spec = spec_at(root, config, parts[:-1])
        before = spec.schema_for(section).keys
        if parts[-1] not in section:
            section[parts[-1]] = ""
        apply(config, key, text)
        after = spec.schema_for(section).keys
        for stale in [k for k in section if k in before and k not in after]:
            del section[stale]
    for key, text in overrides:
        if (key, text) in selectors:
            continue
        parts = key.split(".")
        section = _section(config, parts[:-1], root)
        spec = spec_at(root, config, parts[:-1])
        if section is not None and spec is not None and parts[-1] not in section:
            entry = spec.schema_for(section).keys.get(parts[-1])
            if isinstance(entry, Key):
                section[parts[-1]] = _placeholder(entry)
            elif entry is None and (others := _declared_by_others(spec, parts[-1])):
                logging.warning(
                    "--config.%s=%s ignored: %s %r does not read it (%s do; select one with "
                    "--config.%s)",
                    key,
                    text,
                    spec.registry.kind,
                    section.get(spec.by),
                    ", ".join(others),
                    ".".join([*parts[:-1], spec.by]),
                )
                continue
        apply(config, key, text)


def _declared_by_others(spec: Schema | Select, key: str) -> list[str]:
    """The components of a Select's registry whose schema declares `key` (none for a Schema)."""
    if not isinstance(spec, Select):
        return []
    return [n for n in spec.registry.names() if key in spec.registry.schema(n).keys]


def resolve_keys(path: str, section: Mapping, schema: Schema) -> ConfigDict:
    """Only `schema`'s keys of `section`, resolved (for code that reads a few shared keys of a
    section whose other keys belong to someone else, e.g. the towers' `model.dtype`)."""
    return resolve(path, {k: section[k] for k in schema.keys if k in section}, schema)
