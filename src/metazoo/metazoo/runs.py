"""Run folders: the one place that decides what an experiment's run may write, keep and delete.

A run folder holds what one run of an experiment wrote (logs, checkpoints, results). Every
experiment opens its folder through :class:`RunFolder`, which

* holds an exclusive OS file lock (``fcntl.flock`` on ``run.lock``) for the run's whole life.
  The kernel releases it when the process ends, however it ends (``kill -9`` included), so a
  stale lock never needs cleaning and the lock works across PID namespaces (containers); a
  second process is refused with one line naming the holder's host and pid;
* records in ``manifest.json`` every file the run writes, *before* it writes it, and the name
  of the temporary file each atomic write goes through. Only those files (and temporaries) are
  ever truncated, replaced or removed; a file that is in the folder but not in the manifest is
  the user's and is never touched. Ownership is never guessed from a name pattern or a pid;
* writes atomically (``metazoo.serialization``): a kill or a full disk mid-write leaves the
  previous version of the file intact. A failed write (``ENOSPC``, a read-only folder, torch's
  ``unexpected pos`` zip-writer error) is one :class:`RunFolderError` line saying that nothing
  was lost and how to continue;
* saves checkpoints with the flags that produced them and the producing program inside, and
  loads them checked: checksum, program, and every flag that may not change (a checkpoint
  without recorded flags is refused unless the caller passes ``trust_unrecorded=True``, which
  experiments expose as an explicit flag);
* validates logs line by line (:meth:`RunFolder.plan_rewrite`) before anything is rewritten,
  so an experiment checks everything a resume needs and only then changes files.

* records in ``machine.json`` what besides code and flags decides a run's floating-point
  results (:func:`machine`: torch's version, the CPU kind and the kernels ATen picked for it,
  threads, GPUs), once per start and once per resume (:meth:`RunFolder.record_machine`). CPU runs
  are bit-reproducible on the same machine kind only: ATen chooses its kernels, and so their
  rounding, by the CPU's capability (``AVX2``, ``AVX512``), and a resume on another kind
  continues a different floating-point trajectory.

Paths built from user input go through :func:`path_inside`, which refuses names that leave the
log folder (``..``, absolute paths, symbolic links pointing out).

The experiments (``src/omniglot/main.py``, ``src/maze_navigation/run.py``) decide *when* to
resume, restart or refuse; this module gives them the operations that make each decision safe.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from metazoo.cli import UsageError
from metazoo.serialization import atomic_write_text, load_checked, save_checked

__all__ = ["FLAGS_KEY", "LOCK_NAME", "MACHINE_KEYS", "MACHINE_NAME", "MANIFEST_NAME",
           "PRODUCER_KEY", "RunFolder", "RunFolderError", "RunLockedError", "flag_differences",
           "machine", "path_inside"]

LOCK_NAME = "run.lock"
MANIFEST_NAME = "manifest.json"
MACHINE_NAME = "machine.json"
# The entries of machine() that change floating-point results: two runs agree bit for bit only
# where these agree (the others, Python's version and the OS, are recorded to help a reader).
MACHINE_KEYS = ("torch", "cpu", "cpu_capability", "threads", "cuda")
# Entries that RunFolder.save_checkpoint adds to a checkpoint's state dict.
FLAGS_KEY = "flags"
PRODUCER_KEY = "producer"
_MANIFEST_FORMAT = 1


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What decides a run's floating-point results besides its code and flags.

    Returns:
        ``torch`` (version), ``cpu`` (model name), ``cpu_capability`` (the vector instruction
        set ATen dispatches CPU kernels for, ``torch.backends.cpu.get_cpu_capability()``),
        ``threads`` (``torch.get_num_threads()`` now), ``cuda`` (the visible GPUs' names, ``[]``
        without CUDA), ``python`` and ``platform``. A CPU run reproduces bit for bit where the
        :data:`MACHINE_KEYS` entries agree.
    """
    cuda = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"torch": torch.__version__, "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "cuda": cuda,
            "python": platform.python_version(), "platform": platform.platform()}


class RunFolderError(UsageError):
    """A run folder cannot be used as asked (locked, other flags, damaged, full disk...).

    A ``metazoo.cli.UsageError``: commands print it as one ``error:`` line (exit code 2).
    """


class RunLockedError(RunFolderError):
    """Another live process holds the run folder's lock."""


