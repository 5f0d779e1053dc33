"""Writing files so that a crash never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["CHECKSUM_KEY", "atomic_save", "atomic_write_text", "load_checked", "save_checked",
           "state_digest"]

CHECKSUM_KEY = "sha256"


def _atomic_write(write: Callable[[IO[bytes]], object], path: str | os.PathLike[str],
                  durable: bool, temporary: str | os.PathLike[str] | None = None) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if temporary is None:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                             suffix=".tmp")
    else:  # a name the caller chose (and recorded) beforehand, in the same folder
        if Path(temporary).parent.resolve() != target.parent.resolve():
            raise ValueError(f"temporary {os.fspath(temporary)} must be in the folder of "
                             f"{os.fspath(path)}: os.replace is atomic within one file system")
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         0o600)
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


def atomic_save(obj: Any, path: str | os.PathLike[str], *, durable: bool = True,
                temporary: str | os.PathLike[str] | None = None) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` onto ``path``.

    A crash or an exception mid-write leaves the previous file at ``path`` intact and no
    temporary file behind; readers never see a truncated file.

    Args:
        obj: what to save (state dicts: tensors and plain containers, so that
            ``torch.load(path, weights_only=True)`` reads it back).
        path: the destination; its folder is created if needed.
        durable: ``fsync`` before the rename, so the file survives a power loss too. Scratch
            files that die with the process (replay buffers) can skip the cost.
        temporary: the temporary file's path (in ``path``'s folder). By default a fresh,
            randomly named ``.<name>.<random>.tmp``; ``metazoo.runs.RunFolder`` passes a name
            it recorded in its manifest first, so that what a killed write leaves behind is
            known to be the run's.
    """
    _atomic_write(lambda file: torch.save(obj, file), path, durable, temporary)


def atomic_write_text(text: str, path: str | os.PathLike[str], *, durable: bool = True,
                      temporary: str | os.PathLike[str] | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` the way :func:`atomic_save` writes: all or nothing.

    Used for logs that a resumed run rewrites (truncated to its checkpoint) and for result
    files: a kill mid-write must not lose the lines already there. ``temporary`` as in
    :func:`atomic_save`.
    """
    _atomic_write(lambda file: file.write(text.encode("utf-8")), path, durable, temporary)


def state_digest(obj: Any) -> str:
    """SHA-256 of a state dict's content: keys, scalars, and every tensor's dtype, shape and
    bytes, in a fixed order (the same for the object before saving and after loading)."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__}{len(obj)}|".encode())
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(f"{type(obj).__name__}:{obj!r}|".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}; state dicts hold tensors, "
                        "numbers, strings and containers of them")


def save_checked(state: dict[str, Any], path: str | os.PathLike[str], *,
                 durable: bool = True, temporary: str | os.PathLike[str] | None = None) -> None:
    """:func:`atomic_save` of ``state`` plus a ``"sha256"`` entry over its content, which
    :func:`load_checked` verifies: a bit flipped on disk is refused instead of resumed.

    The file stays a plain state dict (``torch.load(path, weights_only=True)`` reads it).
    ``temporary`` as in :func:`atomic_save`.
    """
    if CHECKSUM_KEY in state:
        raise ValueError(f"state already has a {CHECKSUM_KEY!r} entry; that key is reserved")
    atomic_save({**state, CHECKSUM_KEY: state_digest(state)}, path, durable=durable,
                temporary=temporary)


def load_checked(path: str | os.PathLike[str], *, require: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` onto the CPU, verifying the checksum that
    :func:`save_checked` stored (and removing it from the returned dict).

    Args:
        path: the file.
        require: refuse a file without a checksum (files written before checksums were
            stored are accepted by default).

    Raises:
        ValueError: if the file cannot be read as a state dict, or its content does not match
            its checksum (a damaged file), or ``require`` and it has none.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip and pickle errors of every kind mean a damaged file
        if "Weights only load failed" in str(err):
            raise  # an unsafe pickle: keep torch's own explanation
        raise ValueError(f"{os.fspath(path)} cannot be read as a checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); it is damaged or "
                         "not a checkpoint") from err
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)} holds a {type(state).__name__}, not a state dict")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        if require:
            raise ValueError(f"{os.fspath(path)} has no checksum")
        return state
    if stored != state_digest(state):
        raise ValueError(f"{os.fspath(path)} does not match its checksum: the file was damaged "
                         "or edited after it was written")
    return state
