"""2-d convolution and max-pooling whose vmap rules fold the mapped tasks into one kernel call.

Under ``torch.func.vmap`` PyTorch's batching rules of ``convolution``, ``convolution_backward``
and ``max_pool2d_with_indices`` move the task dimension to the front or next to the channels
depending on which inputs are batched, so consecutive layers copy their activations back and
forth (``clone`` + ``_unsafe_view``), a per-task bias is added by a separate kernel, and the
double backward of a convolution runs through the generic composite of PyTorch. The vectorized
meta-batches (``metazoo.vectorize``) route ``F.conv2d`` and ``F.max_pool2d`` through the
``autograd.Function`` s here instead (issue 26). Each is in the ``setup_context`` form with a
vmap rule that keeps the layout the previous layer produced:

- ``conv2d`` with per-task weights: the tasks side by side as channel groups (input
  ``[N, T * C, H, W]``, weight ``[T * O, C / g, kh, kw]``, ``groups * T``, the bias inside the
  kernel); with weights shared by all tasks (the first inner step): the tasks folded into the
  batch dimension. Either way the task dimension stays where it was (a view, no copy).
- ``max_pool2d``: the tasks folded into the batch dimension (a view).

Channels-last tasks (``[N, H, W, T, C]`` in memory, how ``metazoo.vectorize.stack_tasks`` lays
out image batches on a CPU) fold into channels as a view but never into the batch dimension, so
there every rule folds them into channels: max-pooling and its backward plane by plane, the
convolution with shared weights through the per-task form with the weights repeated. The
kernels then read and write channels-last tensors throughout.

Values and first derivatives are PyTorch's kernels (``torch.convolution``,
``aten.convolution_backward``, ``aten.max_pool2d_with_indices(_backward)``), so a forward pass is
bit for bit ``F.conv2d``/``F.max_pool2d``. The double backward is closed under differentiation:

- convolution is bilinear, ``y = conv(x, w) + b``. For the backward ``(gx, gw, gb)`` of ``gy``
  and cotangents ``(u, vw, vb)``: ``d/dgy = conv(u, w) + conv(x, vw) + vb``, and
  ``(d/dx, d/dw) = convolution_backward(gy, input=u, weight=vw)``: two convolutions, an add and
  one backward kernel, each of them again a Function of this module;
- max-pooling's backward scatters ``gy`` to the argmax positions, linear in ``gy`` and locally
  constant in ``x``: its derivative is the gather of ``u`` at the same positions, whose own
  derivative is the scatter again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metazoo.batchnorm import _cache_signatures, _fold, _fold_channels

__all__ = ["conv2d", "max_pool2d"]

aten = torch.ops.aten


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


# -- folding the task dimension -----------------------------------------------------------------

def _into_batch(t: Tensor, dim: int | None, size: int, position: int) -> Tensor:
    """A batched ``[.., N, ..]`` activation (task dimension ``dim``) as ``[T * N]`` or ``[N * T]``
    (``position`` 0 or 1: where the task dimension goes among the first two), a view when the
    task dimension already is there."""
    if dim is None:
        t, dim = t.expand(size, *t.shape), 0
    if dim != position:
        t = t.movedim(dim, position)
    return t.flatten(0, 1)


def _out_of_batch(t: Tensor, size: int, position: int | None) -> Tensor:
    if position is None:  # folded into the channels (``_pool_vmap``)
        return t.unflatten(1, (size, -1))
    return t.unflatten(0, (size, -1) if position == 0 else (-1, size))


def _batch_position(*batched: tuple[Tensor, int | None]) -> int:
    """Where to fold the tasks among the first two dimensions: where the memory of the first
    batched tensor already has them (1: samples outer, tasks inner, the layout of tasks folded
    into channels), so that folding it is a view."""
    for t, dim in batched:
        if dim is None:
            continue
        other = 1 if dim == 0 else 0
        if dim < 2 and t.size(other) > 1 and t.stride(other) == t.stride(dim) * t.size(dim):
            return 1
        return 0
    raise AssertionError("a vmap rule runs only with a batched input")


def _mergeable(t: Tensor, dim: int | None, first: int) -> bool:
    """Whether ``t`` with its task dimension moved to ``first`` merges dimensions ``first`` and
    ``first + 1`` as a view."""
    if dim is None:
        return False
    sizes, strides = list(t.shape), list(t.stride())  # no tensor ops: movedim on the lists
    sizes.insert(first, sizes.pop(dim))
    strides.insert(first, strides.pop(dim))
    return (sizes[first] == 1 or sizes[first + 1] == 1
            or strides[first] == strides[first + 1] * sizes[first + 1])


def _into_channels(*batched: tuple[Tensor, int | None]) -> bool:
    """Whether to fold the tasks into the channels instead of the batch dimension: where that
    is a view for every batched tensor and the batch fold is not for one of them. That is the
    case of channels-last task batches (``[N, H, W, T, C]`` in memory, how
    ``metazoo.vectorize.stack_tasks`` lays out image batches on a CPU)."""
    tensors = [(t, dim) for t, dim in batched if dim is not None]
    position = _batch_position(*tensors)
    return (not all(_mergeable(t, dim, position) for t, dim in tensors)
            and all(_mergeable(t, dim, 1) for t, dim in tensors))


def _fold_leading(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """A batched weight ``[O, ...]`` as ``[T * O, ...]`` (shared weights repeated per task)."""
    if t is None:
        return None
    if dim is None:
        return t.repeat(size, *[1] * (t.dim() - 1))
    return t.movedim(dim, 0).flatten(0, 1)


# -- convolution --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _ConvSpec:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def times(self, size: int) -> _ConvSpec:
        return _ConvSpec(self.stride, self.padding, self.dilation, self.groups * size)


def _convolution(x: Tensor, w: Tensor, b: Tensor | None, spec: _ConvSpec) -> Tensor:
    return torch.convolution(x, w, b, spec.stride, spec.padding, spec.dilation, False, (0, 0),
                             spec.groups)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, spec: _ConvSpec) -> Tensor:
        return _convolution(x, w, b, spec)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, w, b, spec = inputs
        ctx.save_for_backward(x, w)
        ctx.spec, ctx.has_bias = spec, b is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> tuple[Tensor | None, ...]:
        if gy is None:
            return None, None, None, None
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0], need[1], need[2] and ctx.has_bias)
        if not any(mask):
            return None, None, None, None
        gx, gw, gb = _ConvBackward.apply(gy, x, w, ctx.spec, mask)
        return gx, gw, gb, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, w: Tensor, b: Tensor | None,
             spec: _ConvSpec) -> tuple[Tensor, int]:
        size = info.batch_size
        if in_dims[1] is None and in_dims[2] is None and not _into_channels((x, in_dims[0])):
            # Weights shared by all tasks: the tasks are more samples of one convolution.
            position = _batch_position((x, in_dims[0]))
            y = _Conv.apply(_into_batch(x, in_dims[0], size, position), w, b, spec)
            return _out_of_batch(y, size, position), position
        # Per-task weights: each task is a group of channels, every task in one kernel.
        y = _Conv.apply(_fold(x, in_dims[0], size), _fold_leading(w, in_dims[1], size),
                        _fold_channels(b, in_dims[2], size), spec.times(size))
        return y.unflatten(1, (size, -1)), 1


class _ConvBackward(torch.autograd.Function):
    """``(gx, gw, gb)`` of a convolution's output gradient ``gy``; ``mask`` selects them."""

    @staticmethod
    def forward(gy: Tensor, x: Tensor, w: Tensor, spec: _ConvSpec,
                mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        gx, gw, gb = aten.convolution_backward(
            gy, x, w, [w.shape[0]] if mask[2] else None, spec.stride, spec.padding,
            spec.dilation, False, [0, 0], spec.groups, list(mask))
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        gy, x, w, spec, mask = inputs
        ctx.save_for_backward(gy, x, w)
        ctx.spec, ctx.mask = spec, mask
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, u: Tensor | None, vw: Tensor | None, vb: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        gy, x, w = ctx.saved_tensors
        spec, mask = ctx.spec, ctx.mask
        u = u if mask[0] else None
        vw = vw if mask[1] else None
        vb = vb if mask[2] else None
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        g_gy = None
        if need_gy:
            # <u, gx> + <vw, gw> + <vb, gb> = <conv(u, w) + conv(x, vw) + vb, gy>
            if u is not None:
                g_gy = _Conv.apply(u, w, vb, spec)
                vb = None
            if vw is not None:
                term = _Conv.apply(x, vw, vb, spec)
                g_gy = term if g_gy is None else g_gy + term
            elif vb is not None:
                g_gy = vb.view(1, -1, 1, 1).expand_as(gy)
        need = (need_x and vw is not None, need_w and u is not None, False)
        g_x = g_w = None
        if any(need):
            # gx is linear in w and gw in x: their adjoints are the backward kernel again, with
            # u as the input and vw as the weight (an unused one only gives its shape).
            g_x, g_w, _ = _ConvBackward.apply(gy, x if u is None else u, w if vw is None else vw,
                                              spec, need)
        return g_gy, g_x, g_w, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], gy: Tensor, x: Tensor, w: Tensor,
             spec: _ConvSpec, mask: tuple[bool, bool, bool]) -> tuple[Any, Any]:
        size = info.batch_size
        if (in_dims[2] is None and not mask[1] and not mask[2]
                and not _into_channels((gy, in_dims[0]), (x, in_dims[1]))):
            # Shared weights and only the input gradient: the tasks are more samples.
            position = _batch_position((gy, in_dims[0]), (x, in_dims[1]))
            gy_ = _into_batch(gy, in_dims[0], size, position)
            x_ = x.new_empty((gy_.shape[0], *x.shape[-3:]))  # only its shape is read
            gx, _, _ = _ConvBackward.apply(gy_, x_, w, spec, mask)
            return (_out_of_batch(gx, size, position), None, None), (position, None, None)
        gx, gw, gb = _ConvBackward.apply(
            _fold(gy, in_dims[0], size), _fold(x, in_dims[1], size),
            _fold_leading(w, in_dims[2], size), spec.times(size), mask)
        return ((None if gx is None else gx.unflatten(1, (size, -1)),
                 None if gw is None else gw.unflatten(0, (size, -1)),
                 None if gb is None else gb.unflatten(0, (size, -1))),
                (1 if mask[0] else None, 0 if mask[1] else None, 0 if mask[2] else None))


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """``F.conv2d`` on ``[N, C, H, W]`` inputs (numeric padding) with the vmap rules and double
    backward of this module (see the module docstring); values and first derivatives are
    ``F.conv2d``'s, bit for bit."""
    spec = _ConvSpec(_pair(stride), _pair(padding), _pair(dilation), int(groups))
    return _Conv.apply(x, weight, bias, spec)


