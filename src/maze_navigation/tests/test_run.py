"""Tests of the command line: options, logging, checkpoints, resume."""

import csv
import errno
import json
import shlex

import pytest
import torch

import run
from metazoo.cli import UsageError
from train import TrainConfig

TINY = shlex.split(
    "--hs 6 --bs 2 --eplen 10 --msize 7 --random_episodes 2 "
    "--meta_update_ival 2 --dtype float64 --pe 1"
)


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _argv(spec):
    """'name value name value ...' -> ['--name', 'value', ...]."""
    words = spec.split()
    return [w if i % 2 else f"--{w}" for i, w in enumerate(words)]


def test_short_aliases_match_spelled_out_options():
    short = run.build_parser().parse_args(
        _argv(
            "rngseed 3 rew 5 wp 0.1 bent 0.02 blossv 0.2 msize 9 gr 0.8 gc 2 eplen 50 hs 20 "
            "bs 4 nbiter 7 save_every 3 pe 2 learning_rate 0.01 meta_learning_rate 0.02 "
            "meta_update_ival 5"
        )
    )
    long = run.build_parser().parse_args(
        _argv(
            "seed 3 reward 5 wall_penalty 0.1 concentration 0.02 value_coef 0.2 maze_size 9 "
            "discount 0.8 grad_clip 2 episode_length 50 hidden_size 20 batch_size 4 "
            "num_episodes 7 save_every 3 print_every 2 learning_rate 0.01 "
            "meta_learning_rate 0.02 meta_update_ival 5"
        )
    )
    assert vars(short) == vars(long)
    config = run._config(short)
    assert config == TrainConfig(
        seed=3,
        reward=5.0,
        wall_penalty=0.1,
        concentration=0.02,
        value_coef=0.2,
        maze_size=9,
        discount=0.8,
        grad_clip=2.0,
        episode_length=50,
        hidden_size=20,
        batch_size=4,
        num_episodes=7,
        learning_rate=0.01,
        meta_learning_rate=0.02,
        meta_update_ival=5,
    )


def test_defaults_are_the_reference_hyperparameters():
    c = run._config(run.build_parser().parse_args([]))
    assert (c.discount, c.value_coef, c.concentration, c.grad_clip) == (0.9, 0.1, 0.03, 4.0)
    assert (c.learning_rate, c.meta_learning_rate, c.meta_update_ival) == (1e-3, 1e-3, 30)
    assert (c.maze_size, c.episode_length, c.reward, c.wall_penalty) == (13, 200, 10.0, 0.0)


@pytest.mark.parametrize("agent", ["warp", "lstm"])
def test_run_logs_checkpoints_and_resumes_exactly(tmp_path, agent):
    straight = run.main([*TINY, "--agent", agent, "--nbiter", "5", "--out", str(tmp_path / "a")])
    part = tmp_path / "b"
    run.main([*TINY, "--agent", agent, "--nbiter", "3", "--save_every", "2", "--out", str(part)])
    assert (part / "checkpoint.pt").exists()
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert state["episode"] == 3 and state["config"]["agent"] == agent
    with pytest.raises(UsageError, match=r"already holds a run .*--resume"):
        run.main([*TINY, "--agent", agent, "--nbiter", "5", "--out", str(part)])
    resumed = run.main([*TINY, "--agent", agent, "--nbiter", "5", "--out", str(part), "--resume"])
    rows_a, rows_b = read_csv(tmp_path / "a" / "rewards.csv"), read_csv(part / "rewards.csv")
    assert [r["episode"] for r in rows_b] == ["0", "1", "2", "3", "4"]
    assert rows_a == rows_b
    assert resumed["last_10pct_reward"] == straight["last_10pct_reward"]
    assert resumed["random_policy_reward"] == straight["random_policy_reward"]
    summary = json.loads((part / "summary.json").read_text())
    assert summary["episodes"] == 5 and summary["config"]["agent"] == agent
    assert summary["meta_updates"] == (2 if agent == "warp" else 0)
    assert summary["last_10pct_reward"] == float(rows_b[-1]["mean_reward"])
    # machine.json: the machine kind of the start and of the resume
    records = json.loads((part / "machine.json").read_text())
    assert [r["event"] for r in records] == ["start", "resume at episode 3"]
    assert records[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_resume_discards_episodes_logged_after_the_checkpoint(tmp_path):
    out = tmp_path / "r"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "4", "--save_every", "2", "--out", str(out)])
    # Simulate a crash after episode 2's checkpoint: rewind the checkpoint to episode 2.
    short = tmp_path / "s"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "2", "--out", str(short)])
    (out / "checkpoint.pt").write_bytes((short / "checkpoint.pt").read_bytes())
    run.main([*TINY, "--agent", "lstm", "--nbiter", "4", "--out", str(out), "--resume"])
    assert [r["episode"] for r in read_csv(out / "rewards.csv")] == ["0", "1", "2", "3"]


