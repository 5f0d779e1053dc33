"""The interface every metazoo algorithm implements, and the task and result types.

Experiments only talk to ``MetaLearner``: ``adapt`` a copy of the meta-learned model to one
task, ``meta_step`` over a batch of tasks (meta-gradient then meta-optimizer step), ``evaluate``
without meta-updating, and ``state_dict``/``load_state_dict`` for checkpoints.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from metazoo.deferred import DeferredRead
from metazoo.faults import (
    CheckedCriterion,
    NonFiniteError,
    TaskFaults,
    UndoableStep,
    _read_flags_with,
    checked_step,
)
from metazoo.functional import Buffers, Params

Batch = tuple[Tensor, Tensor]
Criterion = Callable[[Tensor, Tensor], Tensor]
MetaOptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

__all__ = [
    "Adapted",
    "Batch",
    "Criterion",
    "EvalResult",
    "MeanResults",
    "MetaLearner",
    "MetaOptimizerFactory",
    "MetaStepResult",
    "Task",
    "accuracy",
    "build_meta_optimizer",
    "check_criterion",
    "check_steps",
    "check_task",
    "check_tasks",
    "deferred_flags_and_means",
    "deferred_meta_gradient",
    "deferred_resolve_and_mean",
    "mean_results",
    "resolve_and_mean",
    "trainable_parameters",
]


@dataclass(frozen=True)
class Task:
    """One task: support batches for adaptation and a query batch for the meta-objective.

    Attributes:
        support: inner step k trains on ``support[k % len(support)]``; a few-shot task has one
            support batch reused every step, an alphabet task a fresh batch per step.
        query: the held-out batch the adapted model is scored on.
    """

    support: Sequence[Batch]
    query: Batch

    def __post_init__(self) -> None:
        if isinstance(self.support, tuple) and len(self.support) == 2 and all(
                isinstance(t, Tensor) for t in self.support):
            raise ValueError("Task.support must be a sequence of (inputs, targets) batches; "
                             "wrap a single batch as [batch]")
        if not self.support:
            raise ValueError("Task.support must hold at least one batch")
        for name, batch in [("query", self.query)] + [
                (f"support[{i}]", b) for i, b in enumerate(self.support)]:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"Task.{name} must be an (inputs, targets) pair")
            if batch[0].shape[0] != batch[1].shape[0]:
                raise ValueError(f"Task.{name} has {batch[0].shape[0]} inputs but "
                                 f"{batch[1].shape[0]} targets")

    def to(self, device: torch.device | str) -> Task:
        """A copy of the task with every tensor on ``device``."""
        def move(b: Batch) -> Batch:
            return (b[0].to(device), b[1].to(device))

        return Task([move(b) for b in self.support], move(self.query))


@dataclass(frozen=True)
class Adapted:
    """A model adapted to one task.

    Attributes:
        params: every parameter of the model (adapted and static merged).
        buffers: the task's buffers after adaptation (BatchNorm statistics).
        inner_losses: support loss before each inner step.
    """

    params: Params
    buffers: Buffers
    inner_losses: tuple[float, ...]


@dataclass(frozen=True)
class MetaStepResult:
    """Summary of one meta-step over a batch of tasks (means over tasks).

    Attributes:
        meta_loss: query loss of the adapted models (the meta-objective).
        inner_loss: support loss before the last inner step.
        accuracy: query accuracy of the adapted models, ``None`` for non-classification.
        inner_losses: mean support loss before each inner step (the training curve).
        num_tasks: tasks in the meta-batch.
        seconds: wall-clock time of the meta-step.
        skipped_tasks: tasks left out of the means and the meta-gradient because a loss was
            non-finite (learners built with ``on_nonfinite="skip"``).
    """

    meta_loss: float
    inner_loss: float
    accuracy: float | None
    inner_losses: tuple[float, ...]
    num_tasks: int
    seconds: float
    skipped_tasks: int = 0


@dataclass(frozen=True)
class EvalResult:
    """Evaluation of adapted models on held-out tasks (means over tasks).

    Attributes:
        loss: query loss after adaptation.
        accuracy: query accuracy after adaptation, ``None`` for non-classification.
        inner_losses: mean support loss before each inner step.
        num_tasks: tasks evaluated.
        per_task: ``(loss, accuracy)`` of each task.
    """

    loss: float
    accuracy: float | None
    inner_losses: tuple[float, ...]
    num_tasks: int
    per_task: tuple[tuple[float, float | None], ...] = field(default=())


def accuracy(output: Tensor, target: Tensor) -> Tensor | None:
    """Classification accuracy as a 0-dim tensor, or ``None`` if ``target`` is not class labels."""
    if target.dtype not in (torch.int64, torch.int32) or output.dim() != target.dim() + 1:
        return None
    dtype = output.dtype if output.is_floating_point() else torch.get_default_dtype()
    return (output.argmax(dim=1) == target).to(dtype).mean()


#: What ``mean_results`` returns: mean query loss, mean accuracy (``None`` without), mean
#: inner-loss curve.
MeanResults = tuple[float, float | None, tuple[float, ...]]


def _means_tensor(per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]]
                  ) -> tuple[Tensor, bool]:
    """``[mean query loss, mean accuracy (0 without), *mean inner-loss curve]`` on the device,
    and whether every task has an accuracy."""
    # Everything is gathered on the first query loss's device: a learner may keep its inner
    # losses on the host (CPU) while the query losses live on the GPU.
    device = per_task[0][0].device
    losses = torch.stack([r[0].detach().to(device) for r in per_task])
    curves = torch.stack([r[2].detach().to(device) for r in per_task])
    accs = [r[1] for r in per_task]
    has_acc = all(a is not None for a in accs)
    return torch.cat([losses.mean().reshape(1),
                      torch.stack([a.detach().to(device) for a in accs]).mean().reshape(1)  # type: ignore[union-attr]
                      if has_acc else losses.new_zeros(1),
                      curves.mean(0).to(losses.dtype)]), has_acc


def _unpack_means(summary: Sequence[float], has_acc: bool) -> MeanResults:
    return summary[0], (summary[1] if has_acc else None), tuple(summary[2:])


def mean_results(per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]]) -> MeanResults:
    """Reduces per-task ``(query_loss, query_accuracy, inner_losses)`` with one host transfer."""
    summary, has_acc = _means_tensor(per_task)
    return _unpack_means(summary.tolist(), has_acc)


def resolve_and_mean(faults: TaskFaults,
                     per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]]
                     ) -> tuple[list[int], MeanResults | None]:
    """``faults.resolve()`` and ``mean_results`` of the kept tasks, in one host transfer.

    The loop learners' end of a meta-batch: the means of all tasks are computed on the device
    and read with the fault flags (``TaskFaults.resolve_with``). When every task is finite
    (the usual case) that is the only transfer and the means are bit for bit those of
    ``mean_results(per_task)``; when ``on_nonfinite="skip"`` leaves a task out, the means of
    the kept tasks cost a second transfer.

    Args:
        faults: the meta-batch's ``TaskFaults``, one ``check`` per task of ``per_task``.
        per_task: each task's ``(query_loss, query_accuracy, inner_losses)``.

    Returns:
        The indices of the kept tasks and ``mean_results`` over them (``None`` when no task is
        kept).

    Raises:
        NonFiniteError: as ``TaskFaults.resolve`` (``"raise"`` mode, a non-finite task).
    """
    return deferred_resolve_and_mean(faults, per_task).read()


def deferred_resolve_and_mean(faults: TaskFaults,
                              per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]]
                              ) -> DeferredRead[tuple[list[int], MeanResults | None]]:
    """``resolve_and_mean`` with its host transfer left to the caller (``DeferredRead``):
    ``MetaLearner.meta_step`` reads it with the meta-optimizer step's finite check."""
    if not per_task:
        return faults.deferred_resolve(None).then(lambda resolved: (resolved[0], None))
    return deferred_flags_and_means(faults.flags(), faults.kept_from, per_task)


