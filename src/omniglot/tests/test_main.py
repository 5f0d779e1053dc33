"""main.py: a smoke run per --meta_model, flags, resume (in process and a killed subprocess),
the split from the seed alone, and best-on-validation selection."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
import metazoo
import wrapper
from metazoo.cli import UsageError
from metazoo.testing import kill_at_call_command
from monitor import FileHandler
from wrapper import METHODS

MAIN = Path(main.__file__)


@pytest.mark.parametrize("method", METHODS)
def test_smoke_every_method_writes_logs_that_filehandler_reads(tiny, omniglot_root, tmp_path,
                                                               method):
    acc = main.main(tiny(omniglot_root, tmp_path, method))
    run = tmp_path / method / "tmp"
    handler = FileHandler(run)
    assert 0.0 <= acc <= 1.0
    assert handler.final_test_acc() == pytest.approx(acc, abs=1e-6)
    assert len(handler.test_eval_data) == 2 and len(handler.val_eval_data) == 1
    if method == "no":  # no meta-training: only the step-0 validation
        assert handler.train_train_data is None
        assert handler.val_eval_data[0]["step"] == [0]
    else:
        assert handler.train_train_data["step"] == [1, 2]
        assert [len(c) for c in handler.train_train_data["loss_curve"]] == [2, 2]
        assert handler.val_eval_data[0]["step"] == [0, 1, 2]
    assert handler.test_train_data[0]["step"] == [0 if method == "no" else 2]
    assert len(handler.test_train_data[0]["loss_curve"][0]) == 2
    assert json.loads((run / "done.json").read_text())["test_acc"] == pytest.approx(acc)


def test_log_line_format(tiny, omniglot_root, tmp_path):
    main.main(tiny(omniglot_root, tmp_path, "reptile"))
    line = (tmp_path / "reptile/tmp/results_0_test_train.log").read_text().splitlines()[0]
    step, meta_loss, loss, acc, losses, accs = line.split(",")
    assert step == "2" and losses.count(";") == 2 and accs.count(";") == 1
    for value in (meta_loss, loss, acc, *losses.split(";")[:-1]):
        assert len(value.split(".")[1]) == 6  # "{:f}"
    curve = [float(v) for v in losses.split(";")[:-1]]
    assert float(loss) == pytest.approx(sum(curve) / 2, abs=2e-6)
    assert float(meta_loss) == pytest.approx(main.auc(curve), abs=2e-6)


def test_flags_parse_and_zero_intervals_mean_never(tiny, omniglot_root, tmp_path):
    args = main.parse_args(["--outer_kwargs", "lr", "1e-3", "--inner_kwargs", "lr", "0.1",
                            "momentum", "0.9", "--meta_train_steps", "1e1",
                            "--meta_kwargs", "norm", "false", "betas", "0.9:0.99"])
    assert args.outer_kwargs == {"lr": 1e-3} and args.meta_train_steps == 10
    assert args.inner_kwargs == {"lr": 0.1, "momentum": 0.9}
    assert args.meta_kwargs == {"norm": False, "betas": (0.9, 0.99)}
    with pytest.raises(ValueError, match="key value pairs"):
        main.parse_args(["--inner_kwargs", "lr"])
    with pytest.raises(SystemExit):
        main.parse_args(["--meta_train_steps", "1.5"])
    argv = tiny(omniglot_root, tmp_path, "fomaml", "--log_ival", "0", "--write_ival", "0",
                "--test_ival", "0", "--save_ival", "0")
    main.main(argv)
    run = tmp_path / "fomaml/tmp"
    assert not (run / "results_train_train.log").exists()
    assert not list(run.glob("results_*_val_*.log"))
    assert not (run / "checkpoint.pt").exists()
    assert len(list(run.glob("results_*_test_*.log"))) == 4


def test_existing_run_needs_overwrite(tiny, omniglot_root, tmp_path):
    main.main(tiny(omniglot_root, tmp_path, "no"))
    with pytest.raises(UsageError, match="--overwrite"):
        main.main(tiny(omniglot_root, tmp_path, "no"))
    main.main(tiny(omniglot_root, tmp_path, "no", "--overwrite"))


def test_same_seed_same_split_twice_other_seed_differs(tiny, omniglot_root, tmp_path):
    splits = []
    for suffix, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        main.main(tiny(omniglot_root, tmp_path, "no", "--suffix", suffix, "--seed", seed,
                       "--num_pretrain", "2"))
        splits.append((tmp_path / "no" / suffix / "split.json").read_text())
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]
    split = json.loads(splits[0])
    assert len(split["train"]) == 2 and len(split["val"]) == 1 and len(split["test"]) == 2
    assert "Tiny" not in split["characters"]  # 2 characters < 3 classes


def _assert_same_logs(a: Path, b: Path, same_log_files) -> None:
    same_log_files(a, b, 8)
    assert (a / "split.json").read_text() == (b / "split.json").read_text()
    assert json.loads((a / "done.json").read_text()) == json.loads((b / "done.json").read_text())


@pytest.mark.parametrize("method", ["warp_leap", "warp_maml", "maml", "ft"])
def test_stop_and_resume_gives_identical_logs(tiny, omniglot_root, tmp_path, same_log_files,
                                               method):
    full = tiny(omniglot_root, tmp_path, method, "--meta_train_steps", "4", "--test_ival", "2")
    main.main([*full, "--suffix", "straight"])
    # the same run stopped after 1 step (with its final test), then resumed to 4 steps
    main.main([*full, "--suffix", "resumed", "--meta_train_steps", "1"])
    main.main([*full, "--suffix", "resumed", "--resume"])
    _assert_same_logs(tmp_path / method / "straight", tmp_path / method / "resumed",
                      same_log_files)
    # machine.json records the machine kind of the start and of the resume
    records = json.loads((tmp_path / method / "resumed" / "machine.json").read_text())
    assert [r["event"] for r in records] == ["start", "resume at step 1"]
    assert records[1]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def _wait_for_lines(proc: subprocess.Popen, log: Path, lines: int) -> None:
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= lines):
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "the run logged too slowly"
        time.sleep(0.01)


def test_killed_subprocess_resumes_to_identical_logs(tiny, omniglot_root, tmp_path,
                                                     same_log_files):
    """One run killed (SIGKILL) three times: at a random moment of a meta-step, then inside
    atomic writes (a checkpoint, a log rewrite or the manifest; after the temporary file is
    complete and before the rename, or before its flush) at seeded random calls; each time
    resumed with the same command, and at last to the end: the logs of the uninterrupted
    run."""
    argv = [*tiny(omniglot_root, tmp_path, "leap", "--meta_train_steps", "24",
                  "--task_train_steps", "4", "--test_ival", "6", "--threads", "1"),
            "--suffix", "killed", "--resume"]
    rng = random.Random(27)
    run = tmp_path / "leap/killed"
    log = run / "results_train_train.log"
    proc = subprocess.Popen([sys.executable, str(MAIN), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_lines(proc, log, 3)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere in a later meta-step
        assert proc.poll() is None, f"the run finished before it was killed: {proc.stderr}"
    finally:
        proc.kill()
        proc.communicate()
    assert not (run / "done.json").exists()
    assert 3 <= len(log.read_text().splitlines()) < 24
    for function in ("replace", "fsync"):
        killed = subprocess.run(
            kill_at_call_command(MAIN, argv, function=function, call=rng.randint(1, 6)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    main.main(argv)
    main.main([*argv[:-2], "straight"])
    _assert_same_logs(tmp_path / "leap/straight", run, same_log_files)


def test_select_best_and_evaluate_only(tiny, omniglot_root, tmp_path, capsys):
    argv = tiny(omniglot_root, tmp_path, "reptile", "--select", "best",
                "--meta_train_steps", "3", "--log_ival", "1")
    acc = main.main(argv)
    run = tmp_path / "reptile/tmp"
    val = FileHandler(run).agg_val("acc", "eval")[:, 0]
    assert (run / "best.pt").exists()
    out = capsys.readouterr().out
    best_step = int(val.argmax())  # validations at steps 0..3; the first maximum wins
    assert f"testing the best model on validation (step {best_step})" in out
    train_log = (run / "results_train_train.log").read_text()
    again = main.main([*argv, "--evaluate"])
    assert again == pytest.approx(acc)
    assert (run / "results_train_train.log").read_text() == train_log  # untouched
    assert len(FileHandler(run).agg_val("acc", "eval")) == 4
    assert FileHandler(run).test_eval_data[0]["step"] == [best_step]
    with pytest.raises(ValueError, match="--num_val"):
        main.parse_args(["--select", "best", "--num_val", "0"])


def test_progress_line_has_eta(tiny, omniglot_root, tmp_path, capsys):
    main.main(tiny(omniglot_root, tmp_path, "fomaml", "--log_ival", "1"))
    out = capsys.readouterr().out
    assert "[step 2/2]" in out and "eta 00:00:00" in out and "s/step" in out


@pytest.mark.parametrize("method", ["reptile", "ft", "no"])
def test_reference_head_policy_runs(tiny, omniglot_root, tmp_path, method):
    acc = main.main(tiny(omniglot_root, tmp_path, method, "--head_policy", "reference"))
    assert 0.0 <= acc <= 1.0
    assert "head_policy" in (tmp_path / method / "tmp" / "args.log").read_text()
    with pytest.raises(SystemExit):
        main.parse_args(tiny(omniglot_root, tmp_path, method, "--head_policy", "bogus"))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_twice_gives_identical_logs(tiny, omniglot_root, tmp_path, same_log_files,
                                              method):
    for suffix in ("first", "second"):
        main.main(tiny(omniglot_root, tmp_path, method, "--suffix", suffix, "--seed", "5"))
    first, second = tmp_path / method / "first", tmp_path / method / "second"
    same_log_files(first, second, 6)
    assert (first / "done.json").read_text() == (second / "done.json").read_text()


@pytest.mark.parametrize("flags, message", [
    # 6 alphabets have >= 3 characters: 5 + 1 + 2 alphabets cannot be drawn
    (["--num_pretrain", "5"], r"num_train \+ num_val \+ num_test = 8 alphabets, but only 6"),
    # no synthetic alphabet has 6 characters
    (["--classes", "6"], r"only 0 have >= 6 characters.*--classes"),
    # 5 drawings per character: adapting on all 5 leaves nothing held out
    (["--train_images", "5"], r"train_images=5 leaves none held out"),
    (["--task_train_steps", "0"], None),
    (["--meta_model", "ft", "--on_nonfinite", "skip"], r"--on_nonfinite skip is not supported"),
])
def test_impossible_flag_combinations_fail_with_the_fix(tiny, omniglot_root, tmp_path, flags,
                                                        message):
    argv = tiny(omniglot_root, tmp_path, "reptile", *flags)
    if message is None:  # rejected by the parser itself
        with pytest.raises(SystemExit):
            main.parse_args(argv)
        return
    with pytest.raises(ValueError, match=message):
        main.main(argv)


def test_command_line_error_is_one_line_and_exit_code_2(tiny, omniglot_root, tmp_path):
    done = subprocess.run([sys.executable, str(MAIN),
                           *tiny(omniglot_root, tmp_path, "maml", "--classes", "6")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("error: num_train + num_val + num_test") and "Traceback" \
        not in done.stderr


def _finite(state) -> bool:
    """Every floating tensor in a (nested) state dict is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_finite(v) for v in state)
    return True


