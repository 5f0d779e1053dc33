"""metazoo.vectorize: the torch.func unroll mapped over tasks against the loop's unroll."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad_and_value, vmap

import metazoo
from metazoo import vectorize
from metazoo.testing import bn_net

check_vectorize, functional_unroll = vectorize.check_vectorize, vectorize.functional_unroll
check_vectorize_and_layout = vectorize.check_vectorize_and_layout
resolve_chunk, stack_tasks = vectorize.resolve_chunk, vectorize.stack_tasks
vectorized_meta_gradients = vectorize.vectorized_meta_gradients

DTYPE = torch.float64
TASKS = 3


def task_batches(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TASKS, 6, 1, 6, 6, generator=g, dtype=DTYPE)
    y = torch.arange(3).repeat(TASKS, 2)
    qx = torch.randn(TASKS, 9, 1, 6, 6, generator=g, dtype=DTYPE)
    qy = torch.arange(3).repeat(TASKS, 3)
    return x, y, qx, qy


OPTIMIZERS = {
    "sgd": lambda: metazoo.SGD(0.4),
    "momentum": lambda: metazoo.SGD(0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda: metazoo.Adam(0.05),
    "tensor_lr": lambda: metazoo.SGD(torch.tensor(0.3, dtype=DTYPE), momentum=0.5),
}


def query_objective(net: nn.Module, unroll, bn_mode: str, optimizer, first_order: bool,
                    clip: float | None = None, backward_clip: float | None = None):
    loss_fn = metazoo.make_loss_fn(net, F.cross_entropy, bn_mode=bn_mode)

    def objective(params, x, y, qx, qy):
        result = unroll(loss_fn, params, optimizer, [(x, y)], steps=3,
                        buffers=metazoo.initial_buffers(net, bn_mode), first_order=first_order,
                        inner_grad_clip=clip, backward_grad_clip=backward_clip)
        out, _ = metazoo.forward(net, result.params, result.buffers, qx, bn_mode=bn_mode,
                                 training=False)
        return F.cross_entropy(out, qy), result

    return objective


def loop_gradients(objective, params, batches):
    """Per-task meta-gradients of the loop's unroll by ordinary autograd, stacked."""
    per_task = []
    for task in zip(*batches):
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        value, _ = objective(leaves, *task)
        per_task.append(torch.autograd.grad(value, list(leaves.values())))
    return [torch.stack(g) for g in zip(*per_task)]


def assert_close(a, b, tol=1e-10):
    scale = max(1.0, max(t.abs().max().item() for t in b))
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max().item() <= tol * scale


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_meta_gradient_equals_the_loop(bn_mode, optimizer, first_order):
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)
    loop = query_objective(net, metazoo.unroll, bn_mode, OPTIMIZERS[optimizer](), first_order)
    mapped = query_objective(net, functional_unroll, bn_mode, OPTIMIZERS[optimizer](),
                             first_order)
    grads, _ = vmap(grad_and_value(lambda p, *b: mapped(p, *b)[0]),
                    in_dims=(None, 0, 0, 0, 0))(params, *batches)
    assert_close([grads[n] for n in params], loop_gradients(loop, params, batches))


@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_backward_grad_clip_clips_each_task_like_the_loop(first_order):
    """The clip of the gradient reaching each inner step runs per task under vmap (each
    task's own norm, as the loop), and it bites: unclipped gradients differ."""
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)

    def gradients(unroll, backward_clip):
        objective = query_objective(net, unroll, "running", metazoo.SGD(0.4, momentum=0.5),
                                    first_order, backward_clip=backward_clip)
        if unroll is metazoo.unroll:
            return loop_gradients(objective, params, batches)
        grads, _ = vmap(grad_and_value(lambda p, *b: objective(p, *b)[0]),
                        in_dims=(None, 0, 0, 0, 0))(params, *batches)
        return [grads[n] for n in params]

    expected = gradients(metazoo.unroll, 0.05)
    assert_close(gradients(functional_unroll, 0.05), expected)
    unclipped = gradients(metazoo.unroll, None)
    assert max((a - b).abs().max().item() for a, b in zip(expected, unclipped)) > 1e-3