# -- max-pooling --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _PoolSpec:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, spec: _PoolSpec) -> tuple[Tensor, Tensor]:
        return aten.max_pool2d_with_indices(x, spec.kernel_size, spec.stride, spec.padding,
                                            spec.dilation, spec.ceil_mode)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, spec = inputs
        _, indices = output
        ctx.save_for_backward(x, indices)
        ctx.spec = spec
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, _: Any) -> tuple[Tensor | None, None]:
        if gy is None:
            return None, None
        x, indices = ctx.saved_tensors
        return _MaxPoolBackward.apply(gy, x, indices, ctx.spec), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, spec: _PoolSpec
             ) -> tuple[Any, Any]:
        size = info.batch_size
        if _into_channels((x, in_dims[0])):
            # Channels-last tasks: side by side as channels (a view), pooled plane by plane.
            y, indices = _MaxPool.apply(_fold(x, in_dims[0], size), spec)
            return (y.unflatten(1, (size, -1)), indices.unflatten(1, (size, -1))), (1, 1)
        position = _batch_position((x, in_dims[0]))
        y, indices = _MaxPool.apply(_into_batch(x, in_dims[0], size, position), spec)
        return ((_out_of_batch(y, size, position), _out_of_batch(indices, size, position)),
                (position, position))


def _pool_vmap(info: Any, in_dims: tuple[Any, ...], values: Tensor, x: Tensor,
               indices: Tensor) -> tuple[int, int | None, Tensor, Tensor, Tensor]:
    """The common fold of ``_MaxPoolBackward`` and ``_MaxPoolGather``: every task into the batch
    dimension at one position, or (channels-last tasks, position ``None``) into the channels;
    ``x`` only gives its shape (and memory format)."""
    size = info.batch_size
    if _into_channels((values, in_dims[0]), (indices, in_dims[2])):
        values_, indices_ = _fold(values, in_dims[0], size), _fold(indices, in_dims[2], size)
        # In the input's memory format: the backward kernel writes its output in it.
        x_ = torch.empty((values_.shape[0], values_.shape[1], *x.shape[-2:]), dtype=x.dtype,
                         device=x.device, memory_format=torch.channels_last)
        return size, None, values_, x_, indices_
    position = _batch_position((values, in_dims[0]), (indices, in_dims[2]))
    values_ = _into_batch(values, in_dims[0], size, position)
    indices_ = _into_batch(indices, in_dims[2], size, position)
    x_ = x.new_empty((indices_.shape[0], *x.shape[-3:]))
    return size, position, values_, x_, indices_


