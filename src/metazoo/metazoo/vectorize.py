"""Vectorized meta-batches: the inner loops of all tasks of a meta-batch as one batched computation.

A learner's per-task objective is a pure function of the meta-parameters and the task's batches.
For tasks whose batches share shapes, ``vectorized_meta_gradients`` maps
``torch.func.grad_and_value`` of that objective over the tasks with ``torch.func.vmap``
(meta-parameters shared, ``in_dims=None``; task batches stacked, ``in_dims=0``), so the gradient
of each task's objective is taken INSIDE the map, then sums the per-task gradients. This is exact
(the same meta-gradient as the per-task loop; float64 tests to 1e-10). The tempting other order,
``vmap`` of the objective followed by an ordinary ``.backward()``, is wrong when BatchNorm uses
batch statistics (0.115 relative error measured; a limit of BatchNorm's batching rule). The loop's
``unroll`` is not used inside the map either: it makes leaves with ``requires_grad_()``, which
``torch.func`` transforms refuse (first-order steps, zero-initialised heads).

Inside the map the inner loop is ``functional_unroll``: the steps of ``metazoo.unroll`` with the
inner gradient taken by ``torch.func.grad`` (second order: nested transforms; first order: on
detached inputs), the same ``InnerOptimizer.step`` update rule and ``clip_grad_norm``.

Memory grows with the number of tasks mapped at once; ``chunk`` maps that many tasks at a time
and accumulates their gradients. On a GPU the vectorized form was 9x faster on the MAML Omniglot
workload (0.156 s against 1.44 s per meta-step, issue 17). On a CPU (W1 at 8 tasks, 1 thread,
interleaved medians of 7, docs/performance.md), with the channels-last layout below, the
vectorized MAML meta-step took 0.82-0.99x the hand-written loop's time (0.77x with glibc's
malloc keeping freed blocks), at 1.4-1.7 GiB peak RSS against about 0.2 GiB for the loops;
before it, NCHW, 1.01-1.17x. ``vectorize="auto"`` still vectorizes on CUDA only (the memory,
and the loop with ``channels_last=True``; see ``resolve_chunk``).

Inside the map, ``F.conv2d``, ``F.max_pool2d`` and BatchNorm with batch statistics run through
``metazoo.layers`` and ``metazoo.batchnorm`` (``closed_form_batch_norm``): vmap rules that fold
the tasks into one kernel call without copies, double backwards of few kernels. Image batches
are stacked so that the first layer folds them without a copy too: on a CPU channels-last
(``[N, H, W, T, C]`` in memory; every activation then stays channels-last, where max-pooling is
10-13x and the BatchNorm statistics 3-4x faster than over NCHW tensors), elsewhere
samples-outer (``[N, T, C, H, W]``); see ``CHANNELS_LAST_DEVICES``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from metazoo.deferred import DeferredRead
from metazoo.faults import _kept_tasks
from metazoo.functional import Buffers, Params, closed_form_batch_norm
from metazoo.layout import check_channels_last
from metazoo.learner import Batch, MeanResults, Task, deferred_flags_and_means
from metazoo.optim import InnerOptimizer, OptState
from metazoo.unroll import (
    Checkpoint,
    LossFn,
    UnrollResult,
    _ClipBackward,
    _forward_stores,
    _reverse,
    _Schedule,
    _Snapshot,
    check_checkpoint,
    clip_grad_norm,
)

__all__ = ["CompileOptions", "VectorizedGradients", "check_compile", "check_vectorize",
           "check_vectorize_and_layout", "deferred_faults_and_means", "functional_unroll",
           "kept_divisor", "kept_from_flags", "map_and_sum", "map_tasks", "mean_over_kept",
           "raise_or_count_faults", "resolve_chunk", "stack_tasks", "vectorized_meta_gradients"]

Vectorize = bool | int | str


def check_vectorize(value: Any) -> Vectorize:
    """Validates a learner's ``vectorize`` option: False, True, a chunk size or "auto"."""
    if isinstance(value, bool) or value == "auto":
        return value  # type: ignore[no-any-return]
    if isinstance(value, int) and value >= 1:
        return value
    raise ValueError(f"vectorize must be False (the per-task loop), True (all tasks of a "
                     f"meta-batch in one vmap), a chunk size >= 1 (that many tasks at a time) or "
                     f"'auto' (vectorize on CUDA only); got {value!r}")


def check_vectorize_and_layout(vectorize: Any, channels_last: Any) -> tuple[Vectorize, bool]:
    """A learner's ``vectorize`` and ``channels_last`` options, checked alone and together:
    the vectorized path keeps the default memory layout.

    Returns:
        ``(vectorize, channels_last)``.

    Raises:
        ValueError: either option is not one of its values, or both are on.
    """
    checked = check_vectorize(vectorize)
    layout = check_channels_last(channels_last)
    if checked is not False and layout:
        raise ValueError(f"vectorize={vectorize!r} does not support channels_last; pass "
                         f"channels_last=False, or vectorize=False to keep channels_last in "
                         f"the per-task loop")
    return checked, layout


