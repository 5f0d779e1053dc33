"""LeapLearner(vectorize=...): the vectorized meta-batch against the per-task loop, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from leap import LeapLearner
from metazoo.testing import (
    assert_same_gradients,
    assert_same_results,
    bn_net,
    meta_gradients,
    small_tasks,
)

DTYPE = torch.float64
TASKS = 4


def tasks(count: int = TASKS, seed: int = 1, support_batches: int = 2) -> list[metazoo.Task]:
    return small_tasks(count, seed, support_batches)


# inner_steps=3 over 2 support batches: the steps wrap around the batches and the last
# segment's end loss is taken on support[3 % 2].
CONFIGS = {
    "batch_sgd": dict(inner_optimizer=metazoo.SGD(0.4)),
    "running_sgd": dict(inner_optimizer=metazoo.SGD(0.4), bn_mode="running"),
    "energy": dict(inner_optimizer=metazoo.SGD(0.4), norm=False),
    "no_loss": dict(inner_optimizer=metazoo.SGD(0.4), loss=False, bn_mode="running"),
    "no_stabilizer": dict(inner_optimizer=metazoo.SGD(0.4), stabilizer=False),
    "energy_no_loss": dict(inner_optimizer=metazoo.SGD(0.4), norm=False, loss=False),
    "momentum_tensor_hyper": dict(
        inner_optimizer=metazoo.SGD(0.1, momentum=torch.tensor(0.9, dtype=DTYPE),
                                    weight_decay=0.01), bn_mode="running"),
    "adam": dict(inner_optimizer=metazoo.Adam(0.05, betas=(0.8, 0.99)), bn_mode="running"),
    "rmsprop_centered": dict(inner_optimizer=metazoo.RMSprop(0.01, momentum=0.5, centered=True)),
    "inner_clip": dict(inner_optimizer=metazoo.SGD(0.4), inner_grad_clip=0.05),
}


def learner(config: str, vectorize=False, **overrides) -> LeapLearner:
    kwargs = {"inner_steps": 3, **CONFIGS[config], **overrides}
    return LeapLearner(model=bn_net(), criterion=F.cross_entropy, vectorize=vectorize, **kwargs)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_vectorized_meta_gradient_and_results_equal_the_loop(config):
    batch = tasks()
    expected, expected_result = meta_gradients(learner(config), batch)
    assert all(g.abs().max() > 0 for g in expected.values())
    for vectorize in (True, 3):  # one vmap, and chunks of 3 + 1 tasks
        got, result = meta_gradients(learner(config, vectorize), batch)
        assert_same_gradients(got, expected)
        assert_same_results(result, expected_result)


@pytest.mark.parametrize("config", ["running_sgd", "adam", "inner_clip"])
def test_mapped_runs_give_the_loops_adapted_parameters_statistics_and_meta_gradients(config):
    """Each task's run inside the map (adapted parameters, BatchNorm running statistics, inner
    losses, the Leap meta-gradient summed over its segments) equals the loop's run."""
    leap = learner(config, bn_mode="running")
    batch = tasks()
    support, query = metazoo.vectorize.stack_tasks(batch)

    def run(support, query):
        result = leap._run(metazoo.Task(support, query), 3, meta=True, vectorized=True)
        return result.params, result.buffers, result.losses, result.meta_grad

    with torch.no_grad():
        params, buffers, losses, meta_grad = metazoo.vectorize.map_tasks(
            run, [support, query], TASKS, 3)
    assert buffers  # running statistics and the batch count travel per task
    for index, task in enumerate(batch):
        loop = leap._run(task, 3, meta=True)
        assert_same_gradients({n: params[n][index] for n in params}, loop.params)
        assert_same_gradients({n: buffers[n][index].to(DTYPE) for n in buffers},
                    {n: b.to(DTYPE) for n, b in loop.buffers.items()})
        torch.testing.assert_close(losses[index], loop.losses, rtol=1e-10, atol=1e-12)
        assert loop.meta_grad is not None
        torch.testing.assert_close(meta_grad[index], loop.meta_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", ["batch_sgd", "running_sgd"])
def test_vectorized_evaluate_equals_the_loop(config):
    batch = tasks(seed=5)
    expected = learner(config).evaluate(batch, steps=2)
    got = learner(config, 3).evaluate(batch, steps=2)
    assert got.loss == pytest.approx(expected.loss, rel=1e-10)
    assert got.accuracy == pytest.approx(expected.accuracy, abs=1e-12)
    assert got.inner_losses == pytest.approx(expected.inner_losses, rel=1e-10)
    for (loss, acc), (loss_loop, acc_loop) in zip(got.per_task, expected.per_task, strict=True):
        assert loss == pytest.approx(loss_loop, rel=1e-10) and acc == acc_loop


def test_regression_without_accuracy_and_meta_steps_follow_the_loop():
    """A criterion without accuracy (mean squared error), and three meta-steps in a row."""
    g = torch.Generator().manual_seed(3)

    def regression_tasks():
        def batch():
            x = torch.randn(5, 3, generator=g, dtype=DTYPE)
            return x, x.sum(1, keepdim=True)
        return [metazoo.Task([batch(), batch()], batch()) for _ in range(TASKS)]

    def build(vectorize):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)
        return LeapLearner(model=net, criterion=F.mse_loss, inner_optimizer=metazoo.SGD(0.1),
                           inner_steps=3, vectorize=vectorize,
                           meta_optimizer=lambda p: torch.optim.Adam(p, lr=0.01))

    loop, vectorized = build(False), build(2)
    for _ in range(3):
        batch = regression_tasks()
        expected, got = loop.meta_step(batch), vectorized.meta_step(batch)
        assert got.accuracy is None and expected.accuracy is None
        assert_same_results(got, expected)
    assert_same_gradients(dict(vectorized.named_meta_parameters()),
                          dict(loop.named_meta_parameters()))


