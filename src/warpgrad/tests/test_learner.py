"""WarpGrad through the core MetaLearner interface."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metazoo import MetaLearner, Task
from warpgrad import DualUpdater, OnlineUpdater, OptimizerParameters, Warp, WarpGrad


def _tasks(make_tasks, num_tasks=2, support=2):
    return [Task(support=batches[:support], query=batches[support])
            for batches in make_tasks(num_tasks=num_tasks, batches=support + 1)]


def _learner(model, *, momentum=0.0, trainable=False, **kwargs):
    params = OptimizerParameters(trainable=trainable, default_lr=0.3, default_momentum=momentum)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, **kwargs), optimizer_parameters=params)
    return WarpGrad(warp, inner_steps=3, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_is_a_meta_learner_and_adapt_matches_a_torch_optim_loop(make_model, make_tasks):
    model = make_model()
    learner = _learner(model, momentum=0.5)
    assert isinstance(learner, MetaLearner)
    task = _tasks(make_tasks, num_tasks=1)[0]
    adapted = learner.adapt(task)
    # The same adaptation with the user-facing Warp and torch.optim.SGD.
    reference = copy.deepcopy(model)
    warp = Warp(reference, reference.adapt_modules(), reference.warp_modules(),
                DualUpdater(F.cross_entropy))
    warp.init_adaptation()
    opt = torch.optim.SGD(warp.adapt_parameters(), lr=0.3, momentum=0.5)
    losses = []
    for k in range(3):
        x, y = task.support[k % 2]
        loss = F.cross_entropy(warp(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in reference.named_parameters():
        torch.testing.assert_close(adapted.params[n], p.detach(), rtol=1e-12, atol=1e-14)
    assert adapted.inner_losses == pytest.approx(losses, rel=1e-12)


def test_meta_backward_equals_the_updater_on_the_same_trajectories(make_model, make_tasks):
    tasks = _tasks(make_tasks)
    model = make_model()
    learner = _learner(copy.deepcopy(model), trainable=True, warp_objective="exact", seed=3)
    learner.meta_optimizer.zero_grad(set_to_none=True)
    result = learner.meta_backward(tasks)
    grads = {n: p.grad.clone() for n, p in learner.named_meta_parameters()}
    assert result.num_tasks == 2 and len(result.inner_losses) == 3
    assert set(grads) == {n for n, _ in learner.named_meta_parameters()}
    # The README loop on the same model: same trajectories, same replay, same gradients.
    params = OptimizerParameters(trainable=True, default_lr=0.3)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, warp_objective="exact", bsz=0, init_lr=None,
                            seed=3), optimizer_parameters=params)
    for task in tasks:
        warp.init_adaptation()
        warp.register_task(task.support)
        warp.collect()
        opt = torch.optim.SGD(warp.optimizer_parameter_groups())
        for k in range(3):
            x, y = task.support[k % 2]
            F.cross_entropy(warp(x), y).backward()
            opt.step()
            opt.zero_grad()
        warp.no_collect()
    expected = {}

    def step_fn():
        for n, p in warp.named_meta_parameters():
            if p.grad is not None:
                expected[n] = p.grad.clone()
                p.grad = None

    warp.backward(step_fn)
    assert set(expected) == set(grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[n], rtol=1e-9, atol=1e-12)


def test_meta_step_changes_every_group_and_evaluate_changes_nothing(make_model, make_tasks):
    learner = _learner(make_model(), trainable=True)
    tasks = _tasks(make_tasks)
    before = {n: p.detach().clone() for n, p in learner.named_meta_parameters()}
    evaluation = learner.evaluate(tasks)
    assert evaluation.num_tasks == 2 and evaluation.accuracy is not None
    for n, p in learner.named_meta_parameters():
        assert torch.equal(p, before[n])
    result = learner.meta_step(tasks)
    assert result.meta_loss == result.meta_loss and result.seconds > 0
    for prefix in ("warp.", "init.", "optimizer."):
        assert any(not torch.equal(p, before[n]) for n, p in learner.named_meta_parameters()
                   if n.startswith(prefix)), prefix
    assert len(learner.warp.buffer) == 0


def test_state_dict_round_trip_and_validation(make_model, make_tasks):
    learner = _learner(make_model(), trainable=True)
    learner.meta_step(_tasks(make_tasks))
    other = _learner(make_model(seed=4), trainable=True)
    other.load_state_dict(learner.state_dict())
    for (n, a), (_, b) in zip(learner.named_meta_parameters(), other.named_meta_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"warp": {}})
    model = make_model()
    online = Warp(model, model.adapt_modules(), model.warp_modules(),
                  OnlineUpdater(F.cross_entropy))
    with pytest.raises(ValueError, match="DualUpdater"):
        WarpGrad(online, inner_steps=1)
    with pytest.raises(ValueError, match="inner_steps=0"):
        WarpGrad(learner.warp, inner_steps=0)
