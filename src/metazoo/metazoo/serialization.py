"""Writing files so that a crash never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_save", "atomic_write_text"]


def _atomic_write(write: Callable[[IO[bytes]], object], path: str | os.PathLike[str],
                  durable: bool) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes owner-only files; results are shared
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike[str], *, durable: bool = True) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` onto ``path``.

    A crash or an exception mid-write leaves the previous file at ``path`` intact and no
    temporary file behind; readers never see a truncated file.

    Args:
        obj: what to save (state dicts: tensors and plain containers, so that
            ``torch.load(path, weights_only=True)`` reads it back).
        path: the destination; its folder is created if needed.
        durable: ``fsync`` before the rename, so the file survives a power loss too. Scratch
            files that die with the process (replay buffers) can skip the cost.
    """
    _atomic_write(lambda file: torch.save(obj, file), path, durable)


def atomic_write_text(text: str, path: str | os.PathLike[str], *, durable: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` the way :func:`atomic_save` writes: all or nothing.

    Used for logs that a resumed run rewrites (truncated to its checkpoint) and for result
    files: a kill mid-write must not lose the lines already there.
    """
    _atomic_write(lambda file: file.write(text.encode("utf-8")), path, durable)
