"""The Omniglot experiment's two protocols: what a meta-batch is and how a model is evaluated.

``Experiment`` (``--protocol alphabet``, the Leap and WarpGrad papers'): each alphabet is a task,
``--classes``-way classification of its characters, adapted on augmented drawings and scored on
held-out ones. ``FewShotExperiment`` (``--protocol fewshot``, the MAML paper's): N-way K-shot
episodes, a fixed seeded set of test episodes reported as mean accuracy +- 95% CI. Both give the
training loop (``meta_training.meta_train``) the same small interface (``ExperimentLike``).

Logs are written through the run folder (``metazoo.runs.RunFolder``), one line per write in the
reference's format: ``step,meta_loss,loss,acc,loss curve;...;,acc curve;...;``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from data import TaskSampler, load_alphabets, make_split
from episodes import (
    EpisodeIndices,
    EpisodeSampler,
    FewShotSplit,
    LabelledImages,
    MeanCI,
    inner_batches,
    load_image_folder,
    mean_ci,
    split_alphabets,
)
from meta_training import RunState, auc, write_line
from metazoo import MetaLearner, Task
from metazoo.runs import RunFolder
from wrapper import score


class Experiment:
    """Data, split and task construction for one run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.notes: list[str] = []  # logged at the start of the run (which cache was used)
        images = load_alphabets(args.root, resize=args.resize, notes=self.notes)
        self.split = make_split({a: len(c) for a, c in images.items()},
                                {a: [t.shape[0] for t in c] for a, c in images.items()},
                                seed=args.seed, num_train=args.num_pretrain,
                                num_val=args.num_val, num_test=args.num_test,
                                classes=args.classes, train_images=args.train_images)
        self.sampler = TaskSampler(images, self.split, device=device,
                                   augment_images=not args.no_augment)
        self.args = args

    def task(self, name: str, steps: int, generator: torch.Generator, head: int | None = None
             ) -> Task:
        """Adaptation batches (augmented) and the held-out drawings as the query."""
        support = self.sampler.batches(name, steps=steps, batch_size=self.args.task_batch_size,
                                       generator=generator)
        query = self.sampler.held_out(name)
        if head is not None:  # multi-head pretraining: target = head * classes + label
            offset = head * self.args.classes
            support = [(x, y + offset) for x, y in support]
            query = (query[0], query[1] + offset)
        return Task(support, query)

    def eval_generator(self, case: str, index: int) -> torch.Generator:
        """The same augmented batches for task ``index`` at every evaluation, for every
        method."""
        code = {"val": 1, "test": 2}[case]
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + code * 10_007 + index)

    @property
    def has_validation(self) -> bool:
        """Whether there are validation tasks."""
        return bool(self.split.val)

    def meta_batch(self, learner: MetaLearner, run: RunState) -> list[Task]:
        """The next meta-batch: reshuffled passes over the training alphabets
        (``run.task_rng``), augmented batches from ``run.data_generator``."""
        args = self.args
        multi_head = getattr(learner, "multi_head", False)
        heads = {name: i for i, name in enumerate(self.split.train)}
        names = self.sampler.meta_batch(self.split.train, args.meta_batch_size, run.task_rng)
        return [self.task(n, args.task_train_steps, run.data_generator,
                          heads[n] if multi_head else None) for n in names]

    def evaluate(self, learner: MetaLearner, case: str, step: int, logs: RunFolder | None,
                 printer: Callable[[str], None]) -> float:
        """Mean held-out accuracy over the ``case`` alphabets (module-level ``evaluate``)."""
        return evaluate(learner, self, case, step, logs, printer)


@dataclass(frozen=True)
class FewShotResult:
    """One few-shot evaluation (what ``main`` returns and ``fewshot_test.json`` holds).

    Attributes:
        accuracy: mean query accuracy over the episodes with its 95% confidence interval.
        loss: mean query loss.
        support_accuracy: mean accuracy on the support images after adaptation.
        episodes, ways, shots, queries: the episodes.
        bn_eval: ``"transductive"`` or ``"inductive"`` (``--bn_eval``).
        inner_steps: adaptation steps per episode.
        step: meta-step of the evaluated model.
        seconds: wall time of the evaluation.
    """

    accuracy: MeanCI
    loss: float
    support_accuracy: float
    episodes: int
    ways: int
    shots: int
    queries: int
    bn_eval: str
    inner_steps: int
    step: int
    seconds: float


