"""Warp: the README usage, parameter partitioning, collection, buffers and checkpoints."""

from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
from torch.optim import SGD

import warpgrad
from metazoo import NonFiniteError
from warpgrad import DualUpdater, OptimizerParameters, ReplayBuffer, Warp


def _live_graph_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects()
                   if type(o) in (torch.Tensor, torch.nn.Parameter) and o.grad_fn is not None)


@pytest.mark.parametrize("criterion_form", ["class", "instance"])
def test_readme_usage_runs_as_written(make_tasks, criterion_form):
    torch.manual_seed(0)
    num_layers, hidden_size = 4, 5
    # --- the reference README, verbatim apart from concrete sizes and learning rates ---
    warp_layer_idx = range(0, num_layers, 2)
    adapt_layer_idx = range(1, num_layers + 1, 2)
    layers = [Linear(hidden_size, hidden_size).double() for _ in range(num_layers)]
    model = Sequential(*layers)
    warp_layers = [layers[i] for i in warp_layer_idx]
    adapt_layers = [layers[i] for i in adapt_layer_idx]
    criterion = CrossEntropyLoss()
    updater = warpgrad.DualUpdater(
        criterion=CrossEntropyLoss if criterion_form == "class" else CrossEntropyLoss())
    replay_buffer = warpgrad.ReplayBuffer()
    model = warpgrad.Warp(model, adapt_layers, warp_layers, updater, replay_buffer)
    meta_opt = SGD(model.warp_parameters(), lr=0.1)
    # ------------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(2)
    tasks = [[(torch.randn(6, hidden_size, generator=g, dtype=torch.float64),
               torch.randint(0, hidden_size, (6,), generator=g)) for _ in range(3)]
             for _ in range(2)]
    warp_before = [p.detach().clone() for p in model.warp_parameters()]
    init_before = [p.detach().clone() for p in model.init_parameters()]
    graphs_before = _live_graph_tensors()
    evaluations = []

    def your_evaluation(task, model):
        with torch.no_grad():
            x, y = task[0]
            evaluations.append(criterion(model(x), y).item())

    def meta_step_fn():
        meta_opt.step()
        meta_opt.zero_grad()

    for _ in range(3):  # meta_steps
        meta_batch = tasks
        for task in meta_batch:
            model.init_adaptation()
            model.register_task(task)
            model.collect()
            opt = SGD(model.adapt_parameters(), lr=0.1)
            for x, y in task:
                loss = criterion(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            model.eval()
            model.no_collect()
            your_evaluation(task, model)
        assert len(replay_buffer) == 6
        model.backward(meta_step_fn)
        assert len(replay_buffer) == 0 and replay_buffer.slots() == []
    assert len(evaluations) == 6 and all(e == e for e in evaluations)
    assert all(not torch.equal(a, b) for a, b in zip(warp_before, model.warp_parameters(),
                                                      strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(init_before, model.init_parameters(),
                                                      strict=True))
    # No graph survives: neither in gradients, parameters nor anywhere else.
    del loss
    for p in [*model.parameters(), *model.init_parameters()]:
        assert p.grad is None or p.grad.grad_fn is None
        assert p.grad_fn is None
    assert _live_graph_tensors() <= graphs_before


def _record_loop(warp, tasks, lr=0.2, momentum=0.0):
    states = []
    for task in tasks:
        warp.init_adaptation()
        warp.register_task(task)
        warp.collect()
        opt = torch.optim.SGD(warp.adapt_parameters(), lr=lr, momentum=momentum)
        if momentum:
            warp.register_optimizer(opt)
        before = []
        for x, y in task:
            before.append({n: p.detach().clone() for n, p in warp.named_adapt_parameters()})
            F.cross_entropy(warp(x), y).backward()
            opt.step()
            opt.zero_grad()
        warp.no_collect()
        final = {n: p.detach().clone() for n, p in warp.named_adapt_parameters()}
        states.append((before, final, opt))
    return states


def test_collect_records_the_state_before_each_step_and_the_final_state(make_model, make_tasks):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy))
    tasks = make_tasks(num_tasks=2, batches=3)
    recorded = _record_loop(warp, tasks)
    for slot, (before, final, _) in zip(warp.buffer.slots(), recorded, strict=True):
        states = warp.buffer.states(slot)
        assert [s.step for s in states] == [0, 1, 2]
        for s, expected in zip(states, before, strict=True):
            for n, t in expected.items():
                assert torch.equal(s.params[n], t)
        trajectory = warp.buffer.trajectory(slot)
        assert len(trajectory) == 4  # the last segment is closed by the adapted parameters
        for n, t in final.items():
            assert torch.equal(trajectory[-1][n], t)
    # The first state of every task is the initialisation.
    for slot in warp.buffer.slots():
        for n, p in warp.named_init_parameters():
            assert torch.equal(warp.buffer.state(slot, 0).params[n], p.detach())
    # Evaluation calls after no_collect are not recorded.
    with torch.no_grad():
        warp(tasks[0][0][0])
    assert len(warp.buffer) == 6


