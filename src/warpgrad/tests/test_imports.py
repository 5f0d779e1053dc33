"""The package's modules import in any order: no import circles."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import warpgrad

PACKAGE = pathlib.Path(warpgrad.__file__).parent
MODULES = sorted(f"warpgrad.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every ``warpgrad.*`` module that ``path`` imports, at any depth (TYPE_CHECKING and
    function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "warpgrad."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("warpgrad."))
    return names


def test_module_imports_form_no_cycle():
    graph = {m: _imported_modules(PACKAGE / f"{m.split('.')[1]}.py") for m in MODULES}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, f"import circle: {' -> '.join([*visiting, module])}"
        visiting.append(module)
        for dependency in graph.get(module, ()):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_each_module_imports_first_in_a_fresh_interpreter():
    # One interpreter per module would cost ~1 s each; a fresh import per module in one
    # subprocess (sys.modules cleared of warpgrad between them) checks the same orders.
    script = "\n".join([
        "import importlib, sys",
        f"for name in {MODULES!r}:",
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'warpgrad']:",
        "        del sys.modules[loaded]",
        "    importlib.import_module(name)",
        "import warpgrad",
        "assert {'Warp', 'DualUpdater', 'OnlineUpdater', 'WarpGrad'} <= set(warpgrad.__all__)",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr

