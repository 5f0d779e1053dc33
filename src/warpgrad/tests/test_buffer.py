"""ReplayBuffer: memory and disk storage, subsampling, loading and cleaning up."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from warpgrad import FlatLayout, ReplayBuffer
from warpgrad.scratch import LOCK_NAME


def _states_in(directory: str) -> list[str]:
    """The files of a disk buffer's directory other than its lock file (the manifest)."""
    return [f for f in os.listdir(directory) if f != LOCK_NAME]


def _params(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value, dtype=torch.float64),
            "b": torch.full((3,), -value, dtype=torch.float64)}


def _fill(buffer: ReplayBuffer, tasks: int = 3, steps: int = 15, momentum: bool = True) -> None:
    for t in range(tasks):
        slot = f"task{t}"
        buffer.init(slot, [t])
        for k in range(steps):
            buffer.update(slot, _params(100 * t + k),
                          {n: v * 0.5 for n, v in _params(k).items()} if momentum and k else None)
        buffer.finalize(slot, _params(100 * t + steps))


@pytest.mark.parametrize("inmem", [True, False])
def test_states_round_trip_in_order(inmem):
    buffer = ReplayBuffer(inmem=inmem)
    _fill(buffer)
    assert len(buffer) == 45
    assert buffer.slots() == ["task0", "task1", "task2"]
    for t, slot in enumerate(buffer.slots()):
        assert buffer.data(slot) == [t]
        states = buffer.states(slot)
        assert [s.step for s in states] == list(range(15))
        for k, s in enumerate(states):
            assert torch.equal(s.params["w"], _params(100 * t + k)["w"])
            assert s.params["w"].dtype == torch.float64
            if k == 0:
                assert s.momentum is None
            else:
                assert torch.equal(s.momentum["b"], _params(k)["b"] * 0.5)
        trajectory = buffer.trajectory(slot)
        assert len(trajectory) == 16
        assert torch.equal(trajectory[-1]["b"], _params(100 * t + 15)["b"])
        assert buffer.state(slot, 7).step == 7
    buffer.close()


def test_memory_states_are_copies():
    buffer = ReplayBuffer()
    buffer.init("a", [])
    p = _params(1.0)
    buffer.update("a", p)
    p["w"].add_(5)
    assert torch.equal(buffer.state("a", 0).params["w"], _params(1.0)["w"])


