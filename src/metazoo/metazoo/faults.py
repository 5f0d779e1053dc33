"""Numerical faults and bad batches: detection with few host synchronisations, clear errors.

A NaN or infinite loss in one task of a meta-batch must neither reach the meta-parameters nor
be silently averaged away. Learners check each task's inner losses and query loss with one
host transfer per task (``task_fault``) and either raise ``NonFiniteError`` naming the task
and the inner step where the fault first appeared, or (``on_nonfinite="skip"``) leave the task
out of the mean and count it in ``MetaStepResult.skipped_tasks``. ``MetaLearner.meta_step``
checks every meta-gradient with one fused reduction (``all_finite``) before the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NONFINITE_MODES", "CheckedCriterion", "NonFiniteError", "all_finite",
           "check_on_nonfinite", "task_fault"]

NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or meta-gradient.

    Attributes:
        task: index of the task within the meta-batch, ``None`` when not attributable to one.
        inner_step: inner step whose support loss was first non-finite (``where="inner"``);
            ``None`` otherwise.
        where: ``"inner"`` (support loss), ``"query"`` (query loss / meta-objective) or
            ``"meta_gradient"`` (the accumulated meta-gradient, after any gradient hook) or
            ``"other_rank"`` (distributed: another process stopped on a non-finite loss; its
            own error names the task).
        meta_step: the meta-step number, filled in by the experiment loop (``None`` until then).
        names: for ``where="meta_gradient"``, the meta-parameters with non-finite gradients.
    """

    def __init__(self, *, task: int | None, inner_step: int | None, where: str,
                 meta_step: int | None = None, names: Sequence[str] = ()) -> None:
        self.task, self.inner_step, self.where = task, inner_step, where
        self.meta_step, self.names = meta_step, tuple(names)
        super().__init__(self._message())

    def _message(self) -> str:
        at = [] if self.meta_step is None else [f"meta-step {self.meta_step}"]
        if self.task is not None:
            at.append(f"task {self.task} of the meta-batch")
        if self.where == "inner":
            what = f"non-finite support loss at inner step {self.inner_step}"
        elif self.where == "query":
            what = "non-finite query loss after adaptation (inner losses were finite)"
        elif self.where == "other_rank":
            what = ("another process of the distributed run stopped on a non-finite loss (its "
                    "error names the task)")
        else:
            what = f"non-finite meta-gradient of {list(self.names)}"
        return (f"{what}{' (' + ', '.join(at) + ')' if at else ''}; the meta-parameters were "
                f"not updated. Check that task's data and lower the learning rates, or pass "
                f"on_nonfinite='skip' to leave such tasks out of the meta-step")

    def with_meta_step(self, meta_step: int) -> NonFiniteError:
        """A copy that also names the meta-step (for experiment loops that re-raise)."""
        return NonFiniteError(task=self.task, inner_step=self.inner_step, where=self.where,
                              meta_step=meta_step, names=self.names)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor: pickle through a helper so errors cross process borders.
        return (_rebuild, (self.task, self.inner_step, self.where, self.meta_step, self.names))


def _rebuild(task: int | None, inner_step: int | None, where: str, meta_step: int | None,
             names: Sequence[str]) -> NonFiniteError:
    return NonFiniteError(task=task, inner_step=inner_step, where=where, meta_step=meta_step,
                          names=names)


def check_on_nonfinite(value: Any) -> str:
    """Validates a learner's ``on_nonfinite`` option."""
    if value not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {list(NONFINITE_MODES)}, got {value!r}; "
                         f"'raise' stops at the first non-finite loss, 'skip' drops the task")
    return str(value)


def task_fault(task: int, inner_losses: Tensor, query_loss: Tensor | None) -> NonFiniteError | None:
    """The fault of one task, if any, with one host synchronisation.

    Args:
        task: index of the task in the meta-batch.
        inner_losses: support loss before each inner step, shape ``[K]``.
        query_loss: the task's query loss or meta-objective (``None`` to check only the inner
            losses); it may live on another device than ``inner_losses`` (a learner that keeps
            its inner losses on the host and its query loss on the GPU).

    Returns:
        ``None`` when every loss is finite, else the error to raise (``where="inner"`` with the
        first non-finite step, or ``where="query"``).
    """
    losses = inner_losses.detach().reshape(-1)
    if query_loss is not None:
        query = query_loss.detach().reshape(1)
        losses = torch.cat([losses.to(device=query.device, dtype=query.dtype), query])
    bad = ~torch.isfinite(losses)
    if not bool(bad.any()):
        return None
    first = int(bad.nonzero()[0, 0])
    if first < inner_losses.numel():
        return NonFiniteError(task=task, inner_step=first, where="inner")
    return NonFiniteError(task=task, inner_step=None, where="query")


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite: one fused reduction, one host transfer."""
    if not tensors:
        return True
    # isfinite().all() per tensor stays on the device; only the stacked flags are transferred.
    # (A norm-based check would report overflow of large finite gradients as non-finite.)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


Criterion = Callable[[Tensor, Tensor], Tensor]


class CheckedCriterion:
    """Wraps a criterion so that targets which do not fit the output fail with a clear message.

    The happy path costs nothing: the wrapped criterion runs as is and only when it raises are
    output and targets inspected (label outside ``[0, classes)``, batch sizes that differ) and
    the error re-raised as a ``ValueError`` naming the bad value and the fix. On CUDA an
    out-of-range label is a device-side assert that cannot be diagnosed after the fact; run
    one meta-step on CPU to get this message.

    Args:
        criterion: ``criterion(output, target) -> scalar loss``.
    """

    def __init__(self, criterion: Criterion) -> None:
        self.criterion: Criterion = (criterion.criterion if isinstance(criterion, CheckedCriterion)
                                     else criterion)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        try:
            return self.criterion(output, target)
        except (IndexError, RuntimeError, ValueError) as error:
            problem = _diagnose(output, target)
            if problem is None:
                raise
            raise ValueError(problem) from error

    def __repr__(self) -> str:
        return f"CheckedCriterion({self.criterion!r})"


def _diagnose(output: Tensor, target: Tensor) -> str | None:
    if output.shape[:1] != target.shape[:1]:
        return (f"targets do not fit the model's output: output shape {tuple(output.shape)}, "
                f"target shape {tuple(target.shape)} (batch sizes {output.shape[:1]} and "
                f"{target.shape[:1]} differ); give every batch as many targets as inputs")
    if not target.dtype.is_floating_point and output.dim() == target.dim() + 1:
        classes = output.shape[1]
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            bad = high if high >= classes else low
            return (f"targets hold label {bad} but the model outputs {classes} classes (valid "
                    f"labels 0..{classes - 1}); relabel the task's classes to 0..{classes - 1} "
                    f"or give the model a head with more outputs")
    return None