def test_momentum_buffers_are_recorded_and_replayed(make_model, make_tasks):
    model = make_model()
    params = OptimizerParameters(default_lr=0.2, default_momentum=0.9)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy), optimizer_parameters=params)
    tasks = make_tasks(num_tasks=1, batches=3)
    _record_loop(warp, tasks, momentum=0.9)
    states = warp.buffer.states(warp.buffer.slots()[0])
    assert states[0].momentum is None  # torch.optim.SGD has no buffer before its first step
    assert all(s.momentum is not None for s in states[1:])
    # The replayed step from state k reproduces torch.optim.SGD's step k exactly.
    for k in (0, 1):
        theta = {n: states[k].params[n].clone().requires_grad_(True)
                 for n in states[k].params}
        ctx = warp.replay_context(F.cross_entropy)
        loss = ctx.loss(theta, tasks[0][k])
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))
        opt = params.inner_optimizer(detach=True)
        state = ({"step": 0, "momentum_buffer": {n: torch.zeros_like(t)
                                                 for n, t in theta.items()}}
                 if states[k].momentum is None
                 else {"step": 1, "momentum_buffer": states[k].momentum})
        stepped, _ = opt.step({n: t.detach() for n, t in theta.items()}, grads, state)
        for n, t in stepped.items():
            torch.testing.assert_close(t, states[k + 1].params[n], rtol=1e-12, atol=1e-14)


def test_disk_and_memory_buffers_give_identical_meta_gradients(make_model, make_tasks):
    """15 steps and 3 tasks, exact mode, with learned learning rates and momentum."""
    tasks = make_tasks(num_tasks=3, batches=15, size=4)
    base = make_model(width=3)
    grads = []
    for buffer in (ReplayBuffer(), ReplayBuffer(inmem=False)):
        model = copy.deepcopy(base)
        params = OptimizerParameters(trainable=True, default_lr=0.2, default_momentum=0.5)
        updater = DualUpdater(F.cross_entropy, warp_objective="exact", bsz=0, init_lr=None,
                              seed=11)
        warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater, buffer,
                    optimizer_parameters=params)
        _record_loop(warp, tasks, momentum=0.5)
        assert len(buffer) == 45
        if not buffer.inmem:  # states, terminal states and the lock file (the manifest)
            assert len(os.listdir(buffer.tmpdir)) == 45 + 3 + 1
        collected = {}

        def step_fn(warp=warp, collected=collected):
            for n, p in warp.named_meta_parameters():
                if p.grad is not None:
                    collected[n] = p.grad.clone()
                    p.grad = None

        result = warp.backward(step_fn)
        assert result.num_meta_steps == 2
        if not buffer.inmem:
            assert os.listdir(buffer.tmpdir) == ["owner.lock"]
        grads.append(collected)
    memory, disk = grads
    assert set(memory) == set(disk) and any(n.startswith("optimizer.") for n in memory)
    assert any(n.startswith("init.") for n in memory)
    for n in memory:
        assert torch.equal(memory[n], disk[n]), n


def test_partition_names_and_meta_parameter_groups(make_model):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy), optimizer_parameters=OptimizerParameters(
                    trainable=True, default_lr=0.1))
    assert [n for n, _ in warp.named_warp_parameters()] == [
        "warp1.weight", "warp1.bias", "warp2.weight", "warp2.bias"]
    assert [n for n, _ in warp.named_adapt_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "bn.weight", "bn.bias",
        "head.weight", "head.bias"]
    assert [n for n, _ in warp.named_init_parameters()] == [
        n for n, _ in warp.named_adapt_parameters()]
    names = [n for n, _ in warp.named_meta_parameters()]
    assert names[:4] == ["warp.warp1.weight", "warp.warp1.bias", "warp.warp2.weight",
                         "warp.warp2.bias"]
    assert sum(n.startswith("optimizer.") for n in names) == 8
    assert not any(n.startswith("init.") for n in names)  # the updater steps the init itself
    assert len(list(warp.meta_parameters(include_init=True))) == 4 + 8 + 8
    groups = warp.optimizer_parameter_groups()
    assert len(groups) == 8 and groups[0]["lr"] == pytest.approx(0.1)


