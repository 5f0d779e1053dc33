"""Device handling of WarpGrad: memory and disk replay buffers, every warp objective.

On a CPU: meta-steps, adaptation and evaluation under ``metazoo.strict_devices``, which fails
where a GPU run would mix host and device tensors (the reported ``task_fault`` crash). On a GPU
(``pytest -m cuda``): a float64 meta-step on CUDA whose meta-gradient and adapted parameters
equal the CPU ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metazoo.testing import (
    assert_same_meta_step,
    image_tasks,
    meta_step_snapshot,
    strict_meta_step,
    tasks_to,
)
from warpgrad import DualUpdater, OptimizerParameters, ReplayBuffer, Warp, WarpGrad

DTYPE = torch.float64


class WarpedConvNet(nn.Module):
    """conv (adapted) -> 1x1 conv (warp) -> BatchNorm (adapted) -> ReLU -> pool -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.warp = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.warp(self.conv(x)))), 2)
        return self.head(h.flatten(1))


def warped_net(seed: int = 0) -> WarpedConvNet:
    torch.manual_seed(seed)
    return WarpedConvNet().to(DTYPE)


def _learner(model: WarpedConvNet, *, buffer: ReplayBuffer | None = None,
             channels_last: bool = False, vectorize: bool | int | str = False,
             **updater: object) -> WarpGrad:
    updater = {"seed": 3, **updater}
    warp = Warp(model, [model.conv, model.bn, model.head], [model.warp],
                DualUpdater(F.cross_entropy, **updater), buffer=buffer,  # type: ignore[arg-type]
                optimizer_parameters=OptimizerParameters(trainable=True, default_lr=0.2,
                                                         default_momentum=0.5))
    return WarpGrad(warp, inner_steps=3, channels_last=channels_last, vectorize=vectorize,
                    meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


# Each builds a learner from (model, a scratch folder for disk buffers).
LEARNERS: dict[str, Callable[[WarpedConvNet, Path], WarpGrad]] = {
    "memory_buffer": lambda m, _: _learner(m),
    "memory_buffer_on_device": lambda m, _: _learner(m, buffer=ReplayBuffer(device=None)),
    "disk_buffer": lambda m, d: _learner(m, buffer=ReplayBuffer(inmem=False, tmpdir=d)),
    "disk_buffer_reservoir": lambda m, d: _learner(
        m, buffer=ReplayBuffer(inmem=False, tmpdir=d, max_states=2, seed=0)),
    "exact_objective": lambda m, _: _learner(m, warp_objective="exact", bsz=2),
    "approx_objective": lambda m, _: _learner(m, warp_objective="approx"),
    "leap_init_objective": lambda m, _: _learner(m, init_objective="leap"),
    "vectorized_replay": lambda m, _: _learner(m, vectorize=2),
    "channels_last": lambda m, _: _learner(m, channels_last=True),
    # WarpGrad(vectorize=...): on a GPU, "auto" vectorizes, so the test compares the CUDA
    # vectorized meta-step with the CPU loop.
    "vectorized_learner_auto": lambda m, _: _learner(m, vectorize="auto"),
    "vectorized_learner": lambda m, _: _learner(m, vectorize=True, warp_objective="exact"),
    "vectorized_learner_disk_chunks": lambda m, d: _learner(
        m, vectorize=1, buffer=ReplayBuffer(inmem=False, tmpdir=d, max_states=2, seed=0)),
    "vectorized_learner_buffer_on_device": lambda m, _: _learner(
        m, vectorize=True, buffer=ReplayBuffer(device=None), init_objective="leap"),
}


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_step_never_mixes_host_and_device_tensors(name, tmp_path):
    model = warped_net()
    result, evaluation = strict_meta_step(lambda: LEARNERS[name](model, tmp_path), image_tasks())
    assert result.num_tasks == 2 and evaluation.num_tasks == 2


@pytest.mark.cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_float64_meta_step_on_cuda_equals_cpu(name, tmp_path):
    snapshots = []
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        learner = LEARNERS[name](warped_net().to(device), tmp_path / device)
        snapshots.append(meta_step_snapshot(learner, tasks_to(image_tasks(), device)))
    assert_same_meta_step(snapshots[1], snapshots[0], tol=1e-10)
