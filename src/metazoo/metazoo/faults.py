"""Numerical faults and bad batches: detection with few host synchronisations, clear errors.

A NaN or infinite loss in one task of a meta-batch must neither reach the meta-parameters nor
be silently averaged away. Learners check every task's inner losses and query loss with ONE
host transfer per meta-batch (``TaskFaults``: per-task flags stay on the device, each task's
gradient is masked by its flag, the flags are read once at the end) and either raise
``NonFiniteError`` naming the first such task and the inner step where the fault first
appeared (``task_fault``), or (``on_nonfinite="skip"``) leave the task out of the mean and
count it in ``MetaStepResult.skipped_tasks``. ``MetaLearner.meta_step``
checks its meta-optimizer step as ``checked_step`` does: one fused reduction (``all_finite``)
over the meta-gradients, the stepped meta-parameters and the optimizer state; if any is
non-finite the step is undone (parameters and state restored, ``UndoableStep``) and
``NonFiniteError`` names them. It reads that check in the same host transfer as the tasks'
fault flags (one per meta-step), after the step, which a faulty task then undoes. A
non-finite meta-update (an lr of NaN or inf, Adam's ``eps=0`` on a zero gradient) is not a task
fault: ``on_nonfinite="skip"`` cannot drop a task to avoid it, so it always raises.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from metazoo.deferred import DeferredRead

__all__ = ["NONFINITE_MODES", "CheckedCriterion", "NonFiniteError", "TaskFaults", "UndoableStep",
           "all_finite", "check_on_nonfinite", "checked_step", "task_fault"]

NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or meta-gradient.

    Attributes:
        task: index of the task within the meta-batch, ``None`` when not attributable to one.
        inner_step: inner step whose support loss was first non-finite (``where="inner"``);
            ``None`` otherwise.
        where: ``"inner"`` (support loss), ``"query"`` (query loss / meta-objective),
            ``"meta_gradient"`` (the accumulated meta-gradient, after any gradient hook),
            ``"meta_update"`` (the meta-optimizer's step made meta-parameters or its own state
            non-finite from finite gradients: its lr or eps), ``"meta_parameters"`` (they were
            already non-finite before the step, e.g. loaded so), ``"trajectory"`` (a task's
            recorded path, in the reference-style APIs that see no losses; ``inner_step`` is
            the first non-finite point or segment) or ``"other_rank"`` (distributed: another process
            stopped on a non-finite loss; its own error names the task).
        meta_step: the meta-step number, filled in by the experiment loop (``None`` until then).
        names: for ``where="meta_gradient"``, the meta-parameters with non-finite gradients; for
            ``"meta_update"``, those the step made non-finite (value or optimizer state).
        then: what the raising object did about the fault and how to continue (appended to the
            message; empty when the general advice says it all).
    """

    def __init__(self, *, task: int | None, inner_step: int | None, where: str,
                 meta_step: int | None = None, names: Sequence[str] = (), then: str = "") -> None:
        self.task, self.inner_step, self.where = task, inner_step, where
        self.meta_step, self.names, self.then = meta_step, tuple(names), then
        super().__init__(self._message() + (f". {then}" if then else ""))

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
        elif self.where == "trajectory":
            what = (f"non-finite values in the task's adaptation trajectory, first at its "
                    f"point or segment {self.inner_step} (a NaN/inf batch, loss or learning rate "
                    f"in that task's inner loop)")
        elif self.where == "meta_parameters":
            return (f"the meta-parameters {_shown(self.names)} (or their optimizer state) were "
                    f"already non-finite before the meta-optimizer step"
                    f"{' (' + ', '.join(at) + ')' if at else ''}; they were left as they were. "
                    f"Load a checkpoint with finite weights or initialise the model again")
        elif self.where == "meta_update":
            # Not a task fault: skipping tasks cannot help, so the advice differs.
            return (f"the meta-optimizer step made {_shown(self.names)} (or their optimizer state) "
                    f"non-finite from finite meta-gradients"
                    f"{' (' + ', '.join(at) + ')' if at else ''}; the meta-parameters and the "
                    f"optimizer state were restored to their values before the step. Check the "
                    f"meta-optimizer's hyperparameters: the learning rate must be finite and "
                    f"positive (nan or inf does this), and Adam's eps must be > 0 (eps=0 "
                    f"divides 0 by 0 where a gradient is zero)")
        else:
            what = f"non-finite meta-gradient of {_shown(self.names)}"
        return (f"{what}{' (' + ', '.join(at) + ')' if at else ''}; the meta-parameters were "
                f"not updated. Check that task's data and lower the learning rates, or pass "
                f"on_nonfinite='skip' to leave such tasks out of the meta-step")

    def with_meta_step(self, meta_step: int) -> NonFiniteError:
        """A copy that also names the meta-step (for experiment loops that re-raise)."""
        return NonFiniteError(task=self.task, inner_step=self.inner_step, where=self.where,
                              meta_step=meta_step, names=self.names, then=self.then)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor: pickle through a helper so errors cross process borders.
        return (_rebuild, (self.task, self.inner_step, self.where, self.meta_step, self.names,
                           self.then))


