"""Shared fixtures of the maml tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Runs each test on one intra-op thread and restores the setting afterwards.

    The tests use tiny float64 models; on a shared 2-core machine, OpenMP threads contending with
    other processes made BatchNorm-heavy tests about 6x slower (66 s against 11 s measured for
    test_maml.py at load average 8).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
