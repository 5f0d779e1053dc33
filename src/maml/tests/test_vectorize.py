"""MAML(vectorize=...): the vectorized meta-batch against the per-task loop, float64 to 1e-10."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import metazoo
from maml import MAML, Reptile, iMAML
from metazoo.testing import (
    assert_same_gradients,
    assert_same_results,
    bn_net,
    meta_gradients,
    small_tasks,
)

DTYPE = torch.float64
TASKS = 4


def tasks(count: int = TASKS, seed: int = 1, support_batches: int = 1) -> list[metazoo.Task]:
    return small_tasks(count, seed, support_batches)


HEAD = ["5.weight", "5.bias"]
CONFIGS = {
    "batch_sgd": dict(inner_optimizer=metazoo.SGD(0.4)),
    "running_sgd": dict(inner_optimizer=metazoo.SGD(0.4), bn_mode="running"),
    "momentum_tensor_hyper": dict(
        inner_optimizer=metazoo.SGD(0.1, momentum=torch.tensor(0.9, dtype=DTYPE),
                                    weight_decay=0.01), bn_mode="running"),
    "adam": dict(inner_optimizer=metazoo.Adam(0.05, betas=(0.8, 0.99)), bn_mode="running"),
    "meta_sgd": dict(inner_optimizer=metazoo.SGD(0.3), learn_inner_lr="per_element"),
    "lslr_msl": dict(inner_optimizer=metazoo.SGD(0.3, momentum=0.5),
                     learn_inner_lr="per_tensor", per_step_inner_lr=True,
                     multi_step_weights=[0.2, 0.3, 0.5]),
    "anil_zero_head": dict(inner_optimizer=metazoo.SGD(0.4),
                           frozen=lambda name: not name.startswith("5."), zero_head=HEAD),
    "zero_head_running": dict(inner_optimizer=metazoo.SGD(0.4), zero_head=HEAD,
                              bn_mode="running"),
    "inner_clip": dict(inner_optimizer=metazoo.SGD(0.4), inner_grad_clip=0.05),
    # 0.02 clips (test_backward_clip_configs_clip); per-task norms: a joint clip would differ.
    "backward_clip": dict(inner_optimizer=metazoo.SGD(0.4), backward_grad_clip=0.02),
    # Segments of 2 of 3 steps (one full, one partial), with everything they carry: momentum
    # state, running statistics, learned per-step rates, the multi-step loss' points, the clip.
    "checkpoint_msl_lslr_running": dict(inner_optimizer=metazoo.SGD(0.3, momentum=0.5),
                                        checkpoint=2, bn_mode="running",
                                        learn_inner_lr="per_tensor", per_step_inner_lr=True,
                                        multi_step_weights=[0.2, 0.3, 0.5]),
    "checkpoint_adam_backward_clip": dict(inner_optimizer=metazoo.Adam(0.05), checkpoint=1,
                                          backward_grad_clip=0.02),
    "checkpoint_anil_zero_head": dict(inner_optimizer=metazoo.SGD(0.4), checkpoint=2,
                                      frozen=lambda name: not name.startswith("5."),
                                      zero_head=HEAD),
    "backward_clip_first_order_running": dict(inner_optimizer=metazoo.SGD(0.4),
                                              backward_grad_clip=0.02, first_order=True,
                                              bn_mode="running"),
    "first_order": dict(inner_optimizer=metazoo.SGD(0.4), first_order=True),
    "first_order_meta_sgd_adam": dict(inner_optimizer=metazoo.Adam(0.05), first_order=True,
                                      learn_inner_lr="per_element", bn_mode="running"),
    "several_support_batches": dict(inner_optimizer=metazoo.SGD(0.4), bn_mode="running"),
    "rmsprop_centered": dict(inner_optimizer=metazoo.RMSprop(0.01, momentum=0.5, centered=True),
                             bn_mode="running"),
}


def learner(config: str, vectorize=False, **overrides) -> MAML:
    kwargs = {"inner_steps": 3, **CONFIGS[config], **overrides}
    return MAML(model=bn_net(), criterion=F.cross_entropy, vectorize=vectorize, **kwargs)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_vectorized_meta_gradient_and_results_equal_the_loop(config):
    batch = tasks(support_batches=2 if config == "several_support_batches" else 1)
    expected, expected_result = meta_gradients(learner(config), batch)
    for vectorize in (True, 3):  # one vmap, and chunks of 3 + 1 tasks
        got, result = meta_gradients(learner(config, vectorize), batch)
        assert_same_gradients(got, expected)
        assert_same_results(result, expected_result)
    if "zero_head" in config:
        assert not any(name in expected for name in HEAD)
    if "lr" in str(CONFIGS[config].get("learn_inner_lr", "")) or "meta_sgd" in config:
        assert any(name.startswith("inner_lr.") for name in expected)


@pytest.mark.parametrize("config", ["batch_sgd", "running_sgd", "lslr_msl", "first_order",
                                    "checkpoint_msl_lslr_running", "anil_zero_head"])
def test_the_samples_outer_layout_of_cuda_equals_the_loop_too(monkeypatch, config):
    # On a CPU the vectorized path stacks image batches channels-last; this runs the layout it
    # uses on CUDA (and every other device) here.
    monkeypatch.setattr(metazoo.vectorize, "CHANNELS_LAST_DEVICES", frozenset())
    batch = tasks()
    expected, expected_result = meta_gradients(learner(config), batch)
    got, result = meta_gradients(learner(config, True), batch)
    assert_same_gradients(got, expected)
    assert_same_results(result, expected_result)


class KernelLayouts(TorchDispatchMode):
    """Records, per kernel, whether its activation inputs were channels-last (and not also
    contiguous), and counts copies of activations (4-D or larger)."""

    KERNELS = frozenset({torch.ops.aten.convolution.default,
                         torch.ops.aten.max_pool2d_with_indices.default,
                         torch.ops.aten.native_batch_norm.default,
                         torch.ops.aten.native_batch_norm_backward.default})
    COPIES = frozenset({torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
                        torch.ops.aten._to_copy.default})

    def __init__(self) -> None:
        super().__init__()
        self.layouts: dict[str, set[bool]] = {}
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.KERNELS:
            x = args[0]
            self.layouts.setdefault(func.__name__, set()).add(
                not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        if func in self.COPIES and isinstance(args[0], torch.Tensor) and args[0].dim() >= 4:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_on_a_cpu_the_vectorized_meta_batch_runs_channels_last_without_copies(monkeypatch):
    """Fails if the channels-last layout of the CPU silently falls back to NCHW or is copied
    back and forth: every convolution, max-pooling and BatchNorm kernel reads channels-last
    activations, and no activation is copied that the CUDA layout does not copy too. Two conv
    layers (3 and 4 channels, 4x4 images), so that the activations before the head are never
    both contiguous and channels-last."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)).to(DTYPE)
    g = torch.Generator().manual_seed(3)
    batch = [metazoo.Task([(torch.randn(6, 1, 4, 4, generator=g, dtype=DTYPE),
                            torch.arange(3).repeat(2))],
                          (torch.randn(9, 1, 4, 4, generator=g, dtype=DTYPE),
                           torch.arange(3).repeat(3))) for _ in range(TASKS)]

    def make(vectorize):
        return MAML(model=copy.deepcopy(net), criterion=F.cross_entropy,
                    inner_optimizer=metazoo.SGD(0.4), inner_steps=2, vectorize=vectorize)

    expected, _ = meta_gradients(make(False), batch)
    kernels = ("convolution.default", "max_pool2d_with_indices.default",
               "native_batch_norm.default", "native_batch_norm_backward.default")
    copies = {}
    for channels_last in (True, False):
        monkeypatch.setattr(metazoo.vectorize, "CHANNELS_LAST_DEVICES",
                            frozenset({"cpu"} if channels_last else ()))
        with KernelLayouts() as seen:
            got, _ = meta_gradients(make(True), batch)
        assert_same_gradients(got, expected)
        assert seen.layouts == {name: {channels_last} for name in kernels}, seen.layouts
        copies[channels_last] = seen.copies
    # One more: the second convolution's weight gradients come back channels-last and are
    # copied once where the tasks' gradients are summed (the first one's, of one input
    # channel, are both contiguous and channels-last).
    assert copies[True] == copies[False] + 1, copies


