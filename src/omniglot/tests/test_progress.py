"""progress.py: ETAs past a day, main.py's estimate and long-run warning, and the progress line
run_multi.py reads back."""

import pytest

import main
import progress


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "00:00:00"), (59.4, "00:00:59"), (3599, "00:59:59"), (86399, "23:59:59"),
    (86400, "1 d 0 h"), (131274, "1 d 12 h"),  # the 131.41 s/step x 999 steps
    (131.41 * 1000, "1 d 13 h"), (10 * 86400 + 23.6 * 3600, "11 d 0 h"),
    (float("nan"), "?"), (float("inf"), "?"), (-1, "?")])
def test_durations_past_a_day_say_days_and_hours(seconds, text):
    assert progress.format_duration(seconds) == text


def test_estimate_warns_about_long_cpu_runs_only():
    estimate, warning = progress.estimate_lines(131.41, 1000, on_cpu=True)
    assert estimate.startswith("estimated meta-training time: 1 d 13 h (131.41 s/step")
    assert warning.startswith("warning: at this speed meta-training takes about 1 d 13 h")
    assert "README.md, 'Two commands'" in warning and "GPU" in warning
    assert len(progress.estimate_lines(131.41, 1000, on_cpu=False)) == 1
    assert len(progress.estimate_lines(1.0, 1000, on_cpu=True)) == 1  # 17 min: no warning


def test_main_prints_its_estimate_and_progress_lines_run_multi_can_read(
        tiny, omniglot_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LONG_RUN_SECONDS", -1)  # any CPU run counts as long
    main.main(tiny(omniglot_root, tmp_path, "fomaml", "--log_ival", "1"))
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert sum(line.startswith("estimated meta-training time: ") for line in lines) == 1
    steps = [progress.parse_step_line(line) for line in lines if line.startswith("[step ")]
    assert [(p.step, p.steps) for p in steps] == [(1, 2), (2, 2)]
    assert steps[-1].eta == "00:00:00" and steps[-1].seconds_per_step > 0
    assert captured.err.startswith("warning: at this speed meta-training takes about ")
    assert progress.parse_step_line("[val step 2] mean held-out acc 0.3 over 1 tasks") is None
