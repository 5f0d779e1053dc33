"""Distributed meta-training on ``torch.distributed``: one process per device, under torchrun.

Update rule (data-parallel meta-learning). A meta-batch of N tasks is split over W processes
(ranks); rank r adapts its n_r tasks, and its learner's ``meta_backward`` leaves the mean over
its own tasks, g_r = (1/n_r) sum_{T in shard r} g_T, in ``.grad``. One all-reduce (sum) of the
buffer ``[n_r, has_grad flags, n_r * g_r]`` per (device, dtype) gives N = sum_r n_r and
sum_T g_T, and every rank writes g = (1/N) sum_T g_T: the mean over ALL tasks of the
meta-batch, the gradient a single process computes on the whole meta-batch. It stays exact for
uneven shards and for ranks with no task (they send zeros and a count of 0). Every rank then
takes the same meta-optimizer step from the same state, so the meta-parameters stay identical
(``broadcast_learner`` once at start, ``check_synchronized`` to verify).

This holds for every learner whose ``meta_backward`` is the mean over tasks of per-task
meta-gradients: MAML and its variants, Reptile, Leap and WarpGrad (each rank records and
replays its own tasks' states; the warp gradient, a mean over replayed states, is a mean over
tasks because every task records the same number of states, and the init gradient is a mean
over tasks). Parameters that get no gradient on any rank keep ``.grad = None``, as in a single
process, so optimizers skip them the same way.

Typical use (``torchrun --nproc_per_node N main.py``; a plain ``python main.py`` needs nothing
more, every function below is then a no-op or the single-process behaviour)::

    ctx = distributed.setup()                     # reads RANK, WORLD_SIZE, ... from torchrun
    learner = build_learner(device=ctx.device)
    distributed.broadcast_learner(learner)        # identical start on every rank
    for step in range(steps):
        tasks = sample_meta_batch(seed=args.seed + step)      # the same on every rank
        result = distributed.meta_step(learner, distributed.shard(tasks))
        if distributed.is_main_process():
            log(result)                           # result is over the whole meta-batch
    distributed.save_checkpoint(learner.state_dict(), path)   # written by rank 0 only
    distributed.teardown()

Reference:
    Li et al. PyTorch Distributed: Experiences on Accelerating Data Parallel Training.
    VLDB 2020 (gradient all-reduce over flattened buckets, as here).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metazoo.faults import NonFiniteError
from metazoo.learner import EvalResult, MetaLearner, MetaStepResult, Task
from metazoo.serialization import atomic_save

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedContext",
    "PeerLostError",
    "all_reduce_meta_gradients",
    "barrier",
    "broadcast_learner",
    "check_synchronized",
    "evaluate",
    "gradient_hook",
    "is_main_process",
    "meta_step",
    "rank",
    "rank_seed",
    "save_checkpoint",
    "seed_process",
    "setup",
    "shard",
    "shard_range",
    "teardown",
    "world_size",
]

T = TypeVar("T")
Group = Any  # a torch.distributed ProcessGroup, or None for the default (world) group

#: Process-group timeout when none is given: a collective that waits longer (a rank crashed or
#: stalled) raises on the ranks still waiting instead of hanging forever.
DEFAULT_TIMEOUT = timedelta(minutes=10)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# -- process group ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the run.

    Attributes:
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this node; selects the GPU.
        device: the device this process computes on (``cuda:local_rank`` or ``cpu``).
        backend: ``"gloo"``, ``"nccl"``, ..., or ``None`` when no process group was set up.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_distributed(self) -> bool:
        """Whether a process group is set up (possibly of size 1 under torchrun)."""
        return self.backend is not None

    @property
    def is_main_process(self) -> bool:
        """Whether this is rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        teardown()


def _check_timeout(timeout: float | timedelta) -> timedelta:
    seconds = (timeout.total_seconds() if isinstance(timeout, timedelta)
               else timeout if isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
               else None)
    if seconds is None or not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"timeout must be a positive, finite number of seconds or a timedelta, "
                         f"got {timeout!r}; a failed rank must make the others raise, not hang")
    return timedelta(seconds=seconds)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer; launch "
                           f"with torchrun, which sets it") from None


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or a torch.device, got "
                         f"{device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
        index = local_rank if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} needs GPU {index}, but only "
                               f"{torch.cuda.device_count()} are visible; start at most that "
                               f"many processes per node (torchrun --nproc_per_node)")
        resolved = torch.device("cuda", index)
        torch.cuda.set_device(resolved)
    return resolved


