"""monitor.py: FileHandler reads runs back with the reference's attributes; plots with their
defaults; the compare command writes a PNG."""

import matplotlib
import numpy as np
import pytest

import main
import monitor

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
