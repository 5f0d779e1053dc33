"""One WarpGrad meta-step on the Omniglot conv net with warp layers, timed by phase.

The network is the paper's Omniglot task learner (4 blocks of 64-filter 3x3 convolution,
max-pooling, BatchNorm and ReLU on 28x28 inputs, a linear head) with a warp block after every
adaptable block (the ablation row given by ``--warp``, default the linear 3x3 convolution).
Data are synthetic. One meta-step is: adaptation of ``--tasks`` task learners for ``--steps``
SGD steps each (recording every state), the warp objective's replay over the buffer (with
``--bsz`` states per meta-optimizer step), and the init update (simplified Leap). The three
phases are timed separately; each configuration in ``--objectives`` (and ``--buffers``) is run
``--repeat`` times, alternating, after a warm-up, and the medians are printed with ratios to
the adaptation time measured in the same run.

Paper configuration (on a GPU)::

    python benchmarks/warp_meta_step.py --tasks 20 --steps 100 --batch 128 --device cuda

Small CPU configuration::

    python benchmarks/warp_meta_step.py --tasks 2 --steps 5 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import warpgrad


class WarpedOmniConv(nn.Module):
    """The Omniglot conv net with a warp block after each adaptable block."""

    def __init__(self, *, classes: int, filters: int = 64, blocks: int = 4,
                 warp: str = "3x3") -> None:
        super().__init__()
        self.adapt = nn.ModuleList()
        self.warp = nn.ModuleList()
        channels = 1
        for _ in range(blocks):
            self.adapt.append(nn.Sequential(
                nn.Conv2d(channels, filters, 3, padding=1), nn.MaxPool2d(2),
                nn.BatchNorm2d(filters), nn.ReLU()))
            self.warp.append(warpgrad.warp_block(warp, filters) or nn.Identity())
            channels = filters
        self.head = nn.Linear(filters, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, warp in zip(self.adapt, self.warp, strict=True):
            x = warp(block(x))
        return self.head(x.flatten(1))

    def adapt_modules(self) -> list[nn.Module]:
        return [*self.adapt, self.head]

    def warp_modules(self) -> list[nn.Module]:
        return list(self.warp)


def make_tasks(args: argparse.Namespace, device: torch.device
               ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(args.batch, 1, 28, 28, generator=g).to(device),
              torch.randint(0, args.classes, (args.batch,), generator=g).to(device))
             for _ in range(args.steps)] for _ in range(args.tasks)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meta_step(args: argparse.Namespace, objective: str, inmem: bool, vectorize: int,
              device: torch.device, tasks: list) -> dict[str, float]:
    torch.manual_seed(0)
    net = WarpedOmniConv(classes=args.classes, warp=args.warp).to(device)
    updater = warpgrad.DualUpdater(F.cross_entropy, warp_objective=objective, bsz=args.bsz,
                                   seed=0, vectorize=vectorize)
    buffer = warpgrad.ReplayBuffer(inmem=inmem, device=None if args.keep_on_device else "cpu")
    params = warpgrad.OptimizerParameters(default_lr=args.inner_lr)
    model = warpgrad.Warp(net, net.adapt_modules(), net.warp_modules(), updater, buffer,
                          optimizer_parameters=params)
    meta_opt = torch.optim.SGD(model.warp_parameters(), lr=0.01)

    def meta_step_fn() -> None:
        meta_opt.step()
        meta_opt.zero_grad()

    sync(device)
    start = time.perf_counter()
    for task in tasks:
        model.init_adaptation()
        model.register_task(task)
        model.collect()
        opt = torch.optim.SGD(model.adapt_parameters(), lr=args.inner_lr)
        for x, y in task:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.no_collect()
    sync(device)
    adaptation = time.perf_counter() - start
    start = time.perf_counter()
    result = model.backward(meta_step_fn)
    sync(device)
    total = time.perf_counter() - start
    buffer.close()
    return {"adaptation": adaptation, "replay": result.warp_seconds,
            "init": result.init_seconds, "backward": total, "meta_steps": result.num_meta_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--bsz", type=int, default=1,
                        help="replayed states per meta-optimizer step (<= 0: all)")
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--warp", default="3x3", choices=list(warpgrad.ABLATIONS))
    parser.add_argument("--objectives", default="stop_gradient,exact,approx")
    parser.add_argument("--buffers", default="memory", help="comma list of memory,disk")
    parser.add_argument("--vectorize", default="0",
                        help="comma list of DualUpdater(vectorize=...) values to compare")
    parser.add_argument("--keep-on-device", action="store_true",
                        help="keep in-memory states on the model's device instead of the CPU")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 avoids spin contention on shared CPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks = make_tasks(args, device)
    configs = [(o, b, int(v)) for o in args.objectives.split(",")
               for b in args.buffers.split(",") for v in args.vectorize.split(",")]
    for b in args.buffers.split(","):
        if b not in ("memory", "disk"):
            parser.error(f"--buffers: unknown {b!r}; use memory and/or disk")
    print(f"device={device} threads={args.threads} tasks={args.tasks} steps={args.steps} "
          f"batch={args.batch} bsz={args.bsz} warp={args.warp} torch={torch.__version__}")
    for objective, where, vectorize in configs[:1]:  # warm-up
        meta_step(args, objective, where == "memory", vectorize, device, tasks)
    times: dict[tuple[str, str, int], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(args.repeat):
        for objective, where, vectorize in configs:  # alternate configurations in each round
            times[(objective, where, vectorize)].append(
                meta_step(args, objective, where == "memory", vectorize, device, tasks))
    print(f"{'objective':>14} {'buffer':>7} {'vmap':>5} {'adapt s':>9} {'replay s':>9} "
          f"{'init s':>8} {'replay/adapt':>13} {'init/adapt':>11} {'meta-steps':>10}")
    for (objective, where, vectorize), runs in times.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{objective:>14} {where:>7} {vectorize:5d} {med['adaptation']:9.3f} "
              f"{med['replay']:9.3f} "
              f"{med['init']:8.4f} {med['replay'] / med['adaptation']:13.2f} "
              f"{med['init'] / med['adaptation']:11.4f} {int(med['meta_steps']):10d}")


if __name__ == "__main__":
    main()
