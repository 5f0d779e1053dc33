"""WarpGrad's meta-objectives: the warp objective over replayed states and the init objective.

Warp objective (Flennerhag et al., "Meta-Learning with Warped Gradient Descent", ICLR 2020,
Algorithm 2). For a stored task state ``theta`` (a constant: no gradient flows through the
trajectory that produced it), warp parameters ``phi`` and two fresh batches ``b1, b2`` of the
same task::

    theta' = theta - lr * step(grad_theta L(theta, phi; b1))          (one inner SGD step)
    J(phi) = mean over replayed states of L(theta', phi; b2)

``mode`` says which derivatives of ``J`` are kept:

- ``"exact"`` (Eq. 11 of the paper): the full derivative through the step,
  ``dJ/dphi = d_phi L(theta', phi) - lr * (d_phi grad_theta L(theta, phi; b1))^T
  grad_theta' L(theta', phi; b2)``; second order (mixed derivatives of the inner loss).
- ``"stop_gradient"`` (Eq. 12, what the reference code computes): the inner gradient is a
  constant, ``theta' = theta - lr * stop_gradient(grad_theta L(theta, phi; b1))``, so the warp
  parameters get only ``d_phi L(theta', phi; b2)`` (first order). The learning rates and momenta
  keep their explicit path through the step (``dJ/dlr = -stop_gradient(g) .
  grad_theta' L(theta', phi; b2)``), as in the reference, otherwise they would learn nothing.
- ``"approx"`` (the reference's ``approx=True``): no step, ``J = L(theta, phi; b1)``.

Init objectives act on the trajectories ``theta_0, ..., theta_K`` (the last segment, from the
state before the final step to the adapted parameters, included):

- ``SimplifiedLeap`` (the reference's ``simplified_leap``): the gradient with respect to the
  initialisation is ``sum_i (theta_i - theta_{i+1}) / ||theta_i - theta_{i+1}||``, averaged over
  tasks (``norm=False`` drops the division). A gradient step pulls the initialisation forward
  along every task's path.
- ``Leap`` (Flennerhag et al., "Transferring Knowledge across Learning Processes", ICLR 2019):
  segments live in the loss surface, ``d_i = sqrt(||Delta theta_i||^2 + Delta L_i^2)``, and the
  gradient is ``-sum_i (Delta theta_i + Delta L_i grad L(theta_i)) / d_i`` averaged over tasks,
  with ``Delta theta_i = theta_{i+1} - theta_i`` and the losses and gradients evaluated on one
  batch of the task (warp parameters held fixed). It reduces to ``SimplifiedLeap`` when every
  ``Delta L_i = 0``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metazoo import Buffers, Params, closed_form_batch_norm, forward
from warpgrad.buffer import FlatStates, ReplayState
from warpgrad.flat import FlatLayout
from warpgrad.optimizer_parameters import OptimizerParameters

__all__ = [
    "InitObjective",
    "Leap",
    "ReplayContext",
    "SimplifiedLeap",
    "WarpObjective",
    "resolve_init_objective",
    "resolve_warp_objective",
]

#: Added to segment lengths so a zero-length segment contributes zero, not NaN.
NORM_EPS = 1e-9


@dataclass
class ReplayContext:
    """What an objective needs to evaluate the model away from its own parameters.

    Attributes:
        model: the wrapped network, called through ``metazoo.forward`` (never mutated).
        criterion: ``criterion(output, target) -> loss``.
        adapt_names: names of the adaptable parameters.
        warp: the warp parameters as leaves that require grad (the meta-gradient is taken
            with respect to these).
        static: every other parameter, detached.
        buffers: the model's buffers (BatchNorm statistics, not updated by the replay).
        optimizer_parameters: the inner learning rates and momenta.
        bn_mode: ``metazoo.BatchNormMode`` used by the replay (default: batch statistics, as
            the task learner trains in train mode).
        device: where batches and states are moved.
    """

    model: nn.Module
    criterion: Callable[[Tensor, Tensor], Tensor]
    adapt_names: list[str]
    warp: Params
    static: Params
    buffers: Buffers
    optimizer_parameters: OptimizerParameters
    bn_mode: str
    device: torch.device

    def batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` on the model's device."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"a task must yield (inputs, targets) batches, got "
                             f"{type(batch).__name__}")
        return (batch[0].to(self.device, non_blocking=True),
                batch[1].to(self.device, non_blocking=True))

    def loss(self, adapt: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Training-mode loss of the model with adaptable parameters ``adapt``."""
        params = {**self.static, **self.warp, **adapt}
        output, _ = forward(self.model, params, self.buffers, batch[0], bn_mode=self.bn_mode,
                            training=True)
        return self.criterion(output, batch[1])


