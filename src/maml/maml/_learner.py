"""Plumbing shared by the learners of this package: argument checks and query scoring."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import metazoo

Criterion = Callable[[Tensor, Tensor], Tensor]
MetaOptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
NamePredicate = Callable[[str], bool]


def check_module(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"model {type(model).__name__} has no parameters to meta-learn")
    metazoo.trainable_parameters(model)  # raises when every parameter is frozen
    return model


def check_criterion(criterion: Any) -> Criterion:
    """``metazoo.check_criterion``: a function or an ``nn.Module`` instance, wrapped so that
    targets that do not fit the output fail with a message."""
    return metazoo.check_criterion(criterion)


def check_optional_positive(name: str, value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{name} must be None or a positive number, got {value!r}")
    return value


def check_inner_optimizer(optimizer: Any) -> metazoo.InnerOptimizer:
    if not isinstance(optimizer, metazoo.InnerOptimizer):
        raise ValueError(
            f"inner_optimizer must be a metazoo optimizer (metazoo.SGD, metazoo.Adam, "
            f"metazoo.RMSprop), got {type(optimizer).__name__}; torch.optim optimizers update "
            f"in place and cannot be differentiated through")
    return optimizer


def check_bn_mode(bn_mode: Any) -> metazoo.BatchNormMode:
    try:
        return metazoo.BatchNormMode(bn_mode)
    except ValueError:
        choices = [m.value for m in metazoo.BatchNormMode]
        raise ValueError(f"bn_mode must be one of {choices}, got {bn_mode!r}") from None


def name_predicate(argument: str, value: NamePredicate | Collection[str] | None,
                   names: Sequence[str]) -> NamePredicate | None:
    """Turns a predicate or a collection of parameter names into a checked predicate.

    Raises when a listed name does not exist or when the selection matches no parameter, since
    both almost always mean a typo in a parameter name.
    """
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"{argument} must be a predicate or a collection of parameter names, "
                         f"got the string {value!r}; wrap a single name as [{value!r}]")
    if callable(value):
        predicate: NamePredicate = value
    else:
        chosen = set(value)
        unknown = sorted(chosen - set(names))
        if unknown:
            raise ValueError(f"{argument} names parameters {unknown} that the model does not "
                             f"have; its parameters are {list(names)}")
        predicate = chosen.__contains__
    if not any(predicate(n) for n in names):
        raise ValueError(f"{argument} matches none of the model's parameters {list(names)}; "
                         f"check the names (e.g. lambda name: name.startswith('head.'))")
    return predicate


def build_meta_optimizer(meta_optimizer: MetaOptimizerFactory | torch.optim.Optimizer | None,
                         named_parameters: Iterable[tuple[str, nn.Parameter]],
                         default: MetaOptimizerFactory) -> torch.optim.Optimizer:
    """``metazoo.build_meta_optimizer``: a factory or an optimizer, covering exactly the
    meta-parameters."""
    return metazoo.build_meta_optimizer(meta_optimizer, named_parameters, default)


def check_tasks(tasks: Iterable[metazoo.Task]) -> Sequence[metazoo.Task]:
    """``metazoo.check_tasks``: a non-empty sequence (or iterable, read once) of tasks."""
    return metazoo.check_tasks(tasks)


def score_query(model: nn.Module, criterion: Criterion, params: metazoo.Params,
                buffers: metazoo.Buffers, query: metazoo.Batch,
                bn_mode: metazoo.BatchNormMode) -> tuple[Tensor, Tensor | None]:
    """Query loss and accuracy of an adapted model.

    The query pass runs in evaluation mode (``training=False``): dropout is off and, in
    ``RUNNING`` mode, BatchNorm uses the task's running statistics gathered on the support set;
    in ``BATCH`` mode it normalises with the query batch's own statistics.
    """
    inputs, targets = query
    output, _ = metazoo.forward(model, params, buffers, inputs, bn_mode=bn_mode, training=False)
    loss = criterion(output, targets)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("criterion must return a scalar loss tensor")
    return loss, metazoo.accuracy(output.detach(), targets)


def evaluate_tasks(tasks: Sequence[metazoo.Task],
                   adapt: Callable[[metazoo.Task], tuple[metazoo.Params, metazoo.UnrollResult]],
                   model: nn.Module, criterion: Criterion, bn_mode: metazoo.BatchNormMode,
                   layout: Callable[[metazoo.Task], metazoo.Task] | None = None
                   ) -> metazoo.EvalResult:
    """Adapts to each task with ``adapt`` (full params, unroll result) and scores its query.

    ``layout`` converts each task first (e.g. to channels-last), one task at a time.
    """
    per_task = []
    for task in tasks:
        if layout is not None:
            task = layout(task)
        params, result = adapt(task)
        with torch.no_grad():
            loss, acc = score_query(model, criterion, params, result.buffers, task.query,
                                    bn_mode)
        per_task.append((loss, acc, result.losses))
    loss_mean, acc_mean, curve = metazoo.mean_results(per_task)
    return metazoo.EvalResult(loss_mean, acc_mean, curve, len(tasks),
                              tuple((float(r[0]), None if r[1] is None else float(r[1]))
                                    for r in per_task))


class ModelLearner(metazoo.MetaLearner):
    """What MAML, Reptile and iMAML share about their model: the parameters that required grad
    when the learner was built are the ones adapted and meta-learned (``_trainable``,
    ``metazoo.trainable_parameters``), the device is the model's, and ``channels_last`` puts
    each task's 4-D inputs in that format (``_layout``)."""

    channels_last: bool
    _trainable: set[str]

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's parameters that required grad when the learner was built."""
        for name, p in self.model.named_parameters():
            if name in self._trainable:
                yield name, p

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _layout(self, task: metazoo.Task) -> metazoo.Task:
        """``task`` with its 4-D inputs in channels-last format when ``channels_last`` is set."""
        return metazoo.task_to_channels_last(task) if self.channels_last else task


