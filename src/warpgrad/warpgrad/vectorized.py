"""WarpGrad's adaptation mapped over the tasks of a meta-batch (``metazoo.vectorize``).

Adaptation in WarpGrad is first order: the warp layers are fixed and nothing is differentiated
through the inner loop, so the adaptation of a task is a pure function of its batches. Here it
is ``torch.func.vmap``-ed over tasks (``chunk`` tasks per call): the inner step is the loop's
(``metazoo.forward`` with the warp layers fixed, the gradient with respect to the adaptable
parameters by ``torch.func.grad``, the same SGD rule with the same per-tensor learning rates and
momenta, computed in one operation each: ``inner_optimizer(stacked=True)``). Each state is
gathered into one flat vector (``warpgrad.flat``: one ``cat`` per state; the step itself stays
per parameter tensor, as under ``vmap`` a flat parameter vector would cost a copy of every
gradient and weight in the batching rules). The whole trajectory of every task is returned as
one flat tensor, which ``WarpGrad`` hands to the replay buffer
(``ReplayBuffer.record``) without a copy per state; the buffer then holds the same states, in
the same order, as the loop records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import metazoo
from metazoo import Buffers, Params, Task, accuracy, forward
from warpgrad.flat import FlatLayout

__all__ = ["StackedAdaptation", "adapt_tasks"]


@dataclass(frozen=True)
class StackedAdaptation:
    """Every task's adaptation, each tensor with a leading task dimension ``[T]``.

    Attributes:
        layout: where each adaptable parameter lives in a flat state.
        trajectory: ``[T, K + 1, layout.numel]``, flat: the state before each of the K steps,
            then the adapted parameters.
        momentum: ``[T, K - 1, layout.numel]``, flat: the momentum buffer before steps 1..K-1
            (the loop records none before step 0); ``None`` without momentum.
        buffers: the BatchNorm buffers after adaptation (empty in ``batch`` mode).
        inner_losses: ``[T, K]``, the support loss of each step.
        query_loss: ``[T]``, the loss on the query batch at the adapted parameters.
        query_accuracy: ``[T]``, or ``None`` when the criterion's targets are not class labels.
    """

    layout: FlatLayout
    trajectory: Tensor
    momentum: Tensor | None
    buffers: Buffers
    inner_losses: Tensor
    query_loss: Tensor
    query_accuracy: Tensor | None

    @property
    def adapted(self) -> Params:
        """The adapted parameters by name, each ``[T, ...]`` (views)."""
        return self.layout.unflatten(self.trajectory[:, -1])

    @property
    def finite(self) -> Tensor:
        """Whether each task's inner losses and query loss are finite, ``[T]`` (on device)."""
        return torch.isfinite(self.query_loss) & torch.isfinite(self.inner_losses).all(dim=1)

    def faults(self) -> metazoo.vectorize.VectorizedGradients:
        """The tasks' losses and flags in the form the fault checks of
        ``metazoo.vectorize`` read (no gradients: the replay writes them)."""
        return metazoo.vectorize.VectorizedGradients([], self.query_loss, self.inner_losses,
                                                     None, self.finite)

    def per_task(self, indices: Iterable[int]) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """``(query loss, accuracy, inner losses)`` of the tasks ``indices``."""
        acc = self.query_accuracy
        return [(self.query_loss[i], None if acc is None else acc[i], self.inner_losses[i])
                for i in indices]


def _check_one_shape(tasks: Sequence[Task]) -> None:
    """The replay draws a task's support batches in turn and maps states of several tasks in
    one ``vmap``: every support batch must have the shape of the first."""
    reference = tasks[0].support[0]
    for index, task in enumerate(tasks):
        for k, batch in enumerate(task.support):
            for j, (tensor, first) in enumerate(zip(batch, reference)):
                if tensor.shape != first.shape:
                    raise ValueError(
                        f"vectorize needs support batches of one shape, but task {index} "
                        f"support[{k}][{j}] has shape {tuple(tensor.shape)} and task 0 "
                        f"support[0][{j}] has {tuple(first.shape)}; pass vectorize=False to run "
                        f"such tasks one by one")


def _diagnose(model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor], params: Params,
              buffers: Buffers, tasks: Sequence[Task], *, bn_mode: str, device: torch.device
              ) -> None:
    """Evaluates every batch outside ``vmap`` so the criterion can name a bad one (error path
    only: its ``ValueError`` replaces the batching rule's error)."""
    for task in tasks:
        for x, y in [*task.support, task.query]:
            output, _ = forward(model, params, buffers, x.to(device), bn_mode=bn_mode,
                                training=True)
            criterion(output, y.to(device))


