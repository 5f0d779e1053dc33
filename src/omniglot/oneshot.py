"""Lake et al.'s official Omniglot one-shot classification benchmark: loading and scoring.

Benchmark (Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 2015; archive ``python/one-shot-classification/
all_runs.zip`` of github.com/brendenlake/omniglot): 20 runs, each a 20-way within-alphabet
one-shot task drawn from the evaluation alphabets. A run folder ``runNN`` holds
``training/class01.png ... class20.png`` (one drawing per class), ``test/item01.png ...
item20.png`` and ``class_labels.txt``, whose lines read ``run01/test/item01.png
run01/training/class08.png`` (a test drawing and its class's training drawing; paths are
relative to the folder that holds the run folders). The score is the error rate per run and
its mean over runs.

Protocol here: a meta-trained ``metazoo.MetaLearner`` adapts to each run's 20 training drawings
(one support batch, labels 0..19 in the sorted order of the training files, repeated for
``steps`` inner steps, no augmentation) and classifies the run's test drawings. Drawings are
decoded exactly like the training data (``data.py``: strokes 1, background 0, 28x28 by the
same ``resize`` mode).

BatchNorm follows the learner's ``bn_mode`` (as ``wrapper.score`` does): ``"batch"`` is
transductive (the test drawings of a run are normalised with their own statistics, as one
batch, the MAML paper's protocol); ``"running"`` is inductive (each test drawing is normalised
with the per-task running statistics accumulated during adaptation, so its prediction does not
depend on the other test drawings).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import metazoo
from data import IMAGE_SIZE, RESIZE_MODES, decode_drawing
from episodes import LabelledImages
from metazoo import MetaLearner, Task
from metazoo.cli import ArgumentParser, UsageError, run_command, user_input
from wrapper import scoring_model

__all__ = ["LABELS_FILE", "OneShotResult", "OneShotRun", "RunResult", "evaluate_oneshot",
           "find_runs_folder", "load_runs", "write_runs"]

LABELS_FILE = "class_labels.txt"
_RUN = re.compile(r"^run(\d+)$")
_FIX = ("get the official runs with `bash make_omniglot.sh -d` (all_runs.zip, extracted to "
        "<root>_oneshot) or pass the folder that holds run01 ... run20")


@dataclass(frozen=True)
class OneShotRun:
    """One run of the benchmark, decoded.

    Attributes:
        name: the run folder's name (``run01``).
        train_files: training drawings, paths relative to the runs folder, sorted; class ``c``
            is ``train_files[c]``.
        train_images: ``uint8`` tensor ``(classes, 28, 28)``, strokes 255, background 0.
        test_files: test drawings, relative paths, sorted.
        test_images: ``uint8`` tensor ``(tests, 28, 28)``.
        test_labels: ``int64`` tensor ``(tests,)``: the class (index into ``train_files``) of
            each test drawing, from ``class_labels.txt``.
    """

    name: str
    train_files: tuple[str, ...]
    train_images: Tensor
    test_files: tuple[str, ...]
    test_images: Tensor
    test_labels: Tensor

    @property
    def ways(self) -> int:
        """Number of classes (20 in the official runs)."""
        return len(self.train_files)

    def task(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             image_size: int = IMAGE_SIZE, mean: Sequence[float] | float | None = None,
             std: Sequence[float] | float | None = None) -> Task:
        """The run as a ``metazoo.Task``: one support batch (every training drawing, labels
        ``0..ways-1``) and the test drawings as the query.

        Pixels are prepared as for training: ``x / 255`` (``data.TaskSampler``, the alphabet
        protocol), or with the few-shot protocol's options, resized to ``image_size`` like
        ``episodes.LabelledImages.resized`` and normalised ``(x / 255 - mean) / std`` like
        ``episodes.EpisodeSampler``.
        """
        def prepare(x: Tensor) -> Tensor:
            images = x.unsqueeze(1)
            if image_size != IMAGE_SIZE:
                images = LabelledImages.from_lists([x], [self.name]).resized(image_size).images
            out = images.to(device, dtype) / 255.0
            if mean is not None or std is not None:
                out = (out - _channel_value("mean", mean, 0.0, out)) / _channel_value(
                    "std", std, 1.0, out)
            return out

        support = (prepare(self.train_images), torch.arange(self.ways, device=device))
        return Task([support], (prepare(self.test_images), self.test_labels.to(device)))


def _channel_value(name: str, value: Sequence[float] | float | None, default: float,
                   like: Tensor) -> Tensor:
    values = [default] if value is None else (
        [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value])
    if len(values) != 1:
        raise ValueError(f"{name}={value!r}: Omniglot drawings have one channel; give one value")
    if name == "std" and values[0] <= 0:
        raise ValueError(f"std={value!r} must be positive")
    return torch.tensor(values[0], dtype=like.dtype, device=like.device)


def find_runs_folder(folder: str | os.PathLike) -> Path:
    """The folder that holds ``runNN``: ``folder`` itself or its ``all_runs/`` subfolder.

    Raises:
        ValueError: if neither holds a run folder.
    """
    folder = Path(folder)
    for candidate in (folder, folder / "all_runs"):
        if candidate.is_dir() and any(_RUN.match(p.name) and p.is_dir()
                                      for p in candidate.iterdir()):
            return candidate
    raise ValueError(f"no one-shot run folders (run01 ... run20) in {str(folder)!r} or "
                     f"{str(folder / 'all_runs')!r}; {_FIX}")


def _relative(base: Path, path: Path) -> str:
    return path.relative_to(base).as_posix()


def _load_run(base: Path, name: str, resize: str) -> OneShotRun:
    run = base / name
    labels_path = run / LABELS_FILE
    for sub in ("training", "test"):
        if not (run / sub).is_dir():
            raise ValueError(f"{run / sub} is missing: a run folder holds training/, test/ and "
                             f"{LABELS_FILE}; {_FIX}")
    if not labels_path.is_file():
        raise ValueError(f"{labels_path} is missing; {_FIX}")
    train = sorted(_relative(base, p) for p in (run / "training").iterdir() if p.suffix == ".png")
    test = sorted(_relative(base, p) for p in (run / "test").iterdir() if p.suffix == ".png")
    if not train or not test:
        raise ValueError(f"{run} has {len(train)} training and {len(test)} test drawings (.png);"
                         f" both must be non-empty; {_FIX}")
    index = {f: c for c, f in enumerate(train)}
    answers: dict[str, int] = {}
    for number, line in enumerate(labels_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{labels_path} line {number} ({line.strip()!r})"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'runNN/test/itemKK.png "
                             f"runNN/training/classCC.png' (two paths), got {len(fields)} fields")
        test_file, train_file = fields
        for path, sub in ((test_file, "test"), (train_file, "training")):
            if not path.startswith(f"{name}/{sub}/"):
                raise ValueError(f"{where}: {path!r} is not under {name}/{sub}/ (paths are "
                                 f"relative to the folder that holds {name})")
        if test_file not in test:
            raise ValueError(f"{where}: test drawing {base / test_file} does not exist")
        if train_file not in index:
            raise ValueError(f"{where}: training drawing {base / train_file} does not exist")
        if test_file in answers:
            raise ValueError(f"{where}: {test_file} is labelled twice")
        answers[test_file] = index[train_file]
    unlabelled = [f for f in test if f not in answers]
    if unlabelled:
        raise ValueError(f"{labels_path} gives no class for {unlabelled}; every test drawing "
                         f"needs one line")

    def decode(files: Sequence[str]) -> Tensor:
        return torch.from_numpy(np.stack([decode_drawing(str(base / f), resize) for f in files]))

    return OneShotRun(name, tuple(train), decode(train), tuple(test), decode(test),
                      torch.tensor([answers[f] for f in test], dtype=torch.int64))


def load_runs(folder: str | os.PathLike, *, resize: str = "area") -> list[OneShotRun]:
    """Every run in ``folder`` (or ``folder/all_runs``), in order ``run01, run02, ...``.

    Args:
        folder: the extracted ``all_runs.zip`` (the folder holding ``run01`` ... or its parent).
        resize: ``data.py``'s resize mode (``"area"`` or ``"nearest"``); use the one the model
            was trained with.

    Raises:
        ValueError: naming the file or folder, for a missing run (a gap in the numbering), a
            missing folder, drawing or labels file, or a malformed labels line.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r} must be one of {RESIZE_MODES}")
    base = find_runs_folder(folder)
    names = {int(m.group(1)): p.name for p in base.iterdir()
             if p.is_dir() and (m := _RUN.match(p.name))}
    last = max(names)
    missing = [f"run{n:02d}" for n in range(1, last + 1) if n not in names]
    if missing:
        raise ValueError(f"{base} lacks {missing} (found {sorted(names.values())}); {_FIX}")
    return [_load_run(base, names[n], resize) for n in sorted(names)]