def test_disk_mode_loads_with_weights_only_writes_atomically_and_cleans_up(monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    buffer = ReplayBuffer(inmem=False)
    directory = buffer.tmpdir
    _fill(buffer, tasks=2, steps=4)
    files = _states_in(directory)
    assert len(files) == 2 * 4 + 2  # states plus terminal states
    assert not any(f.endswith(".partial") or f.endswith(".tmp") for f in files)
    buffer.states("task1")
    buffer.terminal("task0")
    assert calls and all(c is True for c in calls)
    buffer.clear()
    assert _states_in(directory) == []
    # The manifest forgets the deleted files, so it does not grow over a long run.
    with open(os.path.join(directory, LOCK_NAME)) as manifest:
        assert len(manifest.read().splitlines()) == 1
    assert len(buffer) == 0 and buffer.slots() == []
    _fill(buffer, tasks=1, steps=2)
    del buffer
    gc.collect()
    assert not os.path.exists(directory)


def test_disk_mode_under_given_tmpdir_and_close(tmp_path):
    buffer = ReplayBuffer(inmem=False, tmpdir=tmp_path)
    assert os.path.dirname(buffer.tmpdir) == str(tmp_path)
    _fill(buffer, tasks=1, steps=3)
    buffer.close()
    assert not os.path.exists(buffer.tmpdir)
    assert os.path.exists(tmp_path)


@pytest.mark.parametrize("inmem", [True, False])
def test_every_keeps_a_regular_subsample(inmem):
    buffer = ReplayBuffer(inmem=inmem, every=4)
    _fill(buffer, tasks=1, steps=15)
    assert [s.step for s in buffer.states("task0")] == [0, 4, 8, 12]
    assert torch.equal(buffer.state("task0", 2).params["w"], _params(8)["w"])
    buffer.close()


@pytest.mark.parametrize("inmem", [True, False])
def test_max_states_caps_with_a_uniform_subsample(inmem):
    buffer = ReplayBuffer(inmem=inmem, max_states=5, seed=0)
    _fill(buffer, tasks=2, steps=40)
    for slot in buffer.slots():
        steps = [s.step for s in buffer.states(slot)]
        assert len(steps) == 5 and steps == sorted(steps) and len(set(steps)) == 5
        for s in buffer.states(slot):  # each kept state is the one recorded at its step
            t = int(slot[-1])
            assert torch.equal(s.params["w"], _params(100 * t + s.step)["w"])
    if not inmem:
        assert len(_states_in(buffer.tmpdir)) == 2 * 5 + 2  # replaced files were deleted
    # Reservoir sampling keeps late states too (not just the first five).
    kept = [s.step for slot in buffer.slots() for s in buffer.states(slot)]
    assert max(kept) >= 5
    buffer.close()


def test_max_states_is_uniform_over_many_draws():
    counts = torch.zeros(20)
    for seed in range(300):
        buffer = ReplayBuffer(max_states=4, seed=seed)
        buffer.init("a", [])
        for k in range(20):
            buffer.update("a", {"w": torch.tensor([float(k)])})
        for s in buffer.states("a"):
            counts[s.step] += 1
    # Each step is kept with probability 4/20 = 0.2: 60 of 300 expected.
    assert counts.min() > 30 and counts.max() < 95


def test_errors_name_the_fix(tmp_path):
    buffer = ReplayBuffer()
    buffer.init("a", [])
    with pytest.raises(ValueError, match="already in the buffer"):
        buffer.init("a", [])
    with pytest.raises(ValueError, match="call init"):
        buffer.update("b", _params(0))
    with pytest.raises(ValueError, match="every=0"):
        ReplayBuffer(every=0)
    with pytest.raises(ValueError, match="max_states=0"):
        ReplayBuffer(max_states=0)
    with pytest.raises(ValueError, match="only used with inmem=False"):
        ReplayBuffer(tmpdir=tmp_path)
    with pytest.raises(ValueError, match="not an existing directory"):
        ReplayBuffer(inmem=False, tmpdir=tmp_path / "missing")
    with pytest.raises(ValueError, match="out of range"):
        buffer.state("a", 0)


class _Payload:
    """An object whose unpickling would run code (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_disk_file_is_refused_without_running_code(tmp_path):
    import pickle

    buffer = ReplayBuffer(inmem=False)
    _fill(buffer, tasks=1, steps=2)
    marker = tmp_path / "pwned"
    name = sorted(f for f in _states_in(buffer.tmpdir) if "terminal" not in f)[0]
    torch.save({"step": 0, "params": _Payload(str(marker)), "momentum": None},
               os.path.join(buffer.tmpdir, name))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        buffer.states("task0")
    assert not marker.exists()
    buffer.close()


@pytest.mark.parametrize("inmem", [True, False])
def test_discard_forgets_one_slot_and_its_files(inmem):
    buffer = ReplayBuffer(inmem=inmem)
    _fill(buffer, tasks=2, steps=3)
    buffer.discard("task0")
    assert buffer.slots() == ["task1"] and len(buffer) == 3
    if not inmem:
        assert sorted(_states_in(buffer.tmpdir)) == sorted(
            f for f in _states_in(buffer.tmpdir) if f.startswith("task1"))
        assert len(_states_in(buffer.tmpdir)) == 4
    with pytest.raises(ValueError, match="slot 'task0' is not in the buffer"):
        buffer.discard("task0")
    buffer.init("task0", [1])  # the name is free again
    buffer.close()


@pytest.mark.parametrize("slot", ["../../outside", "absolute", "a/b", "..", 7])
def test_slot_names_never_become_paths(tmp_path, slot):
    """Issue 18 bug 9: ``init("../../outside")`` wrote the state files outside the folder."""
    if slot == "absolute":
        slot = str(tmp_path / "absolute")  # an absolute path that stays inside tmp_path
    (tmp_path / "inner").mkdir()
    buffer = ReplayBuffer(inmem=False, tmpdir=tmp_path / "inner")
    buffer.init(slot, [])
    buffer.update(slot, _params(1.0))
    buffer.finalize(slot, _params(2.0))
    written = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files
               if f != LOCK_NAME]
    assert len(written) == 2
    assert all(os.path.dirname(f) == buffer.tmpdir for f in written), written
    assert torch.equal(buffer.states(slot)[0].params["w"], _params(1.0)["w"])
    assert torch.equal(buffer.terminal(slot).params["b"], _params(2.0)["b"])
    buffer.close()


def test_folders_named_like_a_dead_process_buffer_are_left_alone(tmp_path):
    """Issue 28 item 2: a folder named like a buffer of a dead pid lost its state-like files.
    Names and pids prove nothing: without a manifest under a free lock, nothing is deleted."""
    import hashlib
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    dead = 2**31 - 2  # no such process
    lookalike = tmp_path / f"warpgrad_replay_{host}_{dead}_abc"
    lookalike.mkdir()
    (lookalike / "task0_3_12.pt").write_bytes(b"the user's")
    (lookalike / ".task0_terminal_13.pt.abc_12.tmp").write_bytes(b"the user's too")
    planted = tmp_path / "warpgrad_replay_planted"
    planted.mkdir()
    (planted / LOCK_NAME).symlink_to(tmp_path / "elsewhere.lock")  # not followed
    (planted / "task0_1_1.pt").write_bytes(b"kept")
    buffer = ReplayBuffer(inmem=False, tmpdir=tmp_path)
    assert buffer.removed_orphans == []
    assert sorted(os.listdir(lookalike)) == [".task0_terminal_13.pt.abc_12.tmp", "task0_3_12.pt"]
    assert sorted(os.listdir(planted)) == [LOCK_NAME, "task0_1_1.pt"]
    buffer.close()


_OWNER = textwrap.dedent("""
    import sys, torch
    from warpgrad import ReplayBuffer
    buffer = ReplayBuffer(inmem=False, tmpdir=sys.argv[1])
    buffer.init("task", [0])
    for k in range(3):
        buffer.update("task", {"w": torch.full((2,), float(k))})
    print(buffer.tmpdir, flush=True)
    sys.stdin.readline()  # stays alive until told to replay
    print(sum(float(s.params["w"].sum()) for s in buffer.states("task")), flush=True)
    sys.stdin.readline()  # alive until killed
""")


def _start_owner(parent, isolated: bool) -> tuple[subprocess.Popen, str]:
    """A process that owns a disk buffer under ``parent``; with ``isolated``, in its own PID
    namespace (as in a container sharing the temporary folder), where that works."""
    command = [sys.executable, "-c", _OWNER, str(parent)]
    if isolated:
        command = ["unshare", "--user", "--map-root-user", "--pid", "--fork", *command]
    owner = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             start_new_session=True)
    return owner, owner.stdout.readline().strip()


def _kill(owner: subprocess.Popen, directory: str) -> None:
    """SIGKILL to the owner's process group (unshare and the python it forked): it gets no
    chance to clean up. Returns once the kernel has dropped the dead owner's lock."""
    import fcntl
    import time

    os.killpg(owner.pid, signal.SIGKILL)
    owner.wait()
    owner.stdin.close()
    owner.stdout.close()
    deadline = time.monotonic() + 20
    with open(os.path.join(directory, LOCK_NAME)) as lock:
        while True:  # unshare's child may take a moment longer to die than unshare
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                assert time.monotonic() < deadline, "the killed owner still holds its lock"
                time.sleep(0.05)


def _can_isolate() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "true"],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.parametrize("isolated", [False, True])
def test_a_live_buffer_of_another_process_is_kept_and_a_killed_ones_files_removed(
        tmp_path, isolated):
    """Ownership is an OS file lock held by the owner: a live buffer (another process, or one in
    another PID namespace, whose pid means nothing here) is never touched; once its owner is
    killed (-9: no clean-up at exit), the next buffer removes exactly the files it wrote."""
    if isolated and not _can_isolate():
        pytest.skip("unshare of a user and PID namespace is not permitted here")
    owner, directory = _start_owner(tmp_path, isolated)
    try:
        assert os.path.isdir(directory), directory
        other = ReplayBuffer(inmem=False, tmpdir=tmp_path)
        assert other.removed_orphans == [] and len(_states_in(directory)) == 3
        owner.stdin.write("replay\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "6.0"  # 2 * (0 + 1 + 2): its replay works
    finally:
        _kill(owner, directory)
    other.close()
    # Killed while owning a buffer: the next buffer removes it, files and folder.
    owner, directory = _start_owner(tmp_path, isolated)
    _kill(owner, directory)
    assert len(_states_in(directory)) == 3
    cleaner = ReplayBuffer(inmem=False, tmpdir=tmp_path)
    assert cleaner.removed_orphans == [directory] and not os.path.exists(directory)
    cleaner.close()
    # A file someone else put into a dead buffer's folder stays, and so does the folder.
    owner, directory = _start_owner(tmp_path, isolated)
    _kill(owner, directory)
    with open(os.path.join(directory, "notes.txt"), "w") as f:
        f.write("the user's")
    cleaner = ReplayBuffer(inmem=False, tmpdir=tmp_path)
    assert cleaner.removed_orphans == [] and os.listdir(directory) == ["notes.txt"]
    cleaner.close()
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(directory)]


