"""lightning_main.py: the same flags through main.py and through Lightning give the same
meta-parameters and test accuracies (few-shot MAML and WarpGrad, the alphabet protocol), on the
synthetic alphabets; a killed-and-resumed Lightning run draws the meta-batches main.py draws."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

import torch

import lightning_main
import main
from metazoo.cli import UsageError

# Lightning 2.6 on torch 2.14 flattens its loaders with a deprecated torch pytree class.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"
                               r":FutureWarning"),
]


# The few-shot runs here (the conftest's ``fewshot`` flags): 3 meta-steps, validation at 2.
RUN = {"steps": 3, "test_ival": 2}


def main_state(log_dir: Path, method: str) -> dict[str, torch.Tensor]:
    state = torch.load(log_dir / method / "tmp" / "checkpoint.pt", weights_only=True)
    return state["learner"]


def flat(state, prefix=""):
    if isinstance(state, dict):
        return {k: v for key, value in state.items()
                for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix: state} if isinstance(state, torch.Tensor) else {}


@pytest.mark.parametrize("method", ["maml", "warp_maml"])
def test_the_same_flags_give_main_pys_accuracy(omniglot_root, tmp_path, method, fewshot):
    reference = main.main(fewshot(omniglot_root, tmp_path / "main", method, **RUN))
    result = lightning_main.main_lightning(
        fewshot(omniglot_root, tmp_path / "lightning", method, "--save_ival", "3", **RUN))
    assert result["step"] == 3
    assert result["test/accuracy"] == pytest.approx(reference.accuracy.mean, abs=1e-6)
    assert result["test/loss"] == pytest.approx(reference.loss, rel=1e-5)
    # the meta-parameters main.py saved equal those of Lightning's last checkpoint
    ours = torch.load(tmp_path / "lightning" / "lightning" / method / "tmp" / "checkpoints"
                      / "last.ckpt", weights_only=True)["metazoo"]["learner"]
    theirs = main_state(tmp_path / "main", method)
    a, b = flat(ours), flat(theirs)
    assert a.keys() == b.keys() and a
    for key in b:
        if b[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    done = json.loads((tmp_path / "lightning" / "lightning" / method / "tmp" / "done.json")
                      .read_text())
    assert done["test/accuracy"] == result["test/accuracy"]


def test_the_alphabet_protocol_gives_main_pys_accuracy(omniglot_root, tmp_path, tiny):
    flags = [*tiny(omniglot_root, None, "maml"), "--seed", "3"]
    reference = main.main([*flags, "--log_dir", str(tmp_path / "main")])
    result = lightning_main.main_lightning([*flags, "--log_dir", str(tmp_path / "l")])
    assert result["test/accuracy"] == pytest.approx(reference, abs=1e-6)


def test_a_stopped_run_resumed_from_last_ckpt_draws_main_pys_meta_batches(
        omniglot_root, tmp_path, fewshot):
    # 2 meta-steps, then on to 3 from the checkpoint: the data module's generator states
    # travel in Lightning's checkpoint, so meta-batch 3 is main.py's third.
    flags = fewshot(omniglot_root, tmp_path, "fomaml", "--save_ival", "1", **RUN)
    lightning_main.main_lightning([*flags, "--meta_train_steps", "2"])
    resumed = lightning_main.main_lightning([*flags, "--ckpt_path", "last"])
    reference = main.main(fewshot(omniglot_root, tmp_path / "main", "fomaml", **RUN))
    assert resumed["step"] == 3
    assert resumed["test/accuracy"] == pytest.approx(reference.accuracy.mean, abs=1e-6)
    assert resumed["test/loss"] == pytest.approx(reference.loss, rel=1e-5)


def test_main_py_only_flags_are_refused_with_the_lightning_way(omniglot_root, tmp_path, fewshot):
    with pytest.raises(UsageError, match=r"--resume is main\.py's.*--ckpt_path last"):
        lightning_main.main_lightning(fewshot(omniglot_root, tmp_path, "maml", "--resume", **RUN))
    with pytest.raises(UsageError, match="--select best"):
        lightning_main.main_lightning(fewshot(omniglot_root, tmp_path, "maml", "--select",
                                              "best", "--num_val", "1", **RUN))
