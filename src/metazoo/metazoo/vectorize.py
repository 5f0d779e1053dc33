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
and accumulates their gradients. On a CPU the loop is as fast or faster and far lighter
(ARCHITECTURE.md, "Measured facts": vmap over 16 tasks took 5.4-8.2 s against 4.5 s for the loop;
after the closed-form BatchNorm of issue 26, W1 at 8 tasks, 1 thread, interleaved medians of 7:
vectorized 1.10x the hand-written loop and 1.00x the library's loop, at 1,905 MiB peak RSS
against 210), on a GPU the vectorized form was 9x faster on the MAML Omniglot workload (0.156 s
against 1.44 s per meta-step, issue 17), so ``vectorize="auto"`` vectorizes on CUDA only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from metazoo.faults import task_fault
from metazoo.functional import Buffers, Params, closed_form_batch_norm
from metazoo.learner import Batch, Task
from metazoo.optim import InnerOptimizer, OptState
from metazoo.unroll import DEFAULT_SEGMENT, LossFn, UnrollResult, _ClipBackward, clip_grad_norm

__all__ = ["VectorizedGradients", "check_vectorize", "functional_unroll", "map_and_sum",
           "map_tasks", "raise_or_count_faults", "resolve_chunk", "stack_tasks",
           "vectorized_meta_gradients"]

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


def resolve_chunk(vectorize: Vectorize, num_tasks: int, device: torch.device) -> int | None:
    """How many tasks to map at once, or ``None`` for the per-task loop.

    ``"auto"`` vectorizes on CUDA devices only: on the CPU the loop was measured faster
    (see the module docstring and ``benchmarks/gpu_meta_step.py``).
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
    support = [(torch.stack([t.support[k][0] for t in tasks]),
                torch.stack([t.support[k][1] for t in tasks])) for k in range(len(first.support))]
    query = (torch.stack([t.query[0] for t in tasks]), torch.stack([t.query[1] for t in tasks]))
    return support, query


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
class _Segment:
    """Everything about steps ``start..end`` of a checkpointed ``functional_unroll`` that is not
    a tensor. ``state_template``: the optimizer state at ``start`` with its tensors ``None``
    (non-tensor leaves such as the step count kept); ``final_template``: the same at ``end``,
    set by ``run``."""

    loss_fn: LossFn
    optimizer: InnerOptimizer
    start: int
    end: int
    sizes: tuple[int, ...]  # params, state, buffers, static, hyper, batch tensors
    names: tuple[list[str], list[str], list[str]]  # params, buffers, static
    state_template: Any
    batch_spec: Any
    num_batches: int
    inner_grad_clip: float | None
    backward_grad_clip: float | None
    final_template: Any = None

    def run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The segment's steps: each point (parameters, buffers), final state tensors, losses."""
        parts, offset = [], 0
        for size in self.sizes:
            parts.append(list(tensors[offset:offset + size]))
            offset += size
        params_t, state_t, buffers_t, static_t, hyper, batch_t = parts
        names, buffer_names, static_names = self.names
        params, buffers = dict(zip(names, params_t)), dict(zip(buffer_names, buffers_t))
        static = dict(zip(static_names, static_t))
        state = _replace_leaves(self.state_template, state_t)
        batches = pytree.tree_unflatten(batch_t, self.batch_spec)
        optimizer = self.optimizer.with_hyperparameter_tensors(hyper)
        points, losses = [], []
        for k in range(self.start, self.end):
            params, state, buffers, loss = _functional_step(
                self.loss_fn, optimizer, batches[k % self.num_batches], params, static, buffers,
                state, first_order=False, inner_grad_clip=self.inner_grad_clip,
                backward_grad_clip=self.backward_grad_clip)
            points += [*params.values(), *buffers.values()]
            losses.append(loss)
        self.final_template = pytree.tree_map(
            lambda leaf: None if isinstance(leaf, Tensor) else leaf, state)
        return (*points, *_tensors_of(state), torch.stack(losses))


