"""Updaters: how and when WarpGrad's meta-gradients are computed and applied.

``DualUpdater`` is the paper's Algorithm 2: after a meta-batch of tasks, replay the stored
states (``ReplayBuffer``) through the warp objective, one meta-optimizer step per mini-batch of
``bsz`` states, then update the initialisation with the init objective.
``OnlineUpdater`` is Algorithm 1: the warp objective's gradient is taken at every step while the
task learner adapts (nothing is replayed) and applied once per meta-batch.
``ContinualUpdater`` is the continual form of Algorithm 1 that the paper's maze-navigation
experiment uses: the task learner is never reset, and the warp gradient of each task is the
gradient of the learner's own loss (any loss, e.g. a reinforcement-learning objective) with
respect to the warp parameters, averaged over the tasks between two meta-steps.

The objectives themselves (and which derivatives each mode keeps) are documented in
``warpgrad.objectives``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metazoo import (
    BatchNormMode,
    NonFiniteError,
    Params,
    accumulate_grad,
    all_finite,
    host_list,
)
from warpgrad.buffer import ReplayState
from warpgrad.objectives import (
    InitObjective,
    Leap,
    ReplayContext,
    WarpObjective,
    resolve_init_objective,
    resolve_warp_objective,
)
from warpgrad.warped import WarpedModel

__all__ = ["ContinualUpdater", "DualUpdater", "OnlineUpdater", "UpdateResult"]

Criterion = Callable[[Tensor, Tensor], Tensor] | type


@dataclass(frozen=True)
class UpdateResult:
    """What one call of ``Warp.backward`` did.

    Attributes:
        warp_loss: mean warp objective over the replayed states (``None`` without one).
        num_points: replayed states per epoch (online: states seen).
        num_meta_steps: calls of ``meta_step_fn``.
        warp_seconds: time spent on the warp objective (replay and meta-steps).
        init_seconds: time spent on the init objective and its update.
        skipped_tasks: tasks dropped because their recorded trajectory was not finite
            (``Warp(on_nonfinite="skip")``).
        replay_calls: evaluations of the warp objective: one per state replayed on its own,
            one per group of states replayed in one ``vmap`` (``vectorize``).
    """

    warp_loss: float | None
    num_points: int
    num_meta_steps: int
    warp_seconds: float
    init_seconds: float
    skipped_tasks: int = 0
    replay_calls: int = 0


def make_criterion(criterion: Criterion) -> Callable[[Tensor, Tensor], Tensor]:
    """Accepts a loss class (``CrossEntropyLoss``, as the reference README writes it) or any
    callable ``criterion(output, target)``."""
    if isinstance(criterion, type):
        if not issubclass(criterion, nn.Module):
            raise ValueError(f"criterion={criterion!r} is a class but not an nn.Module loss; "
                             "give e.g. torch.nn.CrossEntropyLoss or F.cross_entropy")
        criterion = criterion()
    if not callable(criterion):
        raise ValueError(f"criterion={criterion!r} is not callable; give a loss such as "
                         "torch.nn.functional.cross_entropy")
    return criterion


class BatchStream:
    """Cycles over a task's re-iterable data, starting a new pass when one ends."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self._iterator: Iterator[Any] | None = None

    def next(self) -> Any:
        """The next batch."""
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.data)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError("a task's data yielded no batches; register a non-empty re-iterable "
                         "of (inputs, targets) batches (a list or a DataLoader)")


def _validate_common(init_lr: float | None, bn_mode: str) -> None:
    if init_lr is not None and (isinstance(init_lr, bool) or not isinstance(init_lr, (int, float))
                                or not 0 < init_lr < math.inf):
        raise ValueError(f"init_lr={init_lr!r} must be a finite positive number, or None to "
                         "leave the initialisation's step to meta_step_fn")
    BatchNormMode(bn_mode)


