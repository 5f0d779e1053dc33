"""Vectorized meta-batches on a GPU (``pytest -m cuda``; skipped, with the reason, without one).

- ``MAML(vectorize=True)`` and chunks equal the per-task loop on the GPU in float64 (BatchNorm
  batch and running statistics, Meta-SGD rates), and ``Reptile(vectorize=True)`` too.
- ``vectorize="auto"`` vectorizes on CUDA: the criterion runs once per meta-batch, on
  ``torch.func``-wrapped tensors.
- ``iMAML(vectorize=True)`` and chunks equal the loop on the GPU in float64 (BatchNorm batch and
  running statistics), and ``"auto"`` vectorizes it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, Reptile, iMAML

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
DTYPE = torch.float64
TASKS = 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).to(DEVICE, DTYPE)


def _tasks() -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(1)

    def batch(per_class: int) -> metazoo.Batch:
        y = torch.arange(5).repeat(per_class)
        return (torch.randn(len(y), 1, 8, 8, generator=g, dtype=DTYPE).to(DEVICE),
                y.to(DEVICE))

    return [metazoo.Task([batch(1)], batch(3)) for _ in range(TASKS)]


def _grads(learner, tasks) -> dict[str, torch.Tensor]:
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    return {n: p.grad.clone() for n, p in learner.named_meta_parameters()}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and got
    scale = max(1.0, max(t.abs().max().item() for t in expected.values()))
    for name in got:
        assert (got[name] - expected[name]).abs().max().item() <= 1e-10 * scale, name


@pytest.mark.parametrize("options", [{"bn_mode": "batch"}, {"bn_mode": "running"},
                                     {"learn_inner_lr": "per_element"},
                                     {"first_order": True}])
def test_vectorized_maml_equals_the_loop_on_the_gpu(options):
    tasks = _tasks()

    def build(vectorize):
        return MAML(model=_net(), criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.4),
                    inner_steps=3, vectorize=vectorize, **options)

    expected = _grads(build(False), tasks)
    for vectorize in (True, 3):
        _assert_same(_grads(build(vectorize), tasks), expected)


def test_vectorized_reptile_equals_the_loop_on_the_gpu():
    tasks = _tasks()

    def build(vectorize):
        return Reptile(model=_net(), criterion=F.cross_entropy, inner_optimizer=metazoo.Adam(0.05),
                       inner_steps=3, bn_mode="running", vectorize=vectorize)

    _assert_same(_grads(build(True), tasks), _grads(build(False), tasks))


def test_auto_vectorizes_on_cuda():
    calls = []

    def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(torch._C._functorch.is_functorch_wrapped_tensor(target))
        return F.cross_entropy(output, target)

    learner = MAML(model=_net(), criterion=criterion, inner_optimizer=metazoo.SGD(0.4),
                   inner_steps=3, vectorize="auto")
    learner.meta_backward(_tasks())
    assert calls == [True] * 4  # 3 inner steps + the query pass, all tasks at once


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_vectorized_imaml_equals_the_loop_on_the_gpu(bn_mode):
    tasks = _tasks()

    def build(vectorize, criterion=F.cross_entropy):
        return iMAML(model=_net(), criterion=criterion, inner_optimizer=metazoo.SGD(0.1),
                     inner_steps=3, lam=2.0, cg_steps=3, bn_mode=bn_mode, vectorize=vectorize)

    expected = _grads(build(False), tasks)
    for vectorize in (True, 3):
        _assert_same(_grads(build(vectorize), tasks), expected)
    calls = []

    def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(torch._C._functorch.is_functorch_wrapped_tensor(target))
        return F.cross_entropy(output, target)

    _assert_same(_grads(build("auto", criterion), tasks), expected)
    assert calls == [True] * 5  # 3 inner steps, the query and the Hessian's support loss
