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
    MeanResults,
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
    resolve_and_mean,
    task_to_channels_last,
)
from warpgrad.buffer import ReplayBuffer
from warpgrad.flat import FlatLayout
from warpgrad.objectives import InitObjective, WarpObjective
from warpgrad.optimizer_parameters import OptimizerParameters
from warpgrad.updaters import DualUpdater
from warpgrad.vectorized import StackedAdaptation, adapt_tasks
from warpgrad.warp import Warp

__all__ = ["WarpGrad"]


ModuleSelection = (nn.Module | str | Callable[[str], bool]
                   | Iterable[nn.Module | str] | None)


def select_modules(model: nn.Module, argument: str, value: ModuleSelection) -> list[nn.Module]:
    """The sub-modules of ``model`` that ``warp_modules=``/``adapt_modules=`` name.

    Args:
        model: the network.
        argument: the keyword, for error messages.
        value: a module, a module name (``model.get_submodule``), a predicate over the names of
            ``model.named_modules()``, or a list of modules and names.

    Raises:
        ValueError: an unknown name, or a predicate that matches no module.
    """
    names = [n for n, _ in model.named_modules() if n]
    if value is None:
        return []
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, str):
        value = [value]
    elif callable(value):
        chosen = [m for n, m in model.named_modules() if n and value(n)]
        if not chosen:
            raise ValueError(f"{argument} matches none of the model's modules {names[:20]}; "
                             f"check the predicate (e.g. lambda name: name.startswith('warp'))")
        return chosen
    modules = []
    for item in value:
        if isinstance(item, nn.Module):
            modules.append(item)
        elif isinstance(item, str):
            try:
                modules.append(model.get_submodule(item))
            except AttributeError:
                raise ValueError(f"{argument} names a module {item!r} that the model does not "
                                 f"have; its modules are {names[:20]}") from None
        else:
            raise ValueError(f"{argument} must hold modules of the model or their names, got "
                             f"{type(item).__name__}")
    return modules


def _remaining_modules(model: nn.Module, taken: Sequence[nn.Module]) -> list[nn.Module]:
    """Modules owning parameters that are not in ``taken`` (the default ``adapt_modules``)."""
    taken_ids = {id(p) for m in taken for p in m.parameters()}
    return [m for m in model.modules()
            if any(id(p) not in taken_ids for p in m.parameters(recurse=False))]


def optimizer_parameters_from(inner_optimizer: metazoo.InnerOptimizer | OptimizerParameters
                              | None, *, learn: bool) -> OptimizerParameters:
    """The ``OptimizerParameters`` that adapt like ``inner_optimizer``.

    WarpGrad's task learner is SGD with one learning rate (and momentum) per parameter tensor,
    which it can meta-learn (``learn``); ``metazoo.SGD(lr, momentum=m)`` with float ``lr`` and
    ``m`` sets their initial values.
    """
    if isinstance(inner_optimizer, OptimizerParameters):
        if learn and not inner_optimizer.trainable:
            raise ValueError("learn_optimizer=True but the OptimizerParameters given as "
                             "inner_optimizer has trainable=False; set one of them")
        return inner_optimizer
    inner_optimizer = metazoo.SGD(0.1) if inner_optimizer is None else inner_optimizer
    fix = ("pass inner_optimizer=metazoo.SGD(lr, momentum=m) with float lr > 0 and "
           "0 <= m < 1 (WarpGrad adapts with SGD, one rate and momentum per parameter tensor)")
    if not isinstance(inner_optimizer, metazoo.SGD):
        raise ValueError(f"WarpGrad cannot adapt with {type(inner_optimizer).__name__}; {fix}")
    hp = inner_optimizer.hyperparameters
    plain = all(isinstance(hp[k], (int, float)) and not isinstance(hp[k], bool)
                for k in ("lr", "momentum", "dampening", "weight_decay"))
    if (not plain or inner_optimizer.nesterov or hp["dampening"] != 0
            or hp["weight_decay"] != 0 or not hp["momentum"] < 1):
        raise ValueError(f"WarpGrad's inner SGD takes a float lr and momentum only, got "
                         f"{inner_optimizer!r} ({', '.join(f'{k}={v!r}' for k, v in hp.items())}, "
                         f"nesterov={inner_optimizer.nesterov}); {fix}")
    return OptimizerParameters(trainable=learn, default_lr=float(hp["lr"]),
                               default_momentum=float(hp["momentum"]))