class CountingCriterion:
    """Cross-entropy that counts its calls and those that saw torch.func-transformed targets."""

    def __init__(self) -> None:
        self.calls = 0
        self.batched = 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.batched += torch._C._functorch.is_functorch_wrapped_tensor(target)
        return F.cross_entropy(output, target)


@pytest.mark.parametrize("vectorize,calls", [(False, TASKS * 5), (True, 5), (2, 10),
                                              ("auto", TASKS * 5)])
def test_the_vectorized_path_runs_once_per_chunk_and_never_falls_back(vectorize, calls):
    """3 inner steps + the last segment's end loss + 1 query pass = 5 criterion calls per task
    in the loop, per chunk when vectorized; a silent fallback to the loop would make 20.
    ``"auto"`` runs the loop on CPU."""
    criterion = CountingCriterion()
    leap = LeapLearner(model=bn_net(), criterion=criterion, inner_optimizer=metazoo.SGD(0.4),
                       inner_steps=3, vectorize=vectorize)
    leap.meta_backward(tasks())
    assert criterion.calls == calls
    assert criterion.batched == (0 if calls == TASKS * 5 else calls)
    criterion.calls = criterion.batched = 0
    leap.evaluate(tasks(), steps=2)  # 2 inner steps + the query pass
    assert criterion.calls == (TASKS * 3 if calls == TASKS * 5 else calls // 5 * 3)


def test_vectorized_fault_check_is_one_transfer_and_names_the_task_and_step(monkeypatch):
    # The loop checks the whole meta-batch at once too (metazoo.TaskFaults): task_fault, one
    # transfer per task, only names a fault.
    batch = tasks()
    checks = []
    original = metazoo.task_fault
    monkeypatch.setattr(metazoo, "task_fault",
                        lambda *args: checks.append(args[0]) or original(*args))
    learner("batch_sgd").meta_backward(batch)
    assert checks == []
    learner("batch_sgd", True).meta_backward(batch)
    assert checks == []

    bad = list(batch)
    bad[2] = metazoo.Task([bad[2].support[0], (bad[2].support[1][0] * float("nan"),
                                               bad[2].support[1][1])], bad[2].query)
    with pytest.raises(metazoo.NonFiniteError) as loop_error:
        learner("batch_sgd").meta_backward(bad)
    leap = learner("batch_sgd", True)
    with pytest.raises(metazoo.NonFiniteError) as error:
        leap.meta_backward(bad)
    assert (error.value.task, error.value.inner_step, error.value.where) == (2, 1, "inner")
    assert str(error.value) == str(loop_error.value)
    assert all(p.grad is None for p in leap.meta_parameters())


def test_vectorized_skip_leaves_non_finite_tasks_out_exactly():
    bad = tasks()
    bad[1] = metazoo.Task(bad[1].support, (bad[1].query[0] * float("inf"), bad[1].query[1]))
    expected, expected_result = meta_gradients(learner("running_sgd", on_nonfinite="skip"), bad)
    got, result = meta_gradients(learner("running_sgd", 3, on_nonfinite="skip"), bad)
    assert result.skipped_tasks == 1
    assert_same_gradients(got, expected)
    assert_same_results(result, expected_result)
    assert all(torch.isfinite(g).all() for g in got.values())

    all_bad = [metazoo.Task(t.support, (t.query[0] * float("nan"), t.query[1])) for t in bad]
    leap = learner("running_sgd", True, on_nonfinite="skip")
    result = leap.meta_backward(all_bad)
    assert result.skipped_tasks == TASKS and result.inner_losses == ()
    assert all(p.grad is None for p in leap.meta_parameters())


def test_requires_grad_false_parameters_stay_fixed_when_vectorized():
    grads = []
    for vectorize in (False, True):
        net = bn_net()
        net[1].weight.requires_grad_(False)
        leap = LeapLearner(model=net, criterion=F.cross_entropy,
                           inner_optimizer=metazoo.SGD(0.4), inner_steps=2, vectorize=vectorize)
        leap.meta_backward(tasks())
        assert net[1].weight.grad is None
        grads.append({n: p.grad for n, p in leap.named_meta_parameters()})
    assert "1.weight" not in grads[0]
    assert_same_gradients(grads[1], grads[0])


@pytest.mark.parametrize("vectorize", [True, 4, "auto"])
def test_channels_last_raises_and_bad_values_and_shapes_raise(vectorize):
    with pytest.raises(ValueError, match=rf"vectorize={vectorize!r} does not support "
                                         rf"channels_last; .*vectorize=False"):
        learner("batch_sgd", vectorize, channels_last=True)
    for bad in (0, "always", 2.0):
        with pytest.raises(ValueError, match="vectorize must be False"):
            learner("batch_sgd", bad)
    batch = tasks()
    odd = [*batch[:3], metazoo.Task(batch[3].support, (batch[3].query[0][:6],
                                                       batch[3].query[1][:6]))]
    if vectorize != "auto":
        with pytest.raises(ValueError, match=r"task 3 query\[0\] has shape.*vectorize=False"):
            learner("batch_sgd", vectorize).meta_backward(odd)
    learner("batch_sgd", False).meta_backward(odd)  # the loop takes them
