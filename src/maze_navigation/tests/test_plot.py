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


def test_plot_compares_agents_and_seeds(tmp_path):
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
    out = plot.main([*folders, "--out", str(tmp_path / "p.png"), "--window", "2"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_load_run_rejects_folder_without_log(tmp_path):
    with pytest.raises(ValueError, match=r"rewards\.csv"):
        plot.load_run(tmp_path)