def _shown(names: Sequence[str], limit: int = 6) -> str:
    """``names`` as a list, the first ``limit`` of a long one (every name stays in ``.names``)."""
    if len(names) <= limit:
        return str(list(names))
    return f"{str(list(names[:limit]))[:-1]}, ... {len(names) - limit} more]"


def _rebuild(task: int | None, inner_step: int | None, where: str, meta_step: int | None,
             names: Sequence[str], then: str = "") -> NonFiniteError:
    return NonFiniteError(task=task, inner_step=inner_step, where=where, meta_step=meta_step,
                          names=names, then=then)


def check_on_nonfinite(value: Any) -> str:
    """Validates a learner's ``on_nonfinite`` option."""
    if value not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {list(NONFINITE_MODES)}, got {value!r}; "
                         f"'raise' stops at the first non-finite loss, 'skip' drops the task")
    return str(value)


def task_fault(task: int, inner_losses: Tensor, query_loss: Tensor | None) -> NonFiniteError | None:
    """The fault of one task, if any, with one host synchronisation (loops: ``TaskFaults``).

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


class TaskFaults:
    """The task fault checks of a per-task loop with one host transfer per meta-batch.

    ``check`` keeps a task's finiteness as a flag on the device (no synchronisation) and
    returns the mask its contribution to the meta-gradient is multiplied in by (``masked``,
    ``torch.where``: a NaN times 0 would still be NaN); ``resolve`` reads all flags with one
    transfer, raises the first task's ``NonFiniteError`` in ``"raise"`` mode and returns the
    indices of the kept tasks. In ``"raise"`` mode the mask of a task is also off after the
    first faulty one, so what reaches ``.grad`` before the error is raised is exactly what the
    check-before-backward loop accumulated: the tasks before the faulty one.

    Args:
        on_nonfinite: ``"raise"`` or ``"skip"``.
    """

    def __init__(self, on_nonfinite: str) -> None:
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self._losses: list[tuple[Tensor, Tensor | None]] = []
        self._flags: list[Tensor] = []
        self._all_so_far: Tensor | None = None

    def check(self, inner_losses: Tensor, query_loss: Tensor | None) -> Tensor:
        """Records the next task's losses; returns its mask (a 0-dim bool tensor)."""
        losses = inner_losses.detach().reshape(-1)
        if query_loss is not None:
            query = query_loss.detach().reshape(1)
            losses = torch.cat([losses.to(device=query.device, dtype=query.dtype), query])
        finite = torch.isfinite(losses).all()
        self._losses.append((inner_losses.detach(),
                             None if query_loss is None else query_loss.detach()))
        self._flags.append(finite)
        if self.on_nonfinite == "skip":
            return finite
        self._all_so_far = finite if self._all_so_far is None else self._all_so_far & finite
        return self._all_so_far

    @staticmethod
    def masked(mask: Tensor, tensor: Tensor) -> Tensor:
        """``tensor`` where ``mask`` holds, else zeros."""
        return torch.where(mask.to(tensor.device), tensor, 0.0)

    def resolve(self) -> list[int]:
        """The indices of the finite tasks, with one host transfer for all of them.

        Raises:
            NonFiniteError: in ``"raise"`` mode, for the first non-finite task (its first
                non-finite inner step, or the query), as ``task_fault`` names it.
        """
        return self.resolve_with(None)[0]

    def resolve_with(self, values: Tensor | None) -> tuple[list[int], list[float]]:
        """``resolve``, reading ``values`` in the same host transfer as the flags.

        The loop learners read their reported means with it (``metazoo.resolve_and_mean``), so
        a meta-batch costs one transfer, not two.

        Args:
            values: a 1-D floating-point tensor (or ``None``); read however the flags turn out.

        Returns:
            The indices of the finite tasks and ``values`` as a list of floats (empty for
            ``None``), bit for bit what ``values.tolist()`` gives.

        Raises:
            NonFiniteError: as ``resolve``.
        """
        return self.deferred_resolve(values).read()

    def deferred_resolve(self, values: Tensor | None
                         ) -> DeferredRead[tuple[list[int], list[float]]]:
        """``resolve_with`` with its host transfer left to the caller (``DeferredRead``), who
        may read it together with other values (``MetaLearner.meta_step``)."""
        if not self._flags:
            return DeferredRead(values, lambda read: ([], read))
        return _read_flags_with(self.flags(), values, self.kept_from)

    def flags(self) -> Tensor:
        """Each task's flag so far (1-D bool, on the first task's device; no transfer)."""
        if not self._flags:
            return torch.zeros(0, dtype=torch.bool)
        return torch.stack([flag.to(self._flags[0].device) for flag in self._flags])

    def kept_from(self, flags: Sequence[float]) -> list[int]:
        """The indices of the finite tasks, from ``flags()`` read on the host.

        Raises:
            NonFiniteError: as ``resolve``.
        """
        return _kept_tasks(flags, self.on_nonfinite, lambda index: self._losses[index])

    def kept_count(self) -> Tensor:
        """The number of finite tasks so far, on the device (no transfer; 0 without tasks)."""
        return self.flags().sum()


