"""Omniglot as tensors: discovery, a cached decode, the seeded split and augmented task batches.

Protocol (Leap and WarpGrad papers): each alphabet is one task, a ``classes``-way classification
of ``classes`` of its characters (alphabets with fewer characters are dropped), with
``train_images`` drawings per character for adaptation and the rest held out. Everything random
in the split (which alphabets go where, which characters, which drawings are held out) is drawn
from ``random.Random(seed)`` over sorted listings, so the seed alone fixes it.

Images are decoded once with PIL (any mode, by appearance: ``images.read_image``) into a
``uint8`` cache (``<root>/omniglot_cache_<key>.pt``, written atomically with a checksum, loaded
with ``weights_only=True``; the key covers the content of every drawing, so an edited drawing is
decoded again). When ``root`` is read-only or not private to this user, the cache goes to the
user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, ``metazoo/omniglot``), else a private
folder in the temporary folder, else memory; a damaged cache is decoded again; each load gives
one ``note:`` line saying which cache was used (``notes``). Strokes are 1 and background 0 (the
PNGs are black on white), so the zero padding of the affine augmentation is background.

Two resize modes:

- ``"area"`` (default): area averaging from 105x105 to 28x28, kept as grey levels. Thin strokes
  survive the 3.75x reduction instead of breaking up as they do under nearest-neighbour
  sampling.
- ``"nearest"``: the reference's binary 28x28 images. Its ``resize.py`` called
  ``Image.resize((28, 28), resample=LANCZOS)`` on the mode ``'1'`` drawings, and Pillow resizes
  mode ``'1'`` with nearest-neighbour whatever ``resample`` says.

Augmentation (rotation 0-360 degrees, translation up to 0.2 of the image, scale 0.8-1.2) runs as
batched ``grid_sample`` calls on the run's device (``augment``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from images import content_key, load_cached, read_image

__all__ = [
    "RESIZE_MODES",
    "Alphabet",
    "Split",
    "TaskSampler",
    "augment",
    "decode_drawing",
    "find_alphabets",
    "load_alphabets",
    "make_split",
]

RESIZE_MODES = ("area", "nearest")
IMAGE_SIZE = 28


@dataclass(frozen=True)
class Alphabet:
    """One alphabet's characters as paths (sorted)."""

    name: str
    characters: tuple[tuple[str, tuple[str, ...]], ...]  # (character name, image paths)


def _is_alphabet(path: Path) -> bool:
    return any(c.is_dir() and any(f.suffix == ".png" for f in c.iterdir())
               for c in path.iterdir() if c.is_dir())


def find_alphabets(root: str | os.PathLike) -> list[Alphabet]:
    """Finds every alphabet folder (``<Alphabet>/<character>/*.png``) under ``root``.

    Any archive layout works (``images_background``, ``images_evaluation``, the small archives,
    several side by side, any subset of alphabets). An alphabet present in two archives (Greek
    and Latin are in both small archives) is kept once, from the first path in sorted order.

    Raises:
        ValueError: if ``root`` holds no alphabet.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a directory; run `bash make_omniglot.sh -d "
                         "--source ../shared/data/omniglot` or pass --root DIR")
    found: dict[str, Alphabet] = {}
    for dirpath, dirnames, _ in sorted(os.walk(root)):
        dirnames.sort()
        path = Path(dirpath)
        if path == root or not _is_alphabet(path) or path.name in found:
            continue
        chars = []
        for c in sorted(p for p in path.iterdir() if p.is_dir()):
            images = tuple(sorted(str(f) for f in c.iterdir() if f.suffix == ".png"))
            if images:
                chars.append((c.name, images))
        found[path.name] = Alphabet(path.name, tuple(chars))
        dirnames.clear()  # character folders are not alphabets
    if not found:
        raise ValueError(f"no Omniglot alphabet (<Alphabet>/<character>/*.png) under "
                         f"{str(root)!r}; run `bash make_omniglot.sh -d --source "
                         "../shared/data/omniglot` or pass --root DIR")
    return sorted(found.values(), key=lambda a: a.name)


def decode_drawing(path: str, resize: str) -> np.ndarray:
    """One Omniglot PNG as a (28, 28) uint8 ink image (255 = ink), resized like the cache.

    Any image mode PIL reads is decoded by its appearance (``images.read_image``: 16-bit grey
    scaled, transparency composited onto white, palettes and CMYK converted). The one-shot
    benchmark decodes its runs with this too, so both match exactly.

    Raises:
        ValueError: naming the file, if it is not a readable image (empty, truncated, not an
            image, a link to nothing or to a folder, a decompression bomb).
    """
    img = read_image(path, fix="replace it with the drawing from the official archive")
    if resize == "nearest":
        # Binary, as the reference's mode '1' drawings: grey images are thresholded at half
        # intensity (not dithered, which would scatter ink dots over the background).
        binary = img if img.mode == "1" else img.convert("L").convert(
            "1", dither=Image.Dither.NONE)
        small = binary.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
        ink = 1.0 - np.asarray(small.convert("L"), dtype=np.float32) / 255.0
    else:
        ink = 1.0 - np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        ink = F.adaptive_avg_pool2d(torch.from_numpy(ink)[None, None],
                                    IMAGE_SIZE)[0, 0].numpy()
    return np.round(ink * 255.0).astype(np.uint8)


def fallback_cache_dirs() -> list[Path]:
    """Where the decoded images are cached when ``root`` cannot hold the cache (read-only, or
    not private to this user): the user's cache folder, then a private folder in the temporary
    folder."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [user / "metazoo" / "omniglot",
            Path(tempfile.gettempdir()) / f"metazoo-omniglot-{os.getuid()}"]