def _save_pooling(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """``setup_context`` of the adjoint pair ``_MaxPoolBackward`` / ``_MaxPoolGather``: each
    saves the pooled input and the argmax indices, and its backward applies the other."""
    _, x, indices, spec = inputs
    ctx.save_for_backward(x, indices)
    ctx.spec = spec
    ctx.set_materialize_grads(False)


def _pool_pair_vmap(function: Any, info: Any, in_dims: tuple[Any, ...], a: Tensor, x: Tensor,
                    indices: Tensor, spec: _PoolSpec) -> tuple[Tensor, int]:
    """The vmap rule of either function of the pair: the mapped tasks folded as
    ``_pool_vmap`` folds them, one call, unfolded."""
    size, position, a_, x_, indices_ = _pool_vmap(info, in_dims, a, x, indices)
    out = function.apply(a_, x_, indices_, spec)
    return _out_of_batch(out, size, position), 1 if position is None else position


class _MaxPoolBackward(torch.autograd.Function):
    """Scatters ``gy`` to the argmax positions (``max_pool2d_with_indices_backward``)."""

    @staticmethod
    def forward(gy: Tensor, x: Tensor, indices: Tensor, spec: _PoolSpec) -> Tensor:
        return aten.max_pool2d_with_indices_backward(gy, x, spec.kernel_size, spec.stride,
                                                     spec.padding, spec.dilation,
                                                     spec.ceil_mode, indices)

    setup_context = staticmethod(_save_pooling)

    @staticmethod
    def backward(ctx: Any, u: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        if u is None:
            return None, None, None, None
        x, indices = ctx.saved_tensors
        return _MaxPoolGather.apply(u, x, indices, ctx.spec), None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], gy: Tensor, x: Tensor, indices: Tensor,
             spec: _PoolSpec) -> tuple[Tensor, int]:
        return _pool_pair_vmap(_MaxPoolBackward, info, in_dims, gy, x, indices, spec)