def setup(*, device: str | torch.device | None = None, backend: str | None = None,
          timeout: float | timedelta = DEFAULT_TIMEOUT) -> DistributedContext:
    """Initialises the default process group from the torchrun environment, if there is one.

    Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
    set), joins the process group with ``init_method="env://"``. Without those variables (a
    plain ``python main.py``) nothing is initialised and the context says world size 1. If a
    process group already exists, it is used as is.

    Args:
        device: ``None`` (``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``), ``"cpu"``,
            ``"cuda"`` (GPU ``LOCAL_RANK``) or an explicit device.
        backend: ``None`` picks ``"nccl"`` for a CUDA device and ``"gloo"`` for the CPU.
        timeout: seconds (or a ``timedelta``) a collective may wait for the other ranks; when a
            rank fails or stalls, the others raise after this long instead of hanging.

    Returns:
        The process's rank, world size, local rank, device and backend.

    Raises:
        RuntimeError: the torchrun environment is incomplete or inconsistent.
    """
    timeout = _check_timeout(timeout)
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local,
                                  _resolve_device(device, local), str(dist.get_backend()))
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return DistributedContext(0, 1, 0, _resolve_device(device, 0), None)
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(f"torchrun environment is incomplete: {present} are set but "
                           f"{missing} are not; launch with torchrun, or unset RANK and "
                           f"WORLD_SIZE for a single process")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with "
                           "it, or run a single process without torchrun")
    rank_, size, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if size < 1 or not 0 <= rank_ < size or local < 0:
        raise RuntimeError(f"inconsistent torchrun environment RANK={rank_}, WORLD_SIZE={size}, "
                           f"LOCAL_RANK={local}; need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    resolved = _resolve_device(device, local)
    if backend is None:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
    if backend == "nccl" and resolved.type != "cuda":
        raise ValueError(f"backend='nccl' needs a CUDA device, got device={resolved}; use "
                         f"backend='gloo' on the CPU")
    dist.init_process_group(backend, init_method="env://", rank=rank_, world_size=size,
                            timeout=timeout,
                            device_id=resolved if resolved.type == "cuda" else None)
    return DistributedContext(rank_, size, local, resolved, backend)


def teardown() -> None:
    """Destroys the default process group if one exists (a no-op otherwise)."""
    if _active():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group: Group = None) -> int:
    return dist.get_rank(group) if _active() else 0


def _world_size(group: Group = None) -> int:
    return dist.get_world_size(group) if _active() else 1


def rank(group: Group = None) -> int:
    """This process's rank (0 without a process group)."""
    return _rank(group)


def world_size(group: Group = None) -> int:
    """Number of processes (1 without a process group)."""
    return _world_size(group)


def is_main_process(group: Group = None) -> bool:
    """Whether this process is rank 0: the one that logs and writes checkpoints."""
    return _rank(group) == 0


def barrier(group: Group = None) -> None:
    """Waits until every rank reaches this point (a no-op without a process group)."""
    if _active():
        dist.barrier(group)


def save_checkpoint(state: Any, path: str | os.PathLike[str], *, group: Group = None) -> None:
    """Writes ``state`` with ``torch.save`` on rank 0 only, then waits for every rank.

    The file is written to a temporary name and renamed, so a reader never sees half a
    checkpoint; the barrier means that after this returns, every rank may read it.

    Args:
        state: what to save, e.g. ``learner.state_dict()`` (identical on every rank).
        path: destination file; its folder must exist.
        group: process group (default: the world).
    """
    target = Path(path)
    if is_main_process(group):
        if not target.parent.is_dir():
            raise ValueError(f"path={str(path)!r}: folder {str(target.parent)!r} does not "
                             f"exist; create it first")
        atomic_save(state, target)
    barrier(group)


