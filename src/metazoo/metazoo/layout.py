"""Channels-last memory format for image models, per task and without touching the model.

On a CPU, max-pooling over NCHW tensors is about 10x slower than over channels-last (NHWC)
ones, and oneDNN convolutions prefer channels-last too; on the Omniglot conv net that makes a
meta-step 1.2-2x faster (``docs/performance.md``). Learners with a ``channels_last`` option
copy each task's 4-D inputs and the 4-D parameters they adapt to channels-last with these
helpers; every activation and inner update then stays channels-last. The copies are
differentiable, so meta-gradients reach the model's own (unchanged) parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metazoo.functional import Params
from metazoo.learner import Task

__all__ = ["accumulate_grad", "check_channels_last", "params_to_channels_last",
           "task_to_channels_last", "to_channels_last"]


def check_channels_last(value: Any) -> bool:
    """Validates a learner's ``channels_last`` option."""
    if not isinstance(value, bool):
        raise ValueError(f"channels_last must be a bool, got {value!r}; pass True to run 4-D "
                         f"(image) inputs in channels-last memory format")
    return value


def to_channels_last(tensor: Tensor) -> Tensor:
    """A channels-last copy of a 4-D floating-point tensor; any other tensor unchanged."""
    if tensor.dim() != 4 or not tensor.is_floating_point():
        return tensor
    # clone, not contiguous(): with one channel both layouts count as contiguous, so
    # contiguous() keeps the NCHW strides and convolution then writes an NCHW output (the
    # slow-pooling layout).
    return tensor.clone(memory_format=torch.channels_last)


def params_to_channels_last(params: Params) -> Params:
    """``params`` with every 4-D (convolution) weight copied to channels-last."""
    return {name: to_channels_last(p) for name, p in params.items()}


def _batch(batch: Any) -> Any:
    inputs, *rest = batch
    return (to_channels_last(inputs) if isinstance(inputs, Tensor) else inputs, *rest)


def task_to_channels_last(task: Task) -> Task:
    """``task`` with the inputs (first element) of its support and query batches in
    channels-last format when they are 4-D images; targets and other inputs are left alone."""
    return Task(support=[_batch(b) for b in task.support], query=_batch(task.query))


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Adds ``grad`` (detached) into ``param.grad`` as ``backward`` would.

    A new ``.grad`` gets the parameter's strides, whatever layout ``grad`` was computed in
    (``backward``'s layout contract): a learner that adapts channels-last copies hands the
    meta-optimizer gradients laid out like the model's own parameters.
    """
    if param.grad is None:
        param.grad = torch.empty_like(param).copy_(grad.detach())
    else:
        param.grad.add_(grad.detach())