def test_a_forked_child_leaves_its_parents_buffer_alone(tmp_path):
    buffer = ReplayBuffer(inmem=False, tmpdir=tmp_path)
    _fill(buffer, tasks=1, steps=2)
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the buffer (its finalizer runs)
        try:
            del buffer
            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(_states_in(buffer.tmpdir)) == 3
    assert len(buffer.states("task0")) == 2
    buffer.close()
    assert os.listdir(tmp_path) == []


def test_an_unwritable_tmpdir_is_one_line_naming_it(tmp_path, monkeypatch):
    """Found by the issue 28 probe: a raw PermissionError from mkdtemp (simulated: the tests
    may run as root, whom permissions do not stop)."""
    import errno
    import tempfile

    def refuse(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError, match=rf"tmpdir='{tmp_path}': cannot create the replay "
                       r"buffer's folder there \(Permission denied\); pass a writable tmpdir"):
        ReplayBuffer(inmem=False, tmpdir=tmp_path)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("inmem", [True, False])
def test_each_state_is_one_flat_tensor_stored_in_one_operation(inmem):
    """Storing a state of many tensors is one ``cat`` (no copy per tensor); reading it gives
    views of one storage."""
    buffer = ReplayBuffer(inmem=inmem)
    buffer.init("a", [])
    params = {f"p{i}": torch.full((i + 1, 2), float(i), dtype=torch.float64) for i in range(12)}
    momentum = {n: t * 0.5 for n, t in params.items()}
    with _OpCounter() as counter:
        buffer.update("a", params, momentum)
    if inmem:
        assert counter.ops == ["aten.cat.default"] * 2  # params, momentum
    state = buffer.state("a", 0)
    storages = {t.untyped_storage().data_ptr() for t in state.params.values()}
    assert len(storages) == 1
    for n, t in params.items():
        assert torch.equal(state.params[n], t)
        assert torch.equal(state.momentum[n], t * 0.5)
    buffer.close()