def adapt_tasks(model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor],
                fixed: Params, init: Params, optimizer: metazoo.InnerOptimizer,
                tasks: Sequence[Task], steps: int, *, bn_mode: str, device: torch.device,
                chunk: int, layout: FlatLayout) -> StackedAdaptation:
    """Adapts ``init`` to every task with ``fixed`` (warp layers, frozen parameters) constant.

    Args:
        model: the network, called through ``metazoo.forward``.
        criterion: ``criterion(output, target) -> scalar loss``.
        fixed: every parameter that is not adapted (detached).
        init: the initialisation of the adaptable parameters (detached).
        optimizer: the inner optimizer (detached hyperparameters).
        tasks: tasks of one shape (``metazoo.vectorize.stack_tasks``).
        steps: inner steps; step k trains on ``support[k % len(support)]``.
        bn_mode: ``metazoo.BatchNormMode`` of adaptation and scoring.
        device: where the batches are moved.
        chunk: tasks per ``vmap`` call.
        layout: the flat layout of the recorded states (``FlatLayout.of(init)``).
    """
    _check_one_shape(tasks)
    support, query = metazoo.vectorize.stack_tasks(tasks)
    support = [(x.to(device), y.to(device)) for x, y in support]
    query = (query[0].to(device), query[1].to(device))
    # In batch mode no statistics are used or updated: the model's buffers as they are (a copy
    # per buffer, as ``initial_buffers`` makes, is only needed for per-task statistics).
    start_buffers = (metazoo.initial_buffers(model, bn_mode)
                     if metazoo.BatchNormMode(bn_mode) is not metazoo.BatchNormMode.BATCH
                     else {n: b.detach() for n, b in model.named_buffers()})
    has_accuracy: list[bool] = []
    has_momentum: list[bool] = []

    def one_task(support: list[tuple[Tensor, Tensor]], query: tuple[Tensor, Tensor]
                 ) -> tuple[Tensor, Tensor, Buffers, Tensor, Tensor, Tensor]:
        theta = dict(init)
        state = optimizer.init(theta)
        buffers = dict(start_buffers)
        trajectory, momenta, losses = [], [], []
        for k in range(steps):
            x, y = support[k % len(support)]
            trajectory.append(layout.flatten(theta))
            if k > 0 and "momentum_buffer" in state:
                momenta.append(layout.flatten(state["momentum_buffer"]))

            def inner_loss(adapted: Params, buffers: Buffers = buffers, x: Tensor = x,
                           y: Tensor = y) -> tuple[Tensor, tuple[Tensor, Buffers]]:
                output, new_buffers = forward(model, {**fixed, **adapted}, buffers, x,
                                              bn_mode=bn_mode, training=True)
                loss = criterion(output, y)
                return loss, (loss, new_buffers)

            grads, (loss, buffers) = torch.func.grad(inner_loss, has_aux=True)(theta)
            losses.append(loss)
            theta, state = optimizer.step(theta, grads, state)
        trajectory.append(layout.flatten(theta))
        output, _ = forward(model, {**fixed, **theta}, buffers, query[0],
                            bn_mode=bn_mode, training=False)
        query_loss = criterion(output, query[1])
        acc = accuracy(output, query[1])
        has_accuracy.append(acc is not None)
        has_momentum.append(bool(momenta))
        # vmap returns tensors only: placeholders where there is no momentum or accuracy.
        return (torch.stack(trajectory),
                torch.stack(momenta) if momenta else trajectory[0].new_zeros(0, layout.numel),
                buffers, torch.stack(losses), query_loss,
                query_loss.new_zeros(()) if acc is None else acc)

    with torch.no_grad():  # torch.func.grad inside still differentiates; nothing else does
        try:
            trajectory, momentum, buffers, inner, loss, acc = metazoo.vectorize.map_tasks(
                one_task, [support, query], len(tasks), chunk)
        except (IndexError, RuntimeError, ValueError):
            # Under vmap a bad batch (labels outside the model's classes) fails inside the
            # batching rules; the criterion's diagnosis needs plain tensors.
            _diagnose(model, criterion, {**fixed, **init}, start_buffers, tasks,
                      bn_mode=bn_mode, device=device)
            raise
    return StackedAdaptation(layout, trajectory, momentum if any(has_momentum) else None, buffers,
                             inner, loss, acc if all(has_accuracy) else None)
