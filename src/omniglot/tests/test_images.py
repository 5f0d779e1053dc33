"""images.py: decoding every PIL mode by its known pixel values, unreadable files named in one
line, and caches used only from private folders, keyed on content, rebuilt when damaged."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
from episodes import load_image_folder

SIZE = 28  # decode_drawing's output size: no resize, so pixels can be checked one by one


def _ink(grey: np.ndarray) -> np.ndarray:
    """What decode_drawing gives for an image of these grey levels (255 = ink)."""
    return 255 - grey.astype(np.int64)


def _ramp(top: int) -> np.ndarray:
    return np.linspace(0, top, SIZE * SIZE).round().reshape(SIZE, SIZE)


def _grey_cases(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """file per mode -> (path, the grey levels 0..255 a viewer shows)."""
    cases = {}
    ramp8 = _ramp(255).astype(np.uint8)
    ramp16 = _ramp(65535).astype(np.uint16)
    expect16 = np.round(ramp16 / 65535 * 255)

    def save(name: str, img: Image.Image, expected: np.ndarray, **kwargs) -> None:
        path = tmp_path / name
        img.save(path, **kwargs)
        cases[name] = (path, expected)

    bits = (np.indices((SIZE, SIZE)).sum(0) % 2).astype(bool)
    save("bilevel.png", Image.fromarray(bits), np.where(bits, 255, 0))
    save("grey8.png", Image.fromarray(ramp8), ramp8)
    save("grey16.png", Image.fromarray(ramp16), expect16)  # PIL opens it as I;16
    save("grey16.tif", Image.fromarray(ramp16), expect16)
    save("int32.tif", Image.fromarray(ramp16.astype(np.int32)), expect16)  # mode I
    save("float.tif", Image.fromarray((ramp8 / 255).astype(np.float32)), ramp8)  # mode F
    # Palette: four grey entries indexed by the image's quarter.
    index = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 4 // (SIZE * SIZE)).astype(np.uint8)
    palette = Image.fromarray(index, mode="P")
    palette.putpalette([0, 0, 0, 80, 80, 80, 160, 160, 160, 240, 240, 240])
    save("palette.png", palette, np.array([0, 80, 160, 240])[index])
    # Grey + alpha: ink drawn opaque on a fully transparent, black-valued background. The
    # background must come out white (paper), not black (the hidden colour).
    alpha = np.where(bits, 255, 0).astype(np.uint8)
    la = Image.merge("LA", [Image.fromarray(np.zeros_like(alpha)), Image.fromarray(alpha)])
    save("grey_alpha.png", la, np.where(bits, 0, 255))
    half = Image.merge("LA", [Image.fromarray(np.zeros_like(alpha)),
                              Image.fromarray(np.full_like(alpha, 128))])
    save("half_alpha.png", half, np.full((SIZE, SIZE), 127))  # 50% black over white
    return cases


def test_every_grey_mode_decodes_to_its_known_ink(tmp_path):
    """Issue 28 item 3: a 0..65535 ramp decoded as [244, 255, 255, ...], 94% at 255 (PIL's
    I;16 conversion clips); every mode must give the grey levels a viewer shows."""
    for name, (path, grey) in _grey_cases(tmp_path).items():
        with Image.open(path) as img:
            mode = img.mode
        got = data.decode_drawing(str(path), "area").astype(np.int64)
        assert np.abs(got - _ink(grey)).max() <= 1, (name, mode, got.ravel()[:8])
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode == "I;16"  # the case of the issue is the one tested


def test_colour_modes_decode_to_their_known_rgb(tmp_path):
    root = tmp_path / "set"
    folder = root / "train" / "c"
    folder.mkdir(parents=True)
    red = Image.new("RGB", (4, 4), (200, 30, 10))
    red.save(folder / "rgb.png")
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))  # invisible blue: white paper
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(folder / "rgba.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=100)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30])
    pal.save(folder / "palette.png")
    loaded = load_image_folder(root, "train", image_size=4, cache_dir=tmp_path / "cache")
    got = {f: loaded.images[i].permute(1, 2, 0).int() for i, f in enumerate(
        ["cmyk.jpg", "palette.png", "rgb.png", "rgba.png"])}
    assert (got["rgb.png"] == torch.tensor([200, 30, 10])).all()
    assert (got["palette.png"] == torch.tensor([10, 200, 30])).all()
    assert (got["rgba.png"][0, 0] == torch.tensor([0, 0, 255])).all()
    assert (got["rgba.png"].reshape(-1, 3)[1:] == 255).all()
    assert (got["cmyk.jpg"] - torch.tensor([255, 0, 0])).abs().max() <= 3  # CMYK red is red


def test_out_of_range_integer_and_float_images_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(path)
    with pytest.raises(ValueError, match=rf"{path} .*0\.\.65535"):
        images.read_image(path)
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32)).save(path)
    with pytest.raises(ValueError, match=rf"{path} .*outside 0\.\.1"):
        images.read_image(path)


def _unreadable(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(path)  # incompressible: the cut is inside the pixels
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "not_an_image":
        path.write_text("these are notes, not pixels")
    elif kind == "dangling":
        path.symlink_to(folder / "moved_away.png")
    elif kind == "bomb":
        Image.new("1", (12000, 12000)).save(path)  # 144 MP of zeros: a few hundred bytes
    return path


@pytest.mark.parametrize("kind, says", [
    ("empty", "is empty"), ("truncated", "is truncated or damaged"),
    ("not_an_image", "is not an image PIL can read"),
    ("dangling", "is a link to a missing file"), ("bomb", "decompression bomb")])
def test_an_unreadable_image_in_an_image_folder_is_named_in_one_line(tmp_path, kind, says):
    """Issue 28 item 8: raw tracebacks (or, for a dangling link, silence) before."""
    root = tmp_path / "set"
    folder = root / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "good.png")
    bad = _unreadable(folder, kind)
    with pytest.raises(ValueError) as info:
        load_image_folder(root, "train", image_size=4, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(str(bad)) and says in message and "\n" not in message, message


# -- caches ----------------------------------------------------------------------------------


@pytest.fixture
def root(omniglot_root, tmp_path, monkeypatch):
    """A private copy of the synthetic alphabets, with the fallbacks inside tmp_path."""
    copy = tmp_path / "data"
    shutil.copytree(omniglot_root, copy, ignore=shutil.ignore_patterns("omniglot_cache_*"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return copy


def _zeroed_cache_like(reference: Path, target: Path) -> None:
    """A planted cache: the real one's content with every image zeroed, checksum and all."""
    from metazoo.serialization import load_checked, save_checked

    state = load_checked(reference)
    save_checked({k: [torch.zeros_like(t) for t in v] for k, v in state.items()}, target)