@dataclass(frozen=True)
class RunResult:
    """One run's score.

    Attributes:
        name: the run (``run01``).
        errors: misclassified test drawings.
        tests: test drawings.
        error_rate: ``errors / tests``.
        predictions: predicted class per test drawing (order of ``OneShotRun.test_files``).
        inner_losses: support loss before each inner step.
    """

    name: str
    errors: int
    tests: int
    error_rate: float
    predictions: tuple[int, ...]
    inner_losses: tuple[float, ...]


@dataclass(frozen=True)
class OneShotResult:
    """The benchmark's score.

    Attributes:
        error_rate: mean of the per-run error rates (Lake et al.'s figure).
        runs: per-run results.
        bn_mode: ``"batch"`` (transductive) or ``"running"`` (inductive).
        steps: inner steps per run.
    """

    error_rate: float
    runs: tuple[RunResult, ...]
    bn_mode: str
    steps: int

    @property
    def transductive(self) -> bool:
        """Whether BatchNorm normalised the test drawings with their own batch statistics."""
        return self.bn_mode == metazoo.BatchNormMode.BATCH

    def to_json(self) -> str:
        """The result as JSON (what the command writes as ``oneshot.json``)."""
        return json.dumps({**asdict(self), "transductive": self.transductive}, indent=1,
                          sort_keys=True)


