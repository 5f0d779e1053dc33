"""Faults shared by this package's learners (``_learner.TaskGradients``): NaN/inf losses stop
with the task and inner step or skip the task exactly, bad labels and parameter dicts fail with
clear messages, tampered checkpoints are refused, and runs are bitwise reproducible."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, Reptile, iMAML

DTYPE = torch.float64

LEARNERS = {
    "maml": lambda m, **kw: MAML(model=m, criterion=F.cross_entropy, inner_steps=3,
                                 inner_optimizer=metazoo.SGD(0.3), **kw),
    "fomaml": lambda m, **kw: MAML(model=m, criterion=F.cross_entropy, inner_steps=3,
                                   first_order=True, inner_optimizer=metazoo.SGD(0.3), **kw),
    "imaml": lambda m, **kw: iMAML(model=m, criterion=F.cross_entropy, inner_steps=3,
                                   cg_steps=2, inner_optimizer=metazoo.SGD(0.3), **kw),
    "reptile": lambda m, **kw: Reptile(model=m, criterion=F.cross_entropy, inner_steps=3,
                                       inner_optimizer=metazoo.SGD(0.3), **kw),
}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def tasks(count: int = 3, seed: int = 1) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(6, 4, generator=g, dtype=DTYPE), torch.arange(6) % 3

    return [metazoo.Task([batch() for _ in range(3)], batch()) for _ in range(count)]


def poisoned(task: metazoo.Task, *, step: int | None, value: float = float("nan")
             ) -> metazoo.Task:
    """A copy of ``task`` with one input entry set to ``value`` in support batch ``step``
    (``None``: in the query batch)."""
    support = [(x.clone(), y) for x, y in task.support]
    query = (task.query[0].clone(), task.query[1])
    (query[0] if step is None else support[step][0])[2, 1] = value
    return metazoo.Task(support, query)


def snapshot(learner: metazoo.MetaLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.named_meta_parameters()}


@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize(("step", "value", "where", "first"), [
    (1, float("nan"), "inner", 1),
    # An infinite input saturates tanh: the loss at step 1 is finite but its gradient is
    # 0 * inf = NaN, so the first non-finite loss is that of step 2.
    (1, float("inf"), "inner", 2),
    (None, float("nan"), "query", None)])
def test_nonfinite_loss_raises_with_task_and_step_and_leaves_parameters(name, step, value,
                                                                         where, first):
    learner = LEARNERS[name](model())
    batch = tasks()
    batch[1] = poisoned(batch[1], step=step, value=value)
    before = snapshot(learner)
    with pytest.raises(metazoo.NonFiniteError, match="task 1 of the meta-batch") as info:
        learner.meta_step(batch)
    assert (info.value.task, info.value.where) == (1, where)
    assert info.value.inner_step == first
    if first is not None:
        assert f"inner step {first}" in str(info.value)
    assert "on_nonfinite='skip'" in str(info.value)
    for n, p in learner.named_meta_parameters():
        assert torch.equal(p, before[n]), n
    assert not learner.meta_optimizer.state  # the optimizer never stepped
    # The error names the meta-step once the experiment loop adds it, and survives pickling.
    named = info.value.with_meta_step(17)
    assert "meta-step 17" in str(named) and named.meta_step == 17
    assert str(pickle.loads(pickle.dumps(named))) == str(named)


@pytest.mark.parametrize("name", list(LEARNERS))
def test_skip_mode_drops_the_task_from_the_mean_exactly(name):
    good = tasks()
    bad = [good[0], poisoned(good[1], step=1), good[2]]
    skipping = LEARNERS[name](model(), on_nonfinite="skip")
    reference = LEARNERS[name](model())
    result = skipping.meta_step(bad)
    expected = reference.meta_step([good[0], good[2]])
    assert result.skipped_tasks == 1 and result.num_tasks == 3
    assert expected.skipped_tasks == 0
    assert result.meta_loss == pytest.approx(expected.meta_loss, rel=1e-12)
    assert result.inner_losses == pytest.approx(expected.inner_losses, rel=1e-12)
    for (n, p), q in zip(skipping.named_meta_parameters(), reference.meta_parameters(),
                         strict=True):
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_skip_mode_keeps_earlier_gradients_and_reports_an_all_skipped_batch():
    learner = LEARNERS["maml"](model(), on_nonfinite="skip")
    good = tasks()
    # meta_backward accumulates into .grad like backward: what was there stays.
    learner.meta_backward([good[0]])
    first = [p.grad.clone() for p in learner.meta_parameters()]
    result = learner.meta_backward([good[1], poisoned(good[2], step=0)])
    solo = LEARNERS["maml"](model())
    solo.meta_backward([good[1]])
    for p, g, s in zip(learner.meta_parameters(), first, solo.meta_parameters(), strict=True):
        torch.testing.assert_close(p.grad, g + s.grad, rtol=1e-12, atol=1e-14)
    assert result.skipped_tasks == 1
    before = snapshot(learner)
    learner.meta_optimizer.zero_grad()
    none = learner.meta_step([poisoned(good[0], step=0)])
    assert none.skipped_tasks == 1 and none.accuracy is None
    assert none.meta_loss != none.meta_loss  # NaN: nothing to average
    for n, p in learner.named_meta_parameters():
        assert torch.equal(p, before[n]), n


def test_on_nonfinite_is_validated():
    for build in LEARNERS.values():
        with pytest.raises(ValueError, match=r"on_nonfinite must be one of \['raise', 'skip'\], "
                                             r"got 'ignore'"):
            build(model(), on_nonfinite="ignore")


@pytest.mark.parametrize("name", list(LEARNERS))
def test_labels_outside_the_models_classes_fail_clearly(name):
    learner = LEARNERS[name](model())
    task = tasks(1)[0]
    x, y = task.support[0]
    bad = metazoo.Task([(x, torch.where(y == 2, 3, y))], task.query)
    with pytest.raises(ValueError, match=r"label 3 but the model outputs 3 classes \(valid "
                                         r"labels 0..2\); relabel"):
        learner.meta_step([bad])
    negative = metazoo.Task(task.support, (task.query[0], task.query[1] - 1))
    with pytest.raises(ValueError, match="label -1 but the model outputs 3 classes"):
        learner.evaluate([negative])


def test_inputs_that_do_not_fit_the_model_fail():
    learner = LEARNERS["maml"](model())
    task = tasks(1)[0]
    wide = metazoo.Task([(torch.randn(6, 5, dtype=DTYPE), task.support[0][1])], task.query)
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied \(6x5 and 4x5\)"):
        learner.meta_step([wide])


def test_parameter_dicts_with_missing_or_extra_names_are_refused():
    learner = LEARNERS["maml"](model())
    adapted = learner.adapt(tasks(1)[0])
    x = tasks(1)[0].query[0]
    missing = {n: p for n, p in adapted.params.items() if n != "2.bias"}
    with pytest.raises(ValueError, match=r"2\.bias"):
        metazoo.forward(learner.model, missing, adapted.buffers, x)
    extra = {**adapted.params, "3.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"3\.weight"):
        metazoo.forward(learner.model, extra, adapted.buffers, x)


def test_checkpoint_of_another_configuration_names_the_keys():
    learner = LEARNERS["maml"](model())
    state = learner.state_dict()
    wider = MAML(model=nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3),
                                     nn.Linear(3, 3)).to(DTYPE), criterion=F.cross_entropy)
    with pytest.raises(ValueError, match=r"missing \['3.weight', '3.bias'\]"):
        wider.load_state_dict(state)
    lslr = MAML(model=model(), criterion=F.cross_entropy, learn_inner_lr="per_tensor")
    with pytest.raises(ValueError, match="learned inner learning rates"):
        lslr.load_state_dict(state)


class _Payload:
    """An object whose unpickling would run code (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_learner_checkpoint_is_refused_without_running_code(tmp_path):
    learner = LEARNERS["maml"](model())
    path, marker = tmp_path / "learner.pt", tmp_path / "pwned"
    torch.save(learner.state_dict(), path)
    learner.load_state_dict(torch.load(path, weights_only=True))
    state = learner.state_dict()
    state["extra"] = _Payload(str(marker))
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("name", list(LEARNERS))
def test_same_seed_twice_is_bitwise_identical(name):
    def run() -> tuple[list[tuple], list[torch.Tensor]]:
        learner = LEARNERS[name](model(seed=5))
        results = []
        for meta_step in range(2):
            r = learner.meta_step(tasks(seed=10 + meta_step))
            results.append((r.meta_loss, r.inner_loss, r.accuracy, r.inner_losses))
        return results, [p.detach().clone() for p in learner.meta_parameters()]

    first, second = run(), run()
    assert first[0] == second[0]
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)
    assert copy.deepcopy(first[0]) == second[0]


