"""ContinualUpdater: online WarpGrad for a learner that is never reset (the maze's updater)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metazoo import NonFiniteError
from warpgrad import ContinualUpdater, DualUpdater, Warp


def _warp(model, **kwargs):
    return Warp(model, model.adapt_modules(), model.warp_modules(), ContinualUpdater(**kwargs))


def _losses(model, tasks):
    """One loss per task (the task's first batch), through the model as it is now."""
    for x, y in (task[0] for task in tasks):
        yield F.cross_entropy(model(x), y)


def _continual_run(warp, tasks, *, interval, burn_in=0, lr=1e-2, meta_lr=1e-2):
    """The maze's loop: task optimizer every task, meta-optimizer every ``interval`` tasks."""
    opt = torch.optim.Adam(warp.adapt_parameters(), lr=lr)
    meta_opt = torch.optim.Adam(warp.warp_parameters(), lr=meta_lr)

    def meta_step():
        meta_opt.step()
        meta_opt.zero_grad(set_to_none=True)

    results = []
    for i, (x, y) in enumerate(task[0] for task in tasks):
        warp.collect() if i >= burn_in else warp.no_collect()
        F.cross_entropy(warp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        warp.accumulate_warp_gradients()
        if warp.updater.count == interval:
            results.append(warp.backward(meta_step))
    return results


def _hand_loop(model, tasks, *, interval, burn_in=0, lr=1e-2, meta_lr=1e-2, clip=None):
    """The same with plain autograd and torch.optim, no warpgrad."""
    adapt = [p for m in model.adapt_modules() for p in m.parameters()]
    warp = [p for m in model.warp_modules() for p in m.parameters()]
    opt = torch.optim.Adam(adapt, lr=lr)
    meta_opt = torch.optim.Adam(warp, lr=meta_lr)
    sums, count = [torch.zeros_like(p) for p in warp], 0
    for i, (x, y) in enumerate(task[0] for task in tasks):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), adapt + warp)
        for p, g in zip(adapt, grads[:len(adapt)], strict=True):
            p.grad = g
        opt.step()
        if i >= burn_in:
            sums = [s + g for s, g in zip(sums, grads[len(adapt):], strict=True)]
            count += 1
        if count == interval:
            for p, s in zip(warp, sums, strict=True):
                p.grad = s / count
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(warp, clip)
            meta_opt.step()
            sums, count = [torch.zeros_like(p) for p in warp], 0


@pytest.mark.parametrize(("clip", "burn_in"), [(None, 0), (1e-2, 0), (None, 2)])
def test_continual_training_equals_a_hand_loop(make_model, make_tasks, clip, burn_in):
    """Task steps every task and a meta-step with the mean (clipped) warp gradient every 3
    tasks after the burn-in: the same parameters as plain autograd + torch.optim (float64)."""
    tasks = make_tasks(num_tasks=8, batches=1)
    model = make_model(batch_norm=False)
    reference = copy.deepcopy(model)
    results = _continual_run(_warp(model, clip_norm=clip), tasks, interval=3, burn_in=burn_in)
    _hand_loop(reference, tasks, interval=3, burn_in=burn_in, clip=clip)
    assert len(results) == (8 - burn_in) // 3
    assert all(r.num_points == 3 and r.num_meta_steps == 1 for r in results)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13, msg=name)
    warp0 = make_model(batch_norm=False).warp1.weight
    assert not torch.equal(model.warp1.weight, warp0)  # the warp layers did move


def test_the_mean_gradient_is_written_clipped_and_stepped_once(make_model, make_tasks):
    tasks = make_tasks(num_tasks=2, batches=1)
    model = make_model(batch_norm=False)
    warp = _warp(model, clip_norm=1e-3)
    warp.collect()  # no register_task: nothing is recorded or replayed
    expected = []
    for loss in _losses(model, tasks):
        loss.backward()
        expected.append([p.grad.clone() for p in warp.warp_parameters()])
        warp.accumulate_warp_gradients()
        assert all(p.grad is None for p in warp.warp_parameters())
    mean = [(a + b) / 2 for a, b in zip(*expected, strict=True)]
    # torch.nn.utils.clip_grad_norm_'s coefficient
    scale = 1e-3 / (float(torch.cat([g.reshape(-1) for g in mean]).norm()) + 1e-6)
    assert scale < 1  # the clip is active
    seen = []
    result = warp.backward(lambda: seen.append([p.grad.clone() for p in warp.warp_parameters()]))
    assert len(seen) == 1 and result.num_points == 2
    for g, m in zip(seen[0], mean, strict=True):
        torch.testing.assert_close(g, m * scale, rtol=1e-12, atol=0)
    assert warp.updater.count == 0 and len(warp.buffer.slots()) == 0
    assert warp.collecting  # backward keeps the switch as it was
    # nothing accumulated: nothing written, no step
    assert warp.backward(lambda: seen.append(None)).num_meta_steps == 0 and len(seen) == 1