@pytest.mark.parametrize("config", ["backward_clip", "backward_clip_first_order_running"])
def test_backward_clip_configs_clip(config):
    # Otherwise the exactness above would not test the vectorized clip.
    batch = tasks()
    clipped, _ = meta_gradients(learner(config), batch)
    unclipped, _ = meta_gradients(learner(config, backward_grad_clip=None), batch)
    assert max((clipped[n] - unclipped[n]).abs().max().item() for n in clipped) > 1e-3


@pytest.mark.parametrize("config", ["running_sgd", "anil_zero_head", "adam"])
def test_vectorized_evaluate_equals_the_loop(config):
    batch = tasks(seed=5)
    expected = learner(config).evaluate(batch, steps=2)
    got = learner(config, 2).evaluate(batch, steps=2)
    assert got.loss == pytest.approx(expected.loss, rel=1e-10)
    assert got.accuracy == pytest.approx(expected.accuracy, abs=1e-12)
    assert got.inner_losses == pytest.approx(expected.inner_losses, rel=1e-10)
    for (loss, acc), (loss_loop, acc_loop) in zip(got.per_task, expected.per_task, strict=True):
        assert loss == pytest.approx(loss_loop, rel=1e-10) and acc == acc_loop


def test_meta_steps_follow_the_same_trajectory():
    loop, vectorized = learner("lslr_msl"), learner("lslr_msl", True)
    for step in range(3):
        batch = tasks(seed=10 + step)
        loop.meta_step(batch)
        vectorized.meta_step(batch)
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


