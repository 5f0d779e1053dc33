"""main.py: what --resume, --overwrite and --evaluate may and may not do to a run folder, checked
checkpoints (provenance, checksum, finite weights) and flags refused before a run starts."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import main
from metazoo import NonFiniteError
from metazoo.cli import UsageError
from metazoo.serialization import load_checked, save_checked

# -- bug 1: non-finite meta-optimizer hyperparameters -----------------------------------------

@pytest.mark.parametrize("flags", [
    ["--outer_kwargs", "lr", "nan"], ["--outer_kwargs", "lr", "inf"],
    ["--outer_kwargs", "lr", "1e999"], ["--outer_kwargs", "lr", "0.1", "momentum", "inf"],
    ["--outer_opt", "adam", "--outer_kwargs", "lr", "0.1", "eps", "nan"],
    ["--inner_kwargs", "lr", "nan"], ["--meta_kwargs", "norm", "inf"],
])
def test_nonfinite_hyperparameters_are_refused_before_the_run(
        tiny, omniglot_root, tmp_path, flags, one_line_exit_2):
    argv = [*tiny(omniglot_root, tmp_path, "leap"), *flags, "--on_nonfinite", "skip"]
    err = one_line_exit_2(argv)
    flag = next(f for f in flags if f.endswith("_kwargs"))
    assert flag in err and "finite" in err and "e.g." in err
    assert not (tmp_path / "leap").exists()  # nothing written


@pytest.mark.parametrize("flags,message", [
    # Issue 28 item 8: torch's raw "value cannot be converted to type float without overflow".
    (["--outer_kwargs", "lr", "1e300"], "--outer_kwargs lr 1e+300: too large, beyond float32"),
    # Issue 28 item 8: "-inf" was read as a flag name ("expected one argument").
    (["--outer_kwargs", "lr", "-inf"], "--outer_kwargs lr -inf: must be a finite number"),
    (["--inner_kwargs", "lr", "-1e-3"], "--inner_kwargs lr -0.001: must be >= 0"),
])
def test_huge_and_negative_hyperparameters_are_one_line(
        tiny, omniglot_root, tmp_path, flags, message, one_line_exit_2):
    argv = [*tiny(omniglot_root, tmp_path, "maml"), *flags]
    assert message in one_line_exit_2(argv)
    assert not (tmp_path / "maml").exists()


@pytest.mark.parametrize("flags,message", [
    (["--meta_kwargs", "warp_lr", "0"], "--meta_kwargs warp_lr 0: must be a finite number > 0"),
    (["--meta_kwargs", "warp_lr", "nan"], "--meta_kwargs warp_lr nan: must be a finite number"),
    (["--warp_init", "identity", "--warp_act_fun", "relu"],
     "init='identity' needs a linear warp layer that keeps its width and size, but "
     "activation='relu'"),
])
def test_bad_warp_options_are_one_line_before_the_run(
        tiny, omniglot_root, tmp_path, flags, message, one_line_exit_2):
    argv = [*tiny(omniglot_root, tmp_path, "warp_leap"), *flags]
    assert message in one_line_exit_2(argv)
    assert not (tmp_path / "warp_leap").exists()  # nothing written


def test_warp_options_reach_the_learner_and_the_record(tiny, omniglot_root, tmp_path):
    argv = tiny(omniglot_root, tmp_path, "warp_leap", "--warp_init", "identity",
                "--meta_kwargs", "warp_lr", "0.01", "--meta_train_steps", "1")
    args = main.parse_args(argv)
    assert main.learner_config(args).warp_kwargs == {"init": "identity"}
    main.main(argv)
    state = load_checked(tmp_path / "warp_leap" / "tmp" / "checkpoint.pt", require=True)
    assert state["flags"]["warp_init"] == "identity"
    assert state["flags"]["meta_kwargs"] == {"warp_lr": 0.01}
    groups = state["learner"]["meta_optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    assert main.learner_config(main.parse_args(tiny(omniglot_root, tmp_path, "warp_leap"))
                               ).warp_kwargs == {"init": "random"}  # default: the reference's


@pytest.mark.parametrize("flags,message", [
    (["--outer_kwargs", "lr", "abc"], "--outer_kwargs lr 'abc': must be a number"),
    (["--inner_kwargs", "lr", "0.1", "momentum", "fast"], "--inner_kwargs momentum 'fast'"),
    (["--outer_kwargs", "lr", "-1"], "--outer_kwargs lr -1: must be >= 0"),
    (["--outer_opt", "adam", "--outer_kwargs", "lr", "0.1", "eps", "0"],
     "--outer_kwargs eps 0: must be > 0"),
])
def test_non_numeric_hyperparameters_are_named(
        tiny, omniglot_root, tmp_path, flags, message, one_line_exit_2):
    err = one_line_exit_2([*tiny(omniglot_root, tmp_path, "maml"), *flags])
    assert message in err


@pytest.mark.parametrize("flags,message", [
    (["--seed", "99999999999999999999"], "argument --seed: '99999999999999999999' must be an "
                                         "integer from 0 to 4294967295"),
    (["--seed", "-1"], "argument --seed"),
    (["--warp_layer", "foo"], "argument --warp_layer: invalid choice: 'foo'"),
    (["--warp_init", "zeros"], "argument --warp_init: invalid choice: 'zeros'"),
])
def test_out_of_range_flags_name_the_flag(tiny, omniglot_root, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main.main([*tiny(omniglot_root, tmp_path, "warp_leap"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_nonfinite_error_of_the_core_is_one_line_naming_the_meta_step(
        tiny, omniglot_root, tmp_path, monkeypatch, one_line_exit_2):
    real_meta_step = main.distributed.meta_step
    calls = []

    def meta_step(learner, tasks):
        calls.append(1)
        if len(calls) == 2:  # what the core raises when a meta-step went non-finite
            raise NonFiniteError(task=None, inner_step=None, where="meta_gradient",
                                 names=["model.head.weight"])
        return real_meta_step(learner, tasks)

    monkeypatch.setattr(main.distributed, "meta_step", meta_step)
    err = one_line_exit_2(tiny(omniglot_root, tmp_path, "leap", "--on_nonfinite", "skip"))
    assert "(meta-step 2)" in err
    run = tmp_path / "leap" / "tmp"
    assert load_checked(run / "checkpoint.pt")["step"] == 1 and not (run / "done.json").exists()


def test_nonfinite_weights_are_never_checkpointed_nor_tested(
        tiny, omniglot_root, tmp_path, monkeypatch):
    """The last line of defence behind the core's check: if a meta-step ever leaves NaN in the
    learner (here a meta-step that bypasses the core), no checkpoint holds it and done.json
    gets no test accuracy."""
    real_meta_step = main.distributed.meta_step
    calls = []

    def meta_step(learner, tasks):
        result = real_meta_step(learner, tasks)
        calls.append(1)
        if len(calls) == 2:
            state = learner.state_dict()
            weight = next(v for v in state["model"].values() if v.is_floating_point())
            weight.fill_(float("nan"))
            learner.load_state_dict(state)
        return result

    monkeypatch.setattr(main.distributed, "meta_step", meta_step)
    with pytest.raises(RuntimeError, match="at meta-step 2 is not finite"):
        main.main(tiny(omniglot_root, tmp_path, "leap", "--on_nonfinite", "skip"))
    run = tmp_path / "leap" / "tmp"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and not main.nonfinite_entries(state["learner"])
    assert not (run / "done.json").exists()
    # with --save_ival 0 the final guard stops the test
    with pytest.raises(RuntimeError, match="after meta-step 2 is not finite"):
        calls.clear()
        main.main(tiny(omniglot_root, tmp_path, "leap", "--suffix", "b", "--save_ival", "0",
                       "--on_nonfinite", "skip"))
    assert not (tmp_path / "leap" / "b" / "done.json").exists()


# -- bug 2: --resume without a checkpoint -----------------------------------------------------

def test_resume_without_a_checkpoint_refuses_and_deletes_nothing(
        tiny, omniglot_root, tmp_path, one_line_exit_2, snapshot):
    argv = tiny(omniglot_root, tmp_path, "leap", "--suffix", "r", "--save_ival", "0")
    main.main(argv)
    run = tmp_path / "leap" / "r"
    (run / "my_notes.txt").write_text("mine")
    before = snapshot(run)
    assert "done.json" in before
    err = one_line_exit_2([*argv, "--resume"])
    assert "has no checkpoint.pt" in err and "--overwrite" in err
    assert snapshot(run) == before


def test_resume_of_a_run_not_yet_started_starts_it(tiny, omniglot_root, tmp_path):
    """run_multi.py passes --resume to every run: a folder that does not exist yet is a fresh
    run."""
    acc = main.main(tiny(omniglot_root, tmp_path, "leap", "--resume"))
    done = json.loads((tmp_path / "leap" / "tmp" / "done.json").read_text())
    assert done["step"] == 2 and done["test_acc"] == pytest.approx(acc)


def test_overwrite_replaces_the_runs_files_only(tiny, omniglot_root, tmp_path):
    argv = tiny(omniglot_root, tmp_path, "no")
    main.main(argv)
    run = tmp_path / "no" / "tmp"
    (run / "my_notes.txt").write_text("mine")
    (run / "plots").mkdir()
    (run / "plots" / "a.png").write_bytes(b"png")
    killed_write = _recorded_temporary(run, "done.json")  # what a killed write leaves
    (run / killed_write).write_bytes(b"half")
    (run / ".checkpoint.pt.abc123_x.tmp").write_bytes(b"mine")  # looks like one; the user's
    (run / "results_my_summary.log").write_text("mine\n")  # matches the run's log names
    main.main([*argv, "--overwrite"])
    assert (run / "my_notes.txt").read_text() == "mine"
    assert (run / "plots" / "a.png").read_bytes() == b"png"
    assert not (run / killed_write).exists()
    assert (run / ".checkpoint.pt.abc123_x.tmp").read_bytes() == b"mine"
    assert (run / "results_my_summary.log").read_text() == "mine\n"
    assert (run / "done.json").exists()


# -- bug 5: --resume under other flags --------------------------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--seed", "99"], "--seed 8879 -> 99"),
    (["--outer_kwargs", "lr", "5"], "--outer_kwargs {'lr': 0.1} -> {'lr': 5}"),
    (["--task_train_steps", "3"], "--task_train_steps 2 -> 3"),
    (["--warp_init", "identity"], "--warp_init 'random' -> 'identity'"),
])
def test_resume_under_other_flags_is_refused_naming_them(
        tiny, omniglot_root, tmp_path, flags, named, one_line_exit_2, snapshot):
    argv = tiny(omniglot_root, tmp_path, "leap", "--suffix", "r")
    main.main([*argv, "--meta_train_steps", "1"])
    run = tmp_path / "leap" / "r"
    before = snapshot(run)
    err = one_line_exit_2([*argv, *flags, "--resume"])
    assert named in err and "nothing was changed" in err
    assert snapshot(run) == before
    # the flags that may change (here: more meta-steps, other logging) resume
    main.main([*argv, "--resume", "--log_ival", "1", "--write_ival", "2"])
    assert json.loads((run / "done.json").read_text())["step"] == 2


def test_a_checkpoint_of_another_method_is_refused(
        tiny, omniglot_root, tmp_path, one_line_exit_2, snapshot):
    main.main(tiny(omniglot_root, tmp_path, "leap", "--suffix", "a"))
    argv = tiny(omniglot_root, tmp_path, "maml", "--suffix", "a")
    main.main([*argv, "--meta_train_steps", "1"])
    run = tmp_path / "maml" / "a"
    shutil.copyfile(tmp_path / "leap" / "a" / "checkpoint.pt", run / "checkpoint.pt")
    before = snapshot(run)
    err = one_line_exit_2([*argv, "--resume"])
    assert "--meta_model 'leap' -> 'maml'" in err
    assert snapshot(run) == before
    err = one_line_exit_2([*argv, "--evaluate"])
    assert "--meta_model 'leap' -> 'maml'" in err
    assert snapshot(run) == before


def test_the_checkpoint_records_what_produced_it(tiny, omniglot_root, tmp_path):
    main.main(tiny(omniglot_root, tmp_path, "reptile", "--seed", "3"))
    state = load_checked(tmp_path / "reptile" / "tmp" / "checkpoint.pt", require=True)
    assert state["flags"]["meta_model"] == "reptile" and state["flags"]["seed"] == 3
    assert state["flags"]["inner_kwargs"] == {"lr": 0.1}


# -- bug 7: a failed resume destroys nothing --------------------------------------------------

def test_a_refused_resume_of_a_finished_run_keeps_its_results(
        tiny, omniglot_root, tmp_path, one_line_exit_2, snapshot):
    argv = tiny(omniglot_root, tmp_path, "maml")
    main.main(argv)
    run = tmp_path / "maml" / "tmp"
    state = load_checked(run / "checkpoint.pt")
    weight = next(v for v in state["learner"]["model"].values() if v.is_floating_point())
    weight.view(-1)[0] = float("nan")
    save_checked(state, run / "checkpoint.pt")  # a valid checksum over NaN weights
    before = snapshot(run)
    assert "done.json" in before and any("_test_" in name for name in before)
    err = one_line_exit_2([*argv, "--resume"])
    assert "non-finite weights (model." in err
    assert snapshot(run) == before


def test_a_bit_flipped_checkpoint_is_refused(
        tiny, omniglot_root, tmp_path, one_line_exit_2, snapshot):
    argv = tiny(omniglot_root, tmp_path, "maml", "--meta_train_steps", "1")
    main.main(argv)
    run = tmp_path / "maml" / "tmp"
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    weight = max((v for v in state["learner"]["model"].values()), key=torch.Tensor.numel)
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x04  # one bit of one weight
    path.write_bytes(bytes(data))
    before = snapshot(run)
    err = one_line_exit_2([*argv, "--resume", "--meta_train_steps", "2"])
    assert "does not match its checksum" in err
    assert snapshot(run) == before


def _recorded_temporary(run: Path, name: str) -> str:
    """The temporary that the run's manifest records for ``name``'s atomic writes."""
    return json.loads((run / "manifest.json").read_text())["files"][name]


def test_resume_removes_only_its_own_temporaries(tiny, omniglot_root, tmp_path):
    argv = tiny(omniglot_root, tmp_path, "leap", "--meta_train_steps", "1")
    main.main(argv)
    run = tmp_path / "leap" / "tmp"
    own = [_recorded_temporary(run, name) for name in ("checkpoint.pt", "args.log", "done.json")]
    # the user's files, named like the run's temporaries (issue 27, case 7)
    foreign = [".notes.txt.abc.tmp", "draft.tmp", ".checkpoint.pt.tmp", ".args.log.backup.tmp",
               ".checkpoint.pt.k1l2m3n4.tmp"]
    for name in own + foreign:
        (run / name).write_bytes(b"x")
    main.main([*tiny(omniglot_root, tmp_path, "leap"), "--resume"])
    names = {p.name for p in run.iterdir()}
    assert not names & set(own) and set(foreign) <= names


def test_args_log_values_that_are_not_literals_are_not_compared(tmp_path):
    (tmp_path / "args.log").write_text("Namespace(seed=3, lr=inf, dtype=torch.float32, "
                                       "outer_kwargs={'lr': 0.1})\n")
    assert main.read_args_log(tmp_path / "args.log") == {"seed": 3,
                                                          "outer_kwargs": {"lr": 0.1}}
    (tmp_path / "args.log").write_text("garbage(\n")
    with pytest.raises(UsageError, match=r"args\.log cannot be read"):
        main.read_args_log(tmp_path / "args.log")
