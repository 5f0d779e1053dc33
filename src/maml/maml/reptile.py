"""Reptile: move the initialisation towards the parameters adapted to each task.

Update rule. For each task T, K inner steps of an inner optimizer on the support batches (no
second-order graph) give the adapted parameters phi_T (the point after the last step). The
meta-gradient is g = mean_T (theta - phi_T), written into ``.grad``; the meta-optimizer then steps
theta along it. With ``torch.optim.SGD(lr=epsilon)`` this is classic (batched) Reptile,
theta <- theta + epsilon * mean_T (phi_T - theta); any other torch optimizer (e.g. Adam) uses g as
a pseudo-gradient.

Inner optimizer state. By default (``inner_state="reset"``) every task starts the inner
optimizer afresh (``optimizer.init``). The authors' code (openai/supervised-reptile,
``supervised_reptile/reptile.py``) instead restores only the model's trainable variables between
tasks (``Reptile.train_step``: ``self._model_state``, built from ``tf.trainable_variables()``), so
the TensorFlow Adam slots (moments) and its beta powers (the step count), which are global but
not trainable variables, run on from task to task and from meta-step to meta-step.
Its ``Reptile.evaluate`` snapshots *all* global variables (``self._full_state``) before adapting
and restores them afterwards: each evaluation task starts from the training-carried Adam state
and leaves it unchanged; ``eval.py`` does this after restoring a checkpoint, which holds the Adam
slots. ``inner_state="carry"`` reproduces these semantics.

Reference:
    Nichol, Achiam, Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999, 2018.
    Code: https://github.com/openai/supervised-reptile
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

import metazoo
from maml import _vectorized
from maml._learner import (
    Criterion,
    MetaOptimizerFactory,
    ModelLearner,
    TaskGradients,
    build_meta_optimizer,
    check_bn_mode,
    check_criterion,
    check_inner_optimizer,
    check_module,
    check_optional_positive,
    check_tasks,
    evaluate_tasks,
    score_query,
    summarize,
)
from metazoo import Adapted, EvalResult, MetaStepResult, Task, check_steps

__all__ = ["INNER_STATES", "Reptile"]

#: ``inner_state`` values: a fresh inner optimizer per task, or one state carried on.
INNER_STATES = ("reset", "carry")


def _default_meta_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


class Reptile(ModelLearner):
    """First-order meta-learning by moving towards adapted parameters.

    Example:
        >>> learner = Reptile(model=net, criterion=F.mse_loss,
        ...                   inner_optimizer=metazoo.Adam(1e-3), inner_steps=32)
        >>> result = learner.meta_step(tasks)   # theta += 0.1 * mean(phi - theta)
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: Criterion,
        inner_optimizer: metazoo.InnerOptimizer | None = None,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        meta_optimizer: MetaOptimizerFactory | torch.optim.Optimizer | None = None,
        bn_mode: metazoo.BatchNormMode | str = metazoo.BatchNormMode.BATCH,
        inner_grad_clip: float | None = None,
        on_nonfinite: str = "raise",
        channels_last: bool = False,
        vectorize: bool | int | str = False,
        compile: bool | dict[str, Any] = False,
        inner_state: str = "reset",
    ) -> None:
        """Builds the learner.

        Args:
            model: the network; its parameters are the meta-learned initialisation.
            criterion: ``criterion(output, target) -> scalar loss``, a function or an
                ``nn.Module`` instance (``nn.MSELoss()``), for the support and query losses.
            inner_optimizer: a ``metazoo`` optimizer (default ``metazoo.SGD(0.01)``).
            inner_steps: inner steps K during meta-training.
            eval_inner_steps: inner steps in ``adapt``/``evaluate`` (default ``inner_steps``).
            meta_optimizer: a factory called with the meta-parameters, or a ``torch.optim``
                optimizer built over exactly them (default ``torch.optim.SGD(params, lr=0.1)``:
                classic Reptile with step size 0.1); any other set of tensors is refused
                (``metazoo.build_meta_optimizer``).
            bn_mode: ``"batch"`` or ``"running"`` (see ``metazoo.BatchNormMode``).
            inner_grad_clip: clip the global norm of each inner gradient.
            on_nonfinite: ``"raise"`` (default) stops with ``metazoo.NonFiniteError`` naming the
                task and inner step of the first NaN/inf loss; ``"skip"`` leaves such tasks out of
                the meta-gradient and the means and counts them in ``skipped_tasks``.
            channels_last: run adaptation and the query pass in channels-last memory format:
                per task, 4-D floating-point inputs and 4-D parameters are copied to
                ``torch.channels_last`` (the model is not modified), so every activation and
                inner update stays channels-last. On a CPU, image models run much faster
                (max-pooling over NCHW tensors is ~10x slower); the results equal the default
                layout's up to floating-point rounding.
            vectorize: adapt to all tasks of a meta-batch as one batched computation
                (``metazoo.vectorize``, ``vmap`` over tasks; the same results as the loop) in
                ``meta_backward`` and ``evaluate``: ``False`` (default) the per-task loop,
                ``True`` all tasks at once, an int N that many at a time, ``"auto"`` vectorized
                on CUDA only. Needs tasks of one shape; not with ``channels_last``.
            compile: compile the vectorized per-meta-batch function (``vmap`` over a chunk of
                tasks) with ``torch.compile`` (``fullgraph=True``: a graph break raises):
                ``False`` (default), ``True`` (inductor, ``dynamic=False``) or a dict of
                ``torch.compile`` keywords (``{"backend": "aot_eager"}``). Needs ``vectorize``.
                The first meta-step compiles (minutes with inductor; logged by the
                ``metazoo.vectorize`` logger); see ``docs/performance.md`` for where it pays.
            inner_state: ``"reset"`` (default) starts the inner optimizer's state afresh for
                every task. ``"carry"`` is the authors' code (see the module docstring): one
                inner optimizer state (e.g. Adam's moments and step count) runs on from task to
                task in the order of the meta-batch and across meta-steps; ``adapt`` and
                ``evaluate`` start every task from it and leave it unchanged. It is part of
                ``state_dict``. Sequential by nature: not with ``vectorize``; per-step
                (list) hyperparameters are rejected, since the step count runs on.
        """
        self.model = check_module(model)
        self.criterion = check_criterion(criterion)
        self.inner_optimizer = check_inner_optimizer(
            metazoo.SGD(0.01) if inner_optimizer is None else inner_optimizer)
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.eval_inner_steps = check_steps(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.bn_mode = check_bn_mode(bn_mode)
        self.inner_grad_clip = check_optional_positive("inner_grad_clip", inner_grad_clip)
        self.on_nonfinite = metazoo.check_on_nonfinite(on_nonfinite)
        self.vectorize, self.channels_last = metazoo.vectorize.check_vectorize_and_layout(
            vectorize, channels_last)
        self.compile = metazoo.vectorize.check_compile(compile, self.vectorize)
        if inner_state not in INNER_STATES:
            raise ValueError(f"inner_state must be one of {list(INNER_STATES)}, got "
                             f"{inner_state!r}")
        self.inner_state = inner_state
        if inner_state == "carry":
            if self.vectorize is not False:
                raise ValueError(f"inner_state='carry' runs the tasks one after another (each "
                                 f"starts from the state the previous one left), which "
                                 f"vectorize={vectorize!r} cannot do; pass vectorize=False, or "
                                 f"inner_state='reset' to vectorize")
            per_step = sorted(k for k, v in self.inner_optimizer.hyperparameters.items()
                              if isinstance(v, (list, tuple)))
            if per_step:
                raise ValueError(f"inner_state='carry' continues the inner step count across "
                                 f"tasks, so per-step hyperparameters {per_step} would run out; "
                                 f"give one value each, or use inner_state='reset'")
        # The state carried under inner_state="carry"; None until the first task (or load).
        self._carried_state: metazoo.OptState | None = None
        # requires_grad=False: neither adapted nor meta-learned (metazoo.trainable_parameters).
        self._trainable = set(metazoo.trainable_parameters(self.model))
        self.meta_optimizer = build_meta_optimizer(meta_optimizer, self.named_meta_parameters(),
                                                   _default_meta_optimizer)

    def _unroll(self, task: Task, steps: int, *, vectorized: bool = False
                ) -> tuple[metazoo.UnrollResult, metazoo.Params]:
        """Adapts to ``task`` (already in the learner's layout, see ``_layout``); with
        ``vectorized`` by the ``torch.func`` unroll, to run inside ``vmap``. Under
        ``inner_state="carry"`` the inner optimizer starts from the carried state (the caller
        decides whether the result's state is carried on).

        Returns the unroll (its ``params`` are the adapted, trainable ones) and every
        parameter of the adapted model (frozen ones merged in).
        """
        params, static = metazoo.split_params(metazoo.params_of(self.model, detach=True),
                                              self._trainable.__contains__)
        if self.channels_last:
            params = metazoo.params_to_channels_last(params)
            static = metazoo.params_to_channels_last(static)
        unroll = metazoo.vectorize.functional_unroll if vectorized else metazoo.unroll
        # None: a fresh state (optimizer.init), always under "reset" and before the first task.
        state = self._carried_state if self.inner_state == "carry" else None
        with torch.no_grad():
            result = unroll(
                metazoo.make_loss_fn(self.model, self.criterion, bn_mode=self.bn_mode),
                params, self.inner_optimizer, list(task.support), steps=steps, static=static,
                buffers=metazoo.initial_buffers(self.model, self.bn_mode),
                inner_grad_clip=self.inner_grad_clip, state=state)
        return result, {**static, **result.params}

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts a copy of the model to ``task`` with ``steps`` (default eval) inner steps."""
        metazoo.check_task(task)
        steps = self.eval_inner_steps if steps is None else check_steps("steps", steps)
        result, params = self._unroll(self._layout(task), steps)
        return Adapted(params, result.buffers, tuple(result.losses.tolist()))

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Accumulates ``mean_T (theta - phi_T)`` into ``.grad``; reports the query loss."""
        return self._deferred_meta_backward(tasks).read()

    def _deferred_meta_backward(self, tasks: Sequence[Task]
                                ) -> metazoo.DeferredRead[MetaStepResult]:
        tasks = check_tasks(tasks)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())
        if chunk is not None:
            return _vectorized.reptile_meta_backward(self, tasks, chunk)
        start = time.perf_counter()
        named = list(self.named_meta_parameters())
        collected = TaskGradients([p for _, p in named], len(tasks), self.on_nonfinite)
        per_task = []
        for task in tasks:
            task = self._layout(task)
            result, params = self._unroll(task, self.inner_steps)
            with torch.no_grad():
                loss, acc = score_query(self.model, self.criterion, params,
                                        result.buffers, task.query, self.bn_mode)
                # Reptile's step does not use the query loss, but a NaN there is still a fault.
                collected.add(result.losses, loss,
                              [(p - result.params[name]) / len(tasks) for name, p in named])
            if self.inner_state == "carry":
                # The next task starts from this state, so this task's flag is read now (one
                # transfer per task in carry mode); a skipped task's state is not carried on.
                if metazoo.task_fault(0, result.losses, loss) is None:
                    self._carried_state = _detached(result.state)
                elif self.on_nonfinite == "raise":
                    collected.finish()  # raises this task's error before another task runs
            per_task.append((loss, acc, result.losses))
        return collected.deferred_finish(per_task).then(
            lambda kept: summarize([per_task[i] for i in kept], len(tasks), collected.skipped,
                                   start, collected.means))

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task and scores its query set; the model is left unchanged."""
        tasks = check_tasks(tasks)
        steps = self.eval_inner_steps if steps is None else check_steps("steps", steps)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())

        def adapt(task: Task) -> tuple[metazoo.Params, metazoo.UnrollResult]:
            result, params = self._unroll(task, steps, vectorized=chunk is not None)
            return params, result

        if chunk is not None:
            return _vectorized.evaluate(self, tasks, chunk, adapt)

        return evaluate_tasks(tasks, adapt, self.model, self.criterion, self.bn_mode,
                              self._layout)

    def state_dict(self) -> dict[str, Any]:
        """Model and meta-optimizer state; under ``inner_state="carry"`` also the carried inner
        optimizer state (``"inner_optimizer_state"``, ``None`` before the first task)."""
        state = super().state_dict()
        if self.inner_state == "carry":
            state["inner_optimizer_state"] = pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                self._carried_state)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``; the carried inner state must match ``inner_state``."""
        carried = "inner_optimizer_state" in state
        if carried != (self.inner_state == "carry"):
            written = "carry" if carried else "reset"
            raise ValueError(f"the state dict was written by a Reptile with "
                             f"inner_state={written!r}, this one has "
                             f"inner_state={self.inner_state!r}; build it with "
                             f"inner_state={written!r}")
        loaded = state.get("inner_optimizer_state")
        if loaded is not None:
            expected = set(self._trainable)
            for key, value in loaded.items():
                if isinstance(value, Mapping) and set(value) != expected:
                    raise ValueError(f"inner_optimizer_state[{key!r}] holds "
                                     f"{sorted(value)}, not this model's trainable parameters "
                                     f"{sorted(expected)}")
        super().load_state_dict(state)
        if self.inner_state == "carry":
            device = self._device()
            self._carried_state = None if loaded is None else pytree.tree_map(
                lambda v: v.detach().clone().to(device) if isinstance(v, torch.Tensor) else v,
                dict(loaded))


def _detached(state: metazoo.OptState) -> metazoo.OptState:
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, state)
