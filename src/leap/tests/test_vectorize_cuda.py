"""Vectorized LeapLearner on a GPU (``pytest -m cuda``; skipped, with the reason, without one).

``LeapLearner(vectorize=True)`` and chunks equal the per-task loop on the GPU in float64
(BatchNorm batch and running statistics, with and without the loss term and the norm), and
``vectorize="auto"`` vectorizes on CUDA: the criterion runs once per chunk on
``torch.func``-wrapped tensors.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from leap import LeapLearner

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

    return [metazoo.Task([batch(1), batch(1)], batch(3)) for _ in range(TASKS)]


def _grads(learner: LeapLearner, tasks: list[metazoo.Task]) -> dict[str, torch.Tensor]:
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    return {n: p.grad.clone() for n, p in learner.named_meta_parameters()}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and got
    scale = max(1.0, max(t.abs().max().item() for t in expected.values()))
    for name in got:
        assert (got[name] - expected[name]).abs().max().item() <= 1e-10 * scale, name


@pytest.mark.parametrize("options", [{"bn_mode": "batch"}, {"bn_mode": "running"},
                                     {"norm": False, "loss": False},
                                     {"inner_optimizer": metazoo.Adam(0.05)}])
def test_vectorized_leap_equals_the_loop_on_the_gpu(options):
    tasks = _tasks()

    def build(vectorize, criterion=F.cross_entropy):
        kwargs = {"inner_optimizer": metazoo.SGD(0.4), **options}
        return LeapLearner(model=_net(), criterion=criterion, inner_steps=3,
                           vectorize=vectorize, **kwargs)

    expected = _grads(build(False), tasks)
    for vectorize in (True, 3):
        _assert_same(_grads(build(vectorize), tasks), expected)
    calls = []

    def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(torch._C._functorch.is_functorch_wrapped_tensor(target))
        return F.cross_entropy(output, target)

    _assert_same(_grads(build("auto", criterion), tasks), expected)
    # 3 inner steps, the last segment's end loss (with the loss term) and the query pass.
    assert calls == [True] * (5 if options.get("loss", True) else 4)