# -- sharding and seeding -----------------------------------------------------------------------


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def shard_range(num_tasks: int, *, rank: int | None = None, world_size: int | None = None
                ) -> range:
    """The indices of the meta-batch that ``rank`` adapts.

    Contiguous blocks whose sizes differ by at most one, the first ``num_tasks % world_size``
    ranks taking one more; ranks past ``num_tasks`` get an empty range. Deterministic, and the
    blocks in rank order are ``range(num_tasks)``.

    Args:
        num_tasks: tasks in the whole meta-batch.
        rank: default: this process's rank.
        world_size: default: the number of processes.
    """
    _check_count("num_tasks", num_tasks, 0)
    size = _world_size() if world_size is None else _check_count("world_size", world_size, 1)
    index = _rank() if rank is None else _check_count("rank", rank, 0)
    if index >= size:
        raise ValueError(f"rank={index} must be < world_size={size}")
    base, extra = divmod(num_tasks, size)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def shard(tasks: Sequence[T], *, rank: int | None = None, world_size: int | None = None
          ) -> list[T]:
    """This rank's share of a meta-batch that every rank drew identically (``shard_range``).

    Args:
        tasks: the whole meta-batch, the same on every rank (same sampling seed).
        rank: default: this process's rank.
        world_size: default: the number of processes.
    """
    if isinstance(tasks, Task):
        raise ValueError("shard expects the meta-batch (a sequence of tasks), got a single Task")
    if not isinstance(tasks, Sequence):
        if not isinstance(tasks, Iterable):
            raise ValueError(f"shard expects the meta-batch (a sequence of tasks), got "
                             f"{type(tasks).__name__}")
        tasks = list(tasks)  # a generator: read once (every rank reads the whole meta-batch)
    return [tasks[i] for i in shard_range(len(tasks), rank=rank, world_size=world_size)]


def rank_seed(seed: int, *, rank: int | None = None) -> int:
    """A seed for ``rank`` derived from the run's ``seed``.

    Ranks get different, reproducible seeds (a hash of ``(seed, rank)``), so per-rank task
    samplers draw different tasks and a rerun with the same seed and world size draws the same
    ones. To draw the same tasks whatever the world size, seed every rank with ``seed`` itself
    and ``shard`` the meta-batch instead.

    Args:
        seed: the run's seed, an int >= 0.
        rank: default: this process's rank.

    Returns:
        An int in ``[0, 2**63)``.
    """
    _check_count("seed", seed, 0)
    index = _rank() if rank is None else _check_count("rank", rank, 0)
    digest = hashlib.blake2b(f"metazoo.rank_seed:{seed}:{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def seed_process(seed: int, *, rank: int | None = None) -> int:
    """Seeds ``torch`` (every device) and ``random`` with ``rank_seed(seed, rank=rank)``.

    Returns:
        The seed used.
    """
    derived = rank_seed(seed, rank=rank)
    torch.manual_seed(derived)
    random.seed(derived)
    return derived


# -- meta-gradients and meta-parameters ----------------------------------------------------------


def _unique(tensors: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    seen: set[int] = set()
    out = []
    for name, t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _by_kind(named: Sequence[tuple[str, Tensor]]
             ) -> dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor]]]:
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor]]] = {}
    for name, t in named:
        groups.setdefault((t.device, t.dtype), []).append((name, t))
    return groups


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums of many ranks lose digits; float32 and float64 are kept as they are.
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


@dataclass(frozen=True)
class _Reduced:
    """What one gradient all-reduce learnt about the meta-batch besides the gradients."""

    kept: int  # tasks over all ranks that contributed to the gradient
    skipped: int  # tasks over all ranks left out for a non-finite loss
    tasks_per_rank: tuple[int, ...]  # every rank's share of the meta-batch, in rank order


