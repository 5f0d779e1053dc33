"""data.py: discovery and dedupe, the cache, both resize modes, the seeded split and the
augmentation."""

import math
from pathlib import Path

import pytest
import torch

import data


def test_find_alphabets_dedupes_and_sorts(omniglot_root):
    alphabets = data.find_alphabets(omniglot_root)
    names = [a.name for a in alphabets]
    assert names == sorted(["Alpha", "Beta", "Delta", "Epsilon", "Gamma", "Shared", "Tiny"])
    shared = next(a for a in alphabets if a.name == "Shared")
    assert "images_background_small1" in shared.characters[0][1][0]  # first archive wins
    assert [len(imgs) for _, imgs in shared.characters] == [5] * 5


def test_find_alphabets_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"make_omniglot\.sh -d --source"):
        data.find_alphabets(tmp_path / "missing")
    with pytest.raises(ValueError, match="no Omniglot alphabet"):
        data.find_alphabets(tmp_path)


def test_load_alphabets_decodes_once_and_caches(omniglot_root, tmp_path):
    images = data.load_alphabets(omniglot_root, cache_dir=tmp_path)
    caches = list(tmp_path.glob("omniglot_cache_*.pt"))
    assert len(caches) == 1
    assert images["Alpha"][0].shape == (5, 28, 28) and images["Alpha"][0].dtype == torch.uint8
    # strokes are ink (high), the background 0: zero padding under augmentation is background
    assert images["Alpha"][0][:, 0, 0].eq(0).all() and images["Alpha"][0].max() > 200
    mtime = caches[0].stat().st_mtime_ns
    again = data.load_alphabets(omniglot_root, cache_dir=tmp_path)
    assert caches[0].stat().st_mtime_ns == mtime
    assert all(torch.equal(a, b) for k in images for a, b in zip(images[k], again[k]))
    assert not list(tmp_path.glob("*.tmp"))


def test_nearest_mode_is_binary_and_area_mode_is_grey(omniglot_root, tmp_path):
    near = data.load_alphabets(omniglot_root, resize="nearest", cache_dir=tmp_path)
    area = data.load_alphabets(omniglot_root, resize="area", cache_dir=tmp_path)
    assert set(near["Beta"][1].unique().tolist()) == {0, 255}
    assert len(area["Beta"][1].unique()) > 2
    assert len(list(tmp_path.glob("omniglot_cache_*.pt"))) == 2
    with pytest.raises(ValueError, match="resize"):
        data.load_alphabets(omniglot_root, resize="bicubic", cache_dir=tmp_path)


def test_nearest_matches_the_reference_resize(omniglot_root, tmp_path):
    import numpy as np
    from PIL import Image
    path = data.find_alphabets(omniglot_root)[0].characters[0][1][0]
    with Image.open(path) as img:
        # the reference's resize.py call; Pillow resizes mode '1' images with NEAREST
        ref = img.resize((28, 28), resample=Image.Resampling.LANCZOS)
    expected = torch.from_numpy(np.asarray(ref.convert("L")).astype(np.int64))
    got = data.load_alphabets(omniglot_root, resize="nearest", cache_dir=tmp_path)["Alpha"][0][0]
    assert torch.equal(got.long(), 255 - expected)


def _counts(root: Path):
    images = data.load_alphabets(root, cache_dir=root)
    return ({a: len(c) for a, c in images.items()},
            {a: [t.shape[0] for t in c] for a, c in images.items()})


def test_split_depends_on_the_seed_alone(omniglot_root):
    chars, draws = _counts(omniglot_root)
    kw = {"num_train": 3, "num_val": 1, "num_test": 2, "classes": 3, "train_images": 3}
    a = data.make_split(chars, draws, seed=5, **kw)
    b = data.make_split(dict(reversed(list(chars.items()))), draws, seed=5, **kw)
    assert a == b and a.to_json() == b.to_json()
    others = [data.make_split(chars, draws, seed=s, **kw) for s in range(6, 12)]
    assert any(o.to_json() != a.to_json() for o in others)
    assert "Tiny" not in a.train + a.val + a.test
    assert len(set(a.train + a.val + a.test)) == 6
    for name, chosen in a.characters.items():
        assert len(chosen) == 3 and chosen == sorted(chosen)
        assert all(len(k) == 3 for k in a.train_images[name])


def test_split_validation_messages(omniglot_root):
    chars, draws = _counts(omniglot_root)
    with pytest.raises(ValueError, match="only 6 have >= 3 characters"):
        data.make_split(chars, draws, seed=0, num_train=5, num_val=1, num_test=2, classes=3)
    with pytest.raises(ValueError, match="leaves none held out"):
        data.make_split(chars, draws, seed=0, num_train=1, num_val=0, num_test=1, classes=3,
                        train_images=5)


def test_augment_identity_and_known_rotation():
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)

    g = torch.Generator().manual_seed(0)
    same = data.augment(x, g, rotation=0.0, translation=0.0, scale=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-12)
    # 90 degrees exactly: u = 0.25 of 360 degrees; compare with torch.rot90
    img = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    img[0, 0, 3:10, 5:8] = 1.0
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = data.augment(img, g, rotation=90.0 / u[0, 0].item(), translation=0.0,
                       scale=(1.0, 1.0))
    rotated = [torch.rot90(img, k, dims=(2, 3)) for k in (1, 3)]
    assert min((out - r).abs().max().item() for r in rotated) < 1e-9
    assert math.isclose(out.sum().item(), img.sum().item(), rel_tol=1e-9)