def deferred_flags_and_means(flags: Tensor, kept_from: Callable[[list[float]], list[int]],
                             per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]]
                             ) -> DeferredRead[tuple[list[int], MeanResults | None]]:
    """The kept tasks and their means, from per-task finiteness ``flags`` on the device, read
    with the means of all tasks in one transfer (a second one only when a task is skipped).

    Args:
        flags: 1-D, one per task of ``per_task``: whether its losses are all finite.
        kept_from: the flags read (floats, 0 or 1) to the indices of the kept tasks; raises
            the first faulty task's ``NonFiniteError`` in ``"raise"`` mode.
        per_task: each task's ``(query_loss, query_accuracy, inner_losses)``.
    """
    summary, has_acc = _means_tensor(per_task)

    def means(resolved: tuple[list[int], list[float]]) -> tuple[list[int], MeanResults | None]:
        kept, values = resolved
        if len(kept) == len(per_task):
            return kept, _unpack_means(values, has_acc)
        if not kept:
            return kept, None
        return kept, mean_results([per_task[i] for i in kept])

    return _read_flags_with(flags, summary, kept_from).then(means)


def deferred_meta_gradient(params: Sequence[Tensor], write: Callable[[], object],
                           faults: DeferredRead[tuple[list[int], MeanResults | None]]
                           ) -> DeferredRead[tuple[list[int], MeanResults | None]]:
    """A meta-gradient written into ``.grad`` before the fault flags of its tasks are read.

    Reading the flags first costs a host transfer before the meta-optimizer can step; written
    first, ``MetaLearner.meta_step`` reads them with its step's finite check. ``write`` must
    add nothing of a faulty task (its gradient masked out) and scale by the number of kept
    tasks without reading it (counted on the device). Gradients already in ``.grad`` are set
    aside first; when the read is finished they get the new gradient added (``backward``'s
    accumulation), or, when a faulty task raises or no task is kept, are put back as they
    were (the new gradient dropped: no gradient at all rather than zeros).

    Args:
        params: the tensors ``write`` writes ``.grad`` of.
        write: writes the meta-gradient (``accumulate_grad``, ``autograd.backward``, ...).
        faults: the read of the kept tasks and their means (``deferred_flags_and_means``).
    """
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    write()

    def put_back() -> None:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad

    def finish(read: list[float]) -> tuple[list[int], MeanResults | None]:
        try:
            kept, means = faults.finish(read)
        except NonFiniteError:
            put_back()
            raise
        if not kept:
            put_back()
        else:
            for p, grad in zip(params, saved, strict=True):
                if grad is not None:
                    p.grad = grad if p.grad is None else grad.add_(p.grad)
        return kept, means

    return DeferredRead(faults.values, finish)