def test_a_step_that_does_not_zero_leaks_nothing_into_the_next_sum(make_model, make_tasks):
    model = make_model(batch_norm=False)
    warp = _warp(model)
    warp.collect()
    (x1, y1), (x2, y2) = (task[0] for task in make_tasks(num_tasks=2, batches=1))
    F.cross_entropy(warp(x1), y1).backward()
    warp.accumulate_warp_gradients()
    warp.backward(lambda: None)  # steps nothing and zeroes nothing
    assert all(p.grad is None for p in warp.warp_parameters())
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(warp(x2), y2).backward()
    second = [p.grad.clone() for p in warp.warp_parameters()]
    warp.accumulate_warp_gradients()
    for total, g in zip(warp.updater._sums, second, strict=True):
        assert torch.equal(total, g)


def test_no_collect_discards_and_leaves_no_gradient(make_model, make_tasks):
    model = make_model(batch_norm=False)
    warp = _warp(model)
    warp.no_collect()
    next(_losses(model, make_tasks(num_tasks=1, batches=1))).backward()
    warp.accumulate_warp_gradients()
    assert warp.updater.count == 0
    assert all(p.grad is None for p in warp.warp_parameters())
    assert all(p.grad is not None for p in warp.adapt_parameters())  # the task learner's


def test_meta_parameters_are_the_warp_layers_only(make_model):
    warp = _warp(make_model(batch_norm=False))
    names = [n for n, _ in warp.named_meta_parameters()]
    assert names == [f"warp.{n}" for n, _ in warp.named_warp_parameters()]


def test_a_nonfinite_mean_gradient_raises_before_it_is_written(make_model, make_tasks):
    model = make_model(batch_norm=False)
    warp = _warp(model)
    warp.collect()
    x, y = make_tasks(num_tasks=1, batches=1)[0][0]
    F.cross_entropy(warp(x * float("nan")), y).backward()
    warp.accumulate_warp_gradients()
    before = [p.detach().clone() for p in warp.warp_parameters()]
    with pytest.raises(NonFiniteError, match=r"meta-gradient.*record the next meta-batch"):
        warp.backward(lambda: pytest.fail("must not step"))
    assert all(p.grad is None for p in warp.warp_parameters())
    for p, q in zip(warp.warp_parameters(), before, strict=True):
        assert torch.equal(p, q)
    # The non-finite sum was dropped: the next (finite) task steps (issue 28 item 6).
    assert warp.updater.count == 0
    warp.collect()
    F.cross_entropy(warp(x), y).backward()
    warp.accumulate_warp_gradients()
    steps = []
    assert warp.backward(lambda: steps.append(1)).num_meta_steps == 1 and steps == [1]


def test_state_dict_resumes_mid_interval_exactly(make_model, make_tasks):
    tasks = make_tasks(num_tasks=5, batches=1)
    straight = _warp(make_model(batch_norm=False))
    _continual_run(straight, tasks, interval=3)
    first = _warp(make_model(batch_norm=False))
    opt_free = tasks[:2]  # two tasks accumulated, no meta-step yet
    _continual_run(first, opt_free, interval=3)
    assert first.updater.count == 2
    state = copy.deepcopy(first.state_dict())
    resumed = _warp(make_model(seed=5, batch_norm=False))
    resumed.load_state_dict(state)
    assert resumed.updater.count == 2
    for a, b in zip(resumed.updater.state_dict()["sums"], first.updater.state_dict()["sums"],
                    strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lacks the ContinualUpdater"):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "updater"})


def test_validation(make_model):
    model = make_model(batch_norm=False)
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="clip_norm"):
            ContinualUpdater(clip_norm=bad)
    dual = Warp(model, model.adapt_modules(), model.warp_modules(), DualUpdater(F.cross_entropy))
    with pytest.raises(ValueError, match=r"needs a warpgrad\.ContinualUpdater"):
        dual.accumulate_warp_gradients()
    with pytest.raises(RuntimeError, match="register_task"):
        dual.collect()  # the replaying updaters still need a task