def _tensors_of(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


def _replace_leaves(template: Any, tensors: Sequence[Tensor]) -> Any:
    """``template`` with its tensor (or ``None``) leaves replaced by ``tensors`` in order."""
    leaves, spec = pytree.tree_flatten(template)
    replacements = iter(tensors)
    return pytree.tree_unflatten([next(replacements) if leaf is None or isinstance(leaf, Tensor)
                                  else leaf for leaf in leaves], spec)


class _CheckpointedSegment(torch.autograd.Function):
    """One segment of a checkpointed ``functional_unroll`` as one node: the forward keeps only
    the segment's inputs, the backward recomputes the segment under ``torch.func.vjp``.

    ``setup_context`` form with a generated vmap rule, so it runs under ``vmap``/``grad`` (each
    task recomputes its own segment). Batches are inputs (tensors a Function closes over would
    escape the transforms), constants for the gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(segment: _Segment, *tensors: Tensor) -> tuple[Tensor, ...]:
        outputs, seen = [], {id(t) for t in tensors}
        for tensor in segment.run(tensors):
            # An input (buffers a step leaves unchanged) or a repeated output is returned as a
            # view: a Function in the setup_context form may not return its inputs as-is.
            outputs.append(tensor.view_as(tensor) if id(tensor) in seen else tensor)
            seen.add(id(tensor))
        return tuple(outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.segment = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.mark_non_differentiable(output[-1])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        segment: _Segment = ctx.segment
        tensors = [t.detach() for t in ctx.saved_tensors]
        num_differentiable = sum(segment.sizes[:-1])
        differentiable = [i for i in range(num_differentiable) if tensors[i].is_floating_point()]

        floating: list[bool] = []

        def recompute(*inputs: Tensor) -> tuple[Tensor, ...]:
            full = list(tensors)
            for index, tensor in zip(differentiable, inputs, strict=True):
                full[index] = tensor
            outputs = segment.run(full)[:-1]  # the losses carry no gradient
            floating[:] = [t.is_floating_point() for t in outputs]
            # Integer outputs (BatchNorm's num_batches_tracked) carry no gradient either.
            return tuple(t for t in outputs if t.is_floating_point())

        # No grad outside the vjp (which enables it for itself): the backward of a
        # torch.func.grad runs with create_graph, and a recomputed segment recorded there would
        # ride on the gradients into the next segment's backward, keeping every segment's
        # graph alive (memory growing with K again).
        with torch.no_grad():
            vjp_fn = torch.func.vjp(recompute, *[tensors[i] for i in differentiable])[1]
            input_grads = iter(vjp_fn(tuple(g.detach() for g, f in zip(grads[:-1], floating)
                                            if f)))
        result: list[Tensor | None] = [None] * len(tensors)
        for index in differentiable:
            result[index] = next(input_grads)
        return (None, *result)


def _checkpointed_unroll(loss_fn: LossFn, params: Params, optimizer: InnerOptimizer,
                         batches: Sequence[Batch], steps: int, static: Params, buffers: Buffers,
                         state: OptState, segment: int, inner_grad_clip: float | None,
                         backward_grad_clip: float | None, keep_trajectory: bool
                         ) -> UnrollResult:
    """``functional_unroll`` through ``_CheckpointedSegment`` nodes of ``segment`` steps: the
    graph holds each segment's inputs, not its steps (memory bounded in K for a fixed S)."""
    batch_tensors, batch_spec = pytree.tree_flatten(list(batches))
    hyper = optimizer.hyperparameter_tensors()
    names, buffer_names = list(params), list(buffers)
    trajectory, buffer_trajectory = [params], [buffers]
    losses = []
    for start in range(0, steps, segment):
        end = min(start + segment, steps)
        state_tensors = _tensors_of(state)
        spec = _Segment(loss_fn, optimizer, start, end,
                        (len(params), len(state_tensors), len(buffers), len(static), len(hyper),
                         len(batch_tensors)),
                        (names, buffer_names, list(static)),
                        pytree.tree_map(lambda leaf: None if isinstance(leaf, Tensor) else leaf,
                                        state),
                        batch_spec, len(batches), inner_grad_clip, backward_grad_clip)
        outputs = _CheckpointedSegment.apply(spec, *params.values(), *state_tensors,
                                             *buffers.values(), *static.values(), *hyper,
                                             *batch_tensors)
        width = len(names) + len(buffer_names)
        for i in range(end - start):
            point = outputs[i * width:(i + 1) * width]
            params = dict(zip(names, point[:len(names)]))
            buffers = dict(zip(buffer_names, point[len(names):]))
            trajectory.append(params)
            buffer_trajectory.append(buffers)
        state = _replace_leaves(spec.final_template, outputs[(end - start) * width:-1])
        losses.append(outputs[-1])
    if not keep_trajectory:
        return UnrollResult(params, state, buffers, torch.cat(losses))
    return UnrollResult(params, state, buffers, torch.cat(losses), trajectory,
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
    checkpoint: int | bool | None = None,
    inner_grad_clip: float | None = None,
    backward_grad_clip: float | None = None,
    keep_trajectory: bool = False,
) -> UnrollResult:
    """``metazoo.unroll`` for use inside ``torch.func`` transforms (``vmap``, ``grad``).

    Same arguments, steps and result as ``metazoo.unroll``; the inner gradient is taken with
    ``torch.func.grad``, so the unroll can be mapped over tasks and differentiated by an outer
    ``torch.func.grad`` (or by ordinary autograd). The update rule is the optimizer's own
    ``step``. ``checkpoint`` (an int S, or ``True`` for ``DEFAULT_SEGMENT``; as in the loop, not
    in first-order mode) runs each segment of S steps as one ``_CheckpointedSegment`` node whose
    backward recomputes it with ``torch.func.vjp``: the graph holds the segments' inputs, not
    their steps.
    """
    static = dict(static or {})
    buffers = dict(buffers or {})
    steps = len(batches) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if state is None:
        state = optimizer.init(params)
    segment = DEFAULT_SEGMENT if checkpoint is True else int(checkpoint or 0)
    if not first_order and 0 < segment < steps:  # first order keeps no second-order graph
        return _checkpointed_unroll(loss_fn, params, optimizer, batches, steps, static, buffers,
                                    state, segment, inner_grad_clip, backward_grad_clip,
                                    keep_trajectory)
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


def _chunks(num_tasks: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, num_tasks)) for start in range(0, num_tasks, chunk)]


