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


def test_atomic_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "log" / "rewards.csv"
    metazoo.atomic_write_text("a,b\n1,2\n", path)
    metazoo.atomic_write_text("a,b\nü,3\n", path, durable=False)
    assert path.read_text(encoding="utf-8") == "a,b\nü,3\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(path.parent) == ["rewards.csv"]


def test_failed_text_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "rewards.csv"
    metazoo.atomic_write_text("episode\n0\n1\n", path)

    class Unencodable(str):
        def encode(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        metazoo.atomic_write_text(Unencodable("episode\n"), path)
    assert path.read_text() == "episode\n0\n1\n"
    assert os.listdir(tmp_path) == ["rewards.csv"]