def _step_then_read(optimizer: torch.optim.Optimizer,
                    named_parameters: Iterable[tuple[str, Tensor]],
                    deferred: DeferredRead[MetaStepResult]) -> MetaStepResult:
    """``checked_step`` and the meta-batch's deferred read in one host transfer.

    The step runs on ``.grad`` as the deferred ``meta_backward`` wrote it; the read then decides:
    a faulty task (``"raise"`` mode) undoes the step and raises its error, as when it was read
    before the step; no kept task undoes the step (no gradient, nothing to step); a non-finite
    meta-gradient or update fails as ``checked_step`` does.
    """
    step = UndoableStep(optimizer, named_parameters)
    grads = [p.grad for _, p in step.stepped]
    try:
        step.step()
    except NonFiniteError:
        # A faulty task comes first, as it did when it was read before the step.
        for (_, p), grad in zip(step.stepped, grads, strict=True):
            p.grad = grad
        try:
            deferred.read()
        finally:
            step.undo()
        raise
    ok, values = step.read_after_step(deferred.values)
    try:
        result = deferred.finish(values)
    except NonFiniteError:
        step.undo(keep_grads=True)
        raise
    if result.num_tasks and result.skipped_tasks == result.num_tasks:
        step.undo()  # the gradients were zeros; finish set them back to None
    elif not ok:
        step.fail()
    return result


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a learner adapts and meta-learns: those with ``requires_grad=True``.

    The rule every metazoo learner follows: a parameter with ``requires_grad=False`` is frozen.
    It is used in every forward pass but neither adapted in the inner loop nor meta-updated
    (its ``.grad`` stays ``None``). Learners read the flags once, when they are built (the
    meta-optimizer is built over the trainable parameters then); build a new learner after
    changing them. Tied weights appear once, under their first name.

    Raises:
        ValueError: no parameter requires grad, so there is nothing to learn.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"model {type(model).__name__} has no parameters with "
                         f"requires_grad=True, so there is nothing to adapt or meta-learn; "
                         f"parameters with requires_grad=False are frozen (set it back to True "
                         f"on the ones to learn)")
    return trainable


