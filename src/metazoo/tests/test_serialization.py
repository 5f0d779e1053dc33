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


def test_save_checked_round_trip_and_a_flipped_bit_is_refused(tmp_path):
    from metazoo.serialization import load_checked, save_checked, state_digest

    state = {"w": torch.arange(64, dtype=torch.float32), "step": 3, "opt": {0: {"lr": 0.1}},
             "names": ("a", "b"), "flag": None, "h": torch.zeros(2, dtype=torch.bfloat16)}
    path = tmp_path / "checkpoint.pt"
    save_checked(state, path)
    plain = torch.load(path, weights_only=True)  # still a plain state dict
    assert plain["sha256"] == state_digest(state) and plain["step"] == 3
    loaded = load_checked(path, require=True)
    assert "sha256" not in loaded and torch.equal(loaded["w"], state["w"])
    assert state_digest(loaded) == state_digest(state)
    data = bytearray(path.read_bytes())
    at = data.find(state["w"].numpy().tobytes())
    data[at + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checked(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_checked(path)
    metazoo.atomic_save({"step": 1}, path)  # written before checksums existed
    assert load_checked(path) == {"step": 1}
    with pytest.raises(ValueError, match="has no checksum"):
        load_checked(path, require=True)
    with pytest.raises(ValueError, match="reserved"):
        save_checked({"sha256": "x"}, path)
    with pytest.raises(TypeError, match="cannot checksum a object"):
        state_digest({"x": object()})


def test_the_digest_sees_dtype_shape_and_order_of_values():
    from metazoo.serialization import state_digest

    x = torch.arange(4, dtype=torch.float32)
    assert state_digest({"a": x}) != state_digest({"a": x.double()})
    assert state_digest({"a": x}) == state_digest({"a": x.clone()})
    assert state_digest({"a": x}) != state_digest({"a": x.view(2, 2)})
    assert state_digest({"a": 1, "b": 2}) == state_digest({"b": 2, "a": 1})
    assert state_digest([1, 2]) != state_digest([2, 1]) != state_digest((2, 1))
    assert state_digest({"a": 1}) != state_digest({"a": 1.0}) != state_digest({"a": True})
