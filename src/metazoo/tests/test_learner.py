"""The MetaLearner interface, task validation and typed results."""

from collections.abc import Sequence

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metazoo


class _TinyMAML(metazoo.MetaLearner):
    """A minimal second-order MAML, enough to exercise the shared meta_step machinery."""

    def __init__(self, model: nn.Module, *, steps: int = 2) -> None:
        self.model = model
        self.steps = steps
        self.meta_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.loss_fn = metazoo.make_loss_fn(model, F.cross_entropy)

    def _run(self, task: metazoo.Task, steps: int | None):
        result = metazoo.unroll(self.loss_fn, dict(self.model.named_parameters()),
                                metazoo.SGD(0.5), task.support, steps=steps or self.steps)
        output, _ = metazoo.forward(self.model, result.params, {}, task.query[0])
        return result, output

    def adapt(self, task, *, steps=None):
        with torch.no_grad():
            result, _ = self._run(task, steps)
        return metazoo.Adapted(result.params, result.buffers, tuple(result.losses.tolist()))

    def meta_backward(self, tasks: Sequence[metazoo.Task]) -> metazoo.MetaStepResult:
        per_task = []
        for task in tasks:
            result, output = self._run(task, None)
            loss = F.cross_entropy(output, task.query[1])
            (loss / len(tasks)).backward()
            per_task.append((loss, metazoo.accuracy(output, task.query[1]), result.losses))
        meta_loss, acc, curve = metazoo.mean_results(per_task)
        return metazoo.MetaStepResult(meta_loss, curve[-1], acc, curve, len(tasks), 0.0)

    def evaluate(self, tasks, *, steps=None):
        raise NotImplementedError


def _task(seed: int) -> metazoo.Task:
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    return metazoo.Task([(x, torch.randint(0, 2, (6,), generator=g))],
                        (xq, torch.randint(0, 2, (4,), generator=g)))


def _learner() -> _TinyMAML:
    torch.manual_seed(0)
    return _TinyMAML(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))


def test_meta_step_applies_the_mean_meta_gradient_and_calls_the_hook():
    learner = _learner()
    tasks = [_task(0), _task(1)]
    before = [p.detach().clone() for p in learner.model.parameters()]
    hooked = []
    result = learner.meta_step(tasks, grad_hook=lambda lrn, _: hooked.append(
        [p.grad.clone() for p in lrn.meta_parameters()]))
    # The hook saw the mean of the per-task meta-gradients, computed here independently.
    reference = _learner()
    expected = [torch.zeros_like(p) for p in reference.model.parameters()]
    for task in tasks:
        reference.model.zero_grad()
        _, out = reference._run(task, None)
        F.cross_entropy(out, task.query[1]).backward()
        for e, p in zip(expected, reference.model.parameters()):
            e += p.grad / len(tasks)
    for seen, e in zip(hooked[0], expected):
        torch.testing.assert_close(seen, e, rtol=0, atol=1e-14)
    for p, b, e in zip(learner.model.parameters(), before, expected):
        torch.testing.assert_close(p.detach(), b - 0.1 * e, rtol=0, atol=1e-14)
    assert isinstance(result, metazoo.MetaStepResult)
    assert result.num_tasks == 2 and len(result.inner_losses) == 2
    assert 0.0 <= result.accuracy <= 1.0 and result.seconds > 0


def test_meta_step_does_not_accumulate_across_calls():
    learner = _learner()
    learner.meta_step([_task(0)])
    grads_first = [p.grad.clone() for p in learner.meta_parameters()]
    learner2 = _learner()
    learner2.meta_step([_task(0)])
    learner2.meta_step([_task(0)])
    learner.meta_step([_task(0)])
    for a, b in zip(learner.meta_parameters(), learner2.meta_parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert any((a - b.grad).abs().sum() > 0 for a, b in
               zip(grads_first, learner.meta_parameters()))


def test_state_dict_round_trip_and_mismatch():
    learner = _learner()
    learner.meta_step([_task(0)])
    state = learner.state_dict()
    other = _learner()
    other.load_state_dict(state)
    for a, b in zip(learner.model.parameters(), other.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    wrong = _TinyMAML(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 2)))
    with pytest.raises((ValueError, RuntimeError), match="3"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['meta_optimizer'\]"):
        other.load_state_dict({"model": state["model"]})


def test_meta_step_needs_tasks_unless_a_hook_joins_a_collective():
    with pytest.raises(ValueError, match="at least one task"):
        _learner().meta_step([])
    learner = _learner()
    calls = []
    result = learner.meta_step([], grad_hook=lambda lrn, res: calls.append((lrn, res)))
    assert calls[0][0] is learner and calls[0][1].num_tasks == 0 and result.num_tasks == 0


def test_meta_step_reads_a_generator_of_tasks_and_refuses_a_single_task():
    from_list, from_generator = _learner(), _learner()
    expected = from_list.meta_step([_task(0), _task(1)])
    got = from_generator.meta_step(_task(i) for i in range(2))
    assert got.num_tasks == 2 and got.meta_loss == expected.meta_loss
    for a, b in zip(from_list.meta_parameters(), from_generator.meta_parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"got a single Task; pass \[task\]"):
        _learner().meta_step(_task(0))


def test_task_validation():
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"wrap a single batch as \[batch\]"):
        metazoo.Task((x, y), (x, y))
    with pytest.raises(ValueError, match="4 inputs but 3 targets"):
        metazoo.Task([(x, y[:3])], (x, y))
    with pytest.raises(ValueError, match="at least one batch"):
        metazoo.Task([], (x, y))
    task = metazoo.Task([(x, y)], (x, y)).to("cpu")
    assert task.support[0][0].device.type == "cpu"


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert metazoo.accuracy(logits, torch.tensor([0, 1, 1])).item() == pytest.approx(2 / 3)
    assert metazoo.accuracy(logits[:, :1], torch.randn(3, 1)) is None  # regression targets
