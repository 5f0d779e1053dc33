"""Vectorized meta-batches (issue 17): second-order MAML meta-steps, loops against vmap.

Implementations, timed side by side in one process, alternating (the order reversed every other
round) after one warm-up meta-step each:

- ``loop``: the plain loop, ``torch.func.functional_call`` + ``torch.autograd.grad(
  create_graph=True)`` per task, one backward per task, then the Adam step.
- ``vmap``: the exact ``torch.func`` form written here: ``vmap(grad_and_value(task_loss),
  in_dims=(None, 0, 0, 0, 0))`` with the inner steps by ``torch.func.grad`` inside
  ``task_loss``, the per-task gradients averaged into ``.grad``, then the Adam step.
- ``maml``: ``maml.MAML`` (the library's loop, ``vectorize=False``).
- ``maml_vectorized``: ``maml.MAML(vectorize=True)`` (``metazoo.vectorize``), or chunks of
  ``--chunk`` tasks.
- ``maml_auto``: ``maml.MAML(vectorize="auto")``: the loop on a CPU, vectorized on CUDA.
- on request: ``maml_channels_last``: the library's loop with ``channels_last=True`` (each task's
  inputs and parameters copied to channels-last).
- on request (``--impls``): ``fomaml`` / ``fomaml_vectorized`` (``MAML(first_order=True)``) and
  ``reptile`` / ``reptile_vectorized`` (``maml.Reptile``, meta-SGD step 0.1); their ratio and
  agreement columns compare with their own loop (``fomaml``, ``reptile``); ``leap`` /
  ``leap_vectorized`` (``leap.LeapLearner``, path length with the loss term, meta-SGD step 0.1)
  and ``imaml`` / ``imaml_vectorized`` (``maml.iMAML``, lam 1, 5 CG steps, Adam), against
  ``leap`` and ``imaml``.

Workloads (the issue's): the MAML Omniglot net (4 x [conv3x3 ``--filters``, BatchNorm with batch
statistics, ReLU, max-pool 2], linear head), 28x28 synthetic inputs, 5 inner SGD steps at lr 0.4,
``--queries`` query images per class, one Adam meta-step; ``5way``: 5-way 1-shot, 32 tasks;
``20way``: 20-way 1-shot, 16 tasks (``--tasks`` overrides both).

Reported per implementation: the median seconds per meta-step (float32), the ratio to its
reference (``loop``, or the own loop of FOMAML and Reptile); on a CPU also the median CPU time of
the process per meta-step (``time.process_time``: user + system time, which other jobs on a
shared machine do not inflate as they do the wall clock), its ratio, and the median number of
minor page faults per meta-step (fresh memory the kernel maps and zeroes, counted in the system
time); the peak memory of one meta-step after
warm-up (``torch.cuda.max_memory_allocated`` on CUDA; on a CPU the peak resident set size sampled
every millisecond during the step, above its level just before it, after ``malloc_trim``), and
the float64 meta-gradient agreement with the reference on ``--check-tasks`` tasks (max abs
difference over the largest entry).

Usage::

    python benchmarks/gpu_meta_step.py --device cuda                 # the issue's sizes, a GPU
    python benchmarks/gpu_meta_step.py --device cpu --tasks 4 --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/gpu_meta_step.py --device cpu --workloads 5way \
        --tasks 8 --repeats 7 --impls loop,vmap,maml,maml_vectorized --malloc-retain
    python benchmarks/gpu_meta_step.py --device cuda \
        --impls fomaml,fomaml_vectorized,reptile,reptile_vectorized
    python benchmarks/gpu_meta_step.py --device cuda \
        --impls leap,leap_vectorized,imaml,imaml_vectorized
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import resource
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

import metazoo
from leap import LeapLearner
from maml import MAML, Reptile, iMAML

IMPLS = ("loop", "vmap", "maml", "maml_vectorized", "maml_auto")
EXTRA = ("maml_channels_last", "fomaml", "fomaml_vectorized", "reptile", "reptile_vectorized",
         "leap", "leap_vectorized", "imaml", "imaml_vectorized")
# What each implementation's ratio and agreement are against (default: the plain loop).
REFERENCE = {"fomaml": "fomaml", "fomaml_vectorized": "fomaml", "reptile": "reptile",
             "reptile_vectorized": "reptile", "leap": "leap", "leap_vectorized": "leap",
             "imaml": "imaml", "imaml_vectorized": "imaml"}
WORKLOADS = {"5way": (5, 32), "20way": (20, 16)}  # ways, tasks
INNER_STEPS, INNER_LR = 5, 0.4


def omniglot_net(ways: int, filters: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1),
                   nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


Stacked = tuple[Tensor, Tensor, Tensor, Tensor]  # support x, y, query x, y; leading task dim


def make_tasks(ways: int, tasks: int, queries: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> Stacked:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, ways, 1, 28, 28, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.arange(ways).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return x.to(device), y.to(device), qx.to(device), qy.to(device)


def as_task_list(data: Stacked) -> list[metazoo.Task]:
    x, y, qx, qy = data
    return [metazoo.Task([(x[i], y[i])], (qx[i], qy[i])) for i in range(len(x))]


class Impl:
    """One implementation: ``backward(data)`` accumulates the mean meta-gradient into .grad."""

    def __init__(self, name: str, net: nn.Module, chunk: int | None) -> None:
        self.name, self.net = name, net
        self.params = dict(net.named_parameters())
        self.learner: MAML | Reptile | LeapLearner | iMAML | None = None
        vectorize = (chunk or True) if name.endswith("_vectorized") else (
            "auto" if name.endswith("_auto") else False)
        if name.startswith(("maml", "fomaml")):
            self.learner = MAML(model=net, criterion=F.cross_entropy,
                                inner_optimizer=metazoo.SGD(INNER_LR), inner_steps=INNER_STEPS,
                                first_order=name.startswith("fomaml"),
                                meta_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                                vectorize=vectorize,
                                channels_last=name.endswith("_channels_last"))
            self.optimizer = self.learner.meta_optimizer
        elif name.startswith("reptile"):
            self.learner = Reptile(model=net, criterion=F.cross_entropy,
                                   inner_optimizer=metazoo.SGD(INNER_LR), inner_steps=INNER_STEPS,
                                   vectorize=vectorize)
            self.optimizer = self.learner.meta_optimizer
        elif name.startswith("leap"):
            self.learner = LeapLearner(model=net, criterion=F.cross_entropy,
                                       inner_optimizer=metazoo.SGD(INNER_LR),
                                       inner_steps=INNER_STEPS, vectorize=vectorize)
            self.optimizer = self.learner.meta_optimizer
        elif name.startswith("imaml"):
            self.learner = iMAML(model=net, criterion=F.cross_entropy,
                                 inner_optimizer=metazoo.SGD(INNER_LR), inner_steps=INNER_STEPS,
                                 lam=1.0, cg_steps=5, vectorize=vectorize)
            self.optimizer = self.learner.meta_optimizer
        else:
            self.optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def backward(self, data: Stacked) -> None:
        if self.learner is not None:
            self.learner.meta_backward(as_task_list(data))
        elif self.name == "loop":
            self._loop(data)
        else:
            self._vmap(data)

    def _loop(self, data: Stacked) -> None:
        tasks = len(data[0])
        for x, y, qx, qy in zip(*data, strict=True):
            fast = dict(self.params)
            for _ in range(INNER_STEPS):
                loss = F.cross_entropy(functional_call(self.net, fast, (x,)), y)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: p - INNER_LR * g for (n, p), g in zip(fast.items(), grads, strict=True)}
            (F.cross_entropy(functional_call(self.net, fast, (qx,)), qy) / tasks).backward()

    def _vmap(self, data: Stacked) -> None:
        net = self.net

        def task_loss(params: dict[str, Tensor], x: Tensor, y: Tensor, qx: Tensor,
                      qy: Tensor) -> Tensor:
            def support_loss(fast: dict[str, Tensor]) -> Tensor:
                return F.cross_entropy(functional_call(net, fast, (x,)), y)

            fast = params
            for _ in range(INNER_STEPS):
                g = grad(support_loss)(fast)
                fast = {n: fast[n] - INNER_LR * g[n] for n in fast}
            return F.cross_entropy(functional_call(net, fast, (qx,)), qy)

        detached = {n: p.detach() for n, p in self.params.items()}
        grads, _ = vmap(grad_and_value(task_loss), in_dims=(None, 0, 0, 0, 0))(detached, *data)
        for n, p in self.params.items():
            g = grads[n].mean(0)
            p.grad = g if p.grad is None else p.grad + g

    def meta_step(self, data: Stacked) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(data)
        self.optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(impls: list[str], ways: int, args: argparse.Namespace,
              device: torch.device) -> dict[str, float]:
    """float64 meta-gradient of each implementation against its reference (``loop``, or its own
    loop for ``*_vectorized`` of FOMAML, Reptile, Leap and iMAML): max |diff| / max
    |reference|."""
    base = omniglot_net(ways, args.filters).to(device, torch.float64)
    data = make_tasks(ways, args.check_tasks, args.queries, device, torch.float64, seed=1)
    grads = {}
    for name in impls:
        impl = Impl(name, copy.deepcopy(base), args.chunk)
        impl.backward(data)
        grads[name] = [impl.params[n].grad for n in impl.params]
    errors = {}
    for name, g in grads.items():
        reference = grads[REFERENCE.get(name, "loop")]
        scale = max(r.abs().max().item() for r in reference)
        errors[name] = max((a - b).abs().max().item()
                           for a, b in zip(g, reference, strict=True)) / scale
    return errors


def peak_memory_cuda(impl: Impl, data: Stacked, device: torch.device) -> float:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    impl.meta_step(data)
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
RETAIN_BYTES = 2**30


def malloc_retain() -> None:
    """Makes glibc's malloc keep freed blocks of up to 1 GiB for reuse (``--malloc-retain``).

    By default glibc serves blocks above its mmap threshold (adjusted at run time up to 32 MiB)
    with fresh ``mmap`` calls and unmaps them when freed, and returns the top of the heap to the
    system beyond twice that: every such block is faulted in and zeroed by the kernel page by
    page again on the next meta-step (system time). The setting applies to the whole process,
    so every implementation runs under it.
    """
    libc = ctypes.CDLL("libc.so.6")
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        if libc.mallopt(option, ctypes.c_int(RETAIN_BYTES)) != 1:
            raise RuntimeError(f"mallopt({option}, {RETAIN_BYTES}) failed; run without "
                               f"--malloc-retain (it needs glibc)")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_cpu(impl: Impl, data: Stacked) -> float:
    """Peak RSS during one meta-step above the RSS just before it (sampled every millisecond).

    glibc keeps freed memory mapped, so the RSS of a warm process already holds earlier peaks;
    ``malloc_trim(0)`` returns the free pages first.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        impl.meta_step(data)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_mib()) - before