def resolve_chunk(vectorize: Vectorize, num_tasks: int, device: torch.device) -> int | None:
    """How many tasks to map at once, or ``None`` for the per-task loop.

    ``"auto"`` vectorizes on CUDA devices only. On a CPU the vectorized MAML meta-step
    (channels-last there) measured 0.77-0.99x the hand-written loop's time on the MAML Omniglot
    workload at 8 tasks, a margin that glibc's allocator swings, at 7-8x the loop's peak memory,
    and the loop with ``channels_last=True`` 0.95x at the loop's memory (see the module
    docstring, ``benchmarks/gpu_meta_step.py`` and docs/performance.md).
    """
    if vectorize is False or (vectorize == "auto" and device.type != "cuda"):
        return None
    if vectorize is True or vectorize == "auto":
        return num_tasks
    return min(int(vectorize), num_tasks)


def _describe(tensor: Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device}"


def stack_tasks(tasks: Sequence[Task]) -> tuple[list[Batch], Batch]:
    """Stacks the tasks' support batches and query batch along a new leading task dimension.

    Raises:
        ValueError: the tasks differ in the number of support batches or in the shape, dtype or
            device of a batch tensor (vectorization needs tasks of one shape).
    """
    first = tasks[0]
    for index, task in enumerate(tasks[1:], start=1):
        if len(task.support) != len(first.support):
            raise ValueError(
                f"vectorize needs tasks of one shape, but task {index} has "
                f"{len(task.support)} support batches and task 0 has {len(first.support)}; "
                f"pass vectorize=False to run such tasks one by one")
        pairs = [(f"query[{j}]", a, b) for j, (a, b) in enumerate(zip(task.query, first.query))]
        for k, (batch, first_batch) in enumerate(zip(task.support, first.support)):
            pairs += [(f"support[{k}][{j}]", a, b) for j, (a, b) in enumerate(zip(batch,
                                                                               first_batch))]
        for where, tensor, reference in pairs:
            if (tensor.shape, tensor.dtype, tensor.device) != (
                    reference.shape, reference.dtype, reference.device):
                raise ValueError(
                    f"vectorize needs tasks of one shape, but task {index} {where} has "
                    f"{_describe(tensor)} and task 0 has {_describe(reference)}; pass "
                    f"vectorize=False to run such tasks one by one")
    support = [(_stack([t.support[k][0] for t in tasks]),
                _stack([t.support[k][1] for t in tasks])) for k in range(len(first.support))]
    query = (_stack([t.query[0] for t in tasks]), _stack([t.query[1] for t in tasks]))
    return support, query


