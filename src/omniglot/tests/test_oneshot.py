"""oneshot.py and evaluate_oneshot.py: the official run format (parsing, errors), the error
computation against an oracle, BatchNorm modes, and trained models scored by the command."""

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import evaluate_oneshot
import main
import metazoo
from data import decode_drawing
from episodes import LabelledImages
from metazoo import Adapted, EvalResult, MetaLearner, MetaStepResult
from metazoo.cli import UsageError, run_command
from oneshot import OneShotRun, load_runs
from oneshot import evaluate_oneshot as score_runs
from wrapper import LearnerConfig, build_learner

RUNS, WAYS = 3, 20


def _glyph(position: int, angle: float, shift: tuple[int, int]) -> Image.Image:
    """A disc at one of 20 grid positions and a bar at ``angle``: 105x105, mode '1', black ink
    on white, like the official drawings."""
    yy, xx = np.mgrid[:105, :105].astype(float)
    cy, cx = 15 + 19 * (position // 5) + shift[0], 12 + 20 * (position % 5) + shift[1]
    ink = np.hypot(yy - cy, xx - cx) < 9
    ink |= (np.abs(np.cos(angle) * (yy - 52) - np.sin(angle) * (xx - 52)) < 2) & (
        np.hypot(yy - 52, xx - 52) < 30)
    return Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).convert("1")


