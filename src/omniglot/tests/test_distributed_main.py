"""main.py under torchrun: 2 gloo processes give the single-process run's logs (alphabet and
few-shot protocols)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import main
from monitor import FileHandler

MAIN = Path(main.__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str]) -> None:
    """main.py under torchrun: 2 gloo processes on the loopback, bounded in time."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    done = subprocess.run([*launcher, str(MAIN), *argv], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-12000:]


def _numbers(path: Path) -> list[float]:
    values = []
    for line in path.read_text().splitlines():
        for field in line.replace(";", ",").split(","):
            if field.strip():
                values.append(float(field))
    return values


@pytest.mark.parametrize("method", ["maml", "leap"])
def test_torchrun_two_processes_match_one(tiny, omniglot_root, tmp_path, method):
    argv = [*tiny(omniglot_root, tmp_path, method, "--meta_batch_size", "3", "--threads", "1")]
    main.main([*argv, "--suffix", "single"])
    _torchrun([*argv, "--suffix", "torchrun"])
    single, shared = tmp_path / method / "single", tmp_path / method / "torchrun"
    names = sorted(p.name for p in single.glob("results_*.log"))
    assert names == sorted(p.name for p in shared.glob("results_*.log")) and names
    for name in names:
        # 3 tasks split 2 + 1 over the ranks, averaged over tasks: the same meta-steps as one
        # process, up to float32 summation order.
        assert _numbers(shared / name) == pytest.approx(_numbers(single / name), rel=1e-4,
                                                        abs=1e-5, nan_ok=True), name
    FileHandler(str(shared))  # the logs read back


def _fields(path: Path) -> list[float | str]:
    """Numbers of a log as floats, words (the BN mode of the few-shot CI log) as they are."""
    out: list[float | str] = []
    for line in path.read_text().splitlines():
        for field in line.replace(";", ",").split(","):
            if field.strip():
                try:
                    out.append(float(field))
                except ValueError:
                    out.append(field)
    return out


def test_torchrun_two_processes_match_one_fewshot(omniglot_root, tmp_path):
    # seed 2: 3 training, 1 validation and 2 test alphabets with >= 3 characters
    argv = ["--protocol", "fewshot", "--root", str(omniglot_root), "--log_dir", str(tmp_path),
            "--meta_model", "maml", "--seed", "2", "--num_pretrain", "3", "--num_val", "1",
            "--num_test", "2", "--ways", "3", "--shots", "1", "--queries", "2", "--rotations",
            "--meta_batch_size", "3", "--meta_train_steps", "2", "--task_train_steps", "1",
            "--task_val_steps", "2", "--test_episodes", "8", "--val_episodes", "4",
            "--test_ival", "1", "--num_filters", "4", "--log_ival", "0", "--no_cuda",
            "--inner_kwargs", "lr", "0.1", "--threads", "1"]
    single_result = main.main([*argv, "--suffix", "single"])
    _torchrun([*argv, "--suffix", "torchrun"])
    single, shared = tmp_path / "maml" / "single", tmp_path / "maml" / "torchrun"
    names = sorted(p.name for p in single.glob("results_*.log"))
    assert names == sorted(p.name for p in shared.glob("results_*.log"))
    assert "results_fewshot_test_ci.log" in names and "results_train_train.log" in names
    for name in names:
        a, b = _fields(shared / name), _fields(single / name)
        assert [x for x in a if isinstance(x, str)] == [x for x in b if isinstance(x, str)]
        assert [x for x in a if not isinstance(x, str)] == pytest.approx(
            [x for x in b if not isinstance(x, str)], rel=1e-4, abs=1e-5, nan_ok=True), name
    record = json.loads((shared / "fewshot_test.json").read_text())
    assert record["accuracy"]["mean"] == pytest.approx(single_result.accuracy.mean, abs=1e-6)
    assert record["episodes"] == 8 and record["bn_eval"] == "transductive"


def _rank_process(argv: list[str], rank: int, port: int, log: Path) -> None:
    """One rank of a 2-process run, forked from the test (its monkeypatches come along)."""
    import os

    out = open(log, "w", buffering=1)  # noqa: SIM115 (lives with the process)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    code = 0
    try:
        main.main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    out.flush()
    os._exit(code)


@pytest.mark.parametrize("method", ["maml", "warp_leap"])
def test_skipped_tasks_under_two_processes_log_what_one_process_logs(
        tiny, omniglot_root, tmp_path, monkeypatch, capsys, method):
    """Issue 28 item 1: rank 0's only task is NaN (--on_nonfinite skip, 2 tasks split 1 + 1):
    both ranks crashed with IndexError in distributed._weighted; with fewer skips the result
    had no skipped_tasks, so no 'skipped' line and no nonfinite.log."""
    import multiprocessing

    original = main.Experiment.task
    built_for_training = []

    def task(self, name, steps, generator, head=None):
        # Training tasks are built with the 2 --task_train_steps (evaluation uses 3); every
        # rank builds the whole meta-batch, so task 0 of meta-step 1 is rank 0's whole share.
        built = original(self, name, steps, generator, head)
        if steps == 2:
            built_for_training.append(name)
            if len(built_for_training) == 1:
                x, y = built.support[0]
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
                built = main.Task([(x, y), *built.support[1:]], built.query)
        return built

    monkeypatch.setattr(main.Experiment, "task", task)
    argv = tiny(omniglot_root, tmp_path, method, "--task_val_steps", "3", "--on_nonfinite",
                "skip", "--log_ival", "1", "--threads", "1")
    main.main([*argv, "--suffix", "single"])
    single_out = capsys.readouterr().out
    built_for_training.clear()  # the forked ranks poison their own first training task
    port, context = _free_port(), multiprocessing.get_context("fork")
    logs = [tmp_path / f"rank{r}.txt" for r in range(2)]
    procs = [context.Process(target=_rank_process, args=([*argv, "--suffix", "two"], r, port,
                                                         logs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    single, shared = tmp_path / method / "single", tmp_path / method / "two"
    assert (shared / "nonfinite.log").read_text() == (single / "nonfinite.log").read_text() \
        == "1,1,2\n"
    line = "[step 1] skipped 1 of 2 tasks with a non-finite loss (--on_nonfinite skip)"
    assert line in single_out and line in logs[0].read_text()
    names = sorted(p.name for p in single.glob("results_*.log"))
    assert names == sorted(p.name for p in shared.glob("results_*.log")) and names
    for name in names:
        assert _numbers(shared / name) == pytest.approx(_numbers(single / name), rel=1e-4,
                                                        abs=1e-5, nan_ok=True), name
