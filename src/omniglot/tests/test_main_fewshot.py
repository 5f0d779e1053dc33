"""main.py --protocol fewshot: smoke runs (maml, fomaml, reptile), logs and fewshot_test.json,
determinism, stop-and-resume, fixed evaluation episodes, BatchNorm modes, image folders and flag
errors."""

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from monitor import FileHandler


def _assert_same_logs(a: Path, b: Path, same_log_files) -> None:
    same_log_files(a, b, 8)
    ja, jb = (json.loads((r / "fewshot_test.json").read_text()) for r in (a, b))
    ja.pop("seconds"), jb.pop("seconds")
    assert ja == jb


@pytest.mark.parametrize("method, extra", [("maml", ()), ("fomaml", ("--rotations",)),
                                           ("reptile", ("--downsample", "stride"))])
def test_smoke_runs_write_results_with_ci(omniglot_root, tmp_path, capsys, method, extra, fewshot):
    result = main.main(fewshot(omniglot_root, tmp_path, method, "--log_ival", "1", *extra))
    run = tmp_path / method / "tmp"
    assert isinstance(result, main.FewShotResult)
    acc = result.accuracy
    assert 0.0 <= acc.mean <= 1.0 and acc.n == result.episodes == 12
    assert acc.ci95 == pytest.approx(1.96 * acc.std / np.sqrt(12))
    # 3-way with 2 queries per class: each episode's accuracy is a multiple of 1/6
    assert round(acc.mean * 12 * 6) == pytest.approx(acc.mean * 12 * 6, abs=1e-4)
    assert (result.ways, result.shots, result.queries, result.bn_eval, result.step) == (
        3, 1, 2, "transductive", 2)
    record = json.loads((run / "fewshot_test.json").read_text())
    assert record["accuracy"] == asdict(acc) and record["meta_model"] == method
    assert json.loads((run / "done.json").read_text())["test_acc"] == pytest.approx(acc.mean)
    ci_lines = (run / "results_fewshot_val_ci.log").read_text().splitlines()
    assert [line.split(",")[0] for line in ci_lines] == ["0", "1", "2"]
    assert all(line.endswith(",4,{}".format(line.split(",")[5]) + ",transductive")
               for line in ci_lines)
    test_line = (run / "results_fewshot_test_ci.log").read_text().split(",")
    assert float(test_line[1]) == pytest.approx(acc.mean, abs=1e-6)
    assert float(test_line[2]) == pytest.approx(acc.ci95, abs=1e-6)
    handler = FileHandler(run)  # the reference-format logs read back
    assert handler.train_train_data["step"] == [1, 2]
    assert handler.final_test_acc() == pytest.approx(acc.mean, abs=1e-6)
    out = capsys.readouterr().out
    assert "[test step 2] 3-way 1-shot acc" in out
    assert "(95% CI, 12 episodes, BN transductive" in out
    split = json.loads((run / "split.json").read_text())
    assert split["train"] == ["Gamma", "Shared", "Alpha"] and split["test"] == ["Delta", "Epsilon"]
    assert split["classes"] == {"train": 12, "val": 3, "test": 7}


def test_same_seed_twice_gives_identical_logs(omniglot_root, tmp_path, same_log_files, fewshot):
    for suffix in ("a", "b"):
        main.main(fewshot(omniglot_root, tmp_path, "maml", "--suffix", suffix, "--rotations"))
    _assert_same_logs(tmp_path / "maml" / "a", tmp_path / "maml" / "b", same_log_files)
    main.main(fewshot(omniglot_root, tmp_path, "maml", "--suffix", "c", "--rotations",
                      "--seed", "6"))  # seed 6: Beta in validation too, other training data
    assert (tmp_path / "maml/a/results_train_val.log").read_text() != \
        (tmp_path / "maml/c/results_train_val.log").read_text()


CARRY = ("--reptile_inner_state", "carry", "--inner_opt", "adam", "--inner_kwargs", "lr",
         "0.01", "betas", "0:0.999")


@pytest.mark.parametrize(("method", "extra"), [("maml", ()), ("reptile", ()),
                                               ("reptile", CARRY)])
def test_stop_and_resume_gives_identical_logs(
        omniglot_root, tmp_path, same_log_files, method, extra, fewshot):
    # with CARRY the checkpoint must hold the carried Adam state for the logs to match
    full = fewshot(omniglot_root, tmp_path, method, "--meta_train_steps", "3", *extra)
    main.main([*full, "--suffix", "straight"])
    main.main([*full, "--suffix", "resumed", "--meta_train_steps", "1"])  # with its own test
    main.main([*full, "--suffix", "resumed", "--resume"])
    _assert_same_logs(tmp_path / method / "straight", tmp_path / method / "resumed",
                      same_log_files)


