"""Helpers for testing a learner on two devices: the same small tasks, the same meta-step.

The algorithm packages' ``tests/test_cuda.py`` use them to check that a float64 meta-step on
CUDA equals the CPU one (``pytest -m cuda``) and that no step mixes host and device tensors
(``strict_devices``, on a CPU). A learner of another package can be checked the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metazoo.devices import strict_devices
from metazoo.learner import EvalResult, MetaLearner, MetaStepResult, Task

__all__ = ["MetaStepSnapshot", "assert_same_meta_step", "image_tasks", "meta_step_snapshot",
           "small_conv_net", "strict_meta_step", "tasks_to"]


def small_conv_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv 3x3 (4 channels) -> BatchNorm -> ReLU -> max-pool 2 -> linear head (3 classes), for
    8x8 one-channel images, so convolutions and BatchNorm run on the device under test."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)


def image_tasks(count: int = 2, seed: int = 1, dtype: torch.dtype = torch.float64
                ) -> list[Task]:
    """``count`` tasks of two 6-image support batches and a 6-image query batch (8x8 images, 3
    classes), drawn on the CPU from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> tuple[Tensor, Tensor]:
        return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.arange(n) % 3

    return [Task([batch(6), batch(6)], batch(6)) for _ in range(count)]


def tasks_to(tasks: list[Task], device: torch.device | str) -> list[Task]:
    """The tasks with every tensor moved to ``device``."""
    def move(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch[0].to(device), batch[1].to(device)

    return [Task([move(b) for b in t.support], move(t.query)) for t in tasks]


@dataclass(frozen=True)
class MetaStepSnapshot:
    """One meta-step seen from outside, every tensor copied to the CPU.

    Attributes:
        grads: the meta-gradient of the meta-batch (``.grad`` after ``meta_backward``).
        adapted: the parameters adapted to the first task.
        stepped: the meta-parameters after one ``meta_step`` on the meta-batch.
    """

    grads: dict[str, Tensor]
    adapted: dict[str, Tensor]
    stepped: dict[str, Tensor]


def meta_step_snapshot(learner: MetaLearner, tasks: list[Task]) -> MetaStepSnapshot:
    """Runs ``meta_backward``, ``adapt`` on the first task and one ``meta_step`` on ``tasks``."""
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    grads = {n: p.grad.cpu() for n, p in learner.named_meta_parameters() if p.grad is not None}
    adapted = {n: p.detach().cpu() for n, p in learner.adapt(tasks[0]).params.items()}
    learner.meta_step(tasks)
    stepped = {n: p.detach().cpu() for n, p in learner.named_meta_parameters()}
    return MetaStepSnapshot(grads, adapted, stepped)


def assert_same_meta_step(actual: MetaStepSnapshot, expected: MetaStepSnapshot,
                          tol: float = 1e-10) -> None:
    """Both snapshots hold the same, non-empty tensors under the same names, equal to ``tol``."""
    for field in ("grads", "adapted", "stepped"):
        got, want = getattr(actual, field), getattr(expected, field)
        assert want, f"{field}: empty snapshot"
        assert got.keys() == want.keys(), f"{field}: {sorted(got)} != {sorted(want)}"
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol,
                                       msg=f"{field} {name}")


def strict_meta_step(build: Callable[[], MetaLearner], tasks: list[Task]
                     ) -> tuple[MetaStepResult, EvalResult]:
    """Builds a learner, then takes a meta-step, an adaptation and an evaluation, all under
    ``strict_devices``: tensors that exist before (the model, ``tasks``) stand for device
    tensors, so a tensor the learner makes on the host, when built or when stepping, fails."""
    with strict_devices():
        learner = build()
        result = learner.meta_step(tasks)
        learner.adapt(tasks[0])
        evaluation = learner.evaluate(tasks)
    return result, evaluation