class WarpObjective:
    """The one-step warp objective of Algorithm 2 (see the module docstring).

    Args:
        mode: ``"exact"`` (Eq. 11), ``"stop_gradient"`` (Eq. 12) or ``"approx"`` (no step).
    """

    MODES = ("exact", "stop_gradient", "approx")

    def __init__(self, mode: str = "stop_gradient") -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r} is not one of {self.MODES}")
        self.mode = mode

    @property
    def num_batches(self) -> int:
        """Fresh batches each replayed state needs (2 with a step, 1 for ``approx``)."""
        return 1 if self.mode == "approx" else 2

    def loss(self, ctx: ReplayContext, state: ReplayState,
             batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """The meta-loss of one replayed state, differentiable in ``ctx.warp`` (and, through
        the step, in the optimizer parameters).

        Args:
            ctx: see ``ReplayContext``.
            state: the stored state (its tensors are treated as constants).
            batches: ``num_batches`` batches of the state's task, on ``ctx.device``.
        """
        theta = {n: state.params[n].to(ctx.device).detach().requires_grad_(self.mode != "approx")
                 for n in ctx.adapt_names}
        if self.mode == "approx":
            return ctx.loss(theta, batches[0])
        inner = ctx.loss(theta, batches[0])
        grads = torch.autograd.grad(inner, list(theta.values()),
                                    create_graph=self.mode == "exact")
        optimizer = ctx.optimizer_parameters.inner_optimizer()
        opt_state: dict[str, Any] = {"step": 0}
        if ctx.optimizer_parameters.has_momentum:
            opt_state["momentum_buffer"] = {n: torch.zeros_like(t) for n, t in theta.items()}
            if state.momentum is not None:
                # torch.optim.SGD's buffer exists from the second step on; metazoo.SGD's step
                # counter reproduces the first-step rule (buffer = gradient) when it is absent.
                opt_state = {"step": 1, "momentum_buffer": {
                    n: state.momentum[n].to(ctx.device).detach() for n in ctx.adapt_names}}
        new_theta, _ = optimizer.step(theta, dict(zip(theta, grads, strict=True)), opt_state)
        return ctx.loss(new_theta, batches[1])

    def batched_loss(self, ctx: ReplayContext, states: FlatStates | Sequence[ReplayState],
                     batches: Sequence[Sequence[tuple[Tensor, Tensor]]]) -> Tensor:
        """The meta-losses of several states at once (``torch.func.vmap`` over states).

        Same values and derivatives as ``loss`` on each state, provided every state's batches
        have the same shapes. The states travel flat (``ReplayBuffer.flat_states``): the inner
        gradient is gathered into one vector and the step is
        ``OptimizerParameters.flat_inner_optimizer``'s (``loss``'s SGD rule, one operation per
        term for all parameter tensors). BatchNorm layers normalise with batch statistics
        (``bn_mode="batch"``) through ``metazoo.closed_form_batch_norm``, whose vmap rules and
        derivatives of every order are exact under ``vmap`` (``F.batch_norm``'s batching rule
        gives wrong second derivatives for the warp parameters captured from outside it).

        Args:
            ctx: see ``ReplayContext``.
            states: the states, stacked flat, or as ``ReplayState`` objects (stacked here).
            batches: per state, ``num_batches`` batches on ``ctx.device``.

        Returns:
            The losses, shape ``[number of states]``.
        """
        if ctx.bn_mode != "batch":
            raise ValueError("the vectorised replay needs bn_mode='batch'; use vectorize=0")
        flat = states if isinstance(states, FlatStates) else _stack_states(states,
                                                                          ctx.adapt_names)
        layout = flat.layout
        if sorted(layout.names) != sorted(ctx.adapt_names):
            raise ValueError(f"the states hold {sorted(layout.names)} but the adaptable "
                             f"parameters are {sorted(ctx.adapt_names)}")
        theta = flat.params.to(ctx.device).detach()
        params = ctx.optimizer_parameters
        optimizer = params.flat_inner_optimizer(layout)
        # torch.optim.SGD's first step (buffer = gradient) equals momentum * 0 + gradient, so a
        # missing buffer is a zero buffer.
        buf = None
        if params.has_momentum:
            buf = (torch.zeros_like(theta) if flat.momentum is None
                   else flat.momentum.to(ctx.device).detach())
        fixed = {**ctx.static, **ctx.warp}
        xs = [torch.stack([b[i][0] for b in batches]) for i in range(self.num_batches)]
        ys = [torch.stack([b[i][1] for b in batches]) for i in range(self.num_batches)]

        def loss_at(th: Params, x: Tensor, y: Tensor) -> Tensor:
            out, _ = forward(ctx.model, {**fixed, **th}, ctx.buffers, x, bn_mode="batch",
                             training=True)
            return ctx.criterion(out, y)

        def one(th: Tensor, mom: Tensor | None, x: list[Tensor], y: list[Tensor]) -> Tensor:
            if self.mode == "approx":
                return loss_at(layout.unflatten(th), x[0], y[0])
            grads = layout.flatten(torch.func.grad(loss_at)(layout.unflatten(th), x[0], y[0]))
            if self.mode == "stop_gradient":
                grads = grads.detach()
            opt_state: dict[str, Any] = {"step": 0}
            if mom is not None:
                opt_state = {"step": 1, "momentum_buffer": {"flat": mom}}
            stepped, _ = optimizer.step({"flat": th}, {"flat": grads}, opt_state)
            return loss_at(layout.unflatten(stepped["flat"]), x[1], y[1])

        with closed_form_batch_norm():
            return torch.func.vmap(one, in_dims=(0, None if buf is None else 0, 0, 0))(
                theta, buf, xs, ys)

    def __repr__(self) -> str:
        return f"WarpObjective(mode={self.mode!r})"


class InitObjective(ABC):
    """An objective for the shared initialisation, computed from whole trajectories."""

    #: Whether ``gradient`` needs one batch per task.
    needs_batch = False

    @abstractmethod
    def gradient(self, ctx: ReplayContext, trajectories: Sequence[Sequence[Params]],
                 batches: Sequence[tuple[Tensor, Tensor] | None]) -> Params:
        """The gradient with respect to the initialisation (by adaptable parameter name).

        Args:
            ctx: see ``ReplayContext``.
            trajectories: per task, ``[theta_0, ..., theta_K]`` on ``ctx.device``.
            batches: per task, a batch when ``needs_batch`` else ``None``.
        """

    def flat_gradient(self, ctx: ReplayContext, trajectories: Sequence[FlatStates],
                      batches: Sequence[tuple[Tensor, Tensor] | None]) -> Params:
        """``gradient`` from flat trajectories (``ReplayBuffer.flat_trajectory``): each
        ``params`` is ``[K + 1, numel]``. This default reads them back as parameters and calls
        ``gradient``; objectives that can work on the flat tensors override it."""
        return self.gradient(ctx, [[dict(t.layout.unflatten(row)) for row in t.params]
                                   for t in trajectories], batches)


def _stack_states(states: Sequence[ReplayState], names: Sequence[str]) -> FlatStates:
    """``ReplayState`` objects stacked flat (their momentum: zeros where a state has none)."""
    layout = FlatLayout.of({n: states[0].params[n] for n in names})
    params = torch.stack([layout.flatten(s.params) for s in states])
    momentum = None
    if any(s.momentum is not None for s in states):
        momentum = torch.stack([torch.zeros_like(params[0]) if s.momentum is None
                                else layout.flatten(s.momentum) for s in states])
    return FlatStates(layout, params, momentum)


def _stack(trajectory: Sequence[Params], names: Sequence[str]) -> dict[str, Tensor]:
    return {n: torch.stack([p[n] for p in trajectory]) for n in names}


def _segment_sq_norms(deltas: dict[str, Tensor]) -> Tensor:
    """Squared global norm of every segment, shape [segments], one reduction per tensor."""
    return sum(d.flatten(1).pow(2).sum(1) for d in deltas.values())  # type: ignore[return-value]


def _scale(d: Tensor, weights: Tensor) -> Tensor:
    return d * weights.view(-1, *([1] * (d.dim() - 1)))


class SimplifiedLeap(InitObjective):
    """Normalised pull-forward over consecutive states (the reference's simplified Leap).

    Args:
        norm: divide each segment by its length (the reference's default).
    """

    def __init__(self, *, norm: bool = True) -> None:
        self.norm = norm

    def gradient(self, ctx: ReplayContext, trajectories: Sequence[Sequence[Params]],
                 batches: Sequence[tuple[Tensor, Tensor] | None]) -> Params:
        grads: Params = {}
        count = 0
        for trajectory in trajectories:
            if len(trajectory) < 2:
                continue
            count += 1
            stacked = _stack(trajectory, ctx.adapt_names)
            # Vectorised over segments: one subtraction and one reduction per tensor.
            deltas = {n: s[:-1] - s[1:] for n, s in stacked.items()}
            weights = (1.0 / (_segment_sq_norms(deltas).sqrt() + NORM_EPS) if self.norm
                       else torch.ones(len(trajectory) - 1, device=ctx.device,
                                       dtype=next(iter(deltas.values())).dtype))
            for n, d in deltas.items():
                g = _scale(d, weights).sum(0)
                grads[n] = grads[n] + g if n in grads else g
        return {n: g / max(count, 1) for n, g in grads.items()}

    def flat_gradient(self, ctx: ReplayContext, trajectories: Sequence[FlatStates],
                      batches: Sequence[tuple[Tensor, Tensor] | None]) -> Params:
        """``gradient`` on flat trajectories: the segments of every task at once (a few
        operations in all; equal to ``gradient`` up to the order of floating-point sums)."""
        paths = [t.params for t in trajectories if t.params.shape[0] >= 2]
        if not paths:
            return {}
        layouts = {t.layout for t in trajectories}
        if len(layouts) != 1:
            raise ValueError("the trajectories have different parameter structures")
        layout = layouts.pop()
        total: Tensor | None = None
        # Tasks with trajectories of one length (the usual case) in one stack.
        by_length: dict[int, list[Tensor]] = {}
        for path in paths:
            by_length.setdefault(path.shape[0], []).append(path)
        for group in by_length.values():
            stacked = torch.stack(group)  # [tasks, K + 1, numel]
            deltas = stacked[:, :-1] - stacked[:, 1:]
            if self.norm:
                deltas = deltas / (deltas.pow(2).sum(-1, keepdim=True).sqrt() + NORM_EPS)
            g = deltas.sum((0, 1))
            total = g if total is None else total + g
        assert total is not None
        return layout.unflatten(total / len(paths))

    def __repr__(self) -> str:
        return f"SimplifiedLeap(norm={self.norm})"


class Leap(InitObjective):
    """Leap's gradient with the loss dimension (see the module docstring).

    Args:
        norm: divide each segment by its length ``d_i``.
    """

    needs_batch = True

    def __init__(self, *, norm: bool = True) -> None:
        self.norm = norm

    def gradient(self, ctx: ReplayContext, trajectories: Sequence[Sequence[Params]],
                 batches: Sequence[tuple[Tensor, Tensor] | None]) -> Params:
        grads: Params = {}
        count = 0
        for trajectory, batch in zip(trajectories, batches, strict=True):
            if len(trajectory) < 2:
                continue
            if batch is None:
                raise ValueError("Leap needs one batch per task")
            count += 1
            losses, loss_grads = [], []
            warp = {n: w.detach() for n, w in ctx.warp.items()}
            for i, point in enumerate(trajectory):
                # Gradients are needed at segment entries only, not at the final point.
                entry = i < len(trajectory) - 1
                theta = {n: point[n].detach().requires_grad_(entry) for n in ctx.adapt_names}
                params = {**ctx.static, **warp, **theta}
                with torch.set_grad_enabled(entry):
                    output, _ = forward(ctx.model, params, ctx.buffers, batch[0],
                                        bn_mode=ctx.bn_mode, training=True)
                    loss = ctx.criterion(output, batch[1])
                if entry:
                    point_grads = torch.autograd.grad(loss, list(theta.values()))
                    loss_grads.append(dict(zip(theta, point_grads, strict=True)))
                losses.append(loss.detach())
            loss_vec = torch.stack(losses)
            delta_loss = loss_vec[1:] - loss_vec[:-1]
            stacked = _stack(trajectory, ctx.adapt_names)
            entry_grads = _stack(loss_grads, ctx.adapt_names)
            deltas = {n: s[1:] - s[:-1] for n, s in stacked.items()}
            if self.norm:
                lengths = (_segment_sq_norms(deltas) + delta_loss.pow(2)).sqrt() + NORM_EPS
                weights = 1.0 / lengths
            else:
                weights = torch.ones_like(delta_loss)
            for n, d in deltas.items():
                g = -_scale(d + _scale(entry_grads[n], delta_loss), weights).sum(0)
                grads[n] = grads[n] + g if n in grads else g
        return {n: g / max(count, 1) for n, g in grads.items()}

    def __repr__(self) -> str:
        return f"Leap(norm={self.norm})"


_WARP_BY_INT = {0: "none", 1: "stop_gradient"}
_INIT_BY_INT = {0: "none", 1: "simplified_leap"}


def resolve_warp_objective(spec: str | int | WarpObjective | None, *, approx: bool = False
                           ) -> WarpObjective | None:
    """A ``WarpObjective`` (or ``None`` for no warp objective) from a name, object or the
    reference's integer code (0: none, 1: the one-step objective as the reference computes it).

    Args:
        spec: ``"stop_gradient"``, ``"exact"``, ``"approx"``, ``"none"``/``None``, 0, 1 or a
            ``WarpObjective``.
        approx: the reference's flag; turns a step objective into ``"approx"``.
    """
    if isinstance(spec, bool):
        raise ValueError(f"warp_objective={spec!r}: give a name such as 'stop_gradient'")
    if isinstance(spec, int):
        if spec not in _WARP_BY_INT:
            raise ValueError(f"warp_objective={spec} is not a reference code (0 or 1); use a "
                             f"name: 'stop_gradient', 'exact', 'approx' or 'none'")
        spec = _WARP_BY_INT[spec]
    if spec is None or spec == "none":
        if approx:
            raise ValueError("approx=True needs a warp objective; drop approx or choose "
                             "warp_objective='stop_gradient'")
        return None
    if isinstance(spec, str):
        if spec not in WarpObjective.MODES:
            raise ValueError(f"warp_objective={spec!r} is unknown; use one of "
                             f"{(*WarpObjective.MODES, 'none')}")
        spec = WarpObjective(spec)
    if not isinstance(spec, WarpObjective):
        raise ValueError(f"warp_objective={spec!r} must be a name, 0/1 or a WarpObjective")
    if approx and spec.mode != "approx":
        if spec.mode == "exact":
            raise ValueError("approx=True contradicts warp_objective='exact'; use one of them")
        return WarpObjective("approx")
    return spec


def resolve_init_objective(spec: str | int | InitObjective | None, *, norm: bool = True
                           ) -> InitObjective | None:
    """An ``InitObjective`` (or ``None``) from a name, object or reference integer code.

    Args:
        spec: ``"simplified_leap"``, ``"leap"``, ``"none"``/``None``, 0, 1 or an
            ``InitObjective``.
        norm: used when ``spec`` is a name or code.
    """
    if isinstance(spec, bool):
        raise ValueError(f"init_objective={spec!r}: give a name such as 'simplified_leap'")
    if isinstance(spec, int):
        if spec not in _INIT_BY_INT:
            raise ValueError(f"init_objective={spec} is not a reference code (0 or 1); use a "
                             f"name: 'simplified_leap', 'leap' or 'none'")
        spec = _INIT_BY_INT[spec]
    if spec is None or spec == "none":
        return None
    if spec == "simplified_leap":
        return SimplifiedLeap(norm=norm)
    if spec == "leap":
        return Leap(norm=norm)
    if isinstance(spec, InitObjective):
        return spec
    raise ValueError(f"init_objective={spec!r} is unknown; use 'simplified_leap', 'leap', "
                     f"'none' or an InitObjective")
