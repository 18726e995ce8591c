"""The import graph of ``memgen``: no cycles, and no module imports from a layer above its own.

Every import counts, including the lazy ones inside functions: a lazy import still makes the
lower module depend on the upper one. Tasks plug into the shared entry points through the
task protocol (:mod:`memgen.tasks.protocol`), so nothing below ``memgen.agents`` needs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memgen"

# Lowest first. A module may import from its own layer or any layer below, never above.
LAYERS = [
    (
        "foundation",
        [
            "memgen.version",
            "memgen.errors",
            "memgen.dataclass_cli",
            "memgen.tables",
            "memgen.config",
            "memgen.precision",
            "memgen.checkpoint",
            "memgen.data",
            "memgen.delimiters",
            "memgen.sampling",
        ],
    ),
    (
        "model",
        [
            "memgen",
            "memgen.reasoner",
            "memgen.trigger",
            "memgen.weaver",
            "memgen.loading",
            "memgen.model",
            "memgen.engine",
            "memgen.continuous",
            "memgen.forced",
            "memgen.checkpointing",
            "memgen.teacher_forcing",
            "memgen.tiny",
        ],
    ),
    ("tasks", ["memgen.tasks"]),
    ("experience", ["memgen.experience"]),
    ("agents", ["memgen.agents"]),
    ("entry points", ["memgen.evaluate", "memgen.train"]),
    (
        "applications",
        ["memgen.analysis", "memgen.demo", "memgen.serving", "memgen.harness", "memgen.cli", "memgen.__main__"],
    ),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(names: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the memgen modules it imports anywhere in its body (module level or inside functions)."""
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    if f"{module}.{alias.name}" in names:
                        targets.add(f"{module}.{alias.name}")
                    elif module in names:
                        targets.add(module)
        graph[name] = targets - {name}
    return graph


def layer_of(module: str) -> int:
    best, index = None, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    assert cycles(imports(module_names())) == []


def test_no_module_imports_from_a_layer_above_its_own():
    graph = imports(module_names())
    upward = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )
    assert upward == []


def test_the_checker_sees_a_cycle_and_an_upward_lazy_import():
    graph = {"memgen.tasks.a": {"memgen.evaluate"}, "memgen.evaluate": {"memgen.tasks.a"}}
    assert cycles(graph) == [["memgen.evaluate", "memgen.tasks.a"]]
    assert layer_of("memgen.tasks.a") < layer_of("memgen.evaluate")
    source = imports(
        {
            "memgen.tasks.x": PACKAGE / "tasks" / "registry.py",
            "memgen.tasks": PACKAGE / "tasks" / "__init__.py",
            "memgen.tasks.answering": PACKAGE / "tasks" / "answering.py",
        }
    )
    assert "memgen.tasks.answering" in source["memgen.tasks.x"]