def all_reduce_meta_gradients(learner: MetaLearner, *, num_tasks: int, fault: bool = False,
                              skipped_tasks: int = 0, group: Group = None) -> int:
    """Replaces each meta-parameter's ``.grad`` by the mean over every rank's tasks.

    Each rank's ``.grad`` must hold the mean over its ``num_tasks`` tasks (what
    ``meta_backward`` leaves); a rank with no task passes ``num_tasks=0`` and still takes part.
    One all-reduce per (device, dtype) of the meta-parameters, not one per tensor.

    Args:
        learner: the learner after ``meta_backward``.
        num_tasks: tasks of this rank that contributed to its ``.grad`` (>= 0).
        fault: this rank stopped on a non-finite loss before its gradients were complete; it
            joins the collective its peers wait in, and every rank raises instead of waiting
            for the process group's timeout.
        skipped_tasks: tasks of this rank left out for a non-finite loss
            (``on_nonfinite="skip"``). When every task of every rank was skipped, the
            gradients stay ``None`` (as in one process: the meta-step changes nothing)
            instead of raising.
        group: process group (default: the world).

    Returns:
        The number of tasks over all ranks that contributed to the gradient.

    Raises:
        RuntimeError: no rank had a task.
        NonFiniteError: (``where="other_rank"``) some rank passed ``fault=True``; every
            rank's meta-gradients are cleared.
    """
    _check_count("num_tasks", num_tasks, 0)
    _check_count("skipped_tasks", skipped_tasks, 0)
    return _all_reduce(learner, kept=num_tasks, skipped=skipped_tasks, fault=fault,
                       group=group).kept


def _all_reduce(learner: MetaLearner, *, kept: int, skipped: int, fault: bool,
                group: Group, share: int | None = None) -> _Reduced:
    """The all-reduce; ``share`` is this rank's number of tasks (default ``kept + skipped``)."""
    share = kept + skipped if share is None else share
    if _world_size(group) == 1:
        return _Reduced(kept, skipped, (share,))
    size, me = _world_size(group), _rank(group)
    params = _unique(learner.named_meta_parameters())
    reduced = None
    for (device, dtype), members in _by_kind(params).items():
        for name, p in members:
            if p.grad is not None and (p.grad.is_sparse or p.grad.layout != torch.strided):
                raise RuntimeError(f"meta-parameter {name!r} has a {p.grad.layout} gradient; "
                                   f"only dense gradients can be all-reduced")
        reduce_dtype = _reduce_dtype(dtype)
        # [kept, skipped, fault, tasks of rank 0 .. W-1, has-grad flag per tensor,
        #  kept * gradients]: counts and flags travel in the same collective as the gradients,
        # so uneven, empty and fully skipped shards and faults cost nothing extra, and every
        # rank learns the others' shard sizes (to name a task by its index in the meta-batch).
        header_size = 3 + size + len(members)
        sizes = [p.numel() for _, p in members]
        buffer = torch.zeros(header_size + sum(sizes), dtype=reduce_dtype, device=device)
        shares = [0.0] * size
        shares[me] = float(share)
        header = [float(kept), float(skipped), float(fault), *shares] + [
            float(p.grad is not None and kept > 0) for _, p in members]
        buffer[:header_size].copy_(torch.tensor(header, dtype=reduce_dtype))
        slices = list(torch.split(buffer[header_size:], sizes))
        if kept > 0:
            for (_, p), chunk in zip(members, slices):
                if p.grad is not None:
                    chunk.copy_(p.grad.reshape(-1))
            if kept != 1:
                buffer[header_size:].mul_(kept)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        counts = buffer[:header_size].tolist()
        reduced = _Reduced(round(counts[0]), round(counts[1]),
                           tuple(round(c) for c in counts[3:3 + size]))
        if counts[2] > 0:
            for _, p in params:
                p.grad = None
            raise _FaultElsewhere(reduced)
        if reduced.kept == 0:
            for _, p in params:
                p.grad = None
            if reduced.skipped == 0:
                raise RuntimeError("no rank had a task in this meta-step; give the meta-batch "
                                   "at least one task")
            continue  # every task was skipped: no meta-gradient, as in one process
        buffer[header_size:].div_(reduced.kept)
        for (_, p), chunk, flag in zip(members, slices, counts[3 + size:]):
            if flag == 0:
                p.grad = None  # no rank produced a gradient: stays None, as in one process
                continue
            grad = chunk.view(p.shape)
            if p.grad is None:
                p.grad = grad.to(p.dtype, copy=True) if grad.dtype != p.dtype else grad
            else:
                p.grad.copy_(grad)
    return reduced if reduced is not None else _Reduced(kept, skipped, ())


class _FaultElsewhere(NonFiniteError):
    """``NonFiniteError(where="other_rank")`` that also carries the collective's counts."""

    def __init__(self, reduced: _Reduced) -> None:
        super().__init__(task=None, inner_step=None, where="other_rank")
        self.reduced = reduced

    def __reduce__(self) -> tuple[Any, ...]:
        return NonFiniteError(task=None, inner_step=None, where="other_rank").__reduce__()


