"""Sweep: methods x numbers of meta-training alphabets x seeds, in parallel processes.

Each run is ``main.py --meta_model M --num_pretrain N --seed S --suffix n<N>_s<S>`` plus the
shared flags given after ``--``; its stdout/stderr go to ``<log_dir>/<M>/<suffix>.out``. Runs
whose ``done.json`` exists are skipped if their ``args.log`` records the flags of this sweep
(otherwise the run is reported failed, with one ``error:`` line naming the flags that differ);
unfinished ones are resumed (``--resume``). While runs go, the console shows each run's
progress and ETA (read from its ``.out`` file), one ETA for the whole sweep, and each result as
soon as its run ends; the sweep ends with a table of mean held-out test accuracy per method and
number of alphabets.

Example::

    python src/omniglot/run_multi.py --methods leap,reptile,no --num_pretrain 4 --seeds 1,2 \\
        --parallel 2 --log_dir logs -- --root data --num_test 2 --meta_train_steps 50
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from metazoo.cli import ArgumentParser
from progress import StepProgress, format_duration, parse_step_line

MAIN = Path(__file__).resolve().with_name("main.py")
# main.py's flags that the sweep sets for each run
SWEEP_FLAGS = {"meta_model": "--meta_model", "num_pretrain": "--num_pretrain", "seed": "--seed",
               "suffix": "--suffix", "log_dir": "--log_dir"}
_UNSET = object()


@dataclass(frozen=True)
class Run:
    """One configuration of the sweep."""

    method: str
    num_pretrain: int
    seed: int

    @property
    def suffix(self) -> str:
        return f"n{self.num_pretrain}_s{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.method}/{self.suffix}"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from None


def make_parser() -> argparse.ArgumentParser:
    """The sweep's own flags (``main.py``'s flags go after ``--``)."""
    p = ArgumentParser(
        "run_multi.py", description="Omniglot sweep: methods x alphabets x seeds, in parallel "
        "processes; main.py flags shared by every run go after --.")
    p.add_argument("--methods", default="warp_leap,leap,reptile,fomaml,maml,ft,no",
                   help="comma-separated --meta_model values")
    p.add_argument("--num_pretrain", type=_ints, default=[25],
                   help="comma-separated numbers of meta-training alphabets")
    p.add_argument("--seeds", type=_ints, default=[1], help="comma-separated seeds")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    p.add_argument("--log_dir", default="logs",
                   help="runs go to <log_dir>/<method>/n<N>_s<seed>/, their output to "
                        "<log_dir>/<method>/n<N>_s<seed>.out")
    p.add_argument("--progress_every", type=float, default=30.0,
                   help="seconds between a run's progress lines on the console (0: its newest "
                        "progress line every half second)")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Sweep flags, and the flags passed through to every ``main.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = make_parser()
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel {args.parallel} must be >= 1")
    if args.progress_every < 0:
        p.error(f"--progress_every {args.progress_every} must be >= 0")
    args.methods = [m for m in args.methods.split(",") if m]
    for flag, values in (("--methods", args.methods), ("--num_pretrain", args.num_pretrain),
                         ("--seeds", args.seeds)):
        if not values:
            p.error(f"{flag} is empty; give at least one value")
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:  # two runs of one configuration would share (and break) one folder
            p.error(f"{flag} lists {', '.join(repeated)} more than once; give each value once")
    _check_main_flags(p, args.methods, extra)
    return args, extra


def _check_main_flags(p: argparse.ArgumentParser, methods: list[str], extra: list[str]) -> None:
    """Parses the flags after ``--`` with ``main.py``'s own parser, so a flag the sweep sets is
    caught in every spelling argparse accepts (``--log_dir X``, ``--log_dir=X``, ``--log_d X``),
    and a typo stops the sweep before any run starts."""
    from main import METHODS, make_parser  # torch and the experiment: only when parsing

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods {','.join(unknown)}: not a --meta_model of main.py; choose among "
                f"{', '.join(METHODS)}")
    parser = make_parser()
    parser.set_defaults(**dict.fromkeys(SWEEP_FLAGS, _UNSET))

    def fail(message: str) -> NoReturn:  # the sweep's usage line, not main.py's
        p.error(f"after --: {message}")

    parser.error = fail  # type: ignore[method-assign]
    parsed = parser.parse_args(extra)
    for dest, flag in SWEEP_FLAGS.items():
        if getattr(parsed, dest) is not _UNSET:
            p.error(f"{flag} is set by the sweep for each run; remove it after --")


@dataclass
class _Running:
    """A started run: its process, output file and what the console has shown of it."""

    run: Run
    process: subprocess.Popen
    out_path: Path
    start: float
    read_to: int = 0
    last_shown: float = field(default=float("-inf"))
    partial: str = ""
    latest: StepProgress | None = None  # its newest progress line
    shown: StepProgress | None = None  # the one the console shows


def _main_argv(run: Run, log_dir: Path, extra: Sequence[str]) -> list[str]:
    """``main.py``'s flags for ``run``."""
    return ["--meta_model", run.method, "--num_pretrain", str(run.num_pretrain), "--seed",
            str(run.seed), "--suffix", run.suffix, "--log_dir", str(log_dir), "--resume", *extra]


