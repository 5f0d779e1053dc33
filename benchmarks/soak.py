"""Soak test: many meta-steps of every algorithm, watching for memory and tensor leaks.

Each algorithm (MAML, FOMAML, Reptile, iMAML, Leap, WarpGrad) runs ``--steps`` meta-steps of
``--tasks`` fresh synthetic 4-way tasks on a small MLP on the CPU. Every ``--every`` steps the
script runs the garbage collector and samples the resident set size (``/proc/self/statm``) and
the number of live tensors (``gc.get_objects``). The sample at ``--warmup`` steps is the
baseline (allocator pools and optimizer state are built by then); growth is the largest later
sample minus the baseline. The script prints every sample and exits with status 1 when any
algorithm grows by more than ``--rss_bound_mib`` MiB or ``--tensor_bound`` tensors.

    python benchmarks/soak.py                      # 200 steps of all six algorithms
    python benchmarks/soak.py --steps 30 --every 10 --warmup 10 --algorithms maml leap warpgrad
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import metazoo

ALGORITHMS = ("maml", "fomaml", "reptile", "imaml", "leap", "warpgrad")


class _WarpedMLP(nn.Module):
    """adapt -> warp -> tanh -> adapt -> warp -> tanh -> adapt head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.fc1, self.warp1 = nn.Linear(8, width), nn.Linear(width, width)
        self.fc2, self.warp2 = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.warp1(self.fc1(x)))
        return self.head(torch.tanh(self.warp2(self.fc2(h))))


def _mlp(width: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, classes))


def build(name: str, *, width: int = 16, classes: int = 4, inner_steps: int = 5
          ) -> metazoo.MetaLearner:
    """The learner ``name`` (one of ``ALGORITHMS``) around a fresh small model."""
    torch.manual_seed(0)
    sgd = metazoo.SGD(0.1)
    adam = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    if name in ("maml", "fomaml"):
        from maml import MAML
        return MAML(model=_mlp(width, classes), criterion=F.cross_entropy, inner_optimizer=sgd,
                    inner_steps=inner_steps, first_order=name == "fomaml", meta_optimizer=adam)
    if name == "reptile":
        from maml import Reptile
        return Reptile(model=_mlp(width, classes), criterion=F.cross_entropy,
                       inner_optimizer=sgd, inner_steps=inner_steps)
    if name == "imaml":
        from maml import iMAML
        return iMAML(model=_mlp(width, classes), criterion=F.cross_entropy, inner_optimizer=sgd,
                     inner_steps=inner_steps, cg_steps=3, lam=1.0, meta_optimizer=adam)
    if name == "leap":
        from leap import LeapLearner
        return LeapLearner(model=_mlp(width, classes), criterion=F.cross_entropy,
                           inner_optimizer=sgd, inner_steps=inner_steps)
    if name == "warpgrad":
        import warpgrad
        model = _WarpedMLP(width, classes)
        warp = warpgrad.Warp(model, [model.fc1, model.fc2, model.head],
                             [model.warp1, model.warp2], warpgrad.DualUpdater(F.cross_entropy),
                             optimizer_parameters=warpgrad.OptimizerParameters(
                                 trainable=False, default_lr=0.1))
        return warpgrad.WarpGrad(warp, inner_steps=inner_steps, meta_lr=1e-3)
    raise ValueError(f"unknown algorithm {name!r}; choose from {ALGORITHMS}")


def make_tasks(generator: torch.Generator, count: int, classes: int = 4, shots: int = 5
               ) -> list[metazoo.Task]:
    """``count`` fresh Gaussian-cluster classification tasks (new tensors every call)."""
    tasks = []
    for _ in range(count):
        centres = 2 * torch.randn(classes, 8, generator=generator)

        def batch(centres: torch.Tensor = centres) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(classes).repeat(shots)
            return centres[y] + 0.5 * torch.randn(len(y), 8, generator=generator), y

        tasks.append(metazoo.Task([batch(), batch()], batch()))
    return tasks


def rss_mib() -> float:
    """Current resident set size (Linux); elsewhere the peak, which still shows growth."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def live_tensors() -> int:
    """Tensors reachable by the garbage collector, after a full collection."""
    gc.collect()
    count = 0
    with warnings.catch_warnings():
        # Type checks on deprecated torch.distributed aliases warn (reduce_op).
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    count += 1
            except ReferenceError:  # a dead weak proxy
                pass
    return count


@dataclass(frozen=True)
class Soak:
    """Samples of one algorithm's soak: ``(step, rss MiB, live tensors)`` and the growth."""

    name: str
    samples: tuple[tuple[int, float, int], ...]
    rss_growth_mib: float
    tensor_growth: int
    seconds: float


def soak(name: str, *, steps: int, every: int, warmup: int, tasks: int = 4,
         on_step: Callable[[int], None] | None = None) -> Soak:
    """Runs ``steps`` meta-steps of ``name``, sampling every ``every`` steps.

    Returns:
        The samples (the first at step 0, before any meta-step) and the growth from the sample
        at ``warmup`` steps to the largest later one.
    """
    if warmup % every or not 0 <= warmup < steps:
        raise ValueError(f"warmup={warmup} must be a multiple of every={every} and below "
                         f"steps={steps}")
    learner = build(name)
    generator = torch.Generator().manual_seed(1)
    samples = [(0, rss_mib(), live_tensors())]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        learner.meta_step(make_tasks(generator, tasks))
        if on_step is not None:
            on_step(step)
        if step % every == 0:
            samples.append((step, rss_mib(), live_tensors()))
    seconds = time.perf_counter() - start
    base = next(s for s in samples if s[0] == warmup)
    later = [s for s in samples if s[0] > warmup]
    return Soak(name, tuple(samples), max(s[1] for s in later) - base[1],
                max(s[2] for s in later) - base[2], seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-step")
    parser.add_argument("--rss_bound_mib", type=float, default=8.0)
    parser.add_argument("--tensor_bound", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    failed = []
    print(f"soak: {args.steps} meta-steps x {args.tasks} tasks, samples every {args.every}, "
          f"baseline at step {args.warmup}; bounds {args.rss_bound_mib} MiB, "
          f"{args.tensor_bound} tensors")
    for name in args.algorithms:
        result = soak(name, steps=args.steps, every=args.every, warmup=args.warmup,
                      tasks=args.tasks)
        ok = (result.rss_growth_mib <= args.rss_bound_mib
              and result.tensor_growth <= args.tensor_bound)
        print(f"{name:9s} {result.seconds:6.1f} s  rss growth {result.rss_growth_mib:+6.2f} MiB"
              f"  tensor growth {result.tensor_growth:+d}  {'ok' if ok else 'GROWTH'}")
        print("          step:    " + " ".join(f"{s[0]:7d}" for s in result.samples))
        print("          rss MiB: " + " ".join(f"{s[1]:7.1f}" for s in result.samples))
        print("          tensors: " + " ".join(f"{s[2]:7d}" for s in result.samples))
        if not ok:
            failed.append(name)
    if failed:
        print(f"growth beyond the bounds after warm-up: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
