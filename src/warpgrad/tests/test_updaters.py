"""DualUpdater mini-batching (bsz, epochs), init updates, and the online updater."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from warpgrad import DualUpdater, OnlineUpdater, OptimizerParameters, ReplayBuffer, Warp


def _collect(warp, tasks, lr=0.2):
    """The README task loop: records the state before every step."""
    for task in tasks:
        warp.init_adaptation()
        warp.register_task(task)
        warp.collect()
        opt = torch.optim.SGD(warp.adapt_parameters(), lr=lr)
        for x, y in task:
            F.cross_entropy(warp(x), y).backward()
            opt.step()
            opt.zero_grad()
        warp.no_collect()


def _single_batch_tasks(make_tasks, num_tasks, steps):
    # Tasks whose data is one batch repeated: every replay draws the same two batches, so
    # each state's meta-gradient is a fixed quantity whatever the replay order.
    return [[task[0]] * steps for task in make_tasks(num_tasks=num_tasks, batches=1)]


def _per_point_gradients(warp, updater):
    grads = []
    ctx = warp.replay_context(updater.criterion)
    for slot in warp.buffer.slots():
        batch = warp.buffer.data(slot)[0]
        for i in range(warp.buffer.num_states(slot)):
            ctx = warp.replay_context(updater.criterion)
            loss = updater.warp_objective.loss(ctx, warp.buffer.state(slot, i), [batch, batch])
            grads.append(torch.autograd.grad(loss, list(ctx.warp.values())))
    return grads


@pytest.mark.parametrize("bsz", [1, 3, 0, -1])
def test_bsz_sets_meta_steps_and_loss_scaling(make_model, make_tasks, bsz):
    model = make_model()
    updater = DualUpdater(F.cross_entropy, bsz=bsz, init_objective="none", seed=7)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater)
    _collect(warp, _single_batch_tasks(make_tasks, num_tasks=2, steps=4)[:1]
             + _single_batch_tasks(make_tasks, num_tasks=2, steps=3)[1:])
    n = len(warp.buffer)
    assert n == 7
    per_point = _per_point_gradients(warp, updater)
    recorded = []

    def step_fn():  # records and zeroes, without moving the warp parameters
        recorded.append([p.grad.clone() for p in warp.warp_parameters()])
        for p in warp.warp_parameters():
            p.grad = None

    result = warp.backward(step_fn)
    size = n if bsz <= 0 else bsz
    expected_steps = -(-n // size)
    assert result.num_meta_steps == len(recorded) == expected_steps
    assert result.num_points == n
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    for step, grads in enumerate(recorded):
        chunk = order[step * size:(step + 1) * size]
        for j, g in enumerate(grads):
            mean = sum(per_point[i][j] for i in chunk) / len(chunk)
            torch.testing.assert_close(g, mean, rtol=1e-10, atol=1e-13)
            assert torch.isfinite(g).all()
    assert len(warp.buffer) == 0


@pytest.mark.parametrize("bsz", [0, -1])
def test_all_points_in_one_step_descends(make_model, make_tasks, bsz):
    model = make_model()
    updater = DualUpdater(F.cross_entropy, bsz=bsz, init_objective="none", seed=0)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater,
                ReplayBuffer())
    tasks = _single_batch_tasks(make_tasks, num_tasks=2, steps=3)
    _collect(warp, tasks)
    per_point_before = _per_point_gradients(warp, updater)
    assert per_point_before

    def objective():
        total = 0.0
        for slot in warp.buffer.slots():
            batch = warp.buffer.data(slot)[0]
            for i in range(warp.buffer.num_states(slot)):
                ctx = warp.replay_context(updater.criterion)
                total += updater.warp_objective.loss(ctx, warp.buffer.state(slot, i),
                                                     [batch, batch]).item()
        return total

    before = objective()
    meta_opt = torch.optim.SGD(warp.warp_parameters(), lr=0.05)

    def step_fn():
        meta_opt.step()
        meta_opt.zero_grad()

    warp.backward(step_fn, retain_trajectories=True)
    after = objective()
    assert after < before  # a descent step on the mean, not ascent (the reference divided by bsz)


def test_epochs_multiply_steps_and_points_are_reshuffled(make_model, make_tasks):
    model = make_model()
    updater = DualUpdater(F.cross_entropy, bsz=2, epochs=3, init_objective="none")
    warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater)
    _collect(warp, make_tasks(num_tasks=1, batches=4))
    calls = []
    result = warp.backward(lambda: calls.append(1))
    assert result.num_meta_steps == len(calls) == 3 * 2


def test_init_lr_applies_its_own_step_or_defers_to_meta_step_fn(make_model, make_tasks):
    tasks = make_tasks(num_tasks=2, batches=3)
    grads = {}
    for init_lr in (None, 0.5):
        model = make_model()
        updater = DualUpdater(F.cross_entropy, warp_objective="none", init_lr=init_lr)
        warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater)
        before = {n: p.detach().clone() for n, p in warp.named_init_parameters()}
        _collect(warp, tasks)
        calls = []

        def step_fn(warp=warp, calls=calls):
            calls.append({n: p.grad.clone() for n, p in warp.named_init_parameters()})

        warp.backward(step_fn)
        if init_lr is None:
            assert len(calls) == 1
            assert any(n.startswith("init.") for n, _ in warp.named_meta_parameters())
            grads = calls[0]
        else:
            assert calls == []
            assert not any(n.startswith("init.") for n, _ in warp.named_meta_parameters())
            for n, p in warp.named_init_parameters():
                torch.testing.assert_close(p.detach(), before[n] - 0.5 * grads[n])


def test_online_updater_equals_dual_updater_on_the_same_trajectories(make_model, make_tasks):
    """Algorithm 1 accumulates at every step what Algorithm 2 replays afterwards."""
    tasks = _single_batch_tasks(make_tasks, num_tasks=2, steps=3)
    results = []
    base = make_model()
    for updater in (OnlineUpdater(F.cross_entropy, init_lr=None),
                    DualUpdater(F.cross_entropy, bsz=0, init_lr=None)):
        model = copy.deepcopy(base)
        warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater)
        _collect(warp, tasks)
        if isinstance(updater, OnlineUpdater):
            assert len(warp.buffer) == 0  # nothing stored for replay
        grads = []

        def step_fn(warp=warp, grads=grads):
            grads.append({n: p.grad.clone() for n, p in warp.named_meta_parameters()
                          if p.grad is not None})
            for p in warp.meta_parameters():
                p.grad = None

        results.append((warp.backward(step_fn), grads))
    (online, online_grads), (dual, dual_grads) = results
    assert online.num_meta_steps == 1 and dual.num_meta_steps == 2
    merged = {**dual_grads[0], **dual_grads[1]}
    assert set(online_grads[0]) == set(merged)
    for n, g in online_grads[0].items():
        torch.testing.assert_close(g, merged[n], rtol=1e-10, atol=1e-13)
    assert online.warp_loss == pytest.approx(dual.warp_loss, rel=1e-10)


def test_online_updater_moves_warp_and_init(make_model, make_tasks):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                OnlineUpdater(F.cross_entropy, warp_objective="exact"))
    meta_opt = torch.optim.SGD(warp.warp_parameters(), lr=0.1)
    warp_before = [p.detach().clone() for p in warp.warp_parameters()]
    init_before = [p.detach().clone() for p in warp.init_parameters()]
    _collect(warp, make_tasks(num_tasks=2, batches=3))

    def step_fn():
        meta_opt.step()
        meta_opt.zero_grad()

    result = warp.backward(step_fn)
    assert result.num_points == 6 and result.num_meta_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(warp_before, warp.warp_parameters(),
                                                      strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(init_before, warp.init_parameters(),
                                                      strict=True))
    with pytest.raises(ValueError, match="whole trajectories"):
        OnlineUpdater(F.cross_entropy, init_objective="leap")


def test_updater_validation_and_criterion_forms():
    assert isinstance(DualUpdater(torch.nn.CrossEntropyLoss).criterion, torch.nn.CrossEntropyLoss)
    loss = torch.nn.CrossEntropyLoss()
    assert DualUpdater(criterion=loss).criterion is loss
    with pytest.raises(ValueError, match="epochs=0"):
        DualUpdater(F.cross_entropy, epochs=0)
    with pytest.raises(ValueError, match="init_lr=-1"):
        DualUpdater(F.cross_entropy, init_lr=-1)
    for bad in (float("inf"), float("nan")):  # both passed `init_lr <= 0` before
        with pytest.raises(ValueError, match=f"init_lr={bad} must be a finite positive"):
            OnlineUpdater(F.cross_entropy, init_lr=bad)
    with pytest.raises(ValueError, match="not callable"):
        DualUpdater(criterion=3)
    with pytest.raises(ValueError, match=r"not an nn\.Module loss"):
        DualUpdater(criterion=int)
    with pytest.raises(ValueError, match="bsz"):
        DualUpdater(F.cross_entropy, bsz=1.5)


@pytest.mark.parametrize("mode", ["exact", "stop_gradient", "approx"])
def test_vectorised_replay_equals_the_loop(make_model, make_tasks, mode):
    tasks = make_tasks(num_tasks=2, batches=3)
    # A task whose batches have another size: its states cannot share a vmap call with the
    # others and fall back to the loop.
    tasks.append([(x[:4], y[:4]) for x, y in make_tasks(num_tasks=1, batches=2, seed=9)[0]])
    base = make_model()
    grads = []
    for vectorize in (0, 3):
        model = copy.deepcopy(base)
        params = OptimizerParameters(trainable=True, default_lr=0.2, default_momentum=0.5)
        updater = DualUpdater(F.cross_entropy, warp_objective=mode, bsz=4, seed=1,
                              init_objective="none", vectorize=vectorize)
        warp = Warp(model, model.adapt_modules(), model.warp_modules(), updater,
                    optimizer_parameters=params)
        for task in tasks:
            warp.init_adaptation()
            warp.register_task(task)
            warp.collect()
            opt = torch.optim.SGD(warp.optimizer_parameter_groups())
            warp.register_optimizer(opt)
            for x, y in task:
                F.cross_entropy(warp(x), y).backward()
                opt.step()
                opt.zero_grad()
            warp.no_collect()
        recorded = []

        def step_fn(warp=warp, recorded=recorded):
            # A tensor that does not enter the objective (momentum before the first step,
            # learning rates in approx mode) may get None from one path and 0 from the other.
            recorded.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                             for p in warp.meta_parameters()])
            for p in warp.meta_parameters():
                p.grad = None

        result = warp.backward(step_fn)
        grads.append((recorded, result.warp_loss))
        # The user's BatchNorm layer still tracks statistics.
        assert model.bn.running_mean is not None
    (loop, loop_loss), (vectorised, vectorised_loss) = grads
    assert len(loop) == len(vectorised) == 2
    for a_step, b_step in zip(loop, vectorised, strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert loop_loss == pytest.approx(vectorised_loss, rel=1e-12)


def test_init_gradient_of_a_real_loop_includes_the_last_segment(make_model, make_tasks):
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, warp_objective="none", init_lr=None))
    expected = {n: torch.zeros_like(p) for n, p in warp.named_init_parameters()}
    tasks = make_tasks(num_tasks=2, batches=2)
    for task in tasks:
        warp.init_adaptation()
        warp.register_task(task)
        warp.collect()
        opt = torch.optim.SGD(warp.adapt_parameters(), lr=0.3)
        path = []
        for x, y in task:
            path.append({n: p.detach().clone() for n, p in warp.named_adapt_parameters()})
            F.cross_entropy(warp(x), y).backward()
            opt.step()
            opt.zero_grad()
        path.append({n: p.detach().clone() for n, p in warp.named_adapt_parameters()})
        warp.no_collect()
        for a, b in itertools.pairwise(path):  # 2 steps: 2 segments
            norm = sum((a[n] - b[n]).pow(2).sum() for n in a).sqrt() + 1e-9  # NORM_EPS
            for n in a:
                expected[n] += (a[n] - b[n]) / norm / len(tasks)
    got = {}

    def step_fn():
        got.update({n: p.grad.clone() for n, p in warp.named_init_parameters()})

    warp.backward(step_fn)
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-8, atol=1e-12)
