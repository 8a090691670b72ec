"""The package's import graph: no cycle anywhere in vlm_jax, and layering runs one way.

Every module under vlm_jax/ is parsed (never imported) and every `import` statement in it is
read, the ones inside functions too: a deferred import still runs, so a cycle through it is
a cycle. The layers are DESIGN.md's, as data (LAYERS): a module may import its own layer or
lower ones. Registry plug-ins (`Registry(kind, modules=(...))`, imported on the first lookup)
are import edges of the module that defines the registry for the layering check; they are
left out of the cycle check, since they run only after the registry's module has finished
importing (plug-ins import their registry, by design).
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import vlm_jax

ROOT = Path(vlm_jax.__file__).parent

# Lowest first: (layer, module prefixes). The longest matching prefix places a module, so a
# CLI entry module can sit above its package (evaluate/__main__ drives the trainer); the
# root package "vlm_jax" matches itself only.
LAYERS = (
    (
        "base",
        (
            "vlm_jax",
            "vlm_jax.config",
            "vlm_jax.platforms",
            "vlm_jax.registry",
            "vlm_jax.schema",
            "vlm_jax.trees",
        ),
    ),
    ("sharding", ("vlm_jax.sharding", "vlm_jax.defaults")),
    ("kernels", ("vlm_jax.kernels",)),
    ("models", ("vlm_jax.models",)),
    ("losses/data", ("vlm_jax.losses", "vlm_jax.data")),
    ("checkpoint", ("vlm_jax.checkpoint",)),
    ("generate", ("vlm_jax.generate",)),
    ("evaluate", ("vlm_jax.evaluate",)),
    ("train", ("vlm_jax.train",)),
    (
        "convert/compile/CLIs",
        ("vlm_jax.convert", "vlm_jax.compile", "vlm_jax.evaluate.__main__", "vlm_jax.budget"),
    ),
)


def module_files() -> dict[str, Path]:
    """{dotted module name: its file} for vlm_jax and everything under it (packages are their
    __init__.py), found with pkgutil without importing anything."""
    found = {"vlm_jax": ROOT / "__init__.py"}

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            if info.ispkg:
                found[name] = path / info.name / "__init__.py"
                walk(path / info.name, name)
            else:
                found[name] = path / f"{info.name}.py"

    walk(ROOT, "vlm_jax")
    return found


MODULES = module_files()


def _target(name: str) -> str | None:
    """The vlm_jax module `name` refers to: itself, or the package of an attribute."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(parts + ([node.module] if node.module else []))


def static_imports(module: str, tree: ast.Module) -> set[str]:
    """vlm_jax modules that `module` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule or attribute
        else:
            continue
        out |= {t for n in names if n.startswith("vlm_jax") and (t := _target(n))}
    return out - {module}


def registry_plugins(tree: ast.Module) -> set[str]:
    """Modules named in `Registry(..., modules=(...))` calls: imported on the first lookup."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry":
            for keyword in node.keywords:
                if keyword.arg == "modules":
                    out |= {c.value for c in ast.walk(keyword.value) if isinstance(c, ast.Constant)}
    return out


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(static import edges, registry plug-in edges) of every vlm_jax module."""
    static, plugins = {}, {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        static[module], plugins[module] = static_imports(module, tree), registry_plugins(tree)
    return static, plugins


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that contains `module`."""
    matches = [
        (len(prefix), rank)
        for rank, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or (prefix != "vlm_jax" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is in no layer of LAYERS: add it there"
    return max(matches)[1]


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                out.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]}, a higher layer)"
                )
    return out


def test_every_module_is_found_and_every_plugin_exists():
    static, plugins = graph()
    assert {"vlm_jax.train.trainer", "vlm_jax.losses.ring", "vlm_jax.checkpoint"} <= set(static)
    missing = {p for names in plugins.values() for p in names} - set(MODULES)
    assert not missing, f"registries name modules that do not exist: {sorted(missing)}"
    assert "vlm_jax.train.tasks.contrastive" in plugins["vlm_jax.train.tasks"]


def test_no_import_cycle():
    static, _ = graph()
    cycle = find_cycle(static)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downwards():
    static, plugins = graph()
    edges = {m: static[m] | plugins[m] for m in static}
    violations = layering_violations(edges)
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_library_modules_import_nothing_from_train():
    """The issue's rule, spelled out: convert/, evaluate/ and models/ (and the layers below
    the trainer) never import vlm_jax.train; evaluate/__main__ (a CLI) is the one exception."""
    static, plugins = graph()
    libraries = ("convert", "evaluate", "models", "checkpoint", "losses", "data", "kernels")
    exceptions = {"vlm_jax.evaluate.__main__"}
    offenders = [
        f"{module} imports {target}"
        for module in sorted(static)
        if module.partition(".")[2].split(".")[0] in libraries and module not in exceptions
        for target in sorted(static[module] | plugins[module])
        if target == "vlm_jax.train" or target.startswith("vlm_jax.train.")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_cycles_and_function_level_imports():
    tree = ast.parse("def f():\n    from vlm_jax.train import trainer\n")
    assert static_imports("vlm_jax.models.vit", tree) == {"vlm_jax.train.trainer"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layering_violations({"vlm_jax.models.vit": {"vlm_jax.train.trainer"}})
