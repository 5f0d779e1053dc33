"""MAML, first-order MAML, Meta-SGD / MAML++ and ANIL: gradients against finite differences and
plain autograd (float64), invariants, and argument validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, multi_step_loss_weights

DTYPE = torch.float64


def regression_model(kind: str = "plain", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "bn_hidden":  # statistics of a hidden layer depend on the parameters
        layers = [nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)]
    elif kind == "bn_input":  # statistics of the input do not depend on the parameters
        layers = [nn.BatchNorm1d(3), nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)]
    else:
        layers = [nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)]
    model = nn.Sequential(*layers).to(DTYPE)
    with torch.no_grad():  # non-trivial affine BatchNorm parameters
        for m in model:
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def regression_tasks(count: int = 2, seed: int = 1, shots: int = 6,
                     support_batches: int = 1) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        w = torch.randn(3, 1, generator=g, dtype=DTYPE)

        def batch(n: int, w: torch.Tensor = w) -> tuple[torch.Tensor, torch.Tensor]:
            x = 2 * torch.randn(n, 3, generator=g, dtype=DTYPE) + 0.5
            return x, torch.sin(x @ w)

        tasks.append(metazoo.Task([batch(shots) for _ in range(support_batches)], batch(7)))
    return tasks


def classification_tasks(count: int, ways: int, seed: int = 2) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        centres = 2 * torch.randn(ways, 4, generator=g, dtype=DTYPE)

        def batch(per_class: int, centres: torch.Tensor = centres
                  ) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(ways).repeat_interleave(per_class)
            return centres[y] + 0.3 * torch.randn(len(y), 4, generator=g, dtype=DTYPE), y

        tasks.append(metazoo.Task([batch(2)], batch(3)))
    return tasks


def meta_grads(learner: MAML, tasks: list[metazoo.Task]) -> dict[str, torch.Tensor]:
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
            for n, p in learner.named_meta_parameters()}


def central_differences(f, tensors: dict[str, torch.Tensor], eps: float = 1e-6
                        ) -> dict[str, torch.Tensor]:
    """Entry-by-entry central differences of the scalar ``f()`` w.r.t. ``tensors`` (in place)."""
    out = {}
    with torch.no_grad():
        for name, t in tensors.items():
            g = torch.zeros_like(t)
            flat, gflat = t.view(-1), g.view(-1)
            for i in range(flat.numel()):
                flat[i] += eps
                plus = f()
                flat[i] -= 2 * eps
                minus = f()
                flat[i] += eps
                gflat[i] = (plus - minus) / (2 * eps)
            out[name] = g
    return out


def directional_difference(f, tensors: dict[str, torch.Tensor],
                           direction: dict[str, torch.Tensor], eps: float = 1e-5) -> float:
    """Derivative of ``f`` along ``direction``: Richardson extrapolation of two central
    differences, which cancels their eps^2 truncation error (large for Adam/RMSprop steps)."""
    coarse = _central_difference(f, tensors, direction, eps)
    fine = _central_difference(f, tensors, direction, eps / 2)
    return (4 * fine - coarse) / 3


def _central_difference(f, tensors: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
                        eps: float) -> float:
    with torch.no_grad():
        for n, t in tensors.items():
            t.add_(eps * direction[n])
        plus = f()
        for n, t in tensors.items():
            t.sub_(2 * eps * direction[n])
        minus = f()
        for n, t in tensors.items():
            t.add_(eps * direction[n])
    return (plus - minus) / (2 * eps)


def assert_directional(grads: dict[str, torch.Tensor], f, tensors: dict[str, torch.Tensor],
                       directions: int = 2, seed: int = 3) -> None:
    """``grads`` agrees with central differences of ``f`` along random directions.

    A random direction mixes every entry, so a wrong entry of ``grads`` shows up (with
    probability one) at the cost of two evaluations instead of two per entry.
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        direction = {n: torch.randn(t.shape, generator=g, dtype=t.dtype)
                     for n, t in tensors.items()}
        numeric = directional_difference(f, tensors, direction)
        analytic = sum((grads[n] * direction[n]).sum() for n in tensors).item()
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 atol: float = 1e-8, rtol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for n in actual:
        torch.testing.assert_close(actual[n], expected[n], atol=atol, rtol=rtol, msg=n)


