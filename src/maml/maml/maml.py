"""MAML and its relatives: first-order MAML, Meta-SGD, MAML++ (LSLR, MSL) and ANIL.

Update rule. For each task T with support batches and a query batch, starting from the
meta-learned initialisation theta, K inner steps of an inner optimizer (SGD, momentum, Adam, ...)
give the adapted parameters phi_K(theta); the meta-objective is the mean over tasks of the query
loss L_T^query(phi_K(theta)) (MAML++ multi-step loss: sum_k w_k L_T^query(phi_k(theta))), and
the meta-optimizer (Adam by default) steps theta along its gradient, differentiated through the
whole inner loop (second order). First-order MAML treats the inner gradients as constants, so
d phi_K / d theta = I and the meta-gradient is the query-loss gradient at phi_K.

Variants, all flags of ``MAML`` rather than subclasses:
- Meta-SGD: learned per-parameter inner learning rates (``learn_inner_lr="per_element"``);
  MAML++ LSLR: one learned rate per parameter tensor and per step
  (``learn_inner_lr="per_tensor", per_step_inner_lr=True``).
- MAML++ MSL: ``multi_step_weights`` (see ``multi_step_loss_weights`` for the annealing).
- ANIL: ``frozen`` parameters are not adapted in the inner loop (only the head is); they still
  receive meta-gradients. A parameter with ``requires_grad=False`` is frozen for good: neither
  adapted nor meta-learned (the rule of every metazoo learner, ``metazoo.trainable_parameters``).
- Zero-initialised head: ``zero_head`` parameters start every task at zero and are not
  meta-learned, so a head of another width (another number of classes) can be swapped in.

References:
    Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
    ICML 2017. Li, Zhou, Chen, Li. Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.
    2017. Antoniou, Edwards, Storkey. How to train your MAML. ICLR 2019. Raghu, Raghu, Bengio,
    Vinyals. Rapid Learning or Feature Reuse? (ANIL). ICLR 2020.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

import metazoo
from maml import _vectorized
from maml._learner import (
    Criterion,
    MetaOptimizerFactory,
    ModelLearner,
    NamePredicate,
    TaskGradients,
    build_meta_optimizer,
    check_bn_mode,
    check_criterion,
    check_inner_optimizer,
    check_module,
    check_optional_positive,
    check_tasks,
    evaluate_tasks,
    name_predicate,
    score_query,
    summarize,
)
from maml._vectorized import MetaInputs as _MetaInputs
from metazoo import Adapted, EvalResult, MetaStepResult, Task, check_steps

__all__ = ["MAML", "multi_step_loss_weights"]

LearnedLR = Literal["per_tensor", "per_element"]


def _default_meta_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def multi_step_loss_weights(inner_steps: int, *, epoch: int, anneal_epochs: int) -> list[float]:
    """MAML++'s annealed per-step weights of the multi-step loss.

    All steps weigh ``1 / K`` at epoch 0; every non-final weight decays linearly to
    ``0.03 / K`` over ``anneal_epochs`` epochs while the final step's weight grows, the sum
    staying 1 (Antoniou et al. 2019, the schedule of their reference implementation).

    Args:
        inner_steps: K, the number of inner steps.
        epoch: the current epoch (>= 0).
        anneal_epochs: epochs over which the weights move to the final step (>= 1).

    Returns:
        K weights for the query losses after inner steps 1..K.
    """
    check_steps("inner_steps", inner_steps)
    check_steps("anneal_epochs", anneal_epochs)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    uniform = 1.0 / inner_steps
    decay = uniform / anneal_epochs
    floor = 0.03 / inner_steps
    weights = [max(uniform - epoch * decay, floor) for _ in range(inner_steps - 1)]
    final = min(uniform + epoch * (inner_steps - 1) * decay, 1.0 - (inner_steps - 1) * floor)
    return [*weights, final]


class MAML(ModelLearner):
    """Model-agnostic meta-learning (second or first order) with its common variants.

    Example:
        >>> learner = MAML(model=net, criterion=F.mse_loss, inner_optimizer=metazoo.SGD(0.01))
        >>> result = learner.meta_step(tasks)
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: Criterion,
        inner_optimizer: metazoo.InnerOptimizer | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        meta_optimizer: MetaOptimizerFactory | torch.optim.Optimizer | None = None,
        bn_mode: metazoo.BatchNormMode | str = metazoo.BatchNormMode.BATCH,
        frozen: NamePredicate | Collection[str] | None = None,
        zero_head: NamePredicate | Collection[str] | None = None,
        learn_inner_lr: LearnedLR | None = None,
        per_step_inner_lr: bool = False,
        multi_step_weights: Sequence[float] | None = None,
        checkpoint: metazoo.Checkpoint | int | bool | None = None,
        inner_grad_clip: float | None = None,
        backward_grad_clip: float | None = None,
        on_nonfinite: str = "raise",
        channels_last: bool = False,
        vectorize: bool | int | str = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        """Builds the learner.

        Args:
            model: the network; its parameters are the meta-learned initialisation.
            criterion: ``criterion(output, target) -> scalar loss``, a function or an
                ``nn.Module`` instance (``nn.MSELoss()``), for the support and query losses.
            inner_optimizer: a ``metazoo`` optimizer (default ``metazoo.SGD(0.01)``); momentum,
                Adam and tensor hyperparameters are differentiated through.
            inner_steps: inner steps during meta-training.
            eval_inner_steps: inner steps in ``adapt``/``evaluate`` (default ``inner_steps``).
            first_order: first-order MAML: the meta-gradient is the query-loss gradient at the
                adapted parameters.
            meta_optimizer: a factory called with the meta-parameters, or a ``torch.optim``
                optimizer built over exactly them (``meta_parameters()``; default
                ``torch.optim.Adam(params, lr=1e-3)``); any other set of tensors is refused
                (``metazoo.build_meta_optimizer``).
            bn_mode: ``"batch"`` (transductive, MAML paper) or ``"running"`` (per-task running
                statistics, used by the query pass).
            frozen: parameters not adapted in the inner loop (ANIL freezes all but the head),
                as a name predicate or a collection of names. They are still meta-learned.
            zero_head: parameters set to zero at the start of every task's adaptation (a
                classifier head); they are not meta-learned.
            learn_inner_lr: learn the inner learning rate, initialised to the inner optimizer's
                (float) ``lr``: ``"per_tensor"`` one scalar per parameter tensor (MAML++ LSLR),
                ``"per_element"`` one rate per parameter entry (Meta-SGD).
            per_step_inner_lr: one set of learned rates per inner step (MAML++); needs
                ``learn_inner_lr`` and ``eval_inner_steps <= inner_steps``.
            multi_step_weights: MAML++ multi-step loss: ``inner_steps`` non-negative weights of
                the query losses after each inner step (see ``multi_step_loss_weights``).
            checkpoint: the core's exact checkpointed unroll: ``None``, ``True`` (binomial
                schedule with ``metazoo.DEFAULT_SNAPSHOTS`` stored states, memory flat in the
                number of inner steps), ``metazoo.Checkpoint(snapshots=s)`` (a budget of s
                stored states) or an int S (fixed segments of S steps).
            inner_grad_clip: clip the global norm of each inner gradient.
            backward_grad_clip: clip the global norm of the gradient flowing back through each
                inner step during the meta-backward pass.
            on_nonfinite: ``"raise"`` (default) stops with ``metazoo.NonFiniteError`` naming the
                task and inner step of the first NaN/inf loss; ``"skip"`` leaves such tasks out of
                the meta-gradient and the means and counts them in ``skipped_tasks``.
            channels_last: run adaptation and the query pass in channels-last memory format:
                every 4-D floating input (the first element of each support and query batch)
                and every 4-D parameter is copied to ``torch.channels_last`` for each task, so
                convolution, pooling and BatchNorm outputs stay channels-last; other inputs
                and parameters are left as they are, and the model is not modified (``adapt``
                returns channels-last parameters). The same computation in another layout:
                results equal the default's up to rounding.
                On CPUs the PyTorch max-pooling kernel is about 10x faster on channels-last
                tensors; ``benchmarks/meta_step.py`` measures the effect.
            vectorize: run the inner loops of all tasks of a meta-batch as one batched
                computation (``metazoo.vectorize``: ``vmap`` of the task's gradient; exact, the
                same meta-gradient as the loop) in ``meta_backward`` and ``evaluate``:
                ``False`` (default) the per-task loop, ``True`` all tasks at once, an int N
                that many tasks at a time (memory bounded in the number of tasks), ``"auto"``
                vectorized on CUDA and the loop elsewhere (on CPUs the loop was measured
                faster; ``benchmarks/gpu_meta_step.py``). Needs tasks of one shape, and raises
                ``ValueError`` with ``channels_last``, which only the loop supports. Models
                must not draw random numbers (dropout) in the vectorized path.
            compile: compile the vectorized per-meta-batch function (``vmap`` over a chunk of
                tasks) with ``torch.compile`` (``fullgraph=True``: a graph break raises):
                ``False`` (default), ``True`` (inductor, ``dynamic=False``) or a dict of
                ``torch.compile`` keywords (``{"backend": "aot_eager"}``). Needs ``vectorize``.
                The first meta-step compiles (minutes with inductor; logged by the
                ``metazoo.vectorize`` logger); see ``docs/performance.md`` for where it pays.
        """
        self.model = check_module(model)
        self.criterion = check_criterion(criterion)
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.eval_inner_steps = check_steps(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps)
        if not isinstance(first_order, bool):
            raise ValueError(f"first_order must be a bool, got {first_order!r}")
        self.first_order = first_order
        self.bn_mode = check_bn_mode(bn_mode)
        metazoo.check_checkpoint(checkpoint)
        self.checkpoint = checkpoint
        self.inner_grad_clip = check_optional_positive("inner_grad_clip", inner_grad_clip)
        self.backward_grad_clip = check_optional_positive("backward_grad_clip",
                                                          backward_grad_clip)
        self.on_nonfinite = metazoo.check_on_nonfinite(on_nonfinite)
        self.vectorize, self.channels_last = metazoo.vectorize.check_vectorize_and_layout(
            vectorize, channels_last)
        self.compile = metazoo.vectorize.check_compile(compile, self.vectorize)

        names = [n for n, _ in model.named_parameters()]
        # requires_grad=False: neither adapted nor meta-learned (metazoo.trainable_parameters).
        self._trainable = set(metazoo.trainable_parameters(model))
        self._frozen = name_predicate("frozen", frozen, names)
        self._zero_head = name_predicate("zero_head", zero_head, names)
        if self._zero_head is not None:
            fixed = [n for n in names if self._zero_head(n) and n not in self._trainable]
            if fixed:
                raise ValueError(f"parameters {fixed} are zero_head but have "
                                 f"requires_grad=False, so they would stay zero; set "
                                 f"requires_grad=True on them or remove them from zero_head")
        if self._frozen is not None and all(self._frozen(n) for n in names):
            raise ValueError("frozen matches every parameter, so nothing would adapt; leave "
                             "at least the head out of frozen")
        if self._frozen is not None and self._zero_head is not None:
            both = [n for n in names if self._frozen(n) and self._zero_head(n)]
            if both:
                raise ValueError(f"parameters {both} are both frozen and zero_head, so "
                                 f"they would stay zero; remove them from frozen")
        self._adapted_names = [n for n in names if n in self._trainable
                               and (self._frozen is None or not self._frozen(n))]
        if not self._adapted_names:
            raise ValueError("frozen and requires_grad=False leave no parameter to adapt; leave "
                             "at least the head out of frozen, with requires_grad=True")

        optimizer = check_inner_optimizer(
            metazoo.SGD(0.01) if inner_optimizer is None else inner_optimizer)
        self._inner_lrs: list[dict[str, nn.Parameter]] = []
        if learn_inner_lr is None:
            if per_step_inner_lr:
                raise ValueError("per_step_inner_lr=True needs learn_inner_lr='per_tensor' or "
                                 "'per_element'")
        else:
            optimizer = self._learned_lr_optimizer(optimizer, learn_inner_lr, per_step_inner_lr)
        self.inner_optimizer = optimizer
        self.learn_inner_lr = learn_inner_lr
        self.per_step_inner_lr = per_step_inner_lr

        self.multi_step_weights: tuple[float, ...] | None = None
        if multi_step_weights is not None:
            self.set_multi_step_weights(multi_step_weights)

        self.meta_optimizer = build_meta_optimizer(meta_optimizer, self.named_meta_parameters(),
                                                   _default_meta_optimizer)

    def _learned_lr_optimizer(self, optimizer: metazoo.InnerOptimizer, kind: str,
                              per_step: bool) -> metazoo.InnerOptimizer:
        if kind not in ("per_tensor", "per_element"):
            raise ValueError(f"learn_inner_lr must be None, 'per_tensor' or 'per_element', got "
                             f"{kind!r}")
        initial = optimizer.hyperparameters.get("lr")
        if isinstance(initial, bool) or not isinstance(initial, (int, float)):
            raise ValueError(f"learn_inner_lr initialises the rates from the inner optimizer's "
                             f"lr, which must then be a float; got {initial!r}")
        if per_step and self.eval_inner_steps > self.inner_steps:
            raise ValueError(f"per_step_inner_lr learns {self.inner_steps} rates, one per inner "
                             f"step, but eval_inner_steps={self.eval_inner_steps}; set "
                             f"eval_inner_steps <= inner_steps")
        params = dict(self.model.named_parameters())
        for _ in range(self.inner_steps if per_step else 1):
            self._inner_lrs.append({
                name: nn.Parameter(torch.full(() if kind == "per_tensor" else params[name].shape,
                                              float(initial), dtype=params[name].dtype,
                                              device=params[name].device))
                for name in self._adapted_names})
        return optimizer.with_hyperparameters(
            lr=list(self._inner_lrs) if per_step else self._inner_lrs[0])

    def set_multi_step_weights(self, weights: Sequence[float] | None) -> None:
        """Sets (or with ``None`` turns off) the MAML++ multi-step loss weights.

        Args:
            weights: ``inner_steps`` non-negative numbers, not all zero, for the query losses
                after inner steps 1..K (e.g. ``multi_step_loss_weights(K, epoch=e, ...)``).
        """
        if weights is None:
            self.multi_step_weights = None
            return
        values = [float(w) for w in weights]
        if len(values) != self.inner_steps:
            raise ValueError(f"multi_step_weights needs one weight per inner step "
                             f"({self.inner_steps}), got {len(values)}")
        if any(not w >= 0 for w in values) or not any(w > 0 for w in values):
            raise ValueError(f"multi_step_weights must be non-negative and not all zero, got "
                             f"{values}")
        self.multi_step_weights = tuple(values)

    # -- meta-parameters and checkpoints ----------------------------------------------------

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's parameters (less the zero-initialised head), then the learned rates."""
        for name, p in self.model.named_parameters():
            if name in self._trainable and (self._zero_head is None or not self._zero_head(name)):
                yield name, p
        for step, rates in enumerate(self._inner_lrs):
            prefix = f"inner_lr.{step}." if self.per_step_inner_lr else "inner_lr."
            for name, rate in rates.items():
                yield prefix + name, rate

    def state_dict(self) -> dict[str, Any]:
        """Model, meta-optimizer and learned inner learning rates."""
        state = super().state_dict()
        state["inner_lr"] = [{n: r.detach().clone() for n, r in rates.items()}
                             for rates in self._inner_lrs]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``, learned learning rates included."""
        rates = state.get("inner_lr", [])
        layout = [sorted(r) for r in self._inner_lrs]
        if [sorted(r) for r in rates] != layout:
            raise ValueError(f"checkpoint's learned inner learning rates "
                             f"{[sorted(r) for r in rates]} do not match this learner's {layout} "
                             f"(learn_inner_lr/per_step_inner_lr/frozen must be the same)")
        super().load_state_dict(state)
        with torch.no_grad():
            for mine, theirs in zip(self._inner_lrs, rates, strict=True):
                for name, rate in mine.items():
                    rate.copy_(theirs[name])

    # -- adaptation -------------------------------------------------------------------------

    def _steps(self, steps: int | None) -> int:
        steps = self.eval_inner_steps if steps is None else check_steps("steps", steps)
        if self.per_step_inner_lr and steps > self.inner_steps:
            raise ValueError(f"steps={steps} exceeds the {self.inner_steps} learned per-step "
                             f"learning rates; use steps <= {self.inner_steps}")
        return steps

    def _initial_params(self, meta: metazoo.Params | None = None
                        ) -> tuple[metazoo.Params, metazoo.Params]:
        """Adapted and static parameters; ``meta`` replaces the model's (vectorized path)."""
        adapted: metazoo.Params = {}
        static: metazoo.Params = {}
        for name, own in self.model.named_parameters():
            p = meta[name] if meta is not None and name in meta else own
            if self._zero_head is not None and self._zero_head(name):
                # A fresh zero tensor per task: the head starts from zero and gets no
                # meta-gradient, so its width may change between meta-training and testing.
                adapted[name] = torch.zeros_like(p, requires_grad=False)
            elif name in self._adapted_names:
                adapted[name] = p
            else:
                static[name] = p
        if self.channels_last:
            adapted = metazoo.params_to_channels_last(adapted)
            static = metazoo.params_to_channels_last(static)
        return adapted, static

    def _unroll(self, task: Task, steps: int, *, keep_trajectory: bool,
                meta: _MetaInputs | None = None) -> tuple[metazoo.UnrollResult, metazoo.Params]:
        """The loop's unroll, or with ``meta`` the ``torch.func`` one of the vectorized path."""
        adapted, static = self._initial_params(None if meta is None else meta.params)
        buffers = metazoo.initial_buffers(self.model, self.bn_mode)
        loss_fn = metazoo.make_loss_fn(self.model, self.criterion, bn_mode=self.bn_mode)
        unroll = metazoo.unroll if meta is None else metazoo.vectorize.functional_unroll
        optimizer = self.inner_optimizer if meta is None else meta.optimizer
        result = unroll(
            loss_fn, adapted, optimizer, list(task.support), steps=steps,
            static=static, buffers=buffers, first_order=self.first_order,
            checkpoint=self.checkpoint, inner_grad_clip=self.inner_grad_clip,
            backward_grad_clip=self.backward_grad_clip, keep_trajectory=keep_trajectory)
        return result, static

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts a copy of the meta-learned model to ``task`` (no meta-gradient).

        Args:
            task: support batches to adapt on (the query is not used).
            steps: inner steps (default ``eval_inner_steps``).
        """
        metazoo.check_task(task)
        steps = self._steps(steps)
        with torch.no_grad():
            result, static = self._unroll(self._layout(task), steps, keep_trajectory=False)
        params = {**static, **result.params}
        params = {name: params[name].detach() for name, _ in self.model.named_parameters()}
        return Adapted(params, result.buffers, tuple(result.losses.tolist()))

    def _task_objective(self, task: Task, meta: _MetaInputs | None = None
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Meta-objective of one task, its final query loss and accuracy, and inner losses."""
        msl = self.multi_step_weights
        task = self._layout(task)
        result, static = self._unroll(task, self.inner_steps,
                                               keep_trajectory=msl is not None, meta=meta)
        loss, acc = score_query(self.model, self.criterion, {**static, **result.params},
                                result.buffers, task.query, self.bn_mode)
        if msl is None:
            return loss, loss, acc, result.losses
        assert result.trajectory is not None and result.buffer_trajectory is not None
        points, point_buffers = result.trajectory[1:], result.buffer_trajectory[1:]
        objective = msl[-1] * loss
        for weight, point, point_buf in zip(msl[:-1], points[:-1], point_buffers[:-1], strict=True):
            if weight > 0:
                step_loss, _ = score_query(self.model, self.criterion, {**static, **point},
                                           point_buf, task.query, self.bn_mode)
                objective = objective + weight * step_loss
        return objective, loss, acc, result.losses

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Accumulates the meta-gradient of the mean meta-objective over ``tasks`` into ``.grad``.

        Each task's graph is freed by its own backward pass, so memory holds one task at a time.
        """
        return self._deferred_meta_backward(tasks).read()

    def _deferred_meta_backward(self, tasks: Sequence[Task]
                                ) -> metazoo.DeferredRead[MetaStepResult]:
        tasks = check_tasks(tasks)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())
        if chunk is not None:
            return _vectorized.meta_backward(self, tasks, chunk)
        start = time.perf_counter()
        params: list[Tensor] = list(self.meta_parameters())
        # A user's tensor hyperparameters of the inner optimizer that require grad get .grad as
        # from a backward pass (and as in the vectorized path).
        known = {id(p) for p in params}
        for tensor in self.inner_optimizer.hyperparameter_tensors():
            if tensor.requires_grad and id(tensor) not in known:
                known.add(id(tensor))
                params.append(tensor)
        grads = TaskGradients(params, len(tasks), self.on_nonfinite)
        per_task = []
        for task in tasks:
            objective, loss, acc, inner_losses = self._task_objective(task)
            # The gradient of every task is taken and masked by its finiteness on the device:
            # a non-finite task never reaches .grad, and one host transfer checks them all.
            grads.add(inner_losses, objective,
                      torch.autograd.grad(objective / len(tasks), params, allow_unused=True))
            per_task.append((loss.detach(), acc, inner_losses))
        return grads.deferred_finish(per_task).then(
            lambda kept: summarize([per_task[i] for i in kept], len(tasks), grads.skipped,
                                   start, grads.means))

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task and scores its query set; meta-parameters are left unchanged.

        Args:
            tasks: held-out tasks.
            steps: inner steps (default ``eval_inner_steps``).
        """
        tasks = check_tasks(tasks)
        steps = self._steps(steps)
        chunk = metazoo.vectorize.resolve_chunk(self.vectorize, len(tasks), self._device())
        if chunk is not None:
            return _vectorized.evaluate(self, tasks, chunk, _vectorized.maml_adapt(self, steps))

        def adapt(task: Task) -> tuple[metazoo.Params, metazoo.UnrollResult]:
            with torch.no_grad():
                result, static = self._unroll(task, steps, keep_trajectory=False)
            return {**static, **result.params}, result

        return evaluate_tasks(tasks, adapt, self.model, self.criterion, self.bn_mode,
                              self._layout)

