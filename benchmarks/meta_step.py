"""Meta-step time of every algorithm, through the public API and against a hand-written loop.

One command runs every configuration in its own process (a fresh interpreter per process, so
one configuration's allocator or thread state never leaks into another), alternating the
configurations round by round; each process warms up, then times ``--repeat`` meta-steps. The
table gives the median and spread (min-max) over all timed meta-steps of all rounds, and the
ratios the issue sets targets for, computed from medians measured in the same run.

Standard few-shot workload (``maml_*`` configurations): the Omniglot 4-block conv net (64
filters, 3x3 conv -> 2x2 max-pool -> BatchNorm with batch statistics -> ReLU, linear head),
5-way 1-shot with 15 queries per class, 28x28 synthetic inputs, 5 inner SGD steps with lr 0.4,
a meta-batch of 16 tasks and an Adam meta-optimizer.

- ``maml_api``: ``maml.MAML(channels_last=True)`` (second order) ``meta_step``.
- ``maml_hand``: the same computation written by hand: ``torch.func.functional_call`` and
  ``torch.autograd.grad(create_graph=True)``, tasks one by one, Adam step, on the tasks and
  the model as given (NCHW).
- ``fomaml_api``: ``maml.MAML(first_order=True, channels_last=True)``.
- ``maml_ckpt1`` / ``maml_ckpt_true``: ``checkpoint=1`` (every step a segment: it really
  recomputes) and ``checkpoint=True`` (segment ``metazoo.DEFAULT_SEGMENT``; with 5 inner steps
  that is one segment, i.e. no checkpointing), both with ``channels_last=True``.
- ``maml_api_nchw`` / ``fomaml_api_nchw``: ``maml.MAML`` with the default layout (the
  ``maml_api`` / ``fomaml_api`` rows before ``channels_last`` existed).
- ``maml_hand_cl``: the hand loop with the inputs and the model converted to channels-last
  by hand (what a user can do without the option), for comparison.

Small alphabet-protocol configuration (20-way, batches of 20, 5 inner steps with a fresh batch
per step, 4 tasks): ``reptile_api`` (``maml.Reptile``), ``leap_api`` (``leap.LeapLearner``),
``imaml_api`` (``maml.iMAML``, lam 1, 5 CG steps), all with ``channels_last=True``,
``reptile_api_nchw`` / ``leap_api_nchw`` / ``imaml_api_nchw`` (the default layout) and
``warpgrad`` (one WarpGrad meta-step from ``warp_meta_step.py``: adaptation, replay and init
update reported separately).

Before timing, ``check`` compares the meta-gradients of ``maml.MAML`` and the hand loop (second
and first order) in float64 on the standard net with 2 tasks.

Usage::

    python benchmarks/meta_step.py                      # everything, CPU, 1 thread
    python benchmarks/meta_step.py --configs maml_api,maml_hand --rounds 3 --repeat 2
    python benchmarks/meta_step.py --device cuda        # the same table on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

STANDARD = ("maml_api", "maml_hand", "fomaml_api", "maml_ckpt1", "maml_ckpt_true",
            "maml_api_nchw", "fomaml_api_nchw", "maml_hand_cl")
SMALL = ("reptile_api", "leap_api", "reptile_api_nchw", "leap_api_nchw", "imaml_api",
         "imaml_api_nchw", "warpgrad")
ALL = ("overhead", "check", *STANDARD, *SMALL)


# -- workload ---------------------------------------------------------------------------------

def omniglot_net(classes: int, filters: int = 64) -> nn.Module:
    """The 4-block Omniglot conv net; BatchNorm without running statistics (batch statistics)."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.MaxPool2d(2),
                   nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU()]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, classes))


def few_shot_tasks(n: int, *, ways: int, shots: int, queries: int, device: torch.device,
                   dtype: torch.dtype, seed: int = 0) -> list[Any]:
    import metazoo

    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        xs = torch.randn(ways * shots, 1, 28, 28, generator=g, dtype=dtype).to(device)
        ys = torch.arange(ways).repeat_interleave(shots).to(device)
        xq = torch.randn(ways * queries, 1, 28, 28, generator=g, dtype=dtype).to(device)
        yq = torch.arange(ways).repeat_interleave(queries).to(device)
        tasks.append(metazoo.Task(support=[(xs, ys)], query=(xq, yq)))
    return tasks


