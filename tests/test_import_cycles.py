"""No import circles in any package or experiment (TYPE_CHECKING and function-level imports
included): each module's dependencies form a tree that can be read bottom-up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Import roots: the packages (import name -> folder) and the experiment folders (their modules
# import each other by file name).
PACKAGES = {"metazoo": SRC / "metazoo" / "metazoo", "maml": SRC / "maml" / "maml",
            "leap": SRC / "leap" / "leap", "warpgrad": SRC / "warpgrad" / "warpgrad"}
EXPERIMENTS = [SRC / "omniglot", SRC / "maze_navigation"]


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module name -> the names in ``modules`` it imports (``from pkg import module`` too)."""
    graph = {}
    for name, path in modules.items():
        package = name.rsplit(".", 1)[0] if "." in name else ""
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else f"{package}.{node.module}"
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in done:
            return None
        if module in visiting:
            return [*visiting[visiting.index(module):], module]
        visiting.append(module)
        for dependency in sorted(graph[module]):
            found = visit(dependency)
            if found:
                return found
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module)
        if found:
            return found
    return None


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_has_no_import_circle(package):
    folder = PACKAGES[package]
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    cycle = _cycle(_graph(modules))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=lambda p: p.name)
def test_an_experiment_has_no_import_circle(folder):
    modules = {p.stem: p for p in folder.glob("*.py")}
    cycle = _cycle(_graph(modules))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_checker_finds_a_circle(tmp_path):
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from pkg.b import B\n")
    (tmp_path / "b.py").write_text("from pkg import a\n")
    graph = _graph({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})
    assert _cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