def path_inside(root: str | os.PathLike[str], *parts: str,
                flags: Iterable[str] | None = None) -> Path:
    """``root / part / ...``, refused if it would lead outside ``root``.

    Args:
        root: the log folder that every run folder must stay inside.
        parts: names from the user (``--meta_model``, ``--suffix``); each must be a non-empty
            relative path without ``..``.
        flags: the flag each part came from, for the error line (default ``part 1, 2...``).

    Raises:
        RunFolderError: naming the flag, the value and the fix, for an empty, absolute or
            ``..`` part, or a path that a symbolic link leads out of ``root``.
    """
    names = list(flags) if flags is not None else [f"part {i + 1}" for i in range(len(parts))]
    base = Path(root)
    for part, flag in zip(parts, names):
        if not part or Path(part).is_absolute() or ".." in Path(part).parts:
            raise RunFolderError(f"{flag} {part!r}: must be a relative name inside {root} "
                                 f"without '..' (e.g. {flag} run1), so that the run's files "
                                 "stay in the log folder")
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base.resolve()):
        raise RunFolderError(f"{', '.join(names)} {'/'.join(parts)!r}: {path} leads outside "
                             f"{root} (through a symbolic link); choose a name inside it")
    return path


def flag_differences(stored: Mapping[str, Any], now: Mapping[str, Any],
                     may_change: Iterable[str] = ()) -> list[str]:
    """``--flag stored -> now`` for every flag present in both records that differs and is
    not in ``may_change`` (flags only one record knows, from another version, are not
    compared)."""
    free = set(may_change)
    return [f"--{key} {stored[key]!r} -> {now[key]!r}" for key in sorted(stored)
            if key in now and key not in free and stored[key] != now[key]]


def _is_write_failure(err: RuntimeError) -> bool:
    """torch's zip writer reports a failed write (a full disk) as a RuntimeError."""
    text = str(err)
    return any(mark in text for mark in ("unexpected pos", "PytorchStreamWriter failed",
                                         "inline_container"))