def _kept_tasks(flags: Sequence[float | bool], on_nonfinite: str,
                losses_of: Callable[[int], tuple[Tensor, Tensor | None]]) -> list[int]:
    """The indices of the finite tasks, from their flags read on the host; in ``"raise"`` mode
    the first non-finite task's ``NonFiniteError`` (``task_fault`` of ``losses_of(task)``: its
    inner losses and query loss)."""
    finite = [flag != 0 for flag in flags]
    if on_nonfinite == "raise" and not all(finite):
        first = finite.index(False)
        fault = task_fault(first, *losses_of(first))  # the error path: syncs are fine
        assert fault is not None
        raise fault
    return [index for index, ok in enumerate(finite) if ok]


def _read_flags_with(flags: Tensor, values: Tensor | None,
                     kept_from: Callable[[list[float]], list[int]]
                     ) -> DeferredRead[tuple[list[int], list[float]]]:
    """Per-task finiteness ``flags`` (1-D, on the device) and ``values`` (1-D, floating point,
    or ``None``) read later in one host transfer: the kept tasks (``kept_from`` of the flags
    read) and ``values`` as floats, bit for bit what ``values.tolist()`` gives."""
    count = flags.numel()
    if values is None:
        row = flags.reshape(-1).to(torch.float32)
    else:
        # 0 and 1 are exact in every floating-point dtype, and concatenation copies the
        # values unchanged: one transfer returns both.
        row = torch.cat([flags.reshape(-1).to(device=values.device, dtype=values.dtype),
                         values.reshape(-1)])
    return DeferredRead(row, lambda read: (kept_from(read[:count]), read[count:]))


