"""Episodic N-way K-shot tasks: labelled image collections, the episode sampler, the CI helper.

Protocol (Vinyals et al. 2016; Finn et al., "Model-Agnostic Meta-Learning", ICML 2017): an
episode draws ``ways`` classes, then ``shots`` support and ``queries`` query images of each
(without replacement, disjoint); labels are ``0..ways-1`` in the random order the classes were
drawn, so a class has no fixed label. With ``rotations`` every class also appears rotated by
90, 180 and 270 degrees, each (class, rotation) a distinct class (the MAML paper's Omniglot
class augmentation, after Santoro et al. 2016).

Data are one ``uint8`` tensor ``(M, C, H, W)`` with the images of class ``c`` at
``offsets[c]:offsets[c + 1]`` (``LabelledImages``): from Omniglot characters
(``LabelledImages.from_alphabets`` over ``data.load_alphabets``) or from an image folder
``root/<split>/<class>/*.png|jpg|jpeg`` (``load_image_folder``, the common mini-ImageNet
layout), decoded once with PIL and cached like ``data.load_alphabets``. Sampling is a few tensor
operations per meta-batch (random keys, ``argsort``, gathers): no Python loop over images. The
random numbers come from a CPU ``torch.Generator``, so CPU and GPU runs draw the same episodes.

Results over episodes are reported as mean accuracy with a 95% confidence interval
``1.96 * std / sqrt(n)`` (``mean_ci``; ``std`` over episodes with ``ddof=0``, as the MAML code).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from data import cache_candidates
from images import content_key, load_cached, read_image
from metazoo import Task

__all__ = [
    "CHANNELS",
    "IMAGE_SUFFIXES",
    "EpisodeIndices",
    "EpisodeSampler",
    "FewShotSplit",
    "LabelledImages",
    "MeanCI",
    "inner_batches",
    "load_image_folder",
    "mean_ci",
    "split_alphabets",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHANNELS = ("rgb", "grey")


@dataclass(frozen=True)
class LabelledImages:
    """Images of several classes as one tensor.

    Attributes:
        images: ``uint8`` ``(M, C, H, W)``, the images of class ``c`` contiguous.
        offsets: ``int64`` ``(num_classes + 1,)``; class ``c`` is ``images[offsets[c]:
            offsets[c + 1]]``.
        names: one name per class.
    """

    images: Tensor
    offsets: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 (M, C, H, W) tensor, got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        off = self.offsets
        if (off.dim() != 1 or off.numel() != len(self.names) + 1 or int(off[0]) != 0
                or int(off[-1]) != self.images.shape[0] or bool((off[1:] < off[:-1]).any())):
            raise ValueError(f"offsets={off.tolist()} must rise from 0 to "
                             f"{self.images.shape[0]} with one entry per class plus one "
                             f"({len(self.names)} names)")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.names)

    @property
    def counts(self) -> Tensor:
        """Images per class, ``int64`` ``(num_classes,)``."""
        return self.offsets[1:] - self.offsets[:-1]

    @staticmethod
    def from_lists(per_class: Sequence[Tensor], names: Sequence[str]) -> LabelledImages:
        """One ``uint8`` tensor ``(n_c, C, H, W)`` (or ``(n_c, H, W)``: one channel) per class."""
        if len(per_class) != len(names):
            raise ValueError(f"{len(per_class)} image tensors for {len(names)} names")
        if not per_class:
            raise ValueError("per_class is empty: no class to sample from")
        tensors = [t.unsqueeze(1) if t.dim() == 3 else t for t in per_class]
        counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return LabelledImages(torch.cat(tensors), offsets, tuple(names))

    @staticmethod
    def from_alphabets(images: Mapping[str, Sequence[Tensor]], alphabets: Sequence[str]
                       ) -> LabelledImages:
        """Every character of ``alphabets`` (``data.load_alphabets`` output) as a class,
        named ``<alphabet>/<character index>``."""
        missing = sorted(set(alphabets) - set(images))
        if missing:
            raise ValueError(f"alphabets {missing} are not in the data ({sorted(images)})")
        per_class, names = [], []
        for alphabet in alphabets:
            for c, drawings in enumerate(images[alphabet]):
                per_class.append(drawings)
                names.append(f"{alphabet}/{c}")
        return LabelledImages.from_lists(per_class, names)

    def resized(self, size: int) -> LabelledImages:
        """A copy with ``size x size`` images (area averaging down, bilinear up)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image_size={size!r} must be a positive integer")
        h, w = self.images.shape[-2:]
        if (h, w) == (size, size):
            return self
        x = self.images.float()
        mode = "area" if size <= min(h, w) else "bilinear"
        out = F.interpolate(x, size=(size, size), mode=mode,
                            **({} if mode == "area" else {"align_corners": False}))
        return LabelledImages(out.round().clamp(0, 255).to(torch.uint8), self.offsets,
                              self.names)


