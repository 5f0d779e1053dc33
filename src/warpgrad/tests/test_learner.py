"""WarpGrad through the core MetaLearner interface."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import metazoo
from metazoo import MetaLearner, NonFiniteError, Task
from warpgrad import DualUpdater, OnlineUpdater, OptimizerParameters, ReplayBuffer, Warp, WarpGrad


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
    with pytest.raises(ValueError, match="inner_steps must be an int >= 1, got 0"):
        WarpGrad(learner.warp, inner_steps=0)


def _seeded(model):
    """Replay in a seeded order, one state per step, from a seeded reservoir of 2 states per
    task: both generators advance every meta-step."""
    params = OptimizerParameters(trainable=True, default_lr=0.3, default_momentum=0.0)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, bsz=1, seed=3), ReplayBuffer(max_states=2, seed=4),
                optimizer_parameters=params)
    return WarpGrad(warp, inner_steps=3, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_a_resumed_seeded_replay_continues_as_an_uninterrupted_one(make_model, make_tasks,
                                                                   tmp_path):
    batches = [_tasks(make_tasks, num_tasks=2) for _ in range(3)]
    straight = _seeded(make_model())
    for tasks in batches:
        straight.meta_step(tasks)
    first = _seeded(make_model())
    first.meta_step(batches[0])
    metazoo.atomic_save(first.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(state["warp"]["random"]) == {"updater", "buffer"}
    resumed = _seeded(make_model(seed=7))
    resumed.load_state_dict(state)
    for tasks in batches[1:]:
        resumed.meta_step(tasks)
    for (n, a), (_, b) in zip(straight.named_meta_parameters(),
                              resumed.named_meta_parameters(), strict=True):
        assert torch.equal(a, b), n
    # Without the generators (a checkpoint from before they were saved) the replay and the
    # reservoir start again from their seeds: another run, which this test can tell apart.
    del state["warp"]["random"]
    fresh = _seeded(make_model(seed=7))
    fresh.load_state_dict(state)
    for tasks in batches[1:]:
        fresh.meta_step(tasks)
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(
        straight.named_meta_parameters(), fresh.named_meta_parameters(), strict=True))
    # Unseeded parts draw from torch's global generator: nothing of theirs is saved.
    assert "random" not in _learner(make_model()).state_dict()["warp"]


# -- faults and determinism ---------------------------------------------------------------------

def _poisoned(tasks, task, batch):
    """A NaN input in support batch ``batch`` of ``tasks[task]`` (``None``: in its query)."""
    support = [(x.clone(), y) for x, y in tasks[task].support]
    query = (tasks[task].query[0].clone(), tasks[task].query[1])
    (query[0] if batch is None else support[batch][0])[2, 1] = float("nan")
    return [*tasks[:task], Task(support, query), *tasks[task + 1:]]


def _with_steps(model, on_nonfinite="raise", vectorize=False):
    learner = _learner(model)
    return WarpGrad(learner.warp, inner_steps=3, on_nonfinite=on_nonfinite,
                    vectorize=vectorize, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


@pytest.mark.parametrize(("batch", "where", "first"), [(1, "inner", 1), (None, "query", None)])
def test_nonfinite_loss_raises_with_task_and_step_and_leaves_parameters(
        make_model, make_tasks, batch, where, first):
    learner = _with_steps(make_model())
    before = {n: p.detach().clone() for n, p in learner.named_meta_parameters()}
    tasks = _poisoned(_tasks(make_tasks, num_tasks=3), 1, batch)
    with pytest.raises(NonFiniteError, match="task 1 of the meta-batch") as info:
        learner.meta_step(tasks)
    assert (info.value.task, info.value.where, info.value.inner_step) == (1, where, first)
    for n, p in learner.named_meta_parameters():
        assert torch.equal(p, before[n]), n
    assert len(learner.warp.buffer) == 0 and not learner.warp.buffer.slots()


def test_skip_mode_drops_the_task_and_its_trajectory(make_model, make_tasks):
    good = _tasks(make_tasks, num_tasks=3)
    skipping = _with_steps(make_model(), on_nonfinite="skip")
    reference = _with_steps(make_model())
    result = skipping.meta_step(_poisoned(good, 1, 0))
    expected = reference.meta_step([good[0], good[2]])
    assert (result.skipped_tasks, result.num_tasks) == (1, 3)
    assert result.meta_loss == pytest.approx(expected.meta_loss, rel=1e-12)
    for (n, p), q in zip(skipping.named_meta_parameters(), reference.meta_parameters(),
                         strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)
    none = skipping.meta_step(_poisoned(good[:1], 0, 0))
    assert none.skipped_tasks == 1 and none.meta_loss != none.meta_loss
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        WarpGrad(skipping.warp, inner_steps=3, on_nonfinite="drop")


def test_the_loop_reads_all_fault_flags_with_the_means_in_one_transfer(make_model, make_tasks):
    """No per-task read is left (before, each task's inner losses and fault check cost one,
    the means another, the replay's mean loss and its shuffled order one each): meta_backward
    reads the fault flags with the means, and meta_step reads them with the meta-optimizer
    step's finite check, once per meta-step whatever the number of tasks. With
    on_nonfinite="skip" the replay must know which trajectories to leave out before it runs:
    one transfer more."""
    from metazoo.testing import count_host_syncs

    def syncs(num_tasks, step, on_nonfinite="raise", vectorize=False):
        learner = _with_steps(make_model(), on_nonfinite, vectorize)
        tasks = _tasks(make_tasks, num_tasks=num_tasks)
        learner.meta_step(tasks)  # warm-up
        learner.meta_optimizer.zero_grad()
        with count_host_syncs() as counted:
            learner.meta_step(tasks) if step else learner.meta_backward(tasks)
        return counted.count

    assert syncs(2, step=False) == 1 and syncs(4, step=False) == 1
    assert syncs(2, step=True) == 1 and syncs(4, step=True) == 1
    assert syncs(4, step=True, on_nonfinite="skip") == 2
    assert syncs(4, step=True, vectorize=True) == 1
    assert syncs(4, step=True, on_nonfinite="skip", vectorize=True) == 2


@pytest.mark.parametrize("case", ["finite", "inner_nan", "query_nan", "meta_update",
                                  "task_and_update"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_the_one_transfer_meta_step_ends_as_the_two_transfer_one(make_model, make_tasks,
                                                                  vectorize, on_nonfinite, case):
    """The loop replays before it reads the fault flags; a faulty task then drops the
    meta-gradients, undoes the step and the replay's draw of its order, and raises as it did
    when read first: same error, parameters, .grad, optimizer state and random state."""
    from metazoo.testing import assert_one_transfer_meta_step_is_the_two_transfer_one

    tasks = _tasks(make_tasks, num_tasks=3)
    if case in ("inner_nan", "task_and_update"):
        tasks = _poisoned(tasks, 1, 1)
    elif case == "query_nan":
        tasks = _poisoned(tasks, 2, None)

    def build():
        learner = _with_steps(make_model(), on_nonfinite, vectorize)
        learner.meta_step(_tasks(make_tasks, num_tasks=2))
        if case in ("meta_update", "task_and_update"):
            learner.meta_optimizer.param_groups[0]["lr"] = float("inf")
        return learner

    assert_one_transfer_meta_step_is_the_two_transfer_one(build, tasks)
    # The replay order drawn after a fault is the one the two-transfer step would draw.
    draws = []
    for hook in (None, lambda learner, result: None):
        learner = build()
        with contextlib.suppress(NonFiniteError):
            learner.meta_step(tasks, grad_hook=hook)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])


def test_same_seed_twice_is_bitwise_identical(make_model, make_tasks):
    def run():
        learner = _with_steps(make_model(seed=3))
        results = [learner.meta_step(_tasks(make_tasks, num_tasks=2)) for _ in range(2)]
        return ([(r.meta_loss, r.inner_losses, r.accuracy) for r in results],
                [p.detach().clone() for p in learner.meta_parameters()])

    (a_results, a_params), (b_results, b_params) = run(), run()
    assert a_results == b_results
    assert all(torch.equal(a, b) for a, b in zip(a_params, b_params, strict=True))


def test_bad_hyperparameters_and_labels_fail_clearly(make_model, make_tasks):
    learner = _with_steps(make_model())
    for bad_lr in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"meta_lr={bad_lr} must be a finite positive "
                                             rf"number, e\.g\. 1e-3"):
            WarpGrad(learner.warp, inner_steps=1, meta_lr=bad_lr)
    with pytest.raises(ValueError, match="inner_steps must be an int >= 1, got True"):
        WarpGrad(learner.warp, inner_steps=True)
    task = _tasks(make_tasks, num_tasks=1)[0]
    bad = Task([(x, y + 1) for x, y in task.support], task.query)
    with pytest.raises(ValueError, match=r"label 3 but the model outputs 3 classes"):
        learner.meta_step([bad])
    assert not learner.warp.buffer.slots()
    with pytest.raises(ValueError, match=r"label -1 but the model outputs 3 classes"):
        learner.evaluate([Task(task.support, (task.query[0], task.query[1] - 1))])


def test_checkpoint_of_another_configuration_names_the_keys(make_model):
    state = _learner(make_model()).state_dict()
    other = _learner(make_model(batch_norm=False))
    with pytest.raises(RuntimeError, match=r"bn\.running_mean"):
        other.load_state_dict(state)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_a_nonfinite_meta_update_is_undone_and_named(make_model, make_tasks, lr):
    """Issue 18 bug 1: WarpGrad's meta-step goes through metazoo.checked_step too."""
    model = make_model()
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy))
    learner = WarpGrad(warp, inner_steps=2, on_nonfinite="skip",
                       meta_optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    before = {n: p.detach().clone() for n, p in learner.named_meta_parameters()}
    with pytest.raises(NonFiniteError, match="meta-optimizer step made") as info:
        learner.meta_step(_tasks(make_tasks))
    assert info.value.where == "meta_update"
    assert all(torch.equal(p, before[n]) for n, p in learner.named_meta_parameters())
    assert not learner.warp.buffer.slots()


def test_requires_grad_false_is_neither_adapted_nor_meta_learned(make_model, make_tasks):
    """Issue 18 bug 6: a frozen parameter in adapt_modules or warp_modules is held fixed."""
    model = make_model()
    model.fc1.weight.requires_grad_(False)
    model.warp2.bias.requires_grad_(False)
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    learner = _learner(model)
    names = dict(learner.named_meta_parameters())
    assert not {"init.fc1.weight", "warp.warp2.bias"} & set(names)
    assert {"init.fc1.bias", "warp.warp2.weight"} <= set(names)
    adapted = learner.adapt(_tasks(make_tasks, num_tasks=1)[0])
    assert torch.equal(adapted.params["fc1.weight"], fixed["fc1.weight"])
    assert not torch.equal(adapted.params["fc1.bias"], model.fc1.bias)
    learner.meta_step(_tasks(make_tasks))
    for n, p in model.named_parameters():
        if n in fixed:
            assert torch.equal(p, fixed[n]) and p.grad is None
    frozen = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="adapt_modules hold no parameters with requires_grad"):
        Warp(frozen, frozen.adapt_modules(), frozen.warp_modules(), DualUpdater(F.cross_entropy))