def alphabet_tasks(n: int, *, classes: int, batch: int, steps: int, device: torch.device,
                   seed: int = 0) -> list[Any]:
    import metazoo

    g = torch.Generator().manual_seed(seed)

    def batch_() -> tuple[Tensor, Tensor]:
        return (torch.randn(batch, 1, 28, 28, generator=g).to(device),
                torch.randint(0, classes, (batch,), generator=g).to(device))

    return [metazoo.Task(support=[batch_() for _ in range(steps)], query=batch_())
            for _ in range(n)]


def maml_learner(net: nn.Module, *, first_order: bool = False, checkpoint: Any = None,
                 steps: int = 5, lr: float = 0.4, channels_last: bool = False) -> Any:
    import maml
    import metazoo

    return maml.MAML(model=net, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(lr),
                     inner_steps=steps, first_order=first_order, checkpoint=checkpoint,
                     meta_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                     channels_last=channels_last)


def channels_last_tasks(tasks: list[Any]) -> list[Any]:
    """The tasks with their inputs copied to channels-last (``clone``: for one channel,
    ``contiguous(memory_format=...)`` keeps the NCHW strides)."""
    import metazoo

    def cl(x: Tensor) -> Tensor:
        return x.clone(memory_format=torch.channels_last)

    return [metazoo.Task(support=[(cl(x), y) for x, y in t.support], query=(cl(t.query[0]),
                                                                         t.query[1]))
            for t in tasks]


class HandMAML:
    """MAML written by hand: ``functional_call`` + ``autograd.grad``, tasks one by one."""

    def __init__(self, net: nn.Module, *, steps: int = 5, lr: float = 0.4,
                 first_order: bool = False) -> None:
        self.net, self.steps, self.lr, self.first_order = net, steps, lr, first_order
        self.meta_optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def meta_backward(self, tasks: list[Any]) -> None:
        theta = dict(self.net.named_parameters())
        for task in tasks:
            (xs, ys), = task.support
            params = theta
            for _ in range(self.steps):
                if self.first_order:
                    params = {n: p.detach().requires_grad_() for n, p in params.items()}
                loss = F.cross_entropy(functional_call(self.net, params, (xs,)), ys)
                grads = torch.autograd.grad(loss, list(params.values()),
                                            create_graph=not self.first_order)
                params = {n: p - self.lr * g for (n, p), g in zip(params.items(), grads)}
            xq, yq = task.query
            query_loss = F.cross_entropy(functional_call(self.net, params, (xq,)), yq)
            if self.first_order:
                grads = torch.autograd.grad(query_loss / len(tasks), list(params.values()))
                for p, g in zip(theta.values(), grads):
                    p.grad = g if p.grad is None else p.grad + g
            else:
                (query_loss / len(tasks)).backward()

    def meta_step(self, tasks: list[Any]) -> None:
        self.meta_optimizer.zero_grad()
        self.meta_backward(tasks)
        self.meta_optimizer.step()


# -- one process: one configuration -----------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(device: torch.device) -> dict[str, Any]:
    """float64 meta-gradients of maml.MAML (default layout and ``channels_last=True``) against
    the hand loop (second and first order)."""
    out: dict[str, Any] = {}
    tasks = few_shot_tasks(2, ways=5, shots=1, queries=15, device=device, dtype=torch.float64)
    for first_order, channels_last in ((False, False), (True, False), (False, True),
                                       (True, True)):
        torch.manual_seed(0)
        net = omniglot_net(5).to(device, torch.float64)
        learner = maml_learner(net, first_order=first_order, channels_last=channels_last)
        learner.meta_optimizer.zero_grad()
        learner.meta_backward(tasks)
        api = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        HandMAML(net, first_order=first_order).meta_backward(tasks)
        hand = [p.grad for p in net.parameters()]
        # Relative to the largest gradient entry overall: the conv biases' gradients are
        # rounding noise (BatchNorm with batch statistics removes a per-channel shift).
        scale = max(h.abs().max().item() for h in hand)
        error = max((a - h).abs().max().item() for a, h in zip(api, hand)) / scale
        out[("fomaml" if first_order else "maml") + ("_cl" if channels_last else "")] = error
    return out


