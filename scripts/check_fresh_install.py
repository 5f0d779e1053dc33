"""Installs each algorithm package on its own, as its README says, into a fresh virtual
environment, and imports it from outside the repository.

For each of ``src/warpgrad``, ``src/leap`` and ``src/maml``: a new venv (``python -m venv``, no
site packages), then, inside the package folder, ``pip install -e .`` and ``python -c "import
<package>"``; then from a neutral folder, with warnings as errors, the package and the core it
pulled in must import from this checkout (``import metazoo`` is not satisfied by the current
folder there), ``pip check`` must pass and numpy must be installed.

What this proves: ``pip install -e .`` resolves the core ``metazoo`` from the repository itself
(it is on no registry) and every other declared dependency from the registry, and the installed
package imports without warnings (torch warns "Failed to initialize NumPy" when numpy is
missing). What it does not: that pip downloads torch. So that CI does not fetch the multi-GB
CUDA wheel once per venv, each fresh venv sees only the torch already installed in the running
interpreter (and torch's own dependencies), through a ``.pth`` file naming a folder of links to
exactly those distributions; pip finds torch there as installed, so ``torch>=2.4`` is satisfied
by the pinned torch of ``requirements.txt``. Nothing else from the running environment is
visible. Needs network access to the package registry (hatchling, editables, numpy).

Then ``setup``: in one more fresh venv, ``scripts/setup.sh maml`` and ``scripts/setup.sh leap
warpgrad`` (one command for any subset; adding packages must not reinstall the core), after
which every learner is listed by name (``metazoo.available_learners()``, the entry points of the
installed metadata) and ``pip check`` passes.

Usage: ``python scripts/check_fresh_install.py [PACKAGE ...]`` (default: warpgrad
leap maml setup); exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("warpgrad", "leap", "maml")
CHECKS = (*PACKAGES, "setup")
#: Every learner the three packages register (their pyprojects' entry points).
LEARNERS = ["anil", "fomaml", "imaml", "leap", "maml", "metasgd", "reptile", "warp_leap",
            "warp_maml", "warpgrad"]


def distribution_closure(name: str) -> dict[str, metadata.Distribution]:
    """``name``'s installed distribution and, recursively, those of its requirements that apply
    here (markers evaluated with the extras requested, e.g. torch's ``cuda-toolkit[cublas,...]``;
    requirements not installed are left out)."""
    found: dict[str, metadata.Distribution] = {}
    extras_done: set[tuple[str, str]] = set()
    pending: list[tuple[str, set[str]]] = [(name, set())]
    while pending:
        requested, extras = pending.pop()
        key = canonicalize_name(requested)
        todo = {"", *extras} - {e for k, e in extras_done if k == key}
        if not todo:
            continue
        try:
            dist = found.get(key) or metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        found[key] = dist
        extras_done |= {(key, e) for e in todo}
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in todo):
                pending.append((req.name, set(req.extras)))
    return found


def link_distributions(dists: dict[str, metadata.Distribution], folder: Path) -> None:
    """Links every top-level entry of each distribution's files (its packages, modules and
    ``.dist-info``) into ``folder``."""
    folder.mkdir(parents=True)
    for dist in dists.values():
        for file in dist.files or []:
            top = Path(file).parts[0]
            if top == ".." or (folder / top).exists() or (folder / top).is_symlink():
                continue  # scripts outside site-packages; already linked
            source = Path(dist.locate_file(top))
            if source.exists():
                (folder / top).symlink_to(source, target_is_directory=source.is_dir())


def fresh_venv(path: Path, torch_folder: Path) -> Path:
    """A new venv whose only extra path is ``torch_folder``; returns its python."""
    venv.create(path, with_pip=True, clear=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "preinstalled_torch.pth").write_text(f"{torch_folder}\n")
    return python


def check(package: str, work: Path, torch_folder: Path, env: dict[str, str]) -> bool:
    """The README's install line for one package in a fresh venv; True when it passed."""
    start = time.perf_counter()
    python = fresh_venv(work / f"venv_{package}", torch_folder)
    folder = ROOT / "src" / package
    steps = [
        (folder, [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  "-e", "."]),
        (folder, [str(python), "-c", f"import {package}"]),
        (work, [str(python), "-W", "error", "-c",
                f"import {package}, metazoo, numpy; print({package}.__file__, metazoo.__file__)"]),
        (work, [str(python), "-m", "pip", "check", "--disable-pip-version-check"]),
    ]
    for cwd, cmd in steps:
        shown = " ".join(cmd[1:]) if cmd[1] == "-m" else " ".join(cmd)
        print(f"[{package}] ({cwd}) $ {shown}", flush=True)
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        output = (result.stdout + result.stderr).strip()
        if output:
            print("    " + output.replace("\n", "\n    "), flush=True)
        if result.returncode != 0:
            print(f"[{package}] FAILED (exit {result.returncode})", flush=True)
            return False
        if "-W" in cmd and not output.startswith(str(folder / package)):
            print(f"[{package}] FAILED: imported from outside {folder}", flush=True)
            return False
    print(f"[{package}] ok in {time.perf_counter() - start:.0f} s", flush=True)
    return True