@pytest.mark.parametrize("vectorize,calls", [(False, TASKS * 4), (True, 4), (2, 8),
                                              ("auto", TASKS * 4)])
def test_the_vectorized_path_runs_once_per_chunk_and_never_falls_back(vectorize, calls):
    """3 inner steps + 1 query pass = 4 criterion calls per task in the loop, per chunk when
    vectorized; a silent fallback to the loop would make 16. ``"auto"`` runs the loop on CPU."""
    criterion = CountingCriterion()
    maml = MAML(model=bn_net(), criterion=criterion, inner_optimizer=metazoo.SGD(0.4),
                inner_steps=3, vectorize=vectorize)
    maml.meta_backward(tasks())
    assert criterion.calls == calls
    assert criterion.batched == (0 if calls == TASKS * 4 else calls)


def test_the_vectorized_path_runs_through_the_task_folding_layers(monkeypatch):
    """Convolution, max-pooling and BatchNorm of the vectorized meta-batch use the vmap rules
    of ``metazoo.layers`` and ``metazoo.batchnorm`` (tasks folded into one kernel, closed-form
    double backwards); a silent fallback to PyTorch's batching rules leaves a count at 0."""
    from metazoo import batchnorm, layers

    calls: dict[str, int] = {}

    def counting(name, rule):
        def vmap_rule(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return rule(*args, **kwargs)
        return staticmethod(vmap_rule)

    functions = (layers._Conv, layers._ConvBackward, layers._MaxPool, layers._MaxPoolBackward,
                 layers._MaxPoolGather, batchnorm._BatchNorm, batchnorm._BatchNormBackward,
                 batchnorm._BatchNormDoubleBackward)
    for function in functions:
        monkeypatch.setattr(function, "vmap", counting(function.__name__, function.vmap))
    maml = MAML(model=bn_net(), criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.4),
                inner_steps=2, vectorize=True)
    maml.meta_backward(tasks())
    assert sorted(calls) == sorted(f.__name__ for f in functions), calls


def test_vectorized_fault_check_is_one_transfer_and_names_the_task_and_step(monkeypatch):
    """Both the loop (metazoo.TaskFaults) and the vectorized path check the whole meta-batch
    at once (task_fault, one transfer per task, only names a fault) and raise the same error."""
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
    bad[2] = metazoo.Task([(bad[2].support[0][0] * float("nan"), bad[2].support[0][1])],
                          bad[2].query)
    with pytest.raises(metazoo.NonFiniteError) as loop_error:
        learner("batch_sgd").meta_backward(bad)
    maml = learner("batch_sgd", True)
    with pytest.raises(metazoo.NonFiniteError) as error:
        maml.meta_backward(bad)
    assert (error.value.task, error.value.inner_step, error.value.where) == (2, 0, "inner")
    assert str(error.value) == str(loop_error.value)
    assert all(p.grad is None for p in maml.meta_parameters())