def trajectory_objective(net: nn.Module, unroll, optimizer, checkpoint, backward_clip=None,
                         steps: int = 5, calls: list | None = None):
    """Query loss at the end plus 0.3 x at point 2 (gradients arrive inside a segment too)."""
    inner = metazoo.make_loss_fn(net, F.cross_entropy, bn_mode="running")

    def loss_fn(params, buffers, batch):
        if calls is not None:
            calls.append(torch.is_grad_enabled())
        return inner(params, buffers, batch)

    def objective(params, x, y, qx, qy):
        r = unroll(loss_fn, params, optimizer, [(x, y)], steps=steps,
                   buffers=metazoo.initial_buffers(net, "running"), checkpoint=checkpoint,
                   backward_grad_clip=backward_clip, keep_trajectory=True)
        value = 0.0
        for weight, point in ((1.0, steps), (0.3, 2)):
            out, _ = metazoo.forward(net, r.trajectory[point], r.buffer_trajectory[point], qx,
                                     bn_mode="running", training=False)
            value = value + weight * F.cross_entropy(out, qy)
        return value, r

    return objective


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "tensor_lr"])
@pytest.mark.parametrize("checkpoint,backward_clip,steps", [
    (2, None, 5), (True, None, 13), (1, 0.05, 5), (metazoo.Checkpoint(snapshots=0), None, 5),
    (metazoo.Checkpoint(snapshots=2), 0.05, 7), (metazoo.Checkpoint(snapshots=9), None, 3)])
def test_vmapped_checkpointed_unroll_equals_the_loop(optimizer, checkpoint, backward_clip,
                                                     steps):
    """Segments (2 of 5 steps: the last one partial; 1 step) and binomial schedules (the default
    with 13 steps; no stored state; 2 for 7 steps; more than K) carry optimizer state, running
    statistics and trajectory points; meta-gradients equal the loop's checkpointed and plain
    unrolls', adapted parameters and statistics too."""
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)

    def gradients(unroll, checkpoint):
        objective = trajectory_objective(net, unroll, OPTIMIZERS[optimizer](), checkpoint,
                                         backward_clip, steps)
        if unroll is metazoo.unroll:
            return loop_gradients(objective, params, batches)
        grads, _ = vmap(grad_and_value(lambda p, *b: objective(p, *b)[0]),
                        in_dims=(None, 0, 0, 0, 0))(params, *batches)
        return [grads[n] for n in params]

    expected = gradients(metazoo.unroll, checkpoint)
    assert_close(gradients(metazoo.unroll, None), expected)
    assert_close(gradients(functional_unroll, checkpoint), expected)
    objective = trajectory_objective(net, functional_unroll, OPTIMIZERS[optimizer](), checkpoint,
                                     backward_clip, steps)
    mapped = vmap(lambda p, *b: (lambda r: [*r.params.values(), *r.buffers.values(),
                                            r.losses])(objective(p, *b)[1]),
                  in_dims=(None, 0, 0, 0, 0))(params, *batches)
    for task in range(TASKS):
        _, loop = trajectory_objective(net, metazoo.unroll, OPTIMIZERS[optimizer](), None,
                                       steps=steps)(params, *(b[task] for b in batches))
        got = mapped
        assert_close([t[task].to(DTYPE) for t in got],
                     [t.to(DTYPE) for t in (*loop.params.values(), *loop.buffers.values(),
                                            loop.losses)])


