"""``LeapLearner``: the MetaLearner interface, checked against the reference-style API."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import metazoo
from leap import Leap, LeapLearner

FLAGS = list(itertools.product([True, False], repeat=3))  # (norm, loss, stabilizer)


def learner(model, *, steps=3, lr=0.1, momentum=0.0, meta_lr=0.01, **options):
    return LeapLearner(model=model, criterion=options.pop("criterion", nn.functional.mse_loss),
                       inner_optimizer=metazoo.SGD(lr, momentum=momentum), inner_steps=steps,
                       meta_optimizer=lambda params: torch.optim.Adam(params, lr=meta_lr),
                       **options)


@pytest.mark.parametrize("lr", [0.3, 0.7, 0.8])
@pytest.mark.parametrize("norm,loss,stabilizer", FLAGS)
def test_quadratic_meta_gradient_matches_hand_computation(helpers, lr, norm, loss, stabilizer):
    model = helpers.Quadratic()
    batch = helpers.quadratic_batch()
    leap = learner(model, steps=2, lr=lr, criterion=helpers.quadratic_criterion, norm=norm,
                   loss=loss, stabilizer=stabilizer)
    leap.meta_backward([metazoo.Task([batch], batch)])
    want, _ = helpers.hand_meta_grad(lr, 2, norm, loss, stabilizer)
    assert [model.a.grad.item(), model.b.grad.item()] == pytest.approx(want, rel=1e-12,
                                                                       abs=1e-14)


@pytest.mark.parametrize("norm,loss,stabilizer", FLAGS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_same_meta_gradient_as_the_reference_style_api(helpers, norm, loss, stabilizer,
                                                       momentum):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    reference = Leap(copy.deepcopy(model), norm=norm, loss=loss, stabilizer=stabilizer)
    helpers.reference_loop(reference, copy.deepcopy(model), tasks, steps=4, lr=0.1,
                           momentum=momentum, finish=True)
    ours = learner(model, steps=4, momentum=momentum, norm=norm, loss=loss,
                   stabilizer=stabilizer)
    result = ours.meta_backward(tasks)
    for (name, p), (ref_name, q) in zip(ours.named_meta_parameters(),
                                        reference.named_parameters(), strict=True):
        assert name == ref_name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert result.num_tasks == 2 and len(result.inner_losses) == 4
    assert result.accuracy is None  # regression
    assert result.inner_loss == result.inner_losses[-1]


def test_energy_without_loss_equals_reptile(helpers):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(3)
    init = [p.detach().clone() for p in model.parameters()]
    reptile = [torch.zeros_like(p) for p in init]
    for task in tasks:
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
        for k in range(4):
            x, y = task.support[k % len(task.support)]
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        for r, p0, p in zip(reptile, init, net.parameters(), strict=True):
            r += (p0 - p.detach()) / len(tasks)
    ours = learner(model, steps=4, momentum=0.5, norm=False, loss=False)
    ours.meta_backward(tasks)
    for p, r in zip(model.parameters(), reptile, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_adapt_matches_the_core_unroll(helpers, clip):
    model = helpers.mlp()
    task = helpers.regression_tasks(1)[0]
    ours = learner(model, steps=2, momentum=0.9, eval_inner_steps=5, inner_grad_clip=clip)
    adapted = ours.adapt(task)
    loss_fn = metazoo.make_loss_fn(model, nn.functional.mse_loss)
    want = metazoo.unroll(loss_fn, metazoo.params_of(model, detach=True),
                          metazoo.SGD(0.1, momentum=0.9), task.support, steps=5,
                          inner_grad_clip=clip)
    for name, p in want.params.items():
        torch.testing.assert_close(adapted.params[name], p, rtol=1e-12, atol=1e-14)
    assert adapted.inner_losses == pytest.approx(want.losses.tolist(), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())
    if clip is not None:  # the clip is active, so the check above is not vacuous
        unclipped = learner(model, momentum=0.9).adapt(task, steps=5)
        assert not torch.allclose(unclipped.params["0.weight"], adapted.params["0.weight"])


def test_inner_grad_clip_clips_the_step_but_the_increment_uses_the_loss_gradient(helpers):
    """Parity with the reference-style API clipping between ``update`` and the inner step."""
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    reference = Leap(copy.deepcopy(model))
    net = copy.deepcopy(model)
    for task in tasks:
        reference.init_task()
        reference.to(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for k in range(3):
            x, y = task.support[k]
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            reference.update(loss, net)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            x, y = task.support[0]
            reference.finish(nn.functional.mse_loss(net(x), y), net)
    reference.normalize()
    ours = learner(model, steps=3, inner_grad_clip=0.05)
    ours.meta_backward(tasks)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    unclipped = learner(copy.deepcopy(model), steps=3)
    unclipped.meta_backward(tasks)
    assert not torch.allclose(next(unclipped.model.parameters()).grad,
                              next(model.parameters()).grad)


def test_ten_meta_steps_change_the_initialisation_and_keep_tensor_count(helpers):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    ours = learner(model)
    previous = [p.detach().clone() for p in model.parameters()]
    counts = []
    for step in range(10):
        result = ours.meta_step(tasks)
        assert result.num_tasks == 2 and result.seconds > 0
        current = [p.detach().clone() for p in model.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(previous, current, strict=True))
        previous = current
        if step in (1, 5, 9):
            del result, current
            counts.append(helpers.live_tensors())
    assert len(set(counts)) == 1, counts


def test_evaluate_leaves_the_initialisation_unchanged(helpers):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(3)
    ours = learner(model)
    before = copy.deepcopy(model.state_dict())
    result = ours.evaluate(tasks, steps=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert result.num_tasks == 3 and len(result.per_task) == 3
    assert len(result.inner_losses) == 2
    assert result.loss == pytest.approx(sum(loss for loss, _ in result.per_task) / 3, rel=1e-12)
    # Adaptation helps on these tasks: the query loss falls with more inner steps.
    assert ours.evaluate(tasks, steps=20).loss < ours.evaluate(tasks, steps=1).loss


def test_classification_with_batchnorm_in_both_modes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 3
    task = metazoo.Task([(x[:6], y[:6]), (x[6:], y[6:])], (x, y))
    for mode in ("batch", "running"):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                              nn.Linear(8, 3)).double()
        buffers = copy.deepcopy(dict(model.named_buffers()))
        ours = learner(model, criterion=nn.functional.cross_entropy, bn_mode=mode)
        result = ours.meta_step([task, task])
        assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
        adapted = ours.adapt(task)
        moved = not torch.equal(adapted.buffers["1.running_mean"], buffers["1.running_mean"])
        assert moved == (mode == "running")


def test_frozen_parameters_are_used_but_not_adapted_or_meta_learned(helpers):
    model = helpers.mlp()
    model[0].weight.requires_grad_(False)
    tasks = helpers.regression_tasks(1)
    ours = LeapLearner(model=model, criterion=nn.functional.mse_loss, inner_steps=2,
                       meta_optimizer=torch.optim.SGD(
                           [p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert [n for n, _ in ours.named_meta_parameters()] == ["0.bias", "2.weight", "2.bias"]
    adapted = ours.adapt(tasks[0])
    assert torch.equal(adapted.params["0.weight"], model[0].weight)
    ours.meta_step(tasks)
    assert model[0].weight.grad is None


def test_state_dict_round_trip(helpers):
    model = helpers.mlp()
    tasks = helpers.regression_tasks(2)
    ours = learner(model)
    ours.meta_step(tasks)
    state = copy.deepcopy(ours.state_dict())
    ours.meta_step(tasks)
    stepped = [p.detach().clone() for p in model.parameters()]
    ours.load_state_dict(state)
    ours.meta_step(tasks)
    for p, q in zip(model.parameters(), stepped, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=0)


def test_constructor_validates_every_argument(helpers):
    model = helpers.mlp()
    good = dict(model=model, criterion=nn.functional.mse_loss)
    cases = [("inner_steps", 0, "inner_steps"), ("inner_steps", True, "inner_steps"),
             ("eval_inner_steps", 0, "eval_inner_steps"),
             ("inner_optimizer", torch.optim.SGD(model.parameters(), lr=0.1), "metazoo"),
             ("criterion", "mse", "criterion"), ("norm", "yes", "norm"),
             ("loss", None, "loss"), ("stabilizer", 1, "stabilizer"),
             ("bn_mode", "global", "bn_mode"), ("inner_grad_clip", -1.0, "inner_grad_clip"),
             ("model", "net", "model"),
             ("meta_optimizer", torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
              "leaves out the meta-parameters"),
             ("meta_optimizer", "adam", "a factory taking"),
             ("meta_optimizer", lambda params: None, "torch.optim.Optimizer")]
    for key, value, message in cases:
        with pytest.raises(ValueError, match=message):
            LeapLearner(**{**good, key: value})
    with pytest.raises(TypeError):
        LeapLearner(model, criterion=nn.functional.mse_loss)  # keyword-only
    ours = LeapLearner(**good)
    assert isinstance(ours.meta_optimizer, torch.optim.SGD)
    assert isinstance(ours.inner_optimizer, metazoo.SGD)
    assert ours.inner_steps == ours.eval_inner_steps == 5
    task = helpers.regression_tasks(1)[0]
    with pytest.raises(ValueError, match="steps"):
        ours.adapt(task, steps=-1)
    with pytest.raises(ValueError, match="at least one task"):
        ours.meta_backward([])
    with pytest.raises(ValueError, match=r"\[task\]"):
        ours.evaluate(task)


def test_tied_weights_give_the_same_meta_gradient_in_both_apis(helpers):
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 1)).double()
    tasks = helpers.regression_tasks(2)
    reference = Leap(copy.deepcopy(model))
    assert [n for n, _ in reference.named_parameters()] == [
        n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert reference.state["2.weight"] is reference.state["0.weight"]
    net = copy.deepcopy(model)
    helpers.reference_loop(reference, net, tasks, steps=3, lr=0.1)
    assert net[2].weight is net[0].weight
    assert all(torch.isfinite(p.grad).all() for p in reference.parameters())
    # The tied tensor is one coordinate block: the Reptile identity holds for it too.
    untied_view = Leap(copy.deepcopy(model), norm=False, loss=False)
    net = copy.deepcopy(model)
    helpers.reference_loop(untied_view, net, tasks[:1], steps=3, lr=0.1)
    torch.testing.assert_close(next(untied_view.parameters()).grad,
                               model[0].weight.detach() - net[0].weight.detach())
    # The learner adapts the tied tensor as one tensor too: the same meta-gradient.
    reference = Leap(copy.deepcopy(model))
    helpers.reference_loop(reference, copy.deepcopy(model), tasks, steps=3, lr=0.1, finish=True)
    ours_model = copy.deepcopy(model)
    ours = learner(ours_model, steps=3)
    ours.meta_backward(tasks)
    assert ours_model[2].weight is ours_model[0].weight
    for (name, p), (ref_name, q) in zip(ours.named_meta_parameters(),
                                        reference.named_parameters(), strict=True):
        assert name == ref_name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)


# -- faults, bad input, determinism -------------------------------------------------------------

def _classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _class_tasks(count=3, seed=1, poison=None):
    """``count`` 3-way tasks of 3 support batches; ``poison=(task, batch)`` puts a NaN input in
    that support batch (``batch=None``: in the query)."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(count):
        batches = [(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.arange(6) % 3)
                   for _ in range(4)]
        if poison is not None and poison[0] == t:
            batches[3 if poison[1] is None else poison[1]][0][2, 1] = float("nan")
        tasks.append(metazoo.Task(batches[:3], batches[3]))
    return tasks