def test_augment_ranges_and_determinism():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 12:16, 12:16] = 1.0
    a = data.augment(x, torch.Generator().manual_seed(1))
    b = data.augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    mass = a.sum(dim=(1, 2, 3)) / x[0].sum()
    # area scales by 1/s^2 for s in [0.8, 1.2]; translation keeps the square inside
    assert mass.min() > 1 / 1.2**2 - 0.1 and mass.max() < 1 / 0.8**2 + 0.1
    assert not torch.equal(a[0], a[1])


def test_augment_equals_affine_grid_and_grid_sample_across_chunks():
    """The cached-grid, chunked CPU path (more images than one chunk, a ragged last chunk)
    is torch's affine_grid + grid_sample on the same random draws."""
    n = 2 * data._AUGMENT_CHUNK + 37
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(3),
                   dtype=torch.float64)
    out = data.augment(x, torch.Generator().manual_seed(4))
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    angle, s = u[:, 0] * 2 * math.pi, 0.8 + u[:, 1] * 0.4
    t = (u[:, 2:] * 2 - 1) * 0.4
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1),
                         torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
    want = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_task_sampler_batches_and_held_out(omniglot_root):
    chars, draws = _counts(omniglot_root)
    split = data.make_split(chars, draws, seed=1, num_train=3, num_val=1, num_test=2, classes=3,
                            train_images=3)
    images = data.load_alphabets(omniglot_root, cache_dir=omniglot_root)
    sampler = data.TaskSampler(images, split, dtype=torch.float64)
    name = split.train[0]
    batches = sampler.batches(name, steps=4, batch_size=5,
                              generator=torch.Generator().manual_seed(0))
    assert len(batches) == 4 and batches[0][0].shape == (5, 1, 28, 28)
    assert batches[0][0].dtype == torch.float64
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.unique().tolist()) == [0, 1, 2]
    hx, hy = sampler.held_out(name)
    assert hx.shape == (3 * 2, 1, 28, 28) and hy.tolist() == [0, 0, 1, 1, 2, 2]
    tx, _ = sampler.train_images(name)
    # held-out drawings are not among the adaptation drawings
    assert not any(torch.equal(h, t) for h in hx for t in tx)
    again = sampler.batches(name, steps=4, batch_size=5,
                            generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    import random
    assert sampler.meta_batch(split.train, 5, random.Random(0))[:3] != [] and sorted(
        sampler.meta_batch(split.train, 3, random.Random(0))) == sorted(split.train)


def test_a_read_only_root_caches_elsewhere_and_says_so(omniglot_root, tmp_path, monkeypatch):
    """Bug 10: the cache used to be written into --root only, so a read-only data folder was
    fatal. (Simulated: the tests may run as root, whom chmod does not stop.)"""
    import shutil

    import images

    root = tmp_path / "data"
    shutil.copytree(omniglot_root, root, ignore=shutil.ignore_patterns("omniglot_cache_*"))
    real_writable = images._writable
    monkeypatch.setattr(images, "_writable", lambda folder: folder != root and
                        real_writable(folder))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    notes: list[str] = []
    first = data.load_alphabets(root, notes=notes)
    cache = tmp_path / "cache" / "metazoo" / "omniglot"
    cached = list(cache.glob("omniglot_cache_*.pt"))
    assert len(cached) == 1 and not list(root.glob("omniglot_cache_*"))
    assert notes == [f"note: images decoded and cached in {cached[0]} ({root} is not writable)"]
    again = data.load_alphabets(root, notes=notes)  # read from the fallback, and said so
    assert notes[1] == f"note: images read from cache {cached[0]} ({root} is not writable)"
    assert all(torch.equal(a, b) for name in first for a, b in zip(first[name], again[name]))
    # nowhere writable: kept in memory
    monkeypatch.setattr(data, "fallback_cache_dirs", lambda: [])
    data.load_alphabets(root, notes=notes)
    assert "kept in memory only" in notes[2] and len(notes) == 3


def test_an_edited_drawing_is_decoded_again(omniglot_root, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(omniglot_root, root, ignore=shutil.ignore_patterns("omniglot_cache_*"))
    before = data.load_alphabets(root)
    drawing = sorted((root / "images_background_small1" / "Alpha" / "character01").iterdir())[0]
    Image.new("1", (105, 105), 0).save(drawing)  # all ink, same name
    after = data.load_alphabets(root)
    assert int(after["Alpha"][0][0].min()) == 255 and int(before["Alpha"][0][0].min()) == 0
    assert torch.equal(after["Alpha"][0][1:], before["Alpha"][0][1:])
    assert len(list(root.glob("omniglot_cache_*.pt"))) == 2


def test_a_truncated_drawing_is_named(omniglot_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(omniglot_root, root, ignore=shutil.ignore_patterns("omniglot_cache_*"))
    drawing = sorted((root / "images_background_small2" / "Gamma" / "character02").iterdir())[1]
    drawing.write_bytes(drawing.read_bytes()[:70])
    with pytest.raises(ValueError, match=rf"{drawing} is truncated or damaged .*official "
                       r"archive"):
        data.load_alphabets(root)