class FewShotExperiment:
    """The few-shot protocol: N-way K-shot episodes for meta-training and evaluation.

    Meta-training classes are every character of the meta-training alphabets (Omniglot; the
    seeded alphabet split of the alphabet protocol, ``episodes.split_alphabets``) or the classes
    of ``root/train`` (image folder), optionally with rotated copies (``--rotations``); each
    meta-batch draws ``--meta_batch_size`` episodes from ``run.data_generator``. Validation
    and test episodes are drawn once from generators seeded by ``--seed`` and the case alone,
    so every evaluation and every method sees the same episodes.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.notes: list[str] = []
        data: dict[str, LabelledImages] = {}
        if args.dataset == "omniglot":
            images = load_alphabets(args.root, resize=args.resize, notes=self.notes)
            train, val, test = split_alphabets(list(images), seed=args.seed,
                                               num_train=args.num_pretrain,
                                               num_val=args.num_val, num_test=args.num_test)
            for role, names in (("train", train), ("val", val), ("test", test)):
                if names:
                    data[role] = LabelledImages.from_alphabets(images, names).resized(
                        args.image_size)
            seed: int | None = args.seed
        else:
            root = Path(args.root)
            train, val, test = ["train"], ["val"] if (root / "val").is_dir() else [], ["test"]
            for role in ("train", *val, "test"):
                data[role] = load_image_folder(root, role, image_size=args.image_size,
                                               channels=args.channels, notes=self.notes)
            seed = None
        for role in ("train", "test"):
            if role not in data:
                raise ValueError(f"the few-shot protocol needs {role} classes; set "
                                 f"--{'num_pretrain' if role == 'train' else 'num_test'} >= 1")
        self.split = FewShotSplit(seed, tuple(train), tuple(val), tuple(test),
                                  {role: d.num_classes for role, d in data.items()})
        self.samplers: dict[str, EpisodeSampler] = {}
        for role, d in data.items():
            training = role == "train"
            shots = args.train_shots if training and args.train_shots else args.shots
            queries = args.train_queries if training and args.train_queries else args.queries
            try:
                self.samplers[role] = EpisodeSampler(
                    d, ways=args.ways, shots=shots, queries=queries,
                    rotations=args.rotations and training, device=device,
                    mean=args.norm_mean, std=args.norm_std, exclude_small=True)
            except ValueError as err:
                raise ValueError(f"{role} classes ({', '.join(getattr(self.split, role))}): "
                                 f"{err}") from None
            for name, count in self.samplers[role].excluded.items():
                self.notes.append(f"{role} class {name!r} left out: {count} images < shots + "
                                  f"queries = {shots + queries}")
        self.indices: dict[str, EpisodeIndices] = {}
        for code, (case, count) in enumerate((("val", args.val_episodes),
                                              ("test", args.test_episodes)), start=1):
            if case in self.samplers and count:
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + code * 10_007)
                self.indices[case] = self.samplers[case].draw(count, gen)
        self.results: dict[str, FewShotResult] = {}

    @property
    def has_validation(self) -> bool:
        """Whether there are validation episodes."""
        return "val" in self.indices

    def meta_batch(self, learner: MetaLearner, run: RunState) -> list[Task]:
        """``--meta_batch_size`` training episodes drawn from ``run.data_generator``."""
        del learner
        tasks = self.samplers["train"].sample(self.args.meta_batch_size, run.data_generator)
        if self.args.inner_batch is None:
            return tasks
        # --inner_batch: the shuffles come after the episodes from the same saved generator
        return [inner_batches(task, self.args.inner_batch, self.args.task_train_steps,
                              run.data_generator) for task in tasks]

    def eval_batch_generator(self, case: str) -> torch.Generator:
        """The random numbers of ``--eval_inner_batch``'s shuffles: seeded by ``--seed`` and
        the case alone, so every evaluation and every method adapts on the same batches."""
        code = ("val", "test").index(case) + 1
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + code * 10_007 + 5)

    def evaluate(self, learner: MetaLearner, case: str, step: int, logs: RunFolder | None,
                 printer: Callable[[str], None]) -> float:
        """Adapts to each fixed ``case`` episode and scores its query; logs the mean accuracy
        with its 95% CI; returns the mean accuracy (the full result in ``results[case]``).

        Logs: ``results_0_<case>_train.log`` and ``results_0_<case>_val.log`` hold the episodes'
        means in the reference format (the episode set read as one task by ``monitor``), and
        ``results_fewshot_<case>_ci.log`` one line per evaluation:
        ``step,mean_acc,ci95,std,episodes,mean_loss,bn_eval``.
        """
        args, sampler, indices = self.args, self.samplers[case], self.indices[case]
        steps = args.task_val_steps
        start = time.perf_counter()
        losses, accs, support_accs, curves = [], [], [], []
        batches = None if args.eval_inner_batch is None else self.eval_batch_generator(case)
        for i in range(len(indices)):
            task = sampler.task(indices, i)
            adapted = learner.adapt(task if batches is None else inner_batches(
                task, args.eval_inner_batch, steps, batches), steps=steps)
            support_accs.append(score(learner, adapted, task.support[0])[1])
            loss, acc = score(learner, adapted, task.query)
            losses.append(loss)
            accs.append(acc)
            curves.append(adapted.inner_losses)
        ci = mean_ci(accs)
        loss = sum(losses) / len(losses)
        support_acc = sum(support_accs) / len(support_accs)
        curve = [sum(c) / len(c) for c in zip(*curves)]
        result = FewShotResult(ci, loss, support_acc, ci.n, args.ways, args.shots, args.queries,
                               args.bn_eval, steps, step, time.perf_counter() - start)
        self.results[case] = result
        if logs is not None:
            write_line(logs, f"results_0_{case}_train.log", step, auc(curve),
                       sum(curve) / max(len(curve), 1), support_acc, curve, [support_acc])
            write_line(logs, f"results_0_{case}_val.log", step, loss, loss, ci.mean, [loss],
                       [ci.mean])
            logs.append_text(f"results_fewshot_{case}_ci.log",
                             f"{step:d},{ci.mean:f},{ci.ci95:f},{ci.std:f},{ci.n:d},{loss:f},"
                             f"{args.bn_eval}\n")
        printer(f"[{case} step {step}] {args.ways}-way {args.shots}-shot acc {ci.mean:.4f} "
                f"+- {ci.ci95:.4f} (95% CI, {ci.n} episodes, BN {args.bn_eval}, {steps} inner "
                f"steps) loss {loss:.4f} support acc {support_acc:.3f} "
                f"{result.seconds:.1f}s")
        return ci.mean


def make_experiment(args: argparse.Namespace, device: torch.device
                    ) -> Experiment | FewShotExperiment:
    """The ``--protocol``'s experiment."""
    if args.protocol == "fewshot":
        return FewShotExperiment(args, device)
    return Experiment(args, device)


