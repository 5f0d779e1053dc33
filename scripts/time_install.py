"""Times installing one algorithm package and then adding a second, the old way against
``scripts/setup.sh``, each in a fresh virtual environment.

- ``pip``: ``pip install -e src/maml``, then ``pip install -e src/leap``. The packages name the
  core by its path in this repository, which pip rebuilds and reinstalls on every install.
- ``setup.sh``: ``scripts/setup.sh maml``, then ``scripts/setup.sh leap`` (the core once; the
  packages with ``--no-deps``).
- ``setup.sh, one command``: ``scripts/setup.sh maml leap warpgrad``.

As in ``scripts/check_fresh_install.py``, each venv sees the torch of this interpreter through
links (no multi-GB download), so the times are those of building and installing the packages;
hatchling, editables and numpy come from the package registry (pip's cache after the first
run). Prints seconds per step and whether the step rebuilt the core. Run from anywhere:
``python scripts/time_install.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh_install_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_fresh_install",
                                                  ROOT / "scripts" / "check_fresh_install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _core_stamp(python: Path) -> str:
    """Identifies the installed core's metadata (changes when pip reinstalls it)."""
    code = ("import importlib.metadata as m, os; d = m.distribution('metazoo'); "
            "p = d._path; print(p, os.stat(p).st_ino, os.stat(p).st_mtime_ns)")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip()


def run(label: str, steps: list[list[str]], work: Path, torch_folder: Path,
        fresh: object) -> list[tuple[str, float, bool]]:
    venv_dir = work / label.replace(" ", "_").replace(",", "")
    python = fresh.fresh_venv(venv_dir, torch_folder)  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    rows = []
    for step in steps:
        before = _core_stamp(python)
        start = time.perf_counter()
        cmd = [str(python), "-m", "pip", *step[1:]] if step[0] == "pip" else step
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{label}: {' '.join(step)} failed:\n{done.stdout}{done.stderr}")
        rebuilt = bool(before) and _core_stamp(python) != before
        rows.append((" ".join(step), seconds, rebuilt))
    return rows


def main() -> int:
    fresh = _fresh_install_module()
    quiet = ["--quiet", "--disable-pip-version-check"]
    plans = {
        "pip": [["pip", "install", *quiet, "-e", "src/maml"],
                ["pip", "install", *quiet, "-e", "src/leap"]],
        "setup.sh": [["scripts/setup.sh", "maml"], ["scripts/setup.sh", "leap"]],
        "setup.sh, one command": [["scripts/setup.sh", "maml", "leap", "warpgrad"]],
    }
    with tempfile.TemporaryDirectory(prefix="time_install_") as tmp:
        work = Path(tmp)
        torch_folder = work / "preinstalled_torch"
        fresh.link_distributions(fresh.distribution_closure("torch"), torch_folder)
        print(f"{'how':<24} {'step':<52} {'seconds':>8}  core rebuilt")
        for label, steps in plans.items():
            for step, seconds, rebuilt in run(label, steps, work, torch_folder, fresh):
                print(f"{label:<24} {step:<52} {seconds:8.1f}  {'yes' if rebuilt else 'no'}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
