"""Omniglot meta-learning experiment (Leap, ICLR 2019; WarpGrad, ICLR 2020 protocol).

Each alphabet is a task: ``--classes``-way classification of that many of its characters, 15
drawings per character for adaptation (augmented) and 5 held out. Every method is built by
``wrapper.build_learner`` and driven through the ``metazoo.MetaLearner`` interface.

This file wires the experiment; each part lives in a module named for it: ``flags.py`` (the
command line), ``protocols.py`` (the alphabet and few-shot protocols), ``meta_training.py``
(the training loop and its checkpoints). The run folder ``<log_dir>/<meta_model>/<suffix>/`` is
owned by ``metazoo.runs.RunFolder`` (lock, manifest, atomic writes; ``docs/runs.md``).

Logs (the reference's files and format) go to the run folder: ``results_train_train.log`` and
``results_train_val.log`` (meta-training tasks: adaptation curve and held-out drawings),
``results_<i>_<val|test>_<train|val>.log`` (each evaluation task i), one line per write:
``step,meta_loss,loss,acc,loss curve;...;,acc curve;...;``. Beside them: ``args.log``,
``split.json``, ``machine.json`` (the machine kind each start and resume ran on: CPU runs
repeat bit for bit only on the same kind), ``checkpoint.pt`` (``--resume``), ``best.pt``
(``--select best``), ``done.json`` (final test summary), ``run.lock`` and ``manifest.json``.

Example (the paper's protocol needs the full archives; see README.md for the CPU preset)::

    python src/omniglot/main.py --meta_model leap --root data --suffix s1 --seed 1

``--protocol fewshot`` (``FewShotExperiment``) is the episodic N-way K-shot protocol of the MAML
paper instead: meta-training episodes from the characters of the meta-training alphabets (or
``--dataset folder``: ``--root/train``), a fixed seeded set of test episodes reported as mean
accuracy +- 95% CI (``results_fewshot_<case>_ci.log``, ``fewshot_test.json``). Both protocols give
``meta_train`` the same small interface (``ExperimentLike``), so the loop, checkpoints,
``--resume`` and torchrun are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict

import numpy as np
import torch

from flags import (  # noqa: F401  (re-exported: the command's flags, for its callers)
    BN_EVAL,
    METHOD_PRESETS,
    METHODS,
    PRESETS,
    PROTOCOLS,
    RESUME_MAY_CHANGE,
    build_kwargs,
    check_kwargs,
    convert_arg,
    flag_differences,
    in_channels,
    learner_config,
    learner_method,
    make_parser,
    parse_args,
    read_args_log,
    run_flags,
)
from meta_training import (  # noqa: F401
    ExperimentLike,
    RunState,
    auc,
    checkpoint_state,
    meta_train,
    nonfinite_entries,
    restore,
    save_checkpoint,
    write_line,
)
from metazoo import MetaLearner, NonFiniteError, Task, distributed, fp32_precision  # noqa: F401
from metazoo.cli import UsageError, run_command, user_input
from metazoo.runs import RunFolder, path_inside
from protocols import (  # noqa: F401
    Experiment,
    FewShotExperiment,
    FewShotResult,
    evaluate,
    make_experiment,
)
from wrapper import build_learner

PROGRAM = "omniglot"
# The run's logs (trimmed to the checkpoint on --resume) and, among them, the test logs
# (replaced by the next final test). Matched only against the files the manifest says the run
# wrote: a user's results_notes.log is never read, trimmed or removed.
LOG = re.compile(r"^(results_.*|nonfinite)\.log$")
TEST_LOG = re.compile(r"^results_.*_test_.*\.log$")
# What a finished run's results are: a run with one of them is never restarted from scratch.
RESULTS = ("done.json", "fewshot_test.json")
FIX = ("nothing was changed. Resume with the run's flags, or start again with --overwrite or "
       "another --suffix")


def main(argv: Sequence[str] | None = None) -> float | FewShotResult:
    """Runs the experiment; returns the mean held-out test accuracy (alphabet protocol) or the
    ``FewShotResult`` of the test episodes (``--protocol fewshot``; ``nan`` on ranks > 0).

    Launched by ``torchrun --nproc_per_node N``, the processes share each meta-step (gloo on
    CPU, NCCL on CUDA with one GPU per local rank); a plain ``python`` run needs no setup.
    """
    with user_input():
        args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    device = torch.device(f"cuda:{args.device}" if use_cuda else "cpu")
    context = distributed.setup(device=None if use_cuda else "cpu")
    if context.world_size > 1:
        device = context.device
    try:
        if context.world_size > 1 and args.reptile_inner_state == "carry":
            # Each process would carry its own state on its own tasks; rank 0 saves only its own.
            raise UsageError(f"--reptile_inner_state carry runs a meta-batch's tasks one after "
                             f"another in one process, not across {context.world_size} "
                             f"processes; run it without torchrun, or use reset")
        with fp32_precision(args.precision):
            result = _run(args, device, distributed.is_main_process())
        # The other ranks wait for rank 0's final evaluation: a rank that tears its process
        # group down while a peer still holds connections aborts in gloo.
        distributed.barrier()
        return result
    finally:
        distributed.teardown()


def run_folder(args: argparse.Namespace) -> RunFolder:
    """The run folder ``<log_dir>/<meta_model>/<suffix>`` (not yet opened); a ``--suffix`` that
    leads out of ``--log_dir`` is refused."""
    path = path_inside(args.log_dir, args.meta_model, args.suffix,
                       flags=("--meta_model", "--suffix"))
    return RunFolder(path, program=PROGRAM, resume_hint="run the same command with --resume")


def load_checked(folder: RunFolder, name: str, args: argparse.Namespace) -> dict:
    """The checkpoint ``name``, checked against these flags (nothing is touched)."""
    return folder.load_checkpoint(name, run_flags(args), may_change=RESUME_MAY_CHANGE,
                                  trust_unrecorded=args.trust_checkpoint, fix=FIX)


def check_run_folder(folder: RunFolder, args: argparse.Namespace, split_json: str | None
                     ) -> None:
    """Refuses a run folder whose ``args.log`` (or ``split.json``) says it was another
    experiment than these flags give, naming the differences. Touches nothing."""
    if folder.exists("args.log"):
        differences = flag_differences(read_args_log(folder.file("args.log")), args)
        if differences:
            raise UsageError(f"{folder.path} is a run with other flags than these "
                             f"({'; '.join(differences)}; see its args.log); nothing was "
                             "changed. Pass the run's flags (only "
                             f"{', '.join('--' + f for f in sorted(RESUME_MAY_CHANGE))} may "
                             "change), or start a new run with another --suffix")
    if split_json is not None and folder.exists("split.json") and \
            folder.file("split.json").read_text().strip() != split_json.strip():
        raise UsageError(f"the alphabets under --root {args.root} give another split than "
                         f"{folder.file('split.json')} records; nothing was changed. Point "
                         "--root at the run's data")


def _test(exp: Experiment | FewShotExperiment, learner: MetaLearner, step: int,
          folder: RunFolder, printer: Callable[[str], None]) -> float | FewShotResult:
    """The final test; the few-shot result also goes to ``fewshot_test.json``."""
    acc = exp.evaluate(learner, "test", step, folder, printer)
    if not isinstance(exp, FewShotExperiment):
        return acc
    result = exp.results["test"]
    args = exp.args
    record = {"meta_model": args.meta_model, "seed": args.seed, "dataset": args.dataset,
              "rotations": args.rotations, "downsample": args.downsample,
              "train_shots": args.train_shots or args.shots,
              "train_queries": args.train_queries or args.queries, **asdict(result)}
    folder.write_text("fewshot_test.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    return result


def _evaluate_only(folder: RunFolder, args: argparse.Namespace,
                   exp: Experiment | FewShotExperiment, learner: MetaLearner,
                   printer: Callable[[str], None]) -> float | FewShotResult:
    """``--evaluate``: the saved model, tested again; its test logs are replaced."""
    name = "best.pt" if args.select == "best" else "checkpoint.pt"
    source = folder.file(name)
    if not (source.exists() or source.is_symlink()):
        raise UsageError(f"--evaluate needs a saved model at {source}; train first")
    state = load_checked(folder, name, args)
    check_run_folder(folder, args, None)
    with user_input():
        step = restore(state, learner, source=source, meta_model=args.meta_model)
    folder.remove(*(n for n in folder.files if TEST_LOG.match(n)))  # training logs are kept
    return _test(exp, learner, step, folder, printer)


def _resume(folder: RunFolder, args: argparse.Namespace, exp: Experiment | FewShotExperiment,
            learner: MetaLearner, run: RunState) -> None:
    """Continues a run from its checkpoint. Everything is checked first (checkpoint: checksum,
    producer, flags, finite weights, fit; args.log; split.json; every line of every log), and
    only then are the test logs and results removed and the logs trimmed to the checkpoint."""
    if not folder.owns("checkpoint.pt"):
        raise UsageError(f"{folder.file('checkpoint.pt')} is not recorded in "
                         f"{folder.manifest_path} (an older version's run folder, or a copied "
                         "file); nothing was changed. Start a new run with another --suffix")
    state = load_checked(folder, "checkpoint.pt", args)
    check_run_folder(folder, args, exp.split.to_json())
    with user_input():
        restore(state, learner, run, source=folder.file("checkpoint.pt"),
                meta_model=args.meta_model)
    logs = [n for n in folder.files if LOG.match(n) and not TEST_LOG.match(n)]
    plan = folder.plan_rewrite(logs, lambda line: int(line.split(",", 1)[0]) <= run.step,
                               fix=FIX)
    # Validated: now the folder changes.
    folder.discard_temporaries()
    folder.remove(*(n for n in folder.files if TEST_LOG.match(n) or n in RESULTS))
    folder.rewrite(plan)


def _start(folder: RunFolder, args: argparse.Namespace) -> None:
    """Makes the folder ready for a fresh run: refuses to replace a run without --overwrite
    (or, for a run that stopped before its first checkpoint, --resume), then removes the
    run's own files; the user's files stay."""
    path = folder.path
    if folder.files:
        if args.resume and not args.overwrite:
            if any(folder.exists(name) for name in RESULTS):
                raise UsageError(f"--resume: {path} has no checkpoint.pt to continue from (a "
                                 "run with --save_ival 0); nothing was changed. Pass "
                                 "--overwrite to start that run again (it replaces the run's "
                                 "files), or another --suffix")
            # It stopped before its first checkpoint: nothing of value is lost by starting it
            # again, if it is the same experiment.
            check_run_folder(folder, args, None)
        elif not args.overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it, --resume to "
                             "continue it, or another --suffix")
        folder.clear()
        return
    foreign = [n for n in folder.foreign() if not re.match(r"^\.manifest\.json\..+\.tmp$", n)]
    if foreign:
        raise UsageError(f"{path} holds files that no run of this version wrote "
                         f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                         "they are left alone. Choose another --suffix or move them away")


def _run(args: argparse.Namespace, device: torch.device, main_process: bool
         ) -> float | FewShotResult:
    folder = run_folder(args)

    def printer(msg: str) -> None:
        if args.log_ival and main_process:
            print(msg, flush=True)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    # Set-up depends on the flags alone: a ValueError here is bad input, later it is a bug.
    with user_input():
        # The data stays out of the default-device block: its index bookkeeping (episode
        # offsets and counts) lives on the CPU, where the sampling generators draw.
        exp = make_experiment(args, device)
        with device:  # every parameter (warp copies included) is made on the device
            learner = build_learner(learner_config(args))
    with ExitStack() as stack:
        if main_process:  # the lock is held until the run ends (or its process dies)
            stack.enter_context(folder)
        if args.evaluate:  # the main process evaluates; under torchrun the others wait
            return (_evaluate_only(folder, args, exp, learner, printer) if main_process
                    else float("nan"))
        run = RunState(0, torch.Generator().manual_seed(args.seed), random.Random(args.seed))
        checkpoint = folder.file("checkpoint.pt")
        if args.resume and (checkpoint.exists() or checkpoint.is_symlink()):
            if main_process:
                _resume(folder, args, exp, learner, run)
            else:  # the other ranks read the same checkpoint (checked the same way)
                restore(load_checked(folder, "checkpoint.pt", args), learner, run)
            printer(f"resumed {folder.path} at step {run.step}")
            if main_process:
                note = folder.record_machine(f"resume at step {run.step}")
                if note:
                    printer(note)
        elif main_process:
            _start(folder, args)
            folder.write_text("args.log", repr(args) + "\n")
            folder.write_text("split.json", exp.split.to_json() + "\n")
            folder.record_machine("start")
            printer(f"split: train {list(exp.split.train)} val {list(exp.split.val)} test "
                    f"{list(exp.split.test)}")
            for note in getattr(exp, "notes", ()):
                printer(note)
            if args.test_ival and exp.has_validation:
                acc = exp.evaluate(learner, "val", 0, folder, printer)
                run.best_acc, run.best_step = acc, 0
                if args.select == "best":
                    save_checkpoint(folder, "best.pt", learner, run, run_flags(args))
            if args.save_ival:
                save_checkpoint(folder, "checkpoint.pt", learner, run, run_flags(args))
        if getattr(learner, "meta_learns", True):
            distributed.broadcast_learner(learner)
            meta_train(learner, exp, run, folder if main_process else None, printer)
        else:
            printer(f"{args.meta_model}: no meta-training")
        if not main_process:
            return float("nan")
        if args.select == "best" and folder.exists("best.pt"):
            restore(load_checked(folder, "best.pt", args), learner)
            printer(f"testing the best model on validation (step {run.best_step})")
        bad = nonfinite_entries(learner.state_dict())
        if bad:  # never a test accuracy of NaN weights in done.json
            raise RuntimeError(f"the learner's state after meta-step {run.step} is not finite "
                               f"in {bad[:5]}; not tested. Lower --outer_kwargs lr / "
                               "--inner_kwargs lr")
        result = _test(exp, learner, run.step, folder, printer)
        acc = result.accuracy.mean if isinstance(result, FewShotResult) else result
        summary = {"meta_model": args.meta_model, "seed": args.seed, "step": run.step,
                   "test_acc": acc, "best_step": run.best_step}
        folder.write_text("done.json", json.dumps(summary, sort_keys=True) + "\n")
        return result


if __name__ == "__main__":
    run_command(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's worker threads can still hold tensors while the interpreter
        # finalises, which aborts a process that finished cleanly ("terminate called without
        # an active exception", pytorch/pytorch#190489). Logs and checkpoints are written and
        # the process group is destroyed by now, so leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
