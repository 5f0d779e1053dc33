"""The Omniglot experiment's training loop and what it checkpoints.

``meta_train`` runs meta-steps over a protocol's meta-batches (``ExperimentLike``), writes the
training logs, validates, and checkpoints ``RunState`` with the learner through the run folder
(``metazoo.runs.RunFolder``: atomic, checksummed, with the flags and the producer inside).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from flags import run_flags
from metazoo import MetaLearner, MetaStepResult, NonFiniteError, Task, distributed
from metazoo.runs import RunFolder
from progress import estimate_lines, format_duration

# -- logs -------------------------------------------------------------------------------------

def auc(values: Sequence[float]) -> float:
    """The reference's area under a curve (composite trapezoidal rule over ``len`` points)."""
    n = len(values)
    return sum(((values[i] - values[i - 1]) / 2 + values[i - 1]) / n for i in range(1, n))


def write_line(logs: RunFolder, name: str, step: int, meta_loss: float, loss: float, acc: float,
               losses: Sequence[float], accs: Sequence[float]) -> None:
    """Appends one line in the reference's format to the run's log ``name``."""
    curve = "".join(f"{v:f};" for v in losses)
    acc_curve = "".join(f"{v:f};" for v in accs)
    logs.append_text(name, f"{step:d},{meta_loss:f},{loss:f},{acc:f},{curve},{acc_curve}\n")


# -- state ------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a checkpoint holds besides the learner."""

    step: int
    data_generator: torch.Generator
    task_rng: random.Random
    best_acc: float = -math.inf
    best_step: int = -1

    def rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                          "cached": float(np_state[4])},
                "python": list(random.getstate()[1]),
                "data": self.data_generator.get_state(),
                "tasks": list(self.task_rng.getstate()[1])}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))
        random.setstate((3, tuple(state["python"]), None))
        self.data_generator.set_state(state["data"])
        self.task_rng.setstate((3, tuple(state["tasks"]), None))


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names (``a.b.0``) of the floating tensors in a nested state dict that hold NaN/inf."""
    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return [] if finite else [prefix or "tensor"]
    if isinstance(state, dict):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items
            for name in nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))]



def checkpoint_state(learner: MetaLearner, run: RunState) -> dict[str, Any]:
    """What a checkpoint holds: the learner (model, meta-optimizer and any extra state), the
    RNG states, the step and the best validation so far.

    Raises:
        RuntimeError: if the learner's state is not finite (a checkpoint is only ever a state
            that can be resumed).
    """
    state = {"learner": learner.state_dict(), "step": run.step, "rng": run.rng_state(),
             "best_acc": run.best_acc, "best_step": run.best_step}
    bad = nonfinite_entries(state["learner"])
    if bad:
        raise RuntimeError(f"the learner's state at meta-step {run.step} is not finite in "
                           f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the checkpoint was not "
                           "written. Lower --outer_kwargs lr / --inner_kwargs lr")
    return state


def save_checkpoint(folder: RunFolder, name: str, learner: MetaLearner, run: RunState,
                    flags: dict[str, Any]) -> None:
    """``checkpoint_state`` into the run folder's ``name`` (with ``flags`` and the producer)."""
    folder.save_checkpoint(name, checkpoint_state(learner, run), flags)


def restore(state: dict[str, Any], learner: MetaLearner, run: RunState | None = None,
            source: object = "the checkpoint", meta_model: str = "?") -> int:
    """Loads a checked checkpoint's state into the learner (and ``run``); returns its step.

    Raises:
        ValueError: for non-finite weights, or a state that does not fit the learner.
    """
    fix = ("nothing was changed. Resume with the run's flags, or start again with --overwrite "
           "or another --suffix")
    bad = nonfinite_entries(state.get("learner"))
    if bad:
        raise ValueError(f"{source} holds non-finite weights ({', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}) and cannot be used; {fix}")
    try:
        learner.load_state_dict(state["learner"])
    except (KeyError, RuntimeError) as err:  # torch's missing keys / size mismatch
        raise ValueError(f"{source} does not fit the learner built from these flags "
                         f"(--meta_model {meta_model}; {str(err).splitlines()[0]}); {fix}"
                         ) from None
    if run is not None:
        run.set_rng_state(state["rng"])
        run.step = state["step"]
        run.best_acc, run.best_step = state["best_acc"], state["best_step"]
    return int(state["step"])


class ExperimentLike(Protocol):
    """What ``meta_train`` and ``_run`` need from a protocol (``Experiment``: alphabets as
    tasks; ``FewShotExperiment``: episodes)."""

    args: argparse.Namespace

    @property
    def has_validation(self) -> bool: ...

    def meta_batch(self, learner: MetaLearner, run: RunState) -> list[Task]: ...

    def evaluate(self, learner: MetaLearner, case: str, step: int, logs: RunFolder | None,
                 printer: Callable[[str], None]) -> float: ...


