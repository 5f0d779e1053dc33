"""Kernel launches per meta-step: ATen ops, kernel ops and host syncs of every learner (issue 26).

Small few-shot tasks are launch-bound on a GPU (each operation is roughly one kernel launch of
5-10 us while the GPU waits on Python), so the number of operations a meta-step dispatches ranks
implementations the way a GPU will, and a CPU counts it exactly. Every implementation runs one
meta-step under a ``TorchDispatchMode`` that counts:

- ``ops``: every ATen operation dispatched;
- ``kernel ops``: the same without views (``OpOverload.is_view``) and allocations of
  uninitialised memory (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``,
  ``new_empty_strided``): the operations that launch a kernel;
- ``copies``: ``aten._to_copy`` operations (tensor copies between devices or dtypes, and the
  copies ``Tensor.to(..., copy=True)`` makes: how the WarpGrad replay buffer used to copy every
  stored state tensor by tensor; WarpGrad table only);
- ``syncs``: transfers of a device value to the host, each of which makes the host wait for
  the device: ``Tensor.item``, ``tolist``, ``bool``/``int``/``float``/``__index__`` of a
  tensor (counted once per Python call) and any ``aten._local_scalar_dense``,
  ``aten.is_nonzero`` or ``aten.nonzero`` dispatched outside those calls, during a whole
  meta-step: for the learners their own ``meta_step`` (the meta-gradient, the checked
  meta-optimizer step and the reported result), for the hand-written rows the same
  meta-step as the op counts. Not counted: reads inside the optimizer's ``step``
  (``torch.optim.Adam`` reads its step counts with ``.item()``, but it keeps them on the host
  even for CUDA parameters, so they cost no sync), and reads of tensors the code makes on the
  host by construction through ``metazoo.host_list`` (the replay order WarpGrad draws with a
  CPU generator), which wait for no device on any machine.

The op counts are of a meta-step made of ``zero_grad``, the meta-gradient of the meta-batch into
``.grad`` (``meta_backward`` for the learners) and one Adam step: ``Impl.meta_step`` of
``gpu_meta_step.py``, whose implementations and workload this script uses, so its rows are the
ones timed there (a learner's own ``meta_step`` adds its finite check: a copy of the
parameters and the optimizer state, and one fused reduction). Rows: the hand-written per-task
loop (``functional_call`` + ``autograd.grad(create_graph=True)``), the hand-written
``vmap(grad_and_value(task_loss))``
form, and every learner of ``maml`` and ``leap`` through its loop (``vectorize=False``) and
vectorized (``vectorize=True``). Ratios: a vectorized learner against its own loop, MAML's
against the hand-written vmap form, the loops against the hand-written loop.

Workload W1: MAML's Omniglot net (4 x [conv3x3 64, BatchNorm with batch statistics, ReLU,
max-pool 2], linear head) on 1x28x28 inputs, 5-way 1-shot, 15 queries per class, 5 inner SGD
steps at lr 0.4, second order (except FOMAML, Reptile and Leap), float32, at 8 and 32 tasks.

Workload W2, WarpGrad on the reference's flags (``--meta_batch_size 4 --task_batch_size 128
--classes 20``) at 5 inner steps: one meta-step of the Omniglot experiment's ``warp_leap``
learner (``gpu_warp_meta_step.make_learner``: warp convolutions after each block,
stop-gradient warp objective over every recorded state, simplified Leap, meta-SGD), rows
``warpgrad`` (``vectorize=False``) and ``warpgrad_vectorized`` (``vectorize=True``: all tasks
adapted in one vmap, all 20 states replayed in one vmap), printed as their own table.

Usage::

    python benchmarks/launches.py                  # W1 at 8 and 32 tasks, W2 (CPU, minutes)
    python benchmarks/launches.py --impls warpgrad,warpgrad_vectorized   # W2 only
    python benchmarks/launches.py --tasks 32 --impls loop,vmap,maml,maml_vectorized
    python benchmarks/launches.py --tasks 8 --impls vmap,maml_vectorized --breakdown 25
    python benchmarks/launches.py --quick          # a smoke test: tiny net, 2 tasks, seconds
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_meta_step import Impl, as_task_list, make_tasks, omniglot_net

aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
               aten.new_empty.default, aten.new_empty_strided.default}
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default}
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
IMPLS = ("loop", "vmap", "maml", "maml_vectorized", "fomaml", "fomaml_vectorized", "reptile",
         "reptile_vectorized", "leap", "leap_vectorized", "imaml", "imaml_vectorized")
WARP_IMPLS = ("warpgrad", "warpgrad_vectorized")
# Each row's ratio is against this row (None: no ratio).
REFERENCE = {"loop": None, "vmap": "loop", "maml": "loop", "maml_vectorized": "vmap",
             "fomaml": "loop", "reptile": "loop", "leap": "loop", "imaml": "loop",
             **{f"{name}_vectorized": name for name in ("fomaml", "reptile", "leap", "imaml")}}


class Counter(TorchDispatchMode):
    """Counts ATen ops, kernel ops and host syncs while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.kernel_ops = self.syncs = self.copies = 0
        self.kernel_ops_by_name: collections.Counter[str] = collections.Counter()
        self.in_sync_method = 0
        self.count_syncs = False
        self.originals: dict[str, Any] = {}

    def __enter__(self) -> Counter:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self.originals[name] = original
            setattr(torch.Tensor, name, self._counted(original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def _counted(self, method: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.count_syncs and not self.in_sync_method:
                self.syncs += 1
            self.in_sync_method += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self.in_sync_method -= 1
        return counted

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.ops += 1
        if func is aten._to_copy.default:
            self.copies += 1
        if func in SYNC_OPS:
            if self.count_syncs and not self.in_sync_method:
                self.syncs += 1
        elif not (func.is_view or func in ALLOCATIONS):
            self.kernel_ops += 1
            self.kernel_ops_by_name[str(func)] += 1
        return func(*args, **(kwargs or {}))


def counted_meta_step(meta_step: Callable[[], Any], zero_grad: Callable[[], None],
                      backward: Callable[[], Any], step: Callable[[], None],
                      learner: Any = None) -> Counter:
    """The counter of one meta-step (``zero_grad``, ``backward``, ``step``), after a warm-up
    ``meta_step``. Its syncs are those of ``backward`` or, given a ``learner``, of one more
    ``learner.meta_step`` (``meta_step`` again), not counting its optimizer's ``step``."""
    meta_step()
    with Counter() as counter:
        zero_grad()
        counter.count_syncs = learner is None
        backward()
        counter.count_syncs = False
        step()
    if learner is not None:
        optimizer = learner.meta_optimizer
        with Counter() as whole:
            def uncounted_step(*args: Any, **kwargs: Any) -> Any:
                whole.count_syncs = False
                try:
                    return type(optimizer).step(optimizer, *args, **kwargs)
                finally:
                    whole.count_syncs = True

            optimizer.step = uncounted_step
            try:
                whole.count_syncs = True
                meta_step()
                whole.count_syncs = False
            finally:
                del optimizer.step
        counter.syncs = whole.syncs
    return counter


def count(impl: Impl, data: Any, breakdown: int = 0) -> tuple[int, int, int]:
    """(ops, kernel ops, syncs) of one meta-step, after a warm-up step; with ``breakdown``,
    prints that many of its most frequent kernel ops by name."""
    learner = impl.learner
    counter = counted_meta_step(
        (lambda: learner.meta_step(as_task_list(data))) if learner is not None
        else lambda: impl.meta_step(data),
        lambda: impl.optimizer.zero_grad(set_to_none=True), lambda: impl.backward(data),
        impl.optimizer.step, learner)
    if breakdown:
        print(f"\n{impl.name}: the {breakdown} most frequent of {counter.kernel_ops:,} kernel ops")
        for name, n in counter.kernel_ops_by_name.most_common(breakdown):
            print(f"  {n:6,}  {name}")
    return counter.ops, counter.kernel_ops, counter.syncs


def table(tasks: int, impls: list[str], filters: int, queries: int, breakdown: int = 0
          ) -> dict[str, tuple[int, ...]]:
    torch.manual_seed(0)
    base = omniglot_net(5, filters)
    data = make_tasks(5, tasks, queries, torch.device("cpu"), torch.float32)
    counts = {name: count(Impl(name, copy.deepcopy(base), None), data, breakdown)
              for name in impls}
    print(f"\n## W1, {tasks} tasks ({filters} filters, {queries} queries per class)\n")
    print("| implementation | ops | kernel ops | syncs | kernel ops ratio | against |")
    print("|---|---:|---:|---:|---:|---|")
    for name in impls:
        ops, kernel, syncs = counts[name]
        reference = REFERENCE.get(name)
        ratio = (f"{kernel / counts[reference][1]:.2f}x" if reference in counts else "-")
        print(f"| {name} | {ops:,} | {kernel:,} | {syncs} | {ratio} | "
              f"{reference if reference in counts else '-'} |")
    return counts


def count_warp(learner: Any, tasks: Any) -> tuple[int, int, int, int]:
    """(ops, kernel ops, syncs, copies) of one WarpGrad meta-step, after a warm-up step."""
    counter = counted_meta_step(lambda: learner.meta_step(tasks),
                                lambda: learner.meta_optimizer.zero_grad(set_to_none=True),
                                lambda: learner.meta_backward(tasks),
                                learner.meta_optimizer.step, learner)
    return counter.ops, counter.kernel_ops, counter.syncs, counter.copies


def warp_table(impls: list[str], tasks: int, batch: int, steps: int, filters: int
               ) -> dict[str, tuple[int, ...]]:
    from gpu_warp_meta_step import make_learner
    from gpu_warp_meta_step import make_tasks as make_warp_tasks

    cpu = torch.device("cpu")
    args = argparse.Namespace(classes=20, filters=filters)
    data = make_warp_tasks(tasks, steps, batch, 20, cpu, torch.float32)
    counts = {name: count_warp(make_learner(args, name.endswith("_vectorized"), cpu,
                                            torch.float32, steps), data)
              for name in impls}
    print(f"\n## W2, WarpGrad warp_leap: {tasks} tasks, batch {batch}, {steps} inner steps, "
          f"20 classes ({filters} filters)\n")
    print("| implementation | ops | kernel ops | syncs | copies | kernel ops ratio | against |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in impls:
        ops, kernel, syncs, copies = counts[name]
        ratio = (f"{kernel / counts['warpgrad'][1]:.3f}x"
                 if name != "warpgrad" and "warpgrad" in counts else "-")
        against = "warpgrad" if ratio != "-" else "-"
        print(f"| {name} | {ops:,} | {kernel:,} | {syncs} | {copies:,} | {ratio} | {against} |")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="8,32", help="meta-batch sizes, comma-separated")
    parser.add_argument("--impls", default=",".join(IMPLS + WARP_IMPLS),
                        help=f"rows, comma-separated, of {', '.join(IMPLS + WARP_IMPLS)}")
    parser.add_argument("--warp-tasks", type=int, default=4, help="W2 meta-batch size")
    parser.add_argument("--warp-batch", type=int, default=128, help="W2 task batch size")
    parser.add_argument("--warp-steps", type=int, default=5, help="W2 inner steps")
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="also print each row's N most frequent kernel ops by name")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8 filters, 2 tasks, 2 queries per class (W2: 2 tasks, "
                             "batch 8, 2 steps)")
    args = parser.parse_args()
    requested = args.impls.split(",")
    unknown = sorted(set(requested) - set(IMPLS + WARP_IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS + WARP_IMPLS)}")
    impls = [name for name in requested if name in IMPLS]
    warp_impls = [name for name in WARP_IMPLS if name in requested]
    torch.set_num_threads(1)
    if args.quick:
        if impls:
            table(2, impls, 8, 2, args.breakdown)
        if warp_impls:
            warp_table(warp_impls, 2, 8, 2, 8)
        return
    if impls:
        for tasks in args.tasks.split(","):
            table(int(tasks), impls, args.filters, args.queries, args.breakdown)
    if warp_impls:
        warp_table(warp_impls, args.warp_tasks, args.warp_batch, args.warp_steps, args.filters)


if __name__ == "__main__":
    main()
