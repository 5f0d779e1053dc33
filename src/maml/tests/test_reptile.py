"""Reptile: the meta-gradient is init - adapted (after the last inner step), float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import Reptile

DTYPE = torch.float64


def model_and_tasks(bn: bool = False) -> tuple[nn.Module, list[metazoo.Task]]:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6), *([nn.BatchNorm1d(6)] if bn else []), nn.Tanh(), nn.Linear(6, 1)]
    model = nn.Sequential(*layers).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    tasks = []
    for _ in range(3):
        w = torch.randn(3, 1, generator=g, dtype=DTYPE)
        batches = []
        for _ in range(3):
            x = torch.randn(5, 3, generator=g, dtype=DTYPE)
            batches.append((x, torch.sin(x @ w)))
        tasks.append(metazoo.Task(batches[:2], batches[2]))
    return model, tasks


def adapted_by_torch_optim(model: nn.Module, task: metazoo.Task, steps: int
                           ) -> dict[str, torch.Tensor]:
    """The reference: ``steps`` steps of torch.optim.Adam on a copy, support batch k % 2."""
    copy_ = copy.deepcopy(model)
    optimizer = torch.optim.Adam(copy_.parameters(), lr=0.05)
    for k in range(steps):
        x, y = task.support[k % len(task.support)]
        optimizer.zero_grad()
        F.mse_loss(copy_(x), y).backward()
        optimizer.step()
    return {n: p.detach() for n, p in copy_.named_parameters()}


def test_meta_gradient_is_init_minus_adapted_after_the_last_step():
    model, tasks = model_and_tasks()
    learner = Reptile(model=model, criterion=F.mse_loss, inner_optimizer=metazoo.Adam(0.05),
                      inner_steps=5)
    learner.meta_optimizer.zero_grad()
    learner.meta_backward(tasks)
    adapted = [adapted_by_torch_optim(model, t, 5) for t in tasks]
    before_last = [adapted_by_torch_optim(model, t, 4) for t in tasks]
    for name, p in model.named_parameters():
        expected = sum(p.detach() - a[name] for a in adapted) / len(tasks)
        torch.testing.assert_close(p.grad, expected, atol=1e-13, rtol=1e-10)
        # the point before the last step would give a different gradient
        assert (p.grad - sum(p.detach() - a[name] for a in before_last) / 3).abs().max() > 1e-6


def test_meta_step_with_sgd_is_classic_reptile():
    model, tasks = model_and_tasks()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = Reptile(model=model, criterion=F.mse_loss, inner_optimizer=metazoo.Adam(0.05),
                      inner_steps=3, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.25))
    adapted = [learner.adapt(t, steps=3).params for t in tasks]
    result = learner.meta_step(tasks)
    for name, p in model.named_parameters():
        mean_adapted = sum(a[name] for a in adapted) / 3
        torch.testing.assert_close(p.detach(), init[name] + 0.25 * (mean_adapted - init[name]),
                                   atol=1e-14, rtol=1e-12)
    assert result.num_tasks == 3 and len(result.inner_losses) == 3


def test_gradient_accumulates_like_backward():
    model, tasks = model_and_tasks()
    learner = Reptile(model=model, criterion=F.mse_loss, inner_steps=2)
    learner.meta_optimizer.zero_grad()
    learner.meta_backward(tasks[:1])
    first = [p.grad.clone() for p in model.parameters()]
    learner.meta_backward(tasks[:1])
    for p, g in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_running_batchnorm_and_evaluation():
    model, tasks = model_and_tasks(bn=True)
    learner = Reptile(model=model, criterion=F.mse_loss, bn_mode="running", inner_steps=2,
                      eval_inner_steps=4)
    adapted = learner.adapt(tasks[0])
    assert adapted.buffers["1.num_batches_tracked"].item() == 4
    assert model[1].num_batches_tracked.item() == 0
    before = [p.detach().clone() for p in model.parameters()]
    evaluation = learner.evaluate(tasks)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(evaluation.inner_losses) == 4 and evaluation.num_tasks == 3
    assert learner.meta_step(tasks).meta_loss > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"inner_steps": 0}, "inner_steps must be an int >= 1, got 0"),
    ({"eval_inner_steps": 0}, "eval_inner_steps must be an int >= 1, got 0"),
    ({"inner_optimizer": torch.optim.SGD}, "inner_optimizer must be a metazoo optimizer"),
    ({"bn_mode": "stats"}, "bn_mode must be one of"),
    ({"inner_grad_clip": 0}, "inner_grad_clip must be None or a positive number, got 0"),
    ({"meta_optimizer": 0.1}, "meta_optimizer must be a torch.optim.Optimizer or a factory"),
])
def test_validation(kwargs, message):
    model, _ = model_and_tasks()
    with pytest.raises(ValueError, match=message):
        Reptile(model=model, criterion=F.mse_loss, **kwargs)


# -- inner_state="carry": the authors' semantics (openai/supervised-reptile) ------------------

def carried_by_hand(model: nn.Module, tasks: list[metazoo.Task], meta_steps: int, steps: int,
                    eval_steps: int, epsilon: float) -> tuple[list[dict[str, torch.Tensor]],
                                                              list[list[float]]]:
    """The authors' loop in plain torch: ONE torch.optim.Adam for the whole run. Each task
    resets the weights to the initialisation and keeps the optimizer; evaluation adapts from
    the optimizer's current state and restores weights and optimizer afterwards.

    Returns the initialisation after each meta-step and the query losses of an evaluation of
    all tasks after each meta-step.
    """
    net = copy.deepcopy(model)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.0, 0.999), foreach=False)

    def adapt(task: metazoo.Task, k_steps: int) -> None:
        for k in range(k_steps):
            x, y = task.support[k % len(task.support)]
            optimizer.zero_grad()
            F.mse_loss(net(x), y).backward()
            optimizer.step()

    def load(values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(net.parameters(), values, strict=True):
                p.copy_(v)

    inits, evaluations = [], []
    for _ in range(meta_steps):
        theta = [p.detach().clone() for p in net.parameters()]
        adapted = []
        for task in tasks:
            load(theta)
            adapt(task, steps)
            adapted.append([p.detach().clone() for p in net.parameters()])
        mean = [sum(a[i] for a in adapted) / len(tasks) for i in range(len(theta))]
        load([t + epsilon * (m - t) for t, m in zip(theta, mean, strict=True)])
        inits.append({n: p.detach().clone() for n, p in net.named_parameters()})
        saved_weights = [p.detach().clone() for p in net.parameters()]
        saved_optimizer = copy.deepcopy(optimizer.state_dict())
        losses = []
        for task in tasks:
            adapt(task, eval_steps)
            with torch.no_grad():
                losses.append(F.mse_loss(net(task.query[0]), task.query[1]).item())
            load(saved_weights)
            optimizer.load_state_dict(copy.deepcopy(saved_optimizer))
        evaluations.append(losses)
    return inits, evaluations


def carry_learner(model: nn.Module, inner_state: str = "carry") -> Reptile:
    return Reptile(model=model, criterion=F.mse_loss,
                   inner_optimizer=metazoo.Adam(0.05, betas=(0.0, 0.999)), inner_steps=3,
                   eval_inner_steps=4, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                   inner_state=inner_state)


def test_carry_equals_one_torch_adam_kept_across_tasks_steps_and_evaluation():
    model, tasks = model_and_tasks()
    inits, evaluations = carried_by_hand(model, tasks, meta_steps=2, steps=3, eval_steps=4,
                                         epsilon=0.5)
    reset = carry_learner(copy.deepcopy(model), "reset")
    learner = carry_learner(model)
    for init, losses in zip(inits, evaluations, strict=True):
        learner.meta_step(tasks)
        reset.meta_step(tasks)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), init[name], atol=1e-14, rtol=1e-12)
        for _ in range(2):  # evaluation starts from the carried state and leaves it unchanged
            result = learner.evaluate(tasks)
            torch.testing.assert_close([loss for loss, _ in result.per_task], losses,
                                       atol=1e-13, rtol=1e-11)
        # adapt() starts from the carried state too (4 eval steps, as evaluate)
        adapted = learner.adapt(tasks[1]).params
        x, y = tasks[1].query
        with torch.no_grad():
            query_loss = F.mse_loss(torch.func.functional_call(model, adapted, (x,)), y).item()
        assert query_loss == pytest.approx(losses[1], rel=1e-11)
    # the default (a fresh Adam per task) is a different algorithm: the check above can fail
    difference = max((p - q).abs().max().item() for p, q in
                     zip(model.parameters(), reset.model.parameters(), strict=True))
    assert difference > 1e-4
    assert learner.state_dict()["inner_optimizer_state"]["step"] == 2 * 3 * 3


def test_carry_state_dict_round_trip_continues_bit_identically(tmp_path):
    model, tasks = model_and_tasks()
    straight = carry_learner(copy.deepcopy(model))
    for _ in range(3):
        straight.meta_step(tasks)
    first = carry_learner(copy.deepcopy(model))
    assert first.state_dict()["inner_optimizer_state"] is None
    for _ in range(2):
        first.meta_step(tasks)
    metazoo.atomic_save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = carry_learner(model_and_tasks()[0])
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    resumed.meta_step(tasks)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    mine, theirs = (learner.state_dict()["inner_optimizer_state"]
                    for learner in (straight, resumed))
    assert mine["step"] == theirs["step"] == 3 * 3 * 3
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(mine[key][n], theirs[key][n]) for n in mine[key])
    assert straight.evaluate(tasks) == resumed.evaluate(tasks)


def test_carry_state_dict_mismatch_and_default_unchanged():
    model, tasks = model_and_tasks()
    reset, carry = carry_learner(copy.deepcopy(model), "reset"), carry_learner(model)
    carry.meta_step(tasks)
    assert "inner_optimizer_state" not in reset.state_dict()
    fresh = carry_learner(model_and_tasks()[0])  # before the first task: nothing carried yet
    fresh.load_state_dict(carry_learner(model_and_tasks()[0]).state_dict())
    assert fresh.state_dict()["inner_optimizer_state"] is None
    with pytest.raises(ValueError, match="inner_state='carry', this one has inner_state='reset'"):
        reset.load_state_dict(carry.state_dict())
    with pytest.raises(ValueError, match="inner_state='reset', this one has inner_state='carry'"):
        carry.load_state_dict(reset.state_dict())
    # reset: every task adapts from a fresh state, whatever ran before
    before = reset.adapt(tasks[0]).params
    reset.meta_step(tasks)
    reset.load_state_dict(carry_learner(model_and_tasks()[0], "reset").state_dict())
    after = reset.adapt(tasks[0]).params
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"inner_state": "keep"}, r"inner_state must be one of \['reset', 'carry'\], got 'keep'"),
    ({"inner_state": "carry", "vectorize": True},
     "inner_state='carry' runs the tasks one after another.*vectorize=True"),
    ({"inner_state": "carry", "vectorize": "auto"}, "pass vectorize=False, or inner_state="),
    ({"inner_state": "carry", "inner_optimizer": metazoo.SGD([0.1, 0.2])},
     r"per-step hyperparameters \['lr'\]"),
])
def test_carry_validation(kwargs, message):
    model, _ = model_and_tasks()
    with pytest.raises(ValueError, match=message):
        Reptile(model=model, criterion=F.mse_loss, **kwargs)
