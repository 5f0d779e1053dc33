"""Reptile: the meta-gradient is init - adapted (after the last inner step), float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import Reptile

DTYPE = torch.float64


def model_and_tasks(bn: bool = False) -> tuple[nn.Module, list[metazoo.Task]]:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6), *([nn.BatchNorm1d(6)] if bn else []), nn.Tanh(), nn.Linear(6, 1)]
    model = nn.Sequential(*layers).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    tasks = []
    for _ in range(3):
        w = torch.randn(3, 1, generator=g, dtype=DTYPE)
        batches = []
        for _ in range(3):
            x = torch.randn(5, 3, generator=g, dtype=DTYPE)
            batches.append((x, torch.sin(x @ w)))
        tasks.append(metazoo.Task(batches[:2], batches[2]))
    return model, tasks


def adapted_by_torch_optim(model: nn.Module, task: metazoo.Task, steps: int
                           ) -> dict[str, torch.Tensor]:
    """The reference: ``steps`` steps of torch.optim.Adam on a copy, support batch k % 2."""
    copy_ = copy.deepcopy(model)
    optimizer = torch.optim.Adam(copy_.parameters(), lr=0.05)
    for k in range(steps):
        x, y = task.support[k % len(task.support)]
        optimizer.zero_grad()
        F.mse_loss(copy_(x), y).backward()
        optimizer.step()
    return {n: p.detach() for n, p in copy_.named_parameters()}


def test_meta_gradient_is_init_minus_adapted_after_the_last_step():
    model, tasks = model_and_tasks()
    learner = Reptile(model=model, criterion=F.mse_loss, inner_optimizer=metazoo.Adam(0.05),
                      inner_steps=5)
    learner.meta_optimizer.zero_grad()
    learner.meta_backward(tasks)
    adapted = [adapted_by_torch_optim(model, t, 5) for t in tasks]
    before_last = [adapted_by_torch_optim(model, t, 4) for t in tasks]
    for name, p in model.named_parameters():
        expected = sum(p.detach() - a[name] for a in adapted) / len(tasks)
        torch.testing.assert_close(p.grad, expected, atol=1e-13, rtol=1e-10)
        # the point before the last step would give a different gradient
        assert (p.grad - sum(p.detach() - a[name] for a in before_last) / 3).abs().max() > 1e-6


def test_meta_step_with_sgd_is_classic_reptile():
    model, tasks = model_and_tasks()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = Reptile(model=model, criterion=F.mse_loss, inner_optimizer=metazoo.Adam(0.05),
                      inner_steps=3, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.25))
    adapted = [learner.adapt(t, steps=3).params for t in tasks]
    result = learner.meta_step(tasks)
    for name, p in model.named_parameters():
        mean_adapted = sum(a[name] for a in adapted) / 3
        torch.testing.assert_close(p.detach(), init[name] + 0.25 * (mean_adapted - init[name]),
                                   atol=1e-14, rtol=1e-12)
    assert result.num_tasks == 3 and len(result.inner_losses) == 3


def test_gradient_accumulates_like_backward():
    model, tasks = model_and_tasks()
    learner = Reptile(model=model, criterion=F.mse_loss, inner_steps=2)
    learner.meta_optimizer.zero_grad()
    learner.meta_backward(tasks[:1])
    first = [p.grad.clone() for p in model.parameters()]
    learner.meta_backward(tasks[:1])
    for p, g in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_running_batchnorm_and_evaluation():
    model, tasks = model_and_tasks(bn=True)
    learner = Reptile(model=model, criterion=F.mse_loss, bn_mode="running", inner_steps=2,
                      eval_inner_steps=4)
    adapted = learner.adapt(tasks[0])
    assert adapted.buffers["1.num_batches_tracked"].item() == 4
    assert model[1].num_batches_tracked.item() == 0
    before = [p.detach().clone() for p in model.parameters()]
    evaluation = learner.evaluate(tasks)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(evaluation.inner_losses) == 4 and evaluation.num_tasks == 3
    assert learner.meta_step(tasks).meta_loss > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"inner_steps": 0}, "inner_steps must be an int >= 1, got 0"),
    ({"eval_inner_steps": 0}, "eval_inner_steps must be an int >= 1, got 0"),
    ({"inner_optimizer": torch.optim.SGD}, "inner_optimizer must be a metazoo optimizer"),
    ({"bn_mode": "stats"}, "bn_mode must be one of"),
    ({"inner_grad_clip": 0}, "inner_grad_clip must be None or a positive number, got 0"),
    ({"meta_optimizer": 0.1}, "meta_optimizer must be a callable"),
])
def test_validation(kwargs, message):
    model, _ = model_and_tasks()
    with pytest.raises(ValueError, match=message):
        Reptile(model=model, criterion=F.mse_loss, **kwargs)