def finished_run_differences(run: Run, log_dir: Path, extra: Sequence[str]) -> str | None:
    """Why a finished run's results are not this sweep's (``None`` if they are): the flags in
    its ``args.log`` that differ from the ones the sweep would run it with, named as
    ``main.py`` names them."""
    from flags import RESUME_MAY_CHANGE, flag_differences, parse_args, read_args_log
    from metazoo.cli import UsageError

    folder = log_dir / run.method / run.suffix
    try:
        stored = read_args_log(folder / "args.log")
    except UsageError as err:
        return str(err)
    differences = flag_differences(stored, parse_args(_main_argv(run, log_dir, extra)))
    if not differences:
        return None
    return (f"{folder} is a finished run with other flags than these "
            f"({'; '.join(differences)}; see its args.log), so its results are not this "
            "sweep's. Pass the run's flags (only "
            f"{', '.join('--' + f for f in sorted(RESUME_MAY_CHANGE))} may change), or use "
            "another --log_dir")


def _start(run: Run, log_dir: Path, extra: Sequence[str]) -> _Running:
    cmd = [sys.executable, str(MAIN), *_main_argv(run, log_dir, extra)]
    (log_dir / run.method).mkdir(parents=True, exist_ok=True)
    out_path = log_dir / run.method / f"{run.suffix}.out"
    with open(out_path, "a") as out:  # appended: a resumed run keeps its earlier output
        read_to = out.tell()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return _Running(run, process, out_path, time.perf_counter(), read_to)


def _show_output(running: _Running, every: float, final: bool = False) -> None:
    """Prints the run's newest progress line (at most one per ``every`` seconds, and the last
    one when the run ends) and every estimate, warning or error line it wrote since the last
    call."""
    with open(running.out_path) as f:
        f.seek(running.read_to)
        text = running.partial + f.read()
        running.read_to = f.tell()
    lines = text.split("\n")
    running.partial = "" if final else lines.pop()  # a line still being written
    for line in lines:
        progress = parse_step_line(line)
        if progress is not None:
            running.latest = progress
        elif line.startswith(("estimated ", "warning:", "error:", "resumed ")):
            print(f"{running.run.name:>16}: {line}", flush=True)
    now = time.perf_counter()
    latest = running.latest
    if latest is not None and latest != running.shown and (
            final or now - running.last_shown >= every):
        running.last_shown, running.shown = now, latest
        print(f"{running.run.name:>16}: step {latest.step}/{latest.steps}, "
              f"{latest.seconds_per_step:.2f} s/step, eta {latest.eta}", flush=True)


def _result(run: Run, log_dir: Path, code: int, seconds: float) -> tuple[float, str]:
    done = log_dir / run.method / run.suffix / "done.json"
    if code != 0 or not done.exists():
        return float("nan"), f"failed (exit {code}, see {log_dir / run.method}/{run.suffix}.out)"
    return json.loads(done.read_text())["test_acc"], f"{format_duration(seconds)}"


