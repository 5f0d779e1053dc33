"""run_multi.py: a sweep in parallel processes that skips finished runs and ends with a table."""

import json
import sys
from pathlib import Path

import pytest

import run_multi


def test_sweep_runs_in_parallel_skips_finished_runs_and_summarises(omniglot_root, tmp_path,
                                                                    capsys, tiny):
    shared = tiny(omniglot_root, None, None)
    argv = ["--methods", "no", "--num_pretrain", "2", "--seeds", "1,2", "--parallel",
            "2", "--log_dir", str(tmp_path), "--", *shared, "--threads", "1"]
    assert run_multi.main(argv) == 0
    out = capsys.readouterr().out
    for method in ("no",):
        for seed in (1, 2):
            done = json.loads((tmp_path / method / f"n2_s{seed}" / "done.json").read_text())
            assert done["seed"] == seed
        line = next(ln for ln in out.splitlines() if ln.split()[:2] == [method, "2"])
        assert line.split()[-1] == "2"  # two seeds in the mean
    assert run_multi.main(argv) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 2


def test_sweep_flags_are_validated():
    with pytest.raises(SystemExit):
        run_multi.parse_args(["--methods", "no", "--", "--seed", "3"])
    args, extra = run_multi.parse_args(["--seeds", "1,2,3", "--", "--classes", "5"])
    assert args.seeds == [1, 2, 3] and extra == ["--classes", "5"]
    assert run_multi.Run("leap", 4, 2).suffix == "n4_s2"
    assert sys.executable


def test_sweep_passes_arguments_as_a_list_never_through_a_shell(omniglot_root, tmp_path, tiny):
    # A data folder whose name a shell would expand, split and execute.
    hostile = tmp_path / "data dir; touch pwned $(touch pwned2)"
    hostile.symlink_to(omniglot_root, target_is_directory=True)
    argv = ["--methods", "no", "--num_pretrain", "2", "--seeds", "1", "--log_dir",
            str(tmp_path / "logs"), "--", *tiny(hostile, None, None), "--threads", "1"]
    assert run_multi.main(argv) == 0
    assert json.loads((tmp_path / "logs/no/n2_s1/done.json").read_text())["seed"] == 1
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_no_shell_strings_in_experiments():
    """Subprocesses in the experiments and their tests take argument lists."""
    root = Path(run_multi.__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("omniglot/**/*.py"), *root.glob("maze_navigation/**/*.py")]:
        text = path.read_text()
        for pattern in ("shell=True", "os.system(", "os.popen("):
            if pattern in text and path.name != "test_run_multi.py":
                offenders.append(f"{path}: {pattern}")
    assert not offenders
