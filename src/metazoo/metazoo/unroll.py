"""Differentiable inner loops: K optimizer steps folded from one pure inner step.

Step k evaluates ``loss_fn(params_k, buffers_k, batch_k)``, takes its gradient with respect to
the adapted parameters and applies the inner optimizer. With ``first_order=False`` (the default)
the gradient is taken with ``create_graph=True``, so the result is differentiable to second order
with respect to the initial parameters, the static parameters and every tensor hyperparameter.

Checkpointing (``checkpoint=S``) stores only the state at every S-th step (parameters, optimizer
state, buffers, RNG state), runs the inner loop forward without a second-order graph, and during
the backward pass recomputes one segment at a time with ``create_graph=True`` and backpropagates
through it. Memory is one segment's graph plus the stored boundary states, flat in K, and the
meta-gradient equals the plain unroll's exactly. (``torch.utils.checkpoint`` around each step is
exact too but re-runs the inner ``autograd.grad`` repeatedly and costs more than no
checkpointing at all; see ARCHITECTURE.md.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from metazoo.functional import Buffers, Params
from metazoo.optim import InnerOptimizer, OptState

Batch = Any
LossFn = Callable[[Params, Buffers, Batch], tuple[Tensor, Buffers]]

#: Segment length used by ``checkpoint=True``. Peak memory is about this many steps' graphs,
#: whatever K is; smaller segments store more boundary states (one parameter copy each).
DEFAULT_SEGMENT = 5

__all__ = ["DEFAULT_SEGMENT", "LossFn", "UnrollResult", "clip_grad_norm", "unroll"]


@dataclass(frozen=True)
class UnrollResult:
    """What an unroll returns.

    Attributes:
        params: the adapted parameters after the last step (differentiable).
        state: the optimizer state after the last step.
        buffers: the buffers after the last step; BatchNorm running statistics in ``"running"``
            mode are differentiable with respect to the parameters that produced them.
        losses: the inner loss of each step, evaluated before the step, detached, shape [K].
        trajectory: ``[params_0, ..., params_K]`` when ``keep_trajectory=True``, else ``None``;
            each point is differentiable.
        buffer_trajectory: ``[buffers_0, ..., buffers_K]`` alongside ``trajectory`` (the
            BatchNorm statistics each point was reached with), else ``None``.
    """

    params: Params
    state: OptState
    buffers: Buffers
    losses: Tensor
    trajectory: list[Params] | None = None
    buffer_trajectory: list[Buffers] | None = None


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """Scales ``grads`` so their global 2-norm is at most ``max_norm`` (out of place).

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    capped at 1), written with differentiable tensor operations and no host synchronisation.
    """
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * coefficient for g in grads]


class _ClipBackward(torch.autograd.Function):
    """Identity forward; the backward clips the global norm of the incoming gradients.

    In the ``setup_context`` form with ``generate_vmap_rule`` so that it also runs under
    ``torch.func`` transforms (``metazoo.vectorize.functional_unroll``): under ``vmap`` forward
    and backward run per task, so each task's gradients are clipped by their own norm, as in
    the per-task loop.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(max_norm: float, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.max_norm = inputs[0]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        present = [g for g in grads if g is not None]
        if not present:
            return (None, *grads)
        clipped = iter(clip_grad_norm(present, ctx.max_norm))
        return (None, *(None if g is None else next(clipped) for g in grads))


@dataclass
class _Run:
    """Everything about one unroll that is not a differentiable tensor."""

    loss_fn: LossFn
    optimizer: InnerOptimizer
    batches: Sequence[Batch]
    steps: int
    inner_grad_clip: float | None
    backward_grad_clip: float | None
    final_state: OptState | None = None  # set by the checkpointed forward pass

    def step(self, k: int, params: Params, static: Params, buffers: Buffers, state: OptState,
             optimizer: InnerOptimizer, *, create_graph: bool
             ) -> tuple[Params, OptState, Buffers, Tensor]:
        """One inner step; ``create_graph`` makes it differentiable to second order."""
        names = list(params)
        inputs = list(params.values())
        if (self.backward_grad_clip is not None and torch.is_grad_enabled()
                and any(p.requires_grad for p in inputs)):
            inputs = list(_ClipBackward.apply(self.backward_grad_clip, *inputs))
        with torch.enable_grad():
            if create_graph:
                leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in inputs]
                full = {**static, **dict(zip(names, leaves))}
            else:
                # First-order: the inner gradient is a constant, so build its graph on
                # detached copies and keep nothing that links back to the meta-parameters.
                leaves = [p.detach().requires_grad_() for p in inputs]
                full = {**{n: s.detach() for n, s in static.items()}, **dict(zip(names, leaves))}
            loss, new_buffers = self.loss_fn(full, buffers, self.batches[k % len(self.batches)])
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
                raise ValueError("loss_fn must return (scalar loss tensor, buffers); got a loss "
                                 f"of type {type(loss).__name__}{shape}")
            grads = list(torch.autograd.grad(loss, leaves, create_graph=create_graph))
        if self.inner_grad_clip is not None:
            grads = clip_grad_norm(grads, self.inner_grad_clip)
        step_params = dict(zip(names, leaves)) if create_graph else dict(zip(names, inputs))
        if not create_graph:
            # The running statistics were computed on the detached copies, whose graph the
            # autograd.grad above has freed: to first order they are constants, like the
            # inner gradient (backpropagating into them would fail).
            new_buffers = {n: b.detach() for n, b in new_buffers.items()}
        new_params, new_state = optimizer.step(step_params, dict(zip(names, grads)), state)
        return new_params, new_state, new_buffers, loss.detach()


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


