"""metazoo.testing: the device comparison must be able to fail."""

import pytest
import torch

from metazoo.testing import MetaStepSnapshot, assert_same_meta_step, image_tasks, tasks_to


def _snapshot(value: float, name: str = "w") -> MetaStepSnapshot:
    t = {name: torch.full((2,), value, dtype=torch.float64)}
    return MetaStepSnapshot(grads=t, adapted=dict(t), stepped=dict(t))


def test_equal_snapshots_pass_and_different_ones_fail():
    assert_same_meta_step(_snapshot(1.0), _snapshot(1.0 + 1e-12))
    with pytest.raises(AssertionError, match="grads w"):
        assert_same_meta_step(_snapshot(1.0), _snapshot(1.0 + 1e-8))
    with pytest.raises(AssertionError, match="grads"):
        assert_same_meta_step(_snapshot(1.0, "v"), _snapshot(1.0))
    empty = MetaStepSnapshot({}, {}, {})
    with pytest.raises(AssertionError, match="empty"):
        assert_same_meta_step(empty, empty)


def test_image_tasks_are_seeded_and_move_whole():
    a, b = image_tasks(seed=3), image_tasks(seed=3)
    assert torch.equal(a[1].query[0], b[1].query[0])
    moved = tasks_to(a, "meta")
    assert all(t.device.type == "meta" for task in moved for batch in [*task.support, task.query]
               for t in batch)
