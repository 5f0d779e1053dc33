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


@pytest.mark.parametrize(("argv", "message"), [
    # issue 18, bug 8: two runs of one configuration shared (and broke) one folder
    (["--seeds", "1,1", "--parallel", "2"], "--seeds lists 1 more than once"),
    (["--methods", "leap,no,leap"], "--methods lists leap more than once"),
    (["--num_pretrain", "4,4"], "--num_pretrain lists 4 more than once"),
    # issue 18, bug 8: flags the sweep sets, in every spelling main.py's parser accepts
    (["--", "--log_dir=X"], "--log_dir is set by the sweep"),
    (["--", "--log_d", "X"], "--log_dir is set by the sweep"),
    (["--", "--suffix=a"], "--suffix is set by the sweep"),
    (["--", "--meta_model", "maml"], "--meta_model is set by the sweep"),
    # typos stop the sweep before any run starts
    (["--methods", "lep"], "--methods lep: not a --meta_model"),
    (["--", "--clases", "5"], "after --: unrecognized arguments: --clases 5"),
    (["--seeds", "1,x"], "'1,x' is not a comma-separated list of integers"),
])
def test_bad_sweeps_are_refused_with_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_multi.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


FAKE_MAIN = """
import argparse, json, pathlib, time
p = argparse.ArgumentParser()
for flag in ("--meta_model", "--num_pretrain", "--seed", "--suffix", "--log_dir"):
    p.add_argument(flag)
p.add_argument("--resume", action="store_true")
a = p.parse_args()
steps = 4 if a.meta_model == "slow" else 1
print("estimated meta-training time: 1 d 12 h", flush=True)
for k in range(1, steps + 1):
    time.sleep(0.5 if a.meta_model == "slow" else 0.0)
    print(f"[step {k}/{steps}] meta_loss 1.0 inner 1.0 acc nan | 0.50 s/step, eta 1 d 12 h",
          flush=True)
folder = pathlib.Path(a.log_dir, a.meta_model, a.suffix)
folder.mkdir(parents=True, exist_ok=True)
(folder / "done.json").write_text(json.dumps({"test_acc": 0.5 if steps > 1 else 0.25}))
"""


@pytest.mark.parametrize("every", [0, 1000])
def test_sweep_shows_progress_and_reports_runs_as_they_finish(every, tmp_path, monkeypatch,
                                                              capsys):
    """A stand-in for main.py: the slow run is submitted first and finishes last."""
    fake = tmp_path / "fake_main.py"
    fake.write_text(FAKE_MAIN)
    monkeypatch.setattr(run_multi, "MAIN", fake)
    runs = [run_multi.Run("slow", 1, 1), run_multi.Run("fast", 1, 1)]
    results = run_multi.sweep(runs, tmp_path / "logs", [], parallel=2, progress_every=every,
                              poll=0.05)
    assert results == {runs[0]: 0.5, runs[1]: 0.25}
    lines = capsys.readouterr().out.splitlines()
    finished = [line.split(":")[0].strip() for line in lines if ": test acc " in line]
    assert finished == ["fast/n1_s1", "slow/n1_s1"]  # as they end, not as submitted
    shown = [line.strip() for line in lines if line.strip().startswith("slow/n1_s1: step ")]
    assert shown[-1] == "slow/n1_s1: step 4/4, 0.50 s/step, eta 1 d 12 h"  # the last, always
    assert len(shown) >= 2 if every == 0 else len(shown) == 2  # updated while the run went
    assert f"slow/n1_s1: started, output in {tmp_path / 'logs/slow/n1_s1.out'}" in [
        line.strip() for line in lines]
    assert "slow/n1_s1: estimated meta-training time: 1 d 12 h" in [line.strip() for line in lines]
    # one ETA for the whole sweep (issue 27), from the runs' progress lines
    sweep_lines = [line.strip() for line in lines if line.strip().startswith("sweep: ")]
    assert sweep_lines and all(" runs done, " in line and ", eta " in line
                               for line in sweep_lines)