# -- channels_last -------------------------------------------------------------------------------

def conv_model(in_channels: int, seed: int = 0) -> nn.Module:
    """Two conv -> max-pool -> BatchNorm -> ReLU blocks and a linear head, on 8x8 images."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 3)).to(DTYPE)


def image_tasks(count: int, in_channels: int, seed: int = 3) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)

    def batch(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(3).repeat_interleave(per_class)
        return torch.randn(len(y), in_channels, 8, 8, generator=g, dtype=DTYPE), y

    return [metazoo.Task([batch(2), batch(1)], batch(3)) for _ in range(count)]


def conv_learner(in_channels: int, channels_last: bool, **kwargs) -> MAML:
    return MAML(model=conv_model(in_channels), criterion=F.cross_entropy,
                inner_optimizer=metazoo.SGD(0.3, momentum=0.5), inner_steps=3,
                channels_last=channels_last, **kwargs)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("bn_mode", ["batch", "running"])
@pytest.mark.parametrize("variant", [{}, {"first_order": True}, {"checkpoint": 1},
                                     {"learn_inner_lr": "per_tensor"}])
def test_channels_last_gives_the_default_layouts_meta_gradients(in_channels, bn_mode, variant):
    tasks = image_tasks(2, in_channels)
    results, grads = [], []
    for channels_last in (False, True):
        learner = conv_learner(in_channels, channels_last, bn_mode=bn_mode, **variant)
        grads.append(meta_grads(learner, tasks))
        learner.meta_optimizer.zero_grad(set_to_none=True)
        results.append(learner.meta_backward(tasks))
    assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-10)
    assert math.isclose(results[1].meta_loss, results[0].meta_loss, rel_tol=1e-12)
    assert results[1].inner_losses == pytest.approx(results[0].inner_losses, rel=1e-12)


# The network really runs channels-last: src/metazoo/tests/test_layout.py.


def test_channels_last_adapt_and_evaluate_match_the_default_layout():
    tasks = image_tasks(2, 1)
    adapted, evaluated = [], []
    for channels_last in (False, True):
        learner = conv_learner(1, channels_last, bn_mode="running")
        adapted.append(learner.adapt(tasks[0], steps=4))
        evaluated.append(learner.evaluate(tasks))
    assert_close(adapted[1].params, adapted[0].params, atol=1e-12, rtol=1e-12)
    assert_close(adapted[1].buffers, adapted[0].buffers, atol=1e-12, rtol=1e-12)
    assert math.isclose(evaluated[1].loss, evaluated[0].loss, rel_tol=1e-12)
    assert [loss for loss, _ in evaluated[1].per_task] == pytest.approx(
        [loss for loss, _ in evaluated[0].per_task], rel=1e-12)
    assert [acc for _, acc in evaluated[1].per_task] == [acc for _, acc in evaluated[0].per_task]


def test_channels_last_leaves_other_inputs_alone():
    tasks = regression_tasks(2)
    grads = [meta_grads(MAML(model=regression_model("bn_hidden"), criterion=F.mse_loss,
                             inner_steps=2, channels_last=channels_last), tasks)
             for channels_last in (False, True)]
    assert_close(grads[1], grads[0], atol=0.0, rtol=0.0)


# -- invariants -------------------------------------------------------------------------------


def test_adapt_matches_a_torch_optim_loop():
    model = regression_model()
    tasks = regression_tasks(1, support_batches=2)
    learner = MAML(model=model, criterion=F.mse_loss,
                   inner_optimizer=metazoo.SGD(0.1, momentum=0.9, nesterov=True),
                   inner_steps=3)
    adapted = learner.adapt(tasks[0])

    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    losses = []
    for k in range(3):
        x, y = tasks[0].support[k % 2]
        optimizer.zero_grad()
        loss = F.mse_loss(reference(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert_close(adapted.params, dict(reference.named_parameters()), atol=1e-14, rtol=0)
    assert adapted.inner_losses == pytest.approx(losses, abs=1e-14)
    # adapt never touches the meta-parameters
    assert_close(dict(model.named_parameters()), dict(regression_model().named_parameters()),
                 atol=0, rtol=0)


def test_first_order_meta_gradient_is_query_gradient_at_adapted_params():
    model = regression_model()
    tasks = regression_tasks(3)
    learner = MAML(model=model, criterion=F.mse_loss, first_order=True,
                   inner_optimizer=metazoo.SGD(0.1, momentum=0.9), inner_steps=3)
    grads = meta_grads(learner, tasks)

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for task in tasks:
        phi = {n: p.clone().requires_grad_() for n, p in learner.adapt(task).params.items()}
        out = torch.func.functional_call(model, phi, (task.query[0],))
        query_grads = torch.autograd.grad(F.mse_loss(out, task.query[1]), list(phi.values()))
        for n, g in zip(phi, query_grads, strict=True):
            expected[n] += g / len(tasks)
    assert_close(grads, expected, atol=1e-14, rtol=1e-12)
    # and it is not the second-order gradient
    second = meta_grads(MAML(model=model, criterion=F.mse_loss,
                             inner_optimizer=metazoo.SGD(0.1, momentum=0.9), inner_steps=3),
                        tasks)
    assert max((second[n] - grads[n]).abs().max().item() for n in grads) > 1e-4


@pytest.mark.parametrize("msl", [False, True])
def test_first_order_running_mode_meta_gradient_is_query_gradient_at_adapted_params(msl):
    # The running statistics of a hidden BatchNorm come out of the first-order unroll with a
    # graph into freed inner steps; they must be constants of the query loss, not an error.
    model = regression_model("bn_hidden")
    tasks = regression_tasks(2)
    weights = [0.0, 0.0, 1.0] if msl else None  # MSL path, same objective as the plain one
    learner = MAML(model=model, criterion=F.mse_loss, first_order=True, bn_mode="running",
                   inner_optimizer=metazoo.SGD(0.1, momentum=0.9), inner_steps=3,
                   multi_step_weights=weights)
    grads = meta_grads(learner, tasks)

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for task in tasks:
        adapted = learner.adapt(task)
        phi = {n: p.clone().requires_grad_() for n, p in adapted.params.items()}
        out, _ = metazoo.forward(model, phi, adapted.buffers, task.query[0], bn_mode="running",
                                 training=False)
        query_grads = torch.autograd.grad(F.mse_loss(out, task.query[1]), list(phi.values()))
        for n, g in zip(phi, query_grads, strict=True):
            expected[n] += g / len(tasks)
    assert_close(grads, expected, atol=1e-14, rtol=1e-12)


# -- second-order gradients against finite differences ----------------------------------------


@pytest.mark.parametrize(("bn_mode", "kind"), [("batch", "bn_hidden"), ("running", "bn_hidden")])
def test_meta_gradient_matches_finite_differences_momentum_batchnorm(bn_mode, kind):
    model = regression_model(kind)
    tasks = regression_tasks(2)
    learner = MAML(model=model, criterion=F.mse_loss, bn_mode=bn_mode,
                   inner_optimizer=metazoo.SGD(0.1, momentum=0.9), inner_steps=3)
    grads = meta_grads(learner, tasks)
    params = dict(model.named_parameters())
    assert_directional(grads, lambda: learner.evaluate(tasks, steps=3).loss, params)
    # entry by entry for the BatchNorm parameters and the first layer
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]
    numeric = central_differences(lambda: learner.evaluate(tasks, steps=3).loss,
                                  {n: params[n] for n in names})
    assert_close({n: grads[n] for n in names}, numeric)
    # 0.bias is exactly cancelled by the batch statistics of the next BatchNorm
    assert all(grads[n].abs().max() > 1e-3 for n in grads if not (
        bn_mode == "batch" and n == "0.bias"))

    # The checkpointed unroll gives the same meta-gradient.
    checkpointed = MAML(model=model, criterion=F.mse_loss, bn_mode=bn_mode, checkpoint=1,
                        inner_optimizer=metazoo.SGD(0.1, momentum=0.9), inner_steps=3)
    assert_close(meta_grads(checkpointed, tasks), grads, atol=1e-13, rtol=1e-11)


def test_running_mode_query_uses_the_tasks_running_statistics():
    model = regression_model("bn_input")
    tasks = regression_tasks(2)
    losses = {mode: MAML(model=model, criterion=F.mse_loss, bn_mode=mode,
                         inner_steps=3).evaluate(tasks).loss for mode in ("batch", "running")}
    assert abs(losses["batch"] - losses["running"]) > 1e-3
    adapted = MAML(model=model, criterion=F.mse_loss, bn_mode="running",
                   inner_steps=3).adapt(tasks[0])
    x = tasks[0].support[0][0]
    # three support passes with momentum 0.1 from a fresh mean of 0
    torch.testing.assert_close(adapted.buffers["0.running_mean"], (1 - 0.9**3) * x.mean(0))
    assert model[0].running_mean.abs().max() == 0  # the module's own statistics are untouched


@pytest.mark.parametrize("config", [
    {"inner_optimizer": metazoo.Adam(0.05), "inner_steps": 3},
    {"inner_optimizer": metazoo.SGD(0.1, momentum=0.5), "inner_steps": 4, "checkpoint": 2},
    {"inner_optimizer": metazoo.SGD(0.1), "inner_steps": 2, "inner_grad_clip": 0.05},
    {"inner_optimizer": metazoo.RMSprop(0.01), "inner_steps": 2, "first_order": False},
])
def test_meta_gradient_matches_directional_differences(config):
    model = regression_model("bn_hidden")
    tasks = regression_tasks(2, support_batches=2)
    learner = MAML(model=model, criterion=F.mse_loss, **config)
    grads = meta_grads(learner, tasks)
    assert_directional(grads, lambda: learner.evaluate(tasks).loss,
                       dict(model.named_parameters()))


def test_backward_grad_clip_bounds_the_gradient_through_the_inner_loop():
    model = regression_model()
    tasks = regression_tasks(1)
    kwargs = {"model": model, "criterion": F.mse_loss, "inner_steps": 2,
              "inner_optimizer": metazoo.SGD(0.3)}
    plain = meta_grads(MAML(**kwargs), tasks)
    loose = meta_grads(MAML(**kwargs, backward_grad_clip=1e6), tasks)
    tight = meta_grads(MAML(**kwargs, backward_grad_clip=1e-3), tasks)
    assert_close(loose, plain, atol=1e-14, rtol=0)
    norm = torch.sqrt(sum((g**2).sum() for g in tight.values()))
    assert norm.item() <= 1e-3 + 1e-9


# -- ANIL / frozen parameters -----------------------------------------------------------------


def test_frozen_parameters_get_no_inner_update_but_a_meta_gradient():
    model = regression_model("bn_hidden")
    tasks = regression_tasks(2)
    learner = MAML(model=model, criterion=F.mse_loss, frozen=lambda n: not n.startswith("3."),
                   inner_optimizer=metazoo.SGD(0.2, momentum=0.9), inner_steps=3)
    adapted = learner.adapt(tasks[0])
    for name, p in model.named_parameters():
        if name.startswith("3."):
            assert not torch.equal(adapted.params[name], p)
        else:
            assert torch.equal(adapted.params[name], p), name

    grads = meta_grads(learner, tasks)
    assert_directional(grads, lambda: learner.evaluate(tasks).loss,
                       dict(model.named_parameters()))
    assert grads["0.weight"].abs().max() > 1e-3


def test_frozen_accepts_a_collection_of_names():
    model = regression_model()
    learner = MAML(model=model, criterion=F.mse_loss, frozen=["0.weight", "0.bias"])
    adapted = learner.adapt(regression_tasks(1)[0])
    assert torch.equal(adapted.params["0.weight"], model[0].weight)
    assert not torch.equal(adapted.params["2.weight"], model[2].weight)


# -- learned learning rates (Meta-SGD, MAML++ LSLR) ---------------------------------------------


@pytest.mark.parametrize(("kind", "per_step"), [("per_tensor", True), ("per_element", False)])
def test_learned_learning_rates_get_finite_difference_gradients(kind, per_step):
    model = regression_model()
    tasks = regression_tasks(2)
    learner = MAML(model=model, criterion=F.mse_loss, inner_steps=3, learn_inner_lr=kind,
                   per_step_inner_lr=per_step, frozen=["0.bias"],
                   inner_optimizer=metazoo.SGD(0.1, momentum=0.9))
    rates = {n: p for n, p in learner.named_meta_parameters() if n.startswith("inner_lr.")}
    expected_count = 3 * 3 if per_step else 3  # three adapted tensors (0.bias is frozen)
    assert len(rates) == expected_count
    with torch.no_grad():  # distinct rates, so a mix-up of steps or tensors would show
        for i, r in enumerate(rates.values()):
            r.add_(0.01 * i)
    grads = meta_grads(learner, tasks)
    rate_grads = {n: grads[n] for n in rates}
    if kind == "per_tensor":
        numeric = central_differences(lambda: learner.evaluate(tasks).loss, rates)
        assert_close(rate_grads, numeric)
    else:
        assert_directional(rate_grads, lambda: learner.evaluate(tasks).loss, rates)
    assert all(g.abs().max() > 1e-4 for g in rate_grads.values())
    if kind == "per_element":
        assert rates["inner_lr.0.weight"].shape == model[0].weight.shape

    checkpointed = MAML(model=model, criterion=F.mse_loss, inner_steps=3, learn_inner_lr=kind,
                        per_step_inner_lr=per_step, frozen=["0.bias"], checkpoint=1,
                        inner_optimizer=metazoo.SGD(0.1, momentum=0.9))
    with torch.no_grad():
        for (_, mine), theirs in zip(checkpointed.named_meta_parameters(),
                                     learner.named_meta_parameters(), strict=True):
            mine.copy_(theirs[1])
    assert_close(meta_grads(checkpointed, tasks), grads, atol=1e-13, rtol=1e-11)


def test_learned_rates_are_stepped_saved_and_restored():
    model = regression_model()
    tasks = regression_tasks(2)
    learner = MAML(model=model, criterion=F.mse_loss, learn_inner_lr="per_tensor",
                   inner_optimizer=metazoo.SGD(0.1), meta_optimizer=lambda p: torch.optim.SGD(
                       p, lr=0.5))
    learner.meta_step(tasks)
    rate = dict(learner.named_meta_parameters())["inner_lr.0.weight"]
    assert rate.item() != 0.1
    state = copy.deepcopy(learner.state_dict())
    fresh = MAML(model=regression_model(seed=5), criterion=F.mse_loss,
                 learn_inner_lr="per_tensor", inner_optimizer=metazoo.SGD(0.1))
    fresh.load_state_dict(state)
    assert dict(fresh.named_meta_parameters())["inner_lr.0.weight"].item() == rate.item()
    assert fresh.evaluate(tasks).loss == learner.evaluate(tasks).loss
    other = MAML(model=regression_model(), criterion=F.mse_loss)
    with pytest.raises(ValueError, match="learned inner learning rates"):
        other.load_state_dict(state)


# -- zero-initialised head ----------------------------------------------------------------------


def test_zero_head_starts_each_task_at_zero_and_allows_a_new_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    learner = MAML(model=model, criterion=F.cross_entropy, zero_head=lambda n: n.startswith("2."),
                   inner_optimizer=metazoo.SGD(0.5), inner_steps=1, eval_inner_steps=5)
    assert "2.weight" not in dict(learner.named_meta_parameters())
    tasks = classification_tasks(2, ways=3)

    # One SGD step from a zero head: head = -lr * gradient at the zero head.
    adapted = learner.adapt(tasks[0], steps=1)
    head = {"2.weight": torch.zeros(3, 8, dtype=DTYPE, requires_grad=True),
            "2.bias": torch.zeros(3, dtype=DTYPE, requires_grad=True)}
    x, y = tasks[0].support[0]
    params = {**dict(model.named_parameters()), **head}
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    grad_w, grad_b = torch.autograd.grad(loss, list(head.values()))
    torch.testing.assert_close(adapted.params["2.weight"], -0.5 * grad_w)
    torch.testing.assert_close(adapted.params["2.bias"], -0.5 * grad_b)

    before = model[2].weight.detach().clone()
    result = learner.meta_step(tasks)
    assert result.accuracy is not None
    assert model[2].weight.grad is None and torch.equal(model[2].weight, before)
    assert model[0].weight.grad is not None

    model[2] = nn.Linear(8, 5).to(DTYPE)  # 5-way tasks at test time
    evaluation = learner.evaluate(classification_tasks(3, ways=5))
    assert evaluation.accuracy is not None and evaluation.accuracy > 0.5


# -- multi-step loss (MAML++ MSL) ---------------------------------------------------------------


@pytest.mark.parametrize(("bn_mode", "kind"), [
    ("batch", "bn_hidden"), ("running", "bn_hidden"), ("running", "bn_input")])
def test_multi_step_loss_gradient_matches_finite_differences(bn_mode, kind):
    model = regression_model(kind)
    tasks = regression_tasks(2)
    weights = [0.2, 0.3, 0.5]
    learner = MAML(model=model, criterion=F.mse_loss, bn_mode=bn_mode, inner_steps=3,
                   multi_step_weights=weights, inner_optimizer=metazoo.SGD(0.1, momentum=0.9))
    grads = meta_grads(learner, tasks)

    def objective() -> float:  # the query loss after k steps comes from adapting k steps
        return sum(w * learner.evaluate(tasks, steps=k + 1).loss for k, w in enumerate(weights))

    assert_directional(grads, objective, dict(model.named_parameters()))
    checkpointed = MAML(model=model, criterion=F.mse_loss, bn_mode=bn_mode, inner_steps=3,
                        multi_step_weights=weights, checkpoint=2,
                        inner_optimizer=metazoo.SGD(0.1, momentum=0.9))
    assert_close(meta_grads(checkpointed, tasks), grads, atol=1e-13, rtol=1e-11)
    single = MAML(model=model, criterion=F.mse_loss, bn_mode=bn_mode, inner_steps=3,
                  inner_optimizer=metazoo.SGD(0.1, momentum=0.9))
    assert max((meta_grads(single, tasks)[n] - grads[n]).abs().max() for n in grads) > 1e-4


def test_multi_step_loss_weights_schedule():
    start = multi_step_loss_weights(5, epoch=0, anneal_epochs=10)
    assert start == pytest.approx([0.2] * 5)
    end = multi_step_loss_weights(5, epoch=10, anneal_epochs=10)
    assert end[:4] == pytest.approx([0.006] * 4)
    assert sum(end) == pytest.approx(1.0)
    middle = multi_step_loss_weights(5, epoch=5, anneal_epochs=10)
    assert middle[0] == pytest.approx(0.1) and middle[-1] == pytest.approx(0.6)
    assert multi_step_loss_weights(5, epoch=100, anneal_epochs=10) == pytest.approx(end)


# -- results and evaluation ---------------------------------------------------------------------


def test_meta_step_reports_and_updates():
    model = regression_model()
    tasks = regression_tasks(3)
    learner = MAML(model=model, criterion=F.mse_loss, inner_steps=2, eval_inner_steps=4,
                   inner_optimizer=metazoo.SGD(0.1))
    expected_loss = learner.evaluate(tasks, steps=2).loss
    before = [p.detach().clone() for p in model.parameters()]
    result = learner.meta_step(tasks)
    assert result.num_tasks == 3 and result.accuracy is None
    assert result.meta_loss == pytest.approx(expected_loss, abs=1e-12)
    assert len(result.inner_losses) == 2 and result.inner_loss == result.inner_losses[-1]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    evaluation = learner.evaluate(tasks)
    assert len(evaluation.inner_losses) == 4 and len(evaluation.per_task) == 3
    assert evaluation.loss == pytest.approx(sum(t[0] for t in evaluation.per_task) / 3)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"inner_steps": 0}, "inner_steps must be an int >= 1, got 0"),
    ({"eval_inner_steps": -1}, "eval_inner_steps must be an int >= 1, got -1"),
    ({"inner_steps": 2.0}, "inner_steps must be an int"),
    ({"inner_optimizer": "sgd"}, "inner_optimizer must be a metazoo optimizer"),
    ({"learn_inner_lr": "per_layer"}, "learn_inner_lr must be None, 'per_tensor' or "),
    ({"per_step_inner_lr": True}, "per_step_inner_lr=True needs learn_inner_lr"),
    ({"learn_inner_lr": "per_tensor", "per_step_inner_lr": True, "inner_steps": 2,
      "eval_inner_steps": 5}, "set eval_inner_steps <= inner_steps"),
    ({"learn_inner_lr": "per_tensor", "inner_optimizer": metazoo.SGD(torch.tensor(0.1))},
     "lr, which must then be a float"),
    ({"frozen": ["0.wieght"]}, r"frozen names parameters \['0.wieght'\]"),
    ({"frozen": lambda n: True}, "frozen matches every parameter"),
    ({"frozen": lambda n: False}, "frozen matches none"),
    ({"frozen": "0.weight"}, "wrap a single name"),
    ({"frozen": ["2.weight"], "zero_head": ["2.weight"]}, "both frozen and zero_head"),
    ({"multi_step_weights": [1.0, 1.0]}, r"one weight per inner step \(1\), got 2"),
    ({"multi_step_weights": [-1.0]}, "non-negative"),
    ({"bn_mode": "transductive"}, "bn_mode must be one of"),
    ({"checkpoint": 0}, "checkpoint must be None, True or a segment length"),
    ({"inner_grad_clip": -1.0}, "inner_grad_clip must be None or a positive number, got -1.0"),
    ({"criterion": "mse"}, "criterion must be callable"),
    ({"model": "net"}, "model must be a torch.nn.Module"),
    ({"model": nn.ReLU()}, "has no parameters"),
    ({"meta_optimizer": lambda p: None}, "must return a torch.optim.Optimizer"),
    ({"channels_last": 1}, "channels_last must be a bool, got 1"),
])
def test_constructor_validation(kwargs, message):
    arguments = {"model": regression_model(), "criterion": F.mse_loss, **kwargs}
    with pytest.raises(ValueError, match=message):
        MAML(**arguments)


def test_negative_inner_learning_rate_is_rejected():
    with pytest.raises(ValueError, match=r"lr=-0.1 is outside \[0.0, inf\]"):
        MAML(model=regression_model(), criterion=F.mse_loss, inner_optimizer=metazoo.SGD(-0.1))


def test_call_validation():
    learner = MAML(model=regression_model(), criterion=F.mse_loss, inner_steps=2,
                   learn_inner_lr="per_tensor", per_step_inner_lr=True)
    task = regression_tasks(1)[0]
    with pytest.raises(ValueError, match="steps=3 exceeds the 2 learned per-step"):
        learner.adapt(task, steps=3)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        learner.evaluate([task], steps=0)
    with pytest.raises(ValueError, match="at least one task"):
        learner.meta_backward([])
    with pytest.raises(ValueError, match=r"got a single Task; pass \[task\]"):
        learner.evaluate(task)
