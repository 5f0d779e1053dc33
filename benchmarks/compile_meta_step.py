"""``compile=``: compile time and steady-state meta-step time of a vectorized MAML learner,
compiled against eager, side by side in one process per configuration (issue 26, item 5).

For each number of inner steps and each backend, a fresh process builds two ``maml.MAML``
learners on copies of one model (``vectorize=True``, second order), one with
``compile={"backend": B}``: the first compiled ``meta_backward`` is timed (compilation), then
eager and compiled ``meta_backward`` alternate ``--rounds`` times after a warm-up and the medians
are compared. The meta-gradients of both are compared (float64: they must agree to 1e-10).
Each configuration runs under ``--timeout`` seconds; one that does not finish is reported so.
The parent prints a line before each configuration: a first call can compile for minutes.

Workloads: ``small`` (``metazoo.testing.small_conv_net``: conv 3x3 with BatchNorm on 8x8 images,
3 classes, the test suite's net) and ``w1`` (MAML's Omniglot net, 4 x [conv3x3 64, BatchNorm,
ReLU, max-pool 2], 5-way 1-shot, 15 queries per class).

    python benchmarks/compile_meta_step.py --threads 1                      # small, 1 and 5 steps
    python benchmarks/compile_meta_step.py --workload w1 --steps 1 --backends aot_eager
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    import metazoo
    import metazoo.testing
    from maml import MAML

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float64
    if args.workload == "small":
        model = metazoo.testing.small_conv_net(dtype=dtype)
        tasks = metazoo.testing.image_tasks(args.tasks, dtype=dtype)
    else:
        sys.path.insert(0, os.path.dirname(__file__))
        from unroll_memory import w1_convnet

        model = w1_convnet().to(dtype)
        g = torch.Generator().manual_seed(1)

        def batch(n: int) -> tuple:
            return (torch.randn(5 * n, 1, 28, 28, generator=g, dtype=dtype),
                    torch.arange(5).repeat_interleave(n))

        tasks = [metazoo.Task([batch(1)], batch(15)) for _ in range(args.tasks)]

    def build(**kwargs: object) -> MAML:
        return MAML(model=copy.deepcopy(model), criterion=F.cross_entropy,
                    inner_optimizer=metazoo.SGD(0.4), inner_steps=args.steps[0], vectorize=True,
                    **kwargs)

    eager = build()
    compiled = build(compile={"backend": args.backend, "dynamic": False})

    def run(learner: MAML) -> tuple[float, list]:
        learner.meta_optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        learner.meta_backward(tasks)
        seconds = time.perf_counter() - start
        return seconds, [p.grad.clone() for p in learner.meta_parameters()]

    compile_seconds, compiled_grads = run(compiled)
    _, eager_grads = run(eager)
    difference = max((a - b).abs().max().item() for a, b in zip(compiled_grads, eager_grads))
    run(compiled)  # warm-up after compilation
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(run(eager)[0])
        times["compiled"].append(run(compiled)[0])
    eager_s, compiled_s = (statistics.median(times[k]) for k in ("eager", "compiled"))
    return {"steps": args.steps[0], "backend": args.backend, "compile_s": compile_seconds,
            "eager_s": eager_s, "compiled_s": compiled_s, "difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    parser.add_argument("--workload", choices=["small", "w1"], default="small")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per configuration (compilation included)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    rows = []
    for steps in args.steps:
        for backend in args.backends:
            print(f"compiling: {backend}, {steps} inner steps ({args.workload}, {args.tasks} "
                  f"tasks; up to {args.timeout:.0f} s) ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--child", "--steps", str(steps), "--backend",
                       backend, "--workload", args.workload, "--tasks", str(args.tasks),
                       "--rounds", str(args.rounds), "--threads", str(args.threads)]
            # One compile worker: the machine is shared (inductor forks a pool otherwise).
            env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            start = time.perf_counter()
            try:
                completed = subprocess.run(command, capture_output=True, text=True, env=env,
                                           timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                rows.append({"steps": steps, "backend": backend,
                             "error": f"did not finish in {args.timeout:.0f} s"})
                print(f"  {rows[-1]['error']}", file=sys.stderr, flush=True)
                continue
            if completed.returncode != 0:
                lines = completed.stderr.strip().splitlines()
                rows.append({"steps": steps, "backend": backend,
                             "error": f"failed: {lines[-1] if lines else completed.returncode}"})
            else:
                rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"\ncompile_meta_step: workload={args.workload} tasks={args.tasks} "
          f"threads={args.threads} rounds={args.rounds} (MAML, vectorize=True, second order, "
          f"float64, CPU)\n")
    print("| inner steps | backend | compile s | eager s | compiled s | compiled / eager | "
          "max grad difference |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['steps']} | {r['backend']} | {r['error']} | | | | |")
            continue
        print(f"| {r['steps']} | {r['backend']} | {r['compile_s']:.1f} | {r['eager_s']:.4f} | "
              f"{r['compiled_s']:.4f} | {r['compiled_s'] / r['eager_s']:.2f} | "
              f"{r['difference']:.1e} |")


if __name__ == "__main__":
    main()
