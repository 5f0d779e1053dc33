"""Device handling of MAML (and its variants), Reptile and iMAML.

On a CPU: every learner's meta-step, adaptation and evaluation under ``metazoo.strict_devices``,
which fails where a GPU run would mix host and device tensors. On a GPU (``pytest -m cuda``):
a float64 meta-step on CUDA whose meta-gradient and adapted parameters equal the CPU ones.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, Reptile, iMAML

DTYPE = torch.float64


def conv_net(seed: int = 0) -> nn.Module:
    """A small conv-BatchNorm net, so convolutions and BatchNorm run on the device too."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(DTYPE)


def image_tasks(count: int = 2, seed: int = 1) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, 1, 8, 8, generator=g, dtype=DTYPE),
                torch.arange(n) % 3)

    return [metazoo.Task([batch(6), batch(6)], batch(6)) for _ in range(count)]


def _sgd(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr)


LEARNERS: dict[str, Callable[[nn.Module], metazoo.MetaLearner]] = {
    "maml": lambda m: MAML(model=m, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.3),
                           inner_steps=3, meta_optimizer=_sgd(0.1)),
    "maml_checkpoint": lambda m: MAML(model=m, criterion=F.cross_entropy,
                                      inner_optimizer=metazoo.SGD(0.3, momentum=0.5),
                                      inner_steps=4, checkpoint=2, meta_optimizer=_sgd(0.1)),
    "maml_channels_last": lambda m: MAML(model=m, criterion=F.cross_entropy,
                                         inner_optimizer=metazoo.SGD(0.3), inner_steps=2,
                                         channels_last=True, meta_optimizer=_sgd(0.1)),
    "fomaml": lambda m: MAML(model=m, criterion=F.cross_entropy, first_order=True,
                             inner_optimizer=metazoo.Adam(0.05), inner_steps=3,
                             meta_optimizer=_sgd(0.1)),
    "meta_sgd": lambda m: MAML(model=m, criterion=F.cross_entropy,
                               inner_optimizer=metazoo.SGD(0.3), inner_steps=2,
                               learn_inner_lr="per_element", meta_optimizer=_sgd(0.1)),
    "maml++": lambda m: MAML(model=m, criterion=F.cross_entropy,
                             inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                             learn_inner_lr="per_tensor", per_step_inner_lr=True,
                             multi_step_weights=[0.2, 0.3, 0.5], inner_grad_clip=10.0,
                             backward_grad_clip=10.0, meta_optimizer=_sgd(0.1)),
    "anil": lambda m: MAML(model=m, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.3),
                           inner_steps=2, frozen=lambda n: not n.startswith("5."),
                           meta_optimizer=_sgd(0.1)),
    "zero_head": lambda m: MAML(model=m, criterion=F.cross_entropy,
                                inner_optimizer=metazoo.SGD(0.3), inner_steps=2,
                                zero_head=["5.weight", "5.bias"], meta_optimizer=_sgd(0.1)),
    "reptile": lambda m: Reptile(model=m, criterion=F.cross_entropy,
                                 inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                                 meta_optimizer=_sgd(0.5)),
    "reptile_running_bn": lambda m: Reptile(model=m, criterion=F.cross_entropy,
                                            inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                                            bn_mode="running", meta_optimizer=_sgd(0.5)),
    "imaml": lambda m: iMAML(model=m, criterion=F.cross_entropy, lam=1.0, cg_steps=3,
                             inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                             meta_optimizer=_sgd(0.1)),
}


def _to(tasks: list[metazoo.Task], device: torch.device | str) -> list[metazoo.Task]:
    def move(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in batch)

    return [metazoo.Task([move(b) for b in t.support], move(t.query)) for t in tasks]


def _run(name: str, device: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                          dict[str, torch.Tensor]]:
    """Meta-gradient of one meta-batch, the adapted parameters of its first task and the
    meta-parameters after one meta-step, all copied to the CPU."""
    learner = LEARNERS[name](conv_net().to(device))
    tasks = _to(image_tasks(), device)
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    grads = {n: p.grad.cpu() for n, p in learner.named_meta_parameters() if p.grad is not None}
    adapted = {n: p.detach().cpu() for n, p in learner.adapt(tasks[0]).params.items()}
    learner.meta_step(tasks)
    stepped = {n: p.detach().cpu() for n, p in learner.named_meta_parameters()}
    return grads, adapted, stepped


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_step_never_mixes_host_and_device_tensors(name):
    model, tasks = conv_net(), image_tasks()
    with metazoo.strict_devices():
        learner = LEARNERS[name](model)
        result = learner.meta_step(tasks)
        learner.adapt(tasks[0])
        evaluation = learner.evaluate(tasks)
    assert result.num_tasks == 2 and evaluation.num_tasks == 2


@pytest.mark.cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_float64_meta_step_on_cuda_equals_cpu(name):
    cpu = _run(name, "cpu")
    cuda = _run(name, "cuda")
    for on_cpu, on_cuda in zip(cpu, cuda):
        assert on_cpu.keys() == on_cuda.keys() and on_cpu
        for n in on_cpu:
            torch.testing.assert_close(on_cuda[n], on_cpu[n], rtol=1e-10, atol=1e-10, msg=n)