@pytest.mark.parametrize(("batch", "where", "first"), [(1, "inner", 1), (None, "query", None)])
def test_nonfinite_loss_raises_with_task_and_step_and_leaves_the_init(batch, where, first):
    ours = learner(_classifier(), criterion=nn.functional.cross_entropy)
    before = [p.detach().clone() for p in ours.meta_parameters()]
    with pytest.raises(metazoo.NonFiniteError, match="task 1 of the meta-batch") as info:
        ours.meta_step(_class_tasks(poison=(1, batch)))
    assert (info.value.task, info.value.where, info.value.inner_step) == (1, where, first)
    assert all(torch.equal(p, b) for p, b in zip(ours.meta_parameters(), before, strict=True))
    assert not ours.meta_optimizer.state


def test_skip_mode_drops_the_task_from_the_mean_exactly():
    good = _class_tasks()
    skipping = learner(_classifier(), criterion=nn.functional.cross_entropy,
                       on_nonfinite="skip")
    reference = learner(_classifier(), criterion=nn.functional.cross_entropy)
    result = skipping.meta_step(_class_tasks(poison=(1, 0)))
    expected = reference.meta_step([good[0], good[2]])
    assert (result.skipped_tasks, result.num_tasks) == (1, 3)
    assert result.meta_loss == pytest.approx(expected.meta_loss, rel=1e-12)
    for p, q in zip(skipping.meta_parameters(), reference.meta_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        learner(_classifier(), on_nonfinite=True)


def test_labels_outside_the_models_classes_fail_clearly():
    ours = learner(_classifier(), criterion=nn.functional.cross_entropy)
    task = _class_tasks(1)[0]
    bad = metazoo.Task([(x, y + 1) for x, y in task.support], task.query)
    with pytest.raises(ValueError, match=r"label 3 but the model outputs 3 classes"):
        ours.meta_step([bad])


def test_same_seed_twice_is_bitwise_identical():
    def run():
        ours = learner(_classifier(seed=4), criterion=nn.functional.cross_entropy)
        results = [ours.meta_step(_class_tasks(seed=s)) for s in (7, 8)]
        return ([(r.meta_loss, r.inner_losses, r.accuracy) for r in results],
                [p.detach().clone() for p in ours.meta_parameters()])

    (a_results, a_params), (b_results, b_params) = run(), run()
    assert a_results == b_results
    assert all(torch.equal(a, b) for a, b in zip(a_params, b_params, strict=True))


def test_checkpoint_of_another_model_names_the_keys():
    state = learner(_classifier(), criterion=nn.functional.cross_entropy).state_dict()
    other = learner(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 2)
                                  ).double())
    with pytest.raises(ValueError, match=r"missing \['3.weight', '3.bias'\]"):
        other.load_state_dict(state)