def _finite_flags(tensors: Sequence[Tensor]) -> dict[torch.device, Tensor]:
    """One 0-dim bool flag per device: whether every entry of its tensors is finite (no
    transfer: the flags stay where their tensors are)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach())
    flags = {}
    for device, group in by_device.items():
        # 0 * x is 0 for finite x and NaN for NaN or inf, and cannot overflow, so each L1 norm
        # of the products is finite exactly when its tensor is (a norm of x itself would report
        # large finite gradients as inf). Two multi-tensor kernels instead of two per tensor.
        norms = torch._foreach_norm(torch._foreach_mul(group, 0.0), 1)
        flags[device] = torch.stack([n.to(norms[0].dtype) for n in norms]).isfinite().all()
    return flags


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every floating-point tensor is finite: fused reductions, one host
    transfer per device (tensors on the CPU, such as Adam's step counts, cost none)."""
    return all(bool(flag) for flag in _finite_flags(tensors).values())


def _state_tensors(state: dict[str, Any]) -> list[Tensor]:
    return [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    # Tensors are cloned (deepcopy costs 5x more); anything else is copied deeply.
    return {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _finite(tensors: Iterable[Tensor]) -> bool:
    """Per-tensor check for the error path only (one transfer per tensor)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class UndoableStep:
    """One ``optimizer.step()`` that can be checked and undone: the parts of ``checked_step``.

    ``MetaLearner.meta_step`` uses them to read the step's finite check in the same host
    transfer as the meta-batch's fault flags and means (``read_after_step``); ``checked_step``
    is ``step``, ``all_finite(checked())`` and ``fail``.

    Args:
        optimizer: a ``torch.optim`` optimizer whose gradients are in ``.grad``.
        named_parameters: ``(name, tensor)`` pairs naming the parameters in errors.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]] = ()) -> None:
        names = {id(p): n for n, p in named_parameters}
        self.optimizer = optimizer
        self.stepped = [(names.get(id(p), f"param_groups[{i}][{j}]"), p)
                        for i, group in enumerate(optimizer.param_groups)
                        for j, p in enumerate(group["params"]) if p.grad is not None]
        self._values = [p.detach().clone() for _, p in self.stepped]
        self._states = [_copy_state(optimizer.state[p]) if p in optimizer.state else None
                        for _, p in self.stepped]

    def step(self) -> None:
        """``optimizer.step()``; an overflowing hyperparameter is restored and raised."""
        try:
            self.optimizer.step()
        except RuntimeError as error:
            # torch refuses a hyperparameter that does not fit the parameters' dtype (lr=1e300
            # on float32: "value cannot be converted to type float without overflow"): the same
            # fault as an update that overflows to inf, so the same restore and the same error.
            if "overflow" not in str(error):
                raise
            self.undo()
            raise NonFiniteError(task=None, inner_step=None, where="meta_update",
                                 names=[n for n, _ in self.stepped]) from None

    def checked(self) -> list[Tensor]:
        """What the check covers: the stepped parameters, their gradients and their
        floating-point optimizer state."""
        state = self.optimizer.state
        return [t for _, p in self.stepped
                for t in (p.grad, p, *_state_tensors(state.get(p, {}))) if t is not None]

    def undo(self, *, keep_grads: bool = False) -> None:
        """Puts parameters and optimizer state back as they were before the step; their
        gradients are set to ``None`` unless ``keep_grads``."""
        with torch.no_grad():
            for (_, p), before, state in zip(self.stepped, self._values, self._states,
                                             strict=True):
                p.copy_(before)
                if state is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.optimizer.state[p] = state
                if not keep_grads:
                    p.grad = None

    def fail(self) -> None:
        """The error path of a failed check: finds the culprits (syncs are fine here), undoes
        the step and raises ``NonFiniteError``."""
        state = self.optimizer.state
        stepped = self.stepped
        bad_grads = [n for n, p in stepped if p.grad is not None and not _finite([p.grad])]
        bad_values = [n for n, p in stepped
                      if not _finite([p, *_state_tensors(state.get(p, {}))])]
        already = [n for (n, _), before, saved in zip(stepped, self._values, self._states,
                                                      strict=True)
                   if not _finite([before, *_state_tensors(saved or {})])]
        self.undo()
        if bad_grads:
            raise NonFiniteError(task=None, inner_step=None, where="meta_gradient",
                                 names=bad_grads)
        if already:
            raise NonFiniteError(task=None, inner_step=None, where="meta_parameters",
                                 names=already)
        raise NonFiniteError(task=None, inner_step=None, where="meta_update", names=bad_values)

    def read_after_step(self, values: Tensor | None) -> tuple[bool, list[float]]:
        """The step's finite check and ``values`` (1-D, floating point) in one host transfer.

        Returns:
            Whether the check passed, and ``values`` as a list of floats (bit for bit what
            ``values.tolist()`` gives; empty for ``None``).
        """
        flags = _finite_flags(self.checked())
        # One transfer from the accelerator; flags on the CPU are read where they are.
        accelerators = [where for where in flags if where.type != "cpu"]
        device = (values.device if values is not None else
                  accelerators[0] if accelerators else torch.device("cpu"))
        ok = True
        row = []
        for where, flag in flags.items():
            if where == device:
                row.append(flag.reshape(1))
            elif where.type == "cpu":
                ok = ok and bool(flag)  # on the host already: no device synchronisation
            else:
                row.append(flag.reshape(1).to(device))
        dtype = values.dtype if values is not None else torch.float32
        if values is not None:
            row.append(values.reshape(-1))
        if not row:
            return ok, []
        # 0 and 1 are exact in every floating-point dtype, and concatenation copies the values
        # unchanged: one transfer returns both.
        read = torch.cat([r.to(dtype) for r in row]).tolist()
        count = len(row) - (values is not None)
        return ok and all(v != 0 for v in read[:count]), read[count:]