def core_overhead(device: torch.device) -> dict[str, float]:
    """Per-call Python overhead of the core on the standard net (microseconds, median of 5).

    ``forward``: ``metazoo.forward`` minus ``torch.func.functional_call`` on a 2-image batch;
    ``sgd_step``: one ``metazoo.SGD(0.4).step`` over the net's 18 parameter tensors, with
    gradients that carry a graph (as in a second-order unroll).
    """
    import metazoo

    net = omniglot_net(5).to(device)
    params, buffers = metazoo.params_of(net), metazoo.initial_buffers(net, "batch")
    x = torch.randn(2, 1, 28, 28, device=device)
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    grads = {n: torch.randn_like(p).requires_grad_() for n, p in params.items()}
    sgd = metazoo.SGD(0.4)
    state = sgd.init(leaves)

    def per_call(fn: Any, n: int) -> float:
        fn()
        samples = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(n):
                fn()
            samples.append((time.process_time() - start) / n * 1e6)
        return statistics.median(samples)

    return {"forward": per_call(lambda: metazoo.forward(net, params, buffers, x), 100)
            - per_call(lambda: functional_call(net, params, (x,)), 100),
            "sgd_step": per_call(lambda: sgd.step(leaves, grads, state), 300)}


def time_config(name: str, args: argparse.Namespace, device: torch.device,
                profiler: Any = None) -> list[dict]:
    """Warm-up, then ``args.repeat`` timed meta-steps; each is a dict of phase -> seconds.

    A ``profiler`` (``cProfile.Profile``) is enabled for the timed meta-steps only.
    """
    torch.manual_seed(0)
    if name in STANDARD:
        net = omniglot_net(5).to(device).to(memory_format=args.memory_format)
        tasks = few_shot_tasks(args.meta_batch, ways=5, shots=1, queries=15, device=device,
                               dtype=torch.float32)
        if name == "maml_hand":
            learner: Any = HandMAML(net)
        elif name == "maml_hand_cl":
            learner = HandMAML(net.to(memory_format=torch.channels_last))
            tasks = channels_last_tasks(tasks)
        else:
            checkpoint = {"maml_ckpt1": 1, "maml_ckpt_true": True}.get(name)
            learner = maml_learner(net, first_order=name.startswith("fomaml"),
                                   checkpoint=checkpoint, channels_last=not name.endswith("nchw"))
    elif name in ("reptile_api", "leap_api", "imaml_api", "reptile_api_nchw", "leap_api_nchw",
                  "imaml_api_nchw"):
        import leap
        import maml
        import metazoo

        net = omniglot_net(20).to(device)
        tasks = alphabet_tasks(4, classes=20, batch=20, steps=5, device=device)
        kind = {"reptile": maml.Reptile, "leap": leap.LeapLearner,
                "imaml": maml.iMAML}[name.split("_")[0]]
        learner = kind(model=net, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.1),
                       inner_steps=5, channels_last=not name.endswith("nchw"))
    elif name == "warpgrad":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import warp_meta_step

        ns = argparse.Namespace(tasks=4, steps=5, batch=20, classes=20, bsz=1, inner_lr=0.1,
                                warp="3x3", keep_on_device=False)
        wtasks = warp_meta_step.make_tasks(ns, device)
        runs = []
        for i in range(args.warmup + args.repeat):
            if i == args.warmup and profiler is not None:
                profiler.enable()
            cpu_start = time.process_time()
            result = warp_meta_step.meta_step(ns, "stop_gradient", True, 0, device, wtasks)
            if i >= args.warmup:
                runs.append({"total": result["adaptation"] + result["backward"],
                             "cpu": time.process_time() - cpu_start,
                             "adaptation": result["adaptation"], "replay": result["replay"],
                             "init": result["init"]})
        return runs
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {ALL}")

    runs = []
    for i in range(args.warmup + args.repeat):
        if i == args.warmup and profiler is not None:
            profiler.enable()
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        learner.meta_step(tasks)
        sync(device)
        if i >= args.warmup:
            runs.append({"total": time.perf_counter() - start,
                         "cpu": time.process_time() - cpu_start})
    return runs


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        time_config(args.child, args, device, profiler)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
        return
    if args.child == "check":
        result: Any = check(device)
    elif args.child == "overhead":
        result = core_overhead(device)
    else:
        result = time_config(args.child, args, device)
    print("RESULT " + json.dumps(result))


# -- the parent: alternate processes, print the table -----------------------------------------

