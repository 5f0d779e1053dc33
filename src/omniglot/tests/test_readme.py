"""The READMEs' and the docs pages' commands work as written: the Omniglot page's Python example
(docs/experiments/omniglot.md) runs on a run folder where its own commands put one; every shell
command (run by bash with python, pip and the set-up scripts replaced by recorders) names scripts
and folders that exist, passes flags its script accepts, and `monitor.py` reads the folders the
README's runs write."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import pytest

import main
import monitor
import run_multi

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "src" / "omniglot" / "README.md"
# The Omniglot experiment's documentation: the long sections of the README moved there.
PAGE = ROOT / "docs" / "experiments" / "omniglot.md"
READMES = [ROOT / "README.md", README,
           *(ROOT / "src" / name / "README.md" for name in ("metazoo", "maml", "leap",
                                                             "warpgrad")),
           *sorted((ROOT / "docs").rglob("*.md"))]
# Commands a recorder stands in for: what they were called with is checked, nothing runs.
RECORDED = ("python", "python3", "pip", "bash", "torchrun", ".", "source", "./scripts/setup.sh",
            "mkdocs", "jupytext", "mkdir", "cp")
_FIELD, _RECORD = "\x1f", "\x1e"


def _blocks(readme: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme.read_text(), flags=re.DOTALL)


def _commands(readme: Path) -> list[tuple[Path, list[str]]]:
    """``(folder, argv)`` of every recorded command of the README's bash blocks, in order, run
    from the repository root (variables carry over from block to block, the folder does not).
    Placeholders such as ``<other training flags>`` become one ``PLACEHOLDER`` word."""
    # set -f: globs reach the recorder as written (the test matches them itself); expanded here
    # they would depend on which logs a run of the README's main job left in the checkout.
    script = ['set -f']
    script += ['rec() { printf "%s\\x1f" "$PWD" "$@" >> "$REC"; printf "\\x1e" >> "$REC"; }']
    script += [f'{name}() {{ rec {name} "$@"; }}' for name in RECORDED]
    # PATH is an empty folder: any other program is recorded as unknown, never run
    script += ['command_not_found_handle() { rec UNKNOWN "$@"; return 127; }']
    for block in _blocks(readme, "bash"):
        script += [f'cd "{ROOT}"', re.sub(r"<[a-z][a-z ]*>", "PLACEHOLDER", block)]
    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "commands"
        record.write_text("")
        result = subprocess.run(["/bin/bash", "-c", "\n".join(script)], cwd=ROOT, text=True,
                                capture_output=True, env={"REC": str(record), "PATH": folder})
        assert result.returncode == 0, result.stderr
        text = record.read_text()
    out = []
    for entry in filter(None, text.split(_RECORD)):
        cwd, *argv = entry.split(_FIELD)[:-1]
        out.append((Path(cwd), argv))
    return out


def _python_script(cwd: Path, argv: list[str]) -> tuple[Path, list[str]] | None:
    """``(script, its arguments)`` of a ``python script.py ...`` command, else ``None``."""
    if argv[0] == "torchrun":
        argv = ["python", *[a for a in argv[1:] if not a.startswith("--nproc")][1:]]
    if argv[0] not in ("python", "python3") or len(argv) < 2 or not argv[1].endswith(".py"):
        return None
    return cwd / argv[1], argv[2:]


PARSERS = {"main.py": lambda argv: main.make_parser().parse_args(argv),
           "run_multi.py": run_multi.parse_args,
           "monitor.py": lambda argv: monitor.make_parser().parse_args(argv)}


def _shell_match(path: str, pattern: str) -> bool:
    """A shell glob: ``*`` stays within one folder name."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted))


def _written_run_folders(commands) -> set[str]:
    """The run folders ``<log_dir>/<meta_model>/<suffix>`` the README's runs write."""
    folders = set()
    for cwd, argv in commands:
        found = _python_script(cwd, argv)
        if found is None or "PLACEHOLDER" in found[1] or "..." in found[1]:
            continue
        script, args = found
        if script.name == "main.py":
            a = main.make_parser().parse_args(args)
            folders.add(f"{a.log_dir}/{a.meta_model}/{a.suffix}")
        elif script.name == "run_multi.py":
            a, _ = run_multi.parse_args(args)
            folders |= {f"{a.log_dir}/{m}/{run_multi.Run(m, n, s).suffix}" for m in a.methods
                        for n in a.num_pretrain for s in a.seeds}
    return folders


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_commands_name_what_exists_with_flags_their_scripts_accept(readme, capsys):
    commands = _commands(readme)
    assert commands or readme.name == "README.md" or readme.is_relative_to(ROOT / "docs")
    for cwd, argv in commands:
        shown = " ".join(argv)
        assert argv[0] != "UNKNOWN", f"{readme}: {shown}: add a recorder for it to this test"
        if argv[0] == "bash" or argv[0] == "./scripts/setup.sh":
            script = cwd / (argv[1] if argv[0] == "bash" else argv[0])
            assert script.is_file(), f"{readme}: {shown}: no {script}"
        elif argv[0] == "pip" or argv[1:3] == ["-m", "pip"]:
            args = argv[1:] if argv[0] == "pip" else argv[3:]
            targets = [cwd / args[i + 1] for i, a in enumerate(args) if a == "-e"]
            for target in targets:
                assert (target / "pyproject.toml").is_file(), f"{readme}: {shown}"
            # the algorithm packages name the core by path: pip refuses it as an editable too
            names = {t.resolve().name for t in targets}
            assert not ("metazoo" in names and len(names) > 1), f"{readme}: {shown}"
        elif (found := _python_script(cwd, argv)) is not None:
            script, args = found
            assert script.is_file(), f"{readme}: {shown}: no {script}"
            if script.name in PARSERS and "PLACEHOLDER" not in args and "..." not in args:
                try:
                    PARSERS[script.name](args)
                except SystemExit:
                    pytest.fail(f"{readme}: {shown}: {capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("readme", [ROOT / "README.md", README, PAGE],
                         ids=["top", "omniglot", "omniglot-page"])
def test_monitor_reads_the_folders_the_readmes_runs_write(readme):
    commands = _commands(readme)
    written = _written_run_folders(commands)
    assert written
    for cwd, argv in commands:
        found = _python_script(cwd, argv)
        if found is None or found[0].name != "monitor.py":
            continue
        runs = monitor.make_parser().parse_args(found[1]).runs
        for pattern in runs:
            assert any(_shell_match(folder, pattern) for folder in written), (
                f"{readme}: {pattern} matches no run folder")
    if readme == PAGE:
        (example,) = _blocks(PAGE, "python")
        paths = re.findall(r'FileHandler\("([^"]+)"\)', example)
        assert paths and set(paths) <= written, paths


def test_python_example_runs_on_the_folder_the_commands_write(omniglot_root, tmp_path, tiny,
                                                             monkeypatch):
    (example,) = _blocks(PAGE, "python")
    (path,) = re.findall(r'FileHandler\("([^"]+)"\)', example)
    log_dir, method, suffix = path.rsplit("/", 2)
    main.main(tiny(omniglot_root, tmp_path / log_dir, method, "--suffix", suffix))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, str(PAGE), "exec"), namespace)
    assert namespace["h"].name == f"{method}/{suffix}" and namespace["h"].test_eval_data
    matplotlib.pyplot.close("all")
