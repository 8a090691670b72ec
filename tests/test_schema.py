"""Schemas: the resolver, and a bad key, type or choice in any component section of any shipped
config failing before compilation, naming the section, the key and the valid choices (fuzzed
over every registered component's schema, found by walking the registries)."""

import json
import logging
import sys
from pathlib import Path

import ml_collections
import pytest

from vlm_jax.config import ConfigError, apply_override, load_config, parse_cli, to_json
from vlm_jax.registry import Registry
from vlm_jax.schema import REQUIRED, Key, Schema, Select, resolve, walk
from vlm_jax.train import trainer
from vlm_jax.train.validate import CONFIG, resolve_config, resolved_sections, validate_config

CONFIGS = sorted(str(p) for p in Path("configs").glob("*.py"))
PETS = Registry("pet")
PETS.register("cat", schema=Schema({"lives": Key(int, 9, "lives left")}))("a cat")
PETS.register("dog", schema=Schema({"breed": Key(str, REQUIRED, "", choices=("lab", "pug"))}))(
    "a dog"
)
HOME = Schema(
    {
        "rooms": Key(int, 3, "rooms", valid=lambda n: n > 0, expect="a positive int"),
        "size": Key(float, 50.0, "square metres"),
        "pet": Select(PETS),
    }
)


def test_resolve_fills_defaults_of_the_section_and_the_selected_component():
    home = resolve("home", {"pet": {"name": "cat"}, "size": 3}, HOME)
    assert home.to_dict() == {"rooms": 3, "size": 3, "pet": {"name": "cat", "lives": 9}}


@pytest.mark.parametrize(
    "section, message",
    [
        ({"rooms": "3"}, "home.rooms='3' is a str; expected int"),
        ({"rooms": True}, "home.rooms=True is a bool; expected int"),
        ({"rooms": 0}, "home.rooms=0: expected a positive int"),
        (
            {"room": 2},
            "home.room is not a known key of home (valid: pet, rooms, size); did you mean",
        ),
        ({"pet": {"name": "cow"}}, "home.pet.name='cow' is not one of: cat, dog"),
        ({"pet": {"name": "dog"}}, "home.pet.breed is required (str)"),
        ({"pet": {"name": "dog", "breed": "pig"}}, "home.pet.breed='pig' is not one of: lab, pug"),
        (
            {"pet": {"name": "cat", "breed": "lab"}},
            "home.pet.breed is not a known key of home.pet ",
        ),
    ],
)
def test_resolve_names_section_key_value_and_valid_choices(section, message):
    section = {"pet": {"name": "cat"}} | section
    with pytest.raises(ConfigError) as error:
        resolve("home", section, HOME)
    assert message in str(error.value)