def _check_width(model: torch.nn.Module, task: Task, run: OneShotRun, bn_mode: str) -> None:
    x = task.support[0][0]
    with torch.no_grad():
        out, _ = metazoo.forward(model, metazoo.params_of(model, detach=True),
                                 metazoo.initial_buffers(model, bn_mode), x, bn_mode=bn_mode)
    if out.shape != (x.shape[0], run.ways):
        raise ValueError(f"the model gives outputs of shape {tuple(out.shape)} for "
                         f"{x.shape[0]} drawings of the {run.ways}-way {run.name}; it needs a "
                         f"head with {run.ways} outputs (evaluate_oneshot.py --oneshot_head "
                         f"zero rebuilds one)")


def evaluate_oneshot(learner: MetaLearner, runs: Sequence[OneShotRun], *, steps: int,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                     image_size: int = IMAGE_SIZE, mean: Sequence[float] | float | None = None,
                     std: Sequence[float] | float | None = None) -> OneShotResult:
    """Adapts ``learner`` to every run's training drawings and scores its test drawings.

    Args:
        learner: a meta-trained learner whose model's head has ``run.ways`` outputs.
        runs: ``load_runs`` output.
        steps: inner steps on the run's one support batch (the batch is repeated).
        device, dtype: where and in which type the images go (default: those of the
            learner's first model parameter).
        image_size, mean, std: pixel preparation of the few-shot protocol
            (``--image_size``, ``--norm_mean``, ``--norm_std``; see ``OneShotRun.task``).

    Returns:
        Per-run error rates and their mean; BatchNorm mode is the learner's ``bn_mode``.

    Raises:
        ValueError: for no runs, ``steps < 1``, or a model whose output width is not the
            number of classes of a run.
    """
    if not runs:
        raise ValueError("runs is empty; load them with load_runs(folder)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer (inner steps per run)")
    model = scoring_model(learner)
    first = next(model.parameters())
    device = first.device if device is None else torch.device(device)
    dtype = first.dtype if dtype is None else dtype
    bn_mode = str(metazoo.BatchNormMode(getattr(learner, "bn_mode", "batch")))
    results: list[RunResult] = []
    for run in runs:
        task = run.task(device=device, dtype=dtype, image_size=image_size, mean=mean, std=std)
        if not results:  # a wrong head width fails here, before adaptation, with the fix
            _check_width(model, task, run, bn_mode)
        adapted = learner.adapt(task, steps=steps)
        x, y = task.query
        with torch.no_grad():
            # training=False: in "running" mode each drawing uses the task's running statistics
            # (inductive); in "batch" mode the test drawings form one batch (transductive).
            out, _ = metazoo.forward(model, adapted.params, adapted.buffers, x, bn_mode=bn_mode,
                                     training=False)
        predictions = out.argmax(dim=1)
        errors = int((predictions != y).sum())
        results.append(RunResult(run.name, errors, len(run.test_files),
                                 errors / len(run.test_files),
                                 tuple(predictions.tolist()), adapted.inner_losses))
    overall = sum(r.error_rate for r in results) / len(results)
    return OneShotResult(overall, tuple(results), bn_mode, steps)