def test_bad_cli_values_raise(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        run.main([*TINY, "--save_every", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="hidden_size"):
        run.main(["--hs", "0", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def _wait_for_rows(proc, out, rows):
    import time

    deadline = time.monotonic() + 60
    # Polls while the run writes: only complete lines count (see run._read_rewards).
    while len(run._read_rewards(out / "rewards.csv", upto=10**9)) < rows:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run logged too slowly"
        time.sleep(0.005)


def _popen(argv):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(run.__file__).resolve()
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)


def _sigkill(proc):
    import signal

    try:
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_run_killed_with_sigkill_resumes_to_the_same_log(tmp_path):
    """A real process is SIGKILLed mid-run (after a checkpoint, with episodes logged past it),
    then twice inside atomic writes (checkpoint, log rewrite or manifest: after the temporary
    is complete and before the rename, or before its flush) at seeded random calls, and
    resumed each time: its per-episode log equals that of an uninterrupted run."""
    import random
    import signal
    import subprocess
    from pathlib import Path

    from metazoo.testing import kill_at_call_command

    args = [*TINY, "--agent", "warp", "--nbiter", "30", "--save_every", "5", "--threads", "1"]
    killed = tmp_path / "killed"
    proc = _popen([*args, "--out", str(killed)])
    _wait_for_rows(proc, killed, 12)
    _sigkill(proc)
    logged = read_csv(killed / "rewards.csv")
    checkpoint = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 12 <= len(logged) < 30 and checkpoint["episode"] % 5 == 0
    assert checkpoint["episode"] <= len(logged)
    recorded = json.loads((killed / "manifest.json").read_text())["files"]["rewards.csv"]
    (killed / recorded).write_text("a kill mid-rewrite leaves this")
    (killed / ".my_notes.tmp").write_text("not the run's")
    (killed / ".rewards.csv.abc_1234.tmp").write_text("named like the run's; the user's")
    rng = random.Random(27)
    for function in ("replace", "fsync"):
        command = kill_at_call_command(Path(run.__file__).resolve(),
                                       [*args, "--out", str(killed), "--resume"],
                                       function=function, call=rng.randint(1, 3))
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    run.main([*args, "--out", str(killed), "--resume"])  # the same argument list
    assert not (killed / recorded).exists()
    assert (killed / ".my_notes.tmp").exists() and (killed / ".rewards.csv.abc_1234.tmp").exists()
    straight = tmp_path / "straight"
    run.main([*args, "--out", str(straight)])
    rows = read_csv(killed / "rewards.csv")
    assert [int(r["episode"]) for r in rows] == list(range(30))
    assert rows == read_csv(straight / "rewards.csv")
    a = json.loads((killed / "summary.json").read_text())
    b = json.loads((straight / "summary.json").read_text())
    assert (a["last_10pct_reward"], a["meta_updates"]) == (b["last_10pct_reward"],
                                                          b["meta_updates"])


def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(tmp_path, capsys):
    """Issue 27, case 2: a folder with rewards.csv and no checkpoint.pt is a run that died
    early; --resume starts it again (the same options), to the uninterrupted run's log."""
    options = [*TINY, "--agent", "lstm", "--save_every", "1000", "--threads", "1"]
    args = [*options, "--nbiter", "400"]
    killed = tmp_path / "killed"
    proc = _popen([*args, "--out", str(killed)])
    _wait_for_rows(proc, killed, 3)
    _sigkill(proc)
    assert not (killed / "checkpoint.pt").exists() and (killed / "rewards.csv").exists()
    short = [*options, "--nbiter", "6"]  # --num_episodes may change
    def files():  # the run's files (run.lock names the latest holder)
        return {p.name: p.read_bytes() for p in killed.iterdir() if p.name != "run.lock"}

    before = files()
    err = _one_line_exit_2([*short, "--hs", "8", "--out", str(killed), "--resume"], capsys)
    assert "other options (--hidden_size 6 -> 8)" in err
    assert files() == before
    run.main([*short, "--out", str(killed), "--resume"])
    run.main([*short, "--out", str(tmp_path / "straight")])
    assert read_csv(killed / "rewards.csv") == read_csv(tmp_path / "straight" / "rewards.csv")


def test_a_second_process_on_a_live_run_is_refused_naming_the_holder(tmp_path, capsys):
    """Issue 27, case 1 (maze)."""
    args = [*TINY, "--agent", "lstm", "--nbiter", "100000", "--threads", "1"]
    out = tmp_path / "live"
    proc = _popen([*args, "--out", str(out)])
    try:
        _wait_for_rows(proc, out, 2)
        before = len(read_csv(out / "rewards.csv"))
        err = _one_line_exit_2([*args, "--nbiter", "3", "--out", str(out), "--resume"], capsys)
        assert f"pid {proc.pid})" in err and "in use by another live process (host " in err
        _wait_for_rows(proc, out, before + 2)  # the first run goes on
    finally:
        _sigkill(proc)
    episodes = [int(r["episode"]) for r in read_csv(out / "rewards.csv")]
    assert episodes == list(range(len(episodes)))


class _Payload:
    """An object whose unpickling would run code (here: create a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_checkpoint_is_refused_without_running_code(tmp_path):
    import pickle

    out = tmp_path / "r"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "2", "--out", str(out)])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["random_reward"] = _Payload(str(marker))
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run.main([*TINY, "--agent", "lstm", "--nbiter", "4", "--out", str(out), "--resume"])
    assert not marker.exists()


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "r"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "2", "--out", str(out)])
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are written, then the "disk" fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UsageError, match="the disk is full. Nothing that was written before is "
                                         r"lost .* --resume"):  # one line from run_command
        run.main([*TINY, "--agent", "lstm", "--nbiter", "4", "--out", str(out), "--resume"])
    monkeypatch.undo()
    assert (out / "checkpoint.pt").read_bytes() == before
    # No temporary file is left behind.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "flags.json",
                                                     "machine.json", "manifest.json",
                                                     "rewards.csv", "run.lock", "summary.json"]
    resumed = run.main([*TINY, "--agent", "lstm", "--nbiter", "4", "--out", str(out),
                        "--resume"])
    assert resumed["episodes"] == 4
    run.main([*TINY, "--agent", "lstm", "--nbiter", "4", "--out", str(tmp_path / "straight")])
    assert read_csv(out / "rewards.csv") == read_csv(tmp_path / "straight" / "rewards.csv")


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    """A kill mid-write can leave '2' of '25,...': that line must not count as episode 2."""
    path = tmp_path / "rewards.csv"
    path.write_text("episode,mean_reward,loss,meta_update\n0,1,2,0\n1,1,2,1\n2")
    assert [r["episode"] for r in run._read_rewards(path, upto=30)] == ["0", "1"]
    path.write_text("")  # created, header not yet written
    assert run._read_rewards(path, upto=30) == []


def _one_line_exit_2(argv, capsys) -> str:
    from metazoo.cli import run_command

    with pytest.raises(SystemExit) as exit_info:
        run_command(run.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_without_a_checkpoint_refuses_and_keeps_the_log(tmp_path, capsys):
    """Bug 2 (maze): --resume with the checkpoint removed cut rewards.csv to its header."""
    out = tmp_path / "r"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "3", "--out", str(out)])
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(read_csv(out / "rewards.csv")) == 3
    err = _one_line_exit_2([*TINY, "--agent", "lstm", "--nbiter", "5", "--out", str(out),
                            "--resume"], capsys)
    assert "has no checkpoint.pt" in err and "nothing was changed" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a folder that holds no run yet is started by --resume (what a sweep passes every run)
    fresh = run.main([*TINY, "--agent", "lstm", "--nbiter", "2", "--out", str(tmp_path / "n"),
                      "--resume"])
    assert fresh["episodes"] == 2


@pytest.mark.parametrize("flags,named", [
    (["--hs", "0"], "--hidden_size (--hs) 0: must be a positive integer"),
    (["--msize", "6"], "--maze_size (--msize) 6: must be an odd integer >= 5"),
    (["--gr", "1.5"], "--discount (--gr) 1.5: must lie in [0, 1]"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be > 0"),
    (["--meta_learning_rate", "inf"], "--meta_learning_rate inf: must be > 0"),
    # Issue 28 item 7: a raw multinomial error, a raw overflow, or exit 0 at reward 0.
    (["--learning_rate", "1e30"], "--learning_rate 1e+30: must be <= 1: Adam moves every "
                                  "parameter by about this much per step"),
    (["--meta_learning_rate", "1e38"], "--meta_learning_rate 1e+38: must be <= 1"),
    (["--meta_learning_rate", "1e30"], "--meta_learning_rate 1e+30: must be <= 1"),
    (["--bent", "nan"], "--concentration (--bent) nan: must be >= 0"),
    (["--rew", "inf"], "--reward (--rew) inf: must be a finite number"),
    (["--nbiter", "-1"], "--num_episodes (--nbiter) -1: must be a non-negative integer"),
    (["--rngseed", "-1"], "--seed (--rngseed) -1: must be an integer from 0"),
    (["--save_every", "0"], "--save_every 0: must be >= 1"),
    (["--pe", "0"], "--print_every (--pe) 0: must be >= 1"),
    (["--threads", "-1"], "--threads -1: must be >= 0"),
    (["--device", "foo"], "--device 'foo'"),
])
def test_every_invalid_value_is_one_line_naming_the_flag(tmp_path, capsys, flags, named):
    err = _one_line_exit_2([*TINY, *flags, "--out", str(tmp_path / "r")], capsys)
    assert named in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_existing_run_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "1", "--out", str(out)])
    err = _one_line_exit_2([*TINY, "--agent", "lstm", "--nbiter", "1", "--out", str(out)],
                           capsys)
    assert "already holds a run" in err and "--resume" in err
    err = _one_line_exit_2([*TINY, "--agent", "warp", "--nbiter", "2", "--out", str(out),
                            "--resume"], capsys)
    assert "other flags" in err and "--agent 'lstm' -> 'warp'" in err


def test_a_bit_flipped_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    run.main([*TINY, "--agent", "lstm", "--nbiter", "2", "--out", str(out)])
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    weight = max(state["agent"].values(), key=torch.Tensor.numel)
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))
    before = (out / "rewards.csv").read_bytes()
    err = _one_line_exit_2([*TINY, "--agent", "lstm", "--nbiter", "3", "--out", str(out),
                            "--resume"], capsys)
    assert "does not match its checksum" in err
    assert (out / "rewards.csv").read_bytes() == before


def test_help_describes_every_flag_with_its_default():
    parser = run.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = " ".join(parser.format_help().split())
    assert "run folder (default: logs/maze_navigation/<agent>_seed<seed>)" in text
    assert "(default: None)" not in text


def test_the_command_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(run.__file__).resolve()
    done = subprocess.run([sys.executable, str(script), "--hs", "0", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: --hidden_size (--hs) 0: must be a positive integer\n"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_reward_that_would_overflow_the_loss_is_one_line_naming_it(tmp_path, capsys, dtype):
    """Issue 28 item 7: --reward 1e38 ended in 'probability tensor contains either inf, nan or
    element < 0' from the rollout (at the first rewarded episode), again on every resume."""
    tiny = [w if w != "float64" else dtype for w in TINY]
    reward = "1e38" if dtype == "float32" else "1e300"
    err = _one_line_exit_2([*tiny, "--rew", reward, "--out", str(tmp_path / "r")], capsys)
    assert f"--reward (--rew) {float(reward):g}: must be small enough for {dtype}" in err
    assert "lower it (default 10)" in err and not (tmp_path / "r").exists()
    err = _one_line_exit_2([*tiny, "--wp", reward, "--out", str(tmp_path / "r")], capsys)
    assert f"--wall_penalty (--wp) {float(reward):g}: must be small enough" in err
    if dtype == "float32":  # float64 holds these returns: the same reward runs
        summary = run.main([*TINY, "--rew", reward, "--nbiter", "2", "--out",
                            str(tmp_path / "f64")])
        assert summary["episodes"] == 2
