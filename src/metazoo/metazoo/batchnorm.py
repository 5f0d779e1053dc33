"""BatchNorm with batch statistics whose double backward is a closed form of few operations.

Second-order meta-learning differentiates through the inner loop's gradients, so every BatchNorm
layer is differentiated twice per inner step. PyTorch's double backward of ``batch_norm``
(``batchnorm_double_backward``) is a composite of about 114 small operations per layer and step
on the MAML Omniglot net: 61-63% of every operation of a second-order meta-step, and on a GPU
each of them is a kernel launch (issue 26).

``batch_norm`` computes the same function as ``F.batch_norm(x, None, None, weight, bias,
training=True, eps=eps)`` through three ``torch.autograd.Function`` nodes:

- ``_BatchNorm``: forward ``torch.native_batch_norm`` (the kernel ``F.batch_norm`` runs), backward
  ``_BatchNormBackward``;
- ``_BatchNormBackward``: forward ``torch.native_batch_norm_backward`` (again the kernel autograd
  runs), backward ``_BatchNormDoubleBackward``;
- ``_BatchNormDoubleBackward``: forward the closed form below in 22 operations, three of them
  BatchNorm kernels; backward (third order) the vjp of the same closed form written in
  elementwise operations and reductions with the statistics recomputed from ``x``.

Forward values and first derivatives are therefore bit-identical to ``F.batch_norm``; the second
derivative equals PyTorch's to rounding (float64 tests to 1e-10, ``gradgradcheck``), the third
that of BatchNorm in elementary operations. All three Functions are in the ``setup_context``
form with vmap rules that lay the mapped tasks side by side as channels (one kernel for all
tasks), so they run under ``torch.func.vmap``/``grad`` (the vectorized meta-batches).

The closed form. Per channel, over the M elements it normalises (batch and spatial positions),
with ``mu``, ``r = 1 / sqrt(var + eps)``, ``xh = (x - mu) r``, the backward gives
``gb = sum gy``, ``gw = sum gy xh`` and ``gx = w r (gy - gb / M - xh gw / M)``. Given the
cotangents ``u`` of ``gx``, ``vw`` of ``gw`` and ``vb`` of ``gb``, with the per-channel sums
``U = sum u``, ``P = sum u xh`` and ``S = sum u (gy - gb / M - xh gw / M)``:

- d/dgy = w r (u - U / M - xh P / M) + vw xh + vb  (the backward applied to ``u``, plus terms)
- d/dw  = r S
- d/dx  = r (h - mean h - xh mean(h xh)) - r^2 w S xh / M, where
  ``h = (vw - w r P / M) gy - (w r gw / M) u``, whose means need no further reduction:
  ``mean h = ((vw - w r P / M) gb - (w r gw / M) U) / M`` and
  ``mean(h xh) = ((vw - w r P / M) gw - (w r gw / M) P) / M``.

Every output is a per-channel affine combination of ``u``, ``gy`` and ``x`` (``xh`` is affine in
``x``). The BatchNorm kernels compute most of it: the backward kernel applied to ``u`` gives
``w r (u - U / M - xh P / M)`` with ``U`` and ``P``, and the forward kernel with weight ``c1`` and
bias ``c0`` gives ``c1 xh + c0`` (``vw xh + vb`` in d/dgy, the ``xh`` terms of d/dx); what is left
is ``sum u gy``, three multiply-adds over the activations and per-channel operations.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_norm"]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _reduced_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


# The vmap rules put the tasks side by side as channels: [B] x [N, C, ...] -> [N, B * C, ...],
# one BatchNorm kernel normalising every task's channels by their own statistics. PyTorch's
# batching rules of native_batch_norm(_backward) cost 7 and 11 operations under vmap instead.

def _fold(t: Tensor, dim: int | None, size: int) -> Tensor:
    """A batched activation ``[N, C, ...]`` (batch dimension ``dim``) as ``[N, size * C, ...]``."""
    if dim is None:
        t, dim = t.expand(size, *t.shape), 0
    t = t.movedim(dim, 1)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _fold_channels(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """A batched per-channel tensor ``[C]`` as ``[size * C]``."""
    if t is None:
        return None
    if dim is None:
        return t.repeat(size)
    return t.movedim(dim, 0).reshape(-1)


def _unfold(t: Tensor, size: int) -> Tensor:
    """``[N, size * C, ...]`` back to ``[N, size, C, ...]`` (batch dimension 1, a view)."""
    return t.view(t.shape[0], size, -1, *t.shape[2:])


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        if grad_output is None:
            return None, None, None, None
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(grad_output, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, weight: Tensor | None,
             bias: Tensor | None, eps: float) -> tuple[Any, Any]:
        size = info.batch_size
        y, mean, invstd = _BatchNorm.apply(_fold(x, in_dims[0], size),
                                           _fold_channels(weight, in_dims[1], size),
                                           _fold_channels(bias, in_dims[2], size), eps)
        return (_unfold(y, size), mean.view(size, -1), invstd.view(size, -1)), (1, 0, 0)


class _BatchNormBackward(torch.autograd.Function):

    @staticmethod
    def forward(grad_output: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                invstd: Tensor, eps: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
        affine = weight is not None
        return torch.ops.aten.native_batch_norm_backward(
            grad_output, x, weight, None, None, mean, invstd, True, eps, [True, affine, affine])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        grad_output, x, weight, mean, invstd, eps = inputs
        _, gw, gb = output
        ctx.eps = eps
        if weight is None:  # no affine parameters: gw and gb are what the formulas need
            dims = _reduced_dims(x)
            shape = _channel_shape(x)
            xh = (x - mean.view(shape)) * invstd.view(shape)
            gw, gb = (grad_output * xh).sum(dims), grad_output.sum(dims)
        ctx.save_for_backward(grad_output, x, weight, mean, invstd, gw, gb)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, u: Tensor | None, vw: Tensor | None, vb: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        gy, x, weight, mean, r, gw, gb = ctx.saved_tensors
        # Cotangents that did not arrive are zeros (in meta-learning all three arrive).
        u = torch.zeros_like(x) if u is None else u
        vw = torch.zeros_like(r) if vw is None else vw
        vb = torch.zeros_like(r) if vb is None else vb
        w = torch.ones_like(r) if weight is None else weight
        g_gy, g_x, g_w = _BatchNormDoubleBackward.apply(gy, x, w, mean, r, gw, gb, u, vw, vb,
                                                        ctx.eps)
        return g_gy, g_x, g_w if weight is not None else None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], grad_output: Tensor, x: Tensor,
             weight: Tensor | None, mean: Tensor, invstd: Tensor, eps: float
             ) -> tuple[Any, Any]:
        size = info.batch_size
        gx, gw, gb = _BatchNormBackward.apply(
            _fold(grad_output, in_dims[0], size), _fold(x, in_dims[1], size),
            _fold_channels(weight, in_dims[2], size), _fold_channels(mean, in_dims[3], size),
            _fold_channels(invstd, in_dims[4], size), eps)
        if weight is None:
            return (_unfold(gx, size), None, None), (1, None, None)
        return (_unfold(gx, size), gw.view(size, -1), gb.view(size, -1)), (1, 0, 0)


def _double_backward(gy: Tensor, x: Tensor, w: Tensor, mean: Tensor, r: Tensor, gw: Tensor,
                     gb: Tensor, u: Tensor, vw: Tensor, vb: Tensor, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The closed form in few kernels (module docstring): (d/dgy, d/dx, d/dw) of
    ``<u, gx> + <vw, gw> + <vb, gb>``, with the batch statistics ``mean``, ``r`` of ``x``."""
    shape, dims = _channel_shape(x), _reduced_dims(x)
    m = x.numel() // x.shape[1]
    # The backward kernel applied to u: w r (u - U/M - xh P/M), and U = sum u, P = sum u xh
    # as its bias and weight gradients.
    wq, p, u_sum = torch.ops.aten.native_batch_norm_backward(
        u, x, w, None, None, mean, r, True, eps, [True, True, True])
    s = torch.addcmul(torch.addcmul((u * gy).sum(dims), gb, u_sum, value=-1 / m), gw, p,
                      value=-1 / m)  # S = sum u (gy - gb/M - xh gw/M)
    wr = w * r
    a = torch.addcmul(vw, wr, p, value=-1 / m)  # h = a gy - (w r gw / M) u
    # d/dgy = w q + vw xh + vb, the forward kernel making vw xh + vb.
    g_gy = wq + torch.native_batch_norm(x, vw, vb, None, None, True, 0.0, eps)[0]
    # d/dx = r (h - mean h - xh mean(h xh)) - r^2 w S xh / M, regrouped by tensor:
    # a r gy - (r gw / M) w q + kw xh + kb.
    neg_r_m = r * (-1 / m)
    kw = torch.addcmul(wr * s, a, gw) * neg_r_m
    kb = a * neg_r_m * gb
    g_x = torch.native_batch_norm(x, kw, kb, None, None, True, 0.0, eps)[0]
    g_x = torch.addcmul(g_x, gy, (a * r).view(shape))
    g_x = torch.addcmul(g_x, wq, (neg_r_m * gw).view(shape))
    return g_gy, g_x, r * s


