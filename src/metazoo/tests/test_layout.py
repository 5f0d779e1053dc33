"""Channels-last layout: the core helpers, and Reptile, Leap, iMAML and WarpGrad with
``channels_last=True`` (MAML's option is tested in ``src/maml/tests/test_maml.py``). float64
throughout: the layout changes the order of floating-point sums, nothing else."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from leap import LeapLearner
from maml import MAML, Reptile, iMAML
from warpgrad import DualUpdater, OptimizerParameters, ReplayBuffer, Warp, WarpGrad

DTYPE = torch.float64


def test_to_channels_last_restrides_even_one_channel_and_stays_differentiable():
    x = torch.randn(2, 1, 4, 4, dtype=DTYPE, requires_grad=True)
    # With one channel contiguous(memory_format=...) keeps NCHW strides; the copy must not.
    assert x.contiguous(memory_format=torch.channels_last).stride() == x.stride()
    y = metazoo.to_channels_last(x)
    assert y.stride() == (16, 1, 4, 1) and torch.equal(y, x)
    (y * torch.arange(32.0, dtype=DTYPE).view(2, 1, 4, 4)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(32.0, dtype=DTYPE).view(2, 1, 4, 4))
    for other in (torch.randn(3, 4), torch.arange(16).view(1, 1, 4, 4), torch.randn(1, 2, 2)):
        assert metazoo.to_channels_last(other) is other


def test_task_and_params_to_channels_last_convert_only_images():
    images, labels = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    task = metazoo.Task([(images, labels), (torch.randn(3, 5), labels)], (images, labels))
    converted = metazoo.task_to_channels_last(task)
    (x0, y0), (x1, y1) = converted.support
    assert x0.is_contiguous(memory_format=torch.channels_last) and not x0.is_contiguous()
    assert y0 is labels and x1 is task.support[1][0] and y1 is labels
    assert converted.query[0].is_contiguous(memory_format=torch.channels_last)
    params = {"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.randn(4)}
    out = metazoo.params_to_channels_last(params)
    assert out["conv.weight"].stride() == (9, 1, 3, 1) and out["conv.bias"] is params["conv.bias"]


def test_accumulate_grad_keeps_the_parameters_layout_and_adds():
    param = torch.randn(4, 3, 2, 2, dtype=DTYPE, requires_grad=True)
    grad = metazoo.to_channels_last(torch.randn(4, 3, 2, 2, dtype=DTYPE, requires_grad=True))
    metazoo.accumulate_grad(param, grad * 2)
    assert param.grad.stride() == param.stride() and not param.grad.requires_grad
    torch.testing.assert_close(param.grad, grad.detach() * 2)
    metazoo.accumulate_grad(param, grad)
    assert param.grad.stride() == param.stride()
    torch.testing.assert_close(param.grad, grad.detach() * 3)


@pytest.mark.parametrize("kind", ["reptile", "leap", "imaml", "warpgrad"])
def test_channels_last_must_be_a_bool(kind):
    with pytest.raises(ValueError, match="channels_last must be a bool, got 1"):
        _build(kind, 1, "batch", 1)  # type: ignore[arg-type]


def _conv_net(in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 3)).to(DTYPE)


class _WarpedConvNet(nn.Module):
    """``_conv_net`` with a 3x3 warp convolution after each block (indices 0 and 4 stay the
    adapted convolutions, for the layout hooks)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.net = _conv_net(in_channels)
        self.warps = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)).to(DTYPE)

    def __getitem__(self, index: int) -> nn.Module:
        return self.net[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.warps[0](self.net[:4](x))
        x = self.warps[1](self.net[4:8](x))
        return self.net[8:](x)


def _tasks(in_channels: int) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(5)

    def batch(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(3).repeat_interleave(per_class)
        return torch.randn(len(y), in_channels, 8, 8, generator=g, dtype=DTYPE), y

    return [metazoo.Task([batch(2), batch(1)], batch(3)) for _ in range(2)]


def _build(kind: str, in_channels: int, bn_mode: str, channels_last: bool
           ) -> metazoo.MetaLearner:
    if kind == "maml":
        return MAML(model=_conv_net(in_channels), criterion=F.cross_entropy,
                    inner_optimizer=metazoo.SGD(0.3, momentum=0.5), inner_steps=3,
                    bn_mode=bn_mode, channels_last=channels_last)
    if kind == "warpgrad":
        model = _WarpedConvNet(in_channels)
        adapt = [model.net[0], model.net[2], model.net[4], model.net[6], model.net[9]]
        warp = Warp(model, adapt, list(model.warps), DualUpdater(F.cross_entropy),
                    ReplayBuffer(), optimizer_parameters=OptimizerParameters(
                        trainable=True, default_lr=0.3, default_momentum=0.5))
        return WarpGrad(warp, inner_steps=3, bn_mode=bn_mode, channels_last=channels_last)
    common = {"model": _conv_net(in_channels), "criterion": F.cross_entropy,
              "inner_optimizer": metazoo.SGD(0.3, momentum=0.5), "inner_steps": 3,
              "bn_mode": bn_mode, "channels_last": channels_last}
    if kind == "imaml":
        return iMAML(**common, lam=2.0, cg_steps=3)
    return Reptile(**common) if kind == "reptile" else LeapLearner(**common)


@pytest.mark.parametrize("kind", ["reptile", "leap", "imaml", "warpgrad"])
@pytest.mark.parametrize("bn_mode", ["batch", "running"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_channels_last_gives_the_default_layouts_results(kind, bn_mode, in_channels):
    tasks = _tasks(in_channels)
    runs = []
    for channels_last in (False, True):
        learner = _build(kind, in_channels, bn_mode, channels_last)
        result = learner.meta_backward(tasks)
        grads = {n: p.grad.clone() for n, p in learner.named_meta_parameters()}
        adapted = learner.adapt(tasks[0], steps=4)
        evaluation = learner.evaluate(tasks)
        runs.append((result, grads, adapted, evaluation))
        assert all(p.is_contiguous() for p in learner.model.parameters())  # model untouched
        # backward's layout contract: .grad has the parameter's strides
        assert all(p.grad.stride() == p.stride() for _, p in learner.named_meta_parameters())
    (r0, g0, a0, e0), (r1, g1, a1, e1) = runs
    assert max(g.abs().max().item() for g in g0.values()) > 1e-3  # a gradient that moves
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-10, rtol=1e-10, msg=name)
    assert math.isclose(r1.meta_loss, r0.meta_loss, rel_tol=1e-12)
    assert r1.inner_losses == pytest.approx(r0.inner_losses, rel=1e-12)
    for name in a0.params:
        torch.testing.assert_close(a1.params[name], a0.params[name], atol=1e-12, rtol=1e-12)
    for name in a0.buffers:
        torch.testing.assert_close(a1.buffers[name], a0.buffers[name], atol=1e-12, rtol=1e-12)
    assert e1.loss == pytest.approx(e0.loss, rel=1e-12)
    assert [acc for _, acc in e1.per_task] == [acc for _, acc in e0.per_task]


# Forward passes through both convolutions in one meta_backward + evaluate of one task:
# (3 inner steps + query) twice, Leap's end-of-trajectory loss once more, iMAML's support
# loss at the solution (one pass per support batch) for the Hessian; WarpGrad's replay adds a
# number that depends on its sampling (at least the adaptation's).
FORWARDS = {"maml": 2 * (3 + 1 + 3 + 1), "reptile": 2 * (3 + 1 + 3 + 1),
            "leap": 2 * (3 + 1 + 1 + 3 + 1), "imaml": 2 * (3 + 1 + 2 + 3 + 1),
            "warpgrad": None}


@pytest.mark.parametrize("kind", list(FORWARDS))
def test_channels_last_runs_every_convolution_in_channels_last(kind):
    # With one input channel, contiguous(memory_format=channels_last) is a no-op that leaves
    # NCHW strides and the convolution then writes NCHW: the layout must really change.
    task = _tasks(1)[0]
    for channels_last in (False, True):
        learner = _build(kind, 1, "batch", channels_last)
        layouts = []

        def record(module, args, output, layouts=layouts):
            layouts.append((output.is_contiguous(memory_format=torch.channels_last),
                            output.is_contiguous()))

        for block in (0, 4):
            learner.model[block].register_forward_hook(record)
        learner.meta_backward([task])
        learner.evaluate([task])
        if FORWARDS[kind] is None:
            assert len(layouts) > 2 * (3 + 1 + 3 + 1)
        else:
            assert len(layouts) == FORWARDS[kind]
        assert set(layouts) == {(True, False) if channels_last else (False, True)}
        assert all(p.is_contiguous() for p in learner.model.parameters())  # model untouched
