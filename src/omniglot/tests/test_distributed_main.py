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
