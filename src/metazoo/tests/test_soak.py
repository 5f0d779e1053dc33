"""The soak benchmark (benchmarks/soak.py), shortened: no memory or tensor growth over 30
meta-steps of MAML, Leap and WarpGrad after warm-up, and a deliberate leak is caught.

Also: every soaked learner's checkpoint loads with ``torch.load(weights_only=True)``.
The soak drives the algorithm packages, so this test is skipped where they are not installed.
"""

import importlib.util
import mmap
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("maml")
pytest.importorskip("leap")
pytest.importorskip("warpgrad")

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak_module():
    spec = importlib.util.spec_from_file_location("metazoo_soak_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
    del sys.modules[spec.name]


@pytest.mark.parametrize("name", ["maml", "leap", "warpgrad"])
def test_no_growth_after_warm_up(soak_module, name):
    result = soak_module.soak(name, steps=30, every=15, warmup=15, tasks=1)
    assert [s[0] for s in result.samples] == [0, 15, 30]
    assert result.tensor_growth == 0, result.samples
    assert result.rss_growth_mib <= 8.0, result.samples


def test_a_leak_is_detected(soak_module):
    kept = []

    def leak(step):
        # 1 MiB per meta-step in a tensor over fresh, touched pages of its own: a tensor from
        # malloc could reuse heap that earlier tests freed, and then RSS would not grow.
        pages = mmap.mmap(-1, 1 << 20)
        pages.write(b"\1" * (1 << 20))
        kept.append(torch.frombuffer(pages, dtype=torch.uint8))

    result = soak_module.soak("reptile", steps=20, every=10, warmup=10, tasks=1, on_step=leak)
    assert result.tensor_growth == 10
    assert result.rss_growth_mib > 2.0
    # The script's exit status reports growth beyond the bounds (here: any count at all).
    assert soak_module.main(["--algorithms", "reptile", "--steps", "2", "--every", "2",
                             "--warmup", "0", "--tasks", "1", "--tensor_bound", "-1"]) == 1


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "imaml", "leap", "warpgrad"])
def test_every_learners_checkpoint_loads_with_weights_only(soak_module, name, tmp_path):
    """Each soaked learner's state_dict (after a meta-step, so with optimizer state) is plain
    tensors and containers: it round-trips through torch.load(weights_only=True)."""
    learner = soak_module.build(name)
    learner.meta_step(soak_module.make_tasks(torch.Generator().manual_seed(0), 1))
    torch.save(learner.state_dict(), tmp_path / "learner.pt")
    fresh = soak_module.build(name)
    fresh.load_state_dict(torch.load(tmp_path / "learner.pt", weights_only=True))
    for (n, a), (_, b) in zip(learner.named_meta_parameters(), fresh.named_meta_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    assert str(fresh.meta_optimizer.state_dict()) == str(learner.meta_optimizer.state_dict())
