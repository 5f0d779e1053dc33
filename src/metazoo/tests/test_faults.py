"""metazoo.faults: task faults, the fused finiteness check guarding meta_step, and the
criterion wrapper that explains targets which do not fit the model."""

from collections.abc import Sequence

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metazoo


class _GradWriter(metazoo.MetaLearner):
    """Writes a given gradient, to test the guard in the shared meta_step."""

    def __init__(self, grads: dict[str, torch.Tensor]) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2)
        self.meta_optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.grads = grads

    def adapt(self, task, *, steps=None):
        raise NotImplementedError

    def meta_backward(self, tasks: Sequence[metazoo.Task]) -> metazoo.MetaStepResult:
        for name, p in self.model.named_parameters():
            p.grad = self.grads[name].clone()
        return metazoo.MetaStepResult(0.0, 0.0, None, (0.0,), len(tasks), 0.0)

    def evaluate(self, tasks, *, steps=None):
        raise NotImplementedError


def _task() -> metazoo.Task:
    return metazoo.Task([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))],
                        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_meta_step_never_applies_a_nonfinite_meta_gradient(bad):
    weight = torch.ones(2, 3)
    weight[1, 2] = bad
    learner = _GradWriter({"weight": weight, "bias": torch.ones(2)})
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    with pytest.raises(metazoo.NonFiniteError,
                       match=r"non-finite meta-gradient of \['weight'\]") as info:
        learner.meta_step([_task()])
    assert (info.value.where, info.value.names, info.value.task) == ("meta_gradient",
                                                                     ("weight",), None)
    for n, p in learner.model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert not learner.meta_optimizer.state
    # A finite gradient then steps normally, and a gradient hook's output is what is checked.
    learner.grads["weight"] = torch.ones(2, 3)
    assert learner.meta_step([_task()]).skipped_tasks == 0
    assert not torch.equal(learner.model.weight, before["weight"])

    def poison(lrn, _result):
        lrn.model.bias.grad[0] = bad

    with pytest.raises(metazoo.NonFiniteError, match=r"\['bias'\]"):
        learner.meta_step([_task()], grad_hook=poison)


def test_large_finite_gradients_pass_the_check():
    big = torch.full((4,), 1e30, dtype=torch.float32)  # its squared norm overflows float32
    assert metazoo.all_finite([big, torch.zeros(3)]) and metazoo.all_finite([])
    assert not metazoo.all_finite([big, torch.tensor([0.0, float("nan")])])


def test_task_fault_names_the_first_nonfinite_step_or_the_query():
    nan, inf = float("nan"), float("inf")
    assert metazoo.task_fault(0, torch.tensor([1.0, 2.0]), torch.tensor(3.0)) is None
    fault = metazoo.task_fault(4, torch.tensor([1.0, inf, nan]), torch.tensor(nan))
    assert (fault.task, fault.inner_step, fault.where) == (4, 1, "inner")
    assert "non-finite support loss at inner step 1 (task 4 of the meta-batch)" in str(fault)
    fault = metazoo.task_fault(2, torch.tensor([1.0, 2.0]), torch.tensor(-inf))
    assert (fault.task, fault.inner_step, fault.where) == (2, None, "query")
    assert metazoo.task_fault(0, torch.tensor([nan]), None).inner_step == 0
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        metazoo.check_on_nonfinite("warn")


