"""Test-wide settings for every package's suite."""

import torch

# The suites use tiny tensors, where intra-op threads only add synchronisation: on a loaded
# 2-core machine a 6x4 batch_norm took 95 ms with 2 threads and 10 us with 1.
torch.set_num_threads(1)

import pytest  # noqa: E402

CUDA_SKIP_REASON = ("needs a CUDA GPU (torch.cuda.is_available() is False); run "
                    "`python -m pytest -m cuda` on a machine with one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are collected everywhere; without a GPU they are skipped, with the
    reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