class _WithUnusedScale(nn.Module):
    """``model`` plus a parameter multiplied by zero: its meta-gradient is exactly zero, so
    Adam(eps=0) divides 0 by 0 there."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = model(seed)
        self.scale = nn.Parameter(torch.ones((), dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.scale


META_OPTIMIZERS = {
    "sgd_lr_nan": lambda ps: torch.optim.SGD(ps, lr=float("nan")),
    "sgd_lr_inf": lambda ps: torch.optim.SGD(ps, lr=float("inf")),
    "adam_eps_0": lambda ps: torch.optim.Adam(ps, lr=0.1, eps=0.0),
}


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("optimizer", list(META_OPTIMIZERS))
@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_nonfinite_meta_update_is_undone_and_named(name, optimizer, on_nonfinite):
    """Issue 18 bug 1: SGD(lr=nan/inf) or Adam(eps=0) on a zero gradient made the meta-parameters
    NaN silently; now the step is undone (parameters and optimizer state) and the error names
    the parameters and the fix, whatever on_nonfinite says (skipping tasks cannot avoid it)."""
    learner = LEARNERS[name](_WithUnusedScale(), meta_optimizer=META_OPTIMIZERS[optimizer],
                             on_nonfinite=on_nonfinite)
    before = snapshot(learner)
    with pytest.raises(metazoo.NonFiniteError, match=r"meta-optimizer step made \[.*\] \(or "
                       r"their optimizer state\) non-finite.*restored.*learning rate must be "
                       r"finite and positive.*eps must be > 0") as info:
        learner.meta_step(tasks(2))
    assert info.value.where == "meta_update" and info.value.names
    if optimizer == "adam_eps_0":
        assert info.value.names == ("scale",)  # the only parameter with a zero gradient
    after = snapshot(learner)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not learner.meta_optimizer.state  # the first step's state was removed again
    assert all(p.grad is None for p in learner.meta_parameters())


def test_a_nonfinite_meta_update_restores_the_previous_optimizer_state():
    learner = LEARNERS["maml"](_WithUnusedScale(),
                               meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01))
    learner.meta_step(tasks(2))
    state = copy.deepcopy(learner.meta_optimizer.state_dict())
    before = snapshot(learner)
    learner.meta_optimizer.param_groups[0]["lr"] = float("inf")
    with pytest.raises(metazoo.NonFiniteError, match="meta-optimizer step made"):
        learner.meta_step(tasks(2, seed=4))
    after = snapshot(learner)
    assert all(torch.equal(before[n], after[n]) for n in before)
    restored = learner.meta_optimizer.state_dict()["state"]
    for key, entry in state["state"].items():
        assert all(torch.equal(entry[k], restored[key][k]) for k in entry)
    learner.meta_optimizer.param_groups[0]["lr"] = 0.01  # fixed: training continues
    learner.meta_step(tasks(2, seed=4))
    assert all(torch.isfinite(p).all() for p in learner.meta_parameters())


@pytest.mark.parametrize("name", list(LEARNERS))
def test_requires_grad_false_is_neither_adapted_nor_meta_learned(name):
    """Issue 18 bug 6: one rule for every learner. Before, Reptile and iMAML adapted and
    meta-updated a parameter with requires_grad=False, and MAML adapted it."""
    net = model()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    learner = LEARNERS[name](net)
    assert "0.weight" not in dict(learner.named_meta_parameters())
    task = tasks(1)[0]
    adapted = learner.adapt(task)
    assert torch.equal(adapted.params["0.weight"], frozen)  # not adapted
    assert not torch.equal(adapted.params["0.bias"], net[0].bias)  # the others are
    learner.meta_step(tasks(2))
    assert torch.equal(net[0].weight, frozen) and net[0].weight.grad is None


@pytest.mark.parametrize("name", list(LEARNERS))
def test_every_parameter_frozen_is_a_clear_error(name):
    net = model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters with requires_grad=True, so there is "
                                         r"nothing to adapt or meta-learn"):
        LEARNERS[name](net)


@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_the_loop_checks_all_tasks_with_one_host_transfer(name, on_nonfinite):
    from metazoo.testing import count_host_syncs

    learner = LEARNERS[name](model(), on_nonfinite=on_nonfinite)
    learner.meta_backward(tasks(4))  # warm-up
    learner.meta_optimizer.zero_grad()
    with count_host_syncs() as syncs:
        result = learner.meta_backward(tasks(4))
    # One transfer reads the fault flags of all 4 tasks and the reported means together
    # (metazoo.resolve_and_mean); before, the means cost a second one and each task one more.
    assert syncs.count == 1
    learner.meta_optimizer.zero_grad()
    assert result == dataclasses.replace(learner.meta_backward(tasks(4)),
                                         seconds=result.seconds)  # deterministic


@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_skipped_task_costs_one_more_transfer_and_leaves_the_means_of_the_others(name):
    from metazoo.testing import count_host_syncs

    learner = LEARNERS[name](model(), on_nonfinite="skip")
    batch = tasks(4)
    batch[2] = poisoned(batch[2], step=1)
    learner.meta_backward(batch)  # warm-up
    learner.meta_optimizer.zero_grad()
    with count_host_syncs() as syncs:
        result = learner.meta_backward(batch)
    assert syncs.count == 2 and result.skipped_tasks == 1
    kept = [batch[i] for i in (0, 1, 3)]
    learner.meta_optimizer.zero_grad()
    alone = learner.meta_backward(kept)
    assert (result.meta_loss, result.accuracy, result.inner_losses) == (
        alone.meta_loss, alone.accuracy, alone.inner_losses)


@pytest.mark.parametrize("name", list(LEARNERS))
def test_an_all_skipped_meta_batch_leaves_momentum_and_optimizer_state_alone(name):
    """Found by the issue 28 distributed test: with one host sync per meta-step, a meta-batch
    whose every task was skipped wrote zero gradients, so SGD momentum still moved the
    meta-parameters and Adam's moments advanced; no kept task must mean no gradient (None)."""
    learner = LEARNERS[name](model(), on_nonfinite="skip")
    learner.meta_optimizer = torch.optim.SGD(learner.meta_parameters(), lr=0.1, momentum=0.9)
    learner.meta_step(tasks())  # momentum buffers now hold something
    before = snapshot(learner)
    state = {k: v.clone() for k, v in learner.meta_optimizer.state_dict()["state"][0].items()
             if isinstance(v, torch.Tensor)}
    result = learner.meta_step([poisoned(t, step=0) for t in tasks(seed=5)])
    assert result.skipped_tasks == result.num_tasks
    assert all(p.grad is None for p in learner.meta_parameters())
    for n, p in learner.named_meta_parameters():
        assert torch.equal(p, before[n]), n
    after = learner.meta_optimizer.state_dict()["state"][0]
    assert all(torch.equal(v, after[k]) for k, v in state.items())


