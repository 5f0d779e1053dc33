"""float32 meta-gradients with exact and TF32 precision against float64, and their speed.

The MAML Omniglot workload of ``meta_step.py`` (4-block conv net, 64 filters, BatchNorm with
batch statistics; 5-way 1-shot, 15 queries per class, 28x28 inputs; 5 inner SGD steps at lr
0.4; second order) on ``--tasks`` tasks. One initialisation and one meta-batch, drawn in float64
and cast to float32, give:

- the float64 meta-gradient of ``maml.MAML`` (the reference);
- the float32 meta-gradients of ``maml.MAML`` and of a hand-written ``functional_call`` +
  ``autograd.grad`` loop, under ``metazoo.fp32_precision("exact")`` and ``("tf32")``;
- ``rel(a, b) = |a - b| / |b|`` over all parameters' gradients concatenated;
- seconds per float32 meta-step (Adam) of ``maml.MAML`` in each precision: rounds alternate the
  order, each times ``--repeat`` meta-steps after a warm-up; medians and the tf32/exact ratio.

Exits with status 1 when, on a GPU, the exact float32 meta-gradient is not within
``--tolerance`` (default 1e-4) of the float64 one. On a CPU both precisions are IEEE float32
(TF32 exists only on NVIDIA GPUs): the numbers show the float32 rounding alone.

Usage::

    python benchmarks/precision.py                     # cuda if available, else cpu
    python benchmarks/precision.py --device cpu --tasks 2 --rounds 1 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_step import HandMAML, few_shot_tasks, maml_learner, omniglot_net, sync

import metazoo


def meta_gradient(net: torch.nn.Module, tasks: list[Any], *, hand: bool) -> torch.Tensor:
    learner = HandMAML(net) if hand else maml_learner(net)
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_backward(tasks)
    return torch.cat([p.grad.reshape(-1).double().cpu() for p in net.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def time_meta_steps(net: torch.nn.Module, tasks: list[Any], device: torch.device,
                    repeat: int) -> list[float]:
    learner = maml_learner(net)
    learner.meta_step(tasks)  # warm-up (cuDNN algorithm choice, allocator)
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        learner.meta_step(tasks)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (order alternates)")
    p.add_argument("--repeat", type=int, default=3, help="timed meta-steps per round")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    reference = omniglot_net(5).double().to(device)
    tasks64 = few_shot_tasks(args.tasks, ways=5, shots=1, queries=15, device=device,
                             dtype=torch.float64, seed=args.seed)
    tasks32 = [metazoo.Task([(x.float(), y) for x, y in t.support],
                            (t.query[0].float(), t.query[1])) for t in tasks64]

    def net32() -> torch.nn.Module:
        net = omniglot_net(5).to(device)
        net.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
        return net

    g64 = meta_gradient(reference, tasks64, hand=False)
    results: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(device)
                               if device.type == "cuda" else None, "tasks": args.tasks}
    for precision in metazoo.PRECISIONS:
        with metazoo.fp32_precision(precision):
            api = meta_gradient(net32(), tasks32, hand=False)
            hand = meta_gradient(net32(), tasks32, hand=True)
        results[f"rel_{precision}_vs_float64"] = rel(api, g64)
        results[f"rel_{precision}_hand_vs_float64"] = rel(hand, g64)
        results[f"rel_{precision}_api_vs_hand"] = rel(api, hand)

    times: dict[str, list[float]] = {precision: [] for precision in metazoo.PRECISIONS}
    for r in range(args.rounds):
        order = metazoo.PRECISIONS if r % 2 == 0 else metazoo.PRECISIONS[::-1]
        for precision in order:
            with metazoo.fp32_precision(precision):
                times[precision] += time_meta_steps(net32(), tasks32, device, args.repeat)
    for precision, values in times.items():
        results[f"seconds_per_meta_step_{precision}"] = statistics.median(values)
    results["time_ratio_tf32_over_exact"] = (results["seconds_per_meta_step_tf32"]
                                             / results["seconds_per_meta_step_exact"])

    print(f"MAML meta-gradient, Omniglot net, 5-way 1-shot, {args.tasks} tasks, 5 inner SGD "
          f"steps at lr 0.4, on {device} ({results['gpu'] or 'CPU'}, torch {torch.__version__})")
    for precision in metazoo.PRECISIONS:
        r = {k[len(f"rel_{precision}_"):]: v for k, v in results.items()
             if k.startswith(f"rel_{precision}_")}
        seconds = results[f"seconds_per_meta_step_{precision}"]
        print(f"  float32 {precision:5}: rel to float64 {r['vs_float64']:.2e} (hand loop "
              f"{r['hand_vs_float64']:.2e}); API vs hand loop {r['api_vs_hand']:.2e}; "
              f"{seconds:.4f} s per meta-step (median)")
    print(f"  time ratio tf32 / exact: {results['time_ratio_tf32_over_exact']:.3f}")
    print(json.dumps(results))
    if device.type == "cuda" and not results["rel_exact_vs_float64"] < args.tolerance:
        print(f"FAIL: exact float32 is {results['rel_exact_vs_float64']:.2e} from float64, "
              f"above the tolerance {args.tolerance:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
