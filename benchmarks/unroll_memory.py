"""Peak memory and time of second-order unrolls by number of inner steps: plain, fixed segments
(``checkpoint=S``, the schedule ``checkpoint=True`` used before issue 26) and the binomial
schedule (``checkpoint=True`` = ``metazoo.Checkpoint(snapshots=10)``).

Workloads (``--workload``):

- ``w1`` (default): MAML's Omniglot net, 4 x [conv3x3 64, BatchNorm with batch statistics, ReLU,
  max-pool 2] and a linear head, one 5-way 1-shot task (5 support images, 15 queries per class),
  28x28 inputs, inner SGD at lr 0.4 (issue 26's W1 task).
- ``conv20``: the 4-block Omniglot conv net (conv -> max-pool -> BatchNorm -> ReLU), one 20-way
  5-shot task (100 support / 300 query images), inner SGD at lr 0.1 (this script's earlier
  default).
- ``mlp``: a small MLP (784 -> 128 -> 128 -> 10, tanh; 118k parameters, 0.45 MiB per stored
  state, like W1), 50 support / 50 query rows, inner SGD at lr 0.1 (for K up to 10,000).

Each (K, mode) runs in fresh processes: one warm-up meta-step of 2 steps, then the measured
meta-step (unroll, query loss, backward). Memory is counted above the process's level just
before the measured meta-step: on CUDA ``torch.cuda.max_memory_allocated``, on CPU peak RSS
(``ru_maxrss``) minus RSS before. On CPU memory and time come from two separate processes: the
memory process fixes glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back
to the OS and RSS follows live tensors rather than the heap glibc retains after large frees
(identical runs differed by 10% without it), at the cost of speed; the time process uses the
default allocator. A plain run above ``--plain-max-steps`` or predicted not to fit in available
memory is reported, not run.

On CPU the memory process also samples glibc's live allocations (``mallinfo2``: bytes handed
out and not freed, tensors and Python objects) before and after every inner loss call: the
"heap" columns, the CPU's nearest to CUDA's ``max_memory_allocated`` (it misses the transient
peak inside one step's backward, the same at every K). The timing process, with glibc's default
allocator, reports its peak RSS too: the "default malloc" columns, what ``top`` shows a user who
sets nothing (noisier: the default allocator keeps freed memory as it sees fit). RSS also counts
freed memory that the allocator and the interpreter keep (glibc's heap, CPython's free lists),
which grows over thousands of steps up to a bound; read the columns together.

Printed: MiB and seconds per mode, the binomial schedule's peak against its own peak at the
smallest K (flat in K: close to 1), its time against the fixed segments' at the same K, and
``Checkpoint.plan``'s stored states and recomputed steps.

With ``--tasks T`` the unroll is the vectorized one (``metazoo.vectorize.functional_unroll``
under ``vmap(grad_and_value(...))`` over T copies of the task with different inputs).

    python benchmarks/unroll_memory.py --threads 1 --steps 10 100 1000        # W1, issue 26
    python benchmarks/unroll_memory.py --threads 1 --workload mlp --steps 10 100 1000 10000 \
        --modes binomial                                                       # issue 26
    python benchmarks/unroll_memory.py --tasks 2 --steps 10 100                # vectorized
    python benchmarks/unroll_memory.py --device cuda --steps 10 100 1000
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MODES = ("plain", "segments", "binomial")


def w1_convnet(ways: int = 5, filters: int = 64):
    from torch import nn

    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.BatchNorm2d(filters),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def omniglot_convnet(num_classes: int = 20, filters: int = 64):
    from torch import nn

    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.MaxPool2d(2),
                   nn.BatchNorm2d(filters), nn.ReLU()]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, num_classes))


def workload(name: str, device):
    """(model, support batch, query batch, inner lr) of a workload."""
    import torch
    from torch import nn

    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                              nn.Linear(128, 10))
        x = torch.randn(100, 784)
        y = torch.arange(10).repeat(10)
        return (model.to(device), (x[:50].to(device), y[:50].to(device)),
                (x[50:].to(device), y[50:].to(device)), 0.1)
    ways, shots, queries = (5, 1, 15) if name == "w1" else (20, 5, 15)
    model = w1_convnet(ways) if name == "w1" else omniglot_convnet(ways)
    support = (torch.randn(ways * shots, 1, 28, 28, device=device),
               torch.arange(ways, device=device).repeat_interleave(shots))
    query = (torch.randn(ways * queries, 1, 28, 28, device=device),
             torch.arange(ways, device=device).repeat_interleave(queries))
    return model.to(device), support, query, 0.4 if name == "w1" else 0.1


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_LIBC: ctypes.CDLL | None = None


def _mallinfo2() -> _MallInfo2:
    global _LIBC
    if _LIBC is None:  # loaded once: the heap is sampled twice per inner step
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallinfo2.restype = _MallInfo2
    return _LIBC.mallinfo2()


def _heap_mib() -> float:
    """Bytes glibc's malloc has handed out and not yet taken back (heap and mmap'd chunks):
    live allocations, without the freed-but-retained memory that makes RSS grow with K."""
    info = _mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> dict:
    import torch
    from torch.nn import functional as F

    import metazoo

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    steps, mode, tasks = args.steps[0], args.mode, args.tasks
    model, (support_x, support_y), (query_x, query_y), lr = workload(args.workload, device)
    model_loss_fn = metazoo.make_loss_fn(model, F.cross_entropy)
    heap = {"peak": 0.0}

    def loss_fn(params, buffers, batch):  # samples live heap bytes around every inner loss
        if device.type == "cpu":
            heap["peak"] = max(heap["peak"], _heap_mib())
        result = model_loss_fn(params, buffers, batch)
        if device.type == "cpu":
            heap["peak"] = max(heap["peak"], _heap_mib())
        return result

    buffers = metazoo.initial_buffers(model, "batch")
    checkpoint = {"plain": None, "segments": args.segment,
                  "binomial": metazoo.Checkpoint(snapshots=args.snapshots)}[mode]

    def vectorized_meta_step(k: int) -> float:
        from torch.func import grad_and_value, vmap

        def objective(params, support_x, query_x):
            result = metazoo.vectorize.functional_unroll(
                loss_fn, params, metazoo.SGD(lr), [(support_x, support_y)], steps=k,
                buffers=buffers, checkpoint=checkpoint)
            output, _ = metazoo.forward(model, result.params, result.buffers, query_x)
            return F.cross_entropy(output, query_y)

        params = {n: p.detach() for n, p in model.named_parameters()}
        noise = torch.linspace(0, 1, tasks, device=device).view(-1, *[1] * support_x.dim())
        _, losses = vmap(grad_and_value(objective), in_dims=(None, 0, 0))(
            params, support_x + noise, query_x + noise)
        return losses.mean().item()

    def meta_step(k: int) -> float:
        if tasks:
            return vectorized_meta_step(k)
        params = dict(model.named_parameters())
        result = metazoo.unroll(loss_fn, params, metazoo.SGD(lr), [(support_x, support_y)],
                                steps=k, buffers=buffers, checkpoint=checkpoint)
        output, _ = metazoo.forward(model, result.params, result.buffers, query_x)
        loss = F.cross_entropy(output, query_y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    meta_step(2)  # warm-up: kernels, allocator, lazy init (2 steps: the checkpointed path)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
        heap_before = heap["peak"] = _heap_mib()
        counter = _alloc_counter()
        if counter is not None:
            counter.alloc_counter_reset()
            counted_before = [counter.alloc_counter_live(aligned) for aligned in (1, 0)]
    start = time.perf_counter()
    loss = meta_step(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"steps": steps, "mode": mode, "seconds": time.perf_counter() - start,
              "memory_mib": peak - before, "loss": loss}
    if device.type == "cpu":
        result["heap_mib"] = heap["peak"] - heap_before
        if counter is not None:
            result["tensor_mib"], result["allocated_mib"] = (
                (counter.alloc_counter_peak(aligned) - live) / 2**20
                for aligned, live in zip((1, 0), counted_before))
    return result


def _alloc_counter() -> ctypes.CDLL | None:
    """``alloc_counter.c``, when the parent preloaded it into this process (``ALLOC_COUNTER``)."""
    path = os.environ.get("ALLOC_COUNTER")
    if not path or path not in os.environ.get("LD_PRELOAD", ""):
        return None
    counter = ctypes.CDLL(path)
    for name in ("alloc_counter_live", "alloc_counter_peak"):
        getattr(counter, name).restype = ctypes.c_longlong
    return counter


def build_alloc_counter(directory: str) -> str | None:
    """Compiles ``alloc_counter.c`` into ``directory``; ``None`` without a C compiler."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alloc_counter.c")
    library = os.path.join(directory, "alloc_counter.so")
    try:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", library, source], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"alloc_counter.c not built ({error}): no exact tensor-bytes column",
              file=sys.stderr)
        return None
    return library


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
               "--snapshots", str(args.snapshots), "--workload", args.workload,
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
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    if args.alloc_counter:
        preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), args.alloc_counter]))
        env.update(LD_PRELOAD=preload, ALLOC_COUNTER=args.alloc_counter)
    memory = _run_process(args, steps, mode, env)
    if "error" in memory or args.memory_only:
        return memory
    timing = _run_process(args, steps, mode, dict(os.environ))
    if "error" in timing:
        return timing
    return {**timing, **{key: memory[key] for key in ("memory_mib", "heap_mib", "tensor_mib",
                                                      "allocated_mib") if key in memory},
            "default_rss_mib": timing["memory_mib"]}