def cache_candidates(root: str | os.PathLike, cache_dir: str | os.PathLike | None
                     ) -> tuple[list[Path], list[Path]]:
    """(folders to try for a cache, in order; those of them that may be created)."""
    if cache_dir is not None:
        return [Path(cache_dir)], [Path(cache_dir)]
    fallbacks = fallback_cache_dirs()
    return [Path(root), *fallbacks], fallbacks


def load_alphabets(root: str | os.PathLike, *, resize: str = "area",
                   cache_dir: str | os.PathLike | None = None,
                   notes: list[str] | None = None) -> dict[str, list[Tensor]]:
    """All alphabets as ``{name: [uint8 tensor (drawings, 28, 28) per character]}``.

    Decoded once; later calls read the cache (``images.load_cached``), keyed by the resize mode
    and the content of every drawing (an edited drawing is decoded again), used only from a
    folder private to this user and decoded again if it is damaged.

    Args:
        root: folder holding extracted archives.
        resize: ``"area"`` or ``"nearest"`` (see the module docstring).
        cache_dir: where the cache lives (default ``root``, or when that is not private to this
            user or cannot be written ``fallback_cache_dirs()``, or memory only).
        notes: if given, the ``note:`` line saying which cache was used is appended (for the
            experiment to log).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r} must be one of {RESIZE_MODES}")
    alphabets = find_alphabets(root)
    files = [(f"{a.name}/{c}/{Path(p).name}", p)
             for a in alphabets for c, paths in a.characters for p in paths]
    key = content_key(files, "omniglot", resize)
    shapes = {a.name: [len(paths) for _, paths in a.characters] for a in alphabets}

    def build() -> dict[str, Any]:
        return {a.name: [torch.from_numpy(np.stack([decode_drawing(p, resize) for p in paths]))
                         for _, paths in a.characters] for a in alphabets}

    def check(state: dict[str, Any]) -> str | None:
        if sorted(state) != sorted(shapes):
            return "other alphabets than the data"
        for name, counts in shapes.items():
            got = state[name]
            if not isinstance(got, list) or [getattr(t, "shape", None) for t in got] != [
                    (n, IMAGE_SIZE, IMAGE_SIZE) for n in counts] or any(
                    t.dtype != torch.uint8 for t in got):
                return f"alphabet {name!r} does not match its drawings"
        return None

    folders, creatable = cache_candidates(root, cache_dir)
    data, note = load_cached(f"omniglot_cache_{key}.pt", folders, build, check,
                             created=creatable)
    if notes is not None:
        notes.append(note)
    return data


@dataclass(frozen=True)
class Split:
    """The seeded split: alphabets per role, their characters and held-out drawings.

    Attributes:
        seed: the seed that produced it.
        train, val, test: alphabet names (meta-train, meta-validation, meta-test).
        characters: per alphabet, the indices (into its sorted characters) of the task's classes.
        train_images: per alphabet, per class, indices of the drawings used for adaptation; the
            remaining drawings of that character are held out.
    """

    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    characters: dict[str, list[int]]
    train_images: dict[str, list[list[int]]]

    def to_json(self) -> str:
        """The split as JSON (what is saved beside the logs)."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def make_split(num_characters: dict[str, int], num_drawings: dict[str, list[int]], *, seed: int,
               num_train: int, num_val: int, num_test: int, classes: int = 20,
               train_images: int = 15) -> Split:
    """Draws the split from ``seed`` alone.

    Args:
        num_characters: characters per alphabet.
        num_drawings: drawings per character, per alphabet.
        seed: the only source of randomness.
        num_train, num_val, num_test: alphabets per role (test first, then val, then train
            from one shuffle of the sorted eligible names).
        classes: classes per task; alphabets with fewer characters are dropped.
        train_images: drawings per character for adaptation; the rest are held out.
    """
    for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0),
                             ("num_test", num_test, 0), ("classes", classes, 2),
                             ("train_images", train_images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    eligible = sorted(a for a, n in num_characters.items() if n >= classes)
    needed = num_train + num_val + num_test
    if needed > len(eligible):
        raise ValueError(f"num_train + num_val + num_test = {needed} alphabets, but only "
                         f"{len(eligible)} have >= {classes} characters ({eligible}); lower "
                         "--num_pretrain/--num_val/--num_test or --classes")
    rng = random.Random(seed)
    order = eligible[:]
    rng.shuffle(order)
    test, val = order[:num_test], order[num_test:num_test + num_val]
    train = order[num_test + num_val:needed]
    characters: dict[str, list[int]] = {}
    images: dict[str, list[list[int]]] = {}
    for name in sorted(train + val + test):
        chosen = sorted(rng.sample(range(num_characters[name]), classes))
        characters[name] = chosen
        per_class = []
        for c in chosen:
            n = num_drawings[name][c]
            if n <= train_images:
                raise ValueError(f"alphabet {name!r} character {c} has {n} drawings; "
                                 f"train_images={train_images} leaves none held out")
            per_class.append(sorted(rng.sample(range(n), train_images)))
        images[name] = per_class
    return Split(seed, tuple(train), tuple(val), tuple(test), characters, images)


def augment(x: Tensor, generator: torch.Generator, *, rotation: float = 360.0,
            translation: float = 0.2, scale: tuple[float, float] = (0.8, 1.2)) -> Tensor:
    """Random affine augmentation of a batch ``(N, 1, H, W)`` with ``grid_sample``.

    The random parameters come from ``generator`` (on the CPU, so CPU and GPU runs draw the
    same numbers): one ``(N, 4)`` draw per call, whatever the device. The warp runs on
    ``x.device``; the sampling grid is the one ``F.affine_grid(align_corners=False)`` builds,
    computed with one 2-D matmul instead (``affine_grid``'s batched matmul with 3 columns per
    image took 3x the time of the sampling itself on a CPU; ``benchmarks/augment.py``).
    """
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    angle = u[:, 0] * math.radians(rotation)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    # translation is a fraction of the image size; affine_grid's coordinates span 2 units
    t = (u[:, 2:] * 2 - 1) * translation * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([cos, -sin, t[:, 0], sin, cos, t[:, 1]], 1).view(n, 2, 3)
    theta = theta.to(device=x.device, dtype=x.dtype)
    base = _base_grid(x.shape[-2], x.shape[-1], x.dtype, x.device)
    if x.device.type != "cpu":
        return _warp(x, theta, base)
    # On a CPU, chunks keep the grid and output in cache: 12,800 images in one piece ran about
    # 2x slower per image than chunks of 256 (the same arithmetic, the same result). Each
    # chunk is first copied into a small buffer: a sequential copy streams it into the cache,
    # where grid_sample's rotated reads would otherwise stall on memory (-15% at 12,800).
    out = torch.empty_like(x)
    staged = x.new_empty((min(n, _AUGMENT_CHUNK), *x.shape[1:]))
    for start in range(0, n, _AUGMENT_CHUNK):
        chunk = x[start:start + _AUGMENT_CHUNK]
        buffer = staged[:chunk.shape[0]].copy_(chunk)
        out[start:start + _AUGMENT_CHUNK] = _warp(buffer, theta[start:start + _AUGMENT_CHUNK],
                                                  base)
    return out


_AUGMENT_CHUNK = 256


@functools.lru_cache(maxsize=8)
def _base_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``affine_grid``'s homogeneous base coordinates ``(3, H * W)``: pixel centres in [-1, 1]
    (``align_corners=False``) as rows x, y, 1. Cached: building it was 7% of a 128-image call;
    it is only ever read."""
    xs = torch.linspace(-1, 1, w, dtype=dtype, device=device) * ((w - 1) / w)
    ys = torch.linspace(-1, 1, h, dtype=dtype, device=device) * ((h - 1) / h)
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w),
                        torch.ones(h, w, dtype=dtype, device=device)]).reshape(3, h * w)


def _warp(x: Tensor, theta: Tensor, base: Tensor) -> Tensor:
    """``grid_sample(x, affine_grid(theta))`` (bilinear, zero padding, align_corners=False)."""
    h, w = x.shape[-2:]
    # One (2N, 3) x (3, HW) matmul gives the grid as (N, 2, H, W); grid_sample reads the
    # permuted (N, H, W, 2) view as it is (making it contiguous cost more than it saved).
    grid = (theta.reshape(-1, 3) @ base).view(-1, 2, h, w).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class TaskSampler:
    """Builds task batches for one split on one device.

    Args:
        images: ``load_alphabets`` output.
        split: the split.
        device: where task tensors live and augmentation runs.
        dtype: floating type of the images.
        augment_images: apply ``augment`` to adaptation batches.
    """

    def __init__(self, images: dict[str, list[Tensor]], split: Split, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 augment_images: bool = True) -> None:
        self.split = split
        self.device = torch.device(device)
        self.dtype = dtype
        self.augment_images = augment_images
        self.train_x: dict[str, Tensor] = {}
        self.train_y: dict[str, Tensor] = {}
        self.held_x: dict[str, Tensor] = {}
        self.held_y: dict[str, Tensor] = {}
        for name, chars in split.characters.items():
            tx, ty, hx, hy = [], [], [], []
            for label, (c, keep) in enumerate(zip(chars, split.train_images[name])):
                drawings = images[name][c]
                held = [i for i in range(drawings.shape[0]) if i not in set(keep)]
                tx.append(drawings[keep])
                hx.append(drawings[held])
                ty += [label] * len(keep)
                hy += [label] * len(held)
            self.train_x[name] = self._float(torch.cat(tx))
            self.held_x[name] = self._float(torch.cat(hx))
            self.train_y[name] = torch.tensor(ty, device=self.device)
            self.held_y[name] = torch.tensor(hy, device=self.device)

    def _float(self, x: Tensor) -> Tensor:
        return (x.to(self.device, self.dtype) / 255.0).unsqueeze(1)

    def batches(self, name: str, *, steps: int, batch_size: int, generator: torch.Generator
                ) -> list[tuple[Tensor, Tensor]]:
        """``steps`` augmented batches of the alphabet's adaptation images.

        Indices follow the reference's sampler: ``randperm(steps * batch_size) % n``, so every
        image appears about equally often.
        """
        x, y = self.train_x[name], self.train_y[name]
        idx = torch.randperm(steps * batch_size, generator=generator) % x.shape[0]
        idx = idx.to(self.device)
        xs = x[idx]
        if self.augment_images:
            xs = augment(xs, generator)
        ys = y[idx]
        return list(zip(xs.split(batch_size), ys.split(batch_size)))

    def held_out(self, name: str) -> tuple[Tensor, Tensor]:
        """The alphabet's held-out drawings (not augmented)."""
        return self.held_x[name], self.held_y[name]

    def train_images(self, name: str) -> tuple[Tensor, Tensor]:
        """The alphabet's adaptation drawings, not augmented."""
        return self.train_x[name], self.train_y[name]

    def meta_batch(self, names: Sequence[str], size: int, rng: random.Random) -> list[str]:
        """``size`` meta-training alphabets: reshuffled passes over ``names`` (the reference's
        order)."""
        chosen: list[str] = []
        while len(chosen) < size:
            order = list(names)
            rng.shuffle(order)
            chosen += order
        return chosen[:size]