def gradient_hook(*, group: Group = None) -> Callable[[MetaLearner, MetaStepResult], None]:
    """A ``grad_hook`` for ``MetaLearner.meta_step`` that all-reduces the meta-gradients.

    Example:
        >>> learner.meta_step(distributed.shard(tasks), grad_hook=distributed.gradient_hook())

    Each process is weighted by the tasks that contributed to its gradient (``num_tasks -
    skipped_tasks`` of its step result), so the update is the mean over every task of the
    meta-batch that was not skipped, whatever the shards' sizes.

    Args:
        group: process group (default: the world).
    """

    def hook(learner: MetaLearner, result: MetaStepResult) -> None:
        all_reduce_meta_gradients(learner, num_tasks=result.num_tasks - result.skipped_tasks,
                                  skipped_tasks=result.skipped_tasks, group=group)

    return hook


def _gather(value: Any, group: Group) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _weighted(parts: Sequence[tuple[int, Sequence[float]]]) -> list[float]:
    total = sum(n for n, _ in parts)
    return [sum(n * v[i] for n, v in parts) / total for i in range(len(parts[0][1]))]


def meta_step(learner: MetaLearner, tasks: Sequence[Task], *,
              group: Group = None) -> MetaStepResult:
    """One meta-update over the meta-batch split across ranks; ``tasks`` is this rank's share.

    Runs ``learner.meta_step`` with ``gradient_hook`` (a rank with no task zeroes, all-reduces
    and steps without a ``meta_backward``), so every rank applies the gradient of the mean
    objective over all tasks. Without a process group it is ``learner.meta_step(tasks)``.

    With ``on_nonfinite="skip"`` the step equals the single-process step on the whole
    meta-batch: the mean is over the tasks kept on every rank, ``skipped_tasks`` counts the
    skipped tasks of every rank, and a rank whose every task is skipped still takes part. With
    ``on_nonfinite="raise"`` the rank that met the fault raises ``NonFiniteError`` naming the
    task by its index in the whole meta-batch (ranks' shares in rank order, as ``shard``
    splits it) and every other rank raises ``where="other_rank"`` at once.

    Args:
        learner: any ``MetaLearner``, built identically on every rank.
        tasks: this rank's tasks (see ``shard``); may be empty when other ranks have tasks.
        group: process group (default: the world).

    Returns:
        The step's results over the whole meta-batch (the same on every rank) and this rank's
        wall-clock time.

    Raises:
        NonFiniteError: as above, or a non-finite meta-gradient or meta-update (every rank).
        RuntimeError: another rank died during the step (its log has the cause).
    """
    tasks = _task_list(tasks, "meta_step")
    start = time.perf_counter()
    if _world_size(group) == 1:
        return learner.meta_step(tasks)
    joined = False

    def hook(learner: MetaLearner, result: MetaStepResult) -> None:
        # A rank with no task still zeroes, joins the all-reduce and steps (num_tasks=0).
        nonlocal joined
        joined = True
        _all_reduce(learner, kept=result.num_tasks - result.skipped_tasks,
                    skipped=result.skipped_tasks, fault=False, group=group)

    with _peer_loss_explained("meta-step"):
        try:
            stepped = learner.meta_step(tasks, grad_hook=hook)
        except _FaultElsewhere as elsewhere:
            raise NonFiniteError(task=None, inner_step=None, where="other_rank") from elsewhere
        except NonFiniteError as error:
            if joined:
                raise
            # This rank stopped on a non-finite loss (on_nonfinite="raise") while its peers
            # wait in the gradient all-reduce: join it with the fault flagged, so that every
            # rank raises now instead of waiting for the process group's timeout. The
            # collective also tells the shares of the other ranks: name the task by its index
            # in the whole meta-batch, not in this rank's share.
            offsets: tuple[int, ...] = ()
            try:
                _all_reduce(learner, kept=0, skipped=0, fault=True, group=group,
                            share=len(tasks))
            except _FaultElsewhere as elsewhere:
                offsets = elsewhere.reduced.tasks_per_rank[:_rank(group)]
            if error.task is None:
                raise
            raise NonFiniteError(task=sum(offsets) + error.task, inner_step=error.inner_step,
                                 where=error.where, meta_step=error.meta_step,
                                 names=error.names, then=error.then) from None
        parts = _gather((stepped.num_tasks, stepped.skipped_tasks, stepped.meta_loss,
                         stepped.inner_loss, stepped.accuracy, tuple(stepped.inner_losses)),
                        group)
    num_tasks = sum(p[0] for p in parts)
    skipped = sum(p[1] for p in parts)
    # Each rank's losses are means over its kept tasks: weight them by that count, and leave
    # out ranks that kept none (their losses are NaN, their curves empty).
    kept = [(p[0] - p[1], p) for p in parts if p[0] - p[1] > 0]
    if not kept:
        nan = float("nan")
        return MetaStepResult(nan, nan, None, (), num_tasks, time.perf_counter() - start,
                              skipped)
    values = _weighted([(n, (p[2], p[3], *p[5])) for n, p in kept])
    accuracy = (None if any(p[4] is None for _, p in kept)
                else _weighted([(n, (p[4],)) for n, p in kept])[0])
    return MetaStepResult(values[0], values[1], accuracy, tuple(values[2:]), num_tasks,
                          time.perf_counter() - start, skipped)


