"""Device handling of the maze experiment.

On a CPU: episodes of both agents under ``metazoo.strict_devices``, which fails where a GPU run
would mix host and device tensors; a checkpoint's random streams refuse to continue on another
device type with a clear error. On a GPU (``pytest -m cuda``): a few episodes of each agent on
CUDA, a resumed CUDA run equal to a straight one, and the refusals across devices.
"""

from __future__ import annotations

import math

import pytest
import torch

import metazoo
from train import TrainConfig, Trainer

TINY = {"hidden_size": 6, "batch_size": 3, "episode_length": 12, "maze_size": 7,
        "dtype": "float64", "random_episodes": 2, "meta_update_ival": 2}


def _trainer(agent: str, device: str) -> Trainer:
    return Trainer(config=TrainConfig(**{**TINY, "agent": agent}), device=device)


@pytest.mark.parametrize("agent", ["warp", "lstm"])
def test_episodes_never_mix_host_and_device_tensors(agent):
    with metazoo.strict_devices():
        trainer = _trainer(agent, "cpu")
        trainer.measure_random_policy()
        results = [trainer.train_episode() for _ in range(3)]
    assert all(math.isfinite(r.loss) for r in results)


def test_a_checkpoint_names_the_device_of_its_random_streams():
    trainer = _trainer("lstm", "cpu")
    state = trainer.state_dict()
    assert state["rng_device"] == "cpu"
    state["rng_device"] = "cuda"  # as written by a GPU run
    with pytest.raises(ValueError, match=r"written on cuda.*resume with --device cuda"):
        _trainer("lstm", "cpu").load_state_dict(state)


@pytest.mark.cuda
@pytest.mark.parametrize("agent", ["warp", "lstm"])
def test_episodes_on_cuda_and_a_resumed_run_equals_a_straight_one(agent):
    straight = _trainer(agent, "cuda")
    straight.measure_random_policy()
    expected = [straight.train_episode() for _ in range(4)]
    assert all(math.isfinite(r.loss) for r in expected)
    part = _trainer(agent, "cuda")
    part.measure_random_policy()
    for _ in range(2):
        part.train_episode()
    resumed = _trainer(agent, "cuda")
    resumed.load_state_dict(part.state_dict())
    got = [resumed.train_episode() for _ in range(2)]
    # Not bit for bit: CUDA's scatter-add in the backward of gather may add in any order.
    assert [r.loss for r in got] == pytest.approx([r.loss for r in expected[2:]], rel=1e-10)
    for a, b in zip(resumed.agent.parameters(), straight.agent.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
def test_checkpoints_do_not_continue_on_the_other_device_type():
    on_cuda = _trainer("warp", "cuda").state_dict()
    with pytest.raises(ValueError, match="written on cuda"):
        _trainer("warp", "cpu").load_state_dict(on_cuda)
    on_cpu = _trainer("warp", "cpu").state_dict()
    with pytest.raises(ValueError, match="written on cpu"):
        _trainer("warp", "cuda").load_state_dict(on_cpu)


@pytest.mark.parametrize("precision, value", [("tf32", "tf32"), ("exact", "ieee")])
def test_the_precision_flag_sets_the_backends_for_the_process(tmp_path, precision, value):
    import run

    before = metazoo.fp32_precision_flags()
    try:
        run.main(["--hs", "6", "--bs", "2", "--eplen", "4", "--msize", "7", "--nbiter", "1",
                  "--random_episodes", "1", "--precision", precision, "--out", str(tmp_path)])
        assert metazoo.fp32_precision_flags() == dict.fromkeys(before, value)
    finally:
        for name, backend in (("cuda.matmul", torch.backends.cuda.matmul),
                              ("cudnn.conv", torch.backends.cudnn.conv),
                              ("cudnn.rnn", torch.backends.cudnn.rnn)):
            backend.fp32_precision = before[name]
