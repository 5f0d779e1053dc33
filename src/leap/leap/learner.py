"""``LeapLearner``: Leap behind the core's ``MetaLearner`` interface.

The update rule is in ``leap.trajectory`` and is shared with the reference-style ``Leap``
class. Here the initialisation is the model's own parameters; each task adapts a detached copy
with a pure ``metazoo`` inner optimizer, one step per support batch, and the meta-gradient is
accumulated segment by segment while the inner loop runs, keeping only the previous point.
The last segment ends at the adapted parameters; its loss is evaluated on the batch the next
inner step would use (``support[K % len(support)]``), as the reference's ``update`` on the
next batch would. No second-order graph is ever built: Leap needs only first-order quantities.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

import metazoo
from leap.trajectory import Point, add_to_grad, flatten, segment_increment
from metazoo import (
    Adapted,
    BatchNormMode,
    Buffers,
    EvalResult,
    InnerOptimizer,
    MetaLearner,
    MetaStepResult,
    Params,
    Task,
)

__all__ = ["LeapLearner"]


@dataclass(frozen=True)
class _TaskRun:
    """One task's inner loop: where it ended and, if requested, its Leap meta-gradient."""

    params: Params  # adapted parameters only
    buffers: Buffers
    losses: Tensor  # support loss before each inner step, shape [K]
    meta_grad: Tensor | None  # flat, summed over the task's segments


MetaOptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _check_tasks(tasks: Iterable[Task]) -> Sequence[Task]:
    return metazoo.check_tasks(tasks)


