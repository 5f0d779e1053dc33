"""WarpGrad(vectorize=...): adaptation mapped over tasks, replay mapped over states.

Every comparison is float64 against the per-task loop (``vectorize=False``) on the same model,
tasks and replay seed: meta-gradients of every group, recorded buffer contents, adapted
parameters and BatchNorm statistics, results and faults.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import metazoo
from metazoo import NonFiniteError, Task
from warpgrad import (
    DualUpdater,
    OptimizerParameters,
    ReplayBuffer,
    SimplifiedLeap,
    Warp,
    WarpGrad,
    WarpObjective,
)

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _tasks(make_tasks, num_tasks=3, support=2):
    return [Task(support=batches[:support], query=batches[support])
            for batches in make_tasks(num_tasks=num_tasks, batches=support + 1)]


def _learner(model, *, vectorize=False, momentum=0.0, trainable=False, buffer=None,
             bn_mode="batch", on_nonfinite="raise", inner_steps=3, **updater):
    params = OptimizerParameters(trainable=trainable, default_lr=0.3, default_momentum=momentum)
    warp = Warp(model, model.adapt_modules(), model.warp_modules(),
                DualUpdater(F.cross_entropy, seed=3, **updater), buffer=buffer,
                optimizer_parameters=params)
    return WarpGrad(warp, inner_steps=inner_steps, vectorize=vectorize, bn_mode=bn_mode,
                    on_nonfinite=on_nonfinite,
                    meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def _recording(learner):
    """Captures the buffer's contents when the replay starts (the buffer is cleared after)."""
    seen = []
    accumulate = learner.updater.accumulate

    def capture(warp, **kwargs):
        buffer = warp.buffer
        seen.append([([(s.step, s.params, s.momentum) for s in buffer.states(slot)],
                      buffer.terminal(slot).params) for slot in buffer.slots()])
        return accumulate(warp, **kwargs)

    learner.updater.accumulate = capture
    return seen


def _assert_same_buffers(got, expected):
    assert len(got) == len(expected)
    for (states, terminal), (expected_states, expected_terminal) in zip(got, expected,
                                                                        strict=True):
        assert [s[0] for s in states] == [s[0] for s in expected_states]
        for (_, params, momentum), (_, expected_params, expected_momentum) in zip(
                states, expected_states, strict=True):
            assert params.keys() == expected_params.keys()
            for n in params:
                torch.testing.assert_close(params[n], expected_params[n], **TOL)
            assert (momentum is None) == (expected_momentum is None)
            for n in momentum or {}:
                torch.testing.assert_close(momentum[n], expected_momentum[n], **TOL)
        for n in terminal:
            torch.testing.assert_close(terminal[n], expected_terminal[n], **TOL)


def _meta_backward(learner, tasks):
    learner.meta_optimizer.zero_grad(set_to_none=True)
    result = learner.meta_backward(tasks)
    return result, {n: p.grad.clone() for n, p in learner.named_meta_parameters()
                    if p.grad is not None}


CONFIGS = {
    "stop_gradient": {},
    "exact_leap_learned_momentum": {"warp_objective": "exact", "init_objective": "leap",
                                    "momentum": 0.5, "trainable": True},
    "approx_no_init": {"warp_objective": "approx", "init_objective": "none"},
    "stop_gradient_learned_momentum": {"momentum": 0.9, "trainable": True},
    "no_warp_objective": {"warp_objective": "none", "init_objective": "leap"},
    "disk_buffer": {"buffer": "disk", "trainable": True},
    "reservoir_buffer": {"buffer": "reservoir", "momentum": 0.5},
}


def _buffer(kind, tmp_path):
    return {"memory": None, "disk": lambda: ReplayBuffer(inmem=False, tmpdir=tmp_path),
            "reservoir": lambda: ReplayBuffer(max_states=2, seed=5)}[kind]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_meta_backward_equals_the_loop(make_model, make_tasks, tmp_path, config):
    options = dict(CONFIGS[config])
    buffer = _buffer(options.pop("buffer", "memory"), tmp_path)
    tasks = _tasks(make_tasks)
    model = make_model()
    loop = _learner(copy.deepcopy(model), buffer=buffer and buffer(), **options)
    loop_buffers = _recording(loop)
    expected, expected_grads = _meta_backward(loop, tasks)
    assert expected_grads
    for vectorize in (True, 2, 1):  # all tasks at once, chunks of 2 (2 + 1), one at a time
        learner = _learner(copy.deepcopy(model), vectorize=vectorize,
                           buffer=buffer and buffer(), **options)
        buffers = _recording(learner)
        result, grads = _meta_backward(learner, tasks)
        assert grads.keys() == expected_grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, expected_grads[n], **TOL, msg=f"{vectorize} {n}")
        _assert_same_buffers(buffers[0], loop_buffers[0])
        assert result.meta_loss == pytest.approx(expected.meta_loss, rel=1e-10)
        assert result.accuracy == pytest.approx(expected.accuracy, rel=1e-10)
        assert result.inner_losses == pytest.approx(expected.inner_losses, rel=1e-10)
        assert (result.num_tasks, result.skipped_tasks) == (3, 0)
        assert not learner.warp.buffer.slots()


