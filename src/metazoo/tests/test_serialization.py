"""atomic_save: a failed write keeps the previous file and leaves nothing behind."""

import os
import stat

import pytest
import torch

import metazoo


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_save_round_trip_and_permissions(tmp_path, durable):
    path = tmp_path / "sub" / "checkpoint.pt"
    metazoo.atomic_save({"w": torch.arange(3.0), "step": 4}, path, durable=durable)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 4 and torch.equal(loaded["w"], torch.arange(3.0))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(path.parent) == ["checkpoint.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    metazoo.atomic_save({"step": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        metazoo.atomic_save({"step": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
