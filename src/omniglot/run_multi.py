"""Sweep: methods x numbers of meta-training alphabets x seeds, in parallel processes.

Each run is ``main.py --meta_model M --num_pretrain N --seed S --suffix n<N>_s<S>`` plus the
shared flags given after ``--``; its stdout/stderr go to ``<log_dir>/<M>/<suffix>.out``. Runs
whose ``done.json`` exists are skipped; unfinished ones are resumed (``--resume``). The sweep
ends with a table of mean held-out test accuracy per method and number of alphabets.

Example::

    python src/omniglot/run_multi.py --methods leap,reptile,no --num_pretrain 4 --seeds 1,2 \\
        --parallel 2 --log_dir logs -- --root data --num_test 2 --meta_train_steps 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAIN = Path(__file__).resolve().with_name("main.py")


@dataclass(frozen=True)
class Run:
    """One configuration of the sweep."""

    method: str
    num_pretrain: int
    seed: int

    @property
    def suffix(self) -> str:
        return f"n{self.num_pretrain}_s{self.seed}"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Sweep flags, and the flags passed through to every ``main.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser("Omniglot sweep")
    p.add_argument("--methods", default="warp_leap,leap,reptile,fomaml,maml,ft,no")
    p.add_argument("--num_pretrain", type=_ints, default=[25])
    p.add_argument("--seeds", type=_ints, default=[1])
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    p.add_argument("--log_dir", default="logs")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel {args.parallel} must be >= 1")
    for flag in ("--meta_model", "--num_pretrain", "--seed", "--suffix", "--log_dir"):
        if flag in extra:
            p.error(f"{flag} is set by the sweep; remove it after --")
    return args, extra


def run_one(run: Run, log_dir: Path, extra: Sequence[str]) -> tuple[Run, float, str]:
    """Runs (or resumes) one configuration; returns its test accuracy (nan on failure)."""
    folder = log_dir / run.method / run.suffix
    done = folder / "done.json"
    if done.exists():
        return run, json.loads(done.read_text())["test_acc"], "skipped (done)"
    cmd = [sys.executable, str(MAIN), "--meta_model", run.method, "--num_pretrain",
           str(run.num_pretrain), "--seed", str(run.seed), "--suffix", run.suffix,
           "--log_dir", str(log_dir), "--resume", *extra]
    (log_dir / run.method).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_dir / run.method / f"{run.suffix}.out", "a") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0 or not done.exists():
        return run, float("nan"), f"failed (exit {code}, see {run.suffix}.out)"
    return run, json.loads(done.read_text())["test_acc"], f"{seconds:.0f} s"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the sweep and prints the summary table; returns 1 if a run failed."""
    args, extra = parse_args(argv)
    log_dir = Path(args.log_dir)
    runs = [Run(m, n, s) for m in args.methods.split(",") if m for n in args.num_pretrain
            for s in args.seeds]
    results = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for run, acc, status in pool.map(lambda r: run_one(r, log_dir, extra), runs):
            print(f"{run.method:>10} n={run.num_pretrain} seed={run.seed}: test acc {acc:.4f} "
                  f"[{status}]", flush=True)
            results.append((run, acc))
    print(f"\n{'method':>10} {'alphabets':>9} {'test acc':>9} {'std':>7} {'seeds':>5}")
    for method in dict.fromkeys(r.method for r, _ in results):
        for n in args.num_pretrain:
            accs = [a for r, a in results if r.method == method and r.num_pretrain == n]
            print(f"{method:>10} {n:9d} {np.mean(accs):9.4f} {np.std(accs):7.4f} {len(accs):5d}")
    return int(any(np.isnan(a) for _, a in results))


if __name__ == "__main__":
    sys.exit(main())