#: Devices on which 4-D floating-point task batches are stacked channels-last (``_stack``).
#: Tests empty it to run the other layout on a CPU.
CHANNELS_LAST_DEVICES: frozenset[str] = frozenset({"cpu"})


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack(tensors)`` (the values), laid out for the task-folding layers.

    4-D image batches ``[N, C, H, W]`` on a CPU (``CHANNELS_LAST_DEVICES``) are stored
    ``[N, H, W, T, C]`` in memory: folding the tasks into channels gives a channels-last
    ``[N, T * C, H, W]`` view, in which every activation of the meta-batch then stays. On a
    CPU, max-pooling over NCHW tensors is 10-13x slower than over channels-last ones and the
    BatchNorm statistics 3-4x (``docs/performance.md``); convolutions cost the same. Elsewhere
    (CUDA) they are stored samples-outer, ``[N, T, C, H, W]``: folding them into channels or
    into the batch dimension is a view of the default layout. Other tensors keep
    ``torch.stack``'s layout.
    """
    first = tensors[0]
    if first.dim() == 4 and first.is_floating_point() and (
            first.device.type in CHANNELS_LAST_DEVICES):
        return torch.stack([t.permute(0, 2, 3, 1) for t in tensors], dim=3).permute(
            3, 0, 4, 1, 2)
    if first.dim() == 4:
        return torch.stack(tensors, dim=1).movedim(1, 0)
    return torch.stack(tensors)


def _functional_step(loss_fn: LossFn, optimizer: InnerOptimizer, batch: Batch, params: Params,
                     static: Params, buffers: Buffers, state: OptState, *, first_order: bool,
                     inner_grad_clip: float | None, backward_grad_clip: float | None
                     ) -> tuple[Params, OptState, Buffers, Tensor]:
    """One inner step of ``metazoo.unroll`` (``_Run.step``) with the gradient by ``torch.func``."""
    if backward_grad_clip is not None and torch.is_grad_enabled():
        # The loop's identity whose backward clips the gradient reaching this step's
        # parameters; under vmap it runs per task, so each task is clipped by its own norm.
        params = dict(zip(params, _ClipBackward.apply(backward_grad_clip, *params.values())))

    def inner_loss(adapted: Params, static: Params) -> tuple[Tensor, tuple[Tensor, Buffers]]:
        loss, new_buffers = loss_fn({**static, **adapted}, buffers, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
            raise ValueError("loss_fn must return (scalar loss tensor, buffers); got a loss "
                             f"of type {type(loss).__name__}{shape}")
        return loss, (loss, new_buffers)

    if first_order:
        # The inner gradient is a constant: take it at detached copies, and keep the running
        # statistics it produced as constants too (as the loop's first-order step does).
        grads, (loss, new_buffers) = grad(inner_loss, has_aux=True)(
            {n: p.detach() for n, p in params.items()},
            {n: s.detach() for n, s in static.items()})
        new_buffers = {n: b.detach() for n, b in new_buffers.items()}
    else:
        # Nested transforms: this grad's level sees ``params`` as its input, the levels outside
        # (the meta-gradient) differentiate through the gradient it returns (second order).
        grads, (loss, new_buffers) = grad(inner_loss, has_aux=True)(params, static)
    names = list(params)
    grad_list = [grads[n] for n in names]
    if inner_grad_clip is not None:
        grad_list = clip_grad_norm(grad_list, inner_grad_clip)
    new_params, new_state = optimizer.step(params, dict(zip(names, grad_list)), state)
    return new_params, new_state, new_buffers, loss.detach()


@dataclass
class _FunctionalRun:
    """Everything about a checkpointed ``functional_unroll`` that is not a tensor.

    ``sizes``: the numbers of parameter, optimizer-state, buffer, static, hyperparameter and
    batch tensors among the Function's inputs. ``templates``: per stored step, the optimizer
    state with its tensors ``None`` (non-tensor leaves such as the step count kept), set by the
    forward sweep; ``final_template`` the same after the last step.
    """

    loss_fn: LossFn
    optimizer: InnerOptimizer
    steps: int
    schedule: _Schedule
    stores: list[int]
    keep_trajectory: bool
    sizes: tuple[int, ...]
    names: tuple[list[str], list[str], list[str]]  # params, buffers, static
    batch_spec: Any
    num_batches: int
    inner_grad_clip: float | None
    backward_grad_clip: float | None
    templates: dict[int, Any] = field(default_factory=dict)
    final_template: Any = None

    def split(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        parts, offset = [], 0
        for size in self.sizes:
            parts.append(list(tensors[offset:offset + size]))
            offset += size
        return parts

    def carried(self, params: Params, state: OptState, buffers: Buffers) -> list[Tensor]:
        return [*params.values(), *_tensors_of(state), *buffers.values()]

    def unpack(self, carried: Sequence[Tensor], template: Any
               ) -> tuple[Params, OptState, Buffers]:
        names, buffer_names, _ = self.names
        n, num_state = len(names), self.sizes[1]
        return (dict(zip(names, carried[:n])),
                _replace_leaves(template, carried[n:n + num_state]),
                dict(zip(buffer_names, carried[n + num_state:])))

    def run(self, carried: Sequence[Tensor], template: Any, static: Sequence[Tensor],
            hyper: Sequence[Tensor], batch_tensors: Sequence[Tensor], start: int, stop: int,
            on_step: Callable[[int, Params, OptState, Buffers, Tensor], None] | None = None
            ) -> tuple[Params, OptState, Buffers]:
        """Steps ``start..stop-1`` from the carried tensors of the state before ``start``;
        ``on_step(k, params, state, buffers, loss)`` sees the state after each step k."""
        params, state, buffers = self.unpack(carried, template)
        static_params = dict(zip(self.names[2], static))
        batches = pytree.tree_unflatten(list(batch_tensors), self.batch_spec)
        optimizer = self.optimizer.with_hyperparameter_tensors(list(hyper))
        for k in range(start, stop):
            params, state, buffers, loss = _functional_step(
                self.loss_fn, optimizer, batches[k % self.num_batches], params, static_params,
                buffers, state, first_order=False, inner_grad_clip=self.inner_grad_clip,
                backward_grad_clip=self.backward_grad_clip)
            if on_step is not None:
                on_step(k, params, state, buffers, loss)
        return params, state, buffers


def _tensors_of(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


def _template(state: OptState) -> Any:
    return pytree.tree_map(lambda leaf: None if isinstance(leaf, Tensor) else leaf, state)


def _replace_leaves(template: Any, tensors: Sequence[Tensor]) -> Any:
    """``template`` with its tensor (or ``None``) leaves replaced by ``tensors`` in order."""
    leaves, spec = pytree.tree_flatten(template)
    replacements = iter(tensors)
    return pytree.tree_unflatten([next(replacements) if leaf is None or isinstance(leaf, Tensor)
                                  else leaf for leaf in leaves], spec)


class _CheckpointedFunctionalUnroll(torch.autograd.Function):
    """A checkpointed ``functional_unroll`` as one node whose backward walks the schedule
    (``metazoo.unroll._reverse``, the loop's reverse sweep), taping runs of steps under
    ``torch.func.vjp``.

    ``setup_context`` form with a generated vmap rule, so it runs under ``vmap``/``grad`` (each
    task recomputes its own steps). Batches are inputs (tensors a Function closes over would
    escape the transforms), constants for the gradient. Outputs: the trajectory points after
    each step (parameters, then buffers; only the last without ``keep_trajectory``), the final
    optimizer-state tensors, the losses, then the states the forward sweep stores (saved for
    the backward; a Function in this form can save only its inputs and outputs).

    The binomial schedule's forward sweep stores nothing here: what a Function saves lives
    until the whole ``torch.func`` backward ends (it runs with ``create_graph``), so states
    stored in the forward sweep would not free their slots; the reverse sweep recomputes them
    instead (``Checkpoint.plan(K, vectorized=True)``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(run: _FunctionalRun, *tensors: Tensor) -> tuple[Tensor, ...]:
        params_t, state_t, buffers_t, static_t, hyper, batch_t = run.split(tensors)
        stores = set(run.stores)
        stored: list[Tensor] = []
        points: list[Tensor] = []
        losses: list[Tensor] = []
        carried = [*params_t, *state_t, *buffers_t]
        template = run.templates[0]
        if 0 in stores:
            raise AssertionError("the initial state is an input, never stored")

        def on_step(k: int, params: Params, state: OptState, buffers: Buffers,
                    loss: Tensor) -> None:
            losses.append(loss)
            if run.keep_trajectory or k + 1 == run.steps:
                points.extend([*params.values(), *buffers.values()])
            if k + 1 in stores:
                stored.extend(run.carried(params, state, buffers))
                run.templates[k + 1] = _template(state)

        _, state, _ = run.run(carried, template, static_t, hyper, batch_t, 0, run.steps, on_step)
        run.final_template = _template(state)
        outputs, seen = [], {id(t) for t in tensors}
        for tensor in (*points, *_tensors_of(state), torch.stack(losses), *stored):
            # An input (buffers a step leaves unchanged) or a repeated output is returned as a
            # view: a Function in the setup_context form may not return its inputs as-is.
            outputs.append(tensor.view_as(tensor) if id(tensor) in seen else tensor)
            seen.add(id(tensor))
        return tuple(outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        run: _FunctionalRun = inputs[0]
        ctx.run = run
        num_stored = len(run.stores) * (run.sizes[0] + run.sizes[1] + run.sizes[2])
        ctx.save_for_backward(*inputs[1:], *output[len(output) - num_stored:])
        ctx.mark_non_differentiable(output[len(output) - num_stored - 1])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        run: _FunctionalRun = ctx.run
        saved = [t.detach() for t in ctx.saved_tensors]
        num_inputs = sum(run.sizes)
        params_t, state_t, buffers_t, static_t, hyper, batch_t = run.split(saved[:num_inputs])
        width_carried = run.sizes[0] + run.sizes[1] + run.sizes[2]
        width_point = run.sizes[0] + run.sizes[2]
        num_params = run.sizes[0]
        stack = [_Snapshot(0, [*params_t, *state_t, *buffers_t])]
        for index, step in enumerate(run.stores):
            offset = num_inputs + index * width_carried
            stack.append(_Snapshot(step, saved[offset:offset + width_carried]))
        del saved

        # Gradients arriving at the trajectory points (after step k: point k + 1).
        point_steps = range(1, run.steps + 1) if run.keep_trajectory else [run.steps]
        point_grads = {k: list(grads[i * width_point:(i + 1) * width_point])
                       for i, k in enumerate(point_steps)}
        final = point_grads.pop(run.steps)
        state_grads = list(grads[len(point_steps) * width_point:][:run.sizes[1]])
        carry: list[Tensor] = [*final[:num_params], *state_grads, *final[num_params:]]
        static_grads = [torch.zeros_like(t) for t in static_t]
        hyper_grads = [torch.zeros_like(t) for t in hyper]
        meta_inputs = [*static_t, *hyper]

        def advance_from(snapshot: _Snapshot, stop: int) -> list[Tensor]:
            if stop == snapshot.step:
                return list(snapshot.payload)
            params, state, buffers = run.run(snapshot.payload, run.templates[snapshot.step],
                                             static_t, hyper, batch_t, snapshot.step, stop)
            run.templates.setdefault(stop, _template(state))
            return run.carried(params, state, buffers)

        def tape(snapshot: _Snapshot, start: int, end: int) -> None:
            nonlocal carry, static_grads, hyper_grads
            carried = advance_from(snapshot, start)
            differentiable = [i for i, t in enumerate(carried) if t.is_floating_point()]
            floating: list[bool] = []

            def recompute(*inputs: Tensor) -> tuple[Tensor, ...]:
                full = list(carried)
                for index, tensor in zip(differentiable, inputs[:len(differentiable)],
                                         strict=True):
                    full[index] = tensor
                static = inputs[len(differentiable):len(differentiable) + len(static_t)]
                hyper_in = inputs[len(differentiable) + len(static_t):]
                outputs: list[Tensor] = []

                def on_step(k: int, params: Params, state: OptState, buffers: Buffers,
                            loss: Tensor) -> None:
                    if k + 1 < end and k + 1 in point_grads:
                        outputs.extend([*params.values(), *buffers.values()])

                params, state, buffers = run.run(full, run.templates[start], static, hyper_in,
                                                 batch_t, start, end, on_step)
                outputs += run.carried(params, state, buffers)
                floating[:] = [t.is_floating_point() for t in outputs]
                # Integer outputs (BatchNorm's num_batches_tracked) carry no gradient.
                return tuple(t for t in outputs if t.is_floating_point())

            vjp_fn = torch.func.vjp(recompute, *[carried[i] for i in differentiable],
                                    *meta_inputs)[1]
            incoming = [g for k in range(start + 1, end) if k in point_grads
                        for g in point_grads.pop(k)]
            incoming += carry
            input_grads = list(vjp_fn(tuple(g.detach() for g, f in zip(incoming, floating)
                                            if f)))
            carry_in = input_grads[:len(differentiable)]
            new_carry: list[Tensor] = [torch.zeros(()) for _ in carried]
            for index, g in zip(differentiable, carry_in):
                new_carry[index] = g
            meta = input_grads[len(differentiable):]
            static_grads = [a + b for a, b in zip(static_grads, meta[:len(static_t)])]
            hyper_grads = [a + b for a, b in zip(hyper_grads, meta[len(static_t):])]
            if start in point_grads:
                arriving = point_grads.pop(start)
                for i, g in enumerate(arriving):
                    index = i if i < num_params else i + run.sizes[1]
                    if carried[index].is_floating_point():
                        new_carry[index] = new_carry[index] + g
            carry = new_carry

        # No grad outside the vjp (which enables it for itself): the backward of a
        # torch.func.grad runs with create_graph, and a recomputed step recorded there would
        # ride on the gradients into the next step's backward, keeping every graph alive.
        with torch.no_grad():
            _reverse(run.schedule, run.steps, stack,
                     lambda snapshot, stop: advance_from(snapshot, stop), tape)
        carried_grads = [g if t.is_floating_point() else None
                         for g, t in zip(carry, [*params_t, *state_t, *buffers_t])]
        n, num_state = run.sizes[0], run.sizes[1]
        return (None, *carried_grads[:n], *carried_grads[n:n + num_state],
                *carried_grads[n + num_state:], *static_grads, *hyper_grads,
                *([None] * len(batch_t)))


def _checkpointed_unroll(loss_fn: LossFn, params: Params, optimizer: InnerOptimizer,
                         batches: Sequence[Batch], steps: int, static: Params, buffers: Buffers,
                         state: OptState, schedule: _Schedule, inner_grad_clip: float | None,
                         backward_grad_clip: float | None, keep_trajectory: bool
                         ) -> UnrollResult:
    """``functional_unroll`` as one ``_CheckpointedFunctionalUnroll`` node: the graph holds
    the unroll's inputs and the states its forward sweep stores, not its steps."""
    batch_tensors, batch_spec = pytree.tree_flatten(list(batches))
    hyper = optimizer.hyperparameter_tensors()
    names, buffer_names = list(params), list(buffers)
    state_tensors = _tensors_of(state)
    run = _FunctionalRun(loss_fn, optimizer, steps, schedule,
                         _forward_stores(schedule, steps, vectorized=True), keep_trajectory,
                         (len(params), len(state_tensors), len(buffers), len(static), len(hyper),
                          len(batch_tensors)),
                         (names, buffer_names, list(static)), batch_spec, len(batches),
                         inner_grad_clip, backward_grad_clip)
    run.templates[0] = _template(state)
    outputs = _CheckpointedFunctionalUnroll.apply(run, *params.values(), *state_tensors,
                                                  *buffers.values(), *static.values(), *hyper,
                                                  *batch_tensors)
    width = len(names) + len(buffer_names)
    num_points = steps if keep_trajectory else 1
    flat_points = [outputs[i * width:(i + 1) * width] for i in range(num_points)]
    trajectory = [params] + [dict(zip(names, p[:len(names)])) for p in flat_points]
    buffer_trajectory = [buffers] + [dict(zip(buffer_names, p[len(names):]))
                                     for p in flat_points]
    offset = num_points * width
    final_state = _replace_leaves(run.final_template,
                                  outputs[offset:offset + len(state_tensors)])
    losses = outputs[offset + len(state_tensors)]
    if not keep_trajectory:
        return UnrollResult(trajectory[-1], final_state, buffer_trajectory[-1], losses)
    return UnrollResult(trajectory[-1], final_state, buffer_trajectory[-1], losses, trajectory,
                        buffer_trajectory)


def functional_unroll(
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
    checkpoint: Checkpoint | int | bool | None = None,
    inner_grad_clip: float | None = None,
    backward_grad_clip: float | None = None,
    keep_trajectory: bool = False,
) -> UnrollResult:
    """``metazoo.unroll`` for use inside ``torch.func`` transforms (``vmap``, ``grad``).

    Same arguments, steps and result as ``metazoo.unroll``; the inner gradient is taken with
    ``torch.func.grad``, so the unroll can be mapped over tasks and differentiated by an outer
    ``torch.func.grad`` (or by ordinary autograd). The update rule is the optimizer's own
    ``step``. ``checkpoint`` (as in the loop: ``True``, a ``metazoo.Checkpoint`` or a segment
    length; not in first-order mode, nor for one step) runs the unroll as one
    ``_CheckpointedFunctionalUnroll`` node whose backward walks the same schedule as the loop's,
    recomputing steps with ``torch.func.vjp``: the graph holds the stored states, not the steps.
    The binomial schedule's forward sweep stores nothing here (see that class), so the
    backward recomputes ``Checkpoint.plan(K, vectorized=True).recomputed_steps`` steps.
    """
    static = dict(static or {})
    buffers = dict(buffers or {})
    steps = len(batches) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if state is None:
        state = optimizer.init(params)
    schedule = check_checkpoint(checkpoint)
    if not first_order and schedule is not None and steps > 1:  # first order: no graph kept
        return _checkpointed_unroll(loss_fn, params, optimizer, batches, steps, static, buffers,
                                    state, schedule._schedule(), inner_grad_clip,
                                    backward_grad_clip, keep_trajectory)
    trajectory, buffer_trajectory = [params], [buffers]
    losses = []
    for k in range(steps):
        params, state, buffers, loss = _functional_step(
            loss_fn, optimizer, batches[k % len(batches)], params, static, buffers, state,
            first_order=first_order, inner_grad_clip=inner_grad_clip,
            backward_grad_clip=backward_grad_clip)
        losses.append(loss)
        trajectory.append(params)
        buffer_trajectory.append(buffers)
    if not keep_trajectory:
        return UnrollResult(params, state, buffers, torch.stack(losses))
    return UnrollResult(params, state, buffers, torch.stack(losses), trajectory,
                        buffer_trajectory)


# -- torch.compile of the per-meta-batch function -------------------------------------------

_log = logging.getLogger(__name__)

#: The ``torch.compile`` keywords a learner's ``compile=`` may set (``fullgraph`` is always
#: True: a graph break raises instead of running part of the step eagerly).
_COMPILE_KEYWORDS = frozenset({"backend", "mode", "dynamic", "options"})


@dataclass(frozen=True)
class CompileOptions:
    """A validated ``compile=`` option: the keywords passed to ``torch.compile``."""

    keywords: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.keywords) or "torch.compile defaults"


def check_compile(value: Any, vectorize: Vectorize = True) -> CompileOptions | None:
    """Validates a learner's ``compile`` option.

    ``False``/``None``: eager. ``True``: ``torch.compile`` with ``dynamic=False`` and the
    default backend (inductor). A dict: ``torch.compile`` keywords among ``backend``, ``mode``,
    ``dynamic`` (default False) and ``options``, e.g. ``{"backend": "aot_eager"}``. The
    per-meta-batch function is always compiled with ``fullgraph=True``. ``vectorize``: the
    learner's option; compiling needs the vectorized path (the loop is not compiled).
    """
    if value is None or value is False:
        return None
    if vectorize is False:
        raise ValueError(f"compile={value!r} compiles the vectorized meta-batch; pass "
                         f"vectorize=True (or a chunk size) with it, or compile=False")
    if value is True:
        value = {}
    if not isinstance(value, dict) or not set(value) <= _COMPILE_KEYWORDS:
        raise ValueError(f"compile must be False, True or a dict of torch.compile keywords "
                         f"among {sorted(_COMPILE_KEYWORDS)} (e.g. {{'backend': 'aot_eager'}}); "
                         f"got {value!r}")
    return CompileOptions(tuple(sorted({"dynamic": False, **value}.items(),
                                       key=lambda item: item[0])))


def _call_mapped(mapped: Callable[..., Any], *args: Any) -> Any:
    """The per-chunk call of a vmapped function, the unit that ``compile=`` compiles."""
    with closed_form_batch_norm():
        return mapped(*args)


_compiled_calls: dict[str, Callable[..., Any]] = {}  # by repr of the options


def _mapped_caller(compile: CompileOptions | None) -> Callable[..., Any]:
    """``_call_mapped``, compiled once per set of options. Dynamo caches the compiled graph on
    the code of the mapped function, so a learner's objective rebuilt every meta-step (a new
    closure of the same code) reuses it; new shapes or constants compile again."""
    if compile is None:
        return _call_mapped
    caller = _compiled_calls.get(repr(compile.keywords))
    if caller is None:
        compiled = torch.compile(_call_mapped, fullgraph=True, **dict(compile.keywords))
        pending = [True]  # the first call compiles

        def caller(*args: Any) -> Any:
            if not pending:
                return compiled(*args)
            # Library code never prints: the first call (which compiles, possibly for minutes)
            # is logged before and after; experiments and benchmarks show it.
            _log.info("torch.compile of the vectorized meta-batch (%s): compiling; the first "
                      "call can take minutes", compile)
            start = time.perf_counter()
            result = compiled(*args)
            pending.clear()
            _log.info("torch.compile of the vectorized meta-batch (%s): first call done in "
                      "%.1f s", compile, time.perf_counter() - start)
            return result

        _compiled_calls[repr(compile.keywords)] = caller
    return caller


def _chunks(num_tasks: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, num_tasks)) for start in range(0, num_tasks, chunk)]