def test_evaluation_episodes_are_fixed_and_the_same_for_every_method(omniglot_root, fewshot):
    exps = [main.FewShotExperiment(main.parse_args(fewshot(omniglot_root, Path("x"), m)),
                                   torch.device("cpu")) for m in ("maml", "reptile")]
    for case in ("val", "test"):
        a, b = exps[0].indices[case], exps[1].indices[case]
        assert torch.equal(a.classes, b.classes) and torch.equal(a.support, b.support)
        assert torch.equal(a.query, b.query)
    assert len(exps[0].indices["test"]) == 12 and len(exps[0].indices["val"]) == 4
    test = exps[0].samplers["test"]
    assert {n.split("/")[0] for n in test.names} == {"Delta", "Epsilon"}
    # drawing training episodes does not move them (they come from their own generators)
    before = exps[0].indices["test"].support.clone()
    run = main.RunState(0, torch.Generator().manual_seed(0), random.Random(0))
    tasks = exps[0].meta_batch(None, run)
    assert len(tasks) == 2 and torch.equal(exps[0].indices["test"].support, before)
    train = exps[0].samplers["train"]
    assert {n.split("/")[0] for n in train.names} == {"Gamma", "Shared", "Alpha"}


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile"])
def test_inductive_batch_norm_is_running_statistics_and_printed(
        omniglot_root, tmp_path, capsys, method, fewshot):
    result = main.main(fewshot(omniglot_root, tmp_path, method, "--bn_eval", "inductive",
                               "--log_ival", "1"))
    assert result.bn_eval == "inductive"
    assert "BN inductive" in capsys.readouterr().out
    args = main.parse_args(fewshot(omniglot_root, tmp_path, "fomaml", "--bn_eval", "inductive"))
    assert args.bn_mode == "running" and main.learner_config(args).bn_mode == "running"
    args = main.parse_args(fewshot(omniglot_root, tmp_path, "fomaml", "--bn_mode", "running"))
    assert args.bn_eval == "inductive"
    with pytest.raises(ValueError, match="--bn_eval transductive means --bn_mode batch"):
        main.parse_args(["--bn_eval", "transductive", "--bn_mode", "running"])


