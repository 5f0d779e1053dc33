"""Each package under src/ declares what its code imports, and the algorithm packages find the
core in this repository (``pip install -e .`` in their folder; ``scripts/check_fresh_install.py``
does that in fresh venvs, in CI)."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = {"metazoo": "metazoo", "maml": "metazoo-maml", "leap": "metazoo-leap",
            "warpgrad": "metazoo-warpgrad"}
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"metazoo": "metazoo", "PIL": "pillow"}


def _project(folder: str) -> dict:
    return tomllib.loads((SRC / folder / "pyproject.toml").read_text())["project"]


def _imports(package_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", PACKAGES)
def test_every_import_is_declared(folder):
    project = _project(folder)
    assert project["name"] == PACKAGES[folder]
    declared = {Requirement(text).name for text in project["dependencies"]}
    third_party = _imports(SRC / folder / folder) - set(sys.stdlib_module_names) - {folder}
    missing = {DISTRIBUTIONS.get(name, name) for name in third_party} - declared
    assert not missing, f"{folder}/pyproject.toml does not declare {sorted(missing)}"
    # torch warns "Failed to initialize NumPy" on import without numpy
    assert "torch" not in declared or "numpy" in declared


@pytest.mark.parametrize("folder", [f for f in PACKAGES if f != "metazoo"])
def test_algorithm_packages_take_the_core_from_the_repository(folder):
    pyproject = tomllib.loads((SRC / folder / "pyproject.toml").read_text())
    core = next(Requirement(t) for t in pyproject["project"]["dependencies"]
                if Requirement(t).name == "metazoo")
    # hatchling fills {root:parent:uri} with the file: URI of src/ when it builds the package
    assert core.url == "{root:parent:uri}/metazoo"
    assert (SRC / "metazoo" / "pyproject.toml").exists()
    assert pyproject["build-system"]["build-backend"] == "hatchling.build"
    assert pyproject["tool"]["hatch"]["metadata"]["allow-direct-references"] is True
