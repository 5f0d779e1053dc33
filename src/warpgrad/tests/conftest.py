"""Small float64 models and tasks shared by the warpgrad tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from metazoo.testing import WarpedMLP

# On a shared, oversubscribed CPU, intra-op threads spin at barriers: a 6x4 batch_norm took
# 95 ms with 2 threads and 10 us with 1 (measured under load). The tests use tiny tensors.
torch.set_num_threads(1)


@pytest.fixture
def make_model() -> Callable[..., WarpedMLP]:
    def make(seed: int = 0, **kwargs: object) -> WarpedMLP:
        torch.manual_seed(seed)
        return WarpedMLP(**kwargs).double()  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_tasks() -> Callable[..., list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    def make(num_tasks: int = 3, batches: int = 4, size: int = 6, seed: int = 1
             ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        g = torch.Generator().manual_seed(seed)
        return [[(torch.randn(size, 3, generator=g, dtype=torch.float64),
                  torch.randint(0, 3, (size,), generator=g)) for _ in range(batches)]
                for _ in range(num_tasks)]

    return make