def run_workload(workload: str, impls: list[str], args: argparse.Namespace,
                 device: torch.device) -> None:
    ways, tasks = WORKLOADS[workload]
    tasks = args.tasks or tasks
    print(f"\n## {workload}: {ways}-way 1-shot, {tasks} tasks, {args.queries} queries per class, "
          f"{args.filters} filters, {INNER_STEPS} inner SGD steps at lr {INNER_LR}, "
          f"{device}, float32")
    errors = agreement(impls, ways, args, device) if args.check_tasks else {}
    base = omniglot_net(ways, args.filters).to(device)
    data = make_tasks(ways, tasks, args.queries, device, torch.float32)
    runners = {name: Impl(name, copy.deepcopy(base), args.chunk) for name in impls}
    memory: dict[str, float] = {}
    for name, impl in runners.items():  # warm-up, then one step measuring peak memory
        impl.meta_step(data)
        memory[name] = (peak_memory_cuda(impl, data, device) if device.type == "cuda"
                        else peak_memory_cpu(impl, data))
    times: dict[str, list[float]] = {name: [] for name in impls}
    cpu_times: dict[str, list[float]] = {name: [] for name in impls}
    faults: dict[str, list[int]] = {name: [] for name in impls}
    for round_ in range(args.repeats):
        order = impls if round_ % 2 == 0 else list(reversed(impls))
        for name in order:
            sync(device)
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu_start, start = time.process_time(), time.perf_counter()
            runners[name].meta_step(data)
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                - faults_before)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    on_cpu = device.type != "cuda"
    memory_label = "peak MiB (cuda)" if device.type == "cuda" else "peak RSS MiB"
    cpu_labels = " median CPU s | CPU ratio | page faults |" if on_cpu else ""
    print(f"| impl | median s | min-max s | ratio to reference |{cpu_labels} {memory_label} | "
          f"float64 grad vs reference | reference |")
    print("|---|---:|---:|---:|" + ("---:|---:|---:|" if on_cpu else "") + "---:|---:|---|")
    for name in impls:
        reference = REFERENCE.get(name, "loop")
        ratio = f"{medians[name] / medians[reference]:.2f}" if reference in medians else "-"
        cpu_columns = ""
        if on_cpu:
            cpu_ratio = (f"{cpu_medians[name] / cpu_medians[reference]:.2f}"
                         if reference in cpu_medians else "-")
            cpu_columns = (f" {cpu_medians[name]:.3f} | {cpu_ratio} | "
                           f"{statistics.median(faults[name]):.0f} |")
        error = f"{errors[name]:.1e}" if name in errors else "-"
        print(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f}-{max(times[name]):.3f} "
              f"| {ratio} |{cpu_columns} {memory[name]:.0f} | {error} | {reference} |")
    if "maml" in medians and "maml_auto" in medians:
        print(f"\nmaml_auto / maml (vectorize='auto' against the library's loop): "
              f"{medians['maml_auto'] / medians['maml']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="5way,20way")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--tasks", type=int, default=0,
                        help="tasks per meta-batch for every workload (default: 32 and 16)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="maml_vectorized: tasks per vmap call (default: all)")
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps per impl")
    parser.add_argument("--check-tasks", type=int, default=2,
                        help="tasks of the float64 agreement check (0: skip it)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--malloc-retain", action="store_true",
                        help="glibc: keep freed blocks up to 1 GiB for reuse instead of "
                             "unmapping those above 32 MiB (mallopt; the whole process)")
    args = parser.parse_args()
    if args.malloc_retain:
        malloc_retain()
    args.chunk = args.chunk or None
    torch.set_num_threads(args.threads)
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(impls) - set(IMPLS + EXTRA)) + sorted(
        set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown implementations or workloads {unknown}; choose from "
                     f"{IMPLS + EXTRA} and "
                     f"{sorted(WORKLOADS)}")
    if args.check_tasks:
        for name in [*impls]:
            reference = REFERENCE.get(name, "loop")
            if reference not in impls:
                impls.insert(0, reference)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {args.threads} thread(s)")
          + (", glibc malloc retaining freed blocks up to 1 GiB (--malloc-retain)"
             if args.malloc_retain else ""))
    for workload in args.workloads.split(","):
        run_workload(workload, impls, args, device)


if __name__ == "__main__":
    main()