def check_criterion(criterion: Any) -> CheckedCriterion:
    """The ``criterion=`` keyword every learner takes, checked and wrapped.

    Args:
        criterion: a function ``(output, target) -> scalar loss`` (``F.cross_entropy``) or an
            ``nn.Module`` instance (``nn.CrossEntropyLoss()``).

    Returns:
        ``CheckedCriterion(criterion)``: targets that do not fit the output (a label outside
        the classes, a target that broadcasts against the output to another shape) fail with a
        ``ValueError`` naming both shapes instead of a raw error or a silently wrong loss.

    Raises:
        ValueError: ``criterion`` is a class (``nn.MSELoss`` instead of ``nn.MSELoss()``) or is
            not callable.
    """
    if isinstance(criterion, type):
        raise ValueError(f"criterion={criterion.__name__} is a class; pass an instance "
                         f"(criterion={criterion.__name__}()) or a function such as "
                         f"torch.nn.functional.mse_loss")
    if not callable(criterion):
        raise ValueError(f"criterion must be callable as criterion(output, target) -> scalar "
                         f"loss (e.g. torch.nn.functional.cross_entropy or "
                         f"torch.nn.CrossEntropyLoss()), got {criterion!r}")
    return CheckedCriterion(criterion)


def build_meta_optimizer(meta_optimizer: MetaOptimizerFactory | torch.optim.Optimizer | None,
                         named_parameters: Iterable[tuple[str, nn.Parameter]],
                         default: MetaOptimizerFactory) -> torch.optim.Optimizer:
    """The ``meta_optimizer=`` keyword every learner takes: built, then checked to cover exactly
    the learner's meta-parameters.

    An optimizer over other tensors (a copy of the model, a forgotten group) would step nothing
    that the learner's meta-gradient reaches: training would silently not move.

    Args:
        meta_optimizer: a factory ``params -> torch.optim.Optimizer`` (called with the
            meta-parameters, e.g. ``lambda params: torch.optim.Adam(params, lr=1e-3)``), a
            ``torch.optim.Optimizer`` already built over them, or ``None`` for ``default``.
        named_parameters: the learner's ``(name, tensor)`` meta-parameters, in order.
        default: the factory used when ``meta_optimizer`` is ``None``.

    Raises:
        ValueError: (one line) nothing to meta-learn, a factory that does not return an
            optimizer, or an optimizer whose tensors differ from the meta-parameters (naming the
            missing meta-parameters and the number of extra tensors, and the fix).
    """
    named = list(named_parameters)
    if not named:
        raise ValueError("there are no meta-parameters: every parameter is frozen "
                         "(requires_grad=False) or excluded; leave at least one trainable")
    params = [p for _, p in named]
    if meta_optimizer is None:
        meta_optimizer = default
    if isinstance(meta_optimizer, torch.optim.Optimizer):
        optimizer = meta_optimizer
    elif callable(meta_optimizer):
        optimizer = meta_optimizer(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"meta_optimizer(params) must return a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}; e.g. meta_optimizer=lambda params: "
                             f"torch.optim.Adam(params, lr=1e-3)")
    else:
        raise ValueError(f"meta_optimizer must be a torch.optim.Optimizer or a factory taking "
                         f"the meta-parameters, e.g. lambda params: torch.optim.Adam(params, "
                         f"lr=1e-3); got {meta_optimizer!r}")
    covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in named if id(p) not in covered]
    extra = len(covered - {id(p) for p in params})
    if missing or extra:
        problems = []
        if missing:
            shown = missing if len(missing) <= 6 else [*missing[:6], f"... {len(missing)} in all"]
            problems.append(f"leaves out the meta-parameters {shown}")
        if extra:
            problems.append(f"holds {extra} tensor(s) that are not meta-parameters")
        raise ValueError(f"meta_optimizer {' and '.join(problems)}; build it over the "
                         f"learner's meta-parameters: pass a factory such as "
                         f"meta_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3)")
    return optimizer


