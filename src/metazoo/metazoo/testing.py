"""Helpers for testing a learner against itself: on two devices, or vectorized against the loop.

The algorithm packages' ``tests/test_cuda.py`` use them to check that a float64 meta-step on
CUDA equals the CPU one (``pytest -m cuda``) and that no step mixes host and device tensors
(``strict_devices``, on a CPU); their ``tests/test_vectorize.py`` compare ``vectorize=True``
with the per-task loop in float64. A learner of another package can be checked the same way.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metazoo.devices import strict_devices
from metazoo.faults import NonFiniteError
from metazoo.learner import EvalResult, MetaLearner, MetaStepResult, Task

__all__ = [
    "HostSyncs",
    "MetaStepSnapshot",
    "WarpedMLP",
    "assert_one_transfer_meta_step_is_the_two_transfer_one",
    "assert_same_gradients",
    "assert_same_meta_step",
    "assert_same_results",
    "bn_net",
    "count_host_syncs",
    "image_tasks",
    "kill_at_call_command",
    "meta_gradients",
    "meta_step_snapshot",
    "small_conv_net",
    "small_mlp",
    "small_tasks",
    "strict_meta_step",
    "tasks_to",
]


class WarpedMLP(nn.Module):
    """adapt -> warp -> tanh -> adapt (BatchNorm) -> warp -> adapt head, on 3 features: the
    smallest model with two warp layers between adapted ones (``warpgrad``'s tests, and the
    distributed and Lightning tests that run a WarpGrad learner in several processes).

    Args:
        width: hidden width.
        classes: outputs.
        batch_norm: a BatchNorm1d after ``fc2`` (adapted); ``False`` puts an identity there.
    """

    def __init__(self, width: int = 4, classes: int = 3, batch_norm: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.warp1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.warp2 = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.warp1(self.fc1(x)))
        h = torch.tanh(self.warp2(self.bn(self.fc2(h))))
        return self.head(h)

    def adapt_modules(self) -> list[nn.Module]:
        """The adapted layers (``warpgrad.Warp``'s ``adapt_modules``)."""
        return [self.fc1, self.fc2, self.bn, self.head]

    def warp_modules(self) -> list[nn.Module]:
        """The warp layers (``warpgrad.Warp``'s ``warp_modules``)."""
        return [self.warp1, self.warp2]


def small_mlp(batch_norm: bool = False) -> nn.Module:
    """Linear(3, 5) -> tanh -> [BatchNorm1d] -> Linear(5, 3), float64; BatchNorm comes after
    the nonlinearity because before it the first bias would get no gradient."""
    layers = [nn.Linear(3, 5), nn.Tanh(), *([nn.BatchNorm1d(5)] if batch_norm else []),
              nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def small_conv_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv 3x3 (4 channels) -> BatchNorm -> ReLU -> max-pool 2 -> linear head (3 classes), for
    8x8 one-channel images, so convolutions and BatchNorm run on the device under test."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)


def image_tasks(count: int = 2, seed: int = 1, dtype: torch.dtype = torch.float64
                ) -> list[Task]:
    """``count`` tasks of two 6-image support batches and a 6-image query batch (8x8 images, 3
    classes), drawn on the CPU from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> tuple[Tensor, Tensor]:
        return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.arange(n) % 3

    return [Task([batch(6), batch(6)], batch(6)) for _ in range(count)]


def tasks_to(tasks: list[Task], device: torch.device | str) -> list[Task]:
    """The tasks with every tensor moved to ``device``."""
    def move(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch[0].to(device), batch[1].to(device)

    return [Task([move(b) for b in t.support], move(t.query)) for t in tasks]


@dataclass(frozen=True)
class MetaStepSnapshot:
    """One meta-step seen from outside, every tensor copied to the CPU.

    Attributes:
        grads: the meta-gradient of the meta-batch (``.grad`` after ``meta_backward``).
        adapted: the parameters adapted to the first task.
        stepped: the meta-parameters after one ``meta_step`` on the meta-batch.
    """

    grads: dict[str, Tensor]
    adapted: dict[str, Tensor]
    stepped: dict[str, Tensor]


def meta_step_snapshot(learner: MetaLearner, tasks: list[Task]) -> MetaStepSnapshot:
    """Runs ``meta_backward``, ``adapt`` on the first task and one ``meta_step`` on ``tasks``."""
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    grads = {n: p.grad.cpu() for n, p in learner.named_meta_parameters() if p.grad is not None}
    adapted = {n: p.detach().cpu() for n, p in learner.adapt(tasks[0]).params.items()}
    learner.meta_step(tasks)
    stepped = {n: p.detach().cpu() for n, p in learner.named_meta_parameters()}
    return MetaStepSnapshot(grads, adapted, stepped)


def assert_same_meta_step(actual: MetaStepSnapshot, expected: MetaStepSnapshot,
                          tol: float = 1e-10) -> None:
    """Both snapshots hold the same, non-empty tensors under the same names, equal to ``tol``."""
    for field in ("grads", "adapted", "stepped"):
        got, want = getattr(actual, field), getattr(expected, field)
        assert want, f"{field}: empty snapshot"
        assert got.keys() == want.keys(), f"{field}: {sorted(got)} != {sorted(want)}"
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol,
                                       msg=f"{field} {name}")


def strict_meta_step(build: Callable[[], MetaLearner], tasks: list[Task]
                     ) -> tuple[MetaStepResult, EvalResult]:
    """Builds a learner, then takes a meta-step, an adaptation and an evaluation, all under
    ``strict_devices``: tensors that exist before (the model, ``tasks``) stand for device
    tensors, so a tensor the learner makes on the host, when built or when stepping, fails."""
    with strict_devices():
        learner = build()
        result = learner.meta_step(tasks)
        learner.adapt(tasks[0])
        evaluation = learner.evaluate(tasks)
    return result, evaluation


def _meta_step_outcome(learner: MetaLearner, tasks: list[Task], grad_hook: Any
                       ) -> tuple[Any, ...]:
    try:
        result: Any = dataclasses.replace(learner.meta_step(tasks, grad_hook=grad_hook),
                                          seconds=0.0)
        error = None
    except NonFiniteError as raised:
        result, error = None, (str(raised), raised.task, raised.where, raised.inner_step,
                               raised.names)
    params = {n: p.detach().clone() for n, p in learner.named_meta_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone()
             for n, p in learner.named_meta_parameters()}
    state = learner.meta_optimizer.state_dict()["state"]
    return result, error, params, grads, state


def assert_one_transfer_meta_step_is_the_two_transfer_one(build: Callable[[], MetaLearner],
                                                          tasks: list[Task]) -> None:
    """``meta_step`` reading the meta-batch's faults and means after the optimizer step, with
    its finite check (one host transfer: the default), ends exactly as reading them before the
    step (two transfers: what a ``grad_hook`` makes it do): the same result or the same
    ``NonFiniteError``, and bit for bit the same meta-parameters, ``.grad`` (or ``None``) and
    optimizer state. ``build`` makes a fresh, identical learner for each."""
    deferred = _meta_step_outcome(build(), tasks, None)
    hooked = _meta_step_outcome(build(), tasks, lambda learner, result: None)
    # repr: a NaN loss (no task kept) is not equal to itself; repr round-trips floats exactly.
    assert repr(deferred[:2]) == repr(hooked[:2]), f"{deferred[:2]} != {hooked[:2]}"
    for index, what in ((2, "parameter"), (3, "gradient")):
        assert deferred[index].keys() == hooked[index].keys()
        for name, got in deferred[index].items():
            want = hooked[index][name]
            assert (got is None) == (want is None), f"{what} {name}: {got} != {want}"
            if got is not None:
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{what} {name}")
    assert deferred[4].keys() == hooked[4].keys(), "optimizer state"
    for key, entries in deferred[4].items():
        assert entries.keys() == hooked[4][key].keys()
        for field, got in entries.items():
            want = hooked[4][key][field]
            if isinstance(got, Tensor):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                           msg=f"optimizer state {key} {field}")
            else:
                assert got == want, f"optimizer state {key} {field}: {got} != {want}"


# -- vectorized against the loop (float64) -------------------------------------------------------

def bn_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv 3x3 (3 channels, no bias) -> BatchNorm (random affine) -> ReLU -> max-pool 2 ->
    linear head (3 classes), for 6x6 one-channel images (``small_tasks``).

    No bias before BatchNorm: its support gradient is pure rounding noise, which Adam's
    normalised step would amplify into differences between any two evaluation orders.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).to(dtype)
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net


def small_tasks(count: int = 4, seed: int = 1, support_batches: int = 1,
                dtype: torch.dtype = torch.float64) -> list[Task]:
    """``count`` tasks of 3 classes on 6x6 images: ``support_batches`` batches of 2 images per
    class, a query batch of 3 per class; every task has the same shapes (vectorizable)."""
    g = torch.Generator().manual_seed(seed)

    def batch(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(3).repeat(per_class)
        return torch.randn(len(y), 1, 6, 6, generator=g, dtype=dtype), y

    return [Task([batch(2) for _ in range(support_batches)], batch(3)) for _ in range(count)]


def meta_gradients(learner: MetaLearner, tasks: list[Task]
                   ) -> tuple[dict[str, Tensor], MetaStepResult]:
    """``(meta-gradient by name, result)`` of one ``meta_backward`` from zeroed gradients."""
    learner.meta_optimizer.zero_grad(set_to_none=True)
    result = learner.meta_backward(tasks)
    grads = {n: p.grad.clone() for n, p in learner.named_meta_parameters() if p.grad is not None}
    return grads, result


def assert_same_gradients(actual: dict[str, Tensor], expected: dict[str, Tensor],
                          tol: float = 1e-10) -> None:
    """Same non-empty names; every entry within ``tol`` of ``expected``, relative to its largest
    magnitude (at least 1)."""
    assert actual.keys() == expected.keys() and expected, (sorted(actual), sorted(expected))
    scale = max(1.0, max(t.abs().max().item() for t in expected.values()))
    for name in expected:
        assert (actual[name] - expected[name]).abs().max().item() <= tol * scale, name


def assert_same_results(actual: MetaStepResult, expected: MetaStepResult,
                        tol: float = 1e-10) -> None:
    """Task counts equal; meta-loss, accuracy and inner-loss curve within ``tol``."""
    assert actual.num_tasks == expected.num_tasks
    assert actual.skipped_tasks == expected.skipped_tasks
    assert math.isclose(actual.meta_loss, expected.meta_loss, rel_tol=tol, abs_tol=tol)
    assert (actual.accuracy is None) == (expected.accuracy is None)
    if expected.accuracy is not None:
        assert math.isclose(actual.accuracy, expected.accuracy,  # type: ignore[arg-type]
                            abs_tol=tol)
    assert len(actual.inner_losses) == len(expected.inner_losses)
    for got, want in zip(actual.inner_losses, expected.inner_losses, strict=True):
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol)


# Runs a script in this interpreter and SIGKILLs its own process at the N-th call of an ``os``
# function: a kill -9 at a chosen moment, reproducible, with no hook in the code under test.
_KILL_AT_CALL = """
import os, runpy, signal, sys
name, call = sys.argv[1], int(sys.argv[2])
real = getattr(os, name)
count = 0
def killing(*args, **kwargs):
    global count
    count += 1
    if count == call:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, name, killing)
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def kill_at_call_command(script: str | os.PathLike[str], argv: Sequence[str], *,
                         function: str = "replace", call: int = 1) -> list[str]:
    """A command (for ``subprocess``) that runs ``script argv...`` and kills its process with
    SIGKILL at the ``call``-th call of ``os.<function>``.

    ``"replace"`` kills an atomic write after its temporary file is complete and before the
    rename; ``"fsync"`` before the temporary is flushed to disk. Either is where a kill -9
    costs a run folder the most, so the experiments' resume tests kill there, at varying calls.
    """
    if not callable(getattr(os, function, None)):
        raise ValueError(f"os.{function} is not a function")
    if call < 1:
        raise ValueError(f"call={call} must be >= 1")
    return [sys.executable, "-c", _KILL_AT_CALL, function, str(call), os.fspath(script),
            *argv]


@dataclass
class HostSyncs:
    """What ``count_host_syncs`` counted: ``count`` transfers of a tensor's value to the host."""

    count: int = 0


_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Counts the Python calls that read a tensor's value on the host (``item``, ``tolist``,
    ``bool``/``int``/``float``/``__index__`` of a tensor) inside the block: on a GPU each one
    waits for the device. A call made inside another counts once."""
    syncs, depth = HostSyncs(), [0]
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            syncs.count += depth[0] == 0
            depth[0] += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(method))
        yield syncs
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
