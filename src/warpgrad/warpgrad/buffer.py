"""Replay buffer of task-parameter trajectories for WarpGrad's warp objective.

While a task learner adapts, ``Warp`` records the adaptable parameters before every step (and
the inner optimizer's momentum buffers, when it has any). After a meta-batch of tasks, the
updater replays the stored points: the warp objective is a sum over points of the whole joint
task-parameter distribution, so no gradient ever flows through the adaptation trajectory.

States are kept in memory (on ``device``) or on disk, one file per state, loaded with
``torch.load(weights_only=True)``. On disk the buffer owns a scratch directory by an OS file lock
(``warpgrad.scratch``); it removes its files on ``clear()`` and the directory when it is
garbage-collected (or on ``close()``); a directory left by a killed process is removed by the
next disk buffer under the same parent, once that process's lock is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from metazoo import Params
from warpgrad.scratch import ScratchDirectory, remove_abandoned

__all__ = ["ReplayBuffer", "ReplayState"]


@dataclass(frozen=True)
class ReplayState:
    """One stored point of a task's adaptation trajectory.

    Attributes:
        step: index of the inner step this state preceded (0 is the initialisation).
        params: the adaptable parameters before that step, by model parameter name.
        momentum: the inner optimizer's momentum buffers before that step, by parameter name,
            or ``None`` when the optimizer had none yet (plain SGD, or before its first step).
    """

    step: int
    params: Params
    momentum: Params | None = None


def _copy(tensors: Params | None, device: torch.device | str | None) -> Params | None:
    if tensors is None:
        return None
    return {name: t.detach().to(device=device, copy=True) if device is not None
            else t.detach().clone() for name, t in tensors.items()}


_SAFE_LABEL = re.compile(r"[^A-Za-z0-9_-]")
_PREFIX = "warpgrad_replay_"


def _all_finite(params: Params, momentum: Params | None) -> torch.Tensor:
    """Whether every stored value is finite, as a 0-dim tensor (no host transfer)."""
    tensors = [*params.values(), *(momentum or {}).values()]
    if not tensors:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(t.detach()).all().to(tensors[0].device)
                        for t in tensors]).all()


def _save_state(obj: Any, path: str) -> None:
    # Written in place, not through a temporary name: the path is in the scratch directory's
    # manifest before the write starts, so whatever is left by a kill mid-write is cleaned up
    # by name; and the buffer records the state only after the write returned, so no replay
    # of this process reads a half-written file. The files die with the buffer: no fsync.
    try:
        torch.save(obj, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


class ReplayBuffer:
    """Cache of adaptation trajectories, one slot per task.

    Args:
        inmem: keep states in memory (default) or write them to disk.
        tmpdir: with ``inmem=False``, the directory under which a private temporary directory is
            created (default: the system's temporary directory). Directories left there by
            buffers of killed processes are removed first: only those whose owner's file lock
            is free (the kernel releases it when the owner dies, in any container or PID
            namespace), and only the files their manifest says the buffer wrote;
            ``removed_orphans`` lists them.
        device: where in-memory states live (default ``"cpu"``, as in the reference, so long
            trajectories do not use accelerator memory); ``None`` keeps each tensor's device.
        every: keep only states whose step index is a multiple of ``every`` (1 keeps all).
        max_states: keep at most this many states per task, a uniform random subset of the
            candidates (reservoir sampling), so memory is bounded whatever the number of steps.
        seed: seed of the reservoir sampler (default: torch's global generator).
    """

    def __init__(self, inmem: bool = True, tmpdir: str | os.PathLike[str] | None = None, *,
                 device: torch.device | str | None = "cpu", every: int = 1,
                 max_states: int | None = None, seed: int | None = None) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1 (1 keeps every state)")
        if max_states is not None and (not isinstance(max_states, int) or max_states < 1):
            raise ValueError(f"max_states={max_states!r} must be None (keep all) or an integer "
                             ">= 1")
        if inmem and tmpdir is not None:
            raise ValueError(f"tmpdir={tmpdir!r} is only used with inmem=False; drop it or set "
                             "inmem=False")
        if tmpdir is not None and not os.path.isdir(tmpdir):
            raise ValueError(f"tmpdir={tmpdir!r} is not an existing directory; create it first "
                             "or pass None for the system temporary directory")
        self.inmem = inmem
        self.device = device
        self.every = every
        self.max_states = max_states
        # Without a seed the reservoir draws from torch's global generator (and only when
        # max_states is set), so creating a buffer never shifts the global random state.
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._data: dict[str, Iterable[Any]] = {}
        self._seen: dict[str, int] = {}
        self._candidates: dict[str, int] = {}
        # In memory: ReplayState objects; on disk: (step, path) pairs.
        self._states: dict[str, list[Any]] = {}
        self._terminal: dict[str, Any] = {}
        # Whether each stored state is finite, computed on the device when it is stored (no
        # host transfer) and read for the whole buffer at once by ``nonfinite_slots``.
        self._finite: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._terminal_finite: dict[str, tuple[int, torch.Tensor]] = {}
        self._counter = 0
        self.tmpdir: str | None = None
        self.removed_orphans: list[str] = []
        if not inmem:
            parent = tempfile.gettempdir() if tmpdir is None else os.fspath(tmpdir)
            # Directories of buffers whose process died (SIGKILL skips the clean-up at exit):
            # removed only when their owner's lock can be taken, and only the files their
            # manifest lists (see warpgrad.scratch).
            self.removed_orphans = remove_abandoned(parent, _PREFIX)
            try:
                self._scratch = ScratchDirectory(parent, _PREFIX)
            except OSError as err:
                raise ValueError(f"tmpdir={parent!r}: cannot create the replay buffer's folder "
                                 f"there ({err.strerror}); pass a writable tmpdir") from None
            self.tmpdir = self._scratch.path
            self._finalizer = weakref.finalize(self, self._scratch.remove)

    # -- writing ---------------------------------------------------------------------------

    def init(self, slot: str, data: Iterable[Any]) -> None:
        """Opens a slot for a new task and attaches its data (a re-iterable of batches).

        Any name is accepted: on disk, files are named by the slot reduced to letters, digits,
        ``_`` and ``-`` plus a counter, so a slot name never becomes a path.

        Raises:
            ValueError: if ``slot`` is already in the buffer.
        """
        if slot in self._data:
            raise ValueError(f"slot {slot!r} is already in the buffer; use a fresh task id "
                             "(Warp.register_task makes one) or clear() the buffer")
        self._data[slot] = data
        self._seen[slot] = 0
        self._candidates[slot] = 0
        self._states[slot] = []
        self._finite[slot] = []

    def _check_slot(self, slot: str) -> None:
        if slot not in self._data:
            raise ValueError(f"slot {slot!r} is not in the buffer; call init(slot, data) first")

    def update(self, slot: str, params: Params, momentum: Params | None = None) -> None:
        """Stores a copy of ``params`` (and ``momentum``) as the next state of ``slot``.

        The state's step index is the number of earlier ``update`` calls for the slot; whether
        it is kept depends on ``every`` and ``max_states``.
        """
        self._check_slot(slot)
        step = self._seen[slot]
        self._seen[slot] += 1
        if step % self.every:
            return
        candidate = self._candidates[slot]
        self._candidates[slot] += 1
        states = self._states[slot]
        position = len(states)
        if self.max_states is not None and len(states) >= self.max_states:
            # Reservoir sampling: every candidate is kept with probability max_states / seen.
            j = int(torch.randint(candidate + 1, (1,), generator=self._generator).item())
            if j >= self.max_states:
                return
            position = j
            if not self.inmem:
                os.unlink(states[j][1])
        entry = self._store(slot, step, params, momentum)
        flag = (step, _all_finite(params, momentum))
        if position == len(states):
            states.append(entry)
            self._finite[slot].append(flag)
        else:
            states[position] = entry
            self._finite[slot][position] = flag

    def finalize(self, slot: str, params: Params) -> None:
        """Stores the task's final (adapted) parameters, which close its last segment.

        The terminal state is used by the initialisation objective (the pull-forward over the
        last step) but is not a replay point of the warp objective: it precedes no step.
        """
        self._check_slot(slot)
        previous = self._terminal.pop(slot, None)
        if previous is not None and not self.inmem:
            os.unlink(previous[1])
        self._terminal[slot] = self._store(slot, self._seen[slot], params, None, terminal=True)
        self._terminal_finite[slot] = (self._seen[slot], _all_finite(params, None))

    def _store(self, slot: str, step: int, params: Params, momentum: Params | None,
               terminal: bool = False) -> Any:
        if self.inmem:
            return ReplayState(step, _copy(params, self.device) or {}, _copy(momentum,
                                                                              self.device))
        assert self.tmpdir is not None
        self._counter += 1
        # The counter makes every name unique; the slot only labels the file, reduced to safe
        # characters so that no slot name (``"../x"``, ``"/abs"``) can leave the directory.
        label = _SAFE_LABEL.sub("_", str(slot))[:64]
        name = f"{label}_{'terminal' if terminal else step}_{self._counter}.pt"
        path = self._scratch.file(name)
        _save_state({"step": step, "params": _copy(params, "cpu"),
                      "momentum": _copy(momentum, "cpu")}, path)
        return (step, path)

    # -- reading ---------------------------------------------------------------------------

    def slots(self) -> list[str]:
        """Task slots in registration order."""
        return list(self._data)

    def data(self, slot: str) -> Iterable[Any]:
        """The data attached to ``slot``."""
        self._check_slot(slot)
        return self._data[slot]

    def num_states(self, slot: str) -> int:
        """Number of replay points stored for ``slot``."""
        self._check_slot(slot)
        return len(self._states[slot])

    def _ordered(self, slot: str) -> list[Any]:
        entries = self._states[slot]
        return sorted(entries, key=lambda e: e.step if self.inmem else e[0])

    def _load(self, entry: Any, device: torch.device | str | None) -> ReplayState:
        if self.inmem:
            if device is None:
                return entry
            return ReplayState(entry.step, _copy(entry.params, device) or {},
                               _copy(entry.momentum, device))
        loaded = torch.load(entry[1], map_location=device or "cpu", weights_only=True)
        return ReplayState(int(loaded["step"]), loaded["params"], loaded["momentum"])

    def state(self, slot: str, index: int, *, device: torch.device | str | None = None
              ) -> ReplayState:
        """The ``index``-th stored state of ``slot`` in step order, on ``device``."""
        self._check_slot(slot)
        ordered = self._ordered(slot)
        if not 0 <= index < len(ordered):
            raise ValueError(f"index={index} is out of range for slot {slot!r} with "
                             f"{len(ordered)} states")
        return self._load(ordered[index], device)

    def states(self, slot: str, *, device: torch.device | str | None = None
               ) -> list[ReplayState]:
        """Every stored state of ``slot`` in step order."""
        self._check_slot(slot)
        return [self._load(e, device) for e in self._ordered(slot)]

    def terminal(self, slot: str, *, device: torch.device | str | None = None
                 ) -> ReplayState | None:
        """The final state stored by ``finalize``, or ``None``."""
        self._check_slot(slot)
        entry = self._terminal.get(slot)
        return None if entry is None else self._load(entry, device)

    def trajectory(self, slot: str, *, device: torch.device | str | None = None
                   ) -> list[Params]:
        """Stored states followed by the terminal state (if any): the task's path."""
        points = [s.params for s in self.states(slot, device=device)]
        final = self.terminal(slot, device=device)
        if final is not None:
            points.append(final.params)
        return points

    def nonfinite_slots(self) -> dict[str, int]:
        """Slots holding a NaN or infinite stored value, each with the step of its first one.

        The flags were computed when the states were stored; reading them all costs one host
        transfer. The terminal state (``finalize``) counts as the step after the last update.
        """
        entries = [(slot, step, flag) for slot, flags in self._finite.items()
                   for step, flag in flags]
        entries += [(slot, step, flag) for slot, (step, flag) in self._terminal_finite.items()]
        if not entries:
            return {}
        device = entries[0][2].device
        finite = torch.stack([flag.to(device) for _, _, flag in entries]).tolist()
        first: dict[str, int] = {}
        for (slot, step, _), ok in zip(entries, finite, strict=True):
            if not ok and (slot not in first or step < first[slot]):
                first[slot] = step
        return first

    def __len__(self) -> int:
        return sum(len(s) for s in self._states.values())

    # -- cleaning up -----------------------------------------------------------------------

    def clear(self) -> None:
        """Forgets every slot and deletes the stored files."""
        if not self.inmem:
            for entries in self._states.values():
                for _, path in entries:
                    if os.path.exists(path):
                        os.unlink(path)
            for _, path in self._terminal.values():
                if os.path.exists(path):
                    os.unlink(path)
            self._scratch.forget_written()
        self._data.clear()
        self._seen.clear()
        self._candidates.clear()
        self._states.clear()
        self._terminal.clear()
        self._finite.clear()
        self._terminal_finite.clear()

    def discard(self, slot: str) -> None:
        """Forgets one slot (its data, states and files), e.g. a task whose loss was not finite.

        Raises:
            ValueError: if ``slot`` is not in the buffer.
        """
        self._check_slot(slot)
        entries = list(self._states.pop(slot))
        terminal = self._terminal.pop(slot, None)
        if not self.inmem:
            for _, path in entries + ([terminal] if terminal is not None else []):
                if os.path.exists(path):
                    os.unlink(path)
        del self._data[slot], self._seen[slot], self._candidates[slot], self._finite[slot]
        self._terminal_finite.pop(slot, None)

    def random_state(self) -> torch.Tensor | None:
        """The state of the buffer's own generator (``seed=``), ``None`` without a seed: what a
        checkpoint needs so that a resumed run draws the same reservoir samples."""
        return None if self._generator is None else self._generator.get_state()

    def set_random_state(self, state: torch.Tensor | None) -> None:
        """Restores ``random_state()`` (``None``, from a buffer without a seed, changes
        nothing)."""
        if state is not None and self._generator is not None:
            self._generator.set_state(state)

    def close(self) -> None:
        """Clears the buffer and removes its temporary directory (disk mode)."""
        self.clear()
        if not self.inmem:
            self._finalizer()

    def __repr__(self) -> str:
        where = "memory" if self.inmem else f"disk:{self.tmpdir}"
        return (f"ReplayBuffer({where}, tasks={len(self._data)}, states={len(self)}, "
                f"every={self.every}, max_states={self.max_states})")

