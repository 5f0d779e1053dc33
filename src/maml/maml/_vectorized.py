"""Vectorized meta-batches of this package's learners (``metazoo.vectorize``).

MAML's objective is ``MAML._task_objective`` itself, called with the meta-parameters as explicit
inputs (``MetaInputs``) and the ``torch.func`` unroll; ``vmap(grad_and_value(...))`` of it gives
each task's meta-gradient inside the map, exactly the loop's. Reptile maps its adaptation
(``Reptile._unroll`` with the ``torch.func`` unroll) and sums ``theta - phi_T``. iMAML maps its
proximal adaptation and its implicit gradient (``iMAML._functional_implicit_gradient``: the
loop's ``conjugate_gradient`` on Hessian-vector products by ``torch.func.vjp``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import vmap

import metazoo
from maml._learner import score_query, summarize
from metazoo import EvalResult, MetaStepResult, Task

Adapt = Callable[[Task], tuple[metazoo.Params, metazoo.UnrollResult]]


@dataclass(frozen=True)
class MetaInputs:
    """The meta-parameters as explicit (possibly ``torch.func``-wrapped) tensors.

    Attributes:
        params: the model's parameters by name, less the zero-initialised head.
        optimizer: the inner optimizer with its tensor hyperparameters (learned rates) replaced.
    """

    params: metazoo.Params
    optimizer: metazoo.InnerOptimizer


# What this module reads of the learners, as protocols: the learner modules import this one,
# so it names no learner class (no import circle, not even under TYPE_CHECKING).

class _Scored(Protocol):
    @property
    def model(self) -> nn.Module: ...

    @property
    def criterion(self) -> Any: ...

    @property
    def bn_mode(self) -> Any: ...

    @property
    def on_nonfinite(self) -> Any: ...

    @property
    def compile(self) -> metazoo.vectorize.CompileOptions | None: ...


class _MAMLLike(_Scored, Protocol):
    @property
    def _zero_head(self) -> Callable[[str], bool] | None: ...

    @property
    def inner_optimizer(self) -> metazoo.InnerOptimizer: ...

    def _task_objective(self, task: Task, meta: MetaInputs | None = None) -> Any: ...

    def _unroll(self, task: Task, steps: int, *, keep_trajectory: bool,
                meta: MetaInputs | None = None) -> Any: ...


class _ReptileLike(_Scored, Protocol):
    @property
    def inner_steps(self) -> int: ...

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def _unroll(self, task: Task, steps: int, *, vectorized: bool = False) -> Any: ...


class _iMAMLLike(_ReptileLike, Protocol):
    def meta_parameters(self) -> Iterator[nn.Parameter]: ...

    def _functional_implicit_gradient(self, task: Task, phi: metazoo.Params,
                                      buffers: metazoo.Buffers) -> Any: ...


def _model_params(learner: _MAMLLike) -> metazoo.Params:
    zero_head = learner._zero_head
    return {name: p for name, p in learner.model.named_parameters()
            if zero_head is None or not zero_head(name)}


def _per_task(losses: Tensor, accuracies: Tensor | None, inner_losses: Tensor,
              indices: Sequence[int]) -> list[tuple[Tensor, Tensor | None, Tensor]]:
    return [(losses[i], None if accuracies is None else accuracies[i], inner_losses[i])
            for i in indices]


def _deferred_result(learner: Any, tasks: Sequence[Task],
                     result: metazoo.vectorize.VectorizedGradients,
                     has_accuracy: Sequence[bool], params: Sequence[Tensor],
                     write: Callable[[], None], start: float
                     ) -> metazoo.DeferredRead[MetaStepResult]:
    """``write`` the mean meta-gradient over the kept tasks now, read the fault flags and the
    means later (``metazoo.deferred_meta_gradient``), then summarise the kept tasks."""
    losses, accuracies = result.aux
    per_task = _per_task(losses, accuracies if all(has_accuracy) else None,
                         result.inner_losses, range(len(tasks)))
    faults = metazoo.vectorize.deferred_faults_and_means(result, learner.on_nonfinite, per_task)

    def summary(resolved: tuple[list[int], metazoo.MeanResults | None]) -> MetaStepResult:
        kept, means = resolved
        return summarize([per_task[i] for i in kept], len(tasks), len(tasks) - len(kept),
                         start, means)

    return metazoo.deferred_meta_gradient(params, write, faults).then(summary)


def meta_backward(learner: _MAMLLike, tasks: Sequence[Task], chunk: int
                  ) -> metazoo.DeferredRead[MetaStepResult]:
    """``MAML.meta_backward`` with the tasks mapped ``chunk`` at a time; the fault check of the
    whole meta-batch and its means are read in one host transfer, later
    (``MetaLearner._deferred_meta_backward``)."""
    start = time.perf_counter()
    support, query = metazoo.vectorize.stack_tasks(tasks)
    params = _model_params(learner)
    candidates = [*params.values(), *learner.inner_optimizer.hyperparameter_tensors()]
    differentiable = [i for i, t in enumerate(candidates) if t.requires_grad]
    has_accuracy: list[bool] = []

    def objective(inputs: list[Tensor], support: list[metazoo.Batch], query: metazoo.Batch
                  ) -> tuple[Tensor, tuple[Tensor, tuple[Tensor, Tensor]]]:
        tensors = list(candidates)
        for index, tensor in zip(differentiable, inputs, strict=True):
            tensors[index] = tensor
        meta = MetaInputs(dict(zip(params, tensors)),
                          learner.inner_optimizer.with_hyperparameter_tensors(
                              tensors[len(params):]))
        value, loss, acc, inner_losses = learner._task_objective(Task(support, query), meta)
        has_accuracy.append(acc is not None)
        # vmap returns tensors only: a placeholder where the criterion has no accuracy.
        # The gradient of objective / T, as the loop's backward pass: backward_grad_clip clips
        # the gradient reaching each step, so the scale must be applied before it, not after.
        return value / len(tasks), (inner_losses, (loss, loss.new_zeros(()) if acc is None
                                                   else acc))

    inputs = [candidates[i] for i in differentiable]
    result = metazoo.vectorize.vectorized_meta_gradients(objective, inputs, [support, query],
                                                         len(tasks), chunk,
                                                         compile=learner.compile)
    divisor = metazoo.vectorize.kept_divisor(result, learner.on_nonfinite)

    def write() -> None:
        if not inputs:
            return
        # The mean over the kept tasks, accumulated into .grad like the loop's backward passes
        # (TaskGradients: the sum of the gradients of objective / T, times T / kept).
        grads = result.grads
        if not isinstance(divisor, int):
            scale = len(tasks) / divisor
            grads = [g * scale.to(device=g.device, dtype=g.dtype) for g in grads]
        torch.autograd.backward(inputs, grads)

    return _deferred_result(learner, tasks, result, has_accuracy, inputs, write, start)


def maml_adapt(learner: _MAMLLike, steps: int) -> Adapt:
    """MAML's adaptation for ``evaluate``: the ``torch.func`` unroll from the meta-parameters."""
    meta = MetaInputs(_model_params(learner), learner.inner_optimizer)

    def adapt(task: Task) -> tuple[metazoo.Params, metazoo.UnrollResult]:
        result, static = learner._unroll(task, steps, keep_trajectory=False, meta=meta)
        return {**static, **result.params}, result

    return adapt


