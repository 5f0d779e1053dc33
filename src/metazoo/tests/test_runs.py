"""metazoo.runs: the run folder's lock, manifest, atomic writes, checked checkpoints and line
plans (issue 27). The experiments' own tests run the same cases end to end."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metazoo.cli import UsageError
from metazoo.runs import (
    LOCK_NAME,
    MACHINE_KEYS,
    MACHINE_NAME,
    MANIFEST_NAME,
    RunFolder,
    RunFolderError,
    RunLockedError,
    flag_differences,
    machine,
    path_inside,
)
from metazoo.serialization import load_checked, save_checked

FLAGS = {"seed": 1, "lr": 0.1, "steps": 10}


def _folder(path: Path) -> RunFolder:
    return RunFolder(path, program="test", resume_hint="run it again with --resume")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the lock ---------------------------------------------------------------------------------

def test_a_second_holder_is_refused_naming_host_and_pid(tmp_path):
    with _folder(tmp_path / "run") as first:
        first.write_text("log.txt", "a\n")
        with pytest.raises(RunLockedError) as info:
            _folder(tmp_path / "run").open()
        message = str(info.value)
        assert f"host {socket.gethostname()} pid {os.getpid()}" in message
        assert "nothing was changed" in message and "\n" not in message
        assert isinstance(info.value, UsageError)  # one error line from run_command
    with _folder(tmp_path / "run") as again:  # released on close
        assert again.files == ("log.txt",)


HOLDER = """
import sys, time
from metazoo.runs import RunFolder
folder = RunFolder(sys.argv[1], program="test").open()
folder.write_text("log.txt", "held\\n")
print("locked", flush=True)
time.sleep(120)
"""


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}\\)"):
            _folder(run).open()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    with _folder(run) as folder:  # no stale lock to clean: the kernel released it
        assert folder.files == ("log.txt",)


def test_a_refused_or_empty_open_leaves_no_trace(tmp_path):
    with _folder(tmp_path / "a" / "b"):
        pass
    assert not (tmp_path / "a").exists()  # the folders it made, and its lock file, are gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with _folder(tmp_path / "mine") as folder:
        assert folder.foreign() == ["notes.txt"]
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


# -- the manifest -----------------------------------------------------------------------------

def test_only_the_runs_files_are_replaced_or_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results_mine.log").write_text("the user's\n")
    with _folder(run) as folder:
        folder.write_text("args.log", "flags\n")
        folder.append_text("results_a.log", "1,x\n")
        assert folder.files == ("args.log", "results_a.log")
        assert folder.foreign() == ["results_mine.log"]
        with pytest.raises(RunFolderError, match="not written by this run"):
            folder.write_text("results_mine.log", "overwritten")
        with pytest.raises(ValueError, match="not the run's file"):
            folder.remove("results_mine.log")
        folder.clear()
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_NAME, MANIFEST_NAME,
                                                            "results_mine.log"])
    assert (run / "results_mine.log").read_text() == "the user's\n"


def test_only_recorded_temporaries_are_discarded(tmp_path):
    with _folder(tmp_path) as folder:
        folder.write_text("args.log", "a\n")
        recorded = json.loads(folder.manifest_path.read_text())["files"]["args.log"]
    lookalikes = [".args.log.backup.tmp", ".args.log.abc123.tmp"]
    for name in [recorded, *lookalikes]:
        (tmp_path / name).write_text("x")
    with _folder(tmp_path) as folder:
        assert folder.discard_temporaries() == [recorded]
    assert all((tmp_path / name).exists() for name in lookalikes)


def test_names_are_plain_and_paths_stay_inside_the_log_folder(tmp_path):
    assert path_inside(tmp_path, "leap", "s1") == tmp_path / "leap" / "s1"
    assert path_inside(tmp_path, "leap", "a/b") == tmp_path / "leap" / "a" / "b"
    for suffix in ("../../escape", "/abs", "", "a/../../b"):
        with pytest.raises(RunFolderError, match="--suffix"):
            path_inside(tmp_path, "leap", suffix, flags=("--meta_model", "--suffix"))
    (tmp_path / "leap").mkdir()
    (tmp_path / "leap" / "out").symlink_to(tmp_path.parent, target_is_directory=True)
    with pytest.raises(RunFolderError, match="leads outside"):
        path_inside(tmp_path, "leap", "out", flags=("--meta_model", "--suffix"))
    with _folder(tmp_path / "run") as folder, pytest.raises(RunFolderError, match="plain"):
        folder.write_text("../x", "no")


def test_a_folder_of_another_program_or_a_damaged_manifest_is_refused(tmp_path):
    with _folder(tmp_path) as folder:
        folder.write_text("a.txt", "a")
    with pytest.raises(RunFolderError, match="run folder of 'test', not of 'other'"):
        RunFolder(tmp_path, program="other").open()
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(RunFolderError, match="not a run manifest"):
        _folder(tmp_path).open()


def test_a_file_in_the_way_or_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "logs").write_text("a file")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        _folder(tmp_path / "logs" / "leap" / "s").open()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunFolderError, match=r"cannot create the run folder .*Read-only"):
        _folder(tmp_path / "other").open()


# -- writes that fail -------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
])
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, monkeypatch,
                                                                   failure):
    with _folder(tmp_path) as folder:
        folder.save_checkpoint("checkpoint.pt", {"step": 1, "w": torch.ones(3)}, FLAGS)
        before = _snapshot(tmp_path)
        real_save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)  # bytes written, then the disk is full
            raise failure

        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(RunFolderError) as info:
            folder.save_checkpoint("checkpoint.pt", {"step": 2, "w": torch.zeros(3)}, FLAGS)
        monkeypatch.undo()
        message = str(info.value)
        assert "\n" not in message and "previous checkpoint.pt is intact" in message
        assert "run it again with --resume" in message
        assert _snapshot(tmp_path) == before  # no temporary left, the old file intact
        assert folder.load_checkpoint("checkpoint.pt", FLAGS)["step"] == 1


def test_a_bug_in_torch_save_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("some internal error")

    monkeypatch.setattr(torch, "save", broken)
    with _folder(tmp_path) as folder, pytest.raises(RuntimeError, match="some internal") as info:
        folder.save_checkpoint("checkpoint.pt", {"step": 1}, FLAGS)
    assert not isinstance(info.value, RunFolderError)


# -- checkpoints ------------------------------------------------------------------------------

def test_a_checkpoint_carries_its_flags_and_producer(tmp_path):
    with _folder(tmp_path) as folder:
        folder.save_checkpoint("checkpoint.pt", {"step": 3}, FLAGS)
        stored = load_checked(tmp_path / "checkpoint.pt", require=True)
        assert stored["flags"] == FLAGS and stored["producer"]["program"] == "test"
        assert folder.load_checkpoint("checkpoint.pt", FLAGS) == {"step": 3, "flags": FLAGS}
        changed = {**FLAGS, "steps": 20, "lr": 0.2}
        with pytest.raises(RunFolderError, match=r"other flags \(--lr 0.1 -> 0.2; --steps"):
            folder.load_checkpoint("checkpoint.pt", changed)
        assert folder.load_checkpoint("checkpoint.pt", changed, may_change=["lr", "steps"])
    with RunFolder(tmp_path / "other", program="maze") as other:
        other.write_text("x", "")
        (tmp_path / "other" / "checkpoint.pt").write_bytes(
            (tmp_path / "checkpoint.pt").read_bytes())
        with pytest.raises(RunFolderError, match="written by 'test', not by 'maze'"):
            other.load_checkpoint("checkpoint.pt", FLAGS)


def test_a_checkpoint_without_flags_needs_the_trust_flag(tmp_path):
    with _folder(tmp_path) as folder:
        save_checked({"step": 3}, tmp_path / "checkpoint.pt")  # an older version's
        with pytest.raises(RunFolderError, match=r"does not record the flags .* pass "
                                                 r"--trust_checkpoint"):
            folder.load_checkpoint("checkpoint.pt", FLAGS)
        assert folder.load_checkpoint("checkpoint.pt", FLAGS, trust_unrecorded=True) == {
            "step": 3}


def test_a_dangling_checkpoint_link_is_named_as_one(tmp_path):
    with _folder(tmp_path) as folder:
        (tmp_path / "checkpoint.pt").symlink_to(tmp_path / "gone.pt")
        with pytest.raises(RunFolderError, match=r"symbolic link to .*gone\.pt, which does not"):
            folder.load_checkpoint("checkpoint.pt", FLAGS)


# -- logs -------------------------------------------------------------------------------------

def test_a_rewrite_plan_checks_every_line_before_anything_changes(tmp_path):
    def step_at_most_2(line: str) -> bool:
        return int(line.split(",", 1)[0]) <= 2

    with _folder(tmp_path) as folder:
        folder.append_text("a.log", "1,x\n2,x\n3,x\n4")  # a torn last line
        folder.append_text("b.log", "1,x\r\n")
        (tmp_path / "c.log").write_text("garbage\n")  # the user's: never read
        plan = folder.plan_rewrite(["a.log", "b.log", "c.log"], step_at_most_2)
        assert plan == {"a.log": "1,x\n2,x\n"}  # b.log unchanged (its \r\n kept)
        folder.append_text("b.log", "oops\n")
        before = _snapshot(tmp_path)
        with pytest.raises(RunFolderError, match=r"b.log line 2 \('oops'\) is not a line"):
            folder.plan_rewrite(["a.log", "b.log"], step_at_most_2)
        assert _snapshot(tmp_path) == before
        folder.rewrite(plan)
        assert (tmp_path / "a.log").read_text() == "1,x\n2,x\n"


def test_flag_differences_name_each_flag():
    assert flag_differences({"a": 1, "b": 2, "old": 0}, {"a": 1, "b": 3, "new": 1}) == [
        "--b 2 -> 3"]
    assert flag_differences({"b": 2}, {"b": 3}, may_change=["b"]) == []


def test_the_lock_is_held_while_the_process_lives(tmp_path):
    """flock, not a pid file: a second open in the same process is refused too (each open is
    its own lock), and closing releases it at once."""
    first = _folder(tmp_path).open()
    started = time.perf_counter()
    with pytest.raises(RunLockedError):
        _folder(tmp_path).open()
    assert time.perf_counter() - started < 5  # refused at once, never waits
    first.close()
    _folder(tmp_path).open().close()


# -- the machine record -----------------------------------------------------------------------

def test_the_machine_record_names_what_decides_the_rounding():
    record = machine()
    assert set(MACHINE_KEYS) <= set(record)
    assert record["torch"] == torch.__version__
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["threads"] == torch.get_num_threads()
    assert record["cpu"]  # a model name, never empty
    json.dumps(record)  # a plain record


def test_each_start_and_resume_is_recorded_and_another_kind_is_named(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with _folder(run) as folder:
        assert folder.record_machine("start") is None
    with _folder(run) as folder:  # the same machine: no note
        assert folder.record_machine("resume at step 5") is None
    import metazoo.runs as runs

    other = {**machine(), "cpu_capability": "AVX512", "threads": 7}
    monkeypatch.setattr(runs, "machine", lambda: other)
    with _folder(run) as folder:
        note = folder.record_machine("resume at step 9")
        assert folder.owns(MACHINE_NAME)
    assert note is not None and "\n" not in note
    assert f"cpu_capability {torch.backends.cpu.get_cpu_capability()!r} -> 'AVX512'" in note
    assert "threads" in note and "not bit-identical" in note
    records = json.loads((run / MACHINE_NAME).read_text())
    assert [r["event"] for r in records] == ["start", "resume at step 5", "resume at step 9"]
    assert records[2]["cpu_capability"] == "AVX512"


def test_an_unreadable_machine_record_starts_again(tmp_path):
    run = tmp_path / "run"
    with _folder(run) as folder:
        folder.write_text(MACHINE_NAME, "not json")
        assert folder.record_machine("start") is None
    assert [r["event"] for r in json.loads((run / MACHINE_NAME).read_text())] == ["start"]