def _take(tree: Any, rows: slice) -> Any:
    return pytree.tree_map(lambda t: t[rows], tree)


def map_tasks(fn: Callable[..., Any], batched: Any, num_tasks: int, chunk: int, *,
              compile: CompileOptions | None = None) -> Any:
    """``vmap(fn)`` over the leading task dimension of ``batched``, ``chunk`` tasks at a time.

    Returns the outputs of all chunks concatenated along the task dimension. ``compile``
    (``check_compile``) runs each chunk's call through ``torch.compile``.
    """
    mapped, call = vmap(fn), _mapped_caller(compile)
    outputs = [call(mapped, *_take(batched, rows)) for rows in _chunks(num_tasks, chunk)]
    if len(outputs) == 1:
        return outputs[0]
    leaves, spec = zip(*(pytree.tree_flatten(out) for out in outputs))
    return pytree.tree_unflatten([torch.cat(parts) for parts in zip(*leaves)], spec[0])


@dataclass(frozen=True)
class VectorizedGradients:
    """What ``vectorized_meta_gradients`` (and ``map_and_sum``) return.

    Attributes:
        grads: per input, the sum of the per-task gradients (``map_and_sum``: of the summed
            outputs) over the tasks whose losses are all finite (non-finite tasks contribute
            nothing, not NaN).
        objectives: each task's objective, shape ``[T]``.
        inner_losses: each task's support loss before each inner step, shape ``[T, K]``.
        aux: the rest of each task's auxiliary output, every leaf with a leading ``[T]``.
        finite: whether each task's objective and inner losses are all finite, shape ``[T]``
            (on the device: no host synchronisation has happened yet).
    """

    grads: list[Tensor]
    objectives: Tensor
    inner_losses: Tensor
    aux: Any
    finite: Tensor