def _accumulate(target: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            target[i] = g if target[i] is None else target[i] + g  # type: ignore[operator]


def _check_finite(warp: WarpedModel, params: Sequence[Tensor],
                  grads: Sequence[Tensor | None]) -> None:
    """Raises before a non-finite meta-gradient is written (one host transfer)."""
    if all_finite([g for g in grads if g is not None]):
        return
    names = {id(p): n for n, p in warp.named_meta_parameters(include_init=True)}
    bad = [names.get(id(p), "?") for p, g in zip(params, grads, strict=True)
           if g is not None and not bool(torch.isfinite(g).all())]
    raise NonFiniteError(task=None, inner_step=None, where="meta_gradient", names=bad)


def _check_finite_init(warp: WarpedModel, grads: Params) -> None:
    init = dict(warp.named_init_parameters())
    _check_finite(warp, [init[n] for n in grads], list(grads.values()))


def _write_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            accumulate_grad(p, g)


def _meta_targets(warp: WarpedModel, ctx: ReplayContext) -> tuple[list[Tensor], list[Tensor]]:
    """(leaves to differentiate, tensors whose ``.grad`` receives the result)."""
    names = list(ctx.warp)
    warp_params = dict(warp.named_warp_parameters())
    leaves = [ctx.warp[n] for n in names]
    targets: list[Tensor] = [warp_params[n] for n in names]
    if warp.learn_optimizer:
        opt = list(warp.optimizer_parameters())
        leaves += opt
        targets += opt
    return leaves, targets


def _apply_init(warp: WarpedModel, grads: Params, init_lr: float | None) -> bool:
    """Writes or applies the init gradient; True when ``meta_step_fn`` must be called."""
    init = dict(warp.named_init_parameters())
    if init_lr is None:
        _write_grads([init[n] for n in grads], list(grads.values()))
        return True
    with torch.no_grad():
        for n, g in grads.items():
            init[n].sub_(init_lr * g)
    return False


def _check_replay_vectorize(vectorize: int, bn_mode: str) -> int:
    if isinstance(vectorize, bool) or not isinstance(vectorize, int) or vectorize < 0:
        raise ValueError(f"vectorize={vectorize!r} must be an integer >= 0 (0 or 1: one "
                         "state at a time)")
    if vectorize > 1 and BatchNormMode(bn_mode) is not BatchNormMode.BATCH:
        raise ValueError(f"vectorize={vectorize} needs bn_mode='batch' (got {bn_mode!r})")
    return vectorize


class DualUpdater:
    """Algorithm 2: replay stored states through the warp objective, then update the init.

    Args:
        criterion: task loss, a class (``CrossEntropyLoss``) or callable (``F.cross_entropy``).
        warp_objective: ``"stop_gradient"`` (default, Eq. 12, as the reference computes it),
            ``"exact"`` (Eq. 11), ``"approx"`` (no step), ``"none"``, a ``WarpObjective``, or the
            reference's codes 1 (stop-gradient) and 0 (none).
        init_objective: ``"simplified_leap"`` (default, the reference's), ``"leap"``,
            ``"none"``, an ``InitObjective``, or the reference's codes 1 and 0.
        epochs: passes over the buffer.
        bsz: replayed states per meta-optimizer step; the mini-batch loss is the mean over its
            states. ``bsz <= 0`` puts every state of the epoch in one step.
        norm: normalise segments in the Leap objectives.
        approx: the reference's flag for ``warp_objective="approx"``.
        init_lr: step size of the updater's own SGD step on the initialisation, so that the
            README usage (a meta-optimizer over ``warp_parameters()`` only) also learns the
            init. With ``None``, the init gradient is written to ``.grad`` and ``meta_step_fn``
            is called once more (as in the reference): then give ``init_parameters()`` to your
            meta-optimizer. ``Warp.meta_parameters()`` includes the init only in that case.
        seed: seed of the replay order (default: torch's global generator).
        bn_mode: BatchNorm mode of the replayed forward passes (default batch statistics,
            like the task learner's training passes).
        vectorize: evaluate up to this many states of a mini-batch in one ``torch.func.vmap``
            call when their batches have equal shapes (0 or 1: one state at a time, which
            keeps one state's graph in memory; larger values trade memory for fewer, larger
            kernels, which pays off on accelerators). The states of such a call are stacked
            flat from the buffer in one operation, and the init objective then works on flat
            trajectories too (``InitObjective.flat_gradient``); both equal the one-at-a-time
            results up to the order of floating-point sums.
    """

    uses_buffer = True
    records_states = True
    learns_init = True

    def __init__(self, criterion: Criterion, *,
                 warp_objective: str | int | WarpObjective | None = "stop_gradient",
                 init_objective: str | int | InitObjective | None = "simplified_leap",
                 epochs: int = 1, bsz: int = 1, norm: bool = True, approx: bool = False,
                 init_lr: float | None = 0.1, seed: int | None = None,
                 bn_mode: str = "batch", vectorize: int = 0) -> None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs={epochs!r} must be an integer >= 1")
        if not isinstance(bsz, int) or isinstance(bsz, bool):
            raise ValueError(f"bsz={bsz!r} must be an integer (<= 0: all states in one step)")
        _validate_common(init_lr, bn_mode)
        _check_replay_vectorize(vectorize, bn_mode)
        self.criterion = make_criterion(criterion)
        self.warp_objective = resolve_warp_objective(warp_objective, approx=approx)
        self.init_objective = resolve_init_objective(init_objective, norm=norm)
        self.epochs = epochs
        self.bsz = bsz
        self.norm = norm
        self.init_lr = init_lr
        self.bn_mode = bn_mode
        self.vectorize = vectorize
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator()
            self._generator.manual_seed(seed)

    def random_state(self) -> torch.Tensor | None:
        """The state of the replay-order generator (``seed=``), ``None`` without a seed: what a
        checkpoint needs so that a resumed run replays in the same order."""
        return None if self._generator is None else self._generator.get_state()

    def set_random_state(self, state: torch.Tensor | None) -> None:
        """Restores ``random_state()`` (``None`` changes nothing)."""
        if state is not None and self._generator is not None:
            self._generator.set_state(state)

    def _chunks(self, n: int) -> list[list[int]]:
        # Drawn on the host (a CPU generator): reading it never waits for the device.
        order = host_list(torch.randperm(n, generator=self._generator))
        size = n if self.bsz <= 0 else self.bsz
        return [order[i:i + size] for i in range(0, n, size)]

    def _replay_chunk(self, warp: WarpedModel, chunk: Sequence[tuple[str, int]],
                      streams: dict[str, BatchStream], size: int = 1
                      ) -> tuple[list[Tensor], list[Tensor | None], Tensor, int]:
        """Mean warp loss over ``chunk``; returns (targets, summed grads, detached loss, calls
        of the objective)."""
        objective = self.warp_objective
        assert objective is not None
        ctx = warp.replay_context(self.criterion, bn_mode=self.bn_mode)
        leaves, targets = _meta_targets(warp, ctx)
        sums: list[Tensor | None] = [None] * len(leaves)
        total = torch.zeros((), device=ctx.device)
        calls = 0
        size = max(size, 1)  # 0 and 1: one state at a time
        for start in range(0, len(chunk), size):
            group = chunk[start:start + size]
            batches = [[ctx.batch(streams[slot].next()) for _ in range(objective.num_batches)]
                       for slot, _ in group]
            shapes = {tuple((x.shape, y.shape) for x, y in b) for b in batches}
            if len(group) > 1 and len(shapes) == 1:
                # The group's states stacked flat in one operation, replayed in one vmap.
                flat = warp.buffer.flat_states(group, device=ctx.device)
                losses = [objective.batched_loss(ctx, flat, batches).sum()]
            else:
                states = [warp.buffer.state(slot, index, device=ctx.device)
                          for slot, index in group]
                losses = [objective.loss(ctx, s, b) for s, b in zip(states, batches,
                                                                     strict=True)]
            calls += len(losses)
            # One backward per state (or per vectorised group) keeps only its graph alive; the
            # sum of loss / len(chunk) gradients is the gradient of the mini-batch mean.
            for loss in losses:
                loss = loss / len(chunk)
                _accumulate(sums, torch.autograd.grad(loss, leaves, allow_unused=True))
                total = total + loss.detach()
        return targets, sums, total, calls

    def _init_gradient(self, warp: WarpedModel, streams: dict[str, BatchStream], *,
                       flat: bool = False) -> Params:
        """The init objective's gradient; ``flat``: from flat trajectories
        (``InitObjective.flat_gradient``, the vectorized replay's form)."""
        assert self.init_objective is not None
        ctx = warp.replay_context(self.criterion, bn_mode=self.bn_mode)
        slots = warp.buffer.slots()
        batches = [ctx.batch(streams[s].next()) if self.init_objective.needs_batch else None
                   for s in slots]
        if flat:
            return self.init_objective.flat_gradient(
                ctx, [warp.buffer.flat_trajectory(s, device=ctx.device) for s in slots],
                batches)
        trajectories = [warp.buffer.trajectory(s, device=ctx.device) for s in slots]
        return self.init_objective.gradient(ctx, trajectories, batches)

    def backward(self, warp: WarpedModel, step_fn: Callable[[], Any]) -> UpdateResult:
        """Runs the warp objective over the buffer and then the init objective.

        Args:
            warp: the wrapped model whose buffer holds the trajectories.
            step_fn: called after each mini-batch's gradients are written to ``.grad`` (it
                must step the meta-optimizer and zero the gradients, as in the README).
        """
        buffer = warp.buffer
        slots = buffer.slots()
        streams = {s: BatchStream(buffer.data(s)) for s in slots}
        points = [(s, i) for s in slots for i in range(buffer.num_states(s))]
        steps = calls = 0
        losses: list[Tensor] = []
        start = time.perf_counter()
        if self.warp_objective is not None and points:
            for _ in range(self.epochs):
                for chunk in self._chunks(len(points)):
                    targets, sums, loss, chunk_calls = self._replay_chunk(
                        warp, [points[j] for j in chunk], streams, self.vectorize)
                    calls += chunk_calls
                    losses.append(loss * len(chunk))
                    # A NaN replay batch can give a NaN gradient at a finite state.
                    _check_finite(warp, targets, sums)
                    _write_grads(targets, sums)
                    step_fn()
                    steps += 1
        warp_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if self.init_objective is not None and slots:
            grads = self._init_gradient(warp, streams, flat=self.vectorize > 1)
            _check_finite_init(warp, grads)
            if grads and _apply_init(warp, grads, self.init_lr):
                step_fn()
                steps += 1
        init_seconds = time.perf_counter() - start
        mean = (torch.stack(losses).sum().item() / (len(points) * self.epochs)
                if losses else None)
        return UpdateResult(mean, len(points), steps, warp_seconds, init_seconds,
                            replay_calls=calls)

    def accumulate(self, warp: WarpedModel, *, vectorize: int | None = None,
                   read_loss: bool = True) -> UpdateResult:
        """Adds the meta-gradients of every group to ``.grad`` without stepping.

        The warp (and optimizer-parameter) gradient is that of the mean objective over all
        stored states (one epoch, ``bsz`` ignored); the init gradient is written to the init
        parameters' ``.grad`` whatever ``init_lr`` is. This is what ``MetaLearner.meta_step``
        needs: one meta-optimizer step over every meta-parameter.

        Args:
            warp: the wrapped model whose buffer holds the trajectories.
            vectorize: states per ``vmap`` call for this call (default: the updater's own
                ``vectorize``); needs ``bn_mode="batch"`` when > 1.
            read_loss: read the mean warp loss into ``UpdateResult.warp_loss`` (a host
                transfer); ``False`` leaves it ``None`` (``WarpGrad.meta_step``, which does not
                report it, reads nothing here).
        """
        size = self.vectorize if vectorize is None else _check_replay_vectorize(
            vectorize, self.bn_mode)
        buffer = warp.buffer
        slots = buffer.slots()
        streams = {s: BatchStream(buffer.data(s)) for s in slots}
        points = [(s, i) for s in slots for i in range(buffer.num_states(s))]
        start = time.perf_counter()
        mean = None
        calls = 0
        if self.warp_objective is not None and points:
            order = host_list(torch.randperm(len(points), generator=self._generator))
            targets, sums, loss, calls = self._replay_chunk(
                warp, [points[j] for j in order], streams, size)
            _write_grads(targets, sums)
            mean = loss.item() if read_loss else None
        warp_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if self.init_objective is not None and slots:
            _apply_init(warp, self._init_gradient(warp, streams, flat=size > 1), None)
        return UpdateResult(mean, len(points), 0, warp_seconds, time.perf_counter() - start,
                            replay_calls=calls)

    def on_record(self, warp: WarpedModel, slot: str, state: ReplayState) -> None:
        """Called by ``Warp`` for every recorded state; nothing to do before the replay."""

    def on_finalize(self, warp: WarpedModel, slot: str, params: Params) -> None:
        """Called by ``Warp`` with a task's final parameters; stored by the buffer."""

    def __repr__(self) -> str:
        return (f"DualUpdater(warp_objective={self.warp_objective}, init_objective="
                f"{self.init_objective}, epochs={self.epochs}, bsz={self.bsz}, "
                f"init_lr={self.init_lr})")


class OnlineUpdater:
    """Algorithm 1 (online WarpGrad): the warp objective at every step of adaptation.

    Each time ``Warp`` records a state while collecting, the warp objective's gradient at that
    state (on two fresh batches of the task) is added to a running sum, and the initialisation's
    simplified-Leap gradient gets the segment from the previous state. ``Warp.backward`` then
    writes the means (over states for the warp parameters, over tasks for the init) and calls
    ``meta_step_fn`` once. No state is stored in the replay buffer (its ``data`` only).

    Args:
        criterion: as in ``DualUpdater``.
        warp_objective: as in ``DualUpdater``.
        init_objective: ``"simplified_leap"`` (default), ``"none"`` or a ``SimplifiedLeap``;
            full Leap needs whole trajectories and is not available online.
        norm: normalise segments in the init objective.
        init_lr: as in ``DualUpdater``.
        bn_mode: as in ``DualUpdater``.
    """

    uses_buffer = False
    records_states = True
    learns_init = True

    def __init__(self, criterion: Criterion, *,
                 warp_objective: str | int | WarpObjective | None = "stop_gradient",
                 init_objective: str | int | InitObjective | None = "simplified_leap",
                 norm: bool = True, init_lr: float | None = 0.1,
                 bn_mode: str = "batch") -> None:
        _validate_common(init_lr, bn_mode)
        self.criterion = make_criterion(criterion)
        self.warp_objective = resolve_warp_objective(warp_objective)
        self.init_objective = resolve_init_objective(init_objective, norm=norm)
        if isinstance(self.init_objective, Leap):
            raise ValueError("init_objective='leap' needs whole trajectories; use "
                             "'simplified_leap' or 'none' with OnlineUpdater, or DualUpdater")
        self.init_lr = init_lr
        self.bn_mode = bn_mode
        self._reset()

    def _reset(self) -> None:
        self._streams: dict[str, BatchStream] = {}
        self._warp_sums: list[Tensor | None] = []
        self._targets: list[Tensor] = []
        self._loss_sum: Tensor | None = None
        self._count = 0
        self._previous: dict[str, Params] = {}
        self._init_sums: dict[str, Params] = {}
        self._seconds = 0.0

    def on_record(self, warp: WarpedModel, slot: str, state: ReplayState) -> None:
        """Adds the warp gradient at ``state`` and the init segment ending at it."""
        start = time.perf_counter()
        ctx = warp.replay_context(self.criterion, bn_mode=self.bn_mode)
        if self.warp_objective is not None:
            stream = self._streams.setdefault(slot, BatchStream(warp.buffer.data(slot)))
            batches = [ctx.batch(stream.next()) for _ in range(self.warp_objective.num_batches)]
            leaves, targets = _meta_targets(warp, ctx)
            loss = self.warp_objective.loss(ctx, state, batches)
            if not self._warp_sums:
                self._warp_sums = [None] * len(leaves)
            self._targets = targets
            _accumulate(self._warp_sums, torch.autograd.grad(loss, leaves, allow_unused=True))
            self._loss_sum = loss.detach() if self._loss_sum is None else (
                self._loss_sum + loss.detach())
        self._count += 1
        self._add_segment(ctx, slot, state.params)
        self._seconds += time.perf_counter() - start

    def on_finalize(self, warp: WarpedModel, slot: str, params: Params) -> None:
        """Adds the task's last segment to the init gradient."""
        ctx = warp.replay_context(self.criterion, bn_mode=self.bn_mode)
        self._add_segment(ctx, slot, params)
        self._previous.pop(slot, None)

    def _add_segment(self, ctx: ReplayContext, slot: str, params: Params) -> None:
        if self.init_objective is None:
            return
        current = {n: params[n].detach().to(ctx.device, copy=True) for n in ctx.adapt_names}
        previous = self._previous.get(slot)
        self._previous[slot] = current
        if previous is None:
            self._init_sums.setdefault(slot, {})
            return
        segment = self.init_objective.gradient(ctx, [[previous, current]], [None])
        sums = self._init_sums.setdefault(slot, {})
        for n, g in segment.items():
            sums[n] = sums[n] + g if n in sums else g

    def backward(self, warp: WarpedModel, step_fn: Callable[[], Any]) -> UpdateResult:
        """Writes the mean warp gradient (and the init gradient) and steps once."""
        steps = 0
        start = time.perf_counter()
        mean = None
        if self._count and self._targets:
            means = [None if g is None else g / self._count for g in self._warp_sums]
            try:
                _check_finite(warp, self._targets, means)
            except NonFiniteError:
                self._reset()  # the sums are spent either way
                raise
            _write_grads(self._targets, means)
            assert self._loss_sum is not None
            mean = self._loss_sum.item() / self._count
        init_grads: Params = {}
        tasks = [s for s in self._init_sums.values() if s]
        for sums in tasks:
            for n, g in sums.items():
                init_grads[n] = init_grads[n] + g if n in init_grads else g
        init_grads = {n: g / len(tasks) for n, g in init_grads.items()}
        try:
            _check_finite_init(warp, init_grads)
        except NonFiniteError:
            self._reset()
            raise
        call = bool(self._targets) and self._count > 0
        if init_grads and _apply_init(warp, init_grads, self.init_lr):
            call = True
        if call:
            step_fn()
            steps = 1
        result = UpdateResult(mean, self._count, steps,
                              self._seconds + time.perf_counter() - start, 0.0)
        self._reset()
        return result

    def __repr__(self) -> str:
        return (f"OnlineUpdater(warp_objective={self.warp_objective}, init_objective="
                f"{self.init_objective}, init_lr={self.init_lr})")


class ContinualUpdater:
    """Online WarpGrad for a task learner that is never reset (continual learning).

    The setting of the paper's maze-navigation experiment (Flennerhag et al., ICLR 2020,
    Section 4.3): every episode is a new task, the adaptable parameters keep training from task
    to task (no initialisation is meta-learned) and the warp parameters are meta-learned on a
    slower clock from the same objective the learner minimises. Per task, after the learner's
    ``loss.backward()``, ``Warp.accumulate_warp_gradients()`` moves the warp parameters'
    gradients into a running sum (when collecting; otherwise they are discarded, e.g. during a
    burn-in). ``Warp.backward(meta_step_fn)`` then writes the mean over the accumulated tasks,
    clipped to ``clip_norm``, checks it is finite (one host transfer) and calls
    ``meta_step_fn`` once::

        warp_grad = clip(1/N sum_{tasks i} d loss_i / d warp | the learner's parameters at task i)

    The loss is the learner's own: no data is registered, nothing is recorded or replayed.

    Args:
        clip_norm: maximum total norm of the mean warp gradient (``None``: no clipping).
    """

    uses_buffer = False
    records_states = False
    learns_init = False
    init_lr = None

    def __init__(self, *, clip_norm: float | None = None) -> None:
        if clip_norm is not None and (isinstance(clip_norm, bool)
                                      or not isinstance(clip_norm, (int, float))
                                      or not 0 < clip_norm < math.inf):
            raise ValueError(f"clip_norm={clip_norm!r} must be a finite positive number, or "
                             "None for no clipping")
        self.clip_norm = clip_norm
        self._sums: list[Tensor] = []
        self.count = 0

    def accumulate(self, warp: WarpedModel, *, collect: bool) -> None:
        """Moves the warp parameters' ``.grad`` into the running sum (``collect``) or drops it.

        Either way ``.grad`` is left ``None``, so no task's warp gradient leaks into another's
        (or into the meta-optimizer) except through the sum. A parameter without a gradient
        (unused by this task's loss) adds zero.
        """
        params = [p for _, p in warp.named_warp_parameters()]
        if collect:
            with torch.no_grad():
                for total, p in zip(self._sums_like(params), params, strict=True):
                    if p.grad is not None:
                        total.add_(p.grad)
            self.count += 1
        for p in params:
            p.grad = None

    def backward(self, warp: WarpedModel, step_fn: Callable[[], Any]) -> UpdateResult:
        """Writes the (clipped) mean warp gradient and calls ``step_fn`` once; resets the sum.

        The warp parameters' ``.grad`` is ``None`` afterwards, whatever ``step_fn`` did.
        Without accumulated tasks (or warp parameters) nothing is written or stepped.

        Raises:
            NonFiniteError: the mean gradient holds NaN or inf (``where="meta_gradient"``); the
                sum is kept, nothing is written.
        """
        start = time.perf_counter()
        params = [p for _, p in warp.named_warp_parameters()]
        if not self.count or not params:
            self._reset()
            return UpdateResult(None, 0, 0, time.perf_counter() - start, 0.0)
        means = [total / self.count for total in self._sums_like(params)]
        _check_finite(warp, params, means)
        count = self.count
        for p, g in zip(params, means, strict=True):
            p.grad = g
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        step_fn()
        # The mean is spent: a step function that does not zero it must not leak it into the
        # next task's sum (accumulate adds whatever .grad holds).
        for p in params:
            p.grad = None
        self._reset()
        return UpdateResult(None, count, 1, time.perf_counter() - start, 0.0)

    def _sums_like(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The sums, made (zeros) on the first task, moved next to the parameters after a
        ``load_state_dict`` (checkpoints load onto the CPU)."""
        if not self._sums:
            self._sums = [torch.zeros_like(p) for p in params]
        elif len(self._sums) != len(params):
            raise ValueError(f"this updater sums {len(self._sums)} warp gradients but the Warp "
                             f"has {len(params)} warp parameters; use one ContinualUpdater per "
                             "Warp")
        elif self._sums[0].device != params[0].device:
            self._sums = [total.to(p.device) for total, p in zip(self._sums, params, strict=True)]
        return self._sums

    def _reset(self) -> None:
        for total in self._sums:
            total.zero_()
        self.count = 0

    def reset(self) -> None:
        """Forgets the accumulated warp gradients (e.g. a non-finite sum ``backward`` refused)."""
        self._reset()

    def on_record(self, warp: WarpedModel, slot: str, state: ReplayState) -> None:
        """Never called: ``records_states`` is False."""

    def on_finalize(self, warp: WarpedModel, slot: str, params: Params) -> None:
        """Nothing to do at the end of a task."""

    def state_dict(self) -> dict[str, Any]:
        """The running sum and its count (a resumed run continues the interval exactly)."""
        return {"sums": [total.clone() for total in self._sums], "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()`` (the sums are copied onto this updater's device)."""
        sums = list(state["sums"])
        if self._sums and len(sums) != len(self._sums):
            raise ValueError(f"the state holds {len(sums)} warp gradient sums, this updater "
                             f"{len(self._sums)}; load a state written for the same model")
        self._sums = [total.clone() for total in sums]
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"ContinualUpdater(clip_norm={self.clip_norm})"
