"""Device handling of the Omniglot experiment: every --meta_model in both protocols, the
one-shot evaluator, and checkpoints across devices.

On a CPU: whole ``main.py`` runs (data, augmentation, episodes, every learner, evaluation,
checkpoints) under ``metazoo.strict_devices``, which fails where a GPU run would mix host and
device tensors. On a GPU (``pytest -m cuda``): the same runs on CUDA, a checkpoint written on
CUDA resumed on the CPU and the reverse, and the one-shot evaluator on CUDA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

import evaluate_oneshot
import main
import metazoo
from oneshot import write_runs
from wrapper import METHODS

# ft pretrains one head per alphabet task, which the few-shot protocol does not have.
FEWSHOT_METHODS = [m for m in METHODS if m != "ft"]


def _fewshot(tiny, root: Path, log_dir: Path, method: str, *extra: str) -> list[str]:
    return tiny(root, log_dir, method, "--protocol", "fewshot", "--ways", "3", "--shots", "1",
                "--queries", "2", "--test_episodes", "12", "--val_episodes", "4", "--seed", "2",
                *extra)


def _on_cuda(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--no_cuda"]


def _saved_device(run: Path) -> torch.device:
    """Where the checkpoint's model tensors were when it was written."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # no map_location: as saved
    tensors = [t for t in tree_leaves(state["learner"]) if isinstance(t, torch.Tensor)]
    # 0-dim tensors left out: torch.optim keeps step counts on the CPU whatever the device.
    devices = {t.device.type for t in tensors if t.is_floating_point() and t.dim() > 0}
    assert len(devices) == 1, devices
    return torch.device(devices.pop())


@pytest.mark.parametrize("method", METHODS)
def test_alphabet_protocol_never_mixes_host_and_device_tensors(tiny, omniglot_root, tmp_path,
                                                               method):
    with metazoo.strict_devices():
        acc = main.main(tiny(omniglot_root, tmp_path, method, "--channels_last")
                        if method in ("warp_leap", "maml") else
                        tiny(omniglot_root, tmp_path, method))
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("method", FEWSHOT_METHODS)
def test_fewshot_protocol_never_mixes_host_and_device_tensors(tiny, omniglot_root, tmp_path,
                                                              method):
    with metazoo.strict_devices():
        result = main.main(_fewshot(tiny, omniglot_root, tmp_path, method, "--rotations"))
    assert 0.0 <= result.accuracy.mean <= 1.0


def _oneshot(tiny, omniglot_root: Path, tmp_path: Path, *extra: str):
    argv = _fewshot(tiny, omniglot_root, tmp_path, "maml", *extra)
    main.main(argv)
    alphabets = [omniglot_root / "images_background_small1" / "Alpha",
                 omniglot_root / "images_background_small2" / "Delta"]
    runs = write_runs(alphabets, tmp_path / "runs", runs=2, ways=3, seed=1)
    return evaluate_oneshot.main_oneshot([*argv, "--runs", str(runs)])


def test_oneshot_evaluator_never_mixes_host_and_device_tensors(tiny, omniglot_root, tmp_path,
                                                              capsys):
    with metazoo.strict_devices():
        result = _oneshot(tiny, omniglot_root, tmp_path)
    capsys.readouterr()
    assert len(result.runs) == 2 and 0.0 <= result.error_rate <= 1.0


# -- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_alphabet_protocol_two_meta_steps_on_cuda(tiny, omniglot_root, tmp_path, method):
    acc = main.main(_on_cuda(tiny(omniglot_root, tmp_path, method)))
    assert 0.0 <= acc <= 1.0
    assert _saved_device(tmp_path / method / "tmp").type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["warp_leap", "warp_maml", "maml", "reptile", "leap"])
def test_channels_last_two_meta_steps_on_cuda(tiny, omniglot_root, tmp_path, method):
    acc = main.main(_on_cuda(tiny(omniglot_root, tmp_path, method, "--channels_last")))
    assert 0.0 <= acc <= 1.0


@pytest.mark.cuda
@pytest.mark.parametrize("method", FEWSHOT_METHODS)
def test_fewshot_protocol_two_meta_steps_on_cuda(tiny, omniglot_root, tmp_path, method):
    result = main.main(_on_cuda(_fewshot(tiny, omniglot_root, tmp_path, method, "--rotations")))
    assert 0.0 <= result.accuracy.mean <= 1.0
    assert _saved_device(tmp_path / method / "tmp").type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["warp_leap", "maml", "leap"])
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(tiny, omniglot_root, tmp_path, method, first,
                                                  then):
    def argv(device: str, *extra: str) -> list[str]:
        flags = tiny(omniglot_root, tmp_path, method, "--save_ival", "1", *extra)
        return flags if device == "cpu" else _on_cuda(flags)

    main.main(argv(first, "--meta_train_steps", "1"))
    run = tmp_path / method / "tmp"
    assert _saved_device(run).type == first
    acc = main.main(argv(then, "--resume"))
    assert 0.0 <= acc <= 1.0 and math.isfinite(acc)
    assert _saved_device(run).type == then
    done = json.loads((run / "done.json").read_text())
    assert done["step"] == 2


@pytest.mark.cuda
def test_oneshot_evaluator_on_cuda(tiny, omniglot_root, tmp_path, capsys):
    on_cpu = _oneshot(tiny, omniglot_root, tmp_path)  # trained and scored on the CPU
    argv = _on_cuda(_fewshot(tiny, omniglot_root, tmp_path, "maml"))
    on_cuda = evaluate_oneshot.main_oneshot([*argv, "--runs", str(tmp_path / "runs")])
    capsys.readouterr()
    assert len(on_cuda.runs) == len(on_cpu.runs) == 2
    for a, b in zip(on_cuda.runs, on_cpu.runs):  # float32, exact precision: close, not equal
        assert a.inner_losses == pytest.approx(b.inner_losses, rel=1e-4, abs=1e-5)