def test_vectorized_skip_leaves_non_finite_tasks_out_exactly():
    batch = tasks()
    bad = list(batch)
    bad[1] = metazoo.Task(bad[1].support, (bad[1].query[0] * float("inf"), bad[1].query[1]))
    expected, expected_result = meta_gradients(learner("running_sgd", on_nonfinite="skip"), bad)
    got, result = meta_gradients(learner("running_sgd", True, on_nonfinite="skip"), bad)
    assert result.skipped_tasks == 1
    assert_same_gradients(got, expected)
    assert_same_results(result, expected_result)
    assert all(torch.isfinite(g).all() for g in got.values())


def test_a_users_tensor_hyperparameter_gets_the_loops_gradient():
    """Tensors of the inner optimizer that require grad but are not MAML's meta-parameters
    receive .grad as the loop's backward gives them."""
    grads = []
    for vectorize in (False, True):
        lr = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
        momentum = torch.tensor(0.6, dtype=DTYPE, requires_grad=True)
        maml = learner("running_sgd", vectorize,
                       inner_optimizer=metazoo.SGD(lr, momentum=momentum))
        maml.meta_backward(tasks())
        grads.append({"lr": lr.grad, "momentum": momentum.grad})
    assert_same_gradients(grads[1], grads[0])
    assert grads[0]["lr"].abs() > 0 and grads[0]["momentum"].abs() > 0


def test_vectorized_gradient_accumulates_like_the_loop():
    batch = tasks()
    loop, vectorized = learner("meta_sgd"), learner("meta_sgd", True)
    for maml in (loop, vectorized):
        maml.meta_optimizer.zero_grad(set_to_none=True)
        maml.meta_backward(batch[:2])
        maml.meta_backward(batch[2:])
    assert_same_gradients({n: p.grad for n, p in vectorized.named_meta_parameters()},
                {n: p.grad for n, p in loop.named_meta_parameters()})


@pytest.mark.parametrize("option,value", [("channels_last", True)])
@pytest.mark.parametrize("vectorize", [True, 4, "auto"])
def test_options_only_the_loop_supports_raise(option, value, vectorize):
    with pytest.raises(ValueError, match=rf"vectorize={vectorize!r} does not support {option}; "
                                         rf".*vectorize=False"):
        learner("batch_sgd", vectorize, **{option: value})


def test_tasks_of_different_shapes_and_bad_values_raise():
    batch = tasks()
    odd = [*batch[:3], metazoo.Task(batch[3].support, (batch[3].query[0][:6],
                                                       batch[3].query[1][:6]))]
    with pytest.raises(ValueError, match=r"task 3 query\[0\] has shape.*vectorize=False"):
        learner("batch_sgd", True).meta_backward(odd)
    learner("batch_sgd", False).meta_backward(odd)  # the loop takes them
    for bad in (0, "always", 2.0):
        with pytest.raises(ValueError, match="vectorize must be False"):
            learner("batch_sgd", bad)


# -- Reptile ------------------------------------------------------------------------------------

REPTILE_CONFIGS = {
    "batch_sgd": dict(inner_optimizer=metazoo.SGD(0.4)),
    "running_adam_clip": dict(inner_optimizer=metazoo.Adam(0.05), bn_mode="running",
                              inner_grad_clip=0.5),
    "momentum": dict(inner_optimizer=metazoo.SGD(0.1, momentum=0.9)),
}


def reptile(config: str, vectorize=False, **overrides) -> Reptile:
    kwargs = {"inner_steps": 3, **REPTILE_CONFIGS[config], **overrides}
    return Reptile(model=bn_net(), criterion=F.cross_entropy, vectorize=vectorize, **kwargs)


@pytest.mark.parametrize("config", sorted(REPTILE_CONFIGS))
def test_reptile_vectorized_equals_the_loop(config):
    batch = tasks(support_batches=2)
    expected, expected_result = meta_gradients(reptile(config), batch)
    for vectorize in (True, 3):
        got, result = meta_gradients(reptile(config, vectorize), batch)
        assert_same_gradients(got, expected)
        assert_same_results(result, expected_result)
    loop_eval = reptile(config).evaluate(batch, steps=2)
    vectorized_eval = reptile(config, 2).evaluate(batch, steps=2)
    assert vectorized_eval.loss == pytest.approx(loop_eval.loss, rel=1e-10)
    flat = [value for row in vectorized_eval.per_task for value in row]
    assert flat == pytest.approx([value for row in loop_eval.per_task for value in row],
                                 rel=1e-10)


