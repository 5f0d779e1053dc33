"""main.py's --preset (paper, gpu_short) and --precision (exact, tf32) flags."""

from types import SimpleNamespace

import pytest

import evaluate_oneshot
import main
import metazoo

PAPER = {"meta_batch_size": 20, "task_batch_size": 128, "task_train_steps": 100,
         "task_val_steps": 100, "meta_train_steps": 1000}


def _values(args, names):
    return {n: getattr(args, n) for n in names}


def test_paper_preset_is_the_papers_configuration_and_the_default():
    assert _values(main.parse_args(["--preset", "paper"]), PAPER) == PAPER
    assert _values(main.parse_args([]), PAPER) == PAPER


def test_gpu_short_preset_is_250_meta_steps_of_5_tasks():
    args = main.parse_args(["--preset", "gpu_short"])
    assert _values(args, PAPER) == {**PAPER, "meta_batch_size": 5, "meta_train_steps": 250}


@pytest.mark.parametrize("order", ["flag_first", "preset_first"])
def test_explicit_flags_win_over_the_preset(order):
    flags = ["--meta_batch_size", "7", "--task_train_steps", "3"]
    preset = ["--preset", "gpu_short"]
    args = main.parse_args(flags + preset if order == "flag_first" else preset + flags)
    assert (args.meta_batch_size, args.task_train_steps, args.meta_train_steps) == (7, 3, 250)


def test_precision_defaults_to_exact_and_rejects_other_values():
    assert main.parse_args([]).precision == "exact"
    assert main.parse_args(["--precision", "tf32"]).precision == "tf32"
    with pytest.raises(SystemExit):
        main.parse_args(["--precision", "fp16"])


@pytest.mark.parametrize("precision, value", [("exact", "ieee"), ("tf32", "tf32")])
def test_a_run_happens_under_its_precision_and_restores_the_flags(monkeypatch, tmp_path,
                                                                  precision, value):
    seen = []
    monkeypatch.setattr(main, "_run", lambda *a: seen.append(metazoo.fp32_precision_flags()))
    before = metazoo.fp32_precision_flags()
    main.main(["--precision", precision, "--no_cuda", "--log_dir", str(tmp_path)])
    assert seen == [{"cuda.matmul": value, "cudnn.conv": value, "cudnn.rnn": value}]
    assert metazoo.fp32_precision_flags() == before


def test_oneshot_evaluation_runs_under_the_precision(monkeypatch, tmp_path):
    seen = []

    class Stop(Exception):
        pass

    def score(*args, **kwargs):
        seen.append(metazoo.fp32_precision_flags())
        raise Stop

    monkeypatch.setattr(evaluate_oneshot, "load_runs",
                        lambda *a, **k: [SimpleNamespace(ways=20)])
    monkeypatch.setattr(evaluate_oneshot, "load_model", lambda *a, **k: SimpleNamespace(
        learner=None))
    monkeypatch.setattr(evaluate_oneshot, "evaluate_oneshot", score)
    before = metazoo.fp32_precision_flags()
    with pytest.raises(Stop):
        evaluate_oneshot.main_oneshot(["--precision", "tf32", "--no_cuda", "--runs",
                                       str(tmp_path)])
    assert seen == [dict.fromkeys(before, "tf32")]
    assert metazoo.fp32_precision_flags() == before
