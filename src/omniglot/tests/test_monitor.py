"""monitor.py: FileHandler reads runs back with the reference's attributes; plots with their
defaults; the compare command writes a PNG."""

import shutil
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch

import main
import monitor
from metazoo.cli import run_command

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def runs(omniglot_root, tmp_path_factory, tiny):
    log_dir = tmp_path_factory.mktemp("logs")
    out = []
    for method in ("reptile", "no"):
        for seed in ("1", "2"):
            main.main(tiny(omniglot_root, log_dir, method, "--seed", seed, "--suffix",
                           f"s{seed}"))
            out.append(log_dir / method / f"s{seed}")
    return out


def test_load_results_parses_the_reference_line(tmp_path):
    path = tmp_path / "results_train_train.log"
    path.write_text("3,1.500000,2.000000,0.250000,2.100000;1.900000;,0.200000;0.300000;\n"
                    "4,1.000000,1.500000,nan,1.500000;,\n")
    data = monitor.load_results(path)
    assert data["step"] == [3, 4] and data["meta_loss"] == [1.5, 1.0]
    assert data["loss_curve"] == [[2.1, 1.9], [1.5]]
    assert data["acc_curve"] == [[0.2, 0.3], []] and np.isnan(data["acc"][1])
    path.write_text("3,1.0,2.0\n")
    with pytest.raises(ValueError, match="expected 6"):
        monitor.load_results(path)


def test_file_handler_has_the_reference_attributes(runs):
    h = monitor.FileHandler(runs[0])
    assert h.name == "reptile/s1" and h.method == "reptile" and "meta_model" in h.args
    assert h.train_train_data["step"] == [1, 2] and h.train_eval_data["step"] == [1, 2]
    assert len(h.val_train_data) == 1 and len(h.val_eval_data) == 1
    assert len(h.test_train_data) == 2 and len(h.test_eval_data) == 2
    assert h.agg_val("acc", "eval").shape == (3, 1)
    assert h.agg_test("loss", "train").shape == (1, 2)
    assert h.final_test_acc() == pytest.approx(h.summary["test_acc"], abs=1e-6)
    assert monitor.FileHandler(runs[2]).train_train_data is None
    with pytest.raises(ValueError, match="no meta-training logs"):
        monitor.FileHandler(runs[2]).plot_train()


def test_plot_methods_work_with_their_defaults(runs):
    h = monitor.FileHandler(runs[0])
    for plot in (h.plot_train, h.plot_val, h.plot_test):
        ax = plot()
        assert len(ax.lines) == 1
        matplotlib.pyplot.close(ax.figure)


