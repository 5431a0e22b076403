"""The code's shape, checked from its syntax trees: imports read one way, and long argument
lists are passed by keyword.

Imports are collected wherever they stand (module level or inside a function), so an
import moved into a function cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "training")
MAX_POSITIONAL = 5


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package``."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        # A module's own package (its __init__) is not a dependency between modules.
        if target and target != name and not name.startswith(target + "."):
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    files = {name: path for package in PACKAGES for name, path in modules(package).items()}
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_service_and_training_have_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the packages
    assert find_cycle(graph) is None


def test_the_service_never_imports_training():
    graph = import_graph()
    leaks = {
        name: sorted(t for t in targets if t.startswith("training"))
        for name, targets in graph.items()
        if name.startswith("service")
    }
    assert {name: targets for name, targets in leaks.items() if targets} == {}


def positional_parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    names = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


@pytest.mark.parametrize("package", [*PACKAGES, "bench"])
def test_no_function_takes_more_than_five_positional_parameters(package):
    offenders = []
    for name, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = len(positional_parameters(node))
                if count > MAX_POSITIONAL:
                    offenders.append(f"{name}.{node.name}: {count}")
    assert offenders == []
