"""Cost of ``metazoo.checked_step`` (issue 18): the meta-optimizer step undone when non-finite.

Before issue 18, ``MetaLearner.meta_step`` checked the meta-gradients with one fused reduction
(``metazoo.all_finite``) and then called ``meta_optimizer.step()``. ``checked_step`` copies the
stepped parameters and their optimizer state first, steps, and checks gradients, parameters and
state with one fused reduction (still one host transfer). This script times both side by side in
one process, alternating, after a warm-up:

- ``step``: the optimizer step alone (Adam over the 4-block, 64-filter Omniglot conv net, 113k
  parameters, gradients already in ``.grad``): the absolute overhead.
- ``meta_step``: a whole ``maml.MAML`` meta-step (first order, 5-way 1-shot, 5 queries per
  class, 2 inner steps, 4 tasks), with ``checked_step`` against the previous check swapped in.

Usage::

    python benchmarks/checked_step.py                 # CPU, 1 thread
    python benchmarks/checked_step.py --device cuda --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

import metazoo  # metazoo.learner is the module whose checked_step meta_step calls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_step import few_shot_tasks, maml_learner, omniglot_net


def previous_step(optimizer: torch.optim.Optimizer,
                  named_parameters: Iterable[tuple[str, Tensor]] = ()) -> None:
    """The meta_step tail before issue 18: fused gradient check, then the step."""
    grads = [p.grad for _, p in named_parameters if p.grad is not None]
    if not metazoo.all_finite(grads):
        raise metazoo.NonFiniteError(task=None, inner_step=None, where="meta_gradient")
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compare(name: str, runs: dict[str, Callable[[], object]], rounds: int,
            device: torch.device) -> None:
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            times[key].append(timed(fn, device))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: previous {medians['previous'] * 1e3:.3f} ms, checked "
          f"{medians['checked'] * 1e3:.3f} ms (median of {rounds}); "
          f"ratio checked/previous {medians['checked'] / medians['previous']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = omniglot_net(5).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    named = list(net.named_parameters())
    compare("step", {"previous": lambda: previous_step(optimizer, named),
                     "checked": lambda: metazoo.checked_step(optimizer, named)},
            args.rounds * 10, device)

    learner = maml_learner(omniglot_net(5).to(device), first_order=True, steps=2)
    tasks = few_shot_tasks(4, ways=5, shots=1, queries=5, device=device,
                           dtype=torch.float32)

    def meta_step_with(step: Callable[..., None]) -> Callable[[], object]:
        def run() -> object:
            metazoo.learner.checked_step = step  # what MetaLearner.meta_step calls
            return learner.meta_step(tasks)
        return run

    try:
        compare("meta_step", {"previous": meta_step_with(previous_step),
                              "checked": meta_step_with(metazoo.checked_step)},
                args.rounds, device)
    finally:
        metazoo.learner.checked_step = metazoo.checked_step


if __name__ == "__main__":
    main()
