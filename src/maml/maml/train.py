"""A task-agnostic meta-training loop for any ``metazoo.MetaLearner``.

The loop draws one meta-batch of tasks per meta-step from an iterable, calls ``meta_step``,
optionally evaluates on fixed held-out tasks, and returns a typed history. It never prints:
pass ``on_step`` to log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from metazoo import EvalResult, MetaLearner, MetaStepResult, Task

__all__ = ["Evaluation", "TrainHistory", "meta_train"]


@dataclass(frozen=True)
class Evaluation:
    """An evaluation during training.

    Attributes:
        meta_step: meta-steps completed when it was taken.
        result: the learner's ``evaluate`` result on the held-out tasks.
    """

    meta_step: int
    result: EvalResult


@dataclass(frozen=True)
class TrainHistory:
    """What ``meta_train`` recorded.

    Attributes:
        meta_losses: meta-loss (query loss after adaptation) of each meta-step.
        steps: the full ``MetaStepResult`` of each meta-step.
        evaluations: evaluations on the held-out tasks, in order.
        seconds: wall-clock time of the whole run.
    """

    meta_losses: tuple[float, ...]
    steps: tuple[MetaStepResult, ...]
    evaluations: tuple[Evaluation, ...]
    seconds: float


def meta_train(
    learner: MetaLearner,
    task_batches: Iterable[Sequence[Task]],
    *,
    meta_steps: int,
    eval_tasks: Sequence[Task] | None = None,
    eval_every: int = 0,
    on_step: Callable[[int, MetaStepResult], None] | None = None,
    on_eval: Callable[[Evaluation], None] | None = None,
) -> TrainHistory:
    """Runs ``meta_steps`` meta-steps of ``learner``, one meta-batch from ``task_batches`` each.

    Args:
        learner: any ``MetaLearner``.
        task_batches: yields meta-batches (sequences of ``Task``); an infinite generator or any
            iterable with at least ``meta_steps`` items.
        meta_steps: number of meta-steps (>= 1).
        eval_tasks: held-out tasks evaluated every ``eval_every`` meta-steps and at the end.
        eval_every: evaluation period in meta-steps; 0 evaluates only at the end.
        on_step: called with ``(meta_step_index, result)`` after each meta-step (logging).
        on_eval: called with each ``Evaluation``.

    Returns:
        A ``TrainHistory``.
    """
    if not isinstance(learner, MetaLearner):
        raise ValueError(f"learner must be a metazoo.MetaLearner, got {type(learner).__name__}")
    if isinstance(meta_steps, bool) or not isinstance(meta_steps, int) or meta_steps < 1:
        raise ValueError(f"meta_steps must be an int >= 1, got {meta_steps!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every must be an int >= 0 (0: only at the end), got "
                         f"{eval_every!r}")
    if eval_every and not eval_tasks:
        raise ValueError("eval_every > 0 needs eval_tasks to evaluate on")
    start = time.perf_counter()
    batches = iter(task_batches)
    results: list[MetaStepResult] = []
    evaluations: list[Evaluation] = []

    def evaluate(step: int) -> None:
        assert eval_tasks is not None
        evaluation = Evaluation(step, learner.evaluate(eval_tasks))
        evaluations.append(evaluation)
        if on_eval is not None:
            on_eval(evaluation)

    for step in range(meta_steps):
        try:
            tasks = next(batches)
        except StopIteration:
            raise ValueError(f"task_batches ran out after {step} meta-batches but meta_steps="
                             f"{meta_steps}; give an infinite generator or more batches") from None
        result = learner.meta_step(tasks)
        results.append(result)
        if on_step is not None:
            on_step(step, result)
        if eval_tasks and eval_every and (step + 1) % eval_every == 0 and step + 1 < meta_steps:
            evaluate(step + 1)
    if eval_tasks:
        evaluate(meta_steps)
    return TrainHistory(tuple(r.meta_loss for r in results), tuple(results), tuple(evaluations),
                        time.perf_counter() - start)