class WarpGrad(MetaLearner):
    """WarpGrad (Algorithm 2) as a ``MetaLearner``.

    Built like every metazoo learner, it wraps the model itself::

        WarpGrad(model=net, warp_modules=["warp1", "warp2"], criterion=F.cross_entropy,
                 inner_optimizer=metazoo.SGD(0.1), inner_steps=5)

    The reference-style form ``WarpGrad(warp, inner_steps=...)`` around a prebuilt
    ``warpgrad.Warp`` (with its ``DualUpdater`` and ``OptimizerParameters``) keeps working and
    gives the same learner.

    Example:
        >>> learner = WarpGrad(model=net, warp_modules=lambda n: n.startswith("warp"),
        ...                    criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.1))
        >>> result = learner.meta_step(tasks)
    """

    def __init__(
        self,
        warp: Warp | None = None,
        *,
        model: nn.Module | None = None,
        criterion: metazoo.Criterion | None = None,
        warp_modules: ModuleSelection = None,
        adapt_modules: ModuleSelection = None,
        inner_optimizer: metazoo.InnerOptimizer | OptimizerParameters | None = None,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        meta_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
        | torch.optim.Optimizer | None = None,
        meta_lr: float | None = None,
        learn_optimizer: bool = False,
        warp_objective: str | int | WarpObjective | None = None,
        init_objective: str | int | InitObjective | None = None,
        buffer: ReplayBuffer | None = None,
        bn_mode: str = "batch",
        on_nonfinite: str = "raise",
        channels_last: bool = False,
        vectorize: bool | int | str = False,
    ) -> None:
        """Builds the learner.

        Args:
            warp: the reference-style form: a prebuilt ``warpgrad.Warp`` whose updater is a
                ``DualUpdater`` (its criterion, warp and init objectives are used;
                ``bsz``/``epochs``/``init_lr`` are not: one meta-step updates every group with
                the gradient of the mean objective). Leave it out to build the ``Warp`` from
                ``model`` and the keywords below; the two forms do not mix.
            model: the network; its adaptable parameters' values are the meta-learned
                initialisation.
            criterion: ``criterion(output, target) -> scalar loss``, a function or an
                ``nn.Module`` instance (``nn.CrossEntropyLoss()``), for adaptation, the replay
                and the query loss.
            warp_modules: the meta-learned warp layers, held fixed while a task adapts: a
                module, a module name, a predicate over ``model.named_modules()`` names, or a
                list of modules and names (an empty list: no warping).
            adapt_modules: the layers each task adapts, in the same forms (default: every
                module owning parameters outside ``warp_modules``).
            inner_optimizer: ``metazoo.SGD(lr, momentum=m)`` with float ``lr`` and ``m``
                (default ``metazoo.SGD(0.1)``): the initial per-tensor learning rates and
                momenta of ``warpgrad.OptimizerParameters`` (or such an instance itself).
            inner_steps: adaptation steps per task while meta-training; step k trains on
                ``support[k % len(support)]``.
            eval_inner_steps: steps in ``adapt``/``evaluate`` (default ``inner_steps``).
            meta_optimizer: a factory called with the meta-parameters (warp layers,
                initialisation, learned rates: ``meta_parameters()``) or a ``torch.optim``
                optimizer built over exactly them (default ``torch.optim.Adam(params,
                lr=1e-3)``); any other set of tensors is refused
                (``metazoo.build_meta_optimizer``).
            meta_lr: the old spelling of ``meta_optimizer=lambda p: torch.optim.Adam(p,
                lr=meta_lr)``; not together with ``meta_optimizer``.
            learn_optimizer: meta-learn the per-tensor inner learning rates and momenta.
            warp_objective: the ``DualUpdater``'s warp objective (default
                ``"stop_gradient"``; ``"exact"``, ``"approx"``, ``"none"``).
            init_objective: the ``DualUpdater``'s initialisation objective (default
                ``"simplified_leap"``; ``"leap"``, ``"none"``).
            buffer: the ``ReplayBuffer`` recording trajectories (default in memory).
            bn_mode: ``metazoo.BatchNormMode`` of adaptation, replay and evaluation.
            on_nonfinite: ``"raise"`` (default) stops with ``metazoo.NonFiniteError`` naming
                the task and inner step of the first NaN/inf loss; ``"skip"`` drops such tasks'
                trajectories from the replay buffer (out of the meta-gradient and the means) and
                counts them in ``skipped_tasks``.
            channels_last: adapt, record, replay and score in channels-last memory format: per
                task, 4-D floating-point inputs and the 4-D initialisation and warp-layer
                tensors used for adaptation are copied to ``torch.channels_last`` (the model is
                not modified; the replay then runs channels-last too). On a CPU the Omniglot
                warp net's meta-step is ~0.65x the time of the default layout; results equal up
                to rounding.
            vectorize: ``False`` (default) adapts the tasks one by one; ``True`` adapts all
                tasks of a meta-batch (``meta_backward``, ``evaluate``) in one
                ``torch.func.vmap`` and replays the states of all of them in one ``vmap``; an
                int N maps N tasks at a time and replays the states of N tasks at a time
                (memory bounded in the number of tasks); ``"auto"`` vectorizes on CUDA and
                loops elsewhere (on CPUs the loop was measured faster,
                ``benchmarks/gpu_warp_meta_step.py``). The same results as the loop (same
                recorded states, replay and meta-gradients). Needs tasks whose batches share
                shapes, ``channels_last=False`` and ``bn_mode="batch"`` (the vectorized replay
                normalises with batch statistics); otherwise ``ValueError``. ``adapt(task)``
                (one task) always runs the loop.
        """
        if warp is None:
            warp = self._build_warp(model, criterion, warp_modules, adapt_modules,
                                    inner_optimizer, learn_optimizer, warp_objective,
                                    init_objective, buffer, bn_mode)
        else:
            given = [name for name, value in (
                ("model", model), ("criterion", criterion), ("warp_modules", warp_modules),
                ("adapt_modules", adapt_modules), ("inner_optimizer", inner_optimizer),
                ("warp_objective", warp_objective), ("init_objective", init_objective),
                ("buffer", buffer)) if value is not None] + (
                ["learn_optimizer"] if learn_optimizer else [])
            if given:
                raise ValueError(f"WarpGrad(warp, ...) takes {given} from the Warp; drop them, "
                                 f"or build without warp: WarpGrad(model=..., warp_modules=..., "
                                 f"criterion=..., ...)")
        if not isinstance(warp, Warp):
            raise ValueError(f"warp must be a warpgrad.Warp, got {type(warp).__name__}")
        if not isinstance(warp.updater, DualUpdater):
            raise ValueError(f"warp.updater must be a DualUpdater for WarpGrad, got "
                             f"{type(warp.updater).__name__}")
        self.inner_steps = metazoo.check_steps("inner_steps", inner_steps)
        self.eval_inner_steps = metazoo.check_steps(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps)
        if meta_lr is not None:
            if meta_optimizer is not None:
                raise ValueError("give meta_optimizer or meta_lr (its old spelling for Adam's "
                                 "learning rate), not both")
            if isinstance(meta_lr, bool) or not isinstance(meta_lr, (int, float)) or not (
                    0 < meta_lr < math.inf):
                raise ValueError(f"meta_lr={meta_lr!r} must be a finite positive number, "
                                 f"e.g. 1e-3")
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.channels_last = check_channels_last(channels_last)
        self.vectorize = metazoo.vectorize.check_vectorize(vectorize)
        if self.vectorize is not False:
            for option, value, alternative in (
                    ("channels_last", channels_last, "channels_last=False"),
                    (f"the updater's bn_mode={warp.updater.bn_mode!r}",
                     BatchNormMode(warp.updater.bn_mode) is not BatchNormMode.BATCH,
                     "bn_mode='batch'")):
                if value:
                    raise ValueError(f"vectorize={vectorize!r} does not support {option}; pass "
                                     f"{alternative}, or vectorize=False to keep {option} in the "
                                     f"per-task loop")
        self.warp = warp
        self.updater: DualUpdater = warp.updater
        self.model = warp.model
        self.criterion = CheckedCriterion(self.updater.criterion)
        self.bn_mode = BatchNormMode(bn_mode).value
        lr = 1e-3 if meta_lr is None else float(meta_lr)
        self.meta_optimizer = metazoo.build_meta_optimizer(
            meta_optimizer, self.named_meta_parameters(),
            lambda params: torch.optim.Adam(params, lr=lr))

    @staticmethod
    def _build_warp(model: nn.Module | None, criterion: metazoo.Criterion | None,
                    warp_modules: ModuleSelection, adapt_modules: ModuleSelection,
                    inner_optimizer: metazoo.InnerOptimizer | OptimizerParameters | None,
                    learn_optimizer: bool, warp_objective: str | int | WarpObjective | None,
                    init_objective: str | int | InitObjective | None,
                    buffer: ReplayBuffer | None, bn_mode: str) -> Warp:
        """The ``Warp`` (with its ``DualUpdater`` and ``OptimizerParameters``) that the
        reference-style form would be given."""
        if model is None:
            raise ValueError("WarpGrad needs model=... (or a prebuilt warp as first argument)")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if criterion is None:
            raise ValueError("WarpGrad needs criterion=..., e.g. "
                             "torch.nn.functional.cross_entropy")
        metazoo.check_criterion(criterion)
        if warp_modules is None:
            raise ValueError("WarpGrad needs warp_modules=...: the warp layers, as modules, "
                             "module names or a name predicate (an empty list: no warping)")
        if not isinstance(learn_optimizer, bool):
            raise ValueError(f"learn_optimizer must be True or False, got {learn_optimizer!r}")
        warps = select_modules(model, "warp_modules", warp_modules)
        adapts = (_remaining_modules(model, warps) if adapt_modules is None
                  else select_modules(model, "adapt_modules", adapt_modules))
        updater = DualUpdater(
            criterion,
            warp_objective="stop_gradient" if warp_objective is None else warp_objective,
            init_objective="simplified_leap" if init_objective is None else init_objective,
            bn_mode=BatchNormMode(bn_mode).value)
        return Warp(model, adapts, warps, updater,
                    ReplayBuffer() if buffer is None else buffer,
                    optimizer_parameters=optimizer_parameters_from(inner_optimizer,
                                                                   learn=learn_optimizer))

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Warp layers, initialisation and (when learned) inner learning rates/momenta."""
        return self.warp.named_meta_parameters(include_init=True)

    def _layout(self, task: Task) -> Task:
        return task_to_channels_last(task) if self.channels_last else task

    def _in_layout(self, params: Params) -> Params:
        return params_to_channels_last(params) if self.channels_last else params

    def _adapt(self, task: Task, steps: int, slot: str | None) -> tuple[Adapted, Tensor]:
        """Adapts to ``task`` (already in the learner's layout, see ``_layout``); returns the
        adapted model with its inner losses unread (``Adapted.inner_losses`` empty: reading
        them costs a host transfer, ``_adapted`` makes it) and the inner losses as a tensor."""
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
        inner = torch.stack(losses) if losses else torch.zeros(0)
        return Adapted({**fixed, **theta}, buffers, ()), inner

    @staticmethod
    def _adapted(adapted: Adapted, inner_losses: Tensor) -> Adapted:
        """``adapted`` with its inner losses read (one host transfer)."""
        return Adapted(adapted.params, adapted.buffers, tuple(inner_losses.tolist()))

    def _chunk(self, num_tasks: int) -> int | None:
        device = next(iter(self.warp.init_parameters())).device
        return metazoo.vectorize.resolve_chunk(self.vectorize, num_tasks, device)

    def _adapt_vectorized(self, tasks: Sequence[Task], steps: int, chunk: int
                          ) -> tuple[StackedAdaptation, Params]:
        """Every task's adaptation in ``vmap`` (``warpgrad.vectorized``), on flat states; also
        returns the fixed parameters (warp layers and frozen ones)."""
        criterion = CheckedCriterion(self.updater.criterion)
        ctx = self.warp.replay_context(criterion, bn_mode=self.bn_mode)
        fixed = {**ctx.static, **{n: w.detach() for n, w in ctx.warp.items()}}
        init = {n: p.detach() for n, p in self.warp.named_init_parameters()}
        layout = FlatLayout.of(init)
        if len(set(layout.dtypes)) > 1:
            raise ValueError(f"vectorize={self.vectorize!r} adapts flat states of one dtype, but "
                             f"the adaptable parameters have dtypes "
                             f"{sorted(map(str, set(layout.dtypes)))}; cast the model to one "
                             "dtype or pass vectorize=False")
        optimizer = self.warp.optimizer_parameter_container.inner_optimizer(detach=True,
                                                                            stacked=True)
        return adapt_tasks(self.model, criterion, fixed, init, optimizer, tasks, steps,
                           bn_mode=self.bn_mode, device=ctx.device, chunk=chunk,
                           layout=layout), fixed

    def _record(self, adaptation: StackedAdaptation, tasks: Sequence[Task]) -> None:
        """Records every task's trajectory into the buffer as the loop does (the same states,
        steps and order): one ``ReplayBuffer.record`` of its flat trajectory per task."""
        buffer = self.warp.buffer
        # One transfer for the whole meta-batch to where the buffer keeps states; the buffer
        # then keeps views of it (the tensors are this meta-step's own: no copy needed).
        where = buffer.device if buffer.inmem and buffer.device is not None else None
        trajectory, momentum = adaptation.trajectory, adaptation.momentum
        if where is not None:
            trajectory = trajectory.to(where)
            momentum = None if momentum is None else momentum.to(where)
        for index, task in enumerate(tasks):
            slot = uuid.uuid4().hex
            buffer.init(slot, task.support)
            buffer.record(slot, trajectory[index], layout=adaptation.layout,
                          momentum=None if momentum is None else momentum[index], copy=False)

    def _record_tasks(self, tasks: Sequence[Task]
                      ) -> tuple[metazoo.TaskFaults, list[tuple[Tensor, Tensor | None, Tensor]],
                                 list[str]]:
        """Adapts to the tasks one by one while recording into the buffer; returns their fault
        flags (unread), each task's (query loss, accuracy, inner losses) and its slot."""
        buffer = self.warp.buffer
        faults = metazoo.TaskFaults(self.on_nonfinite)
        per_task, slots = [], []
        for task in tasks:
            task = self._layout(task)  # the buffer then replays channels-last batches
            slot = uuid.uuid4().hex
            buffer.init(slot, task.support)
            adapted, inner = self._adapt(task, self.inner_steps, slot)
            loss, acc = self._score(adapted, task)
            inner = inner.to(device=loss.device, dtype=loss.dtype)
            faults.check(inner, loss)
            per_task.append((loss, acc, inner))
            slots.append(slot)
        return faults, per_task, slots

    def _meta_backward_loop(self, tasks: Sequence[Task]
                            ) -> tuple[list[tuple[Tensor, Tensor | None, Tensor]],
                                       MeanResults | None]:
        """Adapts to the tasks one by one while recording, then accumulates the meta-gradients;
        returns the kept tasks' (query loss, accuracy, inner losses) and their means, read
        with the fault flags of all tasks in one host transfer (``resolve_and_mean``)."""
        faults, per_task, slots = self._record_tasks(tasks)
        kept, means = resolve_and_mean(faults, per_task)  # raises the first task's fault
        for index in sorted(set(range(len(tasks))) - set(kept)):
            # A non-finite trajectory must not be replayed by the warp objective.
            self.warp.buffer.discard(slots[index])
        if kept:
            self.updater.accumulate(self.warp, read_loss=False)
        return [per_task[i] for i in kept], means

    def _meta_backward_vectorized(self, tasks: Sequence[Task], chunk: int
                                  ) -> tuple[list[tuple[Tensor, Tensor | None, Tensor]],
                                             MeanResults | None]:
        """``_meta_backward_loop`` with the adaptation mapped ``chunk`` tasks at a time and the
        replay over the states of ``chunk`` tasks per ``vmap`` call."""
        adaptation, _ = self._adapt_vectorized(tasks, self.inner_steps, chunk)
        self._record(adaptation, tasks)
        per_task = adaptation.per_task(range(len(tasks)))
        # The fault flags with the means: one host transfer.
        kept, means = metazoo.vectorize.deferred_faults_and_means(
            adaptation.faults(), self.on_nonfinite, per_task).read()
        slots = self.warp.buffer.slots()
        for index in sorted(set(range(len(tasks))) - set(kept)):
            # A non-finite trajectory must not be replayed by the warp objective.
            self.warp.buffer.discard(slots[index])
        if kept:
            # The states of ``chunk`` tasks per vmap call of the replay.
            self.updater.accumulate(self.warp, vectorize=chunk * self.inner_steps,
                                    read_loss=False)
        return [per_task[i] for i in kept], means

    def _steps(self, steps: int | None) -> int:
        return self.eval_inner_steps if steps is None else metazoo.check_steps("steps", steps)

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Adapts the initialisation to ``task`` with the warp layers fixed.

        Args:
            task: the task; only its support batches are used.
            steps: inner steps (default ``eval_inner_steps``).
        """
        metazoo.check_task(task)
        return self._adapted(*self._adapt(self._layout(task), self._steps(steps), None))

    def _score(self, adapted: Adapted, task: Task) -> tuple[Tensor, Tensor | None]:
        x, y = (t.to(next(iter(adapted.params.values())).device) for t in task.query)
        with torch.no_grad():
            output, _ = forward(self.model, adapted.params, adapted.buffers, x,
                                bn_mode=self.bn_mode, training=False)
            return CheckedCriterion(self.updater.criterion)(output, y), accuracy(output, y)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Adapts to every task while recording, then accumulates all meta-gradients."""
        tasks = metazoo.check_tasks(tasks)
        start = time.perf_counter()
        self._check_buffer_empty()
        chunk = self._chunk(len(tasks))
        try:
            per_task, means = (self._meta_backward_loop(tasks) if chunk is None
                               else self._meta_backward_vectorized(tasks, chunk))
        finally:
            self.warp.buffer.clear()
        return self._summary(per_task, means, len(tasks), start)

    def _deferred_meta_backward(self, tasks: Sequence[Task]
                                ) -> metazoo.DeferredRead[MetaStepResult]:
        # In "raise" mode the replay runs before the fault flags are read: a faulty task then
        # raises when they are read, and the meta-gradients written are dropped. In "skip"
        # mode the replay must leave the non-finite trajectories out, so it reads them first.
        tasks = metazoo.check_tasks(tasks)
        if self.on_nonfinite == "skip":
            return metazoo.DeferredRead.ready(self.meta_backward(tasks))
        start = time.perf_counter()
        self._check_buffer_empty()
        chunk = self._chunk(len(tasks))
        try:
            if chunk is None:
                faults, per_task, _ = self._record_tasks(tasks)
                deferred = metazoo.deferred_resolve_and_mean(faults, per_task)
            else:
                adaptation, _ = self._adapt_vectorized(tasks, self.inner_steps, chunk)
                self._record(adaptation, tasks)
                per_task = adaptation.per_task(range(len(tasks)))
                deferred = metazoo.vectorize.deferred_faults_and_means(
                    adaptation.faults(), self.on_nonfinite, per_task)
            # The replay draws its order; a faulty task undoes the draw with the rest.
            replay_order = (self.updater.random_state(), torch.random.get_rng_state())
            params = list(self.meta_parameters())
            deferred = metazoo.deferred_meta_gradient(params, lambda: self.updater.accumulate(
                self.warp, vectorize=None if chunk is None else chunk * self.inner_steps,
                read_loss=False), deferred)
        finally:
            self.warp.buffer.clear()

        def finished(read: list[float]) -> MetaStepResult:
            try:
                _, means = deferred.finish(read)
            except metazoo.NonFiniteError:
                self.updater.set_random_state(replay_order[0])
                torch.random.set_rng_state(replay_order[1])
                raise
            return self._summary(per_task, means, len(tasks), start)

        return metazoo.DeferredRead(deferred.values, finished)

    def _check_buffer_empty(self) -> None:
        buffer = self.warp.buffer
        if len(buffer) or buffer.slots():
            raise RuntimeError("the Warp's replay buffer is not empty; call warp.clear() "
                               "before driving it through the MetaLearner interface")

    @staticmethod
    def _summary(per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]],
                 means: MeanResults | None, num_tasks: int, start: float) -> MetaStepResult:
        """The result over the kept tasks ``per_task`` (``means``: their means, if read)."""
        skipped = num_tasks - len(per_task)
        if not per_task:
            nan = float("nan")
            return MetaStepResult(nan, nan, None, (), num_tasks, time.perf_counter() - start,
                                  skipped)
        meta_loss, mean_acc, curve = mean_results(per_task) if means is None else means
        return MetaStepResult(meta_loss, curve[-1], mean_acc, curve, num_tasks,
                              time.perf_counter() - start, skipped)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """Adapts to each task and scores its query batch; meta-parameters are unchanged.

        Args:
            tasks: held-out tasks.
            steps: inner steps (default ``eval_inner_steps``).
        """
        tasks = metazoo.check_tasks(tasks)
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
            adapted, inner = self._adapt(task, steps, None)
            loss, acc = self._score(adapted, task)
            per_task.append((loss, acc, inner.to(device=loss.device, dtype=loss.dtype)))
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
