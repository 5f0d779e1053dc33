"""main.py and run_multi.py on their run folders (issue 27): a live run's lock, a run that died
before its first checkpoint, refused resumes that keep everything, checkpoints without flags,
stale sweep results, paths that escape, the user's files, full disks, and kill -9 at random
moments (in a meta-step and inside checkpoint writes) resumed to the uninterrupted run's logs."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
import run_multi
from metazoo.cli import run_command
from metazoo.serialization import load_checked, save_checked
from metazoo.testing import kill_at_call_command

MAIN = Path(main.__file__)


def _same_run(a: Path, b: Path, same_log_files) -> None:
    same_log_files(a, b, 8)
    assert (a / "split.json").read_text() == (b / "split.json").read_text()
    assert json.loads((a / "done.json").read_text()) == json.loads((b / "done.json").read_text())


def _wait_for_lines(proc: subprocess.Popen, log: Path, lines: int) -> None:
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= lines):
        assert proc.poll() is None, "the run ended before it was checked"
        assert time.monotonic() < deadline, "the run logged too slowly"
        time.sleep(0.01)


# -- case 1: a second process on a live run ---------------------------------------------------

def test_a_second_process_on_a_live_run_is_refused_naming_the_holder(
        tiny, omniglot_root, tmp_path, one_line_exit_2):
    argv = [*tiny(omniglot_root, tmp_path, "leap", "--meta_train_steps", "100000",
                  "--test_ival", "0", "--threads", "1"), "--suffix", "s"]
    proc = subprocess.Popen([sys.executable, str(MAIN), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "leap" / "s" / "results_train_train.log"
    try:
        _wait_for_lines(proc, log, 2)
        for flag in ("--resume", "--overwrite"):
            err = one_line_exit_2([*argv, "--meta_train_steps", "3", flag])
            assert f"pid {proc.pid})" in err and "in use by another live process (host " in err
        lines = len(log.read_text().splitlines())
        _wait_for_lines(proc, log, lines + 2)  # the first run goes on, untouched
    finally:
        proc.kill()
        proc.wait()
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines(keepends=True)
             if line.endswith("\n")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no repeated steps


# -- case 2: a run that died before its first checkpoint --------------------------------------

@pytest.mark.parametrize("call", [1, 3, 8])
def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(
        tiny, omniglot_root, tmp_path, same_log_files, call):
    """Killed (SIGKILL) at its call-th atomic rename, before checkpoint.pt exists: args.log and
    split.json written or half-written, the step-0 validation logged or not."""
    argv = [*tiny(omniglot_root, tmp_path, "leap"), "--suffix", "k"]
    killed = subprocess.run(kill_at_call_command(MAIN, argv, function="replace", call=call),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    run = tmp_path / "leap" / "k"
    assert not (run / "checkpoint.pt").exists()
    main.main([*argv, "--resume"])
    main.main([*argv[:-1], "straight"])
    _same_run(tmp_path / "leap" / "straight", run, same_log_files)


def test_a_run_that_died_before_its_checkpoint_is_not_restarted_under_other_flags(
        tiny, omniglot_root, tmp_path, monkeypatch, one_line_exit_2, snapshot):
    argv = [*tiny(omniglot_root, tmp_path, "leap"), "--suffix", "k"]

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops at its first checkpoint

    monkeypatch.setattr(main, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        main.main(argv)
    monkeypatch.undo()
    run = tmp_path / "leap" / "k"
    before = snapshot(run)
    err = one_line_exit_2([*argv, "--resume", "--seed", "3"])
    assert "--seed 8879 -> 3" in err and snapshot(run) == before
    assert "--resume" in one_line_exit_2(argv)  # a plain start names the way on
    main.main([*argv, "--resume"])
    assert json.loads((run / "done.json").read_text())["step"] == 2


# -- case 3: a refused resume deletes nothing -------------------------------------------------

def test_a_malformed_log_line_refuses_the_resume_before_anything_changes(
        tiny, omniglot_root, tmp_path, one_line_exit_2, snapshot):
    argv = tiny(omniglot_root, tmp_path, "maml")
    main.main(argv)
    run = tmp_path / "maml" / "tmp"
    with open(run / "results_train_val.log", "a") as f:
        f.write("x,not a line of the run\n")
    before = snapshot(run)
    assert any("_test_" in name for name in before) and "done.json" in before
    err = one_line_exit_2([*argv, "--resume"])
    assert "results_train_val.log line 3" in err and "nothing was changed" in err
    assert snapshot(run) == before


def test_a_users_log_in_the_run_folder_is_never_read_or_trimmed(tiny, omniglot_root, tmp_path):
    argv = tiny(omniglot_root, tmp_path, "maml")
    main.main([*argv, "--meta_train_steps", "1"])
    run = tmp_path / "maml" / "tmp"
    (run / "results_notes.log").write_text("my notes: step 2 looked odd\n")
    main.main([*argv, "--resume"])
    assert (run / "results_notes.log").read_text() == "my notes: step 2 looked odd\n"
    assert json.loads((run / "done.json").read_text())["step"] == 2


# -- case 4: a checkpoint without stored flags ------------------------------------------------

@pytest.mark.parametrize("saved,resumed", [("leap", "reptile"), ("maml", "fomaml")])
def test_a_checkpoint_without_flags_is_refused_unless_trusted(
        tiny, omniglot_root, tmp_path, saved, resumed, one_line_exit_2, snapshot):
    main.main(tiny(omniglot_root, tmp_path, saved, "--meta_train_steps", "1"))
    argv = tiny(omniglot_root, tmp_path, resumed)
    main.main([*argv, "--meta_train_steps", "1"])
    run = tmp_path / resumed / "tmp"
    state = load_checked(tmp_path / saved / "tmp" / "checkpoint.pt")
    del state["flags"], state["producer"]
    save_checked(state, run / "checkpoint.pt")  # re-saved without its flags: a valid checksum
    (run / "args.log").unlink()
    before = snapshot(run)
    err = one_line_exit_2([*argv, "--resume"])
    assert "does not record the flags" in err and "--trust_checkpoint" in err
    assert snapshot(run) == before
    main.main([*argv, "--resume", "--trust_checkpoint"])  # the user vouches for it
    assert json.loads((run / "done.json").read_text())["step"] == 2


# -- case 5: run_multi.py and stale results ---------------------------------------------------

def test_the_sweep_reports_a_finished_run_of_other_flags_as_an_error(
        omniglot_root, tmp_path, capsys, tiny):
    argv = ["--methods", "no", "--num_pretrain", "2", "--seeds", "1", "--log_dir",
            str(tmp_path), "--", *tiny(omniglot_root, None, None), "--threads", "1"]
    assert run_multi.main(argv) == 0
    capsys.readouterr()
    assert run_multi.main([*argv, "--num_filters", "8"]) == 1
    out = capsys.readouterr().out
    assert "skipped (done)" not in out
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "--num_filters 4 -> 8" in errors[0]
    assert "failed (a finished run of other flags)" in out


def test_the_sweep_eta_covers_running_and_pending_runs():
    # two slots: runs of 100 s; one has 40 s left, one 70 s; two pending start at 40 and 70
    assert run_multi.sweep_eta([(60.0, 40.0), (30.0, 70.0)], [100.0], 2, 2) == pytest.approx(
        170.0)
    assert run_multi.sweep_eta([(5.0, None)], [], 3, 1) != run_multi.sweep_eta([(5.0, None)],
                                                                               [], 0, 1)
    assert run_multi.sweep_eta([(5.0, None)], [], 3, 1) != run_multi.sweep_eta(
        [(5.0, None)], [10.0], 3, 1)
    assert run_multi.sweep_eta([(5.0, None)], [10.0], 2, 1) == pytest.approx(5.0 + 20.0)
    assert str(run_multi.sweep_eta([(5.0, None)], [], 3, 1)) == "nan"  # nothing known yet


# -- case 6: paths that escape ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["../../escape", "/abs"])
def test_a_suffix_cannot_lead_out_of_the_log_folder(
        tiny, omniglot_root, tmp_path, suffix, one_line_exit_2):
    logs = tmp_path / "logs"
    value = str(tmp_path / "abs") if suffix == "/abs" else suffix
    err = one_line_exit_2([*tiny(omniglot_root, logs, "no"), "--suffix", value])
    assert f"--suffix {value!r}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["logs"])
    assert not list(tmp_path.rglob("*.log"))


# -- case 7: the user's files -----------------------------------------------------------------

def test_overwrite_keeps_a_users_file_named_like_a_log(tiny, omniglot_root, tmp_path):
    argv = tiny(omniglot_root, tmp_path, "no")
    main.main(argv)
    run = tmp_path / "no" / "tmp"
    (run / "results_my_summary.log").write_text("mine\n")
    main.main([*argv, "--overwrite"])
    assert (run / "results_my_summary.log").read_text() == "mine\n"


def test_resume_keeps_a_users_file_named_like_a_temporary(tiny, omniglot_root, tmp_path):
    argv = tiny(omniglot_root, tmp_path, "no", "--meta_train_steps", "1")
    main.main(argv)
    run = tmp_path / "no" / "tmp"
    (run / ".args.log.backup.tmp").write_text("mine")
    main.main([*argv, "--resume"])
    assert (run / ".args.log.backup.tmp").read_text() == "mine"


# -- case 8: full disks, unusable folders -----------------------------------------------------

@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
])
def test_a_full_disk_is_one_line_the_checkpoint_stays_and_the_run_resumes(
        tiny, omniglot_root, tmp_path, monkeypatch, same_log_files, failure, one_line_exit_2):
    argv = [*tiny(omniglot_root, tmp_path, "warp_leap", "--meta_train_steps", "3"),
            "--suffix", "full"]
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(1)
        real_save(obj, f, *args, **kwargs)
        if len(saves) == 3:  # the checkpoint of step 2: written, then the disk is full
            raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_exit_2(argv)
    monkeypatch.undo()
    assert "could not write" in err and "previous checkpoint.pt is intact" in err
    assert "--resume" in err
    run = tmp_path / "warp_leap" / "full"
    assert load_checked(run / "checkpoint.pt")["step"] == 1
    main.main([*argv, "--resume"])
    main.main([*argv[:-1], "straight"])
    _same_run(tmp_path / "warp_leap" / "straight", run, same_log_files)


def test_a_log_dir_that_is_a_file_or_read_only_is_one_line(
        tiny, omniglot_root, tmp_path, monkeypatch, one_line_exit_2):
    (tmp_path / "file").write_text("not a folder")
    err = one_line_exit_2(tiny(omniglot_root, tmp_path / "file", "no"))
    assert "is a file, not a folder" in err

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)  # as root, chmod would not stop the run
    err = one_line_exit_2(tiny(omniglot_root, tmp_path / "ro", "no"))
    assert "Read-only file system" in err


def test_a_dangling_checkpoint_link_is_named_as_one(tiny, omniglot_root, tmp_path, one_line_exit_2):
    argv = tiny(omniglot_root, tmp_path, "leap", "--meta_train_steps", "1")
    main.main(argv)
    run = tmp_path / "leap" / "tmp"
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").symlink_to(tmp_path / "moved" / "checkpoint.pt")
    err = one_line_exit_2([*argv, "--resume"])
    assert "is a symbolic link to" in err and "which does not exist" in err


def test_the_lightning_command_keeps_its_folder_inside_the_log_folder(
        tiny, omniglot_root, tmp_path, capsys):
    pytest.importorskip("lightning")
    import lightning_main

    with pytest.raises(SystemExit) as exit_info:
        run_command(lightning_main.main_lightning,
                    [*tiny(omniglot_root, tmp_path / "logs", "leap"), "--suffix", "../../../x"])
    assert exit_info.value.code == 2
    assert "--suffix '../../../x'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "logs").exists()