def test_a_cache_planted_in_a_fallback_folder_is_not_used_when_root_is_writable(root, tmp_path):
    """Issue 28 item 5: with a writable --root, a zeroed cache in the XDG or the temporary
    fallback was read silently (meta_loss 1.6198 instead of 1.7032)."""
    notes: list[str] = []
    decoded = data.load_alphabets(root, notes=notes)
    (cache,) = root.glob("omniglot_cache_*.pt")
    assert notes == [f"note: images decoded and cached in {cache}"]
    for fallback in data.fallback_cache_dirs():
        fallback.mkdir(parents=True, exist_ok=True)
        _zeroed_cache_like(cache, fallback / cache.name)
    cache.unlink()
    again = data.load_alphabets(root, notes=notes)
    assert all(torch.equal(a, b) for n in decoded for a, b in zip(decoded[n], again[n]))
    assert notes[1] == f"note: images decoded and cached in {cache}"


def test_a_fallback_folder_of_another_user_is_never_read(root, tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("making a folder owned by another user needs root")
    real_writable = images._writable
    monkeypatch.setattr(images, "_writable", lambda folder: folder != root and
                        real_writable(folder))  # --root read-only
    _, tmp = data.fallback_cache_dirs()
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # cannot hold a folder
    reference = data.load_alphabets(root, cache_dir=tmp_path / "mine")
    (mine,) = (tmp_path / "mine").glob("*.pt")
    tmp.mkdir(mode=0o700)
    _zeroed_cache_like(mine, tmp / mine.name)
    os.chown(tmp, 12345, 12345)  # someone else made the predictable folder first
    os.chown(tmp / mine.name, 12345, 12345)
    notes: list[str] = []
    got = data.load_alphabets(root, notes=notes)
    assert all(torch.equal(a, b) for n in reference for a, b in zip(reference[n], got[n]))
    assert "kept in memory only" in notes[0] and f"{tmp} belongs to another user" in notes[0]
    # Writable by others is refused the same way, even when owned by this user.
    os.chown(tmp, 0, 0)
    tmp.chmod(0o777)
    data.load_alphabets(root, notes=notes)
    assert f"{tmp} is writable by other users" in notes[1]


@pytest.mark.parametrize("damage", ["truncated", "unpicklable", "wrong_content",
                                    "other_alphabets", "edited"])
def test_a_damaged_cache_is_decoded_again_and_rewritten(root, damage):
    """Issue 28 item 5: a raw PytorchStreamReader/unpickling/IndexError on every run before."""
    reference = data.load_alphabets(root)
    (cache,) = root.glob("omniglot_cache_*.pt")
    raw = cache.read_bytes()
    if damage == "truncated":
        cache.write_bytes(raw[:len(raw) // 2])
    elif damage == "unpicklable":
        cache.write_bytes(b"\x80\x04 not a pickle at all")
    elif damage == "wrong_content":
        torch.save({"Alpha": [torch.zeros(1, 28, 28, dtype=torch.uint8)]}, cache)
    elif damage == "other_alphabets":
        from metazoo.serialization import save_checked
        save_checked({"Alpha": [torch.zeros(1, 28, 28, dtype=torch.uint8)]}, cache)
    else:  # images zeroed after the checksum was stored
        state = torch.load(cache, weights_only=True)
        state["Alpha"][0].zero_()
        torch.save(state, cache)
    notes: list[str] = []
    got = data.load_alphabets(root, notes=notes)
    assert all(torch.equal(a, b) for n in reference for a, b in zip(reference[n], got[n]))
    assert notes[0].startswith(f"note: cache {cache} was unusable (") and notes[0].endswith(
        "decoded again and rewritten"), notes
    assert "\n" not in notes[0]
    data.load_alphabets(root, notes=notes)  # the rewritten cache is read
    assert notes[1] == f"note: images read from cache {cache}"


def test_the_key_is_the_content_not_the_size_and_time(root):
    """A drawing replaced by another of the same size and time stamp is decoded again."""
    first = data.load_alphabets(root)
    chars = sorted((root / "images_background_small1" / "Alpha").iterdir())
    a, b = sorted(chars[0].iterdir())[0], sorted(chars[1].iterdir())[0]
    replacement, info = b.read_bytes(), a.stat()
    if len(replacement) > info.st_size:
        a, b = b, a
        replacement, info = b.read_bytes(), a.stat()
    # Padded after the PNG's end (PIL ignores it) to the size of the drawing it replaces.
    a.write_bytes(replacement + bytes(info.st_size - len(replacement)))
    os.utime(a, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert a.stat().st_size == info.st_size and a.stat().st_mtime_ns == info.st_mtime_ns
    first["Alpha"][int(a.parent.name[-2:]) - 1][0] = first["Alpha"][int(b.parent.name[-2:]) - 1][0]
    second = data.load_alphabets(root)
    assert all(torch.equal(x, y) for x, y in zip(first["Alpha"], second["Alpha"]))
    assert len(list(root.glob("omniglot_cache_*.pt"))) == 2
