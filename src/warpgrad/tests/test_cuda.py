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

import metazoo
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


def image_tasks(count: int = 2, seed: int = 1) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 1, 8, 8, generator=g, dtype=DTYPE), torch.arange(n) % 3

    return [metazoo.Task([batch(6), batch(6)], batch(6)) for _ in range(count)]


def _learner(model: WarpedConvNet, *, buffer: ReplayBuffer | None = None,
             channels_last: bool = False, **updater: object) -> WarpGrad:
    updater = {"seed": 3, **updater}
    warp = Warp(model, [model.conv, model.bn, model.head], [model.warp],
                DualUpdater(F.cross_entropy, **updater), buffer=buffer,  # type: ignore[arg-type]
                optimizer_parameters=OptimizerParameters(trainable=True, default_lr=0.2,
                                                         default_momentum=0.5))
    return WarpGrad(warp, inner_steps=3, channels_last=channels_last,
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
}


def _to(tasks: list[metazoo.Task], device: str) -> list[metazoo.Task]:
    def move(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in batch)

    return [metazoo.Task([move(b) for b in t.support], move(t.query)) for t in tasks]


def _run(name: str, device: str, folder: Path) -> tuple[dict[str, torch.Tensor], ...]:
    """Meta-gradient of one meta-batch, the adapted parameters of its first task and the
    meta-parameters after one meta-step, all on the CPU."""
    learner = LEARNERS[name](warped_net().to(device), folder)
    tasks = _to(image_tasks(), device)
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    grads = {n: p.grad.cpu() for n, p in learner.named_meta_parameters() if p.grad is not None}
    adapted = {n: p.detach().cpu() for n, p in learner.adapt(tasks[0]).params.items()}
    learner.meta_step(tasks)
    stepped = {n: p.detach().cpu() for n, p in learner.named_meta_parameters()}
    return grads, adapted, stepped


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_step_never_mixes_host_and_device_tensors(name, tmp_path):
    model, tasks = warped_net(), image_tasks()
    with metazoo.strict_devices():
        learner = LEARNERS[name](model, tmp_path)
        result = learner.meta_step(tasks)
        learner.adapt(tasks[0])
        evaluation = learner.evaluate(tasks)
    assert result.num_tasks == 2 and evaluation.num_tasks == 2


@pytest.mark.cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_float64_meta_step_on_cuda_equals_cpu(name, tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cuda").mkdir()
    cpu = _run(name, "cpu", tmp_path / "cpu")
    cuda = _run(name, "cuda", tmp_path / "cuda")
    for on_cpu, on_cuda in zip(cpu, cuda):
        assert on_cpu.keys() == on_cuda.keys() and on_cpu
        for n in on_cpu:
            torch.testing.assert_close(on_cuda[n], on_cpu[n], rtol=1e-10, atol=1e-10, msg=n)