def _masked_task_sums(outputs: list[Tensor], finite: Tensor) -> list[Tensor]:
    """Each output ``[n, ...]`` summed over the tasks where ``finite`` (``[n]``) holds.

    Outputs of one dtype are summed side by side as one ``[n, P]`` matrix (three kernels for
    all of them, not two per tensor; the sums are views of one result). ``where``, not a
    product: a NaN gradient times 0 is still NaN.
    """
    if len(outputs) > 1 and len({t.dtype for t in outputs}) == 1:
        flat = torch.cat([t.reshape(len(t), -1) for t in outputs], dim=1)
        total = torch.where(finite.view(-1, 1), flat, 0.0).sum(0)
        shapes = [t.shape[1:] for t in outputs]
        return [part.view(shape) for part, shape in zip(
            total.split([shape.numel() for shape in shapes]), shapes, strict=True)]
    return [torch.where(finite.view(-1, *[1] * (t.dim() - 1)), t, 0.0).sum(0)
            for t in outputs]


def map_and_sum(
    mapped: Callable[..., tuple[Sequence[Tensor], tuple[Tensor, tuple[Tensor, Any]]]],
    shared: Sequence[Any],
    batched: Sequence[Any],
    num_tasks: int,
    chunk: int,
    *,
    compile: CompileOptions | None = None,
) -> VectorizedGradients:
    """Runs the vmapped ``mapped(*shared, *task_args)`` on ``chunk`` tasks at a time and sums
    its first output over the finite tasks of each chunk before the next chunk.

    ``mapped`` returns ``(tensors to sum [n, ...], (objectives [n], (inner_losses [n, K],
    aux)))`` for a chunk of n tasks. No host synchronisation. ``compile`` (``check_compile``)
    runs each chunk's call of ``mapped`` through ``torch.compile`` (``fullgraph=True``).
    """
    sums: list[Tensor] | None = None
    objectives, inner_losses, auxes, finites = [], [], [], []
    call = _mapped_caller(compile)
    for rows in _chunks(num_tasks, chunk):
        grads, (values, (inner, aux)) = call(mapped, *shared, *_take(list(batched), rows))
        finite = torch.isfinite(values) & torch.isfinite(inner).all(dim=1)
        masked = _masked_task_sums(list(grads), finite)
        sums = masked if sums is None else [a + b for a, b in zip(sums, masked, strict=True)]
        objectives.append(values.detach())
        inner_losses.append(inner.detach())
        auxes.append(pytree.tree_map(lambda t: t.detach(), aux))
        finites.append(finite)
    assert sums is not None
    aux_leaves, specs = zip(*(pytree.tree_flatten(a) for a in auxes))
    aux_all = pytree.tree_unflatten([torch.cat(parts) for parts in zip(*aux_leaves)], specs[0])
    return VectorizedGradients(sums, torch.cat(objectives), torch.cat(inner_losses), aux_all,
                               torch.cat(finites))


