"""Meta-steps per second of MAML on a small conv net with 1 and 2 processes (gloo, CPU).

The workload is second-order MAML (``maml.MAML``) on a small Omniglot-style conv net (``--blocks``
blocks of ``--filters`` 3x3 convolutions, BatchNorm with batch statistics, ReLU and max-pooling
on 28x28 inputs, a linear head), ``--ways``-way ``--shots``-shot tasks of synthetic data,
``--inner-steps`` inner SGD steps, and a meta-batch of ``--tasks`` tasks. The same meta-batch is
run by:

- 1 process with as many intra-op threads as cores (what a plain ``python main.py`` does),
- 1 process with 1 thread,
- 2 processes (``metazoo.distributed`` on gloo, loopback) with 1 thread each, every rank
  adapting half of the meta-batch and all-reducing the meta-gradients.

Each configuration runs in fresh processes (forked, so start-up is not timed) that take
``--warmup`` meta-steps, then time ``--steps`` meta-steps between barriers. Configurations
alternate over ``--rounds`` rounds (rotating their order), and the medians are printed side by
side with ratios measured in the same run, with the CPU time per meta-step (summed over ranks)
and the time of one meta-gradient all-reduce. On a machine shared with other jobs, Linux's
autogroup scheduling gives this run's session one share of the cores however many processes it
starts, so the wall-clock ratio can stay near 1 there, while the CPU-time ratio still shows the
parallel overhead.

Usage::

    python benchmarks/distributed.py
    python benchmarks/distributed.py --tasks 16 --filters 64 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML
from metazoo import Task, distributed


def conv_net(*, ways: int, filters: int, blocks: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.BatchNorm2d(filters),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    size = 28 // 2**blocks
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * size * size, ways))


def meta_batch(args: argparse.Namespace) -> list[Task]:
    g = torch.Generator().manual_seed(0)

    def batch(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = args.ways * per_class
        return (torch.randn(n, 1, 28, 28, generator=g),
                torch.arange(args.ways).repeat_interleave(per_class))

    return [Task([batch(args.shots)], batch(args.queries)) for _ in range(args.tasks)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace, rank: int, world: int, threads: int, port: int,
           results: Any) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        if os.path.exists("/sys/class/net/lo"):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ctx = distributed.setup(device="cpu", timeout=300)
    torch.manual_seed(0)
    learner = MAML(model=conv_net(ways=args.ways, filters=args.filters, blocks=args.blocks),
                   criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.4),
                   inner_steps=args.inner_steps,
                   meta_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    distributed.broadcast_learner(learner)
    local = distributed.shard(meta_batch(args))
    for _ in range(args.warmup):
        distributed.meta_step(learner, local)
    distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        distributed.meta_step(learner, local)
    cpu_seconds = time.process_time() - cpu_start
    distributed.barrier()
    seconds = time.perf_counter() - start
    reduce_ms = 0.0
    if world > 1:
        # Time the meta-gradient all-reduce alone (the gradients of the last step are still
        # in .grad; rescaling them does not matter here).
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(10):
            distributed.all_reduce_meta_gradients(learner, num_tasks=len(local))
        reduce_ms = (time.perf_counter() - start) / 10 * 1e3
    distributed.check_synchronized(learner)
    results.put((ctx.rank, args.steps / seconds, cpu_seconds / args.steps, reduce_ms))
    distributed.teardown()


def run(args: argparse.Namespace, world: int, threads: int) -> tuple[float, float, float]:
    """(meta-steps/s, CPU seconds per meta-step summed over ranks, all-reduce ms)."""
    context = mp.get_context("fork")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=worker, args=(args, r, world, threads, port, results))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a worker of the {world}-process run failed: exit codes "
                           f"{[p.exitcode for p in procs]}")
    reports = sorted(results.get(timeout=10) for _ in range(world))
    return reports[0][1], sum(r[2] for r in reports), reports[0][3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-batch")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5, help="query images per class")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed meta-steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    configs = [("1 process", 1, cores), ("1 process", 1, 1), ("2 processes", 2, 1)]
    timings: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(configs))}
    for round_ in range(args.rounds):
        order = [(round_ + i) % len(configs) for i in range(len(configs))]
        for i in order:
            _, world, threads = configs[i]
            timings[i].append(run(args, world, threads))
    print(f"MAML, conv net {args.blocks}x{args.filters} filters, {args.ways}-way "
          f"{args.shots}-shot, {args.queries} queries/class, {args.inner_steps} inner step(s), "
          f"{args.tasks} tasks per meta-batch; {cores} cores, torch {torch.__version__}; "
          f"median of {args.rounds} alternating rounds of {args.steps} meta-steps")
    medians = {i: statistics.median(t[0] for t in timings[i]) for i in timings}
    cpu = {i: statistics.median(t[1] for t in timings[i]) for i in timings}
    print(f"{'configuration':<28} {'meta-steps/s':>12} {'all runs':>22} "
          f"{'CPU s/step':>10} {'all-reduce':>10}")
    for i, (name, world, threads) in enumerate(configs):
        runs = ", ".join(f"{t[0]:.3f}" for t in timings[i])
        reduce_ms = statistics.median(t[2] for t in timings[i])
        reduce_text = f"{reduce_ms:.2f} ms" if world > 1 else "-"
        print(f"{name + f' x {threads} thread(s)':<28} {medians[i]:>12.3f} {runs:>22} "
              f"{cpu[i]:>10.3f} {reduce_text:>10}")
    print(f"ratio 2 processes / 1 process x {cores} threads: {medians[2] / medians[0]:.2f}")
    print(f"ratio 2 processes / 1 process x 1 thread:  {medians[2] / medians[1]:.2f}")
    # CPU seconds per meta-step (all ranks together) do not depend on how many cores other
    # jobs leave free: their ratio is the parallel overhead; on idle cores the speed-up over
    # 1 process x 1 thread would approach 2 divided by it.
    print(f"CPU time per meta-step, 2 processes / 1 process x 1 thread: "
          f"{cpu[2] / cpu[1]:.2f}")


if __name__ == "__main__":
    main()