def checked_step(optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]] = ()) -> None:
    """``optimizer.step()``, undone and reported if anything it touches is not finite.

    The one place every meta-update goes through (``MetaLearner.meta_step``; with the
    reference-style APIs call it in ``meta_step_fn`` instead of ``meta_optimizer.step()``).
    The parameters that have a gradient (the only ones ``torch.optim`` optimizers step) and
    their optimizer state are copied first; after the step their gradients, values and
    floating-point state are checked with one fused reduction (one host transfer). If any entry
    is NaN or infinite, values and state are restored to their copies, the gradients are set to
    ``None`` and ``NonFiniteError`` is raised: ``where="meta_gradient"`` when a gradient was
    non-finite, else ``where="meta_update"`` (the optimizer's own fault: its lr or eps).

    Args:
        optimizer: a ``torch.optim`` optimizer whose gradients are in ``.grad``.
        named_parameters: ``(name, tensor)`` pairs naming the parameters in the error (e.g.
            ``learner.named_meta_parameters()``); others are named ``param_groups[i][j]``.

    Raises:
        NonFiniteError: as above; the parameters and the optimizer state are unchanged.
    """
    step = UndoableStep(optimizer, named_parameters)
    step.step()
    if not all_finite(step.checked()):
        step.fail()


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
        _check_broadcast(output, target)
        try:
            return self.criterion(output, target)
        except (IndexError, RuntimeError, ValueError) as error:
            problem = _diagnose(output, target)
            if problem is None:
                raise
            raise ValueError(problem) from error

    def __repr__(self) -> str:
        return f"CheckedCriterion({self.criterion!r})"


def _check_broadcast(output: Tensor, target: Tensor) -> None:
    """Refuses a target that broadcasts against the output to another shape (shapes only).

    A regression target of shape ``(N,)`` against an output ``(N, 1)`` broadcasts to
    ``(N, N)``: an element-wise loss then compares every output with every target and trains
    on the wrong loss, with only a warning from PyTorch. Refused: broadcasting to more elements
    than either holds. Class labels ``(N,)`` against logits ``(N, C)`` do not broadcast (or
    broadcast to the logits' own shape), and ``()`` against ``(1,)`` keeps one element: both
    pass.
    """
    if output.shape == target.shape:
        return
    try:
        shape = torch.broadcast_shapes(output.shape, target.shape)
    except RuntimeError:
        return
    if math.prod(shape) > max(output.numel(), target.numel()):
        raise ValueError(f"the target's shape {tuple(target.shape)} broadcasts against the "
                         f"output's shape {tuple(output.shape)} to {tuple(shape)}, so the loss "
                         f"would compare every output with every target; reshape the targets "
                         f"to {tuple(output.shape)} (e.g. y.view(-1, 1)) or the output")


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