def vectorized_meta_gradients(
    objective: Callable[..., tuple[Tensor, tuple[Tensor, Any]]],
    inputs: Sequence[Tensor],
    batched: Sequence[Any],
    num_tasks: int,
    chunk: int,
    *,
    compile: CompileOptions | None = None,
) -> VectorizedGradients:
    """Per-task gradients of ``objective`` taken inside ``vmap``, summed over tasks.

    Computes ``vmap(grad_and_value(objective, has_aux=True), in_dims=(None, 0, ...))`` over
    ``chunk`` tasks at a time and sums each chunk's gradients before the next, so memory holds
    one chunk's graphs. No host synchronisation.

    Args:
        objective: ``objective(inputs, *task_args) -> (scalar, (inner_losses [K], aux))`` for
            ONE task; ``inputs`` is the list of tensors to differentiate.
        inputs: the meta-parameters to differentiate (shared by all tasks; detached here).
        batched: the task arguments, every tensor with a leading task dimension of
            ``num_tasks``.
        num_tasks: T.
        chunk: tasks per ``vmap`` call (T for one call).
        compile: ``check_compile``'s options: each chunk's call through ``torch.compile``.
    """
    mapped = vmap(grad_and_value(objective, has_aux=True),
                  in_dims=(None, *([0] * len(batched))))
    return map_and_sum(mapped, [[t.detach() for t in inputs]], batched, num_tasks, chunk,
                       compile=compile)


