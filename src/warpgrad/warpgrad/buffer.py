"""Replay buffer of task-parameter trajectories for WarpGrad's warp objective.

While a task learner adapts, ``Warp`` records the adaptable parameters before every step (and
the inner optimizer's momentum buffers, when it has any). After a meta-batch of tasks, the
updater replays the stored points: the warp objective is a sum over points of the whole joint
task-parameter distribution, so no gradient ever flows through the adaptation trajectory.

Each state is stored flat: its parameters as one 1-D tensor and its momentum as another, with a
layout shared by all states of the same structure (``warpgrad.flat.FlatLayout``), so storing,
stacking or checking a state is one operation instead of one per parameter tensor. Reading a
state gives its tensors back as views with their shapes, dtypes and memory layout;
``flat_states`` and ``flat_trajectory`` stack many states in one operation for the vectorized
replay. States are kept in memory (on ``device``) or on disk, one file per state, loaded with
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metazoo import Params
from warpgrad.flat import FlatLayout
from warpgrad.scratch import ScratchDirectory, remove_abandoned

__all__ = ["FlatStates", "ReplayBuffer", "ReplayState"]


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


@dataclass(frozen=True)
class FlatStates:
    """Stored states stacked flat (``ReplayBuffer.flat_states``): one row per state.

    Attributes:
        layout: where each parameter lives in a row (``FlatLayout.unflatten`` gives views).
        params: ``[N, layout.numel]``, the parameters of each state.
        momentum: ``[N, layout.numel]``, each state's momentum buffer, zeros where a state has
            none (``torch.optim.SGD``'s first step, ``buffer = gradient``, equals a step from a
            zero buffer); ``None`` when no state has one.
    """

    layout: FlatLayout
    params: Tensor
    momentum: Tensor | None


@dataclass
class _Entry:
    """One stored state: flat tensors in memory, or the file that holds them."""

    step: int
    layout: FlatLayout
    momentum_layout: FlatLayout | None
    params: Tensor | None = None
    momentum: Tensor | None = None
    path: str | None = None
    # Whether every value is finite (0-dim, on the device; no host transfer). Computed when a
    # state is written to disk; for a state in memory, when ``nonfinite_slots`` asks.
    finite: Tensor | None = None


_SAFE_LABEL = re.compile(r"[^A-Za-z0-9_-]")
_PREFIX = "warpgrad_replay_"


def _all_finite(params: Tensor, momentum: Tensor | None) -> Tensor:
    """Whether every stored value is finite, as a 0-dim tensor (no host transfer)."""
    finite = torch.isfinite(params).all()
    return finite if momentum is None else finite & torch.isfinite(momentum).all().to(
        finite.device)


def _relayout(flat: Tensor, layout: FlatLayout | None, target: FlatLayout) -> Tensor:
    """``flat`` (in ``layout``) in the ``target`` layout: itself when they are the same, else
    one gather (a momentum buffer laid out in another memory order or dtype)."""
    if layout is None or layout == target:
        return flat
    if dict(zip(layout.names, layout.shapes, strict=True)) != dict(
            zip(target.names, target.shapes, strict=True)):
        raise ValueError("the momentum of a stored state has other tensors than its parameters; "
                         "store momentum by the parameters' names and shapes")
    return target.flatten(layout.unflatten(flat))


def _own_storage(t: Tensor) -> Tensor:
    """``t`` itself when it owns its whole storage, else a compact copy (``torch.save`` writes
    a view's whole storage)."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


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
            trajectories do not use accelerator memory); ``None`` keeps the states' device
            (the first tensor's, when a state's tensors are on several devices).
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
        # Each state is one flat tensor (and one for its momentum) with a shared layout
        # (``warpgrad.flat``), in memory or in a file.
        self._states: dict[str, list[_Entry]] = {}
        self._terminal: dict[str, _Entry] = {}
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

    def _check_slot(self, slot: str) -> None:
        if slot not in self._data:
            raise ValueError(f"slot {slot!r} is not in the buffer; call init(slot, data) first")

    def _position(self, slot: str) -> tuple[int, int] | None:
        """Counts the next state of ``slot``: ``(step, position in the slot's list)`` when it
        is kept (``every``, reservoir sampling), else ``None``."""
        step = self._seen[slot]
        self._seen[slot] += 1
        if step % self.every:
            return None
        candidate = self._candidates[slot]
        self._candidates[slot] += 1
        states = self._states[slot]
        position = len(states)
        if self.max_states is not None and len(states) >= self.max_states:
            # Reservoir sampling: every candidate is kept with probability max_states / seen.
            j = int(torch.randint(candidate + 1, (1,), generator=self._generator).item())
            if j >= self.max_states:
                return None
            position = j
            self._remove_file(states[j])
        return step, position

    def _put(self, slot: str, position: int, entry: _Entry) -> None:
        states = self._states[slot]
        if position == len(states):
            states.append(entry)
        else:
            states[position] = entry

    def _flatten(self, tensors: Params) -> tuple[FlatLayout, Tensor]:
        """A new flat tensor of ``tensors`` (one ``cat`` where they live, then one transfer)."""
        layout = FlatLayout.of(tensors)
        detached = {n: t.detach() for n, t in tensors.items()}
        if len({t.device for t in detached.values()}) > 1:
            first = next(iter(detached.values())).device
            detached = {n: t.to(first) for n, t in detached.items()}
        flat = layout.flatten(detached)
        return layout, flat if self.device is None else flat.to(self.device)

    def update(self, slot: str, params: Params, momentum: Params | None = None) -> None:
        """Stores a copy of ``params`` (and ``momentum``) as the next state of ``slot``.

        The state's step index is the number of earlier ``update`` calls for the slot; whether
        it is kept depends on ``every`` and ``max_states``. It is stored as one flat tensor
        (``warpgrad.flat``); reading it gives the same tensors back.
        """
        self._check_slot(slot)
        kept = self._position(slot)
        if kept is None:
            return
        step, position = kept
        layout, flat = self._flatten(params)
        momentum_layout, momentum_flat = (None, None) if momentum is None else (
            self._flatten(momentum))
        self._put(slot, position, self._store(slot, step, layout, flat, momentum_layout,
                                              momentum_flat))

    def finalize(self, slot: str, params: Params) -> None:
        """Stores the task's final (adapted) parameters, which close its last segment.

        The terminal state is used by the initialisation objective (the pull-forward over the
        last step) but is not a replay point of the warp objective: it precedes no step.
        """
        self._check_slot(slot)
        layout, flat = self._flatten(params)
        self._set_terminal(slot, self._store(slot, self._seen[slot], layout, flat, None, None,
                                             terminal=True))

    def _set_terminal(self, slot: str, entry: _Entry) -> None:
        previous = self._terminal.pop(slot, None)
        if previous is not None:
            self._remove_file(previous)
        self._terminal[slot] = entry

    def record(self, slot: str, trajectory: Tensor, *, layout: FlatLayout,
               momentum: Tensor | None = None, copy: bool = True) -> None:
        """Stores a whole adaptation at once: what ``update`` for each of its K steps and then
        ``finalize`` store, from flat tensors, without a copy per state.

        Args:
            slot: an open slot (``init``).
            trajectory: ``[K + 1, layout.numel]``: the parameters before each of the K steps,
                then the adapted parameters.
            layout: the layout of ``trajectory``'s rows (``FlatLayout.of(params)``).
            momentum: ``[K - 1, layout.numel]``, the momentum buffer before steps 1 to K - 1
                (there is none before the first step), or ``None``.
            copy: ``False`` hands the tensors over: kept as they are (moved to ``device``),
                so the caller must not modify them afterwards.
        """
        self._check_slot(slot)
        steps = trajectory.shape[0] - 1
        if trajectory.dim() != 2 or trajectory.shape[1] != layout.numel or steps < 0:
            raise ValueError(f"trajectory must be [K + 1, {layout.numel}] (flat in layout), "
                             f"got {tuple(trajectory.shape)}")
        if momentum is not None and tuple(momentum.shape) != (max(steps - 1, 0), layout.numel):
            raise ValueError(f"momentum must be [K - 1, {layout.numel}] = "
                             f"[{max(steps - 1, 0)}, {layout.numel}] for {steps} steps, got "
                             f"{tuple(momentum.shape)}")
        trajectory = self._take(trajectory.detach(), copy)
        momentum = None if momentum is None else self._take(momentum.detach(), copy)
        added: dict[int, int] = {}  # id(entry) -> its row
        for k in range(steps):
            kept = self._position(slot)
            if kept is None:
                continue
            step, position = kept
            row = None if momentum is None or k == 0 else momentum[k - 1]
            entry = self._store(slot, step, layout, trajectory[k],
                                None if row is None else layout, row)
            added[id(entry)] = k
            self._put(slot, position, entry)
        terminal = self._store(slot, self._seen[slot], layout, trajectory[steps], None, None,
                               terminal=True)
        self._set_terminal(slot, terminal)
        if self.inmem and len(added) < steps:
            self._compact(slot, terminal, added, trajectory, momentum)

    def _compact(self, slot: str, terminal: _Entry, added: dict[int, int], trajectory: Tensor,
                 momentum: Tensor | None) -> None:
        """Rows kept by ``record`` as views would hold the whole trajectory in memory; with
        ``every`` or ``max_states`` the kept ones are gathered into their own tensors, so the
        memory bound holds."""
        kept = [e for e in self._states[slot] if id(e) in added]
        rows = [added[id(e)] for e in kept] + [trajectory.shape[0] - 1]
        gathered = trajectory.index_select(0, torch.tensor(rows, device=trajectory.device))
        for entry, params in zip([*kept, terminal], gathered, strict=True):
            entry.params = params
        with_momentum = [e for e in kept if e.momentum is not None]
        if momentum is not None and with_momentum:
            index = torch.tensor([added[id(e)] - 1 for e in with_momentum],
                                 device=momentum.device)
            for entry, row in zip(with_momentum, momentum.index_select(0, index), strict=True):
                entry.momentum = row

    def _take(self, t: Tensor, copy: bool) -> Tensor:
        if self.device is not None:
            return t.to(self.device, copy=copy)
        return t.clone() if copy else t

    def _store(self, slot: str, step: int, layout: FlatLayout, params: Tensor,
               momentum_layout: FlatLayout | None, momentum: Tensor | None,
               terminal: bool = False) -> _Entry:
        entry = _Entry(step, layout, momentum_layout)
        if self.inmem:
            entry.params, entry.momentum = params, momentum
            return entry
        entry.finite = _all_finite(params, momentum)
        self._counter += 1
        # The counter makes every name unique; the slot only labels the file, reduced to safe
        # characters so that no slot name (``"../x"``, ``"/abs"``) can leave the directory.
        label = _SAFE_LABEL.sub("_", str(slot))[:64]
        name = f"{label}_{'terminal' if terminal else step}_{self._counter}.pt"
        entry.path = self._scratch.file(name)
        _save_state({"step": step, "params": _own_storage(params.cpu()),
                     "momentum": None if momentum is None else _own_storage(momentum.cpu())},
                    entry.path)
        return entry

    def _remove_file(self, entry: _Entry) -> None:
        if entry.path is not None and os.path.exists(entry.path):
            os.unlink(entry.path)

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

    def _ordered(self, slot: str) -> list[_Entry]:
        return sorted(self._states[slot], key=lambda e: e.step)

    def _flat(self, entry: _Entry) -> tuple[Tensor, Tensor | None]:
        """The entry's flat parameters and momentum (read from its file on disk)."""
        if entry.path is None:
            assert entry.params is not None
            return entry.params, entry.momentum
        loaded = torch.load(entry.path, map_location="cpu", weights_only=True)
        params, momentum = loaded["params"], loaded["momentum"]
        if isinstance(params, dict):  # one tensor per parameter (written before flat states)
            params = entry.layout.flatten(params)
            if momentum is not None:
                assert entry.momentum_layout is not None
                momentum = entry.momentum_layout.flatten(momentum)
        return params, momentum

    def _load(self, entry: _Entry, device: torch.device | str | None) -> ReplayState:
        params, momentum = self._flat(entry)
        if device is not None:
            params = params.to(device)
            momentum = None if momentum is None else momentum.to(device)
        return ReplayState(entry.step, entry.layout.unflatten(params),
                           None if momentum is None or entry.momentum_layout is None
                           else entry.momentum_layout.unflatten(momentum))

    def state(self, slot: str, index: int, *, device: torch.device | str | None = None
              ) -> ReplayState:
        """The ``index``-th stored state of ``slot`` in step order, on ``device``.

        Its tensors are views of the stored flat state (on the buffer's own device, when
        ``device`` is that device or ``None``): read them, do not modify them in place.
        """
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

    def _stack(self, entries: Sequence[_Entry], device: torch.device | str | None, *,
               with_momentum: bool = True) -> FlatStates:
        layouts = {e.layout for e in entries}
        if len(layouts) != 1:
            raise ValueError("the states to stack have different parameter structures; store "
                             "the same named tensors (shapes, dtypes) for every state")
        layout = layouts.pop()
        flats = [self._flat(e) for e in entries]
        params = torch.stack([p for p, _ in flats])
        momentum = None
        if with_momentum and any(m is not None for _, m in flats):
            zeros = params.new_zeros(()).expand(layout.numel)
            momentum = torch.stack([zeros if m is None else _relayout(m, e.momentum_layout, layout)
                                    for e, (_, m) in zip(entries, flats, strict=True)])
        if device is not None:
            params = params.to(device)
            momentum = None if momentum is None else momentum.to(device)
        return FlatStates(layout, params, momentum)

    def flat_states(self, points: Sequence[tuple[str, int]], *,
                    device: torch.device | str | None = None) -> FlatStates:
        """The states at ``points`` (``(slot, index in step order)`` pairs), stacked flat.

        One stack of the stored flat tensors (one operation for all the states), for the
        vectorized replay.

        Raises:
            ValueError: a point is not in the buffer, or the states differ in structure.
        """
        ordered: dict[str, list[_Entry]] = {}
        entries = []
        for slot, index in points:
            self._check_slot(slot)
            if slot not in ordered:
                ordered[slot] = self._ordered(slot)
            if not 0 <= index < len(ordered[slot]):
                raise ValueError(f"index={index} is out of range for slot {slot!r} with "
                                 f"{len(ordered[slot])} states")
            entries.append(ordered[slot][index])
        if not entries:
            raise ValueError("points is empty; give at least one (slot, index) pair")
        return self._stack(entries, device)

    def flat_trajectory(self, slot: str, *, device: torch.device | str | None = None
                        ) -> FlatStates:
        """``trajectory(slot)`` stacked flat: ``params`` is ``[L, numel]``, the stored states
        then the terminal state (``momentum`` is ``None``)."""
        self._check_slot(slot)
        entries = self._ordered(slot)
        terminal = self._terminal.get(slot)
        if terminal is not None:
            entries.append(terminal)
        if not entries:
            raise ValueError(f"slot {slot!r} holds no states")
        return self._stack(entries, device, with_momentum=False)

    def nonfinite_slots(self) -> dict[str, int]:
        """Slots holding a NaN or infinite stored value, each with the step of its first one.

        Reading the flags of all states costs one host transfer. The terminal state
        (``finalize``) counts as the step after the last update.
        """
        entries = [(slot, e) for slot, states in self._states.items() for e in states]
        entries += list(self._terminal.items())
        if not entries:
            return {}
        flags = []
        for _, e in entries:
            if e.finite is None:
                assert e.params is not None
                e.finite = _all_finite(e.params, e.momentum)
            flags.append(e.finite)
        device = flags[0].device
        finite = torch.stack([flag.to(device) for flag in flags]).tolist()
        first: dict[str, int] = {}
        for (slot, e), ok in zip(entries, finite, strict=True):
            if not ok and (slot not in first or e.step < first[slot]):
                first[slot] = e.step
        return first

    def __len__(self) -> int:
        return sum(len(s) for s in self._states.values())

    # -- cleaning up -----------------------------------------------------------------------

    def clear(self) -> None:
        """Forgets every slot and deletes the stored files."""
        if not self.inmem:
            for entries in self._states.values():
                for entry in entries:
                    self._remove_file(entry)
            for entry in self._terminal.values():
                self._remove_file(entry)
            self._scratch.forget_written()
        self._data.clear()
        self._seen.clear()
        self._candidates.clear()
        self._states.clear()
        self._terminal.clear()

    def discard(self, slot: str) -> None:
        """Forgets one slot (its data, states and files), e.g. a task whose loss was not finite.

        Raises:
            ValueError: if ``slot`` is not in the buffer.
        """
        self._check_slot(slot)
        entries = list(self._states.pop(slot))
        terminal = self._terminal.pop(slot, None)
        for entry in entries + ([terminal] if terminal is not None else []):
            self._remove_file(entry)
        del self._data[slot], self._seen[slot], self._candidates[slot]

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

