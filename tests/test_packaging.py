"""Each package under src/ declares what its code imports, and the algorithm packages find the
core in this repository (``pip install -e .`` in their folder; ``scripts/check_fresh_install.py``
does that in fresh venvs, in CI)."""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Sequence
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


def _imports(package_dir: Path, skip: Sequence[Path] = ()) -> set[str]:
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        if any(path.is_relative_to(folder) for folder in skip):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


# optional integrations: subpackage -> the extra that installs what it imports
EXTRAS = {("metazoo", "lightning"): "lightning"}


@pytest.mark.parametrize("folder", PACKAGES)
def test_every_import_is_declared(folder):
    project = _project(folder)
    assert project["name"] == PACKAGES[folder]
    declared = {Requirement(text).name for text in project["dependencies"]}
    optional = [SRC / folder / folder / sub for (owner, sub) in EXTRAS if owner == folder]
    third_party = _imports(SRC / folder / folder, skip=optional) - set(
        sys.stdlib_module_names) - {folder}
    missing = {DISTRIBUTIONS.get(name, name) for name in third_party} - declared
    assert not missing, f"{folder}/pyproject.toml does not declare {sorted(missing)}"
    # an optional subpackage's imports: the core's dependencies plus its extra's
    for (owner, sub), extra in EXTRAS.items():
        if owner != folder:
            continue
        with_extra = declared | {Requirement(text).name
                                 for text in project["optional-dependencies"][extra]}
        third_party = _imports(SRC / folder / folder / sub) - set(sys.stdlib_module_names) - {
            folder}
        missing = {DISTRIBUTIONS.get(name, name) for name in third_party} - with_extra
        assert not missing, f"{folder}[{extra}] does not declare {sorted(missing)}"
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


@pytest.mark.parametrize("folder", [f for f in PACKAGES if f != "metazoo"])
def test_algorithm_packages_need_nothing_beyond_the_core(folder):
    """``scripts/setup.sh`` adds an algorithm package with ``pip install --no-deps`` once the
    core is installed (so that pip does not rebuild the core, a path requirement, every time):
    that is only complete while the package requires nothing the core does not."""
    core = {Requirement(t).name for t in _project("metazoo")["dependencies"]}
    own = {Requirement(t).name for t in _project(folder)["dependencies"]} - {"metazoo"}
    assert own <= core, f"{folder} needs {sorted(own - core)}, which the core does not install"


@pytest.mark.parametrize("folder", PACKAGES)
def test_package_metadata_is_complete(folder):
    project = _project(folder)
    for key in ("description", "readme", "license", "classifiers", "urls", "keywords"):
        assert project.get(key), f"{folder}/pyproject.toml lacks {key}"
    assert (SRC / folder / project["readme"]).is_file()
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert project["license"] == {"text": "MIT"}
    root = SRC.parent
    for label, target in project["urls"].items():
        # No public host is known: every URL is a path in this repository (docs/ may be
        # written by the docs site's build later; the package folder must exist).
        assert "://" not in target, f"{folder}: {label} = {target} invents a host"
        if target.startswith("src/"):
            assert (root / target).is_dir(), target


@pytest.mark.parametrize("folder", [f for f in PACKAGES if f != "metazoo"])
def test_learner_entry_points_name_importable_factories(folder):
    import importlib

    points = _project(folder)["entry-points"]["metazoo.learners"]
    assert points
    for name, target in points.items():
        module, _, attribute = target.partition(":")
        assert module.split(".")[0] == folder, f"{name} points outside {folder}: {target}"
        assert callable(getattr(importlib.import_module(module), attribute)), target