class _MaxPoolGather(torch.autograd.Function):
    """``u`` at the argmax positions: the adjoint of ``_MaxPoolBackward`` (and vice versa)."""

    @staticmethod
    def forward(u: Tensor, x: Tensor, indices: Tensor, spec: _PoolSpec) -> Tensor:
        if _is_channels_last(indices):
            # Gathered along the positions of [N, H * W, C] views: the output stays
            # channels-last, as the activations around it.
            gathered = u.permute(0, 2, 3, 1).flatten(1, 2).gather(
                1, indices.permute(0, 2, 3, 1).flatten(1, 2))
            return gathered.view(indices.shape[0], *indices.shape[2:], -1).permute(0, 3, 1, 2)
        return u.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)

    setup_context = staticmethod(_save_pooling)

    @staticmethod
    def backward(ctx: Any, v: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        if v is None:
            return None, None, None, None
        x, indices = ctx.saved_tensors
        return _MaxPoolBackward.apply(v, x, indices, ctx.spec), None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], u: Tensor, x: Tensor, indices: Tensor,
             spec: _PoolSpec) -> tuple[Tensor, int]:
        return _pool_pair_vmap(_MaxPoolGather, info, in_dims, u, x, indices, spec)


_cache_signatures(_Conv, _ConvBackward, _MaxPool, _MaxPoolBackward, _MaxPoolGather)


def max_pool2d(x: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d`` on ``[N, C, H, W]`` inputs with the vmap rules and double backward of
    this module (see the module docstring); values and first derivatives are
    ``F.max_pool2d``'s, bit for bit."""
    kernel = _pair(kernel_size)
    spec = _PoolSpec(kernel, kernel if stride is None or stride == [] else _pair(stride),
                     _pair(padding), _pair(dilation), bool(ceil_mode))
    return _MaxPool.apply(x, spec)[0]
