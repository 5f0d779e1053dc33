"""Warp-layer building blocks for convolutional task learners.

A warp layer sits after an adaptable block and is shared across tasks (WarpGrad, Flennerhag et
al., ICLR 2020). The configurations of the paper's ablation (Omniglot) are all expressible:

==================  =========================================================================
row                 configuration (``ABLATIONS[row]``, cumulative from ``3x3`` on)
==================  =========================================================================
``none``            no warp layer (``warp_block`` returns ``None``)
``scaling``         channel-wise scale and shift (FiLM-like, identity at initialisation)
``1x1``             linear 1x1 convolution
``3x3``             linear KxK convolution (the default warp layer)
``3x3+relu``        ... followed by a ReLU
``3x3+relu+bn``     ... with BatchNorm before the convolution
``residual``        ... with a residual connection (1x1 projection when widths differ) and
                    BatchNorm after the sum
``2-layer``         ... two such layers per block
==================  =========================================================================

``WarpHead`` is a linear warp layer after the task learner's (adaptable) output layer.

Initialisation (``init``, any ``WarpLayer``/``WarpBlock``/``warp_block`` option): ``"random"``
(default) keeps PyTorch's default convolution initialisation, as the reference code did;
``"identity"`` makes the layer the identity map at initialisation (the convolution's weight
``torch.nn.init.dirac_``, its bias zero). The identity is defined only where the layer is linear
and keeps its width and size: ``kind="conv"`` with an odd kernel and size-preserving padding, or
``"conv1x1"``, with ``in_channels == out_channels`` and no ``activation``, ``batch_norm`` or
``residual``; anything else is refused (``ValueError``). ``"scaling"`` rows (``ChannelScale``)
are the identity under both values. The identity init draws the same random numbers as the
random one (the convolution is built, then overwritten), so a network built under either value
from the same seed has the same parameters outside its warp layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ABLATIONS", "WARP_INITS", "ChannelScale", "WarpBlock", "WarpHead", "WarpLayer",
           "warp_block"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
_KINDS = ("conv", "conv1x1", "scale")
WARP_INITS = ("random", "identity")


class ChannelScale(nn.Module):
    """Per-channel affine map ``y = weight[c] * x + bias[c]`` (identity at initialisation).

    Args:
        channels: number of channels (dimension 1 of the input).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels={channels!r} must be a positive integer")
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class WarpLayer(nn.Module):
    """One configurable convolutional warp layer.

    ``h = act(op(bn_in(x)))``; with ``residual``: ``h = bn_out(h + proj(x))``, where ``proj``
    is a 1x1 convolution when the widths differ (identity otherwise) and ``bn_out`` exists when
    ``batch_norm`` is set.

    Args:
        in_channels: input channels.
        out_channels: output channels (default ``in_channels``).
        kind: ``"conv"`` (KxK convolution, default), ``"conv1x1"`` or ``"scale"``
            (``ChannelScale``, needs equal widths).
        kernel_size: K for ``"conv"``.
        padding: convolution padding (default ``kernel_size // 2``, size preserving).
        activation: ``None`` (linear), ``"relu"``, ``"leakyrelu"``, ``"tanh"``, ``"sigmoid"``.
        batch_norm: BatchNorm before the operation (and after the sum when residual).
        residual: add the (projected) input.
        init: ``"random"`` (PyTorch's default, the reference's) or ``"identity"`` (the identity
            map at initialisation; linear, width- and size-preserving layers only, see the
            module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, kind: str = "conv",
                 kernel_size: int = 3, padding: int | None = None, activation: str | None = None,
                 batch_norm: bool = False, residual: bool = False, init: str = "random") -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r} is not one of {_KINDS}")
        if kind == "scale" and in_channels != out_channels:
            raise ValueError(f"kind='scale' keeps the width, but in_channels={in_channels} != "
                             f"out_channels={out_channels}; use kind='conv1x1'")
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of "
                             f"{[None, *_ACTIVATIONS]}")
        if init not in WARP_INITS:
            raise ValueError(f"init={init!r} is not one of {WARP_INITS}")
        k = 1 if kind == "conv1x1" else kernel_size
        pad = k // 2 if padding is None or kind == "conv1x1" else padding
        if init == "identity":  # a ChannelScale has no kernel: check it as a 1x1 convolution
            _check_identity(in_channels, out_channels, 1 if kind == "scale" else k,
                            0 if kind == "scale" else pad, activation, batch_norm, residual)
        self.residual = residual
        self.bn_in = nn.BatchNorm2d(in_channels) if batch_norm else None
        if kind == "scale":
            self.op: nn.Module = ChannelScale(in_channels)
        else:
            conv = nn.Conv2d(in_channels, out_channels, k, padding=pad)
            if init == "identity":
                with torch.no_grad():
                    nn.init.dirac_(conv.weight)
                    if conv.bias is not None:  # always set (bias=True); for the type checker
                        conv.bias.zero_()
            self.op = conv
        self.act = _ACTIVATIONS[activation]() if activation is not None else None
        self.proj = (nn.Conv2d(in_channels, out_channels, 1)
                     if residual and in_channels != out_channels else None)
        self.bn_out = nn.BatchNorm2d(out_channels) if residual and batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn_in(x) if self.bn_in is not None else x
        h = self.op(h)
        if self.act is not None:
            h = self.act(h)
        if self.residual:
            h = h + (self.proj(x) if self.proj is not None else x)
            if self.bn_out is not None:
                h = self.bn_out(h)
        return h


def _check_identity(in_channels: int, out_channels: int, kernel_size: int, padding: int,
                    activation: str | None, batch_norm: bool, residual: bool) -> None:
    """Refuses ``init="identity"`` where the layer cannot be the identity map."""
    problems = [f"{name}={value!r}" for name, value, bad in (
        ("activation", activation, activation is not None), ("batch_norm", batch_norm, batch_norm),
        ("residual", residual, residual)) if bad]
    if in_channels != out_channels:
        problems.append(f"in_channels={in_channels} != out_channels={out_channels}")
    if kernel_size % 2 == 0 or padding != kernel_size // 2:
        problems.append(f"kernel_size={kernel_size} with padding={padding} (needs an odd kernel "
                        f"and padding kernel_size // 2)")
    if problems:
        raise ValueError(f"init='identity' needs a linear warp layer that keeps its width and "
                         f"size, but {', '.join(problems)}; use init='random'")


class WarpBlock(nn.Sequential):
    """``num_layers`` warp layers; the block maps ``channels`` back to ``channels``.

    Args:
        channels: input and output width.
        num_layers: layers in the block.
        hidden_channels: width between layers (default ``channels``).
        **layer_kwargs: ``WarpLayer`` options shared by every layer.
    """

    def __init__(self, channels: int, *, num_layers: int = 1, hidden_channels: int | None = None,
                 **layer_kwargs: Any) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r} must be a positive integer")
        hidden = channels if hidden_channels is None else hidden_channels
        widths = [channels] + [hidden] * (num_layers - 1) + [channels]
        super().__init__(*[WarpLayer(widths[i], widths[i + 1], **layer_kwargs)
                           for i in range(num_layers)])


class WarpHead(nn.Module):
    """A linear warp layer after the adaptable output layer (the reference's warp head).

    Args:
        in_features: width of the adaptable head's output.
        out_features: number of outputs (classes).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


_BASE = {"kind": "conv"}
ABLATIONS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "scaling": {"kind": "scale"},
    "1x1": {"kind": "conv1x1"},
    "3x3": dict(_BASE),
    "3x3+relu": {**_BASE, "activation": "relu"},
    "3x3+relu+bn": {**_BASE, "activation": "relu", "batch_norm": True},
    "residual": {**_BASE, "activation": "relu", "batch_norm": True, "residual": True},
    "2-layer": {**_BASE, "activation": "relu", "batch_norm": True, "residual": True,
                "num_layers": 2},
}


def warp_block(row: str, channels: int, **overrides: Any) -> WarpBlock | None:
    """The warp block of one ablation row (see the module docstring), or ``None`` for
    ``"none"``.

    Args:
        row: a key of ``ABLATIONS``.
        channels: width of the adaptable block it follows.
        **overrides: ``WarpBlock``/``WarpLayer`` options that replace the row's.
    """
    if row not in ABLATIONS:
        raise ValueError(f"row={row!r} is not one of {list(ABLATIONS)}")
    config = ABLATIONS[row]
    if config is None:
        return None
    return WarpBlock(channels, **{**config, **overrides})