def check_setup(work: Path, torch_folder: Path, env: dict[str, str]) -> bool:
    """``scripts/setup.sh`` for a subset, then adding two packages without reinstalling the
    core; every learner listed by name. True when it passed."""
    start = time.perf_counter()
    python = fresh_venv(work / "venv_setup", torch_folder)
    env = {**env, "PATH": f"{python.parent}{os.pathsep}{env.get('PATH', '')}"}
    stamp = [str(python), "-c", "import importlib.metadata as m, os; "
             "p = m.distribution('metazoo')._path; print(os.stat(p).st_ino)"]
    listed = [str(python), "-W", "error", "-c",
              "import metazoo; print(metazoo.available_learners())"]
    outputs: dict[str, str] = {}
    steps = [("setup.sh maml", ["scripts/setup.sh", "maml"]), ("core", stamp),
             ("setup.sh leap warpgrad", ["scripts/setup.sh", "leap", "warpgrad"]),
             ("core again", stamp), ("learners", listed),
             ("pip check", [str(python), "-m", "pip", "check", "--disable-pip-version-check"])]
    for label, cmd in steps:
        print(f"[setup] $ {' '.join(cmd)}", flush=True)
        result = subprocess.run(cmd, cwd=ROOT if "setup.sh" in label else work, env=env,
                                capture_output=True, text=True)
        outputs[label] = result.stdout.strip()
        output = (result.stdout + result.stderr).strip()
        if output:
            print("    " + output.replace("\n", "\n    "), flush=True)
        if result.returncode != 0:
            print(f"[setup] FAILED (exit {result.returncode})", flush=True)
            return False
    if outputs["core"] != outputs["core again"]:
        print("[setup] FAILED: adding packages reinstalled the core", flush=True)
        return False
    if outputs["learners"] != str(LEARNERS):
        print(f"[setup] FAILED: learners {outputs['learners']}, expected {LEARNERS}", flush=True)
        return False
    print(f"[setup] ok in {time.perf_counter() - start:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("packages", nargs="*", default=list(CHECKS),
                        help=f"checks to run, among {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.packages) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check {', '.join(unknown)}; choose among {', '.join(CHECKS)}")
    # The fresh venvs must not see this checkout or the calling environment's packages.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    with tempfile.TemporaryDirectory(prefix="fresh_install_") as tmp:
        work = Path(tmp)  # the venvs, removed afterwards
        torch_folder = work / "preinstalled_torch"
        dists = distribution_closure("torch")
        if "torch" not in dists:
            parser.error("torch is not installed in this interpreter; run scripts/setup.sh first")
        link_distributions(dists, torch_folder)
        print(f"fresh venvs see only: {', '.join(sorted(dists))} (linked from this environment)",
              flush=True)
        failed = [p for p in args.packages
                  if not (check_setup(work, torch_folder, env) if p == "setup"
                          else check(p, work, torch_folder, env))]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