@pytest.mark.parametrize("inmem", [True, False])
@pytest.mark.parametrize("options", [{}, {"every": 3}, {"max_states": 4, "seed": 2}])
def test_record_stores_what_update_and_finalize_store(inmem, options, tmp_path):
    """``record`` (a whole flat trajectory at once) == ``update`` per step + ``finalize``."""
    steps = 9
    path = [_params(float(k)) for k in range(steps + 1)]
    momenta = [{n: v * 0.5 for n, v in _params(float(k)).items()} for k in range(steps)]
    kwargs = {"tmpdir": tmp_path} if not inmem else {}
    updated = ReplayBuffer(inmem=inmem, **kwargs, **options)
    recorded = ReplayBuffer(inmem=inmem, **kwargs, **options)
    for buffer in (updated, recorded):
        buffer.init("t", ["data"])
    for k in range(steps):
        updated.update("t", path[k], momenta[k] if k else None)
    updated.finalize("t", path[-1])
    layout = FlatLayout.of(path[0])
    trajectory = torch.stack([layout.flatten(p) for p in path])
    momentum = torch.stack([layout.flatten(m) for m in momenta[1:]])
    recorded.record("t", trajectory, layout=layout, momentum=momentum)
    trajectory.add_(1000)  # copied (copy=True): the caller's tensor may change afterwards
    expected, got = updated.states("t"), recorded.states("t")
    assert [s.step for s in got] == [s.step for s in expected] and got
    for s, e in zip(got, expected, strict=True):
        assert s.params.keys() == e.params.keys()
        assert all(torch.equal(s.params[n], e.params[n]) for n in e.params)
        assert (s.momentum is None) == (e.momentum is None)
        assert all(torch.equal(s.momentum[n], e.momentum[n]) for n in e.momentum or {})
    assert all(torch.equal(recorded.terminal("t").params[n], path[-1][n]) for n in path[-1])
    flat = recorded.flat_states([("t", i) for i in range(len(got))])
    assert flat.layout is layout
    assert torch.equal(flat.params, torch.stack([layout.flatten(s.params) for s in expected]))
    assert torch.equal(flat.momentum, torch.stack(
        [torch.zeros(layout.numel, dtype=torch.float64) if s.momentum is None
         else layout.flatten(s.momentum) for s in expected]))
    whole = recorded.flat_trajectory("t")
    assert torch.equal(whole.params, torch.stack([layout.flatten(p) for p in
                                                  updated.trajectory("t")]))
    if inmem and options:  # the kept rows own their memory: max_states bounds it
        for entry in [*recorded._states["t"], recorded._terminal["t"]]:
            assert entry.params.untyped_storage().nbytes() < trajectory.untyped_storage().nbytes()
    with pytest.raises(ValueError, match=r"momentum must be \[K - 1, 9\]"):
        recorded.init("u", [])
        recorded.record("u", trajectory, layout=layout, momentum=momentum[:2])
    updated.close()
    recorded.close()