def test_vmapped_checkpointing_recomputes_segments_and_holds_only_their_inputs():
    """Under vmap(grad) the backward pass recomputes every step once (the segments ran as
    nodes, not as a plain graph); by ordinary autograd the graph of 12 steps in segments of 3
    is a fraction of the plain unroll's and grows with K / S: it does not hold the steps.
    (Saved-tensor hooks, a byte count, are refused by torch.func.grad inside the unroll.)"""
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)
    calls: list[bool] = []
    objective = trajectory_objective(net, functional_unroll, metazoo.SGD(0.4), 2, calls=calls)
    vmap(grad_and_value(lambda p, *b: objective(p, *b)[0]),
         in_dims=(None, 0, 0, 0, 0))(params, *batches)
    assert len(calls) == 2 * 5  # forward, then each step recomputed in the backward pass

    def graph_nodes(steps: int, checkpoint) -> int:
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        objective = trajectory_objective(net, functional_unroll, metazoo.SGD(0.4), checkpoint,
                                         steps=steps)
        value, _ = objective(leaves, *(b[0] for b in batches))
        seen, frontier = set(), [value.grad_fn]
        while frontier:
            node = frontier.pop()
            if node is not None and node not in seen:
                seen.add(node)
                frontier += [next_node for next_node, _ in node.next_functions]
        return len(seen)

    # The recomputation leaves no graph on the gradients: one recorded on them would carry every
    # segment's recomputed graph into the next segment's backward (memory growing with K).
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    value, _ = trajectory_objective(net, functional_unroll, metazoo.SGD(0.4), 2, steps=6)(
        leaves, *(b[0] for b in batches))
    assert not any(g.requires_grad for g in torch.autograd.grad(value, list(leaves.values())))

    plain, checkpointed = graph_nodes(12, None), graph_nodes(12, 3)
    assert checkpointed * 5 < plain
    assert graph_nodes(24, 3) - checkpointed < (graph_nodes(24, None) - plain) / 5


@pytest.mark.parametrize("steps", [2, 6, 11])
@pytest.mark.parametrize("snapshots", [0, 1, 3, 20])
def test_vmapped_binomial_checkpointing_recomputes_what_the_formula_says(steps, snapshots):
    """Under vmap(grad): K loss calls forward, then K taped plus Griewank's count recomputed
    (this path's forward sweep stores nothing, see _CheckpointedFunctionalUnroll), and the
    trajectory gradients (the query at the end and at point 2) equal the loop's."""
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)
    checkpoint = metazoo.Checkpoint(snapshots=snapshots)
    calls: list[bool] = []
    objective = trajectory_objective(net, functional_unroll, metazoo.Adam(0.05), checkpoint,
                                     steps=steps, calls=calls)
    grads, _ = vmap(grad_and_value(lambda p, *b: objective(p, *b)[0]),
                    in_dims=(None, 0, 0, 0, 0))(params, *batches)
    plan = checkpoint.plan(steps, vectorized=True)
    assert plan.recomputed_steps == metazoo.binomial_recomputations(steps, snapshots)
    assert plan.stored_states <= snapshots
    assert len(calls) == 2 * steps + plan.recomputed_steps
    expected = loop_gradients(trajectory_objective(net, metazoo.unroll, metazoo.Adam(0.05),
                                                   None, steps=steps), params, batches)
    assert_close([grads[n] for n in params], expected)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_vmapped_unroll_gives_the_loops_adapted_params_statistics_losses_and_state(optimizer):
    """Adapted parameters, BatchNorm running statistics (running mode), inner losses and the
    optimizer state of each task equal the loop's; the clip is applied the same way."""
    net, (x, y, _, _) = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)
    loss_fn = metazoo.make_loss_fn(net, F.cross_entropy, bn_mode="running")
    buffers = metazoo.initial_buffers(net, "running")

    def run(unroll, x, y):
        r = unroll(loss_fn, params, OPTIMIZERS[optimizer](), [(x, y)], steps=3, buffers=buffers,
                   inner_grad_clip=0.5)
        state = [t for t in torch.utils._pytree.tree_leaves(r.state)
                 if isinstance(t, torch.Tensor)]
        return r.params, r.buffers, r.losses, state

    mapped = vmap(lambda x, y: run(functional_unroll, x, y))(x, y)
    for task in range(TASKS):
        expected = run(metazoo.unroll, x[task], y[task])
        got = torch.utils._pytree.tree_map(lambda t, i=task: t[i], mapped)
        leaves_expected = torch.utils._pytree.tree_leaves(expected)
        leaves_got = torch.utils._pytree.tree_leaves(got)
        assert len(leaves_got) == len(leaves_expected)
        assert_close([t.to(DTYPE) for t in leaves_got if isinstance(t, torch.Tensor)],
                     [t.to(DTYPE) for t in leaves_expected if isinstance(t, torch.Tensor)])
    # The statistics moved away from their initial values (the comparison is not vacuous).
    assert not torch.allclose(mapped[1]["1.running_mean"], torch.zeros(3, dtype=DTYPE))