def test_partition_errors(make_model):
    model = make_model()
    updater = DualUpdater(F.cross_entropy)
    with pytest.raises(ValueError, match="both adapt_modules and warp_modules"):
        Warp(model, [model.fc1, model.warp1], [model.warp1], updater)
    with pytest.raises(ValueError, match="not parameters of the model"):
        Warp(model, [Linear(2, 2)], [model.warp1], updater)
    with pytest.raises(ValueError, match="hold no parameters"):
        Warp(model, [], [model.warp1], updater)
    with pytest.raises(ValueError, match=r"parameters \['warp2.weight', 'warp2.bias', "
                                         r"'head.weight', 'head.bias'\] are in neither "
                                         r"adapt_modules nor warp_modules; add their layers"):
        Warp(model, [model.fc1, model.fc2, model.bn], [model.warp1], updater)
    frozen = make_model()
    frozen.warp2.requires_grad_(False)  # fixed layers may stay out of both lists
    assert "warp2.weight" not in dict(
        Warp(frozen, frozen.adapt_modules(), [frozen.warp1], updater).named_meta_parameters())
    with pytest.raises(ValueError, match="updater"):
        Warp(model, [model.fc1], [model.warp1], object())
    warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater)
    with pytest.raises(RuntimeError, match="register_task"):
        warp.collect()
    with pytest.raises(ValueError, match="re-iterable"):
        warp.register_task(iter([]))


def test_init_adaptation_resets_state_without_a_model_hook(make_model, make_tasks):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy))
    _record_loop(warp, make_tasks(num_tasks=1, batches=2))
    assert model.bn.num_batches_tracked.item() > 0
    assert any(not torch.equal(p, i) for p, i in zip(warp.adapt_parameters(),
                                                      warp.init_parameters(), strict=True))
    warp.eval()
    warp.init_adaptation()
    assert model.training and model.bn.num_batches_tracked.item() == 0
    assert torch.equal(model.bn.running_var, torch.ones_like(model.bn.running_var))
    for p, i in zip(warp.adapt_parameters(), warp.init_parameters(), strict=True):
        assert torch.equal(p, i) and p.requires_grad
    assert not any(p.requires_grad for p in warp.warp_parameters())

    calls = []
    model.init_adaptation = lambda: calls.append(1)  # an optional hook is still honoured
    warp.init_adaptation()
    assert calls == [1]


def test_state_dict_round_trip(make_model):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy))
    with torch.no_grad():
        for p in warp.init_parameters():
            p.add_(1.0)
    state = warp.state_dict()
    other_model = make_model(seed=5)
    other = Warp(other_model, other_model.adapt_modules(), other_model.warp_modules(),
                 DualUpdater(F.cross_entropy))
    other.load_state_dict(state)
    for a, b in zip(warp.init_parameters(), other.init_parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), other_model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"model": {}})


def test_warp_layers_in_a_sequential_with_activations():
    torch.manual_seed(0)
    layers = [Linear(3, 3).double(), Tanh(), Linear(3, 3).double(), Tanh(),
              Linear(3, 2).double()]
    model = Sequential(*layers)
    warp = Warp(model, [layers[0], layers[4]], [layers[2]], DualUpdater(F.cross_entropy))
    assert [n for n, _ in warp.named_warp_parameters()] == ["2.weight", "2.bias"]
    assert [n for n, _ in warp.named_adapt_parameters()] == [
        "0.weight", "0.bias", "4.weight", "4.bias"]


def test_a_failing_meta_step_keeps_the_trajectories(make_model, make_tasks):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy))
    _record_loop(warp, make_tasks(num_tasks=1, batches=2))

    def failing_step():
        raise RuntimeError("meta-optimizer exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        warp.backward(failing_step)
    assert len(warp.buffer) == 2
    warp.backward(lambda: None)
    assert len(warp.buffer) == 0


def _readme_meta_step(make_model, tasks, *, on_nonfinite="raise", inmem=True, tmpdir=None):
    """One meta-step of the README flow; returns (warp, meta-parameters before, result)."""
    model = make_model()
    buffer = ReplayBuffer(inmem=inmem, tmpdir=None if inmem else tmpdir)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, seed=0), buffer, on_nonfinite=on_nonfinite)
    meta_opt = SGD(warp.warp_parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in warp.named_meta_parameters(include_init=True)}

    def meta_step_fn():
        meta_opt.step()
        meta_opt.zero_grad()

    _record(warp, tasks)
    return warp, before, lambda **kwargs: warp.backward(meta_step_fn, **kwargs)


