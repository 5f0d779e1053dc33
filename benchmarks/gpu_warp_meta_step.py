"""Vectorized meta-batches for WarpGrad (issue 17): one meta-step, loop against vmap, by phase.

One ``warpgrad.WarpGrad`` meta-step of the Omniglot experiment's ``warp_leap`` learner (built by
``src/omniglot/wrapper.build_learner``: the ``WarpedOmniConv`` net, 4 x [conv3x3 64, max-pool,
BatchNorm with batch statistics, ReLU] each followed by a 3x3 warp convolution, a linear head;
stop-gradient warp objective, simplified-Leap init objective, inner SGD lr 0.1, meta-SGD lr 0.1)
on the reference's flags ``--meta_batch_size 4 --task_batch_size 128 --task_train_steps 100
--classes 20`` (one task per alphabet, 4 alphabets): 4 tasks, 100 inner steps on batches of 128
28x28 images (synthetic, a fresh batch per step), 20 classes. Compared side by side in one
process, alternating after a warm-up each:

- ``loop``: ``WarpGrad(vectorize=False)``, the tasks adapted one by one, states replayed one
  at a time (the library's default);
- ``vectorize=True``: all tasks adapted in one ``vmap``, all replayed states in one ``vmap``;
- ``vectorize=N``: N tasks adapted per ``vmap`` call and the states of N tasks replayed per call.

Phases, each synchronised on CUDA: ``adapt`` (adaptation of every task, recording into the
replay buffer, query scoring), ``replay`` (the warp objective over every recorded state),
``init`` (simplified Leap), ``step`` (the meta-optimizer step). Printed: the median seconds of
each phase and of the whole meta-step, its ratio to the loop's meta-step time, the peak
memory of a meta-step (CUDA only), and the float64 agreement of every meta-gradient with the
loop's on a reduced problem (``--check-*``; max abs difference over the largest entry).

The public WarpGrad reference took 35 s per such meta-step on an H200 (issue 17); the issue's
target is at least 100x faster, i.e. <= 0.35 s.

Usage::

    python benchmarks/gpu_warp_meta_step.py --device cuda            # the reference's flags
    python benchmarks/gpu_warp_meta_step.py --device cpu --steps 5   # reduced, on a CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for package in ("metazoo", "maml", "leap", "warpgrad", "omniglot"):
    sys.path.insert(0, str(ROOT / "src" / package))

import warpgrad  # noqa: E402
from metazoo import Task  # noqa: E402
from wrapper import LearnerConfig, build_learner  # noqa: E402


def parse_vectorize(text: str) -> bool | int | str:
    lowered = text.lower()
    if lowered in ("false", "loop"):
        return False
    if lowered == "true":
        return True
    if lowered == "auto":
        return "auto"
    return int(text)


def make_learner(args: argparse.Namespace, vectorize: bool | int | str, device: torch.device,
                 dtype: torch.dtype, steps: int) -> warpgrad.WarpGrad:
    """The experiment's warp_leap learner, rebuilt around a copy with ``vectorize``."""
    torch.manual_seed(0)
    cfg = LearnerConfig(meta_model="warp_leap", classes=args.classes, task_train_steps=steps,
                        task_val_steps=steps, num_filters=args.filters)
    base = build_learner(cfg)
    warp = base.warp
    warp.model.to(device=device, dtype=dtype)
    for p in warp.init_parameters():
        p.data = p.data.to(device=device, dtype=dtype)
    for p in warp.optimizer_parameters():
        p.data = p.data.to(device=device, dtype=dtype)
    # The buffer stays on the CPU (the reference's and the library's default).
    return warpgrad.WarpGrad(warp, inner_steps=steps, bn_mode=base.bn_mode,
                             meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                             vectorize=vectorize)