# -- the shared construction vocabulary ------------------------------------------------------

def _reference_style(model, *, lr=0.3, momentum=0.0, trainable=False, **updater):
    params = OptimizerParameters(trainable=trainable, default_lr=lr, default_momentum=momentum)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, **updater), optimizer_parameters=params)
    # SGD, not Adam: fc2.bias feeds BatchNorm, so its meta-gradient is rounding noise (1e-17)
    # that Adam's normalisation would blow up to a full step in a random direction.
    return WarpGrad(warp, inner_steps=3, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


@pytest.mark.parametrize("selection", ["modules", "names", "predicate"])
@pytest.mark.parametrize("momentum,trainable", [(0.0, False), (0.5, True)])
def test_keyword_construction_equals_the_reference_style(make_model, make_tasks, selection,
                                                         momentum, trainable):
    """WarpGrad(model=..., warp_modules=...) builds the same learner as Warp + updater +
    OptimizerParameters + WarpGrad(warp): same meta-parameters and, after three meta-steps,
    the same meta-gradients, parameters and losses (float64)."""
    tasks = _tasks(make_tasks)
    reference = _reference_style(make_model(), momentum=momentum, trainable=trainable,
                                 warp_objective="exact")
    model = make_model()
    warp_modules = {"modules": model.warp_modules(), "names": ["warp1", "warp2"],
                    "predicate": lambda name: name.startswith("warp")}[selection]
    ours = WarpGrad(model=model, warp_modules=warp_modules, criterion=F.cross_entropy,
                    inner_optimizer=metazoo.SGD(0.3, momentum=momentum),
                    learn_optimizer=trainable, warp_objective="exact", inner_steps=3,
                    meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    assert [n for n, _ in ours.named_meta_parameters()] == [
        n for n, _ in reference.named_meta_parameters()]
    assert {n for n, _ in ours.warp.named_adapt_parameters()} == {
        n for n, _ in reference.warp.named_adapt_parameters()}
    for step in range(3):
        expected = reference.meta_step(tasks)
        grads = {n: p.grad.clone() for n, p in reference.named_meta_parameters()}
        actual = ours.meta_step(tasks)
        for n, p in ours.named_meta_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=1e-10, msg=f"{step} {n}")
        assert actual.meta_loss == pytest.approx(expected.meta_loss, abs=1e-10)
    for (n, a), (_, b) in zip(ours.named_meta_parameters(), reference.named_meta_parameters(),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=n)
    assert ours.evaluate(tasks).loss == pytest.approx(reference.evaluate(tasks).loss, abs=1e-10)


def test_keyword_construction_options(make_model, make_tasks):
    """eval_inner_steps, meta_lr (the old spelling), an optimizer instance and an nn.Module
    criterion; wrong combinations fail with one line naming the keyword."""
    tasks = _tasks(make_tasks)
    model = make_model()
    learner = WarpGrad(model=model, warp_modules=["warp1", "warp2"],
                       criterion=torch.nn.CrossEntropyLoss(), inner_steps=2, eval_inner_steps=4,
                       meta_lr=0.01)
    assert isinstance(learner.meta_optimizer, torch.optim.Adam)
    assert learner.meta_optimizer.param_groups[0]["lr"] == 0.01
    assert len(learner.adapt(tasks[0]).inner_losses) == 4
    assert len(learner.evaluate(tasks).inner_losses) == 4
    assert len(learner.meta_step(tasks).inner_losses) == 2
    # Default adapt_modules: every module owning parameters outside the warp layers.
    assert {n for n, _ in learner.warp.named_adapt_parameters()} == {
        n for n, p in model.named_parameters() if not n.startswith("warp")}
    instance = make_model()
    built = WarpGrad(model=instance, warp_modules="warp1",
                     adapt_modules=["fc1", instance.fc2, "bn", "head", "warp2"],
                     criterion=F.cross_entropy, meta_optimizer=None)
    assert {n for n, _ in built.warp.named_warp_parameters()} == {"warp1.weight", "warp1.bias"}
    good = dict(model=make_model(), warp_modules=["warp1", "warp2"], criterion=F.cross_entropy)
    for key, value, message in [
            ("criterion", torch.nn.CrossEntropyLoss, "is a class; pass an instance"),
            ("warp_modules", ["warp3"], "does not have"),
            ("warp_modules", lambda n: n == "nothing", "matches none"),
            ("inner_optimizer", metazoo.Adam(0.1), "cannot adapt with Adam"),
            ("inner_optimizer", metazoo.SGD(0.1, nesterov=True, momentum=0.5), "float lr and"),
            ("meta_lr", -1.0, "meta_lr=-1.0"),
            ("eval_inner_steps", 0, "eval_inner_steps must be an int >= 1"),
            ("meta_optimizer", torch.optim.SGD(make_model().parameters(), lr=0.1),
             "leaves out the meta-parameters")]:
        with pytest.raises(ValueError, match=message):
            WarpGrad(**{**good, key: value})
    with pytest.raises(ValueError, match="not both"):
        WarpGrad(**good, meta_lr=0.1, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match=r"takes \['criterion'\] from the Warp"):
        WarpGrad(learner.warp, criterion=F.cross_entropy)
    with pytest.raises(ValueError, match="needs model="):
        WarpGrad(criterion=F.cross_entropy, warp_modules=[])
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        learner.adapt(tasks[0], steps=0)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_adapt_and_evaluate_refuse_a_bad_step_count_as_the_other_learners(make_model,
                                                                          make_tasks, steps):
    """Issue 28 item 8: adapt(task, steps=0) returned the initialisation without a word."""
    learner = _learner(make_model())
    task = _tasks(make_tasks, num_tasks=1)[0]
    with pytest.raises(ValueError, match=rf"steps must be an int >= 1, got {steps!r}"):
        learner.adapt(task, steps=steps)
    with pytest.raises(ValueError, match=rf"steps must be an int >= 1, got {steps!r}"):
        learner.evaluate([task], steps=steps)
    assert len(learner.adapt(task, steps=2).inner_losses) == 2