def _record(warp, tasks):
    """Adapts to each task while recording its trajectory (the README's task loop)."""
    for task in tasks:
        warp.init_adaptation()
        warp.register_task(task)
        warp.collect()
        opt = SGD(warp.adapt_parameters(), lr=0.1)
        for x, y in task:
            loss = F.cross_entropy(warp(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        warp.no_collect()


@pytest.mark.parametrize("inmem", [True, False])
def test_after_a_nonfinite_backward_the_next_meta_batch_steps(make_model, make_tasks, inmem,
                                                              tmp_path):
    """Issue 28 item 6: the bad trajectory stayed in the buffer, the message did not say how to
    continue, and every later backward raised again while the buffer grew."""
    tasks = make_tasks(num_tasks=3)
    warp, before, backward = _readme_meta_step(make_model, _poison(tasks, 1, 2), inmem=inmem,
                                               tmpdir=tmp_path)
    with pytest.raises(NonFiniteError, match=r"task 1 of the meta-batch.*trajectories were "
                       r"dropped and nothing was updated: record the next meta-batch"):
        backward()
    assert len(warp.buffer) == 0 and warp.buffer.slots() == []
    for n, p in warp.named_meta_parameters(include_init=True):
        assert torch.equal(p, before[n])
    _record(warp, tasks)  # the next, clean meta-batch
    assert backward().skipped_tasks == 0
    reference, _, reference_backward = _readme_meta_step(make_model, tasks)
    reference_backward()
    for (n, p), (_, q) in zip(warp.named_meta_parameters(include_init=True),
                              reference.named_meta_parameters(include_init=True), strict=True):
        assert not torch.equal(p, before[n]) or n.startswith("init")
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)
    # Kept for inspection on request, and the message names the way out.
    warp, _, backward = _readme_meta_step(make_model, _poison(tasks, 1, 2))
    with pytest.raises(NonFiniteError, match=r"kept \(retain_trajectories=True\) for "
                       r"inspection in warp.buffer; call warp.clear\(\)"):
        backward(retain_trajectories=True)
    assert warp.buffer.slots() and warp.buffer.nonfinite_slots()
    warp.clear()
    _record(warp, tasks)
    assert backward().skipped_tasks == 0


def _poison(tasks, task, batch):
    bad = [list(t) for t in tasks]
    x, y = bad[task][batch]
    x = x.clone()
    x[1, 2] = float("nan")
    bad[task][batch] = (x, y)
    return bad


@pytest.mark.parametrize("inmem", [True, False])
@pytest.mark.parametrize("batch", [0, 3])
def test_a_nonfinite_task_never_reaches_the_meta_parameters(make_model, make_tasks, tmp_path,
                                                            inmem, batch):
    """Issue 18 bug 3: in the README flow (memory or disk buffer) one NaN batch in one task
    made every warp layer and the initialisation NaN. Raise mode names the task before any
    change; skip mode equals the meta-step without that task."""
    tasks = make_tasks(num_tasks=3)
    bad = _poison(tasks, 1, batch)
    warp, before, backward = _readme_meta_step(make_model, bad, inmem=inmem, tmpdir=tmp_path)
    with pytest.raises(NonFiniteError, match="task 1 of the meta-batch") as info:
        backward()
    assert info.value.where == "trajectory"
    for n, p in warp.named_meta_parameters(include_init=True):
        assert torch.equal(p, before[n])
    warp.clear()

    skipping, _, backward = _readme_meta_step(make_model, bad, on_nonfinite="skip",
                                              inmem=inmem, tmpdir=tmp_path)
    assert backward().skipped_tasks == 1
    reference, _, backward = _readme_meta_step(make_model, [tasks[0], tasks[2]])
    assert backward().skipped_tasks == 0
    for (n, p), (_, q) in zip(skipping.named_meta_parameters(include_init=True),
                              reference.named_meta_parameters(include_init=True), strict=True):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


def test_a_nonfinite_replayed_gradient_is_never_written(make_model, make_tasks):
    """A NaN batch the task learner never trained on can still be drawn by the replay."""
    tasks = make_tasks(num_tasks=2)
    bad = _poison(tasks, 1, 3)
    warp, before, backward = _readme_meta_step(make_model, [t[:3] for t in bad])
    for slot, task in zip(warp.buffer.slots(), bad, strict=True):
        warp.buffer._data[slot] = task  # the replay draws batch 3 (NaN) of task 1
    with pytest.raises(NonFiniteError, match="non-finite meta-gradient") as info:
        backward()
    assert info.value.where == "meta_gradient"
    # Mini-batches replayed before the NaN one were applied (bsz=1); nothing is NaN.
    for n, p in warp.named_meta_parameters(include_init=True):
        assert torch.isfinite(p).all() and p.shape == before[n].shape
