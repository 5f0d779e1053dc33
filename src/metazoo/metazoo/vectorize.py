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
and accumulates their gradients. On a CPU the loop is faster (ARCHITECTURE.md, "Measured facts":
vmap over 16 tasks took 5.4-8.2 s against 4.5 s for the loop), on a GPU the vectorized form was
9x faster on the MAML Omniglot workload (0.156 s against 1.44 s per meta-step, issue 17), so
``vectorize="auto"`` vectorizes on CUDA only.
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
from metazoo.functional import Buffers, Params
from metazoo.learner import Batch, Task
from metazoo.optim import InnerOptimizer, OptState
from metazoo.unroll import LossFn, UnrollResult, _ClipBackward, clip_grad_norm

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
    ``step``. Not supported here (``ValueError``): ``checkpoint`` (its autograd.Function does not
    run under transforms); use ``metazoo.unroll`` for it.
    """
    if checkpoint not in (None, False):
        raise ValueError(f"checkpoint={checkpoint!r} is not supported by the vectorized "
                         f"(torch.func) unroll; use checkpoint=None, or metazoo.unroll (the loop)")
    static = dict(static or {})
    buffers = dict(buffers or {})
    steps = len(batches) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if state is None:
        state = optimizer.init(params)
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