class _WithUnusedScale(nn.Module):
    """A classifier plus a parameter multiplied by zero: its Leap meta-gradient is exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _classifier()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.net(x) + 0.0 * self.scale


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("factory", [
    lambda ps: torch.optim.SGD(ps, lr=float("nan")),
    lambda ps: torch.optim.SGD(ps, lr=float("inf")),
    lambda ps: torch.optim.Adam(ps, lr=0.1, eps=0.0),
])
def test_a_nonfinite_meta_update_is_undone_and_named(factory, on_nonfinite):
    """Issue 18 bug 1: a NaN/inf meta lr or Adam(eps=0) made the initialisation NaN silently."""
    ours = LeapLearner(model=_WithUnusedScale(), criterion=nn.functional.cross_entropy,
                       inner_optimizer=metazoo.SGD(0.1), inner_steps=3, meta_optimizer=factory,
                       on_nonfinite=on_nonfinite)
    before = [p.detach().clone() for p in ours.meta_parameters()]
    with pytest.raises(metazoo.NonFiniteError, match="meta-optimizer step made") as info:
        ours.meta_step(_class_tasks())
    assert info.value.where == "meta_update" and "scale" in info.value.names
    assert all(torch.equal(p, b) for p, b in zip(ours.meta_parameters(), before, strict=True))
    assert not ours.meta_optimizer.state


def test_the_loop_checks_all_tasks_with_one_host_transfer():
    from metazoo.testing import count_host_syncs, image_tasks, small_conv_net

    learner = LeapLearner(model=small_conv_net(), criterion=torch.nn.functional.cross_entropy,
                          inner_optimizer=metazoo.SGD(0.1), inner_steps=2)
    with count_host_syncs() as syncs:
        learner.meta_backward(image_tasks(4))
    assert syncs.count == 1  # the fault flags of all tasks with the reported means


@pytest.mark.parametrize("case", ["finite", "inner_nan", "query_nan", "all_nan", "meta_update",
                                  "task_and_update"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_the_one_transfer_meta_step_ends_as_the_two_transfer_one(vectorize, on_nonfinite, case):
    """meta_step writes the mean meta-gradient (over the tasks kept, counted on the device)
    and steps before it reads the fault flags, with the step's finite check, in one transfer;
    it ends exactly as reading them first does (a grad_hook makes it): same result or error,
    initialisation, .grad and momentum."""
    from metazoo.testing import assert_one_transfer_meta_step_is_the_two_transfer_one

    poison = {"inner_nan": (1, 1), "task_and_update": (1, 1), "query_nan": (2, None)}
    tasks = _class_tasks(4, poison=poison.get(case))
    if case == "all_nan":
        tasks = [t for i in range(4) for t in _class_tasks(4, poison=(i, 0))[i:i + 1]]

    def build():
        learner = LeapLearner(model=_WithUnusedScale(), criterion=nn.functional.cross_entropy,
                              inner_optimizer=metazoo.SGD(0.1), inner_steps=3,
                              on_nonfinite=on_nonfinite, vectorize=vectorize,
                              meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        learner.meta_step(_class_tasks(2, seed=5))  # momentum buffers hold something
        if case in ("meta_update", "task_and_update"):
            learner.meta_optimizer.param_groups[0]["lr"] = float("inf")
        return learner

    assert_one_transfer_meta_step_is_the_two_transfer_one(build, tasks)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_a_meta_step_reads_the_device_once(vectorize, on_nonfinite):
    from metazoo.testing import count_host_syncs, image_tasks, small_conv_net

    learner = LeapLearner(model=small_conv_net(), criterion=torch.nn.functional.cross_entropy,
                          inner_optimizer=metazoo.SGD(0.1), inner_steps=2,
                          on_nonfinite=on_nonfinite, vectorize=vectorize,
                          meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    learner.meta_step(image_tasks(4))
    with count_host_syncs() as syncs:
        learner.meta_step(image_tasks(4))
    assert syncs.count == 1  # the fault flags and means with the step's finite check