def reptile_meta_backward(learner: _ReptileLike, tasks: Sequence[Task], chunk: int
                          ) -> metazoo.DeferredRead[MetaStepResult]:
    """``Reptile.meta_backward`` with the tasks mapped ``chunk`` at a time: the mean over the
    finite tasks of ``theta - phi_T`` into ``.grad`` (one host transfer for the fault check)."""
    start = time.perf_counter()
    support, query = metazoo.vectorize.stack_tasks(tasks)
    named = list(learner.named_meta_parameters())
    has_accuracy: list[bool] = []

    def task_step(support: list[metazoo.Batch], query: metazoo.Batch
                  ) -> tuple[list[Tensor], tuple[Tensor, tuple[Tensor, tuple[Tensor, Tensor]]]]:
        result, params = learner._unroll(Task(support, query), learner.inner_steps,
                                         vectorized=True)
        loss, acc = score_query(learner.model, learner.criterion, params, result.buffers, query,
                                learner.bn_mode)
        has_accuracy.append(acc is not None)
        differences = [p.detach() - result.params[name] for name, p in named]
        return differences, (loss, (result.losses, (loss, loss.new_zeros(()) if acc is None
                                                    else acc)))

    with torch.no_grad():
        result = metazoo.vectorize.map_and_sum(vmap(task_step), [], [support, query], len(tasks),
                                               chunk, compile=learner.compile)
    divisor = metazoo.vectorize.kept_divisor(result, learner.on_nonfinite)

    def write() -> None:
        for (_, p), difference in zip(named, result.grads, strict=True):
            metazoo.accumulate_grad(p, metazoo.vectorize.mean_over_kept(difference, divisor))

    return _deferred_result(learner, tasks, result, has_accuracy, [p for _, p in named], write,
                            start)