def evaluate(learner: MetaLearner, exp: Experiment, case: str, step: int, logs: RunFolder | None,
             printer: Callable[[str], None]) -> float:
    """Adapts to every ``case`` task and writes its two log files; returns mean held-out acc."""
    names = exp.split.val if case == "val" else exp.split.test
    accs = []
    steps = exp.args.task_val_steps
    for i, name in enumerate(names):
        start = time.perf_counter()
        task = exp.task(name, steps, exp.eval_generator(case, i))
        adapted = learner.adapt(task, steps=steps)
        _, train_acc = score(learner, adapted, exp.sampler.train_images(name))
        held_loss, held_acc = score(learner, adapted, task.query)
        accs.append(held_acc)
        curve = adapted.inner_losses
        if logs is not None:
            write_line(logs, f"results_{i}_{case}_train.log", step, auc(curve),
                       sum(curve) / len(curve), train_acc, curve, [train_acc])
            write_line(logs, f"results_{i}_{case}_val.log", step, held_loss, held_loss,
                       held_acc, [held_loss], [held_acc])
        printer(f"[{case} task {i} {name}] {time.perf_counter() - start:.1f}s inner "
                f"{curve[0]:.3f}->{curve[-1]:.3f} train acc {train_acc:.3f} held-out loss "
                f"{held_loss:.3f} acc {held_acc:.3f}")
    mean = sum(accs) / len(accs) if accs else float("nan")
    printer(f"[{case} step {step}] mean held-out acc {mean:.4f} over {len(accs)} tasks")
    return mean