def test_every_problem_is_reported_at_once_and_unknown_keys_can_be_dropped():
    section = {"rooms": "x", "sise": 1.0, "pet": {"name": "cat", "lives": "many"}}
    with pytest.raises(ConfigError, match="^3 config problems: .*sise.*rooms.*lives"):
        resolve("home", section, HOME)
    old = {"pet": {"name": "cat", "breed": "lab"}, "garage": 1}
    assert resolve("home", old, HOME, unknown="drop").to_dict()["pet"] == {
        "name": "cat",
        "lives": 9,
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_each_shipped_config_resolves_and_resolving_is_idempotent(name):
    config = load_config(name)
    validate_config(config)
    once = resolve_config(config)
    assert resolve_config(once).to_dict() == once.to_dict()
    # config.json: its sections read back as the same experiment (what resume compares)
    assert resolved_sections(to_json(once)) == resolved_sections(to_json(config))


def _registries_reached() -> dict[str, tuple[str, str, Select]]:
    """registry kind -> (config, section path, its Select) for every selected section the
    shipped configs have, found by walking their task's schema."""
    found = {}
    for name in CONFIGS:
        for path, spec, _ in walk("", load_config(name), CONFIG):
            if isinstance(spec, Select):
                found.setdefault(spec.registry.kind, (name, path, spec))
    return found


def _cases() -> list[tuple[str, str, Schema | Select, str | None]]:
    """(config, section path, spec, component or None) for every section kind of every shipped
    config, and every component of every registry that selects a section."""
    cases, seen = [], set()
    for name in CONFIGS:
        for path, spec, _ in walk("", load_config(name), CONFIG):
            components = spec.registry.names() if isinstance(spec, Select) else [None]
            for component in components:
                key = (path, component, id(spec))
                if key not in seen:
                    seen.add(key)
                    cases.append((name, path, spec, component))
    return cases


CASES = _cases()


def test_every_registry_with_a_schema_is_reached_by_the_shipped_configs():
    """A new component in any registry is fuzzed below without an edit here; a new registry
    whose components declare keys must be named by some task's schema (so validated)."""
    with_keys = {
        registry.kind
        for registry in Registry.instances
        if registry is not PETS and any(registry.schema(n).keys for n in registry.names())
    }
    assert with_keys <= set(_registries_reached()), with_keys - set(_registries_reached())


def _node(tree: dict, path: str) -> dict:
    for part in [p for p in path.split(".") if p]:
        tree = tree[part]
    return tree


def _with_component(name: str, path: str, spec, component: str | None) -> dict:
    """The shipped config as a dict, the section at `path` switched to `component` (keeping
    the keys the component declares)."""
    tree = load_config(name).to_dict()
    section = _node(tree, path)
    if component is not None:
        schema = spec.schema_for({spec.by: component})
        for stale in [k for k in section if k not in schema.keys and not schema.open]:
            del section[stale]
        section[spec.by] = component
    return tree


WRONG_TYPES = ("zz_bad", 12345, 1.5, True, ("zz",))


def _mutations(schema: Schema, path: str):
    """(key, change(section), fragments the error must contain) for each key of the schema."""
    for key, entry in schema.keys.items():
        if not isinstance(entry, Key):
            continue
        where = f"{path}.{key}" if path else key
        choices = entry.choice_list()
        wrong = next((v for v in WRONG_TYPES if not entry.accepts_type(v)), None)
        if wrong is not None:
            yield (key, "type", wrong), [f"{where}={wrong!r}", entry.type_names(), *(choices or [])]
        if choices is not None and entry.accepts_type("zz_bad"):
            yield (key, "choice", "zz_bad"), [f"{where}='zz_bad' is not one of", *choices]
        if not schema.open:  # (the root: the trainer's sections are not components')
            yield (key + "x", "unknown", 1), [f"{where}x is not a known", f"did you mean {key!r}"]
        if entry.default is REQUIRED:
            yield (key, "missing", None), [f"{where} is required"]


@pytest.mark.parametrize(
    "name, path, spec, component",
    CASES,
    ids=[f"{Path(n).stem}:{p or '<root>'}:{c or '-'}" for n, p, _, c in CASES],
)
def test_a_bad_key_type_or_choice_fails_naming_section_key_and_choices(name, path, spec, component):
    base = _with_component(name, path, spec, component)
    schema = spec.schema_for(_node(base, path))
    mutations = list(_mutations(schema, path))
    for (key, kind, value), fragments in mutations:
        tree = json.loads(json.dumps(base))
        section = _node(tree, path)
        if kind == "missing":
            section.pop(key, None)
            if schema.prepare is not None and key in schema.prepare(dict(section)):
                continue  # e.g. a size the ViT variant sets
        else:
            section[key] = value
        with pytest.raises(ConfigError) as error:
            validate_config(ml_collections.ConfigDict(tree))
            pytest.fail(f"{kind} {key}={value!r} passed validation")
        message = str(error.value)
        missing = [str(f) for f in fragments if str(f) not in message]
        assert not missing, f"{kind} {key}={value!r}: {missing} not in: {message}"


def test_the_cli_selects_a_connector_and_sets_its_keys_before_compiling(
    tmp_path, monkeypatch, caplog
):
    """The connector section holds the chosen connector's keys; the CLI switches connector in
    any order of flags, and a key of another connector in the config fails before anything
    compiles (on the command line it is ignored with a warning: the chosen one never reads it)."""

    def state_layout(*args, **kwargs):
        raise AssertionError("reached state_layout: the bad config was not rejected up front")

    monkeypatch.setattr(trainer, "state_layout", state_layout)
    argv = ["--config", "configs/vlm_shapes.py", "--workdir", str(tmp_path)]
    config, _ = parse_cli(
        [
            *argv,
            "--config.model.connector.num_tokens=16",
            "--config.model.connector.name=perceiver",
        ],
        CONFIG,
    )
    assert config.model.connector.to_dict() == {"name": "perceiver", "num_tokens": 16}
    assert resolve_config(config).model.connector.to_dict() == dict(
        name="perceiver", num_tokens=16, depth=2, width=None, num_heads=4, mlp_dim=None
    )
    switched, _ = parse_cli(
        [*argv, "--config.model.connector.name=pool", "--config.model.connector.pool_size=4"],
        CONFIG,
    )
    assert switched.model.connector.to_dict() == {"name": "pool", "pool_size": 4}
    with switched.unlocked():
        CONFIG.apply_overrides(switched, [("model.connector.name", "mlp")], apply_override)
    assert switched.model.connector.to_dict() == {"name": "mlp"}  # pool's keys went with it
    with pytest.raises(ValueError, match=r"model.connector.num_tokenz.*\(valid: name\)"):
        parse_cli([*argv, "--config.model.connector.num_tokenz=16"], CONFIG)
    # a key only other connectors read (old command lines set them on mlp): ignored, said so
    with caplog.at_level(logging.WARNING):
        kept, _ = parse_cli([*argv, "--config.model.connector.num_tokens=16"], CONFIG)
    assert kept.model.connector.to_dict() == {"name": "mlp"}
    assert "model.connector.num_tokens=16 ignored: connector 'mlp' does not read it" in caplog.text
    bad, _ = parse_cli([*argv, "--config.model.connector.name=qformer"], CONFIG)
    with bad.unlocked():
        bad.model.connector.pool_mode = "avg"
    with pytest.raises(ConfigError, match=r"model.connector.pool_mode is not a known key"):
        trainer.train(bad, tmp_path / "run")


def test_an_old_run_with_every_connectors_keys_is_the_same_experiment():
    """config.json of a vlm run from before the connectors declared their keys: the union of
    every connector's keys. The keys the chosen connector never read do not count."""
    config = load_config("configs/vlm_shapes.py")
    old = json.loads(to_json(config))
    old["model"]["connector"] = dict(name="mlp", num_tokens=32, depth=2, width=64, num_heads=4,
                                     mlp_dim=128, pool_size=2, pool_mode="avg",
                                     text_conditioned=False)  # fmt: skip
    assert trainer.identity(json.dumps(old)) == trainer.identity(to_json(config))
    apply_override(config, "model.connector.name", "pool")
    assert trainer.identity(json.dumps(old)) != trainer.identity(to_json(config))


def test_a_plugin_that_looks_its_registry_up_while_imported_does_not_reimport_the_others(
    tmp_path, monkeypatch
):
    """Registry._load marks itself loaded before importing: a lookup inside a plug-in's import
    sees what is registered so far (it used to import the next plug-ins from inside the first,
    and one importing a name the first had not yet defined failed); a failed import is
    raised again by the next lookup, not forgotten."""
    files = {
        "widgets.py": "from vlm_jax.registry import Registry\n"
        "WIDGETS = Registry('widget', modules=('widget_a', 'widget_b'))\n",
        "widget_a.py": "from widgets import WIDGETS\nWIDGETS.register('a')('A')\n"
        "SEEN = WIDGETS.names()\nSIZE = 3\n",
        "widget_b.py": "from widget_a import SIZE\nfrom widgets import WIDGETS\n"
        "WIDGETS.register('b')('B' * SIZE)\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(Registry, "instances", list(Registry.instances))  # these are dropped
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("widgets", "widget_a", "widget_b"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    import widgets

    assert widgets.WIDGETS.names() == ["a", "b"] and widgets.WIDGETS.get("b") == "BBB"
    assert sys.modules["widget_a"].SEEN == ["a"]
    broken = Registry("gadget", modules=("no_such_gadget_module",))
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="no_such_gadget_module"):
            broken.names()