def _replace_tensor_leaves(tree: Any, tensors: Sequence[Tensor]) -> Any:
    leaves, spec = pytree.tree_flatten(tree)
    replacements = iter(tensors)
    return pytree.tree_unflatten(
        [next(replacements) if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)


@dataclass(frozen=True)
class _RngState:
    """The CPU generator's state and, for parameters on an accelerator, that device's."""

    cpu: Tensor
    device: torch.device | None = None
    device_state: Tensor | None = None

    @staticmethod
    def capture(device: torch.device) -> _RngState:
        if device.type in ("cpu", "meta"):
            return _RngState(torch.get_rng_state())
        # The state of the parameters' own device, named explicitly: the current device of
        # the process may be another one (several GPUs in one process).
        module = torch.get_device_module(device.type)
        return _RngState(torch.get_rng_state(), device, module.get_rng_state(device))

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Runs the block from this state; the generators are put back afterwards."""
        if self.device is None:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.cpu)
                yield
            return
        with torch.random.fork_rng(devices=[self.device], device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            torch.get_device_module(self.device.type).set_rng_state(self.device_state,
                                                                    self.device)
            yield


@dataclass
class _Boundary:
    params: Params
    state: OptState
    buffers: Buffers
    rng: _RngState


@dataclass(frozen=True)
class _Layout:
    """How the flat tensor inputs of ``_CheckpointedUnroll`` map back to dicts."""

    names: list[str]
    static_names: list[str]
    num_hyper: int
    state_template: OptState
    buffer_names: list[str]

    def split(self, tensors: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
        sizes = [len(self.names), len(self.static_names), self.num_hyper,
                 len(_tensor_leaves(self.state_template)), len(self.buffer_names)]
        parts, offset = [], 0
        for size in sizes:
            parts.append(list(tensors[offset:offset + size]))
            offset += size
        return tuple(parts)


def _carried(params: Params, state: OptState, buffers: Buffers) -> list[Tensor]:
    """The tensors one step hands to the next: parameters, optimizer state, buffers."""
    return [*params.values(), *_tensor_leaves(state), *buffers.values()]


class _CheckpointedUnroll(torch.autograd.Function):
    """The unroll as one autograd node that recomputes segments during its backward pass.

    Inputs (after the non-tensor ``run``, ``segment``, ``keep_trajectory`` and ``layout``):
    adapted parameters, static parameters, hyperparameter tensors, initial optimizer-state
    tensors and initial buffers, flattened. Outputs: the points of the trajectory (parameters
    then buffers of each; only the final point without ``keep_trajectory``), the final
    optimizer-state tensors, and the detached losses.
    Optimizer state and buffers (differentiable BatchNorm running statistics) are carried
    through the backward pass like the parameters.
    """

    @staticmethod
    def forward(ctx: Any, run: _Run, segment: int, keep_trajectory: bool, layout: _Layout,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        params_t, static_t, hyper, state_t, buffers_t = layout.split(
            [t.detach() for t in tensors])
        params = dict(zip(layout.names, params_t))
        static = dict(zip(layout.static_names, static_t))
        state = _replace_tensor_leaves(layout.state_template, state_t)
        buffers = dict(zip(layout.buffer_names, buffers_t))
        optimizer = run.optimizer.with_hyperparameter_tensors(hyper)
        device = tensors[0].device

        boundaries, losses = [], []
        # Point 0 is cloned: an input returned as an output would alias it.
        points = ([[t.clone() for t in (*params.values(), *buffers.values())]]
                  if keep_trajectory else [])
        for k in range(run.steps):
            if k % segment == 0:
                boundaries.append(_Boundary(params, state, buffers, _RngState.capture(device)))
            params, state, buffers, loss = run.step(k, params, static, buffers, state, optimizer,
                                                    create_graph=False)
            losses.append(loss)
            if keep_trajectory:
                points.append([*params.values(), *buffers.values()])
        if not keep_trajectory:
            points = [[*params.values(), *buffers.values()]]

        ctx.run, ctx.segment, ctx.keep_trajectory = run, segment, keep_trajectory
        ctx.layout = layout
        ctx.boundaries = boundaries
        ctx.static_tensors, ctx.hyper_tensors = static_t, hyper
        run.final_state = state
        losses_tensor = torch.stack(losses)
        ctx.mark_non_differentiable(losses_tensor)
        ctx.set_materialize_grads(False)
        return (*(t for point in points for t in point), *_tensor_leaves(state), losses_tensor)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        run: _Run = ctx.run
        layout: _Layout = ctx.layout
        n, m, num_hyper = len(layout.names), len(layout.static_names), layout.num_hyper
        num_state = len(_tensor_leaves(layout.state_template))
        width = n + len(layout.buffer_names)  # tensors per trajectory point
        needs_static, needs_hyper = (any(ctx.needs_input_grad[4 + n:4 + n + m]),
                                     any(ctx.needs_input_grad[4 + n + m:4 + n + m + num_hyper]))
        # Gradients arriving at each kept point of the trajectory (parameters, then buffers).
        points = range(run.steps + 1) if ctx.keep_trajectory else [run.steps]
        point_grads = {k: list(grad_outputs[i * width:(i + 1) * width])
                       for i, k in enumerate(points)}
        final = point_grads.pop(run.steps)
        state_grads = grad_outputs[len(points) * width:-1]  # losses have no gradient
        carry = [*final[:n], *state_grads, *final[n:]]
        static_grads: list[Tensor | None] = [None] * m
        hyper_grads: list[Tensor | None] = [None] * num_hyper

        for index in reversed(range(len(ctx.boundaries))):
            boundary: _Boundary = ctx.boundaries[index]
            start, end = index * ctx.segment, min((index + 1) * ctx.segment, run.steps)
            with torch.enable_grad(), boundary.rng.restored():
                leaves = [t.detach().requires_grad_(t.is_floating_point())
                          for t in _carried(boundary.params, boundary.state, boundary.buffers)]
                params = dict(zip(layout.names, leaves[:n]))
                state = _replace_tensor_leaves(boundary.state, leaves[n:n + num_state])
                buffers = dict(zip(layout.buffer_names, leaves[n + num_state:]))
                static_leaves = [t.detach().requires_grad_(needs_static)
                                 for t in ctx.static_tensors]
                hyper_leaves = [t.detach().requires_grad_(needs_hyper)
                                for t in ctx.hyper_tensors]
                optimizer = run.optimizer.with_hyperparameter_tensors(hyper_leaves)
                static = dict(zip(layout.static_names, static_leaves))

                # (output, incoming gradient) pairs: intermediate trajectory points with
                # gradients, then everything the segment hands to the next one.
                pairs: list[tuple[Tensor, Tensor | None]] = []
                for k in range(start, end):
                    params, state, buffers, _ = run.step(k, params, static, buffers, state,
                                                         optimizer, create_graph=True)
                    if k + 1 < end and k + 1 in point_grads:
                        pairs += zip([*params.values(), *buffers.values()],
                                     point_grads.pop(k + 1))
                pairs += zip(_carried(params, state, buffers), carry)
                pairs = [(t, g) for t, g in pairs if g is not None and t.requires_grad]
                outputs = [t for t, _ in pairs]
                output_grads = [g for _, g in pairs]

                inputs = [t for t in leaves if t.requires_grad]
                if needs_static:
                    inputs += static_leaves
                if needs_hyper:
                    inputs += hyper_leaves
                grads = list(torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True)
                             if outputs else [None] * len(inputs))

            carry = [grads.pop(0) if t.requires_grad else None for t in leaves]
            if needs_static:
                static_grads = [_add(a, b) for a, b in zip(static_grads, grads[:m])]
                del grads[:m]
            if needs_hyper:
                hyper_grads = [_add(a, b) for a, b in zip(hyper_grads, grads[:num_hyper])]
            if start in point_grads:
                arriving = point_grads.pop(start)
                carry[:n] = [_add(a, b) for a, b in zip(carry[:n], arriving[:n])]
                carry[n + num_state:] = [_add(a, b)
                                         for a, b in zip(carry[n + num_state:], arriving[n:])]

        return (None, None, None, None, *carry[:n], *static_grads, *hyper_grads, *carry[n:])


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _validate(params: Params, static: Params, batches: Sequence[Batch], steps: int,
              checkpoint: int | bool | None, inner_grad_clip: float | None,
              backward_grad_clip: float | None) -> None:
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict of name -> tensor (metazoo.params_of)")
    for name, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise ValueError(f"adapted param {name!r} must be a floating-point tensor")
    overlap = sorted(set(params) & set(static))
    if overlap:
        raise ValueError(f"names {overlap} are both adapted and static; pass each name once")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or not batches:
        raise ValueError(
            "batches must be a non-empty sequence (list/tuple) of batches; step k uses "
            "batches[k % len(batches)]. For one batch reused every step pass [batch]."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if checkpoint is not None and not isinstance(checkpoint, bool) and (
            not isinstance(checkpoint, int) or checkpoint < 1):
        raise ValueError(f"checkpoint must be None, a bool, or a segment length >= 1; got "
                         f"{checkpoint!r}")
    for name, value in (("inner_grad_clip", inner_grad_clip),
                        ("backward_grad_clip", backward_grad_clip)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be None or a positive number, got {value!r}")


def unroll(
    loss_fn: LossFn,
    params: Params,
    optimizer: InnerOptimizer,
    batches: Sequence[Batch],
    *,
    steps: int | None = None,
    static: Params | None = None,
    buffers: Buffers | None = None,
    state: OptState | None = None,
    first_order: bool = False,
    checkpoint: int | bool | None = None,
    inner_grad_clip: float | None = None,
    backward_grad_clip: float | None = None,
    keep_trajectory: bool = False,
) -> UnrollResult:
    """Runs ``steps`` differentiable inner steps of ``optimizer`` on ``loss_fn``.

    Args:
        loss_fn: ``loss_fn(params, buffers, batch) -> (loss, buffers)``. ``params`` holds the
            adapted and static parameters merged. Everything that should receive a
            meta-gradient must come in through ``params``, ``static`` or a tensor hyperparameter
            of ``optimizer``; tensors the function closes over are constants under checkpointing.
        params: the parameters to adapt (the initialisation); usually requiring grad.
        optimizer: a ``metazoo.optim`` optimizer; tensor hyperparameters receive gradients.
        batches: step k uses ``batches[k % len(batches)]``; ``[batch]`` reuses one batch.
        steps: number of inner steps K (default ``len(batches)``).
        static: parameters the loss uses but the inner loop does not adapt (frozen body, warp
            layers). They receive meta-gradients through the unroll.
        buffers: explicit buffers passed to ``loss_fn`` (default empty).
        state: initial optimizer state (default ``optimizer.init(params)``).
        first_order: use inner gradients as constants (no second-order terms, no second-order
            graph); running statistics updated in the loop are constants too (detached).
        checkpoint: ``None``/``False`` keeps the whole graph; an int S keeps only every S-th
            state and recomputes segments in the backward pass; ``True`` uses
            ``DEFAULT_SEGMENT``. Exact: same meta-gradients as the plain unroll.
        inner_grad_clip: clip the global norm of each inner gradient before the step.
        backward_grad_clip: clip the global norm of the gradient flowing back into each step's
            parameters during the meta-backward pass ("max grad-grad norm").
        keep_trajectory: also return every intermediate point and its buffers (e.g. for a
            multi-step loss).

    Returns:
        An ``UnrollResult``.
    """
    static = dict(static or {})
    buffers = dict(buffers or {})
    steps = len(batches) if steps is None and isinstance(batches, Sequence) else steps
    _validate(params, static, batches, steps, checkpoint, inner_grad_clip,  # type: ignore[arg-type]
              backward_grad_clip)
    assert steps is not None
    if state is None:
        state = optimizer.init(params)
    run = _Run(loss_fn, optimizer, batches, steps, inner_grad_clip, backward_grad_clip)

    hyper = optimizer.hyperparameter_tensors()
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*params.values(), *static.values(), *hyper,
                                  *_tensor_leaves(state), *buffers.values()))
    segment = DEFAULT_SEGMENT if checkpoint is True else int(checkpoint or 0)
    if differentiable and not first_order and 0 < segment < steps:
        return _checkpointed(run, params, static, buffers, state, hyper, segment,
                             keep_trajectory)

    create_graph = differentiable and not first_order
    trajectory, buffer_trajectory = [params], [buffers]
    losses = []
    for k in range(steps):
        params, state, buffers, loss = run.step(k, params, static, buffers, state, optimizer,
                                                create_graph=create_graph)
        losses.append(loss)
        if keep_trajectory:
            trajectory.append(params)
            buffer_trajectory.append(buffers)
    if not keep_trajectory:
        return UnrollResult(params, state, buffers, torch.stack(losses))
    return UnrollResult(params, state, buffers, torch.stack(losses), trajectory,
                        buffer_trajectory)


def _checkpointed(run: _Run, params: Params, static: Params, buffers: Buffers, state: OptState,
                  hyper: list[Tensor], segment: int, keep_trajectory: bool) -> UnrollResult:
    names, static_names = list(params), list(static)
    for batch in run.batches:
        if any(t.requires_grad for t in _tensor_leaves(batch)):
            raise ValueError("checkpointed unrolls treat batches as constants; detach batch "
                             "tensors or use checkpoint=None")
    state_tensors = _tensor_leaves(state)
    layout = _Layout(names, static_names, len(hyper), state, list(buffers))
    outputs = _CheckpointedUnroll.apply(run, segment, keep_trajectory, layout,
                                        *params.values(), *static.values(), *hyper,
                                        *state_tensors, *buffers.values())
    n, width = len(names), len(names) + len(buffers)
    num_points = run.steps + 1 if keep_trajectory else 1
    flat_points = [outputs[i * width:(i + 1) * width] for i in range(num_points)]
    points = [dict(zip(names, point[:n])) for point in flat_points]
    point_buffers = [dict(zip(buffers, point[n:])) for point in flat_points]
    final_state = _replace_tensor_leaves(run.final_state, outputs[num_points * width:-1])
    losses = outputs[-1]
    return UnrollResult(points[-1], final_state, point_buffers[-1], losses,
                        points if keep_trajectory else None,
                        point_buffers if keep_trajectory else None)
