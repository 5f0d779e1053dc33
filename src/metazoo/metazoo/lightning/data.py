"""Task streams for Lightning: meta-batches of ``metazoo.Task`` as a ``LightningDataModule``.

A ``TaskDataModule`` says what meta-batch number ``index`` is (``meta_batch(index)``: every
task of it, drawn from the run's seed and ``index`` alone). Its training loader is an endless
``MetaBatchStream``: each process draws the whole meta-batch and keeps its share
(``metazoo.distributed.shard`` over the process group Lightning created), so a multi-process
run sees each task of a meta-batch exactly once and takes the same meta-steps as one process.
The stream starts at ``trainer.global_step``: a run resumed from a checkpoint continues with
the meta-batch it would have drawn next, with no data-loader state to save.

Data modules here: ``SinusoidDataModule`` (regression, Finn et al. 2017, section 5.1) and
``ImageFolderDataModule`` (N-way K-shot episodes from ``root/<split>/<class>/*.png|jpg|jpeg``).
The Omniglot protocols live with the experiment (``src/omniglot/lightning_data.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metazoo import distributed
from metazoo.learner import Task

__all__ = [
    "IMAGE_SUFFIXES",
    "FixedMetaBatches",
    "ImageFolderDataModule",
    "MetaBatch",
    "MetaBatchStream",
    "SinusoidDataModule",
    "TaskDataModule",
    "task_generator",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class MetaBatch:
    """This process's share of one meta-batch.

    Attributes:
        index: which meta-batch of the stream (0, 1, ...; the meta-step it trains).
        tasks: the tasks this process adapts (``distributed.shard`` of the whole meta-batch).
        size: tasks in the whole meta-batch, over every process.
    """

    index: int
    tasks: list[Task]
    size: int

    def to(self, device: torch.device | str) -> MetaBatch:
        """A copy with every tensor on ``device`` (Lightning moves batches with ``to``)."""
        return MetaBatch(self.index, [t.to(device) for t in self.tasks], self.size)


def task_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``parts`` (e.g. a meta-batch index) alone.

    The same numbers on every process and in every run, whatever the world size: a hash of the
    arguments (``blake2b``), so neighbouring indices give unrelated streams.
    """
    text = ":".join(str(int(v)) for v in (seed, *parts))
    digest = hashlib.blake2b(f"metazoo.lightning:{text}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class MetaBatchStream:
    """An endless iterable of ``MetaBatch``: meta-batch ``start, start + 1, ...`` of a module.

    ``start`` is read when iteration begins: the trainer's ``global_step`` (meta-steps already
    taken, restored from a checkpoint on resume), 0 without a trainer. It has no length, so
    Lightning runs it until ``max_steps``; validation then runs every ``val_check_interval``
    meta-steps (an int).
    """

    def __init__(self, datamodule: TaskDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[MetaBatch]:
        trainer = self.datamodule.trainer
        index = 0 if trainer is None else trainer.global_step
        while True:
            yield self.datamodule.shard(index, self.datamodule.meta_batch(index))
            index += 1


class FixedMetaBatches:
    """The fixed evaluation meta-batches ``0 .. count - 1`` of a split, this process's share of
    each, drawn when iterated (one loader to Lightning, not a list of loaders)."""

    def __init__(self, datamodule: TaskDataModule, split: str, count: int) -> None:
        self.datamodule, self.split, self.count = datamodule, split, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[MetaBatch]:
        for index in range(self.count):
            yield self.datamodule.shard(index, self.datamodule.eval_meta_batch(self.split,
                                                                                 index))


class TaskDataModule(L.LightningDataModule):
    """Meta-batches of tasks for ``MetaLearnerModule``; subclasses define ``meta_batch``.

    Args:
        meta_batch_size: tasks per training meta-batch (over all processes).
        seed: the run's seed; meta-batch ``i`` depends on ``(seed, i)`` alone.
        val_meta_batches: fixed meta-batches in each validation (with 0, also pass
            ``Trainer(limit_val_batches=0)``, or Lightning warns of an empty loader).
        test_meta_batches: fixed meta-batches in ``trainer.test``.
        eval_meta_batch_size: tasks per validation/test meta-batch (default
            ``meta_batch_size``).
    """

    def __init__(self, *, meta_batch_size: int, seed: int = 0, val_meta_batches: int = 0,
                 test_meta_batches: int = 1, eval_meta_batch_size: int | None = None) -> None:
        super().__init__()
        for name, value, low in (("meta_batch_size", meta_batch_size, 1), ("seed", seed, 0),
                                 ("val_meta_batches", val_meta_batches, 0),
                                 ("test_meta_batches", test_meta_batches, 0)):
            _check_int(name, value, low)
        if eval_meta_batch_size is not None:
            _check_int("eval_meta_batch_size", eval_meta_batch_size, 1)
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.val_meta_batches = val_meta_batches
        self.test_meta_batches = test_meta_batches
        self.eval_meta_batch_size = eval_meta_batch_size or meta_batch_size

    def meta_batch(self, index: int) -> list[Task]:
        """Every task of training meta-batch ``index`` (the same on every process)."""
        raise NotImplementedError(f"{type(self).__name__} must define meta_batch(index)")

    def eval_meta_batch(self, split: str, index: int) -> list[Task]:
        """Every task of fixed evaluation meta-batch ``index`` of ``split`` (``"val"`` or
        ``"test"``). Default: drawn like training meta-batches, from another seed stream."""
        raise NotImplementedError(f"{type(self).__name__} must define eval_meta_batch(split, "
                                  f"index) to validate or test")

    def shard(self, index: int, tasks: Sequence[Task]) -> MetaBatch:
        """This process's share of ``tasks`` (``metazoo.distributed.shard``)."""
        return MetaBatch(index, distributed.shard(tasks), len(tasks))

    def train_dataloader(self) -> MetaBatchStream:
        if self.trainer is not None and self.trainer.max_steps < 0:
            raise ValueError(f"{type(self).__name__} streams meta-batches without end; give "
                             f"the trainer the number of meta-steps: Trainer(max_steps=N)")
        return MetaBatchStream(self)

    def val_dataloader(self) -> FixedMetaBatches:
        return FixedMetaBatches(self, "val", self.val_meta_batches)

    def test_dataloader(self) -> FixedMetaBatches:
        return FixedMetaBatches(self, "test", self.test_meta_batches)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


# -- sinusoid regression ---------------------------------------------------------------------

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SinusoidDataModule(TaskDataModule):
    """Sinusoid regression tasks (Finn et al. 2017, section 5.1).

    A task is ``y = A sin(x - phase)`` with ``A`` uniform in ``[0.1, 5]``, ``phase`` uniform in
    ``[0, pi]``, ``x`` uniform in ``[-5, 5]``: ``shots`` support points and ``queries`` query
    points, inputs and targets of shape ``(n, 1)`` (use ``F.mse_loss``).

    Args:
        shots: support points per task.
        queries: query points per task.
        dtype: floating type of the tensors.
        **keywords: ``TaskDataModule``'s (``meta_batch_size``, ``seed``, ...).
    """

    def __init__(self, *, shots: int = 10, queries: int = 10,
                 dtype: torch.dtype = torch.float32, **keywords: int | None) -> None:
        super().__init__(**keywords)  # type: ignore[arg-type]
        self.shots = _check_int("shots", shots, 1)
        self.queries = _check_int("queries", queries, 1)
        self.dtype = dtype

    def _tasks(self, generator: torch.Generator, count: int) -> list[Task]:
        tasks = []
        n = self.shots + self.queries
        for _ in range(count):
            amplitude = 0.1 + 4.9 * torch.rand((), generator=generator, dtype=self.dtype)
            phase = math.pi * torch.rand((), generator=generator, dtype=self.dtype)
            x = 10.0 * torch.rand(n, 1, generator=generator, dtype=self.dtype) - 5.0
            y = amplitude * torch.sin(x - phase)
            tasks.append(Task([(x[:self.shots], y[:self.shots])],
                              (x[self.shots:], y[self.shots:])))
        return tasks

    def meta_batch(self, index: int) -> list[Task]:
        return self._tasks(task_generator(self.seed, _SPLIT_CODES["train"], index),
                           self.meta_batch_size)

    def eval_meta_batch(self, split: str, index: int) -> list[Task]:
        return self._tasks(task_generator(self.seed, _SPLIT_CODES[split], index),
                           self.eval_meta_batch_size)


# -- image folders --------------------------------------------------------------------------


def _class_folders(folder: Path) -> list[tuple[str, list[Path]]]:
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a directory; an image-folder data set is "
                         "laid out as root/<split>/<class>/*.png|jpg|jpeg; pass root=DIR "
                         "holding train/ (and val/, test/)")
    classes = []
    for c in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes.append((c.name, files))
    if not classes:
        raise ValueError(f"{str(folder)!r} has no class folder with .png/.jpg/.jpeg images; "
                         "expected <split>/<class>/*.png|jpg|jpeg")
    return classes


def _load(path: Path, size: int, channels: str) -> Tensor:
    with Image.open(path) as source:
        image = source.convert("RGB" if channels == "rgb" else "L")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        array = np.array(image, dtype=np.uint8)  # a writable copy, owned by the tensor
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


class ImageFolderDataModule(TaskDataModule):
    """N-way K-shot episodes from an image folder ``root/<split>/<class>/*.png|jpg|jpeg``.

    An episode draws ``ways`` classes of the split, then ``shots`` support and ``queries``
    query images of each, without replacement; labels are ``0..ways-1`` in the order the
    classes were drawn. Images are decoded once with PIL (RGB or greyscale), resized to
    ``image_size`` (LANCZOS) and kept as ``uint8``; tasks hold ``x / 255`` as ``dtype``.
    Training episodes come from ``train/``, validation from ``val/``, test from ``test/``.

    Args:
        root: the data set folder.
        ways: classes per episode.
        shots: support images per class.
        queries: query images per class.
        image_size: height and width of the images.
        channels: ``"rgb"`` or ``"grey"``.
        dtype: floating type of the tasks' images.
        **keywords: ``TaskDataModule``'s (``meta_batch_size``, ``seed``, ...).
    """

    def __init__(self, root: str | Path, *, ways: int = 5, shots: int = 1, queries: int = 15,
                 image_size: int = 84, channels: str = "rgb",
                 dtype: torch.dtype = torch.float32, **keywords: int | None) -> None:
        super().__init__(**keywords)  # type: ignore[arg-type]
        self.root = Path(root)
        self.ways = _check_int("ways", ways, 2)
        self.shots = _check_int("shots", shots, 1)
        self.queries = _check_int("queries", queries, 1)
        self.image_size = _check_int("image_size", image_size, 1)
        if channels not in ("rgb", "grey"):
            raise ValueError(f"channels={channels!r} must be 'rgb' or 'grey'")
        self.channels = channels
        self.dtype = dtype
        self._images: dict[str, list[Tensor]] = {}

    def images(self, split: str) -> list[Tensor]:
        """The ``uint8`` images of ``split``, one ``(n, C, H, W)`` tensor per class (loaded on
        first use)."""
        if split not in self._images:
            per_class = [torch.stack([_load(f, self.image_size, self.channels) for f in files])
                         for _, files in _class_folders(self.root / split)]
            need = self.shots + self.queries
            usable = [c for c in per_class if c.shape[0] >= need]
            if len(usable) < self.ways:
                raise ValueError(f"{str(self.root / split)!r}: ways={self.ways} classes per "
                                 f"episode, but only {len(usable)} classes have shots + queries "
                                 f"= {need} images; lower ways/shots/queries or add images")
            self._images[split] = usable
        return self._images[split]

    def episodes(self, split: str, generator: torch.Generator, count: int) -> list[Task]:
        """``count`` episodes of ``split`` drawn from ``generator``."""
        classes = self.images(split)
        labels = torch.arange(self.ways)
        tasks = []
        for _ in range(count):
            chosen = torch.randperm(len(classes), generator=generator)[:self.ways].tolist()
            support, query = [], []
            for c in chosen:
                order = torch.randperm(classes[c].shape[0], generator=generator)
                picked = classes[c][order[:self.shots + self.queries]]
                support.append(picked[:self.shots])
                query.append(picked[self.shots:])
            tasks.append(Task([(self._float(torch.cat(support)),
                                labels.repeat_interleave(self.shots))],
                              (self._float(torch.cat(query)),
                               labels.repeat_interleave(self.queries))))
        return tasks

    def _float(self, x: Tensor) -> Tensor:
        return x.to(self.dtype) / 255.0

    def meta_batch(self, index: int) -> list[Task]:
        return self.episodes("train", task_generator(self.seed, _SPLIT_CODES["train"], index),
                             self.meta_batch_size)

    def eval_meta_batch(self, split: str, index: int) -> list[Task]:
        return self.episodes(split, task_generator(self.seed, _SPLIT_CODES[split], index),
                             self.eval_meta_batch_size)
