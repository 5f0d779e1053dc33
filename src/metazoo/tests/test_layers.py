"""metazoo.layers: convolution and max-pooling with task-folding vmap rules.

Against ``F.conv2d``/``F.max_pool2d`` in float64: forward values and gradients bit for bit,
``gradcheck``/``gradgradcheck``, third derivatives against autograd's own, second order under
``vmap(grad(...))`` against a per-task loop (per-task and shared weights, with and without
bias), and the vectorized meta-batches run through these rules (they never fall back).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import metazoo
from metazoo import layers
from metazoo.testing import bn_net, small_tasks

DTYPE = torch.float64
CONV_CASES = [  # stride, padding, dilation, groups, input channels, output channels
    (1, 1, 1, 1, 2, 3),
    (2, 0, 1, 1, 2, 4),
    (1, 2, 2, 2, 4, 6),
]
POOL_CASES = [  # kernel, stride, padding, dilation, ceil_mode
    (2, None, 0, 1, False),
    (3, 2, 1, 1, True),
    (2, 1, 0, 2, False),
]


def conv_inputs(channels: int, out: int, groups: int, seed: int = 0, bias: bool = True
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, 7, 7, generator=g, dtype=DTYPE).requires_grad_()
    w = torch.randn(out, channels // groups, 3, 3, generator=g, dtype=DTYPE).requires_grad_()
    b = torch.randn(out, generator=g, dtype=DTYPE).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_and_gradient_bit_identical(case) -> None:
    stride, padding, dilation, groups, channels, out = case
    x, w, b = conv_inputs(channels, out, groups)
    want = F.conv2d(x, w, b, stride, padding, dilation, groups)
    got = layers.conv2d(x, w, b, stride, padding, dilation, groups)
    assert torch.equal(got, want)
    cotangent = torch.randn_like(want)
    for a, c in zip(torch.autograd.grad(want, (x, w, b), cotangent),
                    torch.autograd.grad(got, (x, w, b), cotangent), strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_gradcheck_gradgradcheck_and_third_order(case, bias: bool) -> None:
    stride, padding, dilation, groups, channels, out = case
    x, w, b = conv_inputs(channels, out, groups, bias=bias)
    inputs = (x, w) if b is None else (x, w, b)

    def ours(*t: Tensor) -> Tensor:
        return layers.conv2d(*t, stride=stride, padding=padding, dilation=dilation,
                             groups=groups).tanh()

    def native(*t: Tensor) -> Tensor:
        return F.conv2d(*t, stride=stride, padding=padding, dilation=dilation,
                        groups=groups).tanh()

    assert torch.autograd.gradcheck(ours, inputs)
    assert torch.autograd.gradgradcheck(ours, inputs)
    for a, c in zip(third_order(native, inputs), third_order(ours, inputs), strict=True):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-10)


def third_order(f, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    y = f(*inputs)
    firsts = torch.autograd.grad((y ** 3).sum(), inputs, create_graph=True)
    seconds = torch.autograd.grad(sum((g ** 2).sum() for g in firsts), inputs,
                                  create_graph=True)
    return torch.autograd.grad(sum(g.sin().sum() for g in seconds), inputs)


@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_forward_gradients_and_higher_orders(case) -> None:
    kernel, stride, padding, dilation, ceil_mode = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=DTYPE).requires_grad_()

    def ours(x: Tensor) -> Tensor:
        return layers.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)

    def native(x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode)

    assert torch.equal(ours(x), native(x))
    cotangent = torch.randn_like(native(x))
    assert torch.equal(torch.autograd.grad(ours(x), x, cotangent)[0],
                       torch.autograd.grad(native(x), x, cotangent)[0])
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))
    for a, c in zip(third_order(lambda x: native(x) * x.sum(), (x,)),
                    third_order(lambda x: ours(x) * x.sum(), (x,)), strict=True):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-10)


def net_loss(conv, pool, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    groups = x.shape[-3] // w.shape[-3]
    hidden = pool(conv(x, w, b, 1, 1, 1, groups).relu(), 2)
    return (hidden.tanh() * torch.linspace(-1, 1, hidden.numel(), dtype=DTYPE)
            .view_as(hidden)).sum()


def inner_step_loss(conv, pool, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    """One SGD step on the weights (and the input), then the loss: second order under grad."""
    def loss(w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
        return net_loss(conv, pool, w, b, x)
    if b is None:
        gw, gx = grad(lambda w, x: loss(w, None, x), argnums=(0, 1))(w, x)
        return loss(w - 0.3 * gw, None, x - 0.3 * gx) ** 2
    gw, gb, gx = grad(loss, argnums=(0, 1, 2))(w, b, x)
    return loss(w - 0.3 * gw, b - 0.3 * gb, x - 0.3 * gx) ** 2


class PoolInputs(TorchDispatchMode):
    """Records whether each max-pooling kernel read a channels-last (and not also contiguous)
    input."""

    def __init__(self) -> None:
        super().__init__()
        self.channels_last: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.max_pool2d_with_indices.default:
            x = args[0]
            self.channels_last.append(not x.is_contiguous()
                                      and x.is_contiguous(memory_format=torch.channels_last))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_task_weights", [True, False])
@pytest.mark.parametrize("layout", ["tasks_outer", "samples_outer", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_second_order_under_vmap_equals_a_per_task_loop(bias, per_task_weights,
                                                        layout, groups) -> None:
    g = torch.Generator().manual_seed(2)
    tasks = 3
    xs = torch.randn(tasks, 4, 2, 6, 6, generator=g, dtype=DTYPE)
    if layout == "samples_outer":  # how metazoo.vectorize stacks images on CUDA
        xs = xs.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "channels_last":  # [N, H, W, T, C] in memory, how it stacks them on a CPU
        xs = xs.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    w = torch.randn(*([tasks] if per_task_weights else []), 4, 2 // groups, 3, 3, generator=g,
                    dtype=DTYPE)
    b = (torch.randn(*([tasks] if per_task_weights else []), 4, generator=g, dtype=DTYPE)
         if bias else None)
    dims = 0 if per_task_weights else None

    def ours(w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
        return inner_step_loss(layers.conv2d, layers.max_pool2d, w, b, x)

    def native(w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
        return inner_step_loss(F.conv2d, F.max_pool2d, w, b, x)

    argnums = (0, 2) if b is None else (0, 1, 2)
    with PoolInputs() as pool_inputs:
        got = vmap(grad(ours, argnums=argnums), in_dims=(dims, dims if bias else None, 0))(
            w, b, xs)
    # Channels-last tasks stay channels-last (folded into channels, never copied back).
    assert pool_inputs.channels_last
    assert set(pool_inputs.channels_last) == {layout == "channels_last"}
    for i, x in enumerate(xs):
        wi = w[i] if per_task_weights else w
        bi = None if b is None else (b[i] if per_task_weights else b)
        want = grad(native, argnums=argnums)(wi, bi, x)
        for a, c in zip(want, got, strict=True):
            torch.testing.assert_close(c[i], a, rtol=1e-10, atol=1e-12)


def test_forward_routes_conv_and_pool_through_these_rules_in_the_closed_form(monkeypatch
                                                                           ) -> None:
    # Fails if metazoo.forward (the vectorized path's forward) silently keeps F.conv2d.
    calls = []
    for name in ("conv2d", "max_pool2d"):
        original = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _f=original, _n=name, **k: (
            calls.append(_n), _f(*a, **k))[1])
    net = bn_net()
    params, buffers = metazoo.params_of(net), metazoo.initial_buffers(net, "batch")
    x = small_tasks(1)[0].query[0]
    plain, _ = metazoo.forward(net, params, buffers, x)
    assert not calls  # the per-task loops: PyTorch's functions
    with metazoo.closed_form_batch_norm():
        routed, _ = metazoo.forward(net, params, buffers, x)
    assert calls == ["conv2d", "max_pool2d"]
    assert torch.equal(plain, routed)
