"""The tutorial notebooks run top to bottom as notebooks.

Each tutorial is a jupytext percent-format ``.py`` file under ``docs/tutorials/`` (it diffs like
code; the site renders it with mkdocs-jupyter). jupytext reads it into a notebook and nbclient
runs every cell in a fresh Python kernel, as Jupyter would; a cell that raises fails the test
with the cell's traceback. Each is sized to run on a CPU in well under a minute.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.py"))
MISSING = [name for name in ("jupytext", "nbclient", "ipykernel")
           if importlib.util.find_spec(name) is None]


def test_every_tutorial_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert len(TUTORIALS) == 3
    for tutorial in TUTORIALS:
        assert f"tutorials/{tutorial.name}" in nav, tutorial.name


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (requirements-docs.txt, "
                    "installed by scripts/setup.sh --dev)")
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_as_a_notebook(tutorial, tmp_path, monkeypatch):
    # Jupyter's own deprecation notice about its folders would be an error under -W error.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    import jupytext
    import nbclient

    notebook = jupytext.read(tutorial)
    # the kernel imports the packages from this checkout, as the test process does
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "src" / name) for name in ("metazoo", "maml", "leap", "warpgrad")]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells
                      if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert printed.strip(), f"{tutorial.name} printed nothing"
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, errors