def test_meta_steps_follow_the_loop(make_model, make_tasks):
    """Two meta-steps in a row: the updated meta-parameters stay equal."""
    model = make_model()
    loop = _learner(copy.deepcopy(model), trainable=True, momentum=0.5)
    vectorized = _learner(copy.deepcopy(model), trainable=True, momentum=0.5, vectorize=2)
    for seed in (1, 2):
        tasks = [Task(support=batches[:2], query=batches[2])
                 for batches in make_tasks(num_tasks=3, batches=3, seed=seed)]
        loop.meta_step(tasks)
        vectorized.meta_step(tasks)
    for (n, p), q in zip(vectorized.named_meta_parameters(), loop.meta_parameters(),
                         strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=n)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_adaptation_and_evaluate_equal_the_loop(make_model, make_tasks, bn_mode):
    tasks = _tasks(make_tasks)
    learner = _learner(make_model(), vectorize=True, momentum=0.5, bn_mode=bn_mode)
    adaptation, fixed = learner._adapt_vectorized(tasks, 4, chunk=2)
    for index, task in enumerate(tasks):
        adapted = learner.adapt(task, steps=4)  # one task: the loop
        for n, t in adaptation.adapted.items():
            torch.testing.assert_close(t[index], adapted.params[n], **TOL, msg=n)
        for n, t in fixed.items():
            assert torch.equal(t, adapted.params[n])
        assert adaptation.buffers.keys() == adapted.buffers.keys()
        if bn_mode == "running":
            assert {"bn.running_mean", "bn.running_var"} <= adaptation.buffers.keys()
        for n, b in adaptation.buffers.items():
            torch.testing.assert_close(b[index], adapted.buffers[n], **TOL, msg=n)
        assert adaptation.inner_losses[index].tolist() == pytest.approx(adapted.inner_losses,
                                                                          rel=1e-10)
    loop = _learner(make_model(), momentum=0.5, bn_mode=bn_mode)
    expected = loop.evaluate(tasks, steps=4)
    result = learner.evaluate(tasks, steps=4)
    assert result.loss == pytest.approx(expected.loss, rel=1e-10)
    assert result.accuracy == pytest.approx(expected.accuracy, rel=1e-10)
    assert result.inner_losses == pytest.approx(expected.inner_losses, rel=1e-10)
    assert [r[0] for r in result.per_task] == pytest.approx([r[0] for r in expected.per_task],
                                                            rel=1e-10)
    assert [r[1] for r in result.per_task] == [r[1] for r in expected.per_task]


def test_vectorized_path_never_falls_back_to_the_loop(make_model, make_tasks, monkeypatch):
    """The loop's per-task adaptation and per-state replay must not run at all."""
    learner = _learner(make_model(), vectorize=True, warp_objective="exact")
    maps = []
    original = metazoo.vectorize.map_tasks

    def counting(*args, **kwargs):
        maps.append(args[2:])
        return original(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the loop ran")

    monkeypatch.setattr(metazoo.vectorize, "map_tasks", counting)
    monkeypatch.setattr(WarpGrad, "_adapt", refuse)
    monkeypatch.setattr(WarpObjective, "loss", refuse)
    learner.meta_step(_tasks(make_tasks))
    learner.evaluate(_tasks(make_tasks))
    assert maps == [(3, 3), (3, 3)]  # (tasks, chunk): one vmap call each


def test_auto_loops_on_cpu(make_model, make_tasks, monkeypatch):
    learner = _learner(make_model(), vectorize="auto")

    def refuse(*args, **kwargs):
        raise AssertionError("vectorized on a CPU")

    monkeypatch.setattr(WarpGrad, "_adapt_vectorized", refuse)
    learner.meta_step(_tasks(make_tasks))
    assert learner._chunk(3) is None


@pytest.mark.parametrize(("batch", "where", "first"), [(1, "inner", 1), (None, "query", None)])
def test_nonfinite_raises_like_the_loop(make_model, make_tasks, batch, where, first):
    tasks = _tasks(make_tasks)
    support = [(x.clone(), y) for x, y in tasks[1].support]
    query = (tasks[1].query[0].clone(), tasks[1].query[1])
    (query[0] if batch is None else support[batch][0])[2, 1] = float("nan")
    poisoned = [tasks[0], Task(support, query), tasks[2]]
    with pytest.raises(NonFiniteError) as loop_info:
        _learner(make_model()).meta_step(poisoned)
    learner = _learner(make_model(), vectorize=True)
    before = [p.detach().clone() for p in learner.meta_parameters()]
    with pytest.raises(NonFiniteError, match="task 1 of the meta-batch") as info:
        learner.meta_step(poisoned)
    assert (info.value.task, info.value.where, info.value.inner_step) == (1, where, first)
    assert str(info.value) == str(loop_info.value)
    assert all(torch.equal(p, q) for p, q in zip(learner.meta_parameters(), before,
                                                 strict=True))
    assert not learner.warp.buffer.slots()
    # Skip mode: the same meta-gradients as the loop, which drops the task.
    model = make_model()
    loop = _learner(copy.deepcopy(model), on_nonfinite="skip", trainable=True)
    vectorized = _learner(copy.deepcopy(model), on_nonfinite="skip", trainable=True,
                          vectorize=2)
    expected, expected_grads = _meta_backward(loop, poisoned)
    result, grads = _meta_backward(vectorized, poisoned)
    assert (result.skipped_tasks, expected.skipped_tasks) == (1, 1)
    assert result.meta_loss == pytest.approx(expected.meta_loss, rel=1e-10)
    assert grads.keys() == expected_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, expected_grads[n], **TOL, msg=n)


