"""Scratch directories owned by one process, cleaned up after it dies by proof, not by guess.

A disk ``ReplayBuffer`` writes its states into a fresh directory (``tempfile.mkdtemp``). The
process that made it holds an exclusive ``fcntl.flock`` on the directory's lock file for as
long as it lives; the kernel drops the lock when the process dies, however it dies (SIGKILL
included), in whatever PID namespace or container it ran. The lock file is also the
directory's manifest: before each file is written its name is appended there, so the files
that a buffer wrote are known exactly.

A later buffer removes a directory only when it can take that lock itself (so no process owns
it any more), and then deletes only the files the manifest lists, the manifest, and the
directory if nothing else is left in it. Nothing is judged by a process id or by a file name's
shape: a directory without a readable manifest, or whose lock is held, is left alone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # not a POSIX system: no locks, so no clean-up of other processes' folders
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "ScratchDirectory", "remove_abandoned"]

#: The lock file (and manifest) inside every scratch directory.
LOCK_NAME = "owner.lock"
#: Its first line: says which program wrote the manifest that follows.
_HEADER = "warpgrad replay buffer: files written (one per line), locked while the owner lives\n"


class ScratchDirectory:
    """A new directory under ``parent``, locked by this process until ``remove()`` or exit.

    Args:
        parent: the existing directory to create it in.
        prefix: start of the directory's name (``tempfile.mkdtemp`` adds a random part).
    """

    def __init__(self, parent: str, prefix: str) -> None:
        self.path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        self._pid = os.getpid()
        lock = os.path.join(self.path, LOCK_NAME)
        self._file = open(lock, "a", encoding="utf-8")  # noqa: SIM115 (held for the lifetime)
        if fcntl is not None:
            # Blocking: a cleaner that opened the new, still empty file a moment ago holds it
            # only until it has seen there is no header, then lets go.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        self._file.write(_HEADER)
        self._file.flush()
        self._written: list[str] = []

    def file(self, name: str) -> str:
        """Records ``name`` in the manifest (before it is written) and returns its path.

        Raises:
            ValueError: ``name`` is not a plain file name or is the lock file's.
        """
        if os.path.basename(name) != name or name in ("", ".", "..", LOCK_NAME) or "\n" in name:
            raise ValueError(f"scratch file name {name!r} must be a plain file name")
        self._file.write(name + "\n")
        self._file.flush()  # in the kernel's hands: survives the process being killed
        self._written.append(name)
        return os.path.join(self.path, name)

    def forget_written(self) -> None:
        """Empties the manifest after the owner deleted every file it lists (keeps it short)."""
        if os.getpid() != self._pid or self._file.closed:
            return
        self._file.truncate(len(_HEADER.encode()))
        self._written.clear()

    def remove(self) -> None:
        """Deletes the files this directory's owner wrote, the manifest, then the directory if
        it is empty. Only in the process that created it (a forked child does nothing)."""
        if os.getpid() != self._pid or self._file.closed:
            return
        _remove_listed(self.path, self._written)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.path, LOCK_NAME))
        self._file.close()  # releases the lock
        with contextlib.suppress(OSError):
            os.rmdir(self.path)  # left in place if someone put other files there


def _remove_listed(directory: str, names: list[str]) -> None:
    for name in names:
        if os.path.basename(name) != name or name in ("", ".", "..", LOCK_NAME):
            continue  # not a name this module writes: never follow it out of the directory
        path = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(path)


def _candidates(parent: str, prefix: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                yield entry.path


def remove_abandoned(parent: str, prefix: str) -> list[str]:
    """Removes the scratch directories under ``parent`` whose owner has died.

    A directory counts only if its lock can be taken now (its owner is gone) and its lock file
    carries this module's manifest header; then the files the manifest lists are deleted, the
    manifest too, and the directory if nothing else is left. Anything unreadable, locked, or
    without a manifest is left as it is.

    Args:
        parent: the directory to look in.
        prefix: the scratch directories' name prefix (which directories to look at; what is
            deleted is decided by the lock and the manifest alone).

    Returns:
        The directories removed entirely.
    """
    if fcntl is None:
        return []
    removed = []
    for directory in _candidates(parent, prefix):
        lock = os.path.join(directory, LOCK_NAME)
        try:
            # O_NOFOLLOW: a planted symlink named like the lock is not followed.
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as file:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: the owner is alive
            try:
                if os.stat(lock, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                    continue  # removed and replaced meanwhile: not the file that was locked
                lines = file.read().split("\n")
            except OSError:
                continue
            if not lines or lines[0] + "\n" != _HEADER:
                continue  # not a manifest this module wrote (or still empty): not ours to judge
            _remove_listed(directory, [name for name in lines[1:] if name])
            with contextlib.suppress(OSError):
                os.unlink(lock)
        try:
            os.rmdir(directory)
        except OSError:
            continue
        removed.append(directory)
    return removed
