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
from metazoo.testing import (
    assert_same_meta_step,
    image_tasks,
    meta_step_snapshot,
    small_conv_net,
    strict_meta_step,
    tasks_to,
)


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
    model = small_conv_net()
    result, evaluation = strict_meta_step(lambda: LEARNERS[name](model), image_tasks())
    assert result.num_tasks == 2 and evaluation.num_tasks == 2


def test_reference_api_never_mixes_host_and_device_tensors():
    model, tasks = small_conv_net(), image_tasks()
    with metazoo.strict_devices():
        grads = _reference_api_step(model, tasks)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_float64_meta_step_on_cuda_equals_cpu(name):
    snapshots = [meta_step_snapshot(LEARNERS[name](small_conv_net().to(device)),
                                    tasks_to(image_tasks(), device)) for device in ("cpu", "cuda")]
    assert_same_meta_step(snapshots[1], snapshots[0], tol=1e-10)


@pytest.mark.cuda
def test_float64_reference_api_on_cuda_equals_cpu():
    cpu = _reference_api_step(small_conv_net(), image_tasks())
    cuda = _reference_api_step(small_conv_net().to("cuda"), tasks_to(image_tasks(), "cuda"))
    assert cpu.keys() == cuda.keys()
    for n in cpu:
        torch.testing.assert_close(cuda[n], cpu[n], rtol=1e-10, atol=1e-10, msg=n)
