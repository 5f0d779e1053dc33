"""The README's test command lints cleanly whatever folders the main job has made.

The main job creates ``data/``, ``logs/`` and ``data_oneshot/`` at the repository root; ruff's
default first-party search path (``[".", "src"]``) then classified ``import data`` differently
and ``ruff check .`` failed with I001. The check runs on a copy of the repository's Python files
and its ``pyproject.toml`` (the real layout and configuration) with those folders added.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders that running the README's commands (or the experiments from their own folders) create.
RUN_FOLDERS = ("data", "logs", "data_oneshot", "src/omniglot/data", "src/omniglot/logs",
               "src/maze_navigation/logs")


def _python_files(root: Path) -> list[Path]:
    skip = {"data", "logs", "data_oneshot", "build"}
    return [p for p in root.rglob("*.py")
            if not any(part.startswith(".") or part in skip
                       for part in p.relative_to(root).parts[:-1])]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is a dev requirement (scripts/setup.sh --dev)")
def test_ruff_passes_with_the_main_jobs_folders_present(tmp_path):
    copy = tmp_path / "repo"
    for path in [ROOT / "pyproject.toml", *_python_files(ROOT)]:
        target = copy / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for folder in RUN_FOLDERS:
        (copy / folder).mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."],
                            cwd=copy, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
