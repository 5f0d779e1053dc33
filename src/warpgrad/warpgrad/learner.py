"""WarpGrad behind the core ``metazoo.MetaLearner`` interface.

Experiments drive every algorithm through ``adapt`` / ``meta_step`` / ``evaluate``. Here
adaptation is functional (``metazoo.forward`` with explicit parameters, the inner step of
``OptimizerParameters.inner_optimizer``), starting from the meta-learned initialisation with the
warp layers fixed; ``meta_backward`` records each task's trajectory in the ``Warp``'s replay
buffer and accumulates the meta-gradients of all groups (warp layers: mean warp objective over
every replayed state; initialisation: the init objective averaged over tasks; learning rates
and momenta when learned) with ``DualUpdater.accumulate``. One meta-optimizer step then updates
every group; the update rules are documented in ``warpgrad.objectives``.

With ``vectorize``, the adaptation of the tasks is mapped over tasks (``warpgrad.vectorized``)
and recorded into the buffer exactly as the loop records it (same states, same order), and the
replay evaluates the states of several tasks in one ``torch.func.vmap``
(``DualUpdater.accumulate(vectorize=...)``); the meta-gradients equal the loop's.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import metazoo
from metazoo import (
    Adapted,
    BatchNormMode,
    CheckedCriterion,
    EvalResult,
    MetaLearner,
    MetaStepResult,
    Params,
    Task,
    accuracy,
    check_channels_last,
    check_on_nonfinite,
    forward,
    initial_buffers,
    mean_results,
    params_to_channels_last,
    task_fault,
    task_to_channels_last,
)
from warpgrad.updaters import DualUpdater
from warpgrad.vectorized import StackedAdaptation, adapt_tasks
from warpgrad.warp import Warp

__all__ = ["WarpGrad"]


class WarpGrad(MetaLearner):
    """WarpGrad (Algorithm 2) as a ``MetaLearner``.

    Args:
        warp: the wrapped model; its updater must be a ``DualUpdater`` (its criterion, warp and
            init objectives are used; ``bsz``/``epochs``/``init_lr`` are not: one meta-step
            updates every group with the gradient of the mean objective).
        inner_steps: adaptation steps per task; step k trains on ``support[k % len(support)]``.
        meta_optimizer: builds the meta-optimizer from the meta-parameters (default
            ``torch.optim.Adam(params, lr=meta_lr)``).
        meta_lr: learning rate of the default meta-optimizer.
        bn_mode: ``metazoo.BatchNormMode`` of adaptation and evaluation.
        on_nonfinite: ``"raise"`` (default) stops with ``metazoo.NonFiniteError`` naming the task
            and inner step of the first NaN/inf loss; ``"skip"`` drops such tasks' trajectories
            from the replay buffer (out of the meta-gradient and the means) and counts them in
            ``skipped_tasks``.
        channels_last: adapt, record, replay and score in channels-last memory format: per
            task, 4-D floating-point inputs and the 4-D initialisation and warp-layer tensors
            used for adaptation are copied to ``torch.channels_last`` (the model is not
            modified; the replay then runs channels-last too). On a CPU the Omniglot warp net's
            meta-step is ~0.65x the time of the default layout; results equal up to rounding.
        vectorize: ``False`` (default) adapts the tasks one by one; ``True`` adapts all tasks of
            a meta-batch (``meta_backward``, ``evaluate``) in one ``torch.func.vmap`` and
            replays the states of all of them in one ``vmap``; an int N maps N tasks at a time
            and replays the states of N tasks at a time (memory bounded in the number of
            tasks); ``"auto"`` vectorizes on CUDA and loops elsewhere (on CPUs the loop was
            measured faster, ``benchmarks/gpu_warp_meta_step.py``). The same results as the
            loop (same recorded states, replay and meta-gradients). Needs tasks whose batches
            share shapes, ``channels_last=False`` and a ``DualUpdater`` with ``bn_mode="batch"``
            (the vectorized replay normalises with batch statistics); otherwise ``ValueError``.
            ``adapt(task)`` (one task) always runs the loop.
    """

    def __init__(self, warp: Warp, *, inner_steps: int,
                 meta_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                 | None = None, meta_lr: float = 1e-3, bn_mode: str = "batch",
                 on_nonfinite: str = "raise", channels_last: bool = False,
                 vectorize: bool | int | str = False) -> None:
        if not isinstance(warp, Warp):
            raise ValueError(f"warp must be a warpgrad.Warp, got {type(warp).__name__}")
        if not isinstance(warp.updater, DualUpdater):
            raise ValueError(f"warp.updater must be a DualUpdater for WarpGrad, got "
                             f"{type(warp.updater).__name__}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r} must be a positive integer; use at "
                             "least one adaptation step")
        if isinstance(meta_lr, bool) or not isinstance(meta_lr, (int, float)) or not (
                0 < meta_lr < math.inf):
            raise ValueError(f"meta_lr={meta_lr!r} must be a finite positive number, e.g. 1e-3")
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.channels_last = check_channels_last(channels_last)
        self.vectorize = metazoo.vectorize.check_vectorize(vectorize)
        if self.vectorize is not False:
            for option, value, alternative in (
                    ("channels_last", channels_last, "channels_last=False"),
                    (f"the updater's bn_mode={warp.updater.bn_mode!r}",
                     BatchNormMode(warp.updater.bn_mode) is not BatchNormMode.BATCH,
                     "DualUpdater(bn_mode='batch')")):
                if value:
                    raise ValueError(f"vectorize={vectorize!r} does not support {option}; pass "
                                     f"{alternative}, or vectorize=False to keep {option} in the "
                                     f"per-task loop")
        self.warp = warp
        self.updater: DualUpdater = warp.updater
        self.model = warp.model
        self.inner_steps = inner_steps
        self.bn_mode = BatchNormMode(bn_mode).value
        params = [p for _, p in self.named_meta_parameters()]
        self.meta_optimizer = (meta_optimizer(params) if meta_optimizer is not None
                               else torch.optim.Adam(params, lr=meta_lr))

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Warp layers, initialisation and (when learned) inner learning rates/momenta."""
        return self.warp.named_meta_parameters(include_init=True)

    def _layout(self, task: Task) -> Task:
        return task_to_channels_last(task) if self.channels_last else task

    def _in_layout(self, params: Params) -> Params:
        return params_to_channels_last(params) if self.channels_last else params

    def _adapt(self, task: Task, steps: int, slot: str | None) -> tuple[Adapted, Params]:
        """Adapts to ``task`` (already in the learner's layout, see ``_layout``)."""
        # Labels outside the model's classes fail with a message instead of torch's IndexError.
        criterion = CheckedCriterion(self.updater.criterion)
        ctx = self.warp.replay_context(criterion, bn_mode=self.bn_mode)
        fixed = self._in_layout({**ctx.static, **{n: w.detach() for n, w in ctx.warp.items()}})
        theta = {n: p.detach().clone() for n, p in self.warp.named_init_parameters()}
        theta = self._in_layout(theta)
        optimizer = self.warp.optimizer_parameter_container.inner_optimizer(detach=True)
        state = optimizer.init(theta)
        buffers = initial_buffers(self.model, self.bn_mode)
        losses = []
        for k in range(steps):
            x, y = ctx.batch(task.support[k % len(task.support)])
            if slot is not None:
                momentum = state.get("momentum_buffer") if state["step"] > 0 else None
                self.warp.buffer.update(slot, theta, momentum)
            leaves = {n: t.requires_grad_(True) for n, t in theta.items()}
            output, buffers = forward(self.model, {**fixed, **leaves}, buffers, x,
                                      bn_mode=self.bn_mode, training=True)
            loss = criterion(output, y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            losses.append(loss.detach())
            with torch.no_grad():
                theta, state = optimizer.step({n: t.detach() for n, t in leaves.items()},
                                              dict(zip(leaves, grads, strict=True)), state)
        if slot is not None:
            self.warp.buffer.finalize(slot, theta)
        adapted = Adapted({**fixed, **theta}, buffers,
                          tuple(torch.stack(losses).tolist()) if losses else ())
        return adapted, theta

    def _chunk(self, num_tasks: int) -> int | None:
        device = next(iter(self.warp.init_parameters())).device
        return metazoo.vectorize.resolve_chunk(self.vectorize, num_tasks, device)

    def _adapt_vectorized(self, tasks: Sequence[Task], steps: int, chunk: int
                          ) -> tuple[StackedAdaptation, Params]:
        """Every task's adaptation in ``vmap`` (``warpgrad.vectorized``); also returns the fixed
        parameters (warp layers and frozen ones)."""
        criterion = CheckedCriterion(self.updater.criterion)
        ctx = self.warp.replay_context(criterion, bn_mode=self.bn_mode)
        fixed = {**ctx.static, **{n: w.detach() for n, w in ctx.warp.items()}}
        init = {n: p.detach() for n, p in self.warp.named_init_parameters()}
        optimizer = self.warp.optimizer_parameter_container.inner_optimizer(detach=True)
        return adapt_tasks(self.model, criterion, fixed, init, optimizer, tasks, steps,
                           bn_mode=self.bn_mode, device=ctx.device, chunk=chunk), fixed

    def _record(self, adaptation: StackedAdaptation, tasks: Sequence[Task]) -> None:
        """Records every task's trajectory into the buffer as the loop does: task by task,
        ``init``, one ``update`` per step (momentum from the second step on), ``finalize``."""
        buffer = self.warp.buffer
        # One transfer per tensor to where the buffer keeps states, not one per state.
        where = buffer.device if buffer.inmem and buffer.device is not None else None
        trajectory = {n: t.to(where) if where is not None else t
                      for n, t in adaptation.trajectory.items()}
        momentum = {n: t.to(where) if where is not None else t
                    for n, t in adaptation.momentum.items()}
        for index, task in enumerate(tasks):
            slot = uuid.uuid4().hex
            buffer.init(slot, task.support)
            for k in range(self.inner_steps):
                buffer.update(slot, {n: t[index, k] for n, t in trajectory.items()},
                              {n: t[index, k - 1] for n, t in momentum.items()}
                              if k > 0 and momentum else None)
            buffer.finalize(slot, {n: t[index, -1] for n, t in trajectory.items()})

    def _meta_backward_loop(self, tasks: Sequence[Task]
                            ) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """Adapts to the tasks one by one while recording, then accumulates the meta-gradients;
        returns the kept tasks' (query loss, accuracy, inner losses)."""
        buffer = self.warp.buffer
        per_task = []
        for index, task in enumerate(tasks):
            task = self._layout(task)  # the buffer then replays channels-last batches
            slot = uuid.uuid4().hex
            buffer.init(slot, task.support)
            adapted, _ = self._adapt(task, self.inner_steps, slot)
            loss, acc = self._score(adapted, task)
            inner = torch.tensor(adapted.inner_losses, dtype=loss.dtype, device=loss.device)
            fault = task_fault(index, inner, loss)
            if fault is not None:
                if self.on_nonfinite == "raise":
                    raise fault
                # A non-finite trajectory must not be replayed by the warp objective.
                buffer.discard(slot)
                continue
            per_task.append((loss, acc, inner))
        if per_task:
            self.updater.accumulate(self.warp)
        return per_task

    def _meta_backward_vectorized(self, tasks: Sequence[Task], chunk: int
                                  ) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """``_meta_backward_loop`` with the adaptation mapped ``chunk`` tasks at a time and the
        replay over the states of ``chunk`` tasks per ``vmap`` call."""
        adaptation, _ = self._adapt_vectorized(tasks, self.inner_steps, chunk)
        self._record(adaptation, tasks)
        faults = metazoo.vectorize.VectorizedGradients(
            [], adaptation.query_loss, adaptation.inner_losses, None, adaptation.finite)
        kept = metazoo.vectorize.raise_or_count_faults(faults, self.on_nonfinite)
        slots = self.warp.buffer.slots()
        for index in sorted(set(range(len(tasks))) - set(kept)):
            # A non-finite trajectory must not be replayed by the warp objective.
            self.warp.buffer.discard(slots[index])
        if kept:
            # The states of ``chunk`` tasks per vmap call of the replay.
            self.updater.accumulate(self.warp, vectorize=chunk * self.inner_steps)
        acc = adaptation.query_accuracy
        return [(adaptation.query_loss[i], None if acc is None else acc[i],
                 adaptation.inner_losses[i]) for i in kept]

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts the initialisation to ``task`` with the warp layers fixed."""
        return self._adapt(self._layout(task), self._steps(steps), None)[0]

    def _steps(self, steps: int | None) -> int:
        """``steps`` checked as the other learners check it (``None``: the learner's)."""
        if steps is None:
            return self.inner_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}; use at least one step")
        return steps

    def _score(self, adapted: Adapted, task: Task) -> tuple[Tensor, Tensor | None]:
        x, y = (t.to(next(iter(adapted.params.values())).device) for t in task.query)
        with torch.no_grad():
            output, _ = forward(self.model, adapted.params, adapted.buffers, x,
                                bn_mode=self.bn_mode, training=False)
            return CheckedCriterion(self.updater.criterion)(output, y), accuracy(output, y)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Adapts to every task while recording, then accumulates all meta-gradients."""
        start = time.perf_counter()
        buffer = self.warp.buffer
        if len(buffer) or buffer.slots():
            raise RuntimeError("the Warp's replay buffer is not empty; call warp.clear() "
                               "before driving it through the MetaLearner interface")
        chunk = self._chunk(len(tasks))
        try:
            per_task = (self._meta_backward_loop(tasks) if chunk is None
                        else self._meta_backward_vectorized(tasks, chunk))
        finally:
            buffer.clear()
        skipped = len(tasks) - len(per_task)
        if not per_task:
            nan = float("nan")
            return MetaStepResult(nan, nan, None, (), len(tasks), time.perf_counter() - start,
                                  skipped)
        meta_loss, mean_acc, curve = mean_results(per_task)
        return MetaStepResult(meta_loss, curve[-1], mean_acc, curve, len(tasks),
                              time.perf_counter() - start, skipped)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task and scores its query batch; meta-parameters are unchanged."""
        steps = self._steps(steps)
        chunk = self._chunk(len(tasks))
        if chunk is not None:
            adaptation, _ = self._adapt_vectorized(tasks, steps, chunk)
            acc = adaptation.query_accuracy
            mean_loss, mean_acc, curve = mean_results(
                [(adaptation.query_loss[i], None if acc is None else acc[i],
                  adaptation.inner_losses[i]) for i in range(len(tasks))])
            rows = (adaptation.query_loss.tolist(),
                    [None] * len(tasks) if acc is None else acc.tolist())
            return EvalResult(mean_loss, mean_acc, curve, len(tasks), tuple(zip(*rows)))
        per_task = []
        for task in tasks:
            task = self._layout(task)
            adapted = self._adapt(task, steps, None)[0]
            loss, acc = self._score(adapted, task)
            per_task.append((loss, acc, torch.tensor(adapted.inner_losses, dtype=loss.dtype,
                                                     device=loss.device)))
        mean_loss, mean_acc, curve = mean_results(per_task)
        return EvalResult(mean_loss, mean_acc, curve, len(tasks), tuple(
            (float(r[0]), None if r[1] is None else float(r[1])) for r in per_task))

    def state_dict(self) -> dict[str, Any]:
        """Model, initialisation, optimizer parameters and meta-optimizer state."""
        return {"warp": self.warp.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``."""
        missing = sorted({"warp", "meta_optimizer"} - set(state))
        if missing:
            raise ValueError(f"state dict lacks {missing}; was it written by "
                             "WarpGrad.state_dict()?")
        self.warp.load_state_dict(dict(state["warp"]))
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