def _write_folder(root: Path) -> Path:
    """root/{train,val,test}/<class>/ with small noisy images of a class colour; one training
    class has too few images and is left out."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(classes):
            folder = root / split / f"{split}_class{c}"
            folder.mkdir(parents=True)
            count = 2 if (split, c) == ("train", 3) else 4
            colour = rng.integers(0, 256, 3)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 20, (10, 14, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_image_folder_dataset_runs(tmp_path, capsys):
    root = _write_folder(tmp_path / "folder")
    argv = ["--protocol", "fewshot", "--dataset", "folder", "--root", str(root),
            "--log_dir", str(tmp_path / "logs"), "--meta_model", "maml", "--ways", "3",
            "--shots", "1", "--queries", "2", "--image_size", "12", "--norm_mean", "0.5",
            "--norm_std", "0.25", "--downsample", "stride", "--meta_batch_size", "2",
            "--meta_train_steps", "2", "--task_train_steps", "1", "--task_val_steps", "1",
            "--test_episodes", "5", "--val_episodes", "3", "--test_ival", "1",
            "--num_filters", "4", "--no_cuda", "--log_ival", "1"]
    result = main.main(argv)
    assert result.accuracy.n == 5 and 0 <= result.accuracy.mean <= 1
    out = capsys.readouterr().out
    assert "train class 'train_class3' left out: 2 images < shots + queries = 3" in out
    run = tmp_path / "logs/maml/tmp"
    split = json.loads((run / "split.json").read_text())
    assert split == {"seed": None, "train": ["train"], "val": ["val"], "test": ["test"],
                     "classes": {"train": 4, "val": 3, "test": 3}}
    assert len(list(root.glob("fewshot_cache_*.pt"))) == 3
    exp = main.FewShotExperiment(main.parse_args(argv), torch.device("cpu"))
    task = exp.samplers["train"].sample(1, torch.Generator().manual_seed(0))[0]
    assert task.support[0][0].shape == (3, 3, 12, 12)
    assert main.learner_config(main.parse_args(argv)).in_channels == 3
    grey = main.parse_args([*argv, "--channels", "grey"])
    assert main.learner_config(grey).in_channels == 1
    missing = [*argv[:5], str(tmp_path / "missing"), *argv[6:], "--suffix", "x"]
    with pytest.raises(ValueError, match="root/<split>/<class>"):
        main.main(missing)


def test_flag_errors_and_alphabet_defaults_unchanged(omniglot_root, tmp_path, fewshot):
    args = main.parse_args([])
    assert (args.protocol, args.bn_mode, args.image_size, args.downsample) == (
        "alphabet", "batch", 28, "pool")
    assert main.learner_config(args).classes == 20
    assert main.learner_config(main.parse_args(["--protocol", "fewshot", "--ways", "7"])
                               ).classes == 7
    assert main.parse_args(["--protocol", "fewshot", "--dataset", "folder"]).image_size == 84
    with pytest.raises(ValueError, match="--dataset folder needs --protocol fewshot"):
        main.parse_args(["--dataset", "folder"])
    with pytest.raises(ValueError, match="--image_size 32"):
        main.parse_args(["--image_size", "32"])
    with pytest.raises(ValueError, match="--meta_model ft"):
        main.parse_args(["--protocol", "fewshot", "--meta_model", "ft"])
    with pytest.raises(ValueError, match=r"train classes \(Gamma, Shared, Alpha\): ways=20"):
        main.main(fewshot(omniglot_root, tmp_path, "maml", "--ways", "20"))
    with pytest.raises(ValueError, match="needs test classes"):
        main.main(fewshot(omniglot_root, tmp_path, "maml", "--num_test", "0", "--suffix", "t"))


def test_evaluate_only_gives_the_final_result_again(omniglot_root, tmp_path, fewshot):
    argv = fewshot(omniglot_root, tmp_path, "fomaml")
    first = main.main(argv)
    again = main.main([*argv, "--evaluate"])
    assert again.accuracy == first.accuracy and again.step == 2


def test_train_shots_and_queries_change_only_meta_training_episodes(
        omniglot_root, tmp_path, fewshot):
    argv = fewshot(omniglot_root, tmp_path, "reptile", "--train_shots", "3",
                   "--train_queries", "1")
    exp = main.FewShotExperiment(main.parse_args(argv), torch.device("cpu"))
    run = main.RunState(0, torch.Generator().manual_seed(0), random.Random(0))
    task = exp.meta_batch(None, run)[0]
    assert task.support[0][1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert task.query[1].tolist() == [0, 1, 2]
    for case in ("val", "test"):
        assert (exp.samplers[case].shots, exp.samplers[case].queries) == (1, 2)
    plain = main.FewShotExperiment(main.parse_args(fewshot(omniglot_root, tmp_path, "reptile")),
                                   torch.device("cpu"))
    assert torch.equal(plain.indices["test"].support, exp.indices["test"].support)
    result = main.main(argv)
    assert (result.shots, result.queries, result.episodes) == (1, 2, 12)


def test_reptile_inner_state_reaches_the_learner_and_is_checked(omniglot_root, tmp_path, fewshot):
    reset = [*fewshot(omniglot_root, tmp_path, "reptile"), *CARRY[2:]]
    learner = main.build_learner(main.learner_config(main.parse_args(reset)))
    assert learner.inner_state == "reset"
    carry = main.build_learner(main.learner_config(main.parse_args([*reset, *CARRY[:2]])))
    assert carry.inner_state == "carry"
    with pytest.raises(ValueError, match="--reptile_inner_state carry is an option of "
                                         "--meta_model reptile, not maml"):
        main.build_learner(main.learner_config(main.parse_args(
            [*fewshot(omniglot_root, tmp_path, "maml"), *CARRY[:2]])))
    with pytest.raises(ValueError, match=r"inner_state='carry'.*pass vectorize=False"):
        main.build_learner(main.learner_config(main.parse_args(
            [*reset, *CARRY[:2], "--vectorize", "on"])))


def test_reptile_inner_state_carry_is_refused_across_processes(
        omniglot_root, tmp_path, monkeypatch, fewshot):
    two = main.distributed.DistributedContext(0, 2, 0, torch.device("cpu"), None)
    monkeypatch.setattr(main.distributed, "setup", lambda **kwargs: two)
    monkeypatch.setattr(main.distributed, "teardown", lambda: None)
    with pytest.raises(main.UsageError, match=r"--reptile_inner_state carry .* not across 2 "
                                              "processes"):
        main.main([*fewshot(omniglot_root, tmp_path, "reptile"), *CARRY])
