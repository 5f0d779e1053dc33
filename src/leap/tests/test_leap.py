"""The reference-style ``Leap`` API: hand-computed meta-gradients, Reptile, many meta-steps."""

from __future__ import annotations

import copy
import itertools
import weakref

import pytest
import torch
from torch import nn

import metazoo
from leap import Leap

FLAGS = list(itertools.product([True, False], repeat=3))  # (norm, loss, stabilizer)
# Inner learning rates for the quadratic: loss differences of the two segments are (-, -) at
# 0.3, (-, +) at 0.7 and (+, +) at 0.8, so the stabilizer matters for either segment.
LRS = {0.3: (False, False), 0.7: (False, True), 0.8: (True, True)}


def quadratic_leap(helpers, lr, norm, loss, stabilizer, *, finish):
    model = helpers.Quadratic()
    leap = Leap(model, norm=norm, loss=loss, stabilizer=stabilizer)
    x, _ = helpers.quadratic_batch()
    leap.init_task()
    leap.to(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(2):
        value = model(x)
        value.backward()
        leap.update(value, model)
        opt.step()
        opt.zero_grad()
    if finish:
        leap.finish(model(x), model)
    leap.normalize()
    return [leap.state["a"].grad.item(), leap.state["b"].grad.item()]


@pytest.mark.parametrize("lr", list(LRS))
@pytest.mark.parametrize("norm,loss,stabilizer", FLAGS)
def test_quadratic_meta_gradient_matches_hand_computation_with_last_segment(
        helpers, lr, norm, loss, stabilizer):
    want, diffs = helpers.hand_meta_grad(lr, 2, norm, loss, stabilizer)
    assert [d > 0 for d in diffs] == list(LRS[lr])
    got = quadratic_leap(helpers, lr, norm, loss, stabilizer, finish=True)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    # The last segment counts: the first segment alone (the reference's result) differs.
    first_only, _ = helpers.hand_meta_grad(lr, 1, norm, loss, stabilizer)
    assert got != pytest.approx(first_only, rel=1e-6)


@pytest.mark.parametrize("lr", list(LRS))
@pytest.mark.parametrize("norm,loss,stabilizer", FLAGS)
def test_lazily_closed_trajectory_uses_first_order_final_loss(helpers, lr, norm, loss,
                                                              stabilizer):
    want, _ = helpers.hand_meta_grad(lr, 2, norm, loss, stabilizer, lazy=True)
    got = quadratic_leap(helpers, lr, norm, loss, stabilizer, finish=False)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    if not loss:  # nothing is estimated without the loss term: lazy == exact
        exact = quadratic_leap(helpers, lr, norm, loss, stabilizer, finish=True)
        assert got == pytest.approx(exact, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("finish", [True, False])
def test_energy_without_loss_equals_reptile(helpers, finish):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(3)
    steps, lr, momentum = 4, 0.1, 0.9
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Reptile, computed independently: mean over tasks of init - adapted.
    reptile = {n: torch.zeros_like(p) for n, p in init.items()}
    for task in tasks:
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
        for k in range(steps):
            x, y = task.support[k % len(task.support)]
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        for n, p in net.named_parameters():
            reptile[n] += (init[n] - p.detach()) / len(tasks)

    leap = Leap(model, norm=False, loss=False)
    helpers.reference_loop(leap, model, tasks, steps=steps, lr=lr, momentum=momentum,
                           finish=finish)
    for n, p in leap.named_parameters():
        torch.testing.assert_close(p.grad, reptile[n], rtol=1e-12, atol=1e-14)


def test_ten_meta_steps_with_a_torch_meta_optimizer_change_the_initialisation(helpers):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    leap = Leap(model)
    meta_optimizer = torch.optim.Adam(leap.parameters(), lr=0.01)
    previous = [p.detach().clone() for p in leap.parameters()]
    for _ in range(10):
        helpers.reference_loop(leap, model, tasks, steps=3, lr=0.1, finish=False)
        meta_optimizer.step()
        meta_optimizer.zero_grad()  # sets .grad to None (the reference crashed here)
        assert all(p.grad is None for p in leap.parameters())
        current = [p.detach().clone() for p in leap.parameters()]
        assert all(torch.isfinite(c).all() for c in current)
        assert all(not torch.equal(a, b) for a, b in zip(previous, current, strict=True))
        previous = current

    # The tenth meta-gradient started from None: it equals a fresh Leap's at the same init.
    helpers.reference_loop(leap, model, tasks, steps=3, lr=0.1, finish=False)
    fresh_model = copy.deepcopy(model)
    fresh_model.load_state_dict(leap.state)
    fresh = Leap(fresh_model)
    helpers.reference_loop(fresh, fresh_model, tasks, steps=3, lr=0.1, finish=False)
    for p, q in zip(leap.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", [True, False])
def test_live_tensors_are_stable_across_meta_steps(helpers, loss):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    leap = Leap(model, loss=loss)
    meta_optimizer = torch.optim.Adam(leap.parameters(), lr=0.01)

    def meta_step():
        helpers.reference_loop(leap, model, tasks, steps=3, lr=0.1, finish=False)
        meta_optimizer.step()
        meta_optimizer.zero_grad()

    counts = []
    for step in range(10):
        meta_step()
        if step in (1, 5, 9):  # from the second step: Adam allocates its state at the first
            counts.append(helpers.live_tensors())
    assert len(set(counts)) == 1, counts


def test_no_graph_or_loss_tensor_is_kept(helpers):
    model = helpers.mlp()
    task = helpers.regression_tasks(1)[0]
    leap = Leap(model)
    leap.init_task()
    leap.to(model)
    x, y = task.support[0]
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    leap.update(loss, model)
    ref = weakref.ref(loss)
    del loss
    assert ref() is None  # Leap kept a detached copy, not the loss (which owns the graph)
    stored = leap._previous
    assert stored is not None and stored.loss is not None and stored.grad is not None
    assert not any(t.requires_grad or t.grad_fn is not None
                   for t in (stored.params, stored.loss, stored.grad))


def test_to_copies_the_initialisation_and_closes_the_pending_trajectory(helpers):
    model = helpers.Quadratic()
    x, _ = helpers.quadratic_batch()
    leap = Leap(model, loss=False, norm=False)
    leap.init_task()
    leap.to(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    value = model(x)
    value.backward()
    leap.update(value, model)
    opt.step()
    adapted = torch.stack([model.a.detach(), model.b.detach()]).clone()
    leap.to(model)  # overwrites the final point, so it must close the segment first
    assert model.a.item() == leap.state["a"].item() and model.b.item() == leap.state["b"].item()
    init = torch.stack([leap.state["a"], leap.state["b"]]).detach()
    got = torch.stack([leap.state["a"].grad, leap.state["b"].grad])
    torch.testing.assert_close(got, init - adapted, rtol=1e-12, atol=0)
    leap.init_task()  # already closed: nothing more is added
    torch.testing.assert_close(torch.stack([leap.state["a"].grad, leap.state["b"].grad]), got)


def test_normalize_averages_over_tasks_and_zero_grad_to_zeros_keeps_working(helpers):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    single = []
    for task in tasks:
        leap = Leap(copy.deepcopy(model))
        helpers.reference_loop(leap, copy.deepcopy(model), [task], steps=2, lr=0.1)
        single.append([p.grad.clone() for p in leap.parameters()])
    leap = Leap(model)
    meta_optimizer = torch.optim.SGD(leap.parameters(), lr=0.0)
    for _ in range(2):  # zero_grad(set_to_none=False) zeroes in place: accumulation restarts
        meta_optimizer.zero_grad(set_to_none=False)
        helpers.reference_loop(leap, model, tasks, steps=2, lr=0.1)
        for p, a, b in zip(leap.parameters(), *single, strict=True):
            torch.testing.assert_close(p.grad, (a + b) / 2, rtol=1e-12, atol=1e-15)


def test_hook_modifies_each_increment_before_accumulation(helpers):
    model = helpers.mlp()
    task = helpers.regression_tasks(1)[0]
    plain, hooked = Leap(copy.deepcopy(model)), Leap(copy.deepcopy(model))
    for leap, hook in ((plain, None), (hooked, lambda g: g.mul_(3.0))):
        net = copy.deepcopy(model)
        leap.init_task()
        leap.to(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for k in range(3):
            x, y = task.support[k]
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            leap.update(loss, net, hook=hook)
            opt.step()
            opt.zero_grad()
        leap.normalize()  # the lazy last segment uses the hook of the last update too
    for p, q in zip(plain.parameters(), hooked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, 3 * p.grad, rtol=1e-12, atol=0)


def test_state_dict_round_trip_keeps_meta_optimizer_parameters(helpers):
    model = helpers.mlp()
    leap = Leap(model)
    state = leap.state_dict()
    params = list(leap.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    leap.load_state_dict(state)
    assert all(p is q for p, q in zip(params, leap.parameters(), strict=True))
    for name, p in leap.named_parameters():
        assert torch.equal(p, state["state"][name])
    with pytest.raises(ValueError, match="task_counter"):
        leap.load_state_dict({"state": state["state"]})


def test_buffers_are_part_of_the_initialisation():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    leap = Leap(model)
    assert [n for n, _ in leap.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model(torch.randn(8, 3, dtype=torch.float64))  # changes the running statistics
    leap.to(model)
    assert torch.equal(model[1].running_mean, torch.zeros(4, dtype=torch.float64))


def test_errors_name_the_problem_and_the_fix(helpers):
    model = helpers.mlp()
    with pytest.raises(ValueError, match="norm must be True or False"):
        Leap(model, norm=1)
    with pytest.raises(TypeError):
        Leap(model, True)  # options are keyword-only
    with pytest.raises(ValueError, match=r"nn\.Module"):
        Leap([p for p in model.parameters()])
    leap = Leap(model)
    with pytest.raises(RuntimeError, match="init_task"):
        leap.normalize()
    x, y = helpers.regression_tasks(1)[0].support[0]
    leap.init_task()
    with pytest.raises(RuntimeError, match=r"loss.backward\(\)"):
        leap.update(nn.functional.mse_loss(model(x), y), model)
    with pytest.raises(RuntimeError, match="update"):
        leap.finish(1.0, model)
    with pytest.raises(ValueError, match="lacks the parameters"):
        leap.update(1.0, nn.Linear(3, 1).double())
    out = model(x)
    out.sum().backward()
    with pytest.raises(ValueError, match="one value"):
        leap.update(out, model)


def _poisoned(task: metazoo.Task, batch: int) -> metazoo.Task:
    support = [(x.clone(), y) for x, y in task.support]
    support[batch][0][1, 2] = float("nan")
    return metazoo.Task(support, task.query)


@pytest.mark.parametrize("finish", [True, False])
@pytest.mark.parametrize("batch", [0, 1])
def test_a_nonfinite_task_never_reaches_the_meta_gradient(helpers, batch, finish):
    """Issue 18 bug 3: one NaN batch in one task made every meta-parameter NaN through
    update/normalize. Raise mode names the task; skip mode averages the other tasks only."""
    model = helpers.mlp()
    tasks = helpers.regression_tasks(3)
    bad = [tasks[0], _poisoned(tasks[1], batch), tasks[2]]
    leap = Leap(copy.deepcopy(model))
    with pytest.raises(metazoo.NonFiniteError, match=r"task 1 of the meta-batch") as info:
        helpers.reference_loop(leap, copy.deepcopy(model), bad, steps=2, lr=0.1, finish=finish)
    assert info.value.where == "trajectory"
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in leap.parameters())

    skipping = Leap(copy.deepcopy(model), on_nonfinite="skip")
    helpers.reference_loop(skipping, copy.deepcopy(model), bad, steps=2, lr=0.1, finish=finish)
    reference = Leap(copy.deepcopy(model))
    helpers.reference_loop(reference, copy.deepcopy(model), [tasks[0], tasks[2]], steps=2,
                           lr=0.1, finish=finish)
    for p, q in zip(skipping.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)
    # Every task skipped: nothing is added and normalize says so instead of failing.
    only_bad = Leap(copy.deepcopy(model), on_nonfinite="skip")
    meta_optimizer = torch.optim.SGD(only_bad.parameters(), lr=0.1)
    meta_optimizer.zero_grad()
    net = copy.deepcopy(model)
    only_bad.init_task()
    only_bad.to(net)
    x, y = _poisoned(tasks[1], 0).support[0]
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    only_bad.update(loss, net)
    assert only_bad.normalize() == 1
    assert all(p.grad is None for p in only_bad.parameters())