def make_tasks(num_tasks: int, steps: int, batch: int, classes: int, device: torch.device,
               dtype: torch.dtype, seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, 1, 28, 28, generator=g).to(device, dtype),
                torch.randint(0, classes, (batch,), generator=g).to(device))

    return [Task([draw() for _ in range(steps)], draw()) for _ in range(num_tasks)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_meta_step(learner: warpgrad.WarpGrad, tasks: list[Task], device: torch.device
                    ) -> dict[str, float]:
    """One meta-step with its phases timed (synchronised)."""
    phases: dict[str, float] = {}
    accumulate = learner.updater.accumulate

    def timed_accumulate(warp: Any, **kwargs: Any) -> warpgrad.UpdateResult:
        sync(device)
        start = time.perf_counter()
        result = accumulate(warp, **kwargs)
        sync(device)
        phases["replay+init"] = time.perf_counter() - start
        phases["replay"] = result.warp_seconds  # ends with a host transfer of the loss
        return result

    learner.updater.accumulate = timed_accumulate  # type: ignore[method-assign]
    try:
        sync(device)
        start = time.perf_counter()
        learner.meta_optimizer.zero_grad(set_to_none=True)
        learner.meta_backward(tasks)
        sync(device)
        backward = time.perf_counter() - start
        start = time.perf_counter()
        learner.meta_optimizer.step()
        sync(device)
        step = time.perf_counter() - start
    finally:
        del learner.updater.accumulate
    return {"adapt": backward - phases["replay+init"], "replay": phases["replay"],
            "init": phases["replay+init"] - phases["replay"], "step": step,
            "total": backward + step}


def agreement(variants: list[bool | int | str], args: argparse.Namespace,
              device: torch.device) -> dict[str, float]:
    """float64 meta-gradients of each variant against the loop's, on a reduced problem."""
    tasks = make_tasks(args.check_tasks, args.check_steps, args.check_batch, args.classes,
                       device, torch.float64, seed=1)
    grads = {}
    for vectorize in [False, *variants]:
        learner = make_learner(args, vectorize, device, torch.float64, args.check_steps)
        learner.meta_optimizer.zero_grad(set_to_none=True)
        learner.meta_backward(tasks)
        grads[str(vectorize)] = {n: p.grad.clone() for n, p in learner.named_meta_parameters()
                                 if p.grad is not None}
    reference = grads["False"]
    scale = max(g.abs().max().item() for g in reference.values())
    return {name: max((g[n] - reference[n]).abs().max().item() for n in reference) / scale
            for name, g in grads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=4, help="--meta_batch_size")
    parser.add_argument("--batch", type=int, default=128, help="--task_batch_size")
    parser.add_argument("--steps", type=int, default=100, help="--task_train_steps")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--vectorize", default="true,1",
                        help="comma list of WarpGrad(vectorize=...) values besides the loop "
                             "(true, auto, or a chunk size in tasks)")
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-steps per variant")
    parser.add_argument("--check-tasks", type=int, default=2)
    parser.add_argument("--check-steps", type=int, default=3)
    parser.add_argument("--check-batch", type=int, default=8)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 agreement")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # TF32 makes float32 implementations disagree by up to 80% (ARCHITECTURE.md).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    variants = [parse_vectorize(v) for v in args.vectorize.split(",") if v]
    names = ["loop", *(f"vectorize={v}" for v in variants)]
    print(f"device={device} torch={torch.__version__} threads={args.threads} tasks={args.tasks} "
          f"batch={args.batch} steps={args.steps} classes={args.classes} "
          f"filters={args.filters} (pid {os.getpid()})", flush=True)
    tasks = make_tasks(args.tasks, args.steps, args.batch, args.classes, device, torch.float32)
    learners = {name: make_learner(args, v, device, torch.float32, args.steps)
                for name, v in zip(names, [False, *variants], strict=True)}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    peaks: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name, learner in learners.items():  # warm-up, and the peak memory of one step
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed_meta_step(learner, tasks, device)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError as error:
            failed[name] = f"out of memory ({str(error).splitlines()[0][:80]})"
            learner.warp.buffer.clear()
            torch.cuda.empty_cache()
    for round_index in range(args.repeats):
        order = [n for n in names if n not in failed]
        for name in order if round_index % 2 == 0 else order[::-1]:
            times[name].append(timed_meta_step(learners[name], tasks, device))
    loop = statistics.median(t["total"] for t in times["loop"]) if times["loop"] else None
    check = {} if args.no_check else agreement(variants, args, device)
    print(f"{'variant':>16} {'total s':>9} {'/ loop':>7} {'adapt':>8} {'replay':>8} "
          f"{'init':>7} {'step':>7} {'peak GiB':>9} {'f64 agreement':>14}")
    for name, variant in zip(names, [False, *variants], strict=True):
        if name in failed:
            print(f"{name:>16} {failed[name]}")
            continue
        med = {k: statistics.median(t[k] for t in times[name]) for k in times[name][0]}
        ratio = f"{med['total'] / loop:.2f}" if loop else "-"
        peak = f"{peaks[name]:.2f}" if name in peaks else "-"
        agree = f"{check[str(variant)]:.1e}" if check else "-"
        print(f"{name:>16} {med['total']:9.3f} {ratio:>7} {med['adapt']:8.3f} "
              f"{med['replay']:8.3f} {med['init']:7.3f} {med['step']:7.3f} {peak:>9} "
              f"{agree:>14}")
    print("/ loop: the variant's median meta-step time over the loop's (< 1: faster). The "
          "reference took 35 s per meta-step on an H200 at --steps 100 --batch 128 --tasks 4; "
          "the issue's target is <= 0.35 s.")


if __name__ == "__main__":
    main()