class TaskGradients:
    """Collects one meta-batch's gradients so that skipped tasks leave the mean exact, with one
    host transfer for the fault checks of all tasks (``metazoo.TaskFaults``).

    Gradients already in ``.grad`` are set aside on entry; ``add`` adds a task's gradient of
    ``objective / len(tasks)`` masked by its finiteness flag (on the device, no
    synchronisation); ``finish`` reads the flags once, raises the first task's
    ``metazoo.NonFiniteError`` in raise mode (``.grad`` then holds what the tasks before it
    added, as when each task was checked before its backward pass), rescales the sum to the mean
    over the kept tasks and adds the set-aside gradients back (``backward`` accumulation).
    """

    def __init__(self, params: Iterable[Tensor], num_tasks: int, on_nonfinite: str) -> None:
        self.params = list(params)
        self.num_tasks = num_tasks
        self.faults = metazoo.TaskFaults(on_nonfinite)
        self.skipped = 0
        self.means: metazoo.MeanResults | None = None
        self._sums: list[Tensor | None] = [None] * len(self.params)
        self._saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def add(self, inner_losses: Tensor, objective: Tensor | None,
            grads: Sequence[Tensor | None]) -> None:
        """Adds the next task's gradients (one per parameter, ``None`` for none), masked."""
        mask = self.faults.check(inner_losses, objective)
        for index, grad in enumerate(grads):
            if grad is not None:
                grad = self.faults.masked(mask, grad.detach())
                total = self._sums[index]
                self._sums[index] = grad if total is None else total + grad

    def finish(self, results: Sequence[tuple[Tensor, Tensor | None, Tensor]] = ()
               ) -> list[int]:
        """The indices of the kept tasks; ``.grad`` holds their mean gradient (plus what it
        held on entry). With each task's ``results`` (``(query_loss, accuracy, inner_losses)``)
        their means over the kept tasks are read in the same host transfer as the flags
        (``metazoo.resolve_and_mean``), into ``means`` for ``summarize``."""
        return self.deferred_finish(results).read()

    def deferred_finish(self, results: Sequence[tuple[Tensor, Tensor | None, Tensor]] = ()
                        ) -> metazoo.DeferredRead[list[int]]:
        """``finish`` with its host transfer left to the caller (``metazoo.DeferredRead``).

        ``.grad`` is written at once, without reading anything from the device: in ``"skip"``
        mode the sum is scaled by ``num_tasks / kept`` with ``kept`` counted on the device (by
        exactly 1 when every task is kept, so nothing changes). Reading then raises the first
        faulty task's error in ``"raise"`` mode (``.grad`` holds what the tasks before it
        added), and when no task is kept sets back to ``None`` every ``.grad`` that was
        ``None`` on entry (the zeros written are dropped: no gradient at all, see ``_write``).
        """
        scale = None
        if self.faults.on_nonfinite == "skip":
            kept = self.faults.kept_count().to(torch.float64)
            # num_tasks / kept rounded once, as the float division finish used to do.
            scale = torch.tensor(float(self.num_tasks), dtype=torch.float64,
                                 device=kept.device) / kept.clamp(min=1.0)
        unset = [saved is None for saved in self._saved]
        self._write(scale)
        deferred = metazoo.deferred_resolve_and_mean(self.faults, results)

        def finished(resolved: tuple[list[int], metazoo.MeanResults | None]) -> list[int]:
            kept, self.means = resolved
            self.skipped = self.num_tasks - len(kept)
            if not kept:
                for p, was_unset in zip(self.params, unset, strict=True):
                    if was_unset:
                        p.grad = None
            return kept

        return deferred.then(finished)

    def _write(self, scale: Tensor | None) -> None:
        for p, total, saved in zip(self.params, self._sums, self._saved, strict=True):
            # No kept task: no gradient at all (None, not zeros), so the meta-optimizer skips
            # the parameter as it does for Leap and WarpGrad; a zero gradient would still move
            # it by momentum and advance Adam's moments on a meta-batch that said nothing.
            # (The zeros written then are dropped after the read: deferred_finish.)
            if total is not None:
                metazoo.accumulate_grad(p, total)
                if scale is not None and p.grad is not None:
                    p.grad.mul_(scale.to(device=p.grad.device, dtype=p.grad.dtype))
            if saved is not None:
                p.grad = saved if p.grad is None else saved.add_(p.grad)
        self._saved, self._sums = [], []


def summarize(per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]], num_tasks: int,
              skipped: int, start: float, means: metazoo.MeanResults | None = None
              ) -> metazoo.MetaStepResult:
    """Means over the kept tasks (NaN when every task was skipped); ``means``: those already
    read (``TaskGradients.means``)."""
    if not per_task:
        nan = float("nan")
        return metazoo.MetaStepResult(nan, nan, None, (), num_tasks,
                                      time.perf_counter() - start, skipped)
    meta_loss, acc, curve = metazoo.mean_results(per_task) if means is None else means
    return metazoo.MetaStepResult(meta_loss, curve[-1], acc, curve, num_tasks,
                                  time.perf_counter() - start, skipped)