def test_reptile_vectorized_runs_batched_skips_and_raises_like_the_loop():
    criterion = CountingCriterion()
    Reptile(model=bn_net(), criterion=criterion, inner_optimizer=metazoo.SGD(0.4),
            inner_steps=3, vectorize=True).meta_backward(tasks())
    assert criterion.calls == criterion.batched == 4  # 3 inner steps + the query, one chunk
    bad = tasks()
    bad[3] = metazoo.Task([(bad[3].support[0][0], bad[3].support[0][1])],
                          (bad[3].query[0] * float("nan"), bad[3].query[1]))
    expected, expected_result = meta_gradients(reptile("batch_sgd", on_nonfinite="skip"), bad)
    got, result = meta_gradients(reptile("batch_sgd", True, on_nonfinite="skip"), bad)
    assert result.skipped_tasks == 1
    assert_same_gradients(got, expected)
    assert_same_results(result, expected_result)
    with pytest.raises(metazoo.NonFiniteError, match="task 3 of the meta-batch"):
        reptile("batch_sgd", True).meta_backward(bad)
    with pytest.raises(ValueError, match="vectorize=True does not support channels_last"):
        reptile("batch_sgd", True, channels_last=True)


@pytest.mark.parametrize("kind", ["maml", "reptile"])
def test_requires_grad_false_parameters_stay_fixed_when_vectorized(kind):
    """The rule of every learner (metazoo.trainable_parameters): a parameter with
    requires_grad=False is neither adapted nor meta-learned, in the vectorized path too."""
    grads = []
    for vectorize in (False, True):
        net = bn_net()
        net[1].weight.requires_grad_(False)
        build = MAML if kind == "maml" else Reptile
        learner_ = build(model=net, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.4),
                         inner_steps=2, vectorize=vectorize)
        learner_.meta_backward(tasks())
        assert net[1].weight.grad is None
        grads.append({n: p.grad for n, p in learner_.named_meta_parameters()})
    assert "1.weight" not in grads[0]
    assert_same_gradients(grads[1], grads[0])


# -- iMAML --------------------------------------------------------------------------------------

IMAML_CONFIGS = {
    "batch_sgd": dict(inner_optimizer=metazoo.SGD(0.1)),
    "running_sgd": dict(inner_optimizer=metazoo.SGD(0.1), bn_mode="running"),
    "adam_damping": dict(inner_optimizer=metazoo.Adam(0.05), damping=0.1, bn_mode="running"),
    "momentum_tensor_hyper_clip": dict(
        inner_optimizer=metazoo.SGD(0.1, momentum=torch.tensor(0.5, dtype=DTYPE)),
        inner_grad_clip=0.05),
}


def imaml(config: str, vectorize=False, **overrides) -> iMAML:
    kwargs = {"inner_steps": 3, "lam": 2.0, "cg_steps": 3, **IMAML_CONFIGS[config], **overrides}
    return iMAML(model=bn_net(), criterion=F.cross_entropy, vectorize=vectorize, **kwargs)


@pytest.mark.parametrize("config", sorted(IMAML_CONFIGS))
def test_imaml_vectorized_equals_the_loop(config):
    """Two support batches: the Hessian is that of their mean loss, as in the loop."""
    batch = tasks(support_batches=2)
    expected, expected_result = meta_gradients(imaml(config), batch)
    assert all(g.abs().max() > 0 for g in expected.values())
    for vectorize in (True, 3):
        got, result = meta_gradients(imaml(config, vectorize), batch)
        assert_same_gradients(got, expected)
        assert_same_results(result, expected_result)
    loop_eval = imaml(config).evaluate(batch, steps=2)
    vectorized_eval = imaml(config, 2).evaluate(batch, steps=2)
    assert vectorized_eval.loss == pytest.approx(loop_eval.loss, rel=1e-10)
    assert vectorized_eval.inner_losses == pytest.approx(loop_eval.inner_losses, rel=1e-10)
    flat = [value for row in vectorized_eval.per_task for value in row]
    assert flat == pytest.approx([value for row in loop_eval.per_task for value in row],
                                 rel=1e-10)


