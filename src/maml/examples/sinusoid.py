"""Sinusoid regression (Finn et al. 2017, section 5.1): MAML against a jointly pretrained baseline.

Tasks are y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K = 10
support points per task; the model is a 1-40-40-1 ReLU network. MAML meta-trains with one inner
SGD step (lr 0.01) and Adam (1e-3) as meta-optimizer. The baseline is the same network trained
jointly on the same number of tasks (plain regression on all of their points). Both are then
fine-tuned on held-out tasks with the same inner optimizer and scored on 100 query points after 1
and 10 steps.

Run from the repository root (about a minute of CPU time on one core)::

    python src/maml/examples/sinusoid.py
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, meta_train


def make_model(generator: torch.Generator) -> nn.Module:
    """The 1-40-40-1 ReLU network of the MAML paper, initialised from ``generator``."""
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def sample_task(generator: torch.Generator, *, shots: int = 10, query: int = 10
                ) -> metazoo.Task:
    """One sinusoid task: ``shots`` support points and ``query`` query points."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=generator)
    phase = math.pi * torch.rand((), generator=generator)
    x = 10.0 * torch.rand(shots + query, 1, generator=generator) - 5.0
    y = amplitude * torch.sin(x - phase)
    return metazoo.Task([(x[:shots], y[:shots])], (x[shots:], y[shots:]))


def task_batches(generator: torch.Generator, meta_batch: int) -> Iterator[list[metazoo.Task]]:
    """An endless stream of meta-batches."""
    while True:
        yield [sample_task(generator) for _ in range(meta_batch)]


def pretrain(model: nn.Module, batches: Iterator[list[metazoo.Task]], steps: int,
             lr: float = 1e-3) -> None:
    """Joint training: regression on every point of each meta-batch's tasks, Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        tasks = next(batches)
        x = torch.cat([torch.cat([t.support[0][0], t.query[0]]) for t in tasks])
        y = torch.cat([torch.cat([t.support[0][1], t.query[1]]) for t in tasks])
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


@dataclass(frozen=True)
class Comparison:
    """Post-adaptation query MSE on the held-out tasks, by number of inner steps."""

    maml: dict[int, float]
    pretrained: dict[int, float]
    seconds: float
    cpu_seconds: float


def compare(*, seed: int = 0, meta_steps: int = 3000, meta_batch: int = 10,
            eval_tasks: int = 100, inner_lr: float = 0.01, meta_lr: float = 1e-3) -> Comparison:
    """Meta-trains MAML and pretrains the baseline on as many tasks, then scores both."""
    start, cpu_start = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(seed)
    held_out = [sample_task(generator, query=100) for _ in range(eval_tasks)]

    maml_model = make_model(generator)
    baseline_model = make_model(generator)
    baseline_model.load_state_dict(maml_model.state_dict())
    learner = MAML(model=maml_model, criterion=F.mse_loss,
                   inner_optimizer=metazoo.SGD(inner_lr), inner_steps=1, eval_inner_steps=10,
                   meta_optimizer=lambda params: torch.optim.Adam(params, lr=meta_lr))
    meta_train(learner, task_batches(generator, meta_batch), meta_steps=meta_steps)
    pretrain(baseline_model, task_batches(generator, meta_batch), meta_steps, lr=meta_lr)

    # The baseline is fine-tuned exactly as MAML adapts: same inner optimizer, same steps.
    baseline = MAML(model=baseline_model, criterion=F.mse_loss,
                    inner_optimizer=metazoo.SGD(inner_lr), inner_steps=1)
    results: dict[str, dict[int, float]] = {"maml": {}, "pretrained": {}}
    for steps in (1, 10):
        results["maml"][steps] = learner.evaluate(held_out, steps=steps).loss
        results["pretrained"][steps] = baseline.evaluate(held_out, steps=steps).loss
    return Comparison(results["maml"], results["pretrained"], time.perf_counter() - start,
                      time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta-steps", type=int, default=3000)
    parser.add_argument("--meta-batch", type=int, default=10)
    parser.add_argument("--eval-tasks", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    result = compare(seed=args.seed, meta_steps=args.meta_steps, meta_batch=args.meta_batch,
                     eval_tasks=args.eval_tasks)
    print(f"sinusoid, K=10, seed {args.seed}, {args.meta_steps} meta-steps x {args.meta_batch} "
          f"tasks, {args.eval_tasks} held-out tasks, inner SGD lr 0.01")
    print("query MSE after   1 step   10 steps")
    for name, row in (("MAML", result.maml), ("pretrained", result.pretrained)):
        print(f"{name:<16}{row[1]:>8.3f}{row[10]:>11.3f}")
    print(f"total {result.seconds:.1f} s wall clock, {result.cpu_seconds:.1f} s CPU")


if __name__ == "__main__":
    main()