def _double_backward_composite(gy: Tensor, x: Tensor, w: Tensor, gw: Tensor, gb: Tensor,
                               u: Tensor, vw: Tensor, vb: Tensor, eps: float
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """The same closed form in elementwise operations and reductions, with the statistics
    recomputed from ``x``: what ``_BatchNormDoubleBackward`` differentiates (third order)."""
    shape, dims = _channel_shape(x), _reduced_dims(x)
    var, mean = torch.var_mean(x, dims, correction=0)
    r = torch.rsqrt(var + eps)
    m = x.numel() // x.shape[1]
    u_mean = u.mean(dims)
    gb_mean, gw_mean = gb / m, gw / m
    p = torch.addcmul((u * x).mean(dims), mean, u_mean, value=-1) * r  # mean u xh
    s = torch.addcmul(torch.addcmul((u * gy).mean(dims), gb_mean, u_mean, value=-1),
                      gw_mean, p, value=-1)  # mean u (gy - gb/M - xh gw/M)
    wr = w * r
    a = torch.addcmul(vw, wr, p, value=-1)  # h = a gy - b u
    b = wr * gw_mean
    neg_mean_h = torch.addcmul(b * u_mean, a, gb_mean, value=-1)
    neg_mean_hxh = torch.addcmul(b * p, a, gw_mean, value=-1)
    # xh = (x - mean) r is affine in x: c xh = (c r) x - (c r mean).
    ar = a * r
    g_gy = torch.addcmul(torch.addcmul(vb, wr, u_mean, value=-1), ar, mean, value=-1)
    g_gy = torch.addcmul(torch.addcmul(g_gy.view(shape), u, wr.view(shape)), x, ar.view(shape))
    rk = torch.addcmul(neg_mean_hxh, wr, s, value=-1) * r
    const_x = torch.addcmul(neg_mean_h, rk, mean, value=-1) * r
    g_x = torch.addcmul(const_x.view(shape), x, (rk * r).view(shape))
    g_x = torch.addcmul(g_x, gy, ar.view(shape))
    g_x = torch.addcmul(g_x, u, (r * b).view(shape), value=-1)
    return g_gy, g_x, r * s * m


class _BatchNormDoubleBackward(torch.autograd.Function):
    """``_double_backward`` as one node: native kernels on all tasks at once under ``vmap``
    (tasks side by side as channels; PyTorch's batching rules of the BatchNorm kernels with
    per-task weights cost about ten operations each). Its own derivative (third order) is the
    vjp of ``_double_backward_composite``."""

    @staticmethod
    def forward(gy: Tensor, x: Tensor, w: Tensor, mean: Tensor, r: Tensor, gw: Tensor,
                gb: Tensor, u: Tensor, vw: Tensor, vb: Tensor, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        return _double_backward(gy, x, w, mean, r, gw, gb, u, vw, vb, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        gy, x, w, _, _, gw, gb, u, vw, vb, eps = inputs
        ctx.save_for_backward(gy, x, w, gw, gb, u, vw, vb)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Tensor | None, ...]:
        primals = ctx.saved_tensors
        eps = ctx.eps

        def composite(gy: Tensor, x: Tensor, w: Tensor, gw: Tensor, gb: Tensor, u: Tensor,
                      vw: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _double_backward_composite(gy, x, w, gw, gb, u, vw, vb, eps)

        pullback = torch.func.vjp(composite, *primals)[1]
        g_gy, g_x, g_w, g_gw, g_gb, g_u, g_vw, g_vb = pullback(cotangents)
        return g_gy, g_x, g_w, None, None, g_gw, g_gb, g_u, g_vw, g_vb, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], gy: Tensor, x: Tensor, w: Tensor,
             mean: Tensor, r: Tensor, gw: Tensor, gb: Tensor, u: Tensor, vw: Tensor, vb: Tensor,
             eps: float) -> tuple[Any, Any]:
        size = info.batch_size
        activations = [_fold(t, d, size) for t, d in zip((gy, x), in_dims[:2], strict=True)]
        channels = [_fold_channels(t, d, size)
                    for t, d in zip((w, mean, r, gw, gb), in_dims[2:7], strict=True)]
        cotangents = [_fold(u, in_dims[7], size),
                      *(_fold_channels(t, d, size) for t, d in zip((vw, vb), in_dims[8:10],
                                                                   strict=True))]
        g_gy, g_x, g_w = _BatchNormDoubleBackward.apply(*activations, *channels, *cotangents,
                                                        eps)
        return (_unfold(g_gy, size), _unfold(g_x, size), g_w.view(size, -1)), (1, 1, 0)


def _cache_signatures(*functions: type[torch.autograd.Function]) -> None:
    """Stores each Function's ``forward`` signature on it. Under ``torch.func`` transforms
    ``Function.apply`` binds the arguments with ``inspect.signature(forward)`` on every call,
    which rebuilds the signature unless the function carries one: measured about a fifth of
    the vectorized meta-step's host time on a small net."""
    for function in functions:
        function.forward.__signature__ = inspect.signature(  # type: ignore[attr-defined]
            function.forward)


_cache_signatures(_BatchNorm, _BatchNormBackward, _BatchNormDoubleBackward)


def batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """BatchNorm with the statistics of ``x``'s own batch, twice differentiable in few ops.

    The same values and first derivatives as ``F.batch_norm(x, None, None, weight, bias,
    training=True, eps=eps)``; the second derivative in closed form (see the module
    docstring). Works under ``torch.func`` transforms and ``torch.compile``.

    Args:
        x: input of shape ``[N, C, ...]``.
        weight: per-channel scale ``[C]`` or ``None``.
        bias: per-channel shift ``[C]`` or ``None``.
        eps: added to the variance.
    """
    return _BatchNorm.apply(x, weight, bias, eps)[0]