# -- one host transfer per meta-step (issue 26 item 3) -----------------------------------------

def _meta_batch(case: str) -> list[metazoo.Task]:
    batch = tasks(4)
    if case in ("inner_nan", "task_and_update"):
        batch[1] = poisoned(batch[1], step=1)
    elif case == "query_inf":
        batch[2] = poisoned(batch[2], step=None, value=float("inf"))
    elif case == "all_nan":
        batch = [poisoned(t, step=0) for t in batch]
    return batch


@pytest.mark.parametrize("case", ["finite", "inner_nan", "query_inf", "all_nan",
                                  "meta_update", "task_and_update"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_the_one_transfer_meta_step_ends_as_the_two_transfer_one(name, vectorize, on_nonfinite,
                                                                  case):
    """meta_step steps first and reads the task faults with the step's own check; whatever the
    faults (a task, every task, the meta-update, a task and the meta-update), it ends exactly
    as when the faults were read before the step: same result or error, parameters, .grad and
    momentum, bit for bit."""
    from metazoo.testing import assert_one_transfer_meta_step_is_the_two_transfer_one

    def build() -> metazoo.MetaLearner:
        learner = LEARNERS[name](_WithUnusedScale(), on_nonfinite=on_nonfinite,
                                 vectorize=vectorize,
                                 meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1,
                                                                           momentum=0.9))
        learner.meta_step(tasks(4, seed=7))  # momentum buffers hold something
        if case in ("meta_update", "task_and_update"):
            learner.meta_optimizer.param_groups[0]["lr"] = float("inf")
        return learner

    assert_one_transfer_meta_step_is_the_two_transfer_one(build, _meta_batch(case))


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_meta_step_reads_the_device_once(name, vectorize, on_nonfinite):
    """The fault flags and means of the meta-batch and the meta-optimizer step's finite check
    come back in one host transfer (Adam is left out: it reads its step counts with .item(),
    host tensors even on a GPU)."""
    from metazoo.testing import count_host_syncs

    learner = LEARNERS[name](model(), on_nonfinite=on_nonfinite, vectorize=vectorize,
                             meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    learner.meta_step(tasks(4))  # warm-up
    with count_host_syncs() as syncs:
        learner.meta_step(tasks(4))
    assert syncs.count == 1
    hooked = LEARNERS[name](model(), on_nonfinite=on_nonfinite, vectorize=vectorize,
                            meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    hooked.meta_step(tasks(4))
    with count_host_syncs() as syncs:  # the hook needs the counts before the step
        hooked.meta_step(tasks(4), grad_hook=lambda learner, result: None)
    assert syncs.count == 2
