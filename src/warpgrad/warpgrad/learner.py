"""WarpGrad behind the core ``metazoo.MetaLearner`` interface.

Experiments drive every algorithm through ``adapt`` / ``meta_step`` / ``evaluate``. Here
adaptation is functional (``metazoo.forward`` with explicit parameters, the inner step of
``OptimizerParameters.inner_optimizer``), starting from the meta-learned initialisation with the
warp layers fixed; ``meta_backward`` records each task's trajectory in the ``Warp``'s replay
buffer and accumulates the meta-gradients of all groups (warp layers: mean warp objective over
every replayed state; initialisation: the init objective averaged over tasks; learning rates
and momenta when learned) with ``DualUpdater.accumulate``. One meta-optimizer step then updates
every group; the update rules are documented in ``warpgrad.objectives``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

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
    """

    def __init__(self, warp: Warp, *, inner_steps: int,
                 meta_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                 | None = None, meta_lr: float = 1e-3, bn_mode: str = "batch",
                 on_nonfinite: str = "raise", channels_last: bool = False) -> None:
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

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts the initialisation to ``task`` with the warp layers fixed."""
        return self._adapt(self._layout(task), self.inner_steps if steps is None else steps,
                           None)[0]

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
        per_task = []
        try:
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
        per_task = []
        for task in tasks:
            task = self._layout(task)
            adapted = self._adapt(task, self.inner_steps if steps is None else steps, None)[0]
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