def test_taking_the_gradient_after_vmap_is_wrong_with_batch_statistics_and_ours_is_not():
    """The route this module must not take: vmap of the objective, then an ordinary backward.
    With BatchNorm batch statistics it differs from the loop by far more than rounding, so the
    1e-10 comparisons above would catch it."""
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)
    objective = query_objective(net, functional_unroll, "batch", metazoo.SGD(0.4), False)
    expected = loop_gradients(query_objective(net, metazoo.unroll, "batch", metazoo.SGD(0.4),
                                              False), params, batches)
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    values = vmap(lambda p, *b: objective(p, *b)[0], in_dims=(None, 0, 0, 0, 0))(leaves,
                                                                                  *batches)
    wrong = torch.autograd.grad(values.sum(), list(leaves.values()))
    expected_sum = [g.sum(0) for g in expected]
    error = max(((w - e).abs().max() / e.abs().max()).item()
                for w, e in zip(wrong, expected_sum))
    assert error > 1e-3

    result = vectorized_meta_gradients(
        lambda inputs, *b: (lambda v, r: (v, (r.losses, ())))(*objective(
            dict(zip(params, inputs)), *b)),
        list(params.values()), list(batches), TASKS, TASKS)
    assert_close(result.grads, expected_sum)


def test_chunked_equals_unchunked_and_reports_each_task():
    net, batches = bn_net(), task_batches()
    params = metazoo.params_of(net, detach=True)
    objective = query_objective(net, functional_unroll, "running", metazoo.SGD(0.4), False)

    def task_objective(inputs, *b):
        value, result = objective(dict(zip(params, inputs)), *b)
        return value, (result.losses, (value * 2,))

    whole = vectorized_meta_gradients(task_objective, list(params.values()), list(batches),
                                      TASKS, TASKS)
    for chunk in (1, 2):
        part = vectorized_meta_gradients(task_objective, list(params.values()), list(batches),
                                         TASKS, chunk)
        assert_close(part.grads, whole.grads)
        assert_close([part.objectives, part.inner_losses, part.aux[0]],
                     [whole.objectives, whole.inner_losses, whole.aux[0]])
    assert whole.objectives.shape == (TASKS,) and whole.inner_losses.shape == (TASKS, 3)
    assert bool(whole.finite.all())


def test_functional_unroll_is_differentiable_by_ordinary_autograd_too():
    net, (x, y, qx, qy) = bn_net(), task_batches()
    params = metazoo.params_of(net)
    for unroll in (functional_unroll, metazoo.unroll):
        net.zero_grad()
        query_objective(net, unroll, "running", metazoo.Adam(0.05), False)(
            params, x[0], y[0], qx[0], qy[0])[0].backward()
        if unroll is functional_unroll:
            expected = [p.grad.clone() for p in net.parameters()]
    assert_close(expected, [p.grad for p in net.parameters()])


def test_stack_tasks_needs_tasks_of_one_shape():
    x, y, qx, qy = task_batches()
    tasks = [metazoo.Task([(x[i], y[i])], (qx[i], qy[i])) for i in range(TASKS)]
    support, query = stack_tasks(tasks)
    assert support[0][0].shape == (TASKS, 6, 1, 6, 6) and query[1].shape == (TASKS, 9)
    odd = [*tasks[:2], metazoo.Task([(x[2], y[2])], (qx[2][:6], qy[2][:6]))]
    with pytest.raises(ValueError, match=r"task 2 query\[0\] has shape \(6, 1, 6, 6\).*"
                                         r"vectorize=False"):
        stack_tasks(odd)
    more = [*tasks[:2], metazoo.Task([(x[2], y[2])] * 2, (qx[2], qy[2]))]
    with pytest.raises(ValueError, match="task 2 has 2 support batches"):
        stack_tasks(more)


