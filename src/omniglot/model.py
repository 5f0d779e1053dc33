"""The Omniglot task learner: a conv net, its warped version and a multi-head version for ``ft``.

Each block is ``kxk conv (num_filters) -> 2x2 max-pool -> BatchNorm -> ReLU`` (Leap/WarpGrad
papers; ``downsample="pool"``) or ``kxk conv stride 2 -> BatchNorm -> ReLU`` (``"stride"``, the
Omniglot net of the MAML paper, Finn et al. 2017, after Vinyals et al. 2016); a linear head maps
the flattened features to the classes. (The MAML code averages the last feature map over space
before its head; here both variants flatten it, so the head sees ``num_filters * s * s``
features, ``s`` the final spatial size given by ``feature_size``.) The warped net puts a warp
block (``warpgrad.warp_block`` row, any ablation variant) after every adaptable block and,
optionally, a linear warp head after the output layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import warpgrad

__all__ = ["DOWNSAMPLE", "MultiHeadOmniConv", "OmniConv", "WarpedOmniConv", "feature_size",
           "multi_head_accuracy", "multi_head_loss"]


DOWNSAMPLE = ("pool", "stride")


def _block(in_channels: int, filters: int, kernel_size: int, padding: int,
           batch_norm: bool, downsample: str = "pool") -> nn.Sequential:
    layers: list[nn.Module]
    if downsample == "stride":
        layers = [nn.Conv2d(in_channels, filters, kernel_size, stride=2, padding=padding)]
    else:
        layers = [nn.Conv2d(in_channels, filters, kernel_size, padding=padding), nn.MaxPool2d(2)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(filters))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def feature_size(*, num_layers: int, num_filters: int, kernel_size: int, padding: int,
                 image_size: int = 28, downsample: str = "pool") -> int:
    """Width of the flattened features after ``num_layers`` blocks.

    Args:
        num_layers, num_filters, kernel_size, padding: the blocks.
        image_size: height = width of the input images.
        downsample: ``"pool"`` (stride-1 conv, then 2x2 max-pool, floor) or ``"stride"``
            (stride-2 conv: ``(size + 2 * padding - kernel_size) // 2 + 1``).
    """
    if downsample not in DOWNSAMPLE:
        raise ValueError(f"downsample={downsample!r} must be one of {DOWNSAMPLE}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer")
    size = image_size
    for _ in range(num_layers):
        if downsample == "stride":
            size = (size + 2 * padding - kernel_size) // 2 + 1
        else:
            size = (size + 2 * padding - kernel_size + 1) // 2
        if size < 1:
            raise ValueError(f"num_layers={num_layers} blocks with kernel_size={kernel_size}, "
                             f"padding={padding} shrink a {image_size}x{image_size} image to "
                             "nothing; use fewer layers or more padding")
    return num_filters * size * size


def _check(classes: int, num_layers: int, num_filters: int, in_channels: int = 1) -> None:
    for name, value in (("classes", classes), ("num_layers", num_layers),
                        ("num_filters", num_filters), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class OmniConv(nn.Module):
    """The conv net: ``num_layers`` blocks and a linear ``head``."""

    def __init__(self, *, classes: int, num_layers: int = 4, num_filters: int = 64,
                 kernel_size: int = 3, padding: int = 1, batch_norm: bool = True,
                 in_channels: int = 1, image_size: int = 28, downsample: str = "pool") -> None:
        super().__init__()
        _check(classes, num_layers, num_filters, in_channels)
        self.blocks = nn.Sequential(*[
            _block(in_channels if i == 0 else num_filters, num_filters, kernel_size,
                   padding, batch_norm, downsample)
            for i in range(num_layers)])
        self.head = nn.Linear(feature_size(num_layers=num_layers, num_filters=num_filters,
                                           kernel_size=kernel_size, padding=padding,
                                           image_size=image_size, downsample=downsample), classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).flatten(1))


class WarpedOmniConv(nn.Module):
    """The conv net with a warp block after each adaptable block.

    Args:
        warp_layer: ``warpgrad.ABLATIONS`` row (``none``, ``scaling``, ``1x1``, ``3x3``,
            ``3x3+relu``, ... as listed there).
        warp_final_head: add a linear warp layer after the adaptable head.
        warp_kwargs: ``warpgrad.warp_block`` overrides (``num_layers``, ``activation``,
            ``batch_norm``, ``residual``, ``hidden_channels``, ``init``).
    """

    def __init__(self, *, classes: int, num_layers: int = 4, num_filters: int = 64,
                 kernel_size: int = 3, padding: int = 1, batch_norm: bool = True,
                 in_channels: int = 1, image_size: int = 28, downsample: str = "pool",
                 warp_layer: str = "3x3", warp_final_head: bool = False,
                 warp_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        _check(classes, num_layers, num_filters, in_channels)
        self.blocks = nn.ModuleList([
            _block(in_channels if i == 0 else num_filters, num_filters, kernel_size,
                   padding, batch_norm, downsample)
            for i in range(num_layers)])
        self.warps = nn.ModuleList([
            warpgrad.warp_block(warp_layer, num_filters, **(warp_kwargs or {})) or nn.Identity()
            for _ in range(num_layers)])
        self.head = nn.Linear(feature_size(num_layers=num_layers, num_filters=num_filters,
                                           kernel_size=kernel_size, padding=padding,
                                           image_size=image_size, downsample=downsample), classes)
        self.warp_head = warpgrad.WarpHead(classes, classes) if warp_final_head else None
        if warp_final_head:
            # identity at initialisation (the warp blocks are random unless
            # warp_kwargs={"init": "identity"})
            with torch.no_grad():
                self.warp_head.linear.weight.copy_(torch.eye(classes))
                self.warp_head.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        for block, warp in zip(self.blocks, self.warps):
            x = warp(block(x))
        out = self.head(x.flatten(1))
        return out if self.warp_head is None else self.warp_head(out)

    def adapt_modules(self) -> list[nn.Module]:
        """The layers the task learner adapts."""
        return [*self.blocks, self.head]

    def warp_modules(self) -> list[nn.Module]:
        """The meta-learned warp layers."""
        mods = [w for w in self.warps if any(True for _ in w.parameters())]
        if self.warp_head is not None:
            mods.append(self.warp_head)
        return mods


class MultiHeadOmniConv(nn.Module):
    """The conv net with one separate linear head per meta-training task (``ft``).

    The forward pass returns ``(N, num_heads, classes)``; ``multi_head_loss`` picks each
    sample's head from its target ``head * classes + label``, so a task's loss only reaches its
    own head.
    """

    def __init__(self, *, classes: int, num_heads: int, num_layers: int = 4,
                 num_filters: int = 64, kernel_size: int = 3, padding: int = 1,
                 batch_norm: bool = True, in_channels: int = 1, image_size: int = 28,
                 downsample: str = "pool") -> None:
        super().__init__()
        _check(classes, num_layers, num_filters, in_channels)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads={num_heads!r} must be a positive integer")
        self.classes = classes
        self.blocks = nn.Sequential(*[
            _block(in_channels if i == 0 else num_filters, num_filters, kernel_size,
                   padding, batch_norm, downsample)
            for i in range(num_layers)])
        width = feature_size(num_layers=num_layers, num_filters=num_filters,
                             kernel_size=kernel_size, padding=padding,
                             image_size=image_size, downsample=downsample)
        self.heads = nn.ModuleList([nn.Linear(width, classes) for _ in range(num_heads)])

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(x).flatten(1)
        return torch.stack([head(features) for head in self.heads], 1)


def _pick(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    classes = output.shape[-1]
    head = target // classes
    return output[torch.arange(output.shape[0], device=output.device), head], target % classes


def multi_head_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of each sample under its own head (``target = head * classes + label``)."""
    logits, labels = _pick(output, target)
    return nn.functional.cross_entropy(logits, labels)


def multi_head_accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Accuracy of each sample under its own head."""
    logits, labels = _pick(output, target)
    return (logits.argmax(1) == labels).float().mean()
