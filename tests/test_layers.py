"""The library's layers: no module imports from a layer above its own, nor in a circle.

Every import counts, those under ``if TYPE_CHECKING:`` and those inside functions included.
The layers are drawn, with what each module owns, at the top of ``docs/design.md``; a new
module must be placed in one of them here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "durable"

# From the bottom up. A module may import from its own layer (without a circle) and below.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundation",
        {
            "_control",
            "attributes",
            "cadence",
            "codec",
            "config",
            "dev",
            "dispatch",
            "durations",
            "errors",
            "ids",
            "leader",
            "limits",
            "liveness",
            "rate",
            "redaction",
            "retry",
            "serialization",
            "step_info",
            "store",
            "timer_index",
            "tracing",
        },
    ),
    ("core", {"core", "effects", "histories"}),
    ("replay", {"replay"}),
    ("workflow context", {"context"}),
    ("engine", {"activation", "deadlines"}),
    ("step runner and client", {"client", "delayed", "runner", "stepmessage"}),
    ("canvas", {"builtin_workflows", "canvas"}),
    ("operations", {"admin", "bulk", "reconcile", "schedule_import", "scheduler"}),
    ("facade", {"runtime"}),
    ("processes", {"beat", "metrics", "testing"}),
    ("entry points", {"__init__", "cli"}),
]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name, packages by their ``__init__``."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import stands."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                imported.add(child if child in known else node.module)
    return {name for name in imported if name in known}


def _layer(module: str) -> int:
    """The index of the layer holding ``module`` (by its first name under ``durable``)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer: place it in tests/test_layers.py")


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) - {name} for name, path in known.items()}


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_the_module_graph_has_no_circle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            circle = visit(target, [*path, module])
            if circle is not None:
                return circle
        done.add(module)
        return None

    circles = [c for c in (visit(m, []) for m in sorted(graph)) if c is not None]
    assert circles == [], " -> ".join(circles[0]) if circles else ""


def test_only_the_testing_helpers_start_servers() -> None:
    """``durable.dev`` (throwaway servers, child processes) is for tests and tools only."""
    users = {
        module
        for module, targets in _graph().items()
        if not module.startswith("durable.dev")
        and any(t.startswith("durable.dev") for t in targets)
    }
    assert users <= {"durable.testing"}


def test_every_layer_names_modules_that_exist() -> None:
    tops = {name.split(".")[1] if "." in name else "__init__" for name in _modules()}
    named = set().union(*(members for _, members in LAYERS))
    assert named - tops == set()