@dataclass(frozen=True)
class FewShotSplit:
    """Which classes serve which role (saved as ``split.json``).

    Attributes:
        seed: the seed of the split (Omniglot) or ``None`` (an image folder's fixed splits).
        train, val, test: alphabet names (Omniglot) or split folder names (image folder).
        classes: number of classes per role (before rotation augmentation).
    """

    seed: int | None
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    classes: dict[str, int]

    def to_json(self) -> str:
        """The split as JSON."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def split_alphabets(names: Sequence[str], *, seed: int, num_train: int, num_val: int,
                    num_test: int) -> tuple[list[str], list[str], list[str]]:
    """``(train, val, test)`` alphabets: one ``random.Random(seed)`` shuffle of the sorted names,
    test first, then validation, then training, exactly the order of ``data.make_split``, so a
    seed puts the same alphabets in the same roles in both protocols (when every alphabet is
    eligible there)."""
    for name, value in (("num_train", num_train), ("num_val", num_val),
                        ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")
    needed = num_train + num_val + num_test
    if needed > len(names):
        raise ValueError(f"num_train + num_val + num_test = {needed} alphabets, but the data "
                         f"have {len(names)} ({sorted(names)}); lower --num_pretrain/--num_val/"
                         "--num_test")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return (order[num_test + num_val:needed], order[num_test:num_test + num_val],
            order[:num_test])


# -- image folders ----------------------------------------------------------------------------

def _listing(folder: Path) -> list[tuple[str, list[Path]]]:
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a directory; an image-folder dataset is laid "
                         "out as root/<split>/<class>/*.png|jpg|jpeg (e.g. root/train/n01532829/"
                         "a.jpg); pass --root DIR holding train/, val/ and test/")
    loose = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise ValueError(f"{str(folder)!r} holds images directly ({loose[:3]}...); put each "
                         "class's images in its own folder: <split>/<class>/*.png")
    classes = []
    for c in sorted(p for p in folder.iterdir() if p.is_dir()):
        # Links to nothing are listed too, so that decoding names them instead of a class
        # silently losing an image.
        files = sorted(f for f in c.iterdir() if (f.is_file() or f.is_symlink())
                       and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {str(c)!r} has no .png/.jpg/.jpeg image; remove it "
                             "or add its images")
        classes.append((c.name, files))
    if not classes:
        raise ValueError(f"{str(folder)!r} has no class folders; expected "
                         "<split>/<class>/*.png|jpg|jpeg")
    return classes


def _decode_image(path: Path, size: int, channels: str) -> np.ndarray:
    img = read_image(path).convert("RGB" if channels == "rgb" else "L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(root: str | os.PathLike, split: str, *, image_size: int,
                      channels: str = "rgb", cache_dir: str | os.PathLike | None = None,
                      notes: list[str] | None = None) -> LabelledImages:
    """The classes of ``root/<split>/`` (one folder each, ``*.png|jpg|jpeg`` inside).

    Decoded once with PIL (any mode, by appearance: ``images.read_image``; then ``RGB`` or
    ``L``), resized to ``image_size x image_size`` (``LANCZOS``) and cached as ``uint8`` in
    ``fewshot_cache_<split>_<key>.pt`` (``images.load_cached``: atomic write with a checksum,
    ``weights_only=True`` load, the key over every image's content, the size and the channels;
    a damaged cache is decoded again).

    Args:
        root: the dataset folder.
        split: ``"train"``, ``"val"`` or ``"test"`` (any sub-folder name).
        image_size: output height and width.
        channels: ``"rgb"`` (3 channels) or ``"grey"`` (1).
        cache_dir: where the cache lives (default ``root``, or when that is not private to this
            user or cannot be written ``data.fallback_cache_dirs()``, or memory only).
        notes: if given, the ``note:`` line saying which cache was used is appended.

    Raises:
        ValueError: for a missing split folder, images outside class folders, an empty class
            folder or no class folder at all, and (naming the file) an image that cannot be
            decoded: empty, truncated, not an image, a link to nothing, a decompression bomb.
    """
    if channels not in CHANNELS:
        raise ValueError(f"channels={channels!r} must be one of {CHANNELS}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer")
    root = Path(root)
    classes = _listing(root / split)
    files = [(f"{name}/{f.name}", f) for name, class_files in classes for f in class_files]
    key = content_key(files, "image_folder", split, image_size, channels)
    counts = [len(class_files) for _, class_files in classes]
    depth = 3 if channels == "rgb" else 1

    def build() -> dict[str, Any]:
        per_class = [torch.from_numpy(np.stack([_decode_image(f, image_size, channels)
                                                for f in class_files]))
                     for _, class_files in classes]
        data = LabelledImages.from_lists(per_class, [name for name, _ in classes])
        return {"images": data.images, "offsets": data.offsets, "names": list(data.names)}

    def check(state: dict[str, Any]) -> str | None:
        images, offsets = state.get("images"), state.get("offsets")
        if state.get("names") != [name for name, _ in classes]:
            return "other classes than the folder"
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(
                images.shape) != (sum(counts), depth, image_size, image_size):
            return "images of another shape than the folder's"
        if not isinstance(offsets, Tensor) or offsets.tolist() != [
                sum(counts[:i]) for i in range(len(counts) + 1)]:
            return "class offsets that do not match the folder"
        return None

    folders, creatable = cache_candidates(root, cache_dir)
    state, note = load_cached(f"fewshot_cache_{split}_{key}.pt", folders, build, check,
                              created=creatable)
    if notes is not None:
        notes.append(note)
    return LabelledImages(state["images"], state["offsets"], tuple(state["names"]))


# -- episodes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpisodeIndices:
    """Which images a batch of episodes uses (indices into ``EpisodeSampler.images``).

    Attributes:
        classes: ``(E, ways)`` class ids (of the sampler's possibly rotated classes); column
            ``i`` gets label ``i``.
        support: ``(E, ways, shots)`` image indices.
        query: ``(E, ways, queries)`` image indices.
    """

    classes: Tensor
    support: Tensor
    query: Tensor

    def __len__(self) -> int:
        return self.classes.shape[0]


class EpisodeSampler:
    """N-way K-shot episodes from a ``LabelledImages``.

    Args:
        data: the classes.
        ways: classes per episode (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        rotations: add each class rotated by 90, 180, 270 degrees as 3 more classes
            (square images only; the copies are made once with ``torch.rot90``).
        device: where the images live and episodes are built.
        dtype: floating type of the episodes' images.
        mean, std: per-channel normalisation of the ``[0, 1]`` images (one value or one per
            channel); ``None``: ``x / 255`` only.
        exclude_small: leave out classes with fewer than ``shots + queries`` images (listed in
            ``excluded``) instead of raising.

    Raises:
        ValueError: for a bad count, a class too small (without ``exclude_small``), fewer usable
            classes than ``ways``, or bad ``mean``/``std``.
    """

    def __init__(self, data: LabelledImages, *, ways: int, shots: int, queries: int,
                 rotations: bool = False, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None,
                 exclude_small: bool = False) -> None:
        for name, value, low in (("ways", ways, 2), ("shots", shots, 1),
                                 ("queries", queries, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rotations = bool(rotations)
        self.device = torch.device(device)
        self.dtype = dtype
        need = shots + queries
        counts = data.counts
        small = {data.names[c]: int(counts[c]) for c in range(data.num_classes)
                 if counts[c] < need}
        if small and not exclude_small:
            name, count = next(iter(small.items()))
            raise ValueError(f"class {name!r} has {count} images but shots + queries = "
                             f"{shots} + {queries} = {need} are drawn from each class "
                             f"({len(small)} such classes); lower --shots/--queries, remove "
                             "those classes, or exclude them (exclude_small=True)")
        self.excluded: dict[str, int] = small
        keep = torch.tensor([c for c in range(data.num_classes) if counts[c] >= need],
                            dtype=torch.int64)
        num_rot = 4 if self.rotations else 1
        if keep.numel() * num_rot < ways:
            raise ValueError(f"ways={ways} classes per episode, but only {keep.numel()} classes "
                             f"have >= shots + queries = {need} images"
                             f"{' (x4 rotations)' if self.rotations else ''}; lower --ways "
                             "or add classes")
        images = data.images
        if self.rotations:
            if images.shape[-1] != images.shape[-2]:
                raise ValueError(f"rotations need square images, got {tuple(images.shape[-2:])}"
                                 "; resize them (image_size) or turn rotations off")
            images = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])
        m = data.images.shape[0]
        # class (rotation r, original class c) -> id r * len(keep) + position of c in keep
        starts = torch.cat([data.offsets[:-1][keep] + r * m for r in range(num_rot)])
        self.counts = counts[keep].repeat(num_rot)
        self.starts = starts
        self.names = tuple(f"{data.names[int(c)]}@{90 * r}" if self.rotations
                           else data.names[int(c)] for r in range(num_rot) for c in keep)
        self.images = images.to(self.device)
        self.num_classes = len(self.names)
        self.max_count = int(self.counts.max())
        self.mean = self._norm("mean", mean, images.shape[1], 0.0)
        self.std = self._norm("std", std, images.shape[1], 1.0)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std={std!r} must be positive")

    def _norm(self, name: str, value: Sequence[float] | float | None, channels: int,
              default: float) -> Tensor:
        values = [default] if value is None else (
            [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value])
        if len(values) not in (1, channels):
            raise ValueError(f"{name}={value!r} needs 1 or {channels} values (one per channel)")
        return torch.tensor(values, dtype=self.dtype, device=self.device).view(1, -1, 1, 1)

    def to_float(self, x: Tensor) -> Tensor:
        """``uint8`` images -> normalised floats: ``(x / 255 - mean) / std``."""
        return (x.to(self.dtype) / 255.0 - self.mean) / self.std

    def draw(self, count: int, generator: torch.Generator) -> EpisodeIndices:
        """The indices of ``count`` episodes, all drawn at once from ``generator`` (CPU).

        Classes: the first ``ways`` of an ``argsort`` of uniform keys (a uniformly random
        ordered subset). Images: per chosen class, ``argsort`` of uniform keys with the
        positions beyond the class's size pushed to the end, first ``shots + queries`` taken
        (a uniformly random subset without replacement, split into support and query).
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count={count!r} must be a positive integer")
        n, k, q = self.ways, self.shots, self.queries
        class_keys = torch.rand(count, self.num_classes, generator=generator)
        classes = class_keys.argsort(dim=1)[:, :n]
        image_keys = torch.rand(count, n, self.max_count, generator=generator)
        sizes = self.counts[classes]
        beyond = torch.arange(self.max_count) >= sizes.unsqueeze(-1)
        image_keys = image_keys.masked_fill(beyond, 2.0)  # keys are < 1: these sort last
        positions = image_keys.argsort(dim=-1)[..., :k + q]
        index = self.starts[classes].unsqueeze(-1) + positions
        return EpisodeIndices(classes, index[..., :k], index[..., k:])

    def task(self, indices: EpisodeIndices, i: int) -> Task:
        """Episode ``i`` of ``indices`` as a ``metazoo.Task`` on the sampler's device:
        ``support=[(xs, ys)]`` (``ways * shots`` images, class-major), ``query=(xq, yq)``."""
        n = self.ways
        labels = torch.arange(n, device=self.device)
        xs = self.to_float(self.images[indices.support[i].flatten().to(self.device)])
        xq = self.to_float(self.images[indices.query[i].flatten().to(self.device)])
        return Task([(xs, labels.repeat_interleave(self.shots))],
                    (xq, labels.repeat_interleave(self.queries)))

    def sample(self, count: int, generator: torch.Generator) -> list[Task]:
        """``count`` episodes drawn at once from ``generator``."""
        indices = self.draw(count, generator)
        return [self.task(indices, i) for i in range(count)]


def inner_batches(task: Task, batch_size: int, count: int, generator: torch.Generator) -> Task:
    """``task`` with its support cut into ``count`` mini-batches of ``batch_size`` images drawn
    without replacement, as the Reptile authors' ``_mini_batches(..., replacement=False)``
    (openai/supervised-reptile, ``supervised_reptile/reptile.py``): the support is shuffled, cut
    into consecutive batches, and shuffled again when it runs out, a batch that is still being
    filled continuing into the next shuffle. With 50 support images, batches of 10 and 5 steps
    every image is in exactly one batch; with 5 images and batches of 10 each batch holds every
    image twice (two shuffles).

    Inner step ``k`` trains on batch ``k`` (``Task.support[k % count]``). The shuffles are
    ``torch.randperm`` draws from ``generator`` (CPU), one per pass over the support and only as
    many as the ``count`` batches need, each applied to the previous pass's order (as
    ``random.shuffle`` shuffles the list in place). The query is unchanged.

    Args:
        task: an episode with one support batch (``EpisodeSampler.task``).
        batch_size: images per inner batch (``--inner_batch`` / ``--eval_inner_batch``).
        count: number of batches (the inner steps).
        generator: the random numbers of the shuffles.
    """
    if len(task.support) != 1:
        raise ValueError(f"inner_batches cuts one support batch, the task has "
                         f"{len(task.support)}")
    for name, value in (("batch_size", batch_size), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    xs, ys = task.support[0]
    n = xs.shape[0]
    passes = -(-batch_size * count // n)  # ceil: the shuffles the batches need
    passes_order, current = [], torch.arange(n)
    for _ in range(passes):  # like random.shuffle, each pass shuffles the previous pass's order
        current = current[torch.randperm(n, generator=generator)]
        passes_order.append(current)
    order = torch.cat(passes_order)[:batch_size * count].to(xs.device).view(count, batch_size)
    return Task([(xs[index], ys[index]) for index in order], task.query)


# -- results ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeanCI:
    """Mean over episodes with its 95% confidence interval ``mean +- ci95``.

    Attributes:
        mean: the mean.
        ci95: ``1.96 * std / sqrt(n)``.
        std: standard deviation over episodes (``ddof=0``).
        n: number of episodes.
    """

    mean: float
    ci95: float
    std: float
    n: int


def mean_ci(values: Sequence[float]) -> MeanCI:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (normal approximation,
    the convention of few-shot papers; ``std`` with ``ddof=0`` as in the MAML code).

    Raises:
        ValueError: if ``values`` is empty or holds a non-finite number.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("values is empty: no episode to average")
    if not np.isfinite(x).all():
        raise ValueError(f"values hold non-finite numbers ({x[~np.isfinite(x)][:3].tolist()})")
    std = float(x.std())
    return MeanCI(float(x.mean()), 1.96 * std / math.sqrt(x.size), std, int(x.size))