def write_runs(folder: Path, runs: int = RUNS, seed: int = 0) -> list[list[int]]:
    """Writes ``runs`` runs in the official layout; returns each run's answer (class index of
    test item k) as written to ``class_labels.txt`` (a shuffled mapping)."""
    rng = np.random.default_rng(seed)
    answers = []
    for r in range(1, runs + 1):
        run = folder / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        positions = rng.permutation(WAYS)  # which grid cell each class uses in this run
        angle = float(rng.uniform(0, np.pi))
        for c in range(WAYS):
            _glyph(int(positions[c]), angle, (0, 0)).save(run / f"training/class{c + 1:02d}.png")
        mapping = [int(c) for c in rng.permutation(WAYS)]
        lines = []
        for k, c in enumerate(mapping):
            shift = tuple(int(v) for v in rng.integers(-2, 3, size=2))
            _glyph(int(positions[c]), angle, shift).save(run / f"test/item{k + 1:02d}.png")
            lines.append(f"run{r:02d}/test/item{k + 1:02d}.png run{r:02d}/training/"
                         f"class{c + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        answers.append(mapping)
    return answers


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(folder with all_runs/run01..run03, answers)."""
    folder = tmp_path_factory.mktemp("oneshot")
    answers = write_runs(folder / "all_runs")
    return folder, answers


@pytest.fixture
def runs_copy(official, tmp_path):
    """A writable copy of the run folders (runNN directly inside)."""
    shutil.copytree(official[0] / "all_runs", tmp_path / "runs")
    return tmp_path / "runs"


# -- parsing ----------------------------------------------------------------------------------

def test_load_runs_reads_the_official_layout(official):
    folder, answers = official
    runs = load_runs(folder)  # the all_runs/ level is found
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    assert [r.name for r in load_runs(folder / "all_runs")] == ["run01", "run02", "run03"]
    for run, answer in zip(runs, answers, strict=True):
        assert run.ways == WAYS
        assert run.train_files == tuple(f"{run.name}/training/class{c:02d}.png"
                                        for c in range(1, 21))
        assert run.test_files == tuple(f"{run.name}/test/item{k:02d}.png" for k in range(1, 21))
        assert run.test_labels.tolist() == answer
        assert run.train_images.shape == run.test_images.shape == (WAYS, 28, 28)
        assert run.train_images.dtype == torch.uint8
    # decoded like data.py: strokes high, background 0, area-averaged grey levels
    x = runs[0].train_images.float()
    assert x.max() == 255 and (x == 0).float().mean() > 0.5 and ((x > 0) & (x < 255)).any()
    nearest = load_runs(folder, resize="nearest")[0].train_images
    assert set(nearest.unique().tolist()) == {0, 255}
    task = runs[0].task(dtype=torch.float64)
    (sx, sy), (qx, qy) = task.support[0], task.query
    assert len(task.support) == 1 and sx.shape == qx.shape == (WAYS, 1, 28, 28)
    assert sy.tolist() == list(range(WAYS)) and qy.tolist() == answers[0]
    assert float(sx.max()) == 1.0 and sx.dtype == torch.float64
    with pytest.raises(ValueError, match="resize"):
        load_runs(folder, resize="bicubic")


def test_pixels_are_prepared_like_the_fewshot_protocol(official):
    run = load_runs(official[0])[0]
    task = run.task(image_size=20, mean=0.5, std=0.25, dtype=torch.float64)
    resized = LabelledImages.from_lists([run.train_images], ["r"]).resized(20).images
    expected = (resized.to(torch.float64) / 255.0 - 0.5) / 0.25
    torch.testing.assert_close(task.support[0][0], expected, rtol=0, atol=0)
    assert task.query[0].shape == (WAYS, 1, 20, 20)
    with pytest.raises(ValueError, match="one channel"):
        run.task(mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"std=0\.0 must be positive"):
        run.task(std=0.0)


def _lines(run: Path) -> list[str]:
    return (run / "class_labels.txt").read_text().splitlines()


def _write_lines(run: Path, lines: list[str]) -> None:
    (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case", ["missing_run", "missing_image", "three_fields", "no_labels",
                                  "unknown_class", "other_run", "unlabelled", "twice",
                                  "no_training"])
def test_malformed_folders_raise_naming_the_file(runs_copy, case):
    run = runs_copy / "run02"
    lines = _lines(run)
    expected = {"missing_run": r"lacks \['run02'\]",
                "missing_image": r"run02/test/item05.png does not exist",
                "three_fields": r"class_labels.txt line 3 .*two paths.*3 fields",
                "no_labels": r"run02/class_labels.txt is missing",
                "unknown_class": r"training drawing .*run02/training/class21.png does not exist",
                "other_run": r"'run01/test/item01.png' is not under run02/test/",
                "unlabelled": r"no class for \['run02/test/item20.png'\]",
                "twice": r"line 2 .*labelled twice",
                "no_training": r"run02/training is missing"}[case]
    if case == "missing_run":
        shutil.rmtree(run)
    elif case == "missing_image":
        (run / "test/item05.png").unlink()
    elif case == "three_fields":
        lines[2] += " extra"
    elif case == "no_labels":
        (run / "class_labels.txt").unlink()
    elif case == "unknown_class":
        lines[0] = lines[0].split()[0] + " run02/training/class21.png"
    elif case == "other_run":
        lines[0] = lines[0].replace("run02/test", "run01/test")
    elif case == "unlabelled":
        lines = [ln for ln in lines if "item20" not in ln.split()[0]]
    elif case == "twice":
        lines[1] = lines[0]
    elif case == "no_training":
        shutil.rmtree(run / "training")
    if case in ("three_fields", "unknown_class", "other_run", "unlabelled", "twice"):
        _write_lines(run, lines)
    with pytest.raises(ValueError, match=expected):
        load_runs(runs_copy)


def test_a_folder_without_runs_says_how_to_get_them(tmp_path):
    with pytest.raises(ValueError, match=r"make_omniglot\.sh -d"):
        load_runs(tmp_path)


# -- the error computation against an oracle --------------------------------------------------

class Memorise(MetaLearner):
    """An oracle: adaptation stores the normalised training drawings as the rows of a linear
    layer, so a test drawing goes to the class whose drawing it overlaps most (cosine)."""

    def __init__(self) -> None:
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, WAYS, bias=False))
        self.meta_optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)

    def adapt(self, task, *, steps=None):
        x, y = task.support[0]
        rows = torch.zeros(WAYS, 28 * 28, dtype=x.dtype)
        rows[y] = torch.nn.functional.normalize(x.flatten(1), dim=1)
        return Adapted({"1.weight": rows}, {}, (float(steps),))

    def meta_backward(self, tasks):
        return MetaStepResult(0.0, 0.0, None, (), len(tasks), 0.0)

    def evaluate(self, tasks, *, steps=None):
        return EvalResult(0.0, None, (), len(tasks), ())


def test_oracle_scores_zero_and_mislabelled_items_count_exactly(official, runs_copy):
    runs = load_runs(official[0])
    result = score_runs(Memorise(), runs, steps=3)
    assert result.error_rate == 0.0 and result.steps == 3 and result.bn_mode == "batch"
    assert [r.predictions for r in result.runs] == [tuple(a) for a in official[1]]
    assert all(r.tests == WAYS and r.inner_losses == (3.0,) for r in result.runs)
    # Three test items of run02 relabelled cyclically: exactly those three become errors.
    run = runs_copy / "run02"
    lines = _lines(run)
    pairs = [ln.split() for ln in lines]
    for k in range(3):
        pairs[k][1] = lines[(k + 1) % 3].split()[1]
    _write_lines(run, [" ".join(p) for p in pairs])
    result = score_runs(Memorise(), load_runs(runs_copy), steps=1)
    assert [(r.errors, r.error_rate) for r in result.runs] == [(0, 0.0), (3, 0.15), (0, 0.0)]
    assert result.error_rate == pytest.approx(0.05)
    data = json.loads(result.to_json())
    assert data["error_rate"] == pytest.approx(0.05) and data["transductive"] is True
    assert [r["errors"] for r in data["runs"]] == [0, 3, 0]


def test_evaluate_checks_its_arguments(official):
    runs = load_runs(official[0])
    with pytest.raises(ValueError, match="steps=0"):
        score_runs(Memorise(), runs, steps=0)
    with pytest.raises(ValueError, match="runs is empty"):
        score_runs(Memorise(), [], steps=1)
    narrow = build_learner(LearnerConfig(meta_model="maml", classes=5, num_filters=2))
    with pytest.raises(ValueError, match="head with 20 outputs"):
        score_runs(narrow, runs[:1], steps=1)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_batchnorm_modes_transductive_and_inductive(official, bn_mode):
    torch.manual_seed(0)
    learner = build_learner(LearnerConfig(meta_model="maml", classes=WAYS, num_filters=4,
                                          bn_mode=bn_mode, task_val_steps=2))
    runs: list[OneShotRun] = load_runs(official[0])[:1]
    result = score_runs(learner, runs, steps=2)
    assert result.bn_mode == bn_mode and result.transductive == (bn_mode == "batch")
    task = runs[0].task()
    adapted = learner.adapt(task, steps=2)
    x = task.query[0]

    def logits(images):
        out, _ = metazoo.forward(learner.model, adapted.params, adapted.buffers, images,
                                 bn_mode=bn_mode, training=False)
        return out

    together = logits(x)
    # in halves (batch statistics of a single drawing are undefined after the last pooling)
    halves = torch.cat([logits(x[:10]), logits(x[10:])])
    assert result.runs[0].predictions == tuple(together.argmax(1).tolist())
    if bn_mode == "running":  # inductive: a drawing's output does not depend on the others
        torch.testing.assert_close(halves, together)
    else:  # transductive: the test drawings are normalised as one batch
        assert (halves - together).abs().max() > 1e-3


# -- trained models through the command ---------------------------------------------------------

def _train_args(tiny, root, log_dir, method):
    """A 2-meta-step 5-way 1-shot run of the few-shot protocol on the synthetic alphabets, with
    the classic strided conv net."""
    return tiny(root, log_dir, method, "--protocol", "fewshot", "--ways", "5", "--shots", "1",
                "--queries", "2", "--test_episodes", "2", "--num_val", "0",
                "--downsample", "stride")


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "leap", "anil", "imaml"])
def test_trained_models_score_with_a_zero_head(tiny, omniglot_root, official, tmp_path, method,
                                               capsys):
    argv = _train_args(tiny, omniglot_root, tmp_path, method)
    main.main(argv)
    trained_ways = 5
    run_dir = tmp_path / method / "tmp"
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)["learner"]["model"]
    assert checkpoint["head.weight"].shape[0] == trained_ways
    with pytest.raises(ValueError, match=rf"meta-trained {trained_ways}-way .* 20-way.*"
                                         r"--oneshot_head zero"):
        evaluate_oneshot.main_oneshot([*argv, "--runs", str(official[0])])

    result = evaluate_oneshot.main_oneshot([*argv, "--runs", str(official[0]),
                                            "--oneshot_head", "zero"])
    printed = capsys.readouterr().out
    assert len(result.runs) == RUNS and result.steps == 2
    assert result.error_rate == pytest.approx(sum(r.error_rate for r in result.runs) / RUNS)
    for r in result.runs:
        assert r.tests == WAYS and r.error_rate == r.errors / WAYS
        # a zero head makes every class equally likely before the first step: loss log(20)
        assert r.inner_losses[0] == pytest.approx(math.log(WAYS), abs=1e-5)
        assert f"{r.name}" in printed
    assert "overall error rate" in printed and "BatchNorm batch (transductive)" in printed
    saved = json.loads((run_dir / "oneshot.json").read_text())
    assert saved["error_rate"] == pytest.approx(result.error_rate)
    assert saved["head"] == "zero" and saved["trained_ways"] == trained_ways
    assert saved["meta_model"] == method and saved["step"] == 2
    assert [r["errors"] for r in saved["runs"]] == [r.errors for r in result.runs]

    args, _ = evaluate_oneshot.parse_args([*argv, "--oneshot_head", "zero"])
    loaded = evaluate_oneshot.load_model(args, head="zero")
    state = loaded.learner.model.state_dict()
    for name, value in checkpoint.items():
        if name.startswith("head."):
            assert state[name].shape[0] == WAYS and not state[name].any()
        else:
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_zero_head_without_inner_learning_ties_every_class(tiny, omniglot_root, official,
                                                           tmp_path):
    argv = _train_args(tiny, omniglot_root, tmp_path, "maml")
    main.main(argv)
    # inner lr 0: the head stays zero, every class ties, argmax says class 0 for every drawing,
    # so each run (a permutation of 20 classes) has exactly 19 errors.
    result = evaluate_oneshot.main_oneshot([*argv, "--runs", str(official[0]), "--oneshot_head",
                                            "zero", "--inner_kwargs", "lr", "0.0"])
    assert [r.errors for r in result.runs] == [19] * RUNS
    assert result.error_rate == pytest.approx(0.95)
    assert all(set(r.predictions) == {0} for r in result.runs)


def test_a_20_way_checkpoint_uses_its_own_head_and_inductive_bn(tiny, omniglot_root, official,
                                                                tmp_path, capsys):
    argv = [*tiny(omniglot_root, tmp_path, "maml"), "--classes", "20", "--bn_mode", "running",
            "--runs", str(official[0])]
    args, _ = evaluate_oneshot.parse_args(argv)
    torch.manual_seed(1)
    learner = build_learner(main.learner_config(args))
    run_dir = tmp_path / "maml" / "tmp"
    with main.run_folder(args) as folder:
        main.save_checkpoint(folder, "checkpoint.pt", learner,
                             main.RunState(7, torch.Generator(), random.Random(0)),
                             main.run_flags(args))
    result = evaluate_oneshot.main_oneshot(argv)
    assert "BatchNorm running (inductive)" in capsys.readouterr().out
    assert result.bn_mode == "running" and not result.transductive
    loaded = evaluate_oneshot.load_model(args)
    assert loaded.step == 7 and loaded.head == "checkpoint" and loaded.trained_ways == WAYS
    with main.run_folder(args) as folder:
        main.save_checkpoint(folder, "best.pt", learner,
                             main.RunState(5, torch.Generator(), random.Random(0)),
                             main.run_flags(args))
    best, _ = evaluate_oneshot.parse_args([*argv, "--select", "best"])
    assert evaluate_oneshot.load_model(best).checkpoint == run_dir / "best.pt"
    assert evaluate_oneshot.load_model(best).step == 5
    torch.testing.assert_close(loaded.learner.model.head.weight, learner.model.head.weight)
    assert all(r.inner_losses[0] != pytest.approx(math.log(WAYS), abs=1e-5)
               for r in result.runs)
    assert json.loads((run_dir / "oneshot.json").read_text())["transductive"] is False


def test_command_errors(tiny, omniglot_root, official, tmp_path):
    base = [*tiny(omniglot_root, tmp_path, "ft"), "--runs", str(official[0])]
    with pytest.raises(UsageError, match=r"no trained model at .*checkpoint\.pt"):
        evaluate_oneshot.main_oneshot(base)
    (tmp_path / "ft" / "tmp").mkdir(parents=True)
    (tmp_path / "ft" / "tmp" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--oneshot_head zero supports --meta_model maml"):
        evaluate_oneshot.main_oneshot([*base, "--oneshot_head", "zero"])
    with pytest.raises(ValueError, match="no one-shot run folders"):
        evaluate_oneshot.main_oneshot([*base[:-1], str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate_oneshot.parse_args([*base, "--oneshot_head", "random"])
    # the script: a clear message and exit status 2, like main.py
    script = Path(evaluate_oneshot.__file__)
    done = subprocess.run([sys.executable, str(script), *base, "--suffix", "absent"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: no trained model at" in done.stderr
    assert "absent" in done.stderr


def test_write_runs_from_alphabets_reads_back_with_each_test_item_of_its_class(omniglot_root,
                                                                             tmp_path):
    from oneshot import write_runs

    alphabets = [omniglot_root / "images_background_small1" / "Alpha",
                 omniglot_root / "images_background_small2" / "Delta"]  # 4 characters each
    out = write_runs(alphabets, tmp_path / "runs", runs=3, ways=4, seed=1)
    runs = load_runs(out)
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    for r, run in enumerate(runs):
        folder = out / run.name
        alphabet = alphabets[r % 2]
        for line in (folder / "class_labels.txt").read_text().splitlines():
            test, train = (Path(p) for p in line.split())
            # the test drawing and its training drawing are the same character, other drawers
            same = [c for c in alphabet.iterdir()
                    if any((c / f.name).exists() and (c / f.name).read_bytes()
                           == (out / test).read_bytes() for f in c.iterdir())]
            assert same and any((same[0] / f.name).read_bytes() == (out / train).read_bytes()
                                for f in same[0].iterdir())
            assert (out / test).read_bytes() != (out / train).read_bytes()
    with pytest.raises(ValueError, match="exists"):
        write_runs(alphabets, out)
    with pytest.raises(ValueError, match="has 4 characters; a 5-way run needs 5"):
        write_runs(alphabets, tmp_path / "other", ways=5)


@pytest.mark.parametrize("case", ["truncated", "not_png", "link_to_folder", "dangling_link",
                                  "link_loop"])
def test_unreadable_drawings_are_one_line_naming_the_file(tiny, omniglot_root, runs_copy,
                                                          tmp_path, capsys, case):
    drawing = runs_copy / "run02" / "test" / "item05.png"
    if case == "truncated":
        drawing.write_bytes(drawing.read_bytes()[:60])
    elif case == "not_png":
        drawing.write_text("hello")
    else:
        drawing.unlink()
        target = {"link_to_folder": runs_copy / "run01", "dangling_link": tmp_path / "gone.png",
                  "link_loop": drawing}[case]
        drawing.symlink_to(target)
    with pytest.raises(ValueError, match=r"run02/test/item05\.png is "):
        load_runs(runs_copy)
    with pytest.raises(SystemExit) as exit_info:
        run_command(evaluate_oneshot.main_oneshot,
                    [*tiny(omniglot_root, tmp_path, "maml"), "--runs", str(runs_copy)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {drawing} is " in err and "official archive" in err


def test_a_link_to_a_readable_drawing_is_read(runs_copy):
    drawing = runs_copy / "run02" / "test" / "item05.png"
    elsewhere = runs_copy.parent / "kept.png"
    drawing.rename(elsewhere)
    drawing.symlink_to(elsewhere)
    assert torch.equal(load_runs(runs_copy)[1].test_images[4],
                       torch.from_numpy(decode_drawing(str(elsewhere), "area")))


def test_a_checkpoint_of_another_method_or_damaged_is_refused(tiny, omniglot_root, official,
                                                              tmp_path, capsys):
    main.main(tiny(omniglot_root, tmp_path, "leap", "--meta_train_steps", "1"))
    maml_dir = tmp_path / "maml" / "tmp"
    maml_dir.mkdir(parents=True)
    shutil.copyfile(tmp_path / "leap" / "tmp" / "checkpoint.pt", maml_dir / "checkpoint.pt")
    argv = [*tiny(omniglot_root, tmp_path, "maml"), "--runs", str(official[0]),
            "--oneshot_head", "zero"]
    with pytest.raises(SystemExit):
        run_command(evaluate_oneshot.main_oneshot, argv)
    assert "was written by --meta_model leap, not --meta_model maml" in capsys.readouterr().err
    data = bytearray((maml_dir / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (maml_dir / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(SystemExit):
        run_command(evaluate_oneshot.main_oneshot, argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (maml_dir / "oneshot.json").exists()


def test_help_shows_every_own_default(capsys):
    with pytest.raises(SystemExit):
        evaluate_oneshot.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: checkpoint)" in text and "(default: <--root>_oneshot)" in text


def test_write_runs_command_bad_input_is_one_line(omniglot_root, tmp_path, capsys):
    import oneshot

    alphabet = str(omniglot_root / "images_background_small1" / "Alpha")
    for argv, message in (([str(tmp_path / "r"), alphabet], "has 4 characters; a 20-way run"),
                          ([str(tmp_path / "r"), str(tmp_path / "nope")], "does not exist"),
                          ([str(tmp_path / "r"), alphabet, "--runs", "0"], "--runs 0")):
        with pytest.raises(SystemExit) as exit_info:
            run_command(oneshot.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "r").exists()