def _task_list(tasks: Any, function: str) -> list[Task]:
    """``tasks`` as a list (a generator is read once); a single ``Task`` is refused."""
    if isinstance(tasks, Task):
        raise ValueError(f"{function} expects a sequence of tasks, got a single Task; pass "
                         f"[task]")
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise ValueError(f"{function} expects a sequence of tasks, got "
                         f"{type(tasks).__name__}")
    return list(tasks)


class PeerLostError(RuntimeError):
    """Another process of the distributed run exited while this one waited in a collective.

    Not a bug of this process: its message (one line) says so and where to look for the cause;
    the backend's own error is chained as ``__cause__``.
    """


#: Fragments of the errors gloo and NCCL raise when a peer's connection drops (it exited).
_PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe",
              "socket closed", "connection refused", "remote process exited",
              "nccl communicator was aborted")


@contextlib.contextmanager
def _peer_loss_explained(during: str) -> Iterator[None]:
    """Turns the backend's raw 'Connection reset by peer' into what happened and what to do."""
    try:
        yield
    except RuntimeError as error:  # gloo raises RuntimeError, NCCL DistBackendError (a subclass)
        if isinstance(error, NonFiniteError):
            raise
        text = str(error)
        if not any(fragment in text.lower() for fragment in _PEER_LOST):
            raise
        # gloo's "[.../pair.cc:561] Connection closed by peer [127.0.0.1]:41152. This is ...":
        # the first sentence without the source location.
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip()
                       else type(error).__name__).split(". ")[0]
        raise PeerLostError(
            f"rank {_rank()}: another process of the distributed run exited during the "
            f"{during} (the collective lost its connection: {first[:200]}); its own log or "
            f"torchrun's summary names the first error. Fix that and resume from the last "
            f"checkpoint") from error


def evaluate(learner: MetaLearner, tasks: Sequence[Task], *, steps: int | None = None,
             group: Group = None) -> EvalResult:
    """Evaluates held-out tasks split across ranks; ``tasks`` is this rank's share.

    Args:
        learner: the learner (meta-parameters are not changed).
        tasks: this rank's tasks (see ``shard``); may be empty when other ranks have tasks.
        steps: inner steps (default: the learner's).
        group: process group (default: the world).

    Returns:
        The evaluation over every rank's tasks, ``per_task`` in rank order (with ``shard``, the
        order of the meta-batch); the same on every rank.
    """
    tasks = _task_list(tasks, "evaluate")
    if _world_size(group) == 1:
        return learner.evaluate(tasks, steps=steps)
    with _peer_loss_explained("evaluation"):
        local = learner.evaluate(tasks, steps=steps) if tasks else None
        parts = [p for p in _gather(local, group) if p is not None]
    if not parts:
        raise RuntimeError("no rank had a task to evaluate; give at least one task")
    values = _weighted([(p.num_tasks, (p.loss, *p.inner_losses)) for p in parts])
    accuracy = (None if any(p.accuracy is None for p in parts)
                else _weighted([(p.num_tasks, (p.accuracy,)) for p in parts])[0])
    return EvalResult(values[0], accuracy, tuple(values[1:]), sum(p.num_tasks for p in parts),
                      tuple(t for p in parts for t in p.per_task))


