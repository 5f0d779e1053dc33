"""run_multi.py: a sweep in parallel processes that skips finished runs and ends with a table."""

import json
import sys

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
