"""The layout's arrows: `app/` -> `dragonfly_med/` <- `training/`, each package from its entry
points down to pure geometry, and no import circle anywhere.

The graph is read from the source (every `import` statement, including those inside functions,
since a lazy import that closes a circle is still a circle), so the test needs no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "dragonfly_med", "training")

# Each room may import only the rooms listed (and itself). Rooms are matched longest-first.
ALLOWED = {
    "dragonfly_med.model": {"dragonfly_med.model"},
    "dragonfly_med.imaging": {"dragonfly_med.imaging"},
    "dragonfly_med.checkpoints": {"dragonfly_med.model"},
    "dragonfly_med.chat": {"dragonfly_med.model", "dragonfly_med.checkpoints"},
    "dragonfly_med.relevance": {"dragonfly_med.model"},
    "dragonfly_med.cli": {
        "dragonfly_med.model",
        "dragonfly_med.checkpoints",
        "dragonfly_med.imaging",
        "dragonfly_med.chat",
    },
    "dragonfly_med": {"dragonfly_med.checkpoints", "dragonfly_med.chat"},
    "training.engine": {"dragonfly_med"},
    "training.benchmarks": {"training.engine", "dragonfly_med"},
    "training.offline_med": {"training.engine", "training.benchmarks", "dragonfly_med"},
    "training.tiny": {"training.engine", "training.offline_med", "dragonfly_med"},
    "training": {"training.engine", "training.benchmarks", "training.offline_med", "training.tiny"},
    "app": {"dragonfly_med"},
}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement may refer to (the module and `module.name`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (not its own parent packages)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(
                    name
                    for name in imported_names(module, path, node)
                    if name in files and name != module and not module.startswith(name + ".")
                )
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def room(module: str) -> str:
    return max((r for r in ALLOWED if module == r or module.startswith(r + ".")), key=len)


def test_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_arrows_point_one_way():
    wrong = []
    for module, targets in import_graph().items():
        own = room(module)
        for target in targets:
            other = room(target)
            allowed = other == own or any(other == a or other.startswith(a + ".") for a in ALLOWED[own])
            if not allowed:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_module_has_a_room():
    assert all(room(module) for module in import_graph())