def test_unsupported_options_raise(make_model, make_tasks):
    model = make_model()
    with pytest.raises(ValueError, match="vectorize must be False"):
        _learner(model, vectorize="yes")
    with pytest.raises(ValueError, match="vectorize=True does not support channels_last; pass "
                                         "channels_last=False"):
        warp = _learner(make_model()).warp
        WarpGrad(warp, inner_steps=1, vectorize=True, channels_last=True)
    with pytest.raises(ValueError, match="vectorize=2 does not support the updater's "
                                         "bn_mode='running'"):
        WarpGrad(Warp(model, model.adapt_modules(), model.warp_modules(),
                      DualUpdater(F.cross_entropy, bn_mode="running")),
                 inner_steps=1, vectorize=2)
    with pytest.raises(ValueError, match="vectorize=True must be an integer >= 0"):
        DualUpdater(F.cross_entropy, vectorize=True)
    learner = _learner(make_model(), vectorize=True)
    tasks = _tasks(make_tasks)
    short = Task([tasks[1].support[0], (tasks[1].support[1][0][:4],
                                        tasks[1].support[1][1][:4])], tasks[1].query)
    with pytest.raises(ValueError, match=r"task 1 support\[1\]\[0\] has shape \(4, 3\)"):
        learner.meta_step([tasks[0], short])
    uneven = Task([tasks[0].support[0], short.support[1]], tasks[0].query)
    with pytest.raises(ValueError, match="support batches of one shape"):
        learner.meta_step([uneven, uneven])
    assert not learner.warp.buffer.slots()


def test_bad_labels_are_named_as_in_the_loop(make_model, make_tasks):
    """Under vmap the criterion cannot inspect the labels; the error is diagnosed outside."""
    learner = _learner(make_model(), vectorize=True)
    tasks = _tasks(make_tasks, num_tasks=2)
    bad = Task([(x, y + 1) for x, y in tasks[1].support], tasks[1].query)
    with pytest.raises(ValueError, match=r"label 3 but the model outputs 3 classes"):
        learner.meta_step([tasks[0], bad])
    assert not learner.warp.buffer.slots()
    with pytest.raises(ValueError, match=r"label -1 but the model outputs 3 classes"):
        learner.evaluate([tasks[0], Task(tasks[1].support,
                                         (tasks[1].query[0], tasks[1].query[1] - 1))])


@pytest.mark.parametrize("vectorize", [False, 2])
def test_fault_check_is_one_transfer_for_the_meta_batch(make_model, make_tasks, vectorize):
    """The loop and the vectorized path read every task's fault flag at once, with the means
    (one host transfer for meta_backward); meta_step reads them with the meta-optimizer step's
    finite check (one for the whole meta-step)."""
    from metazoo.testing import count_host_syncs

    learner = _learner(make_model(), vectorize=vectorize)
    learner.meta_step(_tasks(make_tasks))  # warm-up
    learner.meta_optimizer.zero_grad()
    with count_host_syncs() as backward:
        learner.meta_backward(_tasks(make_tasks))
    with count_host_syncs() as step:
        learner.meta_step(_tasks(make_tasks))
    assert (backward.count, step.count) == (1, 1)