def run_child(name: str, args: argparse.Namespace) -> Any:
    command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads),
               "--device", args.device, "--repeat", str(args.repeat), "--warmup",
               str(args.warmup), "--meta-batch", str(args.meta_batch), "--channels-last"
               if args.channels_last else "--no-channels-last"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {name} failed:\n{done.stderr[-3000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(ALL),
                        help=f"comma list from {','.join(ALL)}")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each round runs every configuration's process once")
    parser.add_argument("--repeat", type=int, default=2, help="timed meta-steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-steps per process")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per process (default 1: the CPU is shared, "
                             "and spinning OpenMP threads on a loaded 2-core machine make "
                             "timings swing far more than the differences measured)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="standard workload in channels-last memory format")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=int, default=0,
                        help="with --child NAME: print the top N cProfile entries instead")
    args = parser.parse_args()
    args.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.child:
        child(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available on this machine")
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(ALL))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {','.join(ALL)}")

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none used"
    why = (" (shared CPU: one thread keeps OpenMP spin-waits from fighting the other "
           "engineers' jobs)" if args.threads == 1 else "")
    print(f"torch {torch.__version__}, device {args.device} (GPU: {gpu}), threads "
          f"{args.threads} per process{why}, {os.cpu_count()} CPUs, meta-batch "
          f"{args.meta_batch}, {args.rounds} rounds x {args.repeat} timed meta-steps after "
          f"{args.warmup} warm-up, channels_last={args.channels_last}")
    print(f"load average at start: {os.getloadavg()}")
    if "overhead" in configs:
        overhead = run_child("overhead", args)
        print(f"core per-call overhead: metazoo.forward - functional_call "
              f"{overhead['forward']:.0f} us, SGD.step {overhead['sgd_step']:.0f} us")
        configs.remove("overhead")
    if "check" in configs:
        errors = run_child("check", args)
        print("meta-gradient check, float64, 2 tasks, max |difference| / max |gradient|, "
              f"maml.MAML vs hand loop: second order {errors['maml']:.2e}, first order "
              f"{errors['fomaml']:.2e}; with channels_last=True: second order "
              f"{errors['maml_cl']:.2e}, first order {errors['fomaml_cl']:.2e}")
        configs.remove("check")

    samples: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]  # alternate, and the order too
        for name in order:
            samples[name] += run_child(name, args)
    print(f"load average at end: {os.getloadavg()}")

    median: dict[str, dict[str, float]] = {}
    # With one thread, process CPU time is less sensitive to the other jobs on a shared machine
    # than wall time; with more, CPU time also counts OpenMP spin-waits, so wall time decides.
    judge = "cpu" if args.threads == 1 else "wall"
    print(f"\nwall = wall-clock seconds per meta-step; cpu = process CPU seconds (all threads); "
          f"targets are judged by {'CPU' if judge == 'cpu' else 'wall'} time")
    print(f"{'configuration':>16} {'wall med':>9} {'wall min':>9} {'wall max':>9} {'cpu med':>8} "
          f"{'cpu min':>8} {'n':>3}  phases (wall medians)")
    for name, runs in samples.items():
        walls, cpus = [r["total"] for r in runs], [r["cpu"] for r in runs]
        median[name] = {"wall": statistics.median(walls), "wall_min": min(walls),
                        "cpu": statistics.median(cpus)}
        phases = "  ".join(f"{k} {statistics.median(r[k] for r in runs):.3f}"
                           for k in runs[0] if k not in ("total", "cpu"))
        print(f"{name:>16} {median[name]['wall']:9.3f} {min(walls):9.3f} {max(walls):9.3f} "
              f"{median[name]['cpu']:8.3f} {min(cpus):8.3f} {len(runs):3d}  {phases}")

    print("\nratios (target): of wall medians, of wall minima, of CPU-time medians")
    for num, den, target in (("maml_api", "maml_hand", 0.8), ("fomaml_api", "maml_api", 0.6),
                             ("maml_ckpt1", "maml_api", 1.35),
                             ("maml_ckpt_true", "maml_api", 1.35),
                             ("maml_api_nchw", "maml_hand", 0.8),
                             ("fomaml_api_nchw", "maml_api_nchw", 0.6),
                             ("maml_api", "maml_hand_cl", None),
                             ("reptile_api", "reptile_api_nchw", None),
                             ("leap_api", "leap_api_nchw", None),
                             ("imaml_api", "imaml_api_nchw", None)):
        if num in median and den in median:
            ratios = [median[num][k] / median[den][k] for k in ("wall", "wall_min", "cpu")]
            if target is None:
                verdict = ("no target: the API against a hand loop that also uses channels-last"
                           if den == "maml_hand_cl" else "no target: channels_last=True against "
                           "the default layout")
            else:
                value = ratios[2] if judge == "cpu" else ratios[0]
                verdict = (f"target <= {target}; by {'CPU' if judge == 'cpu' else 'wall'} time: "
                           f"{'met' if value <= target else 'NOT met'}")
            print(f"  {num} / {den}: wall {ratios[0]:.3f}, wall-min {ratios[1]:.3f}, "
                  f"cpu {ratios[2]:.3f}  ({verdict})")


if __name__ == "__main__":
    main()