def predict_mib(results: list[dict], steps: int) -> float | None:
    """Linear extrapolation of memory in K from the two largest measured runs."""
    ok = sorted((r["steps"], r["memory_mib"]) for r in results if "memory_mib" in r)
    if len(ok) < 2:
        return None
    (k0, m0), (k1, m1) = ok[-2], ok[-1]
    return m1 + (steps - k1) * max(m1 - m0, 0.0) / max(k1 - k0, 1)


def _cell(result: dict | None, key: str, fmt: str) -> str:
    return format(result[key], fmt) if result and key in result else "n/a"


def _ratio(result: dict, first: dict | None, key: str) -> str:
    if first and key in first and key in result and first[key] > 0:
        return f"{result[key] / first[key]:.2f}"
    return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--workload", choices=["w1", "conv20", "mlp"], default="w1")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segment", type=int, default=5,
                        help="segments mode: steps per recomputed segment (checkpoint=S)")
    parser.add_argument("--snapshots", type=int, default=None,
                        help="binomial mode: stored states (default metazoo.DEFAULT_SNAPSHOTS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=0,
                        help="T > 0: the vectorized unroll, vmap over T tasks")
    parser.add_argument("--plain-max-steps", type=int, default=100,
                        help="the plain unroll only up to this K (it grows by about 7 MiB per "
                             "step on W1)")
    parser.add_argument("--memory-fraction", type=float, default=0.75,
                        help="skip a run predicted to need more than this share of free memory")
    parser.add_argument("--memory-only", action="store_true",
                        help="CPU: skip the timing processes (half the run time)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.snapshots is None:
        import metazoo

        args.snapshots = metazoo.DEFAULT_SNAPSHOTS
    if args.child:
        print(json.dumps(child(args)))
        return
    # The exact allocation counter of the memory processes, built for this run and removed
    # with it (TemporaryDirectory cleans up at exit).
    scratch = tempfile.TemporaryDirectory(prefix="unroll_memory_")
    args.alloc_counter = (build_alloc_counter(scratch.name) if args.device == "cpu" else None)

    import metazoo

    rows: dict[int, dict[str, dict]] = {}
    measured: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for steps in sorted(args.steps):
        rows[steps] = {}
        for mode in args.modes:
            predicted = predict_mib(measured[mode], steps)
            budget = args.memory_fraction * available_mib(args.device)
            if mode == "plain" and steps > args.plain_max_steps:
                result = {"steps": steps, "mode": mode,
                          "error": f"not run (K > --plain-max-steps {args.plain_max_steps})"}
            elif predicted is not None and predicted > budget:
                result = {"steps": steps, "mode": mode,
                          "error": f"does not fit (predicted {predicted / 1024:.1f} GiB > "
                                   f"{budget / 1024:.1f} GiB free)"}
            else:
                result = run_child(args, steps, mode)
            rows[steps][mode] = result
            if "memory_mib" in result:
                measured[mode].append(result)
            print(f"  K={steps:>5} {mode:>9}: " + (
                f"{result['memory_mib']:8.1f} MiB {result['seconds']:8.2f} s"
                if "memory_mib" in result else result["error"]), file=sys.stderr, flush=True)

    print(f"\nunroll_memory: workload={args.workload} device={args.device} "
          f"threads={args.threads} tasks={args.tasks or 'one, the loop'} segment={args.segment} "
          f"snapshots={args.snapshots} (second order; MiB above the level before the "
          f"meta-step)\n")
    header = ["K", *(f"{m} MiB" for m in args.modes), *(f"{m} s" for m in args.modes)]
    have_binomial = "binomial" in args.modes
    if have_binomial:
        header += ["binomial mem / K0", "binomial tensors MiB", "tensors / K0",
                   "binomial heap MiB", "heap / K0", "binomial RSS default malloc MiB",
                   "default / K0", "stored", "recomputed"]
        if "segments" in args.modes:
            header += ["binomial / segments time"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 1) + ":" for h in header) + "|")
    first = rows[min(rows)].get("binomial")
    for steps, row in rows.items():
        cells = [str(steps)]
        cells += [_cell(row[m], "memory_mib", ".1f") for m in args.modes]
        cells += [_cell(row[m], "seconds", ".2f") for m in args.modes]
        if have_binomial:
            binomial = row["binomial"]
            plan = metazoo.Checkpoint(snapshots=args.snapshots).plan(
                steps, vectorized=bool(args.tasks))
            heap = "allocated_mib" if "allocated_mib" in binomial else "heap_mib"
            cells += [_ratio(binomial, first, "memory_mib"), _cell(binomial, "tensor_mib", ".1f"),
                      _ratio(binomial, first, "tensor_mib"), _cell(binomial, heap, ".1f"),
                      _ratio(binomial, first, heap), _cell(binomial, "default_rss_mib", ".1f"),
                      _ratio(binomial, first, "default_rss_mib"),
                      str(plan.stored_states), str(plan.recomputed_steps)]
            if "segments" in args.modes:
                segments = row["segments"]
                cells.append(f"{binomial['seconds'] / segments['seconds']:.2f}"
                             if "seconds" in binomial and "seconds" in segments else "n/a")
        print("| " + " | ".join(cells) + " |")
        for r in row.values():
            if "error" in r:
                print(f"|  | {r['mode']}: {r['error']} |")
    losses = {(k, m): r["loss"] for k, row in rows.items() for m, r in row.items() if "loss" in r}
    if losses:
        worst = max(abs(loss - next(v for (k2, _), v in losses.items() if k2 == k))
                    for (k, _), loss in losses.items())
        print(f"\nquery loss: largest difference between modes at one K: {worst:.2e}")


if __name__ == "__main__":
    main()
