"""Reading image files right in every mode PIL opens, and caching decoded images safely.

Decoding (``read_image``): every file becomes a loaded PIL image in mode ``"L"`` (grey) or
``"RGB"`` with the appearance it has in an image viewer:

- ``1`` (bilevel), ``L``: as they are (``1`` is kept as ``1`` for a binary resize).
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``) and ``I`` (32-bit integers, which PIL gives for
  16-bit data of some formats): scaled from ``0..65535`` to ``0..255`` (PIL's own ``convert``
  clips them at 255, so a 16-bit drawing would decode almost white); ``I`` values outside
  ``0..65535`` are refused naming the file. ``F`` (32-bit float) must lie in ``[0, 1]``.
- Palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to ``RGB``.
- Transparency (``LA``, ``RGBA``, ``PA``, ``La``, ``RGBa``, a palette or grey image with a
  transparent colour): composited onto white, the drawings' background, instead of dropping
  the alpha channel (which shows whatever colour the transparent pixels happen to hold).

A file that cannot be decoded (empty, truncated, not an image, a link to nothing, more pixels
than PIL's decompression-bomb limit) raises one ``ValueError`` naming it.

Caching (``load_cached``): decoded images are stored with ``torch.save`` and read with
``weights_only=True`` from one folder: the first of the candidates that is owned by this user,
not writable by group or others, and writable. The file's name carries a key computed from the
content of every source file (SHA-256), the decoder's version and the decoding options, so an
edited, replaced or renamed image is decoded again, whatever its size and time stamp. The file
holds a checksum of its content (``metazoo.save_checked``) and is checked against the listing
(names, counts, shapes) when read: a truncated, damaged or foreign cache is decoded again and
rewritten. Each load returns one ``note:`` line saying which cache was used and how, for the
experiment to log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from metazoo.serialization import load_checked, save_checked

__all__ = ["DECODER_VERSION", "content_key", "load_cached", "read_image", "standard_image"]

#: Part of every cache key: raise it when decoding changes, so older caches are not read.
DECODER_VERSION = "images-2"

_GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
_WHITE = 255


def standard_image(img: Image.Image) -> Image.Image:
    """``img`` in mode ``"1"``, ``"L"`` or ``"RGB"`` with the same appearance (module docstring).

    Raises:
        ValueError: integer pixels outside ``0..65535`` or float pixels outside ``[0, 1]``
            (their meaning is unknown); the caller adds the file's name.
    """
    mode = img.mode
    transparent = "A" in mode or "a" in mode or "transparency" in img.info
    if mode in ("1", "L", "RGB") and not transparent:
        return img
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img).astype(np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if values.size and (values.min() < 0 or values.max() > top):
            raise ValueError(f"mode {mode} pixels span {values.min():g}..{values.max():g}, "
                             f"outside 0..{top:g}; save it as an 8- or 16-bit image")
        scaled = np.round(np.nan_to_num(values, nan=0.0) / top * 255.0).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    if transparent:
        grey = mode in _GREY_MODES
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (_WHITE, _WHITE, _WHITE, 255))
        flat = Image.alpha_composite(background, rgba).convert("RGB")
        return flat.convert("L") if grey else flat
    return img.convert("RGB")


def read_image(path: str | os.PathLike[str], *, fix: str = "") -> Image.Image:
    """The image at ``path``, loaded and in mode ``"1"``, ``"L"`` or ``"RGB"``.

    Args:
        path: the file.
        fix: what to do about a file that cannot be read (default: replace or remove it).

    Raises:
        ValueError: one line naming the file, what is wrong with it and ``fix``.
    """
    name = os.fspath(path)
    try:
        return _read_image(name)
    except ValueError as err:
        if not fix:
            raise
        raise ValueError(f"{str(err).rsplit('; ', 1)[0]}; {fix}") from None


def _read_image(name: str) -> Image.Image:
    if os.path.islink(name) and not os.path.exists(name):
        raise ValueError(f"{name} is a link to a missing file ({os.readlink(name)}); restore "
                         f"the file it points to or remove the link")
    try:
        size = os.path.getsize(name)
    except OSError as err:
        raise ValueError(f"{name} cannot be read ({err.strerror}); check the file") from None
    if size == 0:
        raise ValueError(f"{name} is empty (0 bytes); replace it with the image or remove it")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its pixel limit and twice that: refuse both alike.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as img:
                img.load()
                return standard_image(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name} is refused as a decompression bomb ({err}); if the image is "
                         f"genuine, shrink it first") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not an image PIL can read; replace it or remove it"
                         ) from None
    except (OSError, SyntaxError, ValueError) as err:
        kind = "truncated or damaged" if "truncated" in str(err) or isinstance(
            err, (OSError, SyntaxError)) else "not readable"
        raise ValueError(f"{name} is {kind} ({type(err).__name__}: {err}); replace it with an "
                         f"intact copy or remove it") from None


# -- the cache -----------------------------------------------------------------------------------


def content_key(files: Iterable[tuple[str, str | os.PathLike[str]]], *options: object) -> str:
    """A key over the content of ``files`` (``(label, path)`` pairs, in order) and ``options``.

    Raises:
        ValueError: a file cannot be read (named).
    """
    digest = hashlib.sha256(f"{DECODER_VERSION}\n{options!r}\n".encode())
    for label, path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            if os.path.islink(path) and not os.path.exists(path):
                raise ValueError(f"{os.fspath(path)} is a link to a missing file "
                                 f"({os.readlink(path)}); restore the file it points to or "
                                 f"remove the link") from None
            raise ValueError(f"{os.fspath(path)} cannot be read ({err.strerror}); check the "
                             f"file") from None
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:24]


def _private(folder: Path, *, create: bool) -> str | None:
    """Why ``folder`` must not hold caches (``None``: it is this user's, writable by no one else).
    With ``create``, a missing folder is made, readable by this user only."""
    if create and not folder.exists():
        with contextlib.suppress(OSError):
            folder.mkdir(mode=0o700, parents=True)
    try:
        info = folder.stat()
    except OSError:
        return "does not exist"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.getuid():
        return f"belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by other users"
    return None


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed from permission bits)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def load_cached(name: str, candidates: Iterable[Path], build: Callable[[], dict[str, Any]],
                check: Callable[[dict[str, Any]], str | None], *, created: Iterable[Path] = ()
                ) -> tuple[dict[str, Any], str]:
    """The state dict cached as ``name`` in the first usable folder, or ``build()`` (cached).

    Args:
        name: the cache file's name (its key included).
        candidates: folders in order of preference; the first that is this user's, private
            and writable is used (see the module docstring); the others are never read.
        build: decodes the images into a state dict of tensors.
        check: ``None`` when a loaded state fits the sources, else what is wrong with it.
        created: candidates that may be created (private) when missing.

    Returns:
        The state and one ``note:`` line saying which cache was used and how.
    """
    refused = []
    may_create = set(created)
    for folder in candidates:
        problem = _private(folder, create=folder in may_create)
        if problem is None and not _writable(folder):
            problem = "is not writable"
        if problem is not None:
            refused.append(f"{folder} {problem}")
            continue
        path = folder / name
        why = f" ({'; '.join(refused)})" if refused else ""
        damage = None
        if path.exists() or path.is_symlink():
            cached, damage = _read(path, check)
            if cached is not None:
                return cached, f"note: images read from cache {path}{why}"
        state = build()
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # a damaged file, or a link: replaced, never followed
        save_checked(state, path, durable=False)
        if damage is not None:
            return state, f"note: cache {path} was unusable ({damage}): decoded again and rewritten"
        return state, f"note: images decoded and cached in {path}{why}"
    state = build()
    return state, (f"note: images decoded and kept in memory only, decoded again next run (no "
                   f"usable cache folder: {'; '.join(refused)})")


def _read(path: Path, check: Callable[[dict[str, Any]], str | None]
          ) -> tuple[dict[str, Any] | None, str | None]:
    """The cache at ``path`` if it is sound, else ``None`` and what is wrong with it."""
    try:
        info = path.lstat()
    except OSError as err:
        return None, f"cannot be read: {err.strerror}"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None, "not written by this user, or writable by others"
    try:
        state = load_checked(path, require=True)
    except Exception as err:  # zip, pickle, checksum: all mean the file is not a usable cache
        return None, str(err).splitlines()[0] if str(err) else type(err).__name__
    problem = check(state)
    return (None, problem) if problem is not None else (state, None)
