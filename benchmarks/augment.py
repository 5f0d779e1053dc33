"""Omniglot augmentation throughput: the experiment's batched ``data.augment`` against a
per-image PIL/torchvision pipeline of the same transform, measured in the same run.

- ``batched``: ``omniglot.data.augment`` as ``TaskSampler.batches`` calls it: one call on a
  float ``(N, 1, 28, 28)`` batch in [0, 1] (rotation 0-360 degrees, translation 0.2, scale
  0.8-1.2; one ``affine_grid`` + ``grid_sample``), on the CPU.
- ``pil``: what a per-image ``Dataset`` does: for each image, ``PIL.Image.fromarray`` on the
  cached ``uint8`` array -> ``torchvision.transforms.RandomAffine(degrees=360,
  translate=(0.2, 0.2), scale=(0.8, 1.2), interpolation=BILINEAR)`` -> ``ToTensor``, one image
  at a time, then ``torch.stack`` into a batch (a ``DataLoader``'s collate). Bilinear, like
  ``augment``; ``pil_nearest`` is the same with RandomAffine's default (nearest) interpolation.

Both run in one process with one thread (``torch.set_num_threads(1)``; PIL is single-threaded),
alternating round by round; each measurement repeats calls for at least ``--min-time`` CPU
seconds after one untimed call. The table gives images per second (medians over rounds, by
process CPU time and by wall time) and the ratio batched / per-image as the median (and range)
of the per-round ratios. Before timing, it checks that both produce ``(N, 1, 28, 28)`` float32
images in [0, 1] with close mean ink (the same transform distribution keeps the mean mass), and
that ``augment`` equals ``grid_sample(affine_grid(theta))`` on the same draws in float64.

Usage::

    python benchmarks/augment.py                         # batch sizes 128, 1280, 12800
    python benchmarks/augment.py --sizes 128,1280 --rounds 3 --min-time 0.2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "omniglot"))
import data  # src/omniglot is an experiment folder, not a package


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 28x28 stroke images (ink 255 on background 0, like the Omniglot cache)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for img in images:
        for _ in range(3):  # three random strokes of 2-pixel width
            r0, c0, r1, c1 = rng.integers(4, 24, size=4)
            steps = max(abs(r1 - r0), abs(c1 - c0), 1)
            rows = np.linspace(r0, r1, steps + 1).round().astype(int)
            cols = np.linspace(c0, c1, steps + 1).round().astype(int)
            img[rows, cols] = 255
            img[np.minimum(rows + 1, 27), cols] = 255
    return images


def reference(x: Tensor, generator: torch.Generator) -> Tensor:
    """``data.augment``'s transform as one ``affine_grid`` + ``grid_sample`` on the same draws
    (the implementation before the speed-up)."""
    u = torch.rand(x.shape[0], 4, generator=generator, dtype=torch.float64)
    angle, s = u[:, 0] * math.radians(360.0), 0.8 + u[:, 1] * 0.4
    t = (u[:, 2:] * 2 - 1) * 0.2 * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([cos, -sin, t[:, 0], sin, cos, t[:, 1]], 1).view(-1, 2, 3).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batched(images_float: Tensor, generator: torch.Generator) -> Tensor:
    return data.augment(images_float, generator)


def per_image(images_uint8: np.ndarray, pipeline: transforms.Compose) -> Tensor:
    return torch.stack([pipeline(Image.fromarray(img)) for img in images_uint8])


def pipeline_(interpolation: transforms.InterpolationMode) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomAffine(degrees=360, translate=(0.2, 0.2), scale=(0.8, 1.2),
                                interpolation=interpolation),
        transforms.ToTensor()])


def rate(fn, images: int, min_time: float) -> tuple[float, float]:
    """Images per second of ``fn()`` by process CPU time and by wall time: one untimed call,
    then calls until ``min_time`` CPU seconds have passed."""
    fn()
    calls, c, w = 0, time.process_time(), time.perf_counter()
    while True:
        fn()
        calls += 1
        cpu = time.process_time() - c
        if cpu >= min_time:
            return calls * images / cpu, calls * images / (time.perf_counter() - w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="128,1280,12800", help="comma list of batch sizes")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="CPU seconds per measurement (calls repeat until then)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds (each measures every pipeline at every size)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    pipelines = {"pil": pipeline_(transforms.InterpolationMode.BILINEAR),
                 "pil_nearest": pipeline_(transforms.InterpolationMode.NEAREST)}
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()}; {args.rounds} rounds, >= {args.min_time} CPU s per "
          "measurement")

    # same shape, dtype and range; the same transform distribution keeps the mean ink
    check_uint8 = synthetic_images(512, seed=1)
    check_float = torch.from_numpy(check_uint8).float().div(255.0).unsqueeze(1)
    out_b = batched(check_float, torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # RandomAffine draws from the global generator
    out_p = per_image(check_uint8, pipelines["pil"])
    for name, out in (("batched", out_b), ("pil", out_p)):
        if out.shape != (512, 1, 28, 28) or out.dtype != torch.float32:
            raise RuntimeError(f"{name}: shape {tuple(out.shape)} dtype {out.dtype}")
        if out.min() < 0 or out.max() > 1:
            raise RuntimeError(f"{name}: values outside [0, 1]: {out.min()}, {out.max()}")
    mass = [out.sum(dim=(1, 2, 3)).mean().item() / check_float.sum(dim=(1, 2, 3)).mean().item()
            for out in (out_b, out_p)]
    x64 = check_float.double()
    error = (data.augment(x64, torch.Generator().manual_seed(0))
             - reference(x64, torch.Generator().manual_seed(0))).abs().max().item()
    if error > 1e-12:
        raise RuntimeError(f"augment differs from affine_grid + grid_sample by {error:.2e}")
    print(f"check: augment == affine_grid + grid_sample on the same draws, float64, 512 images "
          f"(2 chunks): max |difference| {error:.1e}")
    print(f"check: both (512, 1, 28, 28) float32 in [0, 1]; mean ink after / before: batched "
          f"{mass[0]:.3f}, pil {mass[1]:.3f}")

    names = ("batched", *pipelines)
    cpu: dict[tuple[str, int], list[float]] = {}
    wall: dict[tuple[str, int], list[float]] = {}
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for n in sizes:
        images_uint8 = synthetic_images(n, seed=n)
        inputs[n] = (images_uint8,
                     torch.from_numpy(images_uint8).float().div(255.0).unsqueeze(1))
    for r in range(args.rounds):
        for n in sizes:
            images_uint8, images_float = inputs[n]
            jobs = {"batched": partial(batched, images_float, generator),
                    **{k: partial(per_image, images_uint8, p) for k, p in pipelines.items()}}
            for name in names if r % 2 == 0 else names[::-1]:
                c, w = rate(jobs[name], n, args.min_time)
                cpu.setdefault((name, n), []).append(c)
                wall.setdefault((name, n), []).append(w)

    print(f"load average at end: {os.getloadavg()}\n")
    print("images per second by CPU time (wall time), medians over rounds; ratio = batched / "
          "per-image, median of the per-round ratios [min-max]")
    print(f"{'batch':>6} {'batched':>17} {'pil bilinear':>15} {'pil nearest':>15}   "
          f"{'ratio vs bilinear':>22}   {'ratio vs nearest':>22}")
    for n in sizes:
        cells = "".join(f" {statistics.median(cpu[(k, n)]):>7.0f} "
                        f"({statistics.median(wall[(k, n)]):>7.0f})" if k == "batched" else
                        f" {statistics.median(cpu[(k, n)]):>6.0f} "
                        f"({statistics.median(wall[(k, n)]):>6.0f})" for k in names)
        ratios = ""
        for k in pipelines:
            per_round = [b / p for b, p in zip(cpu[("batched", n)], cpu[(k, n)])]
            ratios += (f"   {statistics.median(per_round):>6.1f}x "
                       f"[{min(per_round):5.1f}-{max(per_round):5.1f}]")
        print(f"{n:>6}{cells}{ratios}")
    print("\ntarget: batched >= 20x the per-image pipeline")


if __name__ == "__main__":
    main()
