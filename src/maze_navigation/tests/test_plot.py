"""Tests of the reward plot."""

import shlex

import numpy as np
import pytest

import plot
import run

TINY = shlex.split("--hs 4 --bs 2 --eplen 8 --msize 5 --random_episodes 1 --nbiter 3")


def test_moving_average():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(plot.moving_average(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(plot.moving_average(values, 1), values)
    with pytest.raises(ValueError, match="window"):
        plot.moving_average(values, 0)


def test_plot_compares_agents_and_seeds(tmp_path, capsys):
    folders = []
    for agent in ("warp", "lstm"):
        for seed in ("0", "1"):
            folder = tmp_path / f"{agent}{seed}"
            run.main([*TINY, "--agent", agent, "--seed", seed, "--out", str(folder)])
            folders.append(str(folder))
    runs = [plot.load_run(f) for f in folders]
    assert [(r.agent, r.seed, len(r.rewards)) for r in runs] == [
        ("warp", 0, 3),
        ("warp", 1, 3),
        ("lstm", 0, 3),
        ("lstm", 1, 3),
    ]
    out = plot.main([*folders, "--out", str(tmp_path / "p.png"), "--window", "2", "--bins", "3"])
    assert capsys.readouterr().out.strip() == plot.summary_tables(runs, bins=3)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_summary_tables_average_the_last_tenth_and_the_windows():
    # 20 episodes: the last 10% is the last 2; 4 bins of 5 episodes
    warp = [plot.RunCurve("warp", s, np.arange(20.0) + s, None) for s in (1, 0)]
    lstm = [plot.RunCurve("lstm", 0, np.full(20, 3.0), None)]
    text = plot.summary_tables([*warp, *lstm], bins=4)
    lines = text.splitlines()
    # seeds in order; seed 0's tail is (18 + 19) / 2, seed 1's one more; std of 18.5 and 19.5
    assert "| warp | 0, 1 | 18.50 / 19.50 | 19.00 | 0.71 |" in lines
    assert "| lstm | 0 | 3.00 | 3.00 | nan |" in lines
    assert "| episodes | 0-5 | 5-10 | 10-15 | 15-20 |" in lines
    # window 0-5 of seed 0 averages 0..4 = 2, of seed 1 3: mean 2.5; each later window +5
    assert "| warp | 2.5 | 7.5 | 12.5 | 17.5 |" in lines
    assert "| lstm | 3.0 | 3.0 | 3.0 | 3.0 |" in lines
    with pytest.raises(ValueError, match="bins"):
        plot.summary_tables(warp, bins=0)


def test_load_run_rejects_folder_without_log(tmp_path):
    with pytest.raises(ValueError, match=r"rewards\.csv"):
        plot.load_run(tmp_path)


@pytest.fixture
def one_run(tmp_path):
    folder = tmp_path / "lstm0"
    run.main([*TINY, "--agent", "lstm", "--out", str(folder)])
    return folder


def _one_line_exit_2(argv, capsys) -> str:
    from metazoo.cli import run_command

    with pytest.raises(SystemExit) as exit_info:
        run_command(plot.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(one_run, tmp_path, capsys):
    png = tmp_path / "p.png"
    err = _one_line_exit_2([str(tmp_path / "nope"), "--out", str(png)], capsys)
    assert "has no rewards.csv" in err
    err = _one_line_exit_2([str(one_run), "--out", str(png), "--window", "0"], capsys)
    assert "--window 0: must be >= 1" in err
    err = _one_line_exit_2([str(one_run), "--out", str(png), "--bins", "0"], capsys)
    assert "--bins 0: must be >= 1" in err
    err = _one_line_exit_2([str(one_run), "--out", str(tmp_path)], capsys)
    assert "is a folder" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_line_exit_2([str(one_run), "--out", str(blocker / "p.png")], capsys)
    assert f"--out {blocker / 'p.png'}: cannot write it" in err
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "rewards.csv").write_text("a,b\n1,2\n")
    err = _one_line_exit_2([str(garbage), "--out", str(png)], capsys)
    assert "is not a rewards log written by run.py" in err
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "rewards.csv").write_bytes((one_run / "rewards.csv").read_bytes())
    err = _one_line_exit_2([str(no_config), "--out", str(png)], capsys)
    assert "cannot read its agent and seed" in err
    assert not png.exists()


def test_a_torn_last_line_of_a_running_run_is_left_out(one_run):
    (one_run / "summary.json").unlink()  # still running: the checkpoint says agent and seed
    with open(one_run / "rewards.csv", "a") as f:
        f.write("3,0.")
    curve = plot.load_run(one_run)
    assert (curve.agent, curve.seed, len(curve.rewards)) == ("lstm", 0, 3)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: maze_rewards.png)" in text and "(default: 50)" in text