@pytest.mark.parametrize("config", ["running_sgd", "adam_damping"])
def test_imaml_mapped_adaptation_and_implicit_gradient_equal_the_loops(config):
    """Inside the map, each task's adapted parameters, BatchNorm running statistics and implicit
    gradient (CG on torch.func Hessian-vector products) equal the loop's for that task."""
    learner_ = imaml(config)
    batch = tasks(support_batches=2)
    support, query = metazoo.vectorize.stack_tasks(batch)

    def run(support, query):
        task = metazoo.Task(support, query)
        result, _ = learner_._unroll(task, 3, vectorized=True)
        grads, loss, _ = learner_._functional_implicit_gradient(task, result.params,
                                                                result.buffers)
        return result.params, result.buffers, grads, loss

    with torch.no_grad():
        params, buffers, grads, losses = metazoo.vectorize.map_tasks(
            run, [support, query], TASKS, 3)
    assert buffers
    names = [n for n, _ in learner_.named_meta_parameters()]
    for index, task in enumerate(batch):
        result, _ = learner_._unroll(task, 3)
        loop_grads, loop_loss, _ = learner_.implicit_gradient(task, result.params,
                                                              result.buffers)
        assert_same_gradients({n: params[n][index] for n in params}, result.params)
        assert_same_gradients({n: buffers[n][index].to(DTYPE) for n in buffers},
                    {n: b.to(DTYPE) for n, b in result.buffers.items()})
        assert_same_gradients({n: g[index] for n, g in zip(names, grads, strict=True)},
                    dict(zip(names, loop_grads, strict=True)))
        assert losses[index].item() == pytest.approx(loop_loss.item(), rel=1e-10)


@pytest.mark.parametrize("vectorize,calls", [(False, TASKS * 5), (True, 5), (2, 10),
                                              ("auto", TASKS * 5)])
def test_imaml_vectorized_runs_once_per_chunk_and_never_falls_back(vectorize, calls):
    """3 inner steps + the query gradient + the support loss of the Hessian = 5 criterion calls
    per task in the loop, per chunk when vectorized; a silent fallback would make 20."""
    criterion = CountingCriterion()
    iMAML(model=bn_net(), criterion=criterion, inner_optimizer=metazoo.SGD(0.1), inner_steps=3,
          vectorize=vectorize).meta_backward(tasks())
    assert criterion.calls == calls
    assert criterion.batched == (0 if calls == TASKS * 5 else calls)


def test_imaml_vectorized_skips_and_raises_like_the_loop(monkeypatch):
    checks = []
    original = metazoo.task_fault
    monkeypatch.setattr(metazoo, "task_fault",
                        lambda *args: checks.append(args[0]) or original(*args))
    imaml("batch_sgd", True).meta_backward(tasks())
    assert checks == []  # one transfer for the meta-batch, no per-task check
    monkeypatch.undo()

    bad = tasks()
    bad[3] = metazoo.Task(bad[3].support, (bad[3].query[0] * float("nan"), bad[3].query[1]))
    expected, expected_result = meta_gradients(imaml("running_sgd", on_nonfinite="skip"), bad)
    got, result = meta_gradients(imaml("running_sgd", 3, on_nonfinite="skip"), bad)
    assert result.skipped_tasks == 1
    assert_same_gradients(got, expected)
    assert_same_results(result, expected_result)
    assert all(torch.isfinite(g).all() for g in got.values())

    bad[1] = metazoo.Task([(bad[1].support[0][0] * float("inf"), bad[1].support[0][1])],
                          bad[1].query)
    with pytest.raises(metazoo.NonFiniteError) as loop_error:
        imaml("batch_sgd").meta_backward(bad)
    learner_ = imaml("batch_sgd", True)
    with pytest.raises(metazoo.NonFiniteError) as error:
        learner_.meta_backward(bad)
    assert (error.value.task, error.value.inner_step, error.value.where) == (1, 0, "inner")
    assert str(error.value) == str(loop_error.value)
    assert all(p.grad is None for p in learner_.meta_parameters())


@pytest.mark.parametrize("vectorize", [True, 4, "auto"])
def test_imaml_channels_last_and_bad_values_raise(vectorize):
    with pytest.raises(ValueError, match=rf"vectorize={vectorize!r} does not support "
                                         rf"channels_last; .*vectorize=False"):
        imaml("batch_sgd", vectorize, channels_last=True)
    for bad in (0, "always", 2.0):
        with pytest.raises(ValueError, match="vectorize must be False"):
            imaml("batch_sgd", bad)