@pytest.mark.parametrize("dtypes", [(DTYPE, DTYPE, DTYPE), (DTYPE, torch.float32, DTYPE)])
def test_masked_task_sums_leave_non_finite_tasks_out_in_one_or_per_tensor_sums(dtypes):
    # One [n, P] sum for outputs of one dtype, one sum per tensor otherwise: the same sums.
    g = torch.Generator().manual_seed(4)
    outputs = [torch.randn(4, *shape, generator=g, dtype=DTYPE).to(dtype)
               for shape, dtype in zip([(3, 2), (5,), (2, 1, 3)], dtypes, strict=True)]
    outputs[1][2, 0] = float("nan")  # task 2 is not finite: its NaN must not reach the sums
    finite = torch.tensor([True, True, False, True])
    sums = vectorize._masked_task_sums(outputs, finite)
    for got, output in zip(sums, outputs, strict=True):
        assert got.dtype == output.dtype and got.shape == output.shape[1:]
        torch.testing.assert_close(got, output[[0, 1, 3]].sum(0), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("devices", [vectorize.CHANNELS_LAST_DEVICES, frozenset()])
def test_stack_tasks_lays_image_batches_out_for_the_task_folding_layers(monkeypatch, devices):
    # Values as torch.stack. 4-D image batches on a CPU: [N, H, W, T, C] in memory, so the
    # tasks fold into channels as a channels-last view; on other devices (CUDA) [N, T, C, H, W],
    # folded into channels or the batch dimension without a copy. Labels keep torch.stack's.
    monkeypatch.setattr(vectorize, "CHANNELS_LAST_DEVICES", devices)
    x, y, qx, qy = task_batches()
    x = x.expand(-1, -1, 2, -1, -1) * torch.tensor([1.0, -1.0], dtype=DTYPE).view(2, 1, 1)
    tasks = [metazoo.Task([(x[i], y[i])], (qx[i], qy[i])) for i in range(TASKS)]
    (images, labels), = stack_tasks(tasks)[0]
    assert torch.equal(images, x) and torch.equal(labels, y)
    assert labels.is_contiguous()
    if "cpu" in devices:
        assert images.permute(1, 3, 4, 0, 2).is_contiguous()
        folded = images.movedim(0, 1).reshape(6, TASKS * 2, 6, 6)
        assert folded.data_ptr() == images.data_ptr()  # a view
        assert folded.is_contiguous(memory_format=torch.channels_last)
        assert not folded.is_contiguous()
    else:
        assert images.movedim(0, 1).is_contiguous()


def test_vectorize_and_layout_are_checked_together():
    assert check_vectorize_and_layout(False, True) == (False, True)
    assert check_vectorize_and_layout(4, False) == (4, False)
    with pytest.raises(ValueError, match="vectorize='auto' does not support channels_last; "
                                         "pass channels_last=False, or vectorize=False"):
        check_vectorize_and_layout("auto", True)
    with pytest.raises(ValueError, match="channels_last"):
        check_vectorize_and_layout(False, "yes")


def test_vectorize_option_and_auto_choice():
    for value in (False, True, 1, 8, "auto"):
        assert check_vectorize(value) == value
    for bad in (0, -2, "yes", 1.5, None):
        with pytest.raises(ValueError, match="vectorize must be False"):
            check_vectorize(bad)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_chunk("auto", 16, cpu) is None  # the loop: measured faster on CPUs
    assert resolve_chunk("auto", 16, cuda) == 16
    assert resolve_chunk(False, 16, cuda) is None
    assert resolve_chunk(True, 16, cpu) == 16
    assert resolve_chunk(4, 16, cpu) == 4 and resolve_chunk(40, 16, cpu) == 16