def test_compare_writes_a_png_with_spread_over_seeds(runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    monitor.main(["compare", *map(str, runs), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    table = monitor.compare(runs, tmp_path / "again.png")
    accs = {m: [monitor.FileHandler(r).final_test_acc() for r in runs if r.parent.name == m]
            for m in ("reptile", "no")}
    for m, values in accs.items():
        assert table[m] == pytest.approx((np.mean(values), np.std(values), 2))
    printed = capsys.readouterr().out
    assert "reptile" in printed and "no" in printed
    with pytest.raises(ValueError, match="no results_"):
        monitor.FileHandler(tmp_path)


def test_every_plot_has_labelled_axes(runs):
    h = monitor.FileHandler(runs[0])
    for ax in (h.plot_train(), h.plot_val(), h.plot_test("loss", "train")):
        assert ax.get_xlabel() == "meta-step" and ax.get_ylabel()
        matplotlib.pyplot.close(ax.figure)
    assert "1 validation task" in h.plot_val().get_ylabel()
    ax = matplotlib.pyplot.subplots()[1]
    ax.set_ylabel("mine")
    assert h.plot_val(ax=ax).get_ylabel() == "mine"  # the caller's labels stay
    matplotlib.pyplot.close("all")


def test_compare_says_seeds_scale_and_chance(runs, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(monitor, "_save_figure", lambda fig, out: figures.append(fig))
    one_seed = [r for r in runs if r.name == "s1"]
    monitor.compare(one_seed, tmp_path / "one.png")
    monitor.compare(runs, tmp_path / "two.png")
    for fig, seeds in zip(figures, ("1 seed", "2 seeds")):
        left, right = fig.axes
        assert [t.get_text() for t in right.get_xticklabels()] == [
            f"no\n{seeds}", f"reptile\n{seeds}"]
        bars = [c for c in right.containers if hasattr(c, "errorbar")]
        assert all((c.errorbar is None) == (seeds == "1 seed") for c in bars)  # no 0-height bars
        assert any(line.get_label() == "chance (1/3)" and line.get_ydata()[0] == 1 / 3
                   for line in right.lines)  # the tiny runs are 3-way
        assert f"reptile ({seeds})" in [t.get_text() for t in left.get_legend().get_texts()]
        assert "3-way alphabet tasks, 3 meta-training alphabets, 2 meta-steps x 2 tasks" in (
            fig._suptitle.get_text())
        assert f"({torch.backends.cpu.get_cpu_capability()})" in fig._suptitle.get_text()
        matplotlib.pyplot.close(fig)


def test_compare_names_the_warp_setting_of_each_warped_method(omniglot_root, tmp_path, tiny,
                                                              monkeypatch):
    """warp_leap and warp_leap_tuned side by side: the legend and the bars say which warp
    initialisation and meta-learning rate each ran with (from args.log)."""
    logs = tmp_path / "logs"
    for method in ("warp_leap", "warp_leap_tuned"):
        main.main(tiny(omniglot_root, logs, method, "--meta_train_steps", "1"))
    figures = []
    monkeypatch.setattr(monitor, "_save_figure", lambda fig, out: figures.append(fig))
    monitor.compare([logs / "warp_leap" / "tmp", logs / "warp_leap_tuned" / "tmp"],
                    tmp_path / "w.png")
    left, right = figures[0].axes
    assert [t.get_text() for t in right.get_xticklabels()] == [
        "warp_leap\nrandom\nwarp init,\none meta-lr 0.1\n1 seed",
        "warp_leap_tuned\nidentity\nwarp init,\nwarp lr 1.0\n1 seed"]
    legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert "warp_leap [random warp init, one meta-lr 0.1] (1 seed)" in legend
    assert "warp_leap_tuned [identity warp init, warp lr 1.0] (1 seed)" in legend
    matplotlib.pyplot.close("all")


def _cli(argv, capsys):
    """``python monitor.py ARGV`` in-process: exit code and stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(monitor.main, argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def test_bad_input_is_one_error_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    png = str(tmp_path / "cmp.png")
    cases = {
        "no results_*.log files": ["compare", str(empty), "--out", png],  # not a run folder
        "run folder ": ["compare", str(runs[0]), str(runs[0]).replace("reptile", "reptle"),
                        "--out", png],  # a mistyped path was silently dropped
        "does not exist; create it first": ["compare", str(runs[0]), "--out",
                                            str(tmp_path / "nowhere" / "cmp.png")],
        "is a folder": ["compare", str(runs[0]), "--out", str(tmp_path)],
        "unknown image format '.txt'": ["compare", str(runs[0]), "--out", png[:-3] + "txt"],
        "no run folders given": ["summary", str(tmp_path / "x.out")],
    }
    (tmp_path / "x.out").write_text("")
    for message, argv in cases.items():
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".cmp*"))


def test_torn_log_lines(runs, tmp_path, capsys):
    run = tmp_path / "reptile" / "s1"
    shutil.copytree(runs[0], run)
    train = run / "results_train_train.log"
    lines = train.read_text().splitlines(keepends=True)
    with open(train, "a") as f:
        f.write(lines[-1][:10])  # a line a running main.py is still writing: left out
    assert monitor.FileHandler(run).train_train_data["step"] == [1, 2]
    train.write_text(lines[0][:10] + "\n" + lines[1])  # torn in the middle: bad input
    code, err = _cli(["summary", str(run)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {train}:1 is not a log line")


def test_command_line_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, monitor.__file__, "compare", str(tmp_path),
                             "--out", str(tmp_path / "cmp.png")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: no results_*.log files")


def test_the_printed_table_shows_no_spread_for_one_run(runs, tmp_path, capsys):
    monitor.main(["compare", *(str(r) for r in runs if r.name == "s1"), "--out",
                  str(tmp_path / "one.png")])
    machine_line, _header, *lines = capsys.readouterr().out.splitlines()
    assert machine_line.startswith("machine: ")
    rows = [line.split() for line in lines]
    assert sorted(row[0] for row in rows) == ["no", "reptile"]
    assert all(row[2] == "-" and row[3] == "1" for row in rows)  # not a std of 0.0000


def test_the_machine_kind_of_the_runs_is_named_and_a_mix_is_said(runs, tmp_path):
    handlers = [monitor.FileHandler(r) for r in runs]
    line = monitor.machine_kind(handlers)
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith("machine: ") and f"({capability})" in line
    assert f"torch {torch.__version__}" in line
    other = monitor.FileHandler(runs[0])
    other.machine = {**other.machine, "cpu_capability": "AVX512"}
    assert monitor.machine_kind([*handlers, other]).startswith(
        "machines: 2 kinds (machine.json): these numbers do not all come from one machine kind")
    old = monitor.FileHandler(runs[0])
    old.machine = None  # a run older than machine.json
    assert monitor.machine_kind([old]) == ("machine: not recorded (runs older than "
                                           "machine.json)")
    assert monitor.machine_kind([*handlers, old]).endswith("; some runs unrecorded")
