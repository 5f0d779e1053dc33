"""main.py under torchrun: 2 gloo processes on the loopback give the single-process run's logs."""

import socket
import subprocess
import sys
from pathlib import Path

import main
import pytest
from monitor import FileHandler

MAIN = Path(main.__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    done = subprocess.run([*launcher, str(MAIN), *argv, "--suffix", "torchrun"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-12000:]
    single, shared = tmp_path / method / "single", tmp_path / method / "torchrun"
    names = sorted(p.name for p in single.glob("results_*.log"))
    assert names == sorted(p.name for p in shared.glob("results_*.log")) and names
    for name in names:
        # 3 tasks split 2 + 1 over the ranks, averaged over tasks: the same meta-steps as one
        # process, up to float32 summation order.
        assert _numbers(shared / name) == pytest.approx(_numbers(single / name), rel=1e-4,
                                                        abs=1e-5, nan_ok=True), name
    FileHandler(str(shared))  # the logs read back
