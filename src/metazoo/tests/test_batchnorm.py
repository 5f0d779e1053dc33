"""metazoo.batchnorm: BatchNorm with batch statistics and a closed-form double backward.

Against ``F.batch_norm(x, None, None, w, b, training=True)`` in float64: forward values,
gradients (``gradcheck``), gradients of gradients (``gradgradcheck`` and against PyTorch's own
double backward), under ``vmap`` and nested ``torch.func.grad``; through ``metazoo.forward`` the
learners' meta-gradients are the same with and without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

import metazoo
from metazoo.batchnorm import batch_norm
from metazoo.testing import small_conv_net

DTYPE = torch.float64


def native(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    return F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)


def composite(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """BatchNorm in elementary operations: autograd differentiates it to any order."""
    dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    centred = x - x.mean(dims, keepdim=True)
    normalised = centred / torch.sqrt((centred ** 2).mean(dims, keepdim=True) + 1e-5)
    return normalised * w.view(shape) + b.view(shape)


def closed(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    return batch_norm(x, w, b, 1e-5)


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=DTYPE) * 2 + 0.5
    w = torch.randn(shape[1], generator=g, dtype=DTYPE)
    b = torch.randn(shape[1], generator=g, dtype=DTYPE)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


SHAPES = [(5, 3, 4, 4), (6, 4), (4, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradient_bit_identical_to_f_batch_norm(shape: tuple[int, ...]) -> None:
    x, w, b = inputs(shape)
    y_native, y_closed = native(x, w, b), closed(x, w, b)
    assert torch.equal(y_native, y_closed)
    cotangent = torch.randn_like(y_native)
    for a, c in zip(torch.autograd.grad(y_native, (x, w, b), cotangent),
                    torch.autograd.grad(y_closed, (x, w, b), cotangent), strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...], affine: bool) -> None:
    x, w, b = inputs(shape)
    if affine:
        assert torch.autograd.gradcheck(closed, (x, w, b))
        assert torch.autograd.gradgradcheck(closed, (x, w, b))
    else:
        assert torch.autograd.gradcheck(lambda x: closed(x, None, None), (x,))
        assert torch.autograd.gradgradcheck(lambda x: closed(x, None, None), (x,))


def second_order(bn, x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    weights = torch.linspace(-1, 1, x.numel(), dtype=DTYPE).view_as(x)
    loss = (bn(x, w, b).tanh() * weights).sum()
    grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    outer = sum((g.sin() * (i + 1)).sum() for i, g in enumerate(grads))
    return torch.autograd.grad(outer, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
def test_double_backward_equals_pytorch(shape: tuple[int, ...]) -> None:
    x, w, b = inputs(shape)
    for a, c in zip(second_order(native, x, w, b), second_order(closed, x, w, b), strict=True):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def inner_step_loss(bn, w: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """One SGD step on (w, b, x) through BatchNorm, then a loss: second order under grad."""
    def loss(w: Tensor, b: Tensor, x: Tensor) -> Tensor:
        return (bn(x, w, b).tanh() * torch.linspace(-1, 1, x.numel(), dtype=DTYPE).view_as(x)
                ).sum()
    gw, gb, gx = grad(loss, argnums=(0, 1, 2))(w, b, x)
    return loss(w - 0.3 * gw, b - 0.3 * gb, x - 0.3 * gx)


def test_under_vmap_and_nested_grad() -> None:
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(4, 5, 3, 4, 4, generator=g, dtype=DTYPE)
    w, b = torch.randn(3, generator=g, dtype=DTYPE), torch.randn(3, generator=g, dtype=DTYPE)
    # Forward under vmap: each task normalised by its own statistics.
    mapped = vmap(closed, in_dims=(0, None, None))(xs, w, b)
    for i in range(len(xs)):
        torch.testing.assert_close(mapped[i], native(xs[i], w, b), rtol=1e-12, atol=1e-12)
    # Second order under vmap(grad(...)) against PyTorch's batch_norm in a per-task loop.
    got = vmap(grad(lambda w, b, x: inner_step_loss(closed, w, b, x), argnums=(0, 1)),
               in_dims=(None, None, 0))(w, b, xs)
    for i, x in enumerate(xs):
        want = grad(lambda w, b, x=x: inner_step_loss(native, w, b, x), argnums=(0, 1))(w, b)
        for a, c in zip(want, (got[0][i], got[1][i]), strict=True):
            torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def third_order(bn, x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    y = bn(x, w, b)
    grads = torch.autograd.grad((y ** 3).sum(), (x, w, b), create_graph=True)
    seconds = torch.autograd.grad(sum((g ** 2).sum() for g in grads), (x, w, b),
                                  create_graph=True)
    return torch.autograd.grad(sum((g.sin()).sum() for g in seconds), (x, w, b))


def test_third_derivative_equals_elementary_batch_norm() -> None:
    # F.batch_norm has no third derivative; BatchNorm in elementary operations has.
    x, w, b = inputs((5, 3, 4, 4))
    for a, c in zip(third_order(composite, x, w, b), third_order(closed, x, w, b),
                    strict=True):
        # Relative to the largest entry: cubes and squares make entries of 1e3 that cancel.
        assert (c - a).abs().max() <= 1e-10 * a.abs().max()


def test_forward_routes_batch_norm_through_the_closed_form(monkeypatch) -> None:
    calls = []
    original = metazoo.functional._closed_form_batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(metazoo.functional, "_closed_form_batch_norm", counting)
    net = small_conv_net()
    params, x = metazoo.params_of(net), torch.randn(6, 1, 8, 8, dtype=DTYPE)
    buffers = metazoo.initial_buffers(net, "batch")
    plain, _ = metazoo.forward(net, params, buffers, x)
    assert not calls  # the default (the per-task loops): F.batch_norm
    with metazoo.closed_form_batch_norm():
        routed, _ = metazoo.forward(net, params, buffers, x)
    assert len(calls) == 1
    assert torch.equal(plain, routed)