def evaluate(learner: _Scored, tasks: Sequence[Task], chunk: int, adapt: Adapt
             ) -> EvalResult:
    """``evaluate`` with the tasks mapped ``chunk`` at a time; ``adapt(task)`` returns the
    adapted parameters (all of the model's) and the unroll's result, inside ``vmap``."""
    support, query = metazoo.vectorize.stack_tasks(tasks)
    has_accuracy: list[bool] = []

    def score(support: list[metazoo.Batch], query: metazoo.Batch) -> tuple[Tensor, ...]:
        params, result = adapt(Task(support, query))
        loss, acc = score_query(learner.model, learner.criterion, params, result.buffers, query,
                                learner.bn_mode)
        has_accuracy.append(acc is not None)
        return loss, loss.new_zeros(()) if acc is None else acc, result.losses

    with torch.no_grad():
        losses, accuracies, inner_losses = metazoo.vectorize.map_tasks(
            score, [support, query], len(tasks), chunk, compile=learner.compile)
    per_task = _per_task(losses, accuracies if all(has_accuracy) else None, inner_losses,
                         range(len(tasks)))
    loss_mean, acc_mean, curve = metazoo.mean_results(per_task)
    rows: list[Any] = torch.stack([losses, accuracies]).tolist()
    return EvalResult(loss_mean, acc_mean, curve, len(tasks),
                      tuple((loss, acc if all(has_accuracy) else None)
                            for loss, acc in zip(*rows, strict=True)))


def imaml_meta_backward(learner: _iMAMLLike, tasks: Sequence[Task], chunk: int
                        ) -> metazoo.DeferredRead[MetaStepResult]:
    """``iMAML.meta_backward`` with the tasks mapped ``chunk`` at a time: adaptation and the
    implicit gradient of each task inside the map, the mean over the finite tasks into ``.grad``
    (one host transfer for the fault check)."""
    start = time.perf_counter()
    support, query = metazoo.vectorize.stack_tasks(tasks)
    has_accuracy: list[bool] = []

    def task_step(support: list[metazoo.Batch], query: metazoo.Batch
                  ) -> tuple[list[Tensor], tuple[Tensor, tuple[Tensor, tuple[Tensor, Tensor]]]]:
        task = Task(support, query)
        result, _ = learner._unroll(task, learner.inner_steps, vectorized=True)
        grads, loss, acc = learner._functional_implicit_gradient(task, result.params,
                                                                    result.buffers)
        has_accuracy.append(acc is not None)
        return grads, (loss, (result.losses, (loss, loss.new_zeros(()) if acc is None
                                              else acc)))

    with torch.no_grad():
        result = metazoo.vectorize.map_and_sum(vmap(task_step), [], [support, query], len(tasks),
                                               chunk, compile=learner.compile)
    divisor = metazoo.vectorize.kept_divisor(result, learner.on_nonfinite)
    params = list(learner.meta_parameters())

    def write() -> None:
        for p, g in zip(params, result.grads, strict=True):
            metazoo.accumulate_grad(p, metazoo.vectorize.mean_over_kept(g, divisor))

    return _deferred_result(learner, tasks, result, has_accuracy, params, write, start)
