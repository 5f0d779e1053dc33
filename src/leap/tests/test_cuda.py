"""Device handling of ``LeapLearner`` and the reference-style ``Leap`` API.

On a CPU: meta-steps, adaptation and evaluation under ``metazoo.strict_devices``, which fails
where a GPU run would mix host and device tensors. On a GPU (``pytest -m cuda``): a float64
meta-step on CUDA whose meta-gradient and adapted parameters equal the CPU ones.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from leap import Leap, LeapLearner

DTYPE = torch.float64


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(DTYPE)


def image_tasks(count: int = 2, seed: int = 1) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 1, 8, 8, generator=g, dtype=DTYPE), torch.arange(n) % 3

    return [metazoo.Task([batch(6), batch(6)], batch(6)) for _ in range(count)]


def _leap(model: nn.Module, **options: object) -> LeapLearner:
    return LeapLearner(model=model, criterion=F.cross_entropy,
                       inner_optimizer=metazoo.SGD(0.3, momentum=0.5), inner_steps=3,
                       meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                       **options)  # type: ignore[arg-type]


LEARNERS: dict[str, Callable[[nn.Module], LeapLearner]] = {
    "leap": lambda m: _leap(m),
    "leap_no_norm_no_loss": lambda m: _leap(m, norm=False, loss=False),
    "leap_running_bn_clipped": lambda m: _leap(m, bn_mode="running", inner_grad_clip=1.0),
    "leap_channels_last": lambda m: _leap(m, channels_last=True),
}


def _to(tasks: list[metazoo.Task], device: str) -> list[metazoo.Task]:
    def move(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in batch)

    return [metazoo.Task([move(b) for b in t.support], move(t.query)) for t in tasks]


def _run(name: str, device: str) -> tuple[dict[str, torch.Tensor], ...]:
    learner = LEARNERS[name](conv_net().to(device))
    tasks = _to(image_tasks(), device)
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    grads = {n: p.grad.cpu() for n, p in learner.named_meta_parameters() if p.grad is not None}
    adapted = {n: p.detach().cpu() for n, p in learner.adapt(tasks[0]).params.items()}
    learner.meta_step(tasks)
    stepped = {n: p.detach().cpu() for n, p in learner.named_meta_parameters()}
    return grads, adapted, stepped


def _reference_api_step(model: nn.Module, tasks: list[metazoo.Task]) -> dict[str, torch.Tensor]:
    """One meta-gradient through the reference-style API (its module docstring's loop)."""
    leap = Leap(model)
    for task in tasks:
        leap.init_task()
        leap.to(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        for x, y in task.support:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            leap.update(loss, model)
            opt.step()
            opt.zero_grad()
        leap.finish(F.cross_entropy(model(task.query[0]), task.query[1]), model)
    leap.normalize()
    return {n: p.grad.detach().cpu() for n, p in leap.named_parameters()}


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_step_never_mixes_host_and_device_tensors(name):
    model, tasks = conv_net(), image_tasks()
    with metazoo.strict_devices():
        learner = LEARNERS[name](model)
        result = learner.meta_step(tasks)
        learner.adapt(tasks[0])
        evaluation = learner.evaluate(tasks)
    assert result.num_tasks == 2 and evaluation.num_tasks == 2


def test_reference_api_never_mixes_host_and_device_tensors():
    model, tasks = conv_net(), image_tasks()
    with metazoo.strict_devices():
        grads = _reference_api_step(model, tasks)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_float64_meta_step_on_cuda_equals_cpu(name):
    cpu, cuda = _run(name, "cpu"), _run(name, "cuda")
    for on_cpu, on_cuda in zip(cpu, cuda):
        assert on_cpu.keys() == on_cuda.keys() and on_cpu
        for n in on_cpu:
            torch.testing.assert_close(on_cuda[n], on_cpu[n], rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.cuda
def test_float64_reference_api_on_cuda_equals_cpu():
    cpu = _reference_api_step(conv_net(), image_tasks())
    cuda = _reference_api_step(conv_net().to("cuda"), _to(image_tasks(), "cuda"))
    assert cpu.keys() == cuda.keys()
    for n in cpu:
        torch.testing.assert_close(cuda[n], cpu[n], rtol=1e-10, atol=1e-10, msg=n)