def test_checked_criterion_explains_targets_that_do_not_fit():
    criterion = metazoo.CheckedCriterion(F.cross_entropy)
    assert metazoo.CheckedCriterion(criterion).criterion is F.cross_entropy
    logits = torch.randn(4, 3)
    torch.testing.assert_close(criterion(logits, torch.tensor([0, 1, 2, 0])),
                               F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match=r"label 3 but the model outputs 3 classes \(valid "
                                         r"labels 0..2\); relabel .* or give the model a head"):
        criterion(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"output shape \(4, 3\), target shape \(5,\)"):
        criterion(logits, torch.tensor([0, 1, 2, 0, 1]))
    # Errors it cannot explain are re-raised unchanged.
    def broken(output, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        metazoo.CheckedCriterion(broken)(logits, torch.tensor([0, 1, 2, 0]))


def _stepped(optimizer_factory, grads: dict[str, torch.Tensor]):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    optimizer = optimizer_factory(model.parameters())
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    return model, optimizer


@pytest.mark.parametrize("factory", [
    lambda ps: torch.optim.SGD(ps, lr=float("nan")),
    lambda ps: torch.optim.SGD(ps, lr=float("inf"), momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.1, eps=0.0),
])
def test_checked_step_undoes_a_nonfinite_update_and_names_it(factory):
    """Issue 18 bug 1, the core: checked_step undoes a step that made a parameter or the
    optimizer state non-finite (finite gradients, bad lr or eps) and names the parameters."""
    grads = {"weight": torch.ones(2, 3, dtype=torch.float64),
             "bias": torch.zeros(2, dtype=torch.float64)}  # zero: Adam(eps=0) gives 0/0
    model, optimizer = _stepped(factory, grads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(metazoo.NonFiniteError, match="meta-optimizer step made") as info:
        metazoo.checked_step(optimizer, [("layer.bias", model.bias)])
    assert info.value.where == "meta_update"
    # Names come from named_parameters; a parameter left out is named by its position.
    assert "layer.bias" in info.value.names
    assert set(info.value.names) <= {"layer.bias", "param_groups[0][0]"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_checked_step_turns_a_hyperparameter_overflow_into_a_restored_meta_update_error():
    """Issue 28 item 8: lr=1e300 on float32 parameters raised torch's raw overflow error."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).float()  # 1e300 fits float64, not float32
    optimizer = torch.optim.SGD(model.parameters(), lr=1e300, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(metazoo.NonFiniteError, match="meta-optimizer step made") as info:
        metazoo.checked_step(optimizer, model.named_parameters())
    assert info.value.where == "meta_update" and set(info.value.names) == {"weight", "bias"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_checked_step_steps_like_step_and_reports_already_nonfinite_parameters():
    grads = {"weight": torch.ones(2, 3, dtype=torch.float64),
             "bias": torch.ones(2, dtype=torch.float64)}
    model, optimizer = _stepped(lambda ps: torch.optim.Adam(ps, lr=0.1), grads)
    reference, ref_optimizer = _stepped(lambda ps: torch.optim.Adam(ps, lr=0.1), grads)
    metazoo.checked_step(optimizer, model.named_parameters())
    ref_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    with torch.no_grad():
        model.bias[0] = float("nan")  # e.g. loaded from a broken checkpoint
    model.bias.grad = torch.ones(2, dtype=torch.float64)
    model.weight.grad = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(metazoo.NonFiniteError, match=r"\['bias'\] .*were already non-finite "
                                                     r"before the meta-optimizer step"):
        metazoo.checked_step(optimizer, model.named_parameters())


def test_a_long_list_of_parameters_is_shortened_in_the_message_only():
    names = [f"layer{i}.weight" for i in range(20)]
    error = metazoo.NonFiniteError(task=None, inner_step=None, where="meta_update", names=names)
    assert "'layer5.weight', ... 14 more]" in str(error) and "layer6" not in str(error)
    assert error.names == tuple(names)


def test_nonfinite_error_crosses_process_borders_with_every_field():
    """Distributed runs and subprocess pools pickle errors; ``then`` (how to continue) must
    survive with the rest, and ``with_meta_step`` keeps it."""
    import pickle

    error = metazoo.NonFiniteError(task=3, inner_step=1, where="inner", names=("w",),
                                   then="The trajectories were dropped")
    again = pickle.loads(pickle.dumps(error))
    assert (again.task, again.inner_step, again.where, again.names, again.then) == (
        3, 1, "inner", ("w",), "The trajectories were dropped")
    assert str(again) == str(error) and str(error).endswith(". The trajectories were dropped")
    stepped = error.with_meta_step(7)
    assert stepped.then == error.then and "meta-step 7" in str(stepped)


def _per_task(count: int, *, with_accuracy: bool, seed: int = 0):
    """float32 results of ``count`` tasks: query loss, accuracy (or None), inner-loss curve."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand((), generator=g, dtype=torch.float32) * 3,
             torch.rand((), generator=g, dtype=torch.float32) if with_accuracy else None,
             torch.rand(5, generator=g, dtype=torch.float32) * 2) for _ in range(count)]


@pytest.mark.parametrize("with_accuracy", [True, False])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_resolve_and_mean_reads_flags_and_means_in_one_transfer_bit_for_bit(with_accuracy,
                                                                            on_nonfinite):
    from metazoo.testing import count_host_syncs

    per_task = _per_task(7, with_accuracy=with_accuracy)
    faults = metazoo.TaskFaults(on_nonfinite)
    for loss, _, curve in per_task:
        faults.check(curve, loss)
    with count_host_syncs() as syncs:
        kept, means = metazoo.resolve_and_mean(faults, per_task)
    assert syncs.count == 1 and kept == list(range(7))
    # float32 means, read as the same Python floats as mean_results reads them.
    assert means == metazoo.mean_results(per_task)
    assert (means[1] is None) == (not with_accuracy)


def test_resolve_and_mean_skips_and_raises_as_resolve_does():
    per_task = _per_task(5, with_accuracy=True)
    per_task[1] = (per_task[1][0], per_task[1][1], per_task[1][2].clone().index_fill_(
        0, torch.tensor([3]), float("nan")))  # task 1: non-finite at inner step 3
    inf = torch.tensor(float("inf"), dtype=torch.float32)
    per_task[3] = (inf, per_task[3][1], per_task[3][2])  # task 3: non-finite query loss

    def checked(on_nonfinite: str) -> metazoo.TaskFaults:
        faults = metazoo.TaskFaults(on_nonfinite)
        for loss, _, curve in per_task:
            faults.check(curve, loss)
        return faults

    from metazoo.testing import count_host_syncs

    with count_host_syncs() as syncs:
        kept, means = metazoo.resolve_and_mean(checked("skip"), per_task)
    assert kept == [0, 2, 4] and syncs.count == 2  # the flags with all means, then the kept
    assert means == metazoo.mean_results([per_task[i] for i in kept])
    with pytest.raises(metazoo.NonFiniteError) as raised:
        metazoo.resolve_and_mean(checked("raise"), per_task)
    with pytest.raises(metazoo.NonFiniteError) as expected:
        checked("raise").resolve()
    assert str(raised.value) == str(expected.value)
    assert (raised.value.task, raised.value.inner_step, raised.value.where) == (1, 3, "inner")
    every_task_bad = [(inf * 0, None, curve) for _, _, curve in per_task]  # NaN query losses
    faults = metazoo.TaskFaults("skip")
    for loss, _, curve in every_task_bad:
        faults.check(curve, loss)
    assert metazoo.resolve_and_mean(faults, every_task_bad) == ([], None)


def test_resolve_with_reads_values_unchanged_in_any_float_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        values = torch.tensor([0.1, -2.5, 1e-3, 7.0], dtype=dtype)
        faults = metazoo.TaskFaults("skip")
        faults.check(torch.ones(2), torch.tensor(1.0))
        faults.check(torch.tensor([1.0, float("nan")]), torch.tensor(1.0))
        assert faults.resolve_with(values) == ([0], values.tolist())


def test_a_deferred_read_reads_once_and_chains():
    from metazoo.testing import count_host_syncs

    values = torch.tensor([1.5, -2.0, 0.25])
    read = metazoo.DeferredRead(values, lambda got: sum(got)).then(lambda total: total * 2)
    with count_host_syncs() as syncs:
        assert read.read() == 2 * (1.5 - 2.0 + 0.25)
    assert syncs.count == 1
    with count_host_syncs() as syncs:
        assert metazoo.DeferredRead.ready("done").then(str.upper).read() == "DONE"
    assert syncs.count == 0


def _flags_read(flags: list[bool], on_nonfinite: str = "skip"):
    per_task = _per_task(len(flags), with_accuracy=False)
    faults = metazoo.TaskFaults(on_nonfinite)
    for ok, (loss, _, curve) in zip(flags, per_task, strict=True):
        faults.check(curve, loss if ok else loss * float("nan"))
    return metazoo.deferred_resolve_and_mean(faults, per_task)


@pytest.mark.parametrize(("flags", "on_nonfinite", "kept_any"), [
    ([True, True], "skip", True), ([True, False], "skip", True), ([False, False], "skip", False),
    ([True, False], "raise", None)])
def test_a_deferred_meta_gradient_adds_to_what_was_there_or_puts_it_back(flags, on_nonfinite,
                                                                         kept_any):
    """Written before the flags are read, the gradient joins what .grad held (as backward
    accumulates); a faulty task ("raise") or no kept task puts .grad back as it was: the same
    tensor, untouched, or None."""
    held = nn.Parameter(torch.zeros(3))
    held.grad = torch.tensor([1.0, 2.0, 3.0])
    held_grad = held.grad
    empty = nn.Parameter(torch.zeros(2))

    def write() -> None:
        metazoo.accumulate_grad(held, torch.full((3,), 0.5))
        metazoo.accumulate_grad(empty, torch.full((2,), 0.25))

    deferred = metazoo.deferred_meta_gradient([held, empty], write,
                                              _flags_read(flags, on_nonfinite))
    assert held.grad is not held_grad and empty.grad is not None  # written, not yet resolved
    if kept_any is None:
        with pytest.raises(metazoo.NonFiniteError, match="task 1 of the meta-batch"):
            deferred.read()
    else:
        kept, _ = deferred.read()
        assert kept == [i for i, ok in enumerate(flags) if ok]
    if kept_any:
        assert held.grad is held_grad
        assert held.grad.tolist() == [1.5, 2.5, 3.5] and empty.grad.tolist() == [0.25, 0.25]
    else:
        assert held.grad is held_grad and held.grad.tolist() == [1.0, 2.0, 3.0]
        assert empty.grad is None


def test_an_undoable_step_reads_its_check_with_other_values_in_one_transfer():
    from metazoo.testing import count_host_syncs

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    step = metazoo.UndoableStep(optimizer, model.named_parameters())
    step.step()
    values = torch.tensor([0.5, 1.0, -3.0])
    with count_host_syncs() as syncs:
        ok, read = step.read_after_step(values)
    assert syncs.count == 1 and ok and read == values.tolist()
    step.undo(keep_grads=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not optimizer.state and all(p.grad is not None for p in model.parameters())
    model.weight.grad[0, 0] = float("nan")
    step = metazoo.UndoableStep(optimizer, model.named_parameters())
    step.step()
    assert step.read_after_step(None) == (False, [])
    with pytest.raises(metazoo.NonFiniteError, match="weight") as info:
        step.fail()
    assert info.value.where == "meta_gradient"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