def write_runs(alphabets: Sequence[str | os.PathLike], folder: str | os.PathLike, *,
               runs: int = 20, ways: int = 20, seed: int = 0) -> Path:
    """Writes runs in the official layout from held-out alphabet folders (``<Alphabet>/
    <character>/*.png``), the way Lake et al. built theirs from the evaluation alphabets: per
    run one alphabet (in turn), ``ways`` of its characters and two different drawers; the first
    drawer's drawing of each character is its training image, the second's the test image.

    For checking a model on real drawings when ``all_runs.zip`` cannot be fetched; scores on
    these runs are not the official benchmark's.

    Returns:
        ``folder`` (which must not exist yet).
    """
    out = Path(folder)
    if out.exists():
        raise ValueError(f"folder={str(out)!r} exists; pass a new folder for the runs")
    rng = random.Random(seed)
    listed = []
    for alphabet in alphabets:
        chars = sorted(c for c in Path(alphabet).iterdir() if c.is_dir())
        if len(chars) < ways:
            raise ValueError(f"alphabet {str(alphabet)!r} has {len(chars)} characters; a "
                             f"{ways}-way run needs {ways}: pass larger alphabets or fewer ways")
        listed.append(chars)
    if not listed:
        raise ValueError("alphabets is empty; pass the held-out alphabet folders")
    for r in range(1, runs + 1):
        chosen = rng.sample(listed[(r - 1) % len(listed)], ways)
        drawings = [sorted(c.glob("*.png")) for c in chosen]
        first, second = rng.sample(range(min(len(d) for d in drawings)), 2)
        order = rng.sample(range(ways), ways)
        name = f"run{r:02d}"
        (out / name / "training").mkdir(parents=True)
        (out / name / "test").mkdir()
        for c, files in enumerate(drawings):
            shutil.copyfile(files[first], out / name / "training" / f"class{c + 1:02d}.png")
        lines = []
        for i, c in enumerate(order):
            shutil.copyfile(drawings[c][second], out / name / "test" / f"item{i + 1:02d}.png")
            lines.append(f"{name}/test/item{i + 1:02d}.png {name}/training/class{c + 1:02d}.png")
        (out / name / LABELS_FILE).write_text("\n".join(lines) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line of ``write_runs``; bad input is a ``UsageError``."""
    parser = ArgumentParser(description="Write one-shot runs in the official layout "
                                     "from held-out alphabet folders (write_runs)")
    parser.add_argument("out", help="new folder for run01 ... runNN")
    parser.add_argument("alphabets", nargs="+", help="<Alphabet> folders of held-out alphabets")
    parser.add_argument("--runs", type=int, default=20, help="runs to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices")
    cli = parser.parse_args(argv)
    if cli.runs < 1:
        raise UsageError(f"--runs {cli.runs}: must be >= 1")
    for alphabet in cli.alphabets:
        if not Path(alphabet).is_dir():
            raise UsageError(f"alphabet folder {alphabet!r} does not exist; pass <Alphabet> "
                             "folders of held-out alphabets")
    with user_input():
        out = write_runs(cli.alphabets, cli.out, runs=cli.runs, seed=cli.seed)
    print(out)
    return out


if __name__ == "__main__":
    run_command(main)
