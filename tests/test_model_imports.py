"""model/ has no import cycle (function-level imports included), and an import inside a function says why
(an optional dependency, ...) in a comment on its line or the line above."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "model"


def _imports(path: Path):
    """(module imported, line number, at module level?) for every import statement in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative to qwenvl_lab.model
            base = ["model"][: max(0, 2 - node.level)]
            for alias in ([] if node.module else node.names):
                yield ".".join(base + [alias.name]), node.lineno, id(node) in top
            if node.module:
                yield ".".join(base + [node.module]), node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in MODEL.glob("*.py"):
        name = f"model.{path.stem}"
        deps = set()
        for mod, _, _ in _imports(path):
            if mod == "model":
                deps.add("model.__init__")
            elif mod.startswith("model."):
                deps.add(mod)
        graph[name if path.stem != "__init__" else "model.__init__"] = deps
    return graph


def test_no_import_cycle_in_model():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == "model.__init__" and node != "model.__init__":
                raise AssertionError(f"{node} imports the package `model` (import the module it needs)")
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError(f"import cycle in model/: {' -> '.join(cycle)}")
            if state.get(dep) is None:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [node])
    assert "model.model" in graph and graph["model.__init__"] == set()  # the package loads its names lazily


def test_function_level_imports_say_why():
    unexplained = []
    for path in sorted(MODEL.glob("*.py")):
        lines = path.read_text().splitlines()
        for mod, lineno, at_top in _imports(path):
            if at_top or mod == "__future__":
                continue
            here, above = lines[lineno - 1], lines[lineno - 2] if lineno > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                unexplained.append(f"{path.name}:{lineno} {mod}")
    assert not unexplained, f"imports inside functions without a comment saying why: {unexplained}"
