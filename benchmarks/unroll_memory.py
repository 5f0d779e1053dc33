"""Peak memory and time of plain vs checkpointed second-order unrolls, by number of inner steps.

Workload: the Omniglot 4-block conv net (3x3 conv 64 -> 2x2 max-pool -> BatchNorm -> ReLU, linear
head), one 20-way task with 5 support images per class (100 images per inner step) and 15 query
images per class, 28x28 inputs, inner SGD, second-order meta-gradient of the query loss.

Each (K, mode) runs in fresh processes: one warm-up unroll of 1 step, then the measured unroll
(forward, query loss, backward). Memory is counted above the process's level just before the
measured unroll: on CUDA ``torch.cuda.max_memory_allocated``, on CPU peak RSS (``ru_maxrss``)
minus RSS before. On CPU, memory and time come from two separate processes: the memory process
fixes glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS and
RSS follows live tensors rather than the heap glibc retains after large frees (which made
identical runs differ by 10%), at the cost of speed; the time process uses the default
allocator. A plain run predicted not to fit in available memory is reported, not run.

With ``--tasks T`` the unroll is the vectorized one (``metazoo.vectorize.functional_unroll``
under ``vmap(grad_and_value(...))`` over T copies of the task with different inputs), plain
against checkpointed segments (``_CheckpointedSegment``, recomputed with ``torch.func.vjp``).

    python benchmarks/unroll_memory.py                       # CPU, K in 1 10 25 50 100
    python benchmarks/unroll_memory.py --device cuda --steps 1 10 100 1000
    python benchmarks/unroll_memory.py --tasks 2 --steps 2 10 20   # the vectorized unroll
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SEGMENT_DEFAULT = 5


def omniglot_convnet(num_classes: int = 20, filters: int = 64):
    from torch import nn

    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.MaxPool2d(2),
                   nn.BatchNorm2d(filters), nn.ReLU()]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, num_classes))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(steps: int, mode: str, device_name: str, segment: int, threads: int,
          tasks: int = 0) -> dict:
    import torch
    from torch.nn import functional as F

    import metazoo

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    model = omniglot_convnet().to(device)
    ways, shots, queries = 20, 5, 15
    support_x = torch.randn(ways * shots, 1, 28, 28, device=device)
    support_y = torch.arange(ways, device=device).repeat_interleave(shots)
    query_x = torch.randn(ways * queries, 1, 28, 28, device=device)
    query_y = torch.arange(ways, device=device).repeat_interleave(queries)
    loss_fn = metazoo.make_loss_fn(model, F.cross_entropy)
    buffers = metazoo.initial_buffers(model, "batch")
    checkpoint = segment if mode == "checkpointed" else None

    def vectorized_meta_step(k: int) -> float:
        from torch.func import grad_and_value, vmap

        def objective(params, support_x, query_x):
            result = metazoo.vectorize.functional_unroll(
                loss_fn, params, metazoo.SGD(0.1), [(support_x, support_y)], steps=k,
                buffers=buffers, checkpoint=checkpoint)
            output, _ = metazoo.forward(model, result.params, result.buffers, query_x)
            return F.cross_entropy(output, query_y)

        params = {n: p.detach() for n, p in model.named_parameters()}
        noise = torch.linspace(0, 1, tasks, device=device).view(-1, 1, 1, 1, 1)
        _, losses = vmap(grad_and_value(objective), in_dims=(None, 0, 0))(
            params, support_x + noise, query_x + noise)
        return losses.mean().item()

    def meta_step(k: int) -> float:
        if tasks:
            return vectorized_meta_step(k)
        params = dict(model.named_parameters())
        result = metazoo.unroll(loss_fn, params, metazoo.SGD(0.1), [(support_x, support_y)],
                                steps=k, buffers=buffers, checkpoint=checkpoint)
        output, _ = metazoo.forward(model, result.params, result.buffers, query_x)
        loss = F.cross_entropy(output, query_y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    meta_step(1)  # warm-up: kernels, allocator, lazy init
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    start = time.perf_counter()
    loss = meta_step(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"steps": steps, "mode": mode, "seconds": time.perf_counter() - start,
            "memory_mib": peak - before, "loss": loss}


def available_mib(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 2**20
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def _run_process(args: argparse.Namespace, steps: int, mode: str, env: dict) -> dict:
    command = [sys.executable, __file__, "--child", "--steps", str(steps), "--mode", mode,
               "--device", args.device, "--segment", str(args.segment),
               "--threads", str(args.threads), "--tasks", str(args.tasks)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        reason = "killed (out of memory?)" if completed.returncode < 0 else "failed"
        return {"steps": steps, "mode": mode, "error": f"{reason}: "
                f"{completed.stderr.strip().splitlines()[-1:] or completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_child(args: argparse.Namespace, steps: int, mode: str) -> dict:
    """Memory from one fresh process, time from another (see the module docstring)."""
    if args.device.startswith("cuda"):
        return _run_process(args, steps, mode, dict(os.environ))
    memory = _run_process(args, steps, mode, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    if "error" in memory:
        return memory
    timing = _run_process(args, steps, mode, dict(os.environ))
    if "error" in timing:
        return timing
    return {**timing, "memory_mib": memory["memory_mib"]}


def predict_mib(results: list[dict], steps: int) -> float | None:
    """Linear extrapolation of memory in K from the two largest measured runs."""
    ok = sorted((r["steps"], r["memory_mib"]) for r in results if "memory_mib" in r)
    if len(ok) < 2:
        return None
    (k0, m0), (k1, m1) = ok[-2], ok[-1]
    return m1 + (steps - k1) * max(m1 - m0, 0.0) / max(k1 - k0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 25, 50, 100])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segment", type=int, default=SEGMENT_DEFAULT,
                        help="checkpoint segment length (inner steps per recomputed segment)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=0,
                        help="T > 0: the vectorized unroll, vmap over T tasks")
    parser.add_argument("--memory-fraction", type=float, default=0.75,
                        help="skip a run predicted to need more than this share of free memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps[0], args.mode, args.device, args.segment,
                               args.threads, args.tasks)))
        return

    rows: dict[int, dict[str, dict]] = {}
    measured: dict[str, list[dict]] = {"plain": [], "checkpointed": []}
    for steps in sorted(args.steps):
        rows[steps] = {}
        for mode in ("plain", "checkpointed"):
            predicted = predict_mib(measured[mode], steps)
            budget = args.memory_fraction * available_mib(args.device)
            if predicted is not None and predicted > budget:
                result = {"steps": steps, "mode": mode,
                          "error": f"does not fit (predicted {predicted / 1024:.1f} GiB > "
                                   f"{budget / 1024:.1f} GiB free)"}
            else:
                result = run_child(args, steps, mode)
            rows[steps][mode] = result
            if "memory_mib" in result:
                measured[mode].append(result)
            print(f"  K={steps:>4} {mode:>12}: " + (
                f"{result['memory_mib']:8.0f} MiB {result['seconds']:7.2f} s"
                if "memory_mib" in result else result["error"]), file=sys.stderr, flush=True)

    print(f"\nunroll_memory: device={args.device} threads={args.threads} segment={args.segment} "
          f"tasks={args.tasks or 'one, the loop'} (20-way, 100 support / 300 query images, "
          "second order)\n")
    print("|    K | plain MiB | ckpt MiB | mem ratio | plain s | ckpt s | time ratio |")
    print("|-----:|----------:|---------:|----------:|--------:|-------:|-----------:|")
    for steps, row in rows.items():
        plain, ckpt = row["plain"], row["checkpointed"]

        def cell(r: dict, key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "n/a"

        mem_ratio = time_ratio = "n/a"
        if "memory_mib" in plain and "memory_mib" in ckpt:
            mem_ratio = f"{ckpt['memory_mib'] / plain['memory_mib']:.3f}"
            time_ratio = f"{ckpt['seconds'] / plain['seconds']:.2f}"
        print(f"| {steps:4d} | {cell(plain, 'memory_mib', '9.0f')} | "
              f"{cell(ckpt, 'memory_mib', '8.0f')} | {mem_ratio:>9} | "
              f"{cell(plain, 'seconds', '7.2f')} | {cell(ckpt, 'seconds', '6.2f')} | "
              f"{time_ratio:>10} |")
        for r in (plain, ckpt):
            if "error" in r:
                print(f"|      | {r['mode']}: {r['error']} |")
    if all("loss" in r for row in rows.values() for r in row.values()):
        worst = max(abs(row["plain"]["loss"] - row["checkpointed"]["loss"])
                    for row in rows.values())
        print(f"\nquery loss |plain - checkpointed| max over K: {worst:.2e}")


if __name__ == "__main__":
    main()
