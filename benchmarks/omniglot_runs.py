"""Every --meta_model of ``src/omniglot/main.py`` for a few meta-steps, in one process.

Runs ``main.main`` in process (one interpreter, so torch and the data load once) for every
method of both protocols on the extracted Omniglot archives under ``--root``, catches each
run's exception (printed with its traceback) and prints one line per run and a summary; exits
with status 1 if any run failed. With ``--preset-timing`` it also measures seconds per meta-step
of the ``--preset`` configurations (``gpu_short``, ``paper``) for ``--timing-methods``: the
difference of the wall times of a 2-meta-step and a 1-meta-step run (same data loading and
evaluation in both, so they cancel).

Usage (from the repository root, after ``bash make_omniglot.sh -d --source DIR``)::

    python benchmarks/omniglot_runs.py --root data                     # CUDA if available
    python benchmarks/omniglot_runs.py --root data --no_cuda --methods maml,warp_leap
    python benchmarks/omniglot_runs.py --root data --preset-timing --timing-methods warp_leap
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src" / "omniglot"))

import main  # noqa: E402
from wrapper import METHODS  # noqa: E402

# The small-background archives: 7 alphabets have 20 characters (4 meta-train, 1 validate, 2
# test); few-shot episodes use 5 of the 8 alphabets to meta-train. 2 meta-steps each.
ALPHABET = ["--num_pretrain", "4", "--num_val", "1", "--num_test", "2", "--classes", "20",
            "--meta_batch_size", "2", "--task_batch_size", "20", "--meta_train_steps", "2",
            "--task_train_steps", "5", "--task_val_steps", "5", "--test_ival", "1",
            "--log_ival", "0"]
FEWSHOT = ["--protocol", "fewshot", "--num_pretrain", "5", "--num_val", "1", "--num_test", "2",
           "--ways", "5", "--shots", "1", "--queries", "5", "--meta_batch_size", "2",
           "--meta_train_steps", "2", "--task_train_steps", "5", "--task_val_steps", "5",
           "--test_episodes", "20", "--val_episodes", "10", "--test_ival", "1", "--log_ival", "0"]


def run(argv: list[str]) -> tuple[bool, float, str]:
    """(ok, seconds, output or traceback) of one in-process ``main.main`` run."""
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            main.main(argv)
        return True, time.perf_counter() - start, out.getvalue()
    except Exception:
        return False, time.perf_counter() - start, out.getvalue() + traceback.format_exc()


def main_runs(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data", help="main.py --root: the extracted archives")
    p.add_argument("--no_cuda", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--protocols", default="alphabet,fewshot")
    p.add_argument("--precision", default="exact", choices=("exact", "tf32"))
    p.add_argument("--extra", default="", help="more main.py flags, space-separated")
    p.add_argument("--preset-timing", action="store_true")
    p.add_argument("--presets", default="gpu_short")
    p.add_argument("--timing-methods", default="warp_leap,maml")
    args = p.parse_args(argv)
    common = ["--root", args.root, "--precision", args.precision, "--overwrite",
              *(["--no_cuda"] if args.no_cuda else []), *args.extra.split()]
    failures = 0
    with tempfile.TemporaryDirectory() as logs:
        for protocol in args.protocols.split(","):
            flags = ALPHABET if protocol == "alphabet" else FEWSHOT
            for method in args.methods.split(","):
                if protocol == "fewshot" and method == "ft":
                    continue  # ft has no meaning without alphabet heads (main.py refuses it)
                ok, seconds, output = run([*flags, *common, "--meta_model", method,
                                           "--log_dir", logs, "--suffix", protocol])
                failures += not ok
                print(f"{protocol:8} {method:10} {'ok' if ok else 'FAILED':6} {seconds:7.1f} s",
                      flush=True)
                if not ok:
                    print(output, flush=True)
        if args.preset_timing:
            for preset in args.presets.split(","):
                for method in args.timing_methods.split(","):
                    base = ["--preset", preset, *common, "--meta_model", method, "--log_dir",
                            logs, "--suffix", f"timing_{preset}", "--num_pretrain", "5",
                            "--num_val", "0", "--num_test", "1", "--test_ival", "0",
                            "--log_ival", "0", "--save_ival", "0"]
                    results = [run([*base, "--meta_train_steps", str(n)]) for n in (1, 2)]
                    if not all(ok for ok, _, _ in results):
                        failures += 1
                        print(f"timing {preset} {method} FAILED\n" + "\n".join(
                            o for ok, _, o in results if not ok), flush=True)
                        continue
                    per_step = results[1][1] - results[0][1]
                    print(f"preset {preset:9} {method:10} {per_step:7.1f} s per meta-step "
                          f"(runs of 1 and 2 meta-steps: {results[0][1]:.1f} s, "
                          f"{results[1][1]:.1f} s)", flush=True)
    print(f"{failures} failed" if failures else "all runs ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main_runs())
