"""Shared problems for the leap tests: a hand-computable quadratic and small float64 tasks."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

import metazoo

# Curvature of the hand-computable quadratic L(a, b) = 0.5 [a b] H [a b]^T + c . [a b].
H = ((1.0, 0.5), (0.5, 3.0))
C = (0.2, -0.1)
INIT = (1.0, -1.0)


class Quadratic(nn.Module):
    """Two scalar parameters; ``forward(x)`` is the quadratic with linear term ``x[0]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(INIT[0], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(INIT[1], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a, self.b
        return (0.5 * (H[0][0] * a * a + 2 * H[0][1] * a * b + H[1][1] * b * b)
                + x[0, 0] * a + x[0, 1] * b)


def hand_meta_grad(lr: float, steps: int, norm: bool, loss: bool, stabilizer: bool, *,
                   lazy: bool = False) -> tuple[list[float], list[float]]:
    """The Leap meta-gradient of ``steps`` SGD steps on the quadratic, in plain Python floats.

    Returns the meta-gradient and the loss differences of the segments. ``lazy`` estimates the
    final loss to first order, as ``Leap`` does when no ``finish`` is given.
    """
    def f(t: list[float]) -> float:
        return (0.5 * (H[0][0] * t[0] ** 2 + 2 * H[0][1] * t[0] * t[1] + H[1][1] * t[1] ** 2)
                + C[0] * t[0] + C[1] * t[1])

    def grad(t: list[float]) -> list[float]:
        return [H[0][0] * t[0] + H[0][1] * t[1] + C[0], H[1][0] * t[0] + H[1][1] * t[1] + C[1]]

    points = [list(INIT)]
    for _ in range(steps):
        g = grad(points[-1])
        points.append([points[-1][0] - lr * g[0], points[-1][1] - lr * g[1]])
    total, diffs = [0.0, 0.0], []
    for i in range(steps):
        start, end, g = points[i], points[i + 1], grad(points[i])
        delta = [start[0] - end[0], start[1] - end[1]]
        end_loss = f(end)
        if lazy and i == steps - 1:
            end_loss = f(start) + g[0] * (end[0] - start[0]) + g[1] * (end[1] - start[1])
        d = end_loss - f(start)
        diffs.append(d)
        if stabilizer:
            d = -abs(d)
        if not loss:
            d = 0.0
        inc = [delta[0] - d * g[0], delta[1] - d * g[1]]
        if norm:
            length = math.sqrt(d * d + delta[0] ** 2 + delta[1] ** 2)
            inc = [inc[0] / length, inc[1] / length]
        total = [total[0] + inc[0], total[1] + inc[1]]
    return total, diffs


def quadratic_batch() -> tuple[Tensor, Tensor]:
    return torch.tensor([C], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


def quadratic_criterion(output: Tensor, target: Tensor) -> Tensor:
    return output


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def regression_tasks(num_tasks: int, num_support: int = 3, seed: int = 1) -> list[metazoo.Task]:
    """Random linear-regression tasks, a different support batch for each inner step."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        w = torch.randn(3, 1, generator=g, dtype=torch.float64)

        def batch() -> tuple[Tensor, Tensor]:
            x = torch.randn(5, 3, generator=g, dtype=torch.float64)
            return x, x @ w  # noqa: B023 - each task's batches are built before w changes

        tasks.append(metazoo.Task([batch() for _ in range(num_support)], batch()))
    return tasks


def reference_loop(leap_obj, model: nn.Module, tasks: list[metazoo.Task], *, steps: int,
                   lr: float, momentum: float = 0.0, finish: bool = True,
                   criterion: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss
                   ) -> Tensor | None:
    """The reference implementation's documented usage; returns the last inner loss."""
    loss = None
    for task in tasks:
        leap_obj.init_task()
        leap_obj.to(model)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        for k in range(steps):
            x, y = task.support[k % len(task.support)]
            loss = criterion(model(x), y)
            loss.backward()
            leap_obj.update(loss, model)
            opt.step()
            opt.zero_grad()
        if finish:
            x, y = task.support[steps % len(task.support)]
            with torch.no_grad():
                leap_obj.finish(criterion(model(x), y), model)
    leap_obj.normalize()
    return loss


def live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): some gc-tracked objects warn when asked for __class__.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The problems above, for test modules (which cannot import conftest under importlib)."""
    return SimpleNamespace(
        Quadratic=Quadratic, hand_meta_grad=hand_meta_grad, quadratic_batch=quadratic_batch,
        quadratic_criterion=quadratic_criterion, mlp=mlp, regression_tasks=regression_tasks,
        reference_loop=reference_loop, live_tensors=live_tensors)
