"""The Omniglot protocols of ``main.py`` as a ``metazoo.lightning.TaskDataModule``.

``OmniglotDataModule`` wraps ``main.make_experiment``'s protocol object (``Experiment``: each
alphabet a task; ``FewShotExperiment``: N-way K-shot episodes) and its own task samplers, so a
Lightning run meta-trains on exactly the meta-batches ``main.py`` draws, in the same order:
meta-batch ``i`` is the ``i``-th draw from ``RunState``'s generators seeded by ``--seed``.
Every process draws the whole meta-batch and keeps its share (``metazoo.distributed.shard``),
as ``main.py`` does under torchrun. Validation and test tasks are ``main.py``'s fixed ones.

The draws are sequential, so the generator states before the next meta-batch go into
Lightning's checkpoints (``state_dict``) and a resumed run draws what the killed one would have.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch

from main import Experiment, FewShotExperiment, RunState
from metazoo import MetaLearner, Task
from metazoo.lightning import TaskDataModule

__all__ = ["OmniglotDataModule"]


class OmniglotDataModule(TaskDataModule):
    """``main.py``'s meta-batches, validation and test tasks for ``MetaLearnerModule``.

    Args:
        experiment: ``main.make_experiment(args, device)``.
        learner: the learner (the alphabet protocol's multi-head ``ft`` labels its tasks by
            head).
        args: ``main.py``'s parsed flags (``--meta_batch_size``, ``--seed``,
            ``--task_train_steps``, ``--task_val_steps``, ...).
        eval_meta_batch_size: tasks per validation/test meta-batch (Lightning averages the
            batches weighted by their tasks, so this changes nothing but memory).
    """

    def __init__(self, experiment: Experiment | FewShotExperiment, learner: MetaLearner,
                 args: argparse.Namespace, *, eval_meta_batch_size: int = 20) -> None:
        self.experiment, self.learner, self.args = experiment, learner, args
        self._eval_size = eval_meta_batch_size
        counts = {case: self._count(case) for case in ("val", "test")}
        super().__init__(meta_batch_size=args.meta_batch_size, seed=args.seed,
                         val_meta_batches=-(-counts["val"] // eval_meta_batch_size),
                         test_meta_batches=-(-counts["test"] // eval_meta_batch_size),
                         eval_meta_batch_size=eval_meta_batch_size)
        self._run = RunState(0, torch.Generator().manual_seed(args.seed), random.Random(args.seed))
        self._next = 0  # the meta-batch the generators draw next
        self._states: dict[int, dict[str, Any]] = {0: self._generators()}

    def _count(self, case: str) -> int:
        exp = self.experiment
        if isinstance(exp, FewShotExperiment):
            return len(exp.indices[case]) if case in exp.indices else 0
        return len(exp.split.val if case == "val" else exp.split.test)

    def _generators(self) -> dict[str, Any]:
        return {"data": self._run.data_generator.get_state(),
                "tasks": self._run.task_rng.getstate()}

    def _restore(self, index: int) -> None:
        state = self._states[index]
        self._run.data_generator.set_state(state["data"])
        self._run.task_rng.setstate(state["tasks"])
        self._next = index

    def meta_batch(self, index: int) -> list[Task]:
        """``main.py``'s ``index``-th meta-batch (drawn in order; earlier ones replayed when a
        run starts past the states it has)."""
        if index != self._next:
            start = max((i for i in self._states if i <= index), default=None)
            if start is None:
                raise ValueError(f"meta-batch {index} precedes every generator state kept "
                                 f"({sorted(self._states)})")
            self._restore(start)
        while True:
            tasks = self.experiment.meta_batch(self.learner, self._run)
            self._next += 1
            self._states[self._next] = self._generators()
            # a few states back cover Lightning's prefetch; older ones are not needed
            for old in [i for i in self._states if i < self._next - 4]:
                del self._states[old]
            if self._next == index + 1:
                return tasks

    def eval_meta_batch(self, split: str, index: int) -> list[Task]:
        """Tasks ``index * size ... (index + 1) * size - 1`` of ``main.py``'s fixed ``split``
        tasks."""
        exp, size = self.experiment, self._eval_size
        first, last = index * size, min((index + 1) * size, self._count(split))
        if isinstance(exp, FewShotExperiment):
            sampler, indices = exp.samplers[split], exp.indices[split]
            return [sampler.task(indices, i) for i in range(first, last)]
        names = exp.split.val if split == "val" else exp.split.test
        steps = self.args.task_val_steps
        return [exp.task(names[i], steps, exp.eval_generator(split, i))
                for i in range(first, last)]

    def state_dict(self) -> dict[str, Any]:
        """The generator states before the next meta-step's meta-batch (saved by Lightning in
        its checkpoints)."""
        step = 0 if self.trainer is None else self.trainer.global_step
        if step not in self._states:
            self.meta_batch(step - 1)  # leaves the states before meta-batch ``step``
        state = self._states[step]
        return {"index": step, "data": state["data"], "tasks": list(state["tasks"][1]),
                "tasks_version": state["tasks"][0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from ``state_dict()``."""
        index = int(state["index"])
        self._states = {index: {"data": state["data"],
                                "tasks": (state["tasks_version"], tuple(state["tasks"]), None)}}
        self._restore(index)