class RunFolder:
    """The folder of one run: lock, manifest, atomic writes, checked checkpoints.

    Use it as a context manager (or call :meth:`open` and :meth:`close`); the lock is held
    until then, or until the process ends. Every write names a plain file of the folder
    (``"checkpoint.pt"``, ``"results_train.log"``); the first write of a name records it in
    the manifest, and is refused if a file of that name is already there and is not the run's.

    Args:
        path: the run folder (created, with its parents, on :meth:`open`).
        program: what writes it (``"omniglot"``): stored in the manifest and in checkpoints;
            a folder or checkpoint of another program is refused.
        resume_hint: how the user continues a run, for error lines
            (``"run the same command with --resume"``).
    """

    def __init__(self, path: str | os.PathLike[str], *, program: str,
                 resume_hint: str = "run the same command again to continue") -> None:
        self.path = Path(path)
        self.program = program
        self.resume_hint = resume_hint
        self._lock_fd: int | None = None
        self._files: dict[str, str] = {}  # file name -> the name of its recorded temporary
        self._manifest_temporary: str | None = None
        self._created: list[Path] = []

    # -- life ---------------------------------------------------------------------------------

    def open(self) -> RunFolder:
        """Creates the folder if needed, takes the lock and reads the manifest.

        Raises:
            RunLockedError: another process holds the lock (the line names its host and pid).
            RunFolderError: the folder cannot be created or written (a file in the way, no
                permission, a full disk), or its manifest is damaged or another program's.
        """
        if self._lock_fd is not None:
            return self
        self._created = self._make_folder()
        try:
            fd = self._lock()
        except BaseException:
            self._remove_created()
            raise
        self._lock_fd = fd
        holder = f"host {socket.gethostname()} pid {os.getpid()}\n".encode()
        try:
            if os.pread(fd, 200, 0) != holder:  # the same holder: leave the file as it is
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's name is missing
        try:
            self._read_manifest()
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> int:
        lock = self.path / LOCK_NAME
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise RunFolderError(f"cannot create the lock file {lock} ({err.strerror}); the "
                                     "run folder must be writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(f"{self.path} is in use by another live process "
                                     f"({holder}); two processes on one run would interleave "
                                     "its files. Wait for it to end (or stop it), or choose "
                                     "another run folder; nothing was changed") from None
            # A holder that wrote nothing removes the lock file when it closes (below): the
            # file locked here must still be the one at the path, or another process may lock
            # a new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def close(self) -> None:
        """Releases the lock (the kernel does the same when the process ends). A folder in
        which the run wrote nothing is left as it was found: the lock file, and the folders
        :meth:`open` created, are removed."""
        if self._lock_fd is None:
            return
        if not self.manifest_path.exists():
            (self.path / LOCK_NAME).unlink(missing_ok=True)  # still locked: no race
            self._remove_created()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _make_folder(self) -> list[Path]:
        """Creates the folder and its missing parents; returns those it created, deepest
        first."""
        missing = []
        for parent in (self.path, *self.path.parents):
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise RunFolderError(f"{parent} is a file, not a folder; the run folder "
                                         f"{self.path} cannot be made inside it. Choose another "
                                         "log folder")
                break
            missing.append(parent)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot create the run folder {self.path} ({err.strerror}); "
                                 "choose a writable log folder") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunFolderError(f"the run folder {self.path} is not writable; choose a "
                                 "writable log folder or fix its permissions")
        return missing

    # -- manifest -----------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        """``<folder>/manifest.json``."""
        return self.path / MANIFEST_NAME

    def _read_manifest(self) -> None:
        path = self.manifest_path
        if not path.exists():
            self._files, self._manifest_temporary = {}, None
            return
        try:
            data = json.loads(path.read_text())
            files = data["files"]
            valid = (data["format"] == _MANIFEST_FORMAT and isinstance(files, dict)
                     and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()))
            if not valid:
                raise ValueError("unknown format")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{path} is not a run manifest that this version reads ({err}); "
                                 "the folder's files are left alone. Choose another run "
                                 "folder") from None
        if data.get("program") != self.program:
            raise RunFolderError(f"{self.path} is a run folder of {data.get('program')!r}, not "
                                 f"of {self.program!r}; nothing was changed. Choose another run "
                                 "folder")
        for name, temporary in files.items():
            self._check_name(name)
            self._check_name(temporary)
        self._files = dict(files)
        self._manifest_temporary = data.get("next_temporary")

    def _write_manifest(self) -> None:
        following = f".{MANIFEST_NAME}.{secrets.token_hex(6)}.tmp"
        data = {"format": _MANIFEST_FORMAT, "program": self.program, "files": self._files,
                "next_temporary": following}
        # The temporary was recorded by the previous manifest (the first manifest's is a fresh
        # random name): what a killed write leaves is known to be the run's.
        temporary = (None if self._manifest_temporary is None
                     else self.path / self._manifest_temporary)
        self._guard(MANIFEST_NAME, lambda: atomic_write_text(
            json.dumps(data, indent=1, sort_keys=True) + "\n", self.manifest_path,
            temporary=temporary))
        self._manifest_temporary = following

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise RunFolderError(f"{name!r} is not a plain file name of a run folder")

    @property
    def files(self) -> tuple[str, ...]:
        """The names of the files the run wrote (recorded in its manifest), sorted."""
        return tuple(sorted(self._files))

    def owns(self, name: str) -> bool:
        """Whether the manifest records ``name`` as the run's."""
        return name in self._files

    def exists(self, name: str) -> bool:
        """Whether the run wrote ``name`` and it is there."""
        path = self.path / name
        return name in self._files and (path.exists() or path.is_symlink())

    def file(self, name: str) -> Path:
        """The path of ``name`` in the folder (a plain name: no folder parts)."""
        self._check_name(name)
        return self.path / name

    def foreign(self) -> list[str]:
        """Names in the folder that the run did not write: the user's files, or an older
        version's files (a folder without a manifest)."""
        ours = {LOCK_NAME, MANIFEST_NAME, *self._files, *self._files.values()}
        if self._manifest_temporary:
            ours.add(self._manifest_temporary)
        return sorted(p.name for p in self.path.iterdir() if p.name not in ours)

    def _own(self, name: str) -> Path:
        """Records ``name`` in the manifest (first write only) and returns its path."""
        path = self.file(name)
        if name in (LOCK_NAME, MANIFEST_NAME):
            raise RunFolderError(f"{name} is the run folder's own file")
        if name in self._files:
            return path
        if self._lock_fd is None:
            raise RuntimeError(f"{self.path}: open the run folder (take its lock) before writing")
        if path.exists() or path.is_symlink():
            raise RunFolderError(f"{path} is there but was not written by this run (it is not "
                                 f"in {self.manifest_path}); it is left alone. Move it away, or "
                                 "choose another run folder")
        self._files[name] = f".{name}.{secrets.token_hex(6)}.tmp"
        self._write_manifest()
        return path

    # -- writing ------------------------------------------------------------------------------

    def _guard(self, name: str, write: Callable[[], object]) -> None:
        """Runs ``write``; a failed write (full disk, read-only) becomes one line."""
        try:
            write()
        except OSError as err:
            raise RunFolderError(self._failure(name, err.strerror or str(err), err)) from err
        except RuntimeError as err:
            if not _is_write_failure(err):
                raise
            raise RunFolderError(self._failure(name, str(err).splitlines()[-1].strip(), err)
                                 ) from err

    def _failure(self, name: str, reason: str, err: BaseException) -> str:
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        cause = "the disk is full" if full else reason
        return (f"could not write {self.path / name}: {cause}. Nothing that was written before "
                f"is lost (writes are atomic; the previous {name} is intact): free space or fix "
                f"the folder, then {self.resume_hint}")

    def write_text(self, name: str, text: str) -> None:
        """Replaces ``name`` with ``text``, atomically."""
        path = self._own(name)
        temporary = self.path / self._files[name]
        self._guard(name, lambda: atomic_write_text(text, path, temporary=temporary))

    def append_text(self, name: str, text: str) -> None:
        """Appends ``text`` to ``name`` (a log). A kill mid-append can leave a last line
        without its newline; :meth:`plan_rewrite` drops such a line."""
        path = self._own(name)

        def append() -> None:
            with open(path, "a") as file:
                file.write(text)

        self._guard(name, append)

    def save_checkpoint(self, name: str, state: Mapping[str, Any],
                        flags: Mapping[str, Any]) -> None:
        """Saves ``state`` atomically with a checksum, the ``flags`` that produced it and the
        producer (``{"program": ...}``); :meth:`load_checkpoint` checks all three."""
        for key in (FLAGS_KEY, PRODUCER_KEY):
            if key in state:
                raise ValueError(f"state has a {key!r} entry; RunFolder.save_checkpoint adds it")
        path = self._own(name)
        temporary = self.path / self._files[name]
        full = {**state, FLAGS_KEY: dict(flags), PRODUCER_KEY: self.producer()}
        self._guard(name, lambda: save_checked(full, path, temporary=temporary))

    def producer(self) -> dict[str, str]:
        """What a checkpoint records as its producer: the program and metazoo's version."""
        import metazoo  # the package imports this module: read its version at call time

        return {"program": self.program, "metazoo": metazoo.__version__}

    def record_machine(self, event: str) -> str | None:
        """Appends ``{"event": event, **machine()}`` to the run's ``machine.json`` (a list,
        one record per start and resume).

        Args:
            event: what started here (``"start"``, ``"resume at step 40"``).

        Returns:
            ``None``, or one line saying how this machine differs from the one that started
            the run (:data:`MACHINE_KEYS`): the results from here on are not bit-identical to
            an uninterrupted run on the first machine.
        """
        records: list[dict[str, Any]] = []
        if self.owns(MACHINE_NAME) and self.exists(MACHINE_NAME):
            try:
                loaded = json.loads(self.file(MACHINE_NAME).read_text())
                if isinstance(loaded, list) and all(isinstance(r, dict) for r in loaded):
                    records = loaded
            except (OSError, ValueError):
                pass  # unreadable: the record starts again from this machine
        now = {"event": event, **machine()}
        note = None
        if records:
            first = records[0]
            changed = [f"{k} {first.get(k)!r} -> {now[k]!r}" for k in MACHINE_KEYS
                       if first.get(k) != now[k]]
            if changed:
                note = (f"note: {self.path} was started on another machine kind "
                        f"({'; '.join(changed)}): from here on its results are not "
                        "bit-identical to an uninterrupted run there")
        self.write_text(MACHINE_NAME, json.dumps([*records, now], indent=1) + "\n")
        return note

    # -- reading ------------------------------------------------------------------------------

    def load_checkpoint(self, name: str, flags: Mapping[str, Any], *,
                        may_change: Iterable[str] = (), trust_unrecorded: bool = False,
                        trust_flag: str = "--trust_checkpoint",
                        fix: str = "nothing was changed") -> dict[str, Any]:
        """Loads and checks a checkpoint; touches nothing.

        Checked: the file is there (a dangling symbolic link is named as one), its checksum,
        its producer's program, and that its recorded flags equal ``flags`` except for
        ``may_change``. The returned state keeps its ``"flags"`` entry (the producer's is
        removed).

        Args:
            name: the checkpoint's file name.
            flags: the flags of this run, as the checkpoint would record them.
            may_change: flags that may differ (how long, where, how often to log).
            trust_unrecorded: accept a checkpoint that records no flags (an older version's),
                trusting that ``flags`` are its. Without it such a checkpoint is refused: it
                could silently continue as another experiment.
            trust_flag: the command's flag that sets ``trust_unrecorded``, for the error line.
            fix: the end of every error line (what the user can do).

        Raises:
            RunFolderError: one line naming what is wrong and ``fix``.
        """
        path = self.file(name)
        if path.is_symlink() and not path.exists():
            raise RunFolderError(f"{path} is a symbolic link to {os.readlink(path)}, which does "
                                 f"not exist; {fix}")
        if not path.exists():
            raise RunFolderError(f"{path} does not exist; {fix}")
        try:
            state = load_checked(path)
        except ValueError as err:
            raise RunFolderError(f"{err}; {fix}") from None
        producer = state.pop(PRODUCER_KEY, None)
        program = producer.get("program") if isinstance(producer, dict) else None
        if producer is not None and program != self.program:
            raise RunFolderError(f"{path} was written by {program!r}, not by {self.program!r}; "
                                 f"{fix}")
        stored = state.get(FLAGS_KEY)
        if stored is None:
            if not trust_unrecorded:
                raise RunFolderError(
                    f"{path} does not record the flags that produced it (an older version's "
                    "checkpoint, or an edited one), so continuing from it could silently run "
                    f"another experiment; {fix}. If you know these flags are its, pass "
                    f"{trust_flag}")
        elif not isinstance(stored, dict):
            raise RunFolderError(f"{path} records its flags as a {type(stored).__name__}, not "
                                 f"a mapping; {fix}")
        else:
            differences = flag_differences(stored, flags, may_change)
            if differences:
                raise RunFolderError(f"{path} was written by a run with other flags "
                                     f"({'; '.join(differences)}); {fix}")
        return state

    def plan_rewrite(self, names: Iterable[str], keep: Callable[[str], bool], *,
                     fix: str = "nothing was changed") -> dict[str, str]:
        """Checks every line of the run's files ``names`` and returns what :meth:`rewrite`
        would write (only the files that change); touches nothing.

        A last line without its newline (a kill mid-append) is dropped. ``keep(line)`` says
        whether a complete line stays; a ``ValueError`` from it means the line is not one the
        run writes, and the whole plan is refused, naming the file and the line. Names the
        run did not write are skipped: they are the user's.

        Raises:
            RunFolderError: for a line that ``keep`` cannot read.
        """
        plan: dict[str, str] = {}
        for name in names:
            if not self.exists(name):
                continue
            path = self.file(name)
            try:
                with open(path, newline="") as file:  # line ends as written (csv's \r\n)
                    text = file.read()
            except (OSError, UnicodeDecodeError) as err:
                raise RunFolderError(f"{path} cannot be read ({err}); {fix}") from None
            lines = text.splitlines(keepends=True)
            kept = []
            for number, line in enumerate(lines, start=1):
                if not line.endswith("\n"):
                    continue
                try:
                    if keep(line):
                        kept.append(line)
                except (ValueError, IndexError) as err:
                    raise RunFolderError(f"{path} line {number} ({line.strip()[:60]!r}) is not a "
                                         f"line this run writes ({err}); {fix}") from None
            new = "".join(kept)
            if new != text:
                plan[name] = new
        return plan

    def rewrite(self, plan: Mapping[str, str]) -> None:
        """Writes a :meth:`plan_rewrite` plan, each file atomically."""
        for name, text in plan.items():
            self.write_text(name, text)

    # -- removing -----------------------------------------------------------------------------

    def remove(self, *names: str) -> None:
        """Removes the run's files ``names`` (names it did not write are refused)."""
        for name in names:
            if name not in self._files:
                raise ValueError(f"{self.path / name} is not the run's file; it is not removed")
            self._guard(name, partial(self.file(name).unlink, missing_ok=True))

    def discard_temporaries(self) -> list[str]:
        """Removes what killed atomic writes left behind (only the temporaries recorded in the
        manifest); returns their names."""
        names = list(self._files.values())
        if self._manifest_temporary:
            names.append(self._manifest_temporary)
        removed = []
        for name in names:
            path = self.path / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(name)
        return removed

    def clear(self) -> None:
        """Removes every file the run wrote, and its temporaries; the user's files stay."""
        self.discard_temporaries()
        for name in self._files:
            self._guard(name, partial(self.file(name).unlink, missing_ok=True))