def anneal_meta_lr(learner: MetaLearner, step: int, total: int) -> None:
    """``--outer_lr_schedule linear``: sets every meta-optimizer group's learning rate to
    ``initial_lr * (1 - step / total)`` before meta-step ``step`` (0-based), as the Reptile
    authors' ``train.py`` interpolates ``--meta-step`` to ``--meta-step-final 0``. The initial
    rate is kept in the group (``"initial_lr"``, as torch's schedulers do), so it is in the
    checkpoint and a resumed run continues the same schedule."""
    optimizer = getattr(learner, "meta_optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"--outer_lr_schedule linear needs a learner with one meta-optimizer; "
                         f"{type(learner).__name__} has none; drop the flag")
    for group in optimizer.param_groups:
        initial = group.setdefault("initial_lr", group["lr"])
        group["lr"] = initial * (1 - step / total)


def meta_train(learner: MetaLearner, exp: ExperimentLike, run: RunState,
               logs: RunFolder | None, printer: Callable[[str], None]) -> None:
    """The meta-training loop: one meta-step per iteration, logs, validation, checkpoints
    (into ``logs``, the run folder; ``None`` on the processes that do not write).

    Under torchrun every process draws the same meta-batch from the seed (so a run equals the
    single-process one) and adapts its shard of it; the meta-gradients are averaged over all
    tasks by one all-reduce, and only the main process validates, logs and checkpoints.
    """
    args = exp.args
    main_process = distributed.is_main_process()
    start, first = time.perf_counter(), run.step
    while run.step < args.meta_train_steps:
        if args.outer_lr_schedule == "linear":
            anneal_meta_lr(learner, run.step, args.meta_train_steps)
        tasks = exp.meta_batch(learner, run)  # the protocol's tasks (the same on every rank)
        try:
            result: MetaStepResult = distributed.meta_step(learner, distributed.shard(tasks))
        except NonFiniteError as err:  # the meta-parameters were not updated
            raise err.with_meta_step(run.step + 1) from None
        run.step += 1
        if result.skipped_tasks < result.num_tasks and not math.isfinite(result.meta_loss):
            raise RuntimeError(f"meta_loss is {result.meta_loss} at step {run.step}; lower "
                               "--outer_kwargs lr or --inner_kwargs lr")
        if not main_process or logs is None:
            continue
        if result.skipped_tasks:
            logs.append_text("nonfinite.log",
                             f"{run.step:d},{result.skipped_tasks:d},{result.num_tasks:d}\n")
            printer(f"[step {run.step}] skipped {result.skipped_tasks} of {result.num_tasks} "
                    "tasks with a non-finite loss (--on_nonfinite skip)")
        if args.write_ival and run.step % args.write_ival == 0:
            curve = result.inner_losses
            acc = float("nan") if result.accuracy is None else result.accuracy
            write_line(logs, "results_train_train.log", run.step, auc(curve),
                       sum(curve) / max(len(curve), 1), float("nan"), curve, [])
            write_line(logs, "results_train_val.log", run.step, result.meta_loss,
                       result.meta_loss, acc, [result.meta_loss], [acc])
        if args.test_ival and run.step % args.test_ival == 0 and exp.has_validation:
            acc = exp.evaluate(learner, "val", run.step, logs, printer)
            if acc > run.best_acc:
                run.best_acc, run.best_step = acc, run.step
                if args.select == "best":
                    save_checkpoint(logs, "best.pt", learner, run, run_flags(args))
        if args.save_ival and (run.step % args.save_ival == 0
                               or run.step == args.meta_train_steps):
            save_checkpoint(logs, "checkpoint.pt", learner, run, run_flags(args))
        rate = (time.perf_counter() - start) / (run.step - first)
        if run.step == first + 1 < args.meta_train_steps:  # warn before hours are spent
            param = next(learner.meta_parameters(), None)
            estimate, *warning = estimate_lines(rate, args.meta_train_steps - first,
                                                param is None or param.device.type == "cpu")
            printer(estimate)
            for line in warning:  # shown even with --log_ival 0
                print(line, file=sys.stderr, flush=True)
        if args.log_ival and run.step % args.log_ival == 0:
            eta = rate * (args.meta_train_steps - run.step)
            acc_text = "nan" if result.accuracy is None else f"{result.accuracy:.3f}"
            printer(f"[step {run.step}/{args.meta_train_steps}] meta_loss "
                    f"{result.meta_loss:.4f} inner {result.inner_loss:.4f} acc {acc_text} | "
                    f"{rate:.2f} s/step, eta {format_duration(eta)}")