@final
class LeapLearner(MetaLearner):
    """Leap as a ``metazoo.MetaLearner``.

    Example:
        >>> learner = LeapLearner(model=net, criterion=F.cross_entropy,
        ...                       inner_optimizer=metazoo.SGD(0.1), inner_steps=100)
        >>> result = learner.meta_step(tasks)
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: metazoo.Criterion,
        inner_optimizer: InnerOptimizer | None = None,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        meta_optimizer: MetaOptimizerFactory | torch.optim.Optimizer | None = None,
        norm: bool = True,
        loss: bool = True,
        stabilizer: bool = True,
        bn_mode: BatchNormMode | str = BatchNormMode.BATCH,
        inner_grad_clip: float | None = None,
        on_nonfinite: str = "raise",
        channels_last: bool = False,
        vectorize: bool | int | str = False,
    ) -> None:
        """Builds the learner.

        Args:
            model: the network; its trainable parameters are the meta-learned initialisation
                (parameters with ``requires_grad=False`` are used but neither adapted nor
                meta-learned).
            criterion: ``criterion(output, target) -> scalar loss``, a function or an
                ``nn.Module`` instance (``nn.CrossEntropyLoss()``), for support and query sets.
            inner_optimizer: a pure ``metazoo`` optimizer (default ``metazoo.SGD(0.1)``, the
                reference's Omniglot setting).
            inner_steps: inner steps K during meta-training (step k uses
                ``support[k % len(support)]``; the paper's Omniglot runs used 100).
            eval_inner_steps: inner steps in ``adapt``/``evaluate`` (default ``inner_steps``).
            meta_optimizer: a factory called with the meta-parameters, or a ``torch.optim``
                optimizer already built over exactly them (default
                ``torch.optim.SGD(params, lr=0.1)``, the reference's Omniglot setting); any
                other set of tensors is refused (``metazoo.build_meta_optimizer``).
            norm: length metric d1; ``False`` gives the energy metric d2.
            loss: include the loss in the task manifold.
            stabilizer: use ``-|L_{i+1} - L_i|`` as the loss difference.
            bn_mode: BatchNorm statistics mode (``metazoo.BatchNormMode``).
            inner_grad_clip: clip the global norm of each inner gradient before the inner
                step; the Leap increment uses the unclipped loss gradient.
            on_nonfinite: ``"raise"`` (default) stops with ``metazoo.NonFiniteError`` naming the
                task and inner step of the first NaN/inf loss; ``"skip"`` leaves such tasks out of
                the meta-gradient and the means and counts them in ``skipped_tasks``.
            channels_last: run adaptation and scoring in channels-last memory format: per
                task, 4-D floating-point inputs and 4-D parameters are copied to
                ``torch.channels_last`` (the model is not modified). On a CPU, image models run
                much faster (max-pooling over NCHW tensors is ~10x slower); the results equal
                the default layout's up to floating-point rounding.
            vectorize: adapt to all tasks of a meta-batch as one batched computation
                (``metazoo.vectorize``: ``vmap`` over tasks of the inner loop, with the inner
                gradients by ``torch.func.grad`` and each task's Leap meta-gradient summed over
                its segments inside the map; the same results as the loop) in
                ``meta_backward`` and ``evaluate``: ``False`` (default) the per-task loop,
                ``True`` all tasks at once, an int N that many tasks at a time (memory bounded
                in the number of tasks), ``"auto"`` vectorized on CUDA and the loop elsewhere
                (on CPUs the loop was measured faster; ``benchmarks/gpu_meta_step.py``). Needs
                tasks of one shape; raises ``ValueError`` with ``channels_last``. Models must
                not draw random numbers (dropout) in the vectorized path.
        """
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # Labels outside the model's classes and targets that broadcast to another shape
        # fail with a message instead of torch's IndexError or a silently wrong loss.
        checked_criterion = metazoo.check_criterion(criterion)
        inner_optimizer = metazoo.SGD(0.1) if inner_optimizer is None else inner_optimizer
        if not isinstance(inner_optimizer, InnerOptimizer):
            raise ValueError(f"inner_optimizer must be a metazoo optimizer (metazoo.SGD, "
                             f"metazoo.Adam, metazoo.RMSprop), got "
                             f"{type(inner_optimizer).__name__}")
        for name, value in (("norm", norm), ("loss", loss), ("stabilizer", stabilizer)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        try:
            bn_mode = BatchNormMode(bn_mode)
        except ValueError:
            raise ValueError(f"bn_mode must be one of {[m.value for m in BatchNormMode]}, got "
                             f"{bn_mode!r}") from None
        if inner_grad_clip is not None and (isinstance(inner_grad_clip, bool) or not isinstance(
                inner_grad_clip, (int, float)) or not inner_grad_clip > 0):
            raise ValueError(f"inner_grad_clip must be None or a positive number, got "
                             f"{inner_grad_clip!r}")
        # Tied weights are one tensor under their first name (named_parameters); the core's
        # forward fills every slot that holds it, so they stay tied while adapting.
        # requires_grad=False: neither adapted nor meta-learned, the rule of every metazoo
        # learner (read once, here).
        trainable = metazoo.trainable_parameters(model)
        kinds = {(p.dtype, p.device) for p in trainable.values()}
        if len(kinds) > 1:
            raise ValueError(f"LeapLearner needs every trainable parameter to share one dtype "
                             f"and device, got {sorted(map(str, kinds))}; convert the model "
                             f"with model.to(dtype, device)")
        self.on_nonfinite = metazoo.check_on_nonfinite(on_nonfinite)
        self.vectorize, self.channels_last = metazoo.vectorize.check_vectorize_and_layout(
            vectorize, channels_last)
        self.model = model
        self.criterion = checked_criterion
        self.inner_optimizer = inner_optimizer
        self.inner_steps = metazoo.check_steps("inner_steps", inner_steps)
        self.eval_inner_steps = metazoo.check_steps(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.norm, self.loss, self.stabilizer = norm, loss, stabilizer
        self.bn_mode = bn_mode
        self.inner_grad_clip = inner_grad_clip
        self._adapted_names = list(trainable)
        self._loss_fn = metazoo.make_loss_fn(model, self.criterion, bn_mode=bn_mode)
        self.meta_optimizer = metazoo.build_meta_optimizer(
            meta_optimizer, self.named_meta_parameters(),
            lambda params: torch.optim.SGD(params, lr=0.1))

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's trainable parameters (when the learner was built): the initialisation."""
        for name, p in self.model.named_parameters():
            if name in self._adapted_names:
                yield name, p

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts a copy of the initialisation to ``task`` with the inner optimizer.

        Args:
            task: the task; only its support batches are used.
            steps: inner steps (default ``eval_inner_steps``).
        """
        metazoo.check_task(task)
        run = self._run(self._layout(task), self._eval_steps(steps), meta=False)
        return Adapted({**self._static(), **run.params}, run.buffers,
                       tuple(run.losses.tolist()))

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Adds the Leap meta-gradient, averaged over ``tasks``, into the model's ``.grad``.

        The returned ``meta_loss`` and ``accuracy`` score the adapted models on the query sets
        (Leap's meta-objective is the path length, which does not use them).
        """
        return self._deferred_meta_backward(tasks).read()

    def _deferred_meta_backward(self, tasks: Sequence[Task]
                                ) -> metazoo.DeferredRead[MetaStepResult]:
        tasks = _check_tasks(tasks)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())
        if chunk is not None:
            return self._vectorized_meta_backward(tasks, chunk)
        start = time.perf_counter()
        faults, total, per_task = self._loop_meta_gradients(tasks)
        params = list(self.meta_parameters())
        # The mean over the kept tasks, their number not read: a faulty task in "raise" mode
        # raises when the flags are read (and what was written is dropped then).
        divisor: int | Tensor = (len(tasks) if self.on_nonfinite == "raise" else
                                 faults.kept_count().clamp(min=1).to(torch.float64))

        def write() -> None:
            if total is not None:
                add_to_grad(params, metazoo.vectorize.mean_over_kept(total, divisor))

        return self._deferred_summary(
            params, write, metazoo.deferred_resolve_and_mean(faults, per_task), per_task,
            len(tasks), start)

    def _deferred_summary(self, params: Sequence[Tensor], write: Callable[[], None],
                          faults: metazoo.DeferredRead[tuple[list[int],
                                                             metazoo.MeanResults | None]],
                          per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]],
                          num_tasks: int, start: float) -> metazoo.DeferredRead[MetaStepResult]:
        """``write`` the meta-gradient now, read the faults later
        (``metazoo.deferred_meta_gradient``), then summarise the kept tasks."""
        def summary(resolved: tuple[list[int], metazoo.MeanResults | None]) -> MetaStepResult:
            kept, means = resolved
            return self._summary([per_task[i] for i in kept], num_tasks, start, means)

        return metazoo.deferred_meta_gradient(params, write, faults).then(summary)

    def _loop_meta_gradients(self, tasks: Sequence[Task]
                             ) -> tuple[metazoo.TaskFaults, Tensor | None,
                                        list[tuple[Tensor, Tensor | None, Tensor]]]:
        """Each task's Leap meta-gradient, masked by its finiteness on the device and summed
        (no host transfer), with the fault flags and each task's results."""
        faults = metazoo.TaskFaults(self.on_nonfinite)
        total: Tensor | None = None
        per_task = []
        for task in tasks:
            task = self._layout(task)
            run = self._run(task, self.inner_steps, meta=True)
            assert run.meta_grad is not None
            loss, acc = self._score(run, task)
            meta_grad = faults.masked(faults.check(run.losses, loss), run.meta_grad)
            total = meta_grad if total is None else total.add_(meta_grad)
            per_task.append((loss, acc, run.losses))
        return faults, total, per_task

    def _vectorized_meta_backward(self, tasks: Sequence[Task], chunk: int
                                  ) -> metazoo.DeferredRead[MetaStepResult]:
        """``meta_backward`` with the tasks mapped ``chunk`` at a time: each task's Leap
        meta-gradient is summed over its segments inside the map, exactly as ``_run`` does in
        the loop; one host transfer checks the whole meta-batch for faults."""
        start = time.perf_counter()
        support, query = metazoo.vectorize.stack_tasks(tasks)
        has_accuracy: list[bool] = []

        def task_step(support: list[metazoo.Batch], query: metazoo.Batch
                      ) -> tuple[list[Tensor], tuple[Tensor, tuple[Tensor, tuple[Tensor, Tensor]]]]:
            task = Task(support, query)
            run = self._run(task, self.inner_steps, meta=True, vectorized=True)
            assert run.meta_grad is not None
            loss, acc = self._score(run, task)
            has_accuracy.append(acc is not None)
            # vmap returns tensors only: a placeholder where the criterion has no accuracy.
            return [run.meta_grad], (loss, (run.losses, (loss, loss.new_zeros(()) if acc is None
                                                         else acc)))

        with torch.no_grad():
            result = metazoo.vectorize.map_and_sum(vmap(task_step), [], [support, query],
                                                   len(tasks), chunk)
        params = list(self.meta_parameters())
        divisor = metazoo.vectorize.kept_divisor(result, self.on_nonfinite)
        losses, accuracies = result.aux
        per_task = [(losses[i], accuracies[i] if all(has_accuracy) else None,
                     result.inner_losses[i]) for i in range(len(tasks))]

        def write() -> None:
            add_to_grad(params, metazoo.vectorize.mean_over_kept(result.grads[0], divisor))

        return self._deferred_summary(
            params, write,
            metazoo.vectorize.deferred_faults_and_means(result, self.on_nonfinite, per_task),
            per_task, len(tasks), start)

    @staticmethod
    def _summary(per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]], num_tasks: int,
                 start: float, means: metazoo.MeanResults | None = None) -> MetaStepResult:
        skipped = num_tasks - len(per_task)
        if not per_task:
            nan = float("nan")
            return MetaStepResult(nan, nan, None, (), num_tasks, time.perf_counter() - start,
                                  skipped)
        meta_loss, acc_mean, curve = metazoo.mean_results(per_task) if means is None else means
        return MetaStepResult(meta_loss, curve[-1], acc_mean, curve, num_tasks,
                              time.perf_counter() - start, skipped)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task and scores its query set; the initialisation is unchanged."""
        tasks = _check_tasks(tasks)
        k = self._eval_steps(steps)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())
        if chunk is not None:
            return self._vectorized_evaluate(tasks, k, chunk)
        per_task = []
        for task in tasks:
            task = self._layout(task)
            run = self._run(task, k, meta=False)
            per_task.append((*self._score(run, task), run.losses))
        loss, acc, curve = metazoo.mean_results(per_task)
        losses = torch.stack([r[0] for r in per_task]).tolist()
        accs: list[float | None] = (torch.stack([r[1] for r in per_task]).tolist()  # type: ignore[misc]
                                    if acc is not None else [None] * len(per_task))
        return EvalResult(loss, acc, curve, len(tasks), tuple(zip(losses, accs, strict=True)))

    def _vectorized_evaluate(self, tasks: Sequence[Task], steps: int, chunk: int
                             ) -> EvalResult:
        support, query = metazoo.vectorize.stack_tasks(tasks)
        has_accuracy: list[bool] = []

        def score(support: list[metazoo.Batch], query: metazoo.Batch) -> tuple[Tensor, ...]:
            task = Task(support, query)
            run = self._run(task, steps, meta=False, vectorized=True)
            loss, acc = self._score(run, task)
            has_accuracy.append(acc is not None)
            return loss, loss.new_zeros(()) if acc is None else acc, run.losses

        with torch.no_grad():
            losses, accuracies, inner_losses = metazoo.vectorize.map_tasks(
                score, [support, query], len(tasks), chunk)
        with_accuracy = all(has_accuracy)
        per_task = [(losses[i], accuracies[i] if with_accuracy else None, inner_losses[i])
                    for i in range(len(tasks))]
        loss, acc, curve = metazoo.mean_results(per_task)
        rows = torch.stack([losses, accuracies]).tolist()
        return EvalResult(loss, acc, curve, len(tasks),
                          tuple((row_loss, row_acc if with_accuracy else None)
                                for row_loss, row_acc in zip(*rows, strict=True)))

    # -- internals -----------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _eval_steps(self, steps: int | None) -> int:
        return self.eval_inner_steps if steps is None else metazoo.check_steps("steps", steps)

    def _layout(self, task: Task) -> Task:
        return metazoo.task_to_channels_last(task) if self.channels_last else task

    def _in_layout(self, params: Params) -> Params:
        return metazoo.params_to_channels_last(params) if self.channels_last else params

    def _static(self) -> Params:
        return self._in_layout({name: p.detach() for name, p in self.model.named_parameters()
                                if name not in self._adapted_names})

    def _loss_and_grads(self, params: Params, static: Params, buffers: Buffers,
                        batch: tuple[Tensor, Tensor], *, vectorized: bool = False
                        ) -> tuple[Tensor, Params, Buffers]:
        if vectorized:
            return self._functional_loss_and_grads(params, static, buffers, batch)
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        with torch.enable_grad():
            loss, new_buffers = self._loss_fn({**static, **leaves}, buffers, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("criterion must return a scalar loss tensor; reduce it with "
                                 "reduction='mean'")
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return loss.detach().reshape(()), {
            name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(leaves.items(), grads, strict=True)}, new_buffers

    def _functional_loss_and_grads(self, params: Params, static: Params, buffers: Buffers,
                                   batch: tuple[Tensor, Tensor]
                                   ) -> tuple[Tensor, Params, Buffers]:
        """``_loss_and_grads`` by ``torch.func.grad``, to run inside ``vmap``."""

        def support_loss(adapted: Params) -> tuple[Tensor, tuple[Tensor, Buffers]]:
            loss, new_buffers = self._loss_fn({**static, **adapted}, buffers, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("criterion must return a scalar loss tensor; reduce it with "
                                 "reduction='mean'")
            return loss.reshape(()), (loss, new_buffers)

        # Leap needs first-order quantities only: the gradient at detached parameters.
        grads, (loss, new_buffers) = grad(support_loss, has_aux=True)(
            {name: p.detach() for name, p in params.items()})
        return loss.detach().reshape(()), grads, new_buffers

    def _run(self, task: Task, steps: int, *, meta: bool, vectorized: bool = False
             ) -> _TaskRun:
        """One task's inner loop (and Leap meta-gradient if ``meta``); with ``vectorized`` the
        gradients are taken by ``torch.func.grad``, so that it runs inside ``vmap``."""
        static = self._static()
        named = dict(self.model.named_parameters())
        params = self._in_layout({name: named[name].detach() for name in self._adapted_names})
        buffers = metazoo.initial_buffers(self.model, self.bn_mode)
        state = self.inner_optimizer.init(params)
        previous: Point | None = None
        total: Tensor | None = None
        losses = []
        for k in range(steps):
            loss, grads, new_buffers = self._loss_and_grads(
                params, static, buffers, task.support[k % len(task.support)],
                vectorized=vectorized)
            losses.append(loss)
            if meta:
                point = Point(flatten(list(params.values())), loss if self.loss else None,
                              flatten(list(grads.values())) if self.loss else None)
                if previous is not None:
                    total = self._add(total, previous, point)
                previous = point
            if self.inner_grad_clip is not None:
                grads = dict(zip(grads, metazoo.clip_grad_norm(list(grads.values()),
                                                               self.inner_grad_clip),
                                 strict=True))
            with torch.no_grad():
                params, state = self.inner_optimizer.step(params, grads, state)
            buffers = new_buffers
        if meta:
            assert previous is not None
            end_loss = None
            if self.loss:
                # The final point's loss only; its statistics updates are not kept, so the
                # adapted model's buffers are those of the K inner steps.
                with torch.no_grad():
                    end_loss, _ = self._loss_fn({**static, **params}, buffers,
                                                task.support[steps % len(task.support)])
                end_loss = end_loss.reshape(())
            total = self._add(total, previous, Point(flatten(list(params.values())), end_loss))
        return _TaskRun(params, buffers, torch.stack(losses), total)

    def _add(self, total: Tensor | None, start: Point, end: Point) -> Tensor:
        increment = segment_increment(start, end, norm=self.norm, loss=self.loss,
                                      stabilizer=self.stabilizer)
        return increment if total is None else total.add_(increment)

    def _score(self, run: _TaskRun, task: Task) -> tuple[Tensor, Tensor | None]:
        inputs, targets = task.query
        with torch.no_grad():
            output, _ = metazoo.forward(self.model, {**self._static(), **run.params},
                                        run.buffers, inputs, bn_mode=self.bn_mode,
                                        training=False)
            return self.criterion(output, targets), metazoo.accuracy(output, targets)