def check_steps(name: str, value: Any) -> int:
    """A number of steps (``inner_steps``, ``eval_inner_steps``, ``cg_steps``...): an ``int``
    >= 1, else one ``ValueError`` line naming the argument ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; use at least one step")
    return value


def check_task(task: Any, argument: str = "task") -> Task:
    """Raises ``TypeError`` naming ``metazoo.Task`` when ``task`` is something else (a tuple)."""
    if not isinstance(task, Task):
        raise TypeError(f"{argument} must be a metazoo.Task, got {type(task).__name__}; build "
                        f"one as metazoo.Task(support=[(x, y)], query=(x_query, y_query))")
    return task


def check_tasks(tasks: Any, *, allow_empty: bool = False) -> Sequence[Task]:
    """Checks a meta-batch: a non-empty sequence or iterable of ``metazoo.Task``.

    Returns:
        The tasks as a sequence: a generator or other iterable is read once into a list.

    Raises:
        TypeError: an element is not a ``metazoo.Task`` (e.g. a ``(support, query)`` tuple), or
            ``tasks`` is not iterable.
        ValueError: a single ``Task`` instead of a list, or no task at all.
    """
    if isinstance(tasks, Task):
        raise ValueError("expected a sequence of tasks, got a single Task; pass [task]")
    if not isinstance(tasks, Sequence):
        if not isinstance(tasks, Iterable):
            raise TypeError(f"tasks must be a list of metazoo.Task, got "
                            f"{type(tasks).__name__}; pass [task, ...]")
        tasks = list(tasks)  # a generator or other iterable: read it once
    if not tasks and not allow_empty:
        raise ValueError("expected at least one task")
    for index, task in enumerate(tasks):
        check_task(task, f"tasks[{index}]")
    return tasks


class MetaLearner(ABC):
    """One meta-learning algorithm wrapped around a model.

    Subclasses implement ``adapt``, ``meta_backward`` and ``evaluate``; ``meta_step`` (zero
    gradients, ``meta_backward``, optional gradient hook such as a distributed all-reduce,
    meta-optimizer step) is shared. A subclass whose meta-gradient can be written before its
    fault flags are read also overrides ``_deferred_meta_backward``: ``meta_step`` then reads
    them with its step's finite check, one host transfer per meta-step. Subclasses are final:
    configuration goes through keyword-only constructor arguments, not inheritance.
    """

    model: nn.Module
    meta_optimizer: torch.optim.Optimizer

    @abstractmethod
    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts a copy of the meta-learned model to ``task`` (no meta-gradient)."""

    @abstractmethod
    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Accumulates into ``.grad`` the meta-gradient of the mean objective over ``tasks``."""

    @abstractmethod
    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task and scores the query set, leaving meta-parameters unchanged."""

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        """The tensors the meta-optimizer updates."""
        for _, p in self.named_meta_parameters():
            yield p

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, tensor)`` of every meta-learned tensor (default: the model's parameters
        that require grad; see ``trainable_parameters``)."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p

    def meta_step(self, tasks: Sequence[Task], *, grad_hook: Any = None) -> MetaStepResult:
        """One meta-update over ``tasks``.

        Args:
            tasks: the meta-batch (a sequence, or any iterable such as a generator, which is
                read once). It may be empty only with a ``grad_hook`` (a process whose
                share of a distributed meta-batch is empty still joins the all-reduce); the
                result then has ``num_tasks=0`` and NaN losses.
            grad_hook: optional ``grad_hook(learner, result)`` run after ``meta_backward`` and
                before the optimizer step, e.g. an all-reduce of ``.grad`` across processes;
                ``result`` is this process's ``MetaStepResult`` (its ``num_tasks -
                skipped_tasks`` tasks contributed to ``.grad``).

        Raises:
            NonFiniteError: a task's loss is NaN or inf (``on_nonfinite="raise"``), a
                meta-gradient holds NaN or inf (checked after ``grad_hook``), or the
                meta-optimizer's step made a meta-parameter or its state non-finite (its lr or
                eps; ``where="meta_update"``, raised whatever ``on_nonfinite`` says, since
                skipping tasks cannot avoid it). One fused reduction checks the step
                (``metazoo.checked_step``'s check); without a ``grad_hook`` it is read in the
                same host transfer as the tasks' fault flags and means, after the step, which
                is undone when a task turns out faulty (one transfer per meta-step; with a hook,
                two). On failure the meta-parameters and the optimizer state are restored to
                their values before the step.
        """
        if isinstance(tasks, Task):
            raise ValueError("meta_step expects a sequence of tasks, got a single Task; pass "
                             "[task]")
        tasks = check_tasks(tasks, allow_empty=True)  # a generator is read once
        if not tasks and grad_hook is None:
            raise ValueError("meta_step needs at least one task")
        start = time.perf_counter()
        self.meta_optimizer.zero_grad(set_to_none=True)
        nan = float("nan")
        if grad_hook is None:
            # One host transfer for the whole meta-step: the meta-batch's fault flags and means
            # are read with the step's finite check, after the step (undone on a fault).
            result = _step_then_read(self.meta_optimizer, self.named_meta_parameters(),
                                     self._deferred_meta_backward(tasks))
        else:
            # The hook (an all-reduce) needs the counts of kept tasks first: two transfers.
            result = (self.meta_backward(tasks) if tasks
                      else MetaStepResult(nan, nan, None, (), 0, 0.0))
            grad_hook(self, result)
            checked_step(self.meta_optimizer, self.named_meta_parameters())
        return MetaStepResult(result.meta_loss, result.inner_loss, result.accuracy,
                              result.inner_losses, result.num_tasks,
                              time.perf_counter() - start, result.skipped_tasks)

    def _deferred_meta_backward(self, tasks: Sequence[Task]) -> DeferredRead[MetaStepResult]:
        """``meta_backward`` with its host read left to ``meta_step``.

        Called with every ``.grad`` of the meta-parameters ``None`` (``meta_step`` zeroes them
        first). The meta-gradient is in ``.grad`` when it returns, written without reading
        anything from the device, and the read's ``finish`` turns the values into the result:
        it raises a faulty task's ``NonFiniteError`` (``.grad`` then as ``meta_backward`` leaves
        it when it raises) and, when no task is kept, sets every ``.grad`` back to ``None``.
        Learners whose ``meta_backward`` can work that way override it; the default reads at
        once.
        """
        return DeferredRead.ready(self.meta_backward(tasks))

    def state_dict(self) -> dict[str, Any]:
        """Model and meta-optimizer state; tensors and plain containers only."""
        return {"model": self.model.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``; mismatched keys raise with their names."""
        missing = sorted({"model", "meta_optimizer"} - set(state))
        if missing:
            raise ValueError(f"state dict lacks {missing}; was it written by "
                             f"{type(self).__name__}.state_dict()?")
        result = self.model.load_state_dict(state["model"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"checkpoint does not fit this model: missing "
                             f"{result.missing_keys}, unexpected {result.unexpected_keys}")
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