def sweep_eta(active: Sequence[tuple[float, float | None]], finished: Sequence[float],
              pending: int, parallel: int) -> float:
    """Seconds until the whole sweep ends (``nan`` while nothing is known to estimate from).

    Args:
        active: per running run, (seconds it has run, seconds it still needs from its progress
            line, or ``None`` before its first one).
        finished: durations of the runs this sweep ran to the end.
        pending: runs not started yet.
        parallel: runs at a time.

    A run's length is estimated as the mean of the finished runs' durations and the running
    runs' projected lengths; each pending run takes the first free slot.
    """
    lengths = [*finished, *(ran + left for ran, left in active if left is not None)]
    if not lengths:
        return float("nan")
    typical = sum(lengths) / len(lengths)
    slots = [left if left is not None else max(typical - ran, 0.0) for ran, left in active]
    slots += [0.0] * max(parallel - len(slots), 0)
    heapq.heapify(slots)
    for _ in range(pending):
        heapq.heappush(slots, heapq.heappop(slots) + typical)
    return max(slots, default=0.0)


def sweep(runs: Sequence[Run], log_dir: Path, extra: Sequence[str], parallel: int,
          progress_every: float, poll: float = 0.5) -> dict[Run, float]:
    """Runs (or resumes) every configuration, ``parallel`` at a time; prints progress, the
    sweep's ETA and each result as its run ends. Returns each run's test accuracy (nan on
    failure, and for a finished run of other flags)."""
    results: dict[Run, float] = {}
    durations: list[float] = []
    last_eta = float("-inf")

    def report(run: Run, acc: float, status: str) -> None:
        results[run] = acc
        print(f"{run.name:>16}: test acc {acc:.4f} [{status}] ({len(results)}/{len(runs)} "
              "runs)", flush=True)

    pending, active = deque(runs), []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.popleft()
            done = log_dir / run.method / run.suffix / "done.json"
            if done.exists():
                problem = finished_run_differences(run, log_dir, extra)
                if problem is not None:
                    print(f"{run.name:>16}: error: {problem}", flush=True)
                    report(run, float("nan"), "failed (a finished run of other flags)")
                    continue
                report(run, json.loads(done.read_text())["test_acc"], "skipped (done)")
                continue
            running = _start(run, log_dir, extra)
            active.append(running)
            print(f"{run.name:>16}: started, output in {running.out_path}", flush=True)
        time.sleep(poll)
        for running in list(active):
            code = running.process.poll()
            _show_output(running, progress_every, final=code is not None)
            if code is not None:
                active.remove(running)
                seconds = time.perf_counter() - running.start
                acc, status = _result(running.run, log_dir, code, seconds)
                if not math.isnan(acc):
                    durations.append(seconds)
                report(running.run, acc, status)
        now = time.perf_counter()
        if active and now - last_eta >= max(progress_every, poll):
            eta = sweep_eta([(now - r.start, _left(r.latest)) for r in active], durations,
                            len(pending), parallel)
            if math.isfinite(eta):
                last_eta = now
                print(f"{'sweep':>16}: {len(results)}/{len(runs)} runs done, "
                      f"{len(active)} running, eta {format_duration(eta)}", flush=True)
    return results


def _left(progress: StepProgress | None) -> float | None:
    """Seconds a run still needs by its newest progress line (meta-training only)."""
    if progress is None:
        return None
    return (progress.steps - progress.step) * progress.seconds_per_step


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the sweep and prints the summary table; returns 1 if a run failed."""
    args, extra = parse_args(argv)
    log_dir = Path(args.log_dir)
    runs = [Run(m, n, s) for m in args.methods for n in args.num_pretrain for s in args.seeds]
    print(f"{len(runs)} runs, {args.parallel} at a time; each run's output in "
          f"{log_dir}/<method>/n<N>_s<seed>.out", flush=True)
    results = sweep(runs, log_dir, extra, args.parallel, args.progress_every)
    print(f"\n{'method':>10} {'alphabets':>9} {'test acc':>9} {'std':>7} {'seeds':>5}")
    for method in args.methods:
        for n in args.num_pretrain:
            accs = [a for r, a in results.items() if r.method == method and r.num_pretrain == n]
            std = f"{np.std(accs):7.4f}" if len(accs) > 1 else f"{'-':>7}"
            print(f"{method:>10} {n:9d} {np.mean(accs):9.4f} {std} {len(accs):5d}")
    return int(any(np.isnan(a) for a in results.values()))


if __name__ == "__main__":
    sys.exit(main())