def raise_or_count_faults(result: VectorizedGradients, on_nonfinite: str) -> list[int]:
    """The indices of the finite tasks, with ONE host transfer for the whole meta-batch.

    In ``"raise"`` mode a non-finite task raises ``metazoo.NonFiniteError`` naming the first such
    task and its first non-finite inner step (or the query), as the loop's per-task checks do.
    """
    return kept_from_flags(result, result.finite.tolist(), on_nonfinite)


def kept_from_flags(result: VectorizedGradients, flags: Sequence[float | bool],
                    on_nonfinite: str) -> list[int]:
    """``raise_or_count_faults`` from ``result.finite`` already read (``flags``)."""
    return _kept_tasks(flags, on_nonfinite,
                       lambda index: (result.inner_losses[index], result.objectives[index]))


def deferred_faults_and_means(result: VectorizedGradients, on_nonfinite: str,
                              per_task: Sequence[tuple[Tensor, Tensor | None, Tensor]]
                              ) -> DeferredRead[tuple[list[int], MeanResults | None]]:
    """The kept tasks (``raise_or_count_faults``) and their means, read in one host transfer
    later (``metazoo.deferred_flags_and_means``); ``per_task``: every task's results."""
    return deferred_flags_and_means(
        result.finite, lambda flags: kept_from_flags(result, flags, on_nonfinite), per_task)


def kept_divisor(result: VectorizedGradients, on_nonfinite: str) -> int | Tensor:
    """What the sum of the kept tasks' gradients is divided by for their mean, read nowhere:
    the number of tasks in ``"raise"`` mode (a faulty task raises when the flags are read), the
    finite tasks counted on the device in ``"skip"`` mode (float64, at least 1)."""
    if on_nonfinite == "raise":
        return int(result.finite.numel())
    return result.finite.sum().clamp(min=1).to(torch.float64)


def mean_over_kept(total: Tensor, divisor: int | Tensor) -> Tensor:
    """``total / divisor`` (``kept_divisor``), in ``total``'s dtype: bit for bit the division by
    the Python count of kept tasks."""
    if isinstance(divisor, int):
        return total / divisor
    return total / divisor.to(device=total.device, dtype=total.dtype)