def _take(tree: Any, rows: slice) -> Any:
    return pytree.tree_map(lambda t: t[rows], tree)


def map_tasks(fn: Callable[..., Any], batched: Any, num_tasks: int, chunk: int) -> Any:
    """``vmap(fn)`` over the leading task dimension of ``batched``, ``chunk`` tasks at a time.

    Returns the outputs of all chunks concatenated along the task dimension.
    """
    mapped = vmap(fn)
    with closed_form_batch_norm():
        outputs = [mapped(*_take(batched, rows)) for rows in _chunks(num_tasks, chunk)]
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


def map_and_sum(
    mapped: Callable[..., tuple[Sequence[Tensor], tuple[Tensor, tuple[Tensor, Any]]]],
    shared: Sequence[Any],
    batched: Sequence[Any],
    num_tasks: int,
    chunk: int,
) -> VectorizedGradients:
    """Runs the vmapped ``mapped(*shared, *task_args)`` on ``chunk`` tasks at a time and sums
    its first output over the finite tasks of each chunk before the next chunk.

    ``mapped`` returns ``(tensors to sum [n, ...], (objectives [n], (inner_losses [n, K],
    aux)))`` for a chunk of n tasks. No host synchronisation.
    """
    sums: list[Tensor] | None = None
    objectives, inner_losses, auxes, finites = [], [], [], []
    for rows in _chunks(num_tasks, chunk):
        with closed_form_batch_norm():
            grads, (values, (inner, aux)) = mapped(*shared, *_take(list(batched), rows))
        finite = torch.isfinite(values) & torch.isfinite(inner).all(dim=1)
        # where, not a product: a NaN gradient times 0 is still NaN.
        masked = [torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0).sum(0)
                  for g in grads]
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
    """
    mapped = vmap(grad_and_value(objective, has_aux=True),
                  in_dims=(None, *([0] * len(batched))))
    return map_and_sum(mapped, [[t.detach() for t in inputs]], batched, num_tasks, chunk)


def raise_or_count_faults(result: VectorizedGradients, on_nonfinite: str) -> list[int]:
    """The indices of the finite tasks, with ONE host transfer for the whole meta-batch.

    In ``"raise"`` mode a non-finite task raises ``metazoo.NonFiniteError`` naming the first such
    task and its first non-finite inner step (or the query), as the loop's per-task checks do.
    """
    finite = result.finite.tolist()
    if on_nonfinite == "raise" and not all(finite):
        first = finite.index(False)
        fault = task_fault(first, result.inner_losses[first], result.objectives[first])
        assert fault is not None
        raise fault
    return [index for index, ok in enumerate(finite) if ok]