def _poison_first_training_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first meta-training task gets a NaN image in its support batches (training tasks
    are the ones built with the 2 --task_train_steps; evaluation uses 3 --task_val_steps)."""
    original = main.Experiment.task
    calls = {"train": 0}

    def task(self, name, steps, generator, head=None):
        built = original(self, name, steps, generator, head)
        if steps == 2:
            calls["train"] += 1
            if calls["train"] == 1:
                x, y = built.support[0]
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
                built = main.Task([(x, y), *built.support[1:]], built.query)
        return built

    monkeypatch.setattr(main.Experiment, "task", task)


@pytest.mark.parametrize("method", ["maml", "leap", "warp_leap"])
def test_nonfinite_loss_stops_naming_step_task_and_inner_step(tiny, omniglot_root, tmp_path,
                                                              monkeypatch, method):
    _poison_first_training_task(monkeypatch)
    argv = tiny(omniglot_root, tmp_path, method, "--task_val_steps", "3")
    with pytest.raises(main.NonFiniteError, match="meta-step 1, task 0 of the meta-batch") as err:
        main.main(argv)
    assert err.value.meta_step == 1 and err.value.inner_step == 0
    # the step-0 checkpoint is all that was saved, and it is finite
    state = torch.load(tmp_path / method / "tmp" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 0
    assert _finite(state["learner"])


@pytest.mark.parametrize("method", ["maml", "reptile", "warp_leap"])
def test_nonfinite_task_is_skipped_and_counted(tiny, omniglot_root, tmp_path, monkeypatch,
                                               method):
    _poison_first_training_task(monkeypatch)
    acc = main.main(tiny(omniglot_root, tmp_path, method, "--task_val_steps", "3",
                         "--on_nonfinite", "skip"))
    run = tmp_path / method / "tmp"
    assert (run / "nonfinite.log").read_text() == "1,1,2\n"  # step 1: 1 of 2 tasks skipped
    assert 0.0 <= acc <= 1.0
    for line in (run / "results_train_val.log").read_text().splitlines():
        assert all(v == v for v in map(float, line.split(",")[1:3]))  # finite meta-losses
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert _finite(state["learner"])


@pytest.mark.parametrize("method", ["maml", "reptile", "leap", "warp_leap", "warp_maml"])
def test_channels_last_runs_give_the_default_layouts_logs(tiny, omniglot_root, tmp_path, method):
    """Only the memory format changes: the logged curves agree up to float32 rounding, which
    the tiny BatchNorm net amplifies (MAML's float32 meta-gradients already differ by 3e-5
    relative, float64 ones by 3e-13; the exact comparisons are in test_layout.py and
    test_maml.py) to ~1e-3 over two meta-steps. Not iMAML: after two inner steps its CG system
    I + H / lam is indefinite on this net (Rayleigh quotients down to -1.9 even at lam 10), so
    CG turns any rounding difference, one thread against two included, into loss differences
    of 2-50%; its layouts agree in float64 (test_layout.py)."""
    argv = tiny(omniglot_root, tmp_path, method)
    accs = [main.main([*argv, "--suffix", "nchw"]),
            main.main([*argv, "--suffix", "cl", "--channels_last"])]
    assert accs[1] == pytest.approx(accs[0], abs=1e-6)
    runs = [FileHandler(tmp_path / method / suffix) for suffix in ("nchw", "cl")]
    for data in ("train_train_data", "val_eval_data", "test_eval_data"):
        a, b = (_numbers(getattr(r, data)) for r in runs)
        assert len(a) > 5 and b == pytest.approx(a, rel=5e-3, abs=1e-5, nan_ok=True), data


@pytest.mark.parametrize("method", ["maml", "reptile", "leap", "imaml", "warp_leap", "warp_maml"])
def test_vectorized_runs_give_the_loops_logs(tiny, omniglot_root, tmp_path, method,
                                             monkeypatch):
    """--vectorize on and in chunks of 1: the logged curves agree with the loop's up to float32
    rounding (amplified by the tiny BatchNorm net as in the channels-last test above; the exact
    float64 comparisons are in src/maml/tests/test_vectorize.py). On a CPU the vectorized path
    runs channels-last, whose kernels round differently; iMAML's indefinite CG system turns that
    into loss differences of about 1% (see the channels-last test above), so its vectorized runs
    here keep the NCHW layout of CUDA; its channels-last path is compared in float64 in
    src/maml/tests/test_vectorize.py."""
    if method == "imaml":
        monkeypatch.setattr(metazoo.vectorize, "CHANNELS_LAST_DEVICES", frozenset())
    argv = tiny(omniglot_root, tmp_path, method)
    accs = [main.main([*argv, "--suffix", suffix, *flags])
            for suffix, flags in (("loop", []), ("on", ["--vectorize", "on"]),
                                  ("chunks", ["--vectorize", "1"]))]
    assert accs[1] == pytest.approx(accs[0], abs=1e-6) and accs[2] == pytest.approx(accs[0],
                                                                                    abs=1e-6)
    runs = [FileHandler(tmp_path / method / suffix) for suffix in ("loop", "on", "chunks")]
    for data in ("train_train_data", "val_eval_data", "test_eval_data"):
        a, b, c = (_numbers(getattr(r, data)) for r in runs)
        assert len(a) > 5 and b == pytest.approx(a, rel=5e-3, abs=1e-5, nan_ok=True), data
        assert c == pytest.approx(a, rel=5e-3, abs=1e-5, nan_ok=True), data


def test_vectorize_flag_is_checked(tiny, omniglot_root, tmp_path, capsys):
    with pytest.raises(ValueError, match="--vectorize is supported by --meta_model maml, "
                                         "fomaml, anil, reptile, leap, imaml, warp_leap, "
                                         "warp_maml, not ft; drop "
                                         "the flag"):
        main.main([*tiny(omniglot_root, tmp_path, "ft"), "--vectorize", "on"])
    for method in ("warp_leap", "warp_maml"):
        with pytest.raises(ValueError, match=f"--vectorize with --meta_model {method} needs "
                                             "--bn_mode batch"):
            main.main([*tiny(omniglot_root, tmp_path, method), "--vectorize", "on",
                       "--bn_mode", "running", "--suffix", "bn"])
    with pytest.raises(SystemExit):
        main.make_parser().parse_args(["--vectorize", "sometimes"])
    assert "must be off, on, auto or a positive number" in capsys.readouterr().err
    assert main.make_parser().parse_args(["--vectorize", "auto"]).vectorize == "auto"
    assert main.make_parser().parse_args(["--vectorize", "8"]).vectorize == 8


def _numbers(data):
    """Every number in a FileHandler record (lists and dicts of lists), in order."""
    if isinstance(data, dict):
        return [v for key in sorted(data) for v in _numbers(data[key])]
    if isinstance(data, (list, tuple)):
        return [v for item in data for v in _numbers(item)]
    return [float(data)]


def test_channels_last_reaches_the_learner():
    for method in METHODS:
        config = wrapper.LearnerConfig(meta_model=method, classes=3, num_filters=4,
                                       channels_last=True)
        if method in wrapper.CHANNELS_LAST_METHODS:
            learner = wrapper.build_learner(config)
            parts = [getattr(learner, name) for name in ("inner", "warp", "maml")
                     if hasattr(getattr(learner, name, None), "channels_last")
                     ] or [learner]  # wrappers: what they compose (WarpGrad.warp is a Warp)
            assert all(part.channels_last is True for part in parts), method
        else:
            with pytest.raises(ValueError, match=f"not {method}; drop the flag"):
                wrapper.build_learner(config)


def test_channels_last_is_refused_where_it_does_not_apply(tiny, omniglot_root, tmp_path):
    with pytest.raises(ValueError, match="--channels_last is supported by --meta_model warp_"):
        main.main([*tiny(omniglot_root, tmp_path, "ft"), "--channels_last"])