def _state_tensors(learner: MetaLearner) -> list[tuple[str, Tensor]]:
    """Meta-parameters, then the model's other parameters and buffers, each tensor once."""
    named: list[tuple[str, Tensor]] = [(f"meta:{n}", p)
                                       for n, p in learner.named_meta_parameters()]
    named += [(f"model:{n}", p) for n, p in learner.model.named_parameters()]
    named += [(f"buffer:{n}", b) for n, b in learner.model.named_buffers()]
    return _unique(named)


def _flat(members: Sequence[tuple[str, Tensor]]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for _, t in members])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def broadcast_learner(learner: MetaLearner, *, src: int = 0, optimizer_state: bool = True,
                      group: Group = None) -> None:
    """Copies rank ``src``'s meta-parameters, model and meta-optimizer state to every rank.

    Call once after building the learner (and after loading a checkpoint on rank ``src``), so
    every rank starts from the same point; ``meta_step`` keeps them identical afterwards.

    Args:
        learner: the learner, built identically (same shapes) on every rank.
        src: the rank whose state wins.
        optimizer_state: also copy the meta-optimizer's ``state_dict`` (moments, step counts,
            learning rates); needed when only ``src`` loaded a checkpoint.
        group: process group (default: the world).
    """
    if _world_size(group) == 1:
        return
    _check_src(src, group)
    mine = dist.get_rank() == src
    for members in _by_kind(_state_tensors(learner)).values():
        flat = _flat(members)
        dist.broadcast(flat, src=src, group=group)
        if not mine:
            with torch.no_grad():
                for (_, t), chunk in zip(members, torch.split(flat, [t.numel()
                                                                     for _, t in members])):
                    t.copy_(chunk.view(t.shape))
    if optimizer_state:
        payload: list[Any] = [_to_cpu(learner.meta_optimizer.state_dict()) if mine else None]
        dist.broadcast_object_list(payload, src=src, group=group)
        if not mine:
            learner.meta_optimizer.load_state_dict(payload[0])


def _check_src(src: int, group: Group) -> None:
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < dist.get_world_size():
        raise ValueError(f"src must be a rank in [0, {dist.get_world_size()}), got {src!r}")


def check_synchronized(learner: MetaLearner, *, src: int = 0, group: Group = None) -> None:
    """Verifies that every rank holds exactly rank ``src``'s parameters and buffers.

    Compares bit for bit the meta-parameters and the model's parameters and buffers; every rank
    raises (the same message) if any rank differs, so no rank runs on alone.

    Args:
        learner: the learner on this rank.
        src: the reference rank.
        group: process group (default: the world).

    Raises:
        RuntimeError: a rank's tensors differ from rank ``src``'s (names and ranks listed), or
            the ranks' learners have different tensors (names, shapes or dtypes).
    """
    if _world_size(group) == 1:
        return
    _check_src(src, group)
    named = _state_tensors(learner)
    layouts = _gather([(n, tuple(t.shape), str(t.dtype)) for n, t in named], group)
    if any(layout != layouts[0] for layout in layouts):
        different = [r for r, layout in enumerate(layouts) if layout != layouts[0]]
        raise RuntimeError(f"ranks {different} hold differently shaped learners than rank 0; "
                           f"build the same model and learner on every rank")
    differing = []
    for members in _by_kind(named).values():
        reference = _flat(members)
        dist.broadcast(reference, src=src, group=group)
        chunks = torch.split(reference, [t.numel() for _, t in members])
        differing += [n for (n, t), chunk in zip(members, chunks)
                      if not torch.equal(t.detach().reshape(-1), chunk)]
    reports = _gather(differing, group)
    if any(reports):
        detail = "; ".join(f"rank {r}: {names}" for r, names in enumerate(reports) if names)
        raise RuntimeError(f"meta-parameters differ from rank {src}'s ({detail}); call "
                           f"distributed.broadcast_learner(learner) after building the learner "
                           f"and step with distributed.meta_step")