class _MatmulCounter(TorchDispatchMode):
    """Counts the matrix products dispatched (one per linear layer and pass, whatever the number
    of tasks or states a vmap call maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
                    torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_batched_replay_is_one_call_for_all_states_and_never_the_per_state_loop(
        make_model, make_tasks, monkeypatch):
    """The replay over every recorded state is one flat stack and one vmap call, and the init
    objective one flat computation: nothing runs per state (or per parameter tensor)."""
    calls = {"batched_loss": 0, "flat_states": 0, "flat_gradient": 0}

    def spy(cls, name):
        original = getattr(cls, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    def refuse(*args, **kwargs):
        raise AssertionError("the per-state (or per-tensor) path ran")

    spy(WarpObjective, "batched_loss")
    spy(ReplayBuffer, "flat_states")
    spy(SimplifiedLeap, "flat_gradient")
    monkeypatch.setattr(WarpObjective, "loss", refuse)
    monkeypatch.setattr(ReplayBuffer, "state", refuse)
    monkeypatch.setattr(ReplayBuffer, "trajectory", refuse)
    monkeypatch.setattr(SimplifiedLeap, "gradient", refuse)
    monkeypatch.setattr(ReplayBuffer, "update", refuse)
    results = []
    original = DualUpdater.accumulate

    def accumulate(self, warp, **kwargs):
        results.append(original(self, warp, **kwargs))
        return results[-1]

    monkeypatch.setattr(DualUpdater, "accumulate", accumulate)
    products = []
    for num_tasks in (2, 4):
        learner = _learner(make_model(), vectorize=True)
        tasks = _tasks(make_tasks, num_tasks=num_tasks)
        with _MatmulCounter() as counter:
            learner.meta_backward(tasks)
        products.append(counter.count)
    assert calls == {"batched_loss": 2, "flat_states": 2, "flat_gradient": 2}
    assert [(r.num_points, r.replay_calls) for r in results] == [(6, 1), (12, 1)]
    # Twice the tasks and states, the same matrix products: nothing is looped over.
    assert products[0] == products[1] > 0
    monkeypatch.undo()
    monkeypatch.setattr(DualUpdater, "accumulate", accumulate)
    _learner(make_model()).meta_backward(_tasks(make_tasks))
    assert results[-1].replay_calls == 9  # the loop: one call per state (3 tasks x 3 steps)


class _ConvWarpNet(torch.nn.Module):
    """A small Omniglot-like net: [conv, BatchNorm2d, ReLU, warp conv, max-pool] x 2, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.warp1 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(3)
        self.warp2 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(self.warp1(torch.relu(self.bn1(self.conv1(x)))), 2)
        x = F.max_pool2d(self.warp2(torch.relu(self.bn2(self.conv2(x)))), 2)
        return self.head(x.flatten(1))

    def adapt_modules(self):
        return [self.conv1, self.bn1, self.conv2, self.bn2, self.head]

    def warp_modules(self):
        return [self.warp1, self.warp2]


@pytest.mark.parametrize("mode", ["stop_gradient", "exact"])
def test_conv_batchnorm2d_net_equals_the_loop(mode):
    """The replay normalises with metazoo's closed-form BatchNorm under vmap: exact for a conv
    net with BatchNorm2d too, warp gradients through the normalisation included."""
    torch.manual_seed(0)
    model = _ConvWarpNet().double()
    g = torch.Generator().manual_seed(3)

    def batch():
        return (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=g))

    tasks = [Task([batch(), batch()], batch()) for _ in range(3)]
    grads = []
    for vectorize in (False, True):
        learner = _learner(copy.deepcopy(model), vectorize=vectorize, momentum=0.5,
                           trainable=True, warp_objective=mode)
        grads.append(_meta_backward(learner, tasks)[1])
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("warp.") for n in grads[0])
    for n, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][n], **TOL, msg=n)


def test_learning_rates_read_to_the_host_follow_a_loaded_state(make_model, make_tasks):
    """The vectorized adaptation reads fixed learning rates to the host once; loading other
    values (or writing them in place) must be seen by the next meta-step."""
    tasks = _tasks(make_tasks)
    loop, vectorized = _learner(make_model()), _learner(make_model(), vectorize=True)
    vectorized.meta_backward(tasks)  # caches the learning rates
    for change in ("load", "in_place"):
        state = loop.warp.optimizer_parameter_container.state_dict()
        state = {n: t - 0.5 for n, t in state.items()}
        for learner in (loop, vectorized):
            container = learner.warp.optimizer_parameter_container
            if change == "load":
                container.load_state_dict(state)
            else:
                with torch.no_grad():
                    for p in container.parameters():
                        p.sub_(0.25)
        expected, expected_grads = _meta_backward(loop, tasks)
        result, grads = _meta_backward(vectorized, tasks)
        assert result.inner_losses == pytest.approx(expected.inner_losses, rel=1e-10)
        for n, g in grads.items():
            torch.testing.assert_close(g, expected_grads[n], **TOL, msg=n)