def test_states_written_one_tensor_per_parameter_still_load(monkeypatch):
    """Files in the per-parameter format of earlier versions load through the same reader."""
    import warpgrad.buffer

    real_save = warpgrad.buffer._save_state

    def old_format(obj, path):
        layout = FlatLayout.of(_params(0.0))
        real_save({"step": obj["step"], "params": dict(layout.unflatten(obj["params"])),
                   "momentum": None if obj["momentum"] is None
                   else dict(layout.unflatten(obj["momentum"]))}, path)

    monkeypatch.setattr(warpgrad.buffer, "_save_state", old_format)
    buffer = ReplayBuffer(inmem=False)
    _fill(buffer, tasks=1, steps=3)
    states = buffer.states("task0")
    assert torch.equal(states[2].params["w"], _params(2.0)["w"])
    assert torch.equal(states[2].momentum["b"], _params(2.0)["b"] * 0.5)
    assert torch.equal(buffer.flat_states([("task0", 1)]).params[0],
                       FlatLayout.of(_params(1.0)).flatten(_params(1.0)))
    buffer.close()


def test_momentum_in_another_memory_order_is_stacked_in_the_parameters_layout():
    """A momentum buffer may be laid out unlike its parameter (strides of the gradient);
    ``flat_states`` gives it in the parameters' layout."""
    buffer = ReplayBuffer()
    buffer.init("a", [])
    params = {"w": torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last),
              "b": torch.randn(3)}
    momentum = {"w": torch.randn(2, 3, 2, 2), "b": torch.randn(3)}
    buffer.update("a", params, None)
    buffer.update("a", params, momentum)
    flat = buffer.flat_states([("a", 0), ("a", 1)])
    back = flat.layout.unflatten(flat.momentum[1])
    assert torch.equal(back["w"], momentum["w"]) and torch.equal(back["b"], momentum["b"])
    assert not flat.momentum[0].any()
    buffer.update("a", params, {"w": momentum["w"]})
    with pytest.raises(ValueError, match="momentum of a stored state has other tensors"):
        buffer.flat_states([("a", 2)])
