"""episodes.py: the episode sampler (counts, labels, disjointness, determinism, rotations, unequal
class sizes, errors), Omniglot and image-folder collections (resizing, cache, layout errors),
normalisation and the confidence interval."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import load_alphabets, make_split
from episodes import (
    EpisodeSampler,
    LabelledImages,
    load_image_folder,
    mean_ci,
    split_alphabets,
)


def tagged(counts, size=6):
    """Classes whose images carry their identity: pixel (0, 0) = class, (0, 1) = index in the
    class, the rest a fixed pattern (so rotations are visible)."""
    per_class = []
    for c, n in enumerate(counts):
        x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
        x[:, 0, 0, 0] = c
        x[:, 0, 0, 1] = torch.arange(n, dtype=torch.uint8)
        x[:, 0, size - 1, :] = 200  # a bar along the bottom edge
        per_class.append(x)
    return LabelledImages.from_lists(per_class, [f"class{c}" for c in range(len(counts))])


def identity(x):
    """(class, index) of tagged images (unrotated)."""
    return list(zip(x[:, 0, 0, 0].tolist(), x[:, 0, 0, 1].tolist()))


def test_episode_counts_labels_and_disjoint_support_query():
    data = tagged([7, 9, 6, 8, 10])
    sampler = EpisodeSampler(data, ways=3, shots=2, queries=3)
    gen = torch.Generator().manual_seed(0)
    indices = sampler.draw(50, gen)
    assert indices.classes.shape == (50, 3)
    assert indices.support.shape == (50, 3, 2) and indices.query.shape == (50, 3, 3)
    for e in range(50):
        classes = indices.classes[e].tolist()
        assert len(set(classes)) == 3  # distinct classes
        images = torch.cat([indices.support[e], indices.query[e]], 1)
        assert len(set(images.flatten().tolist())) == 15  # support and query disjoint
        for label, c in enumerate(classes):  # each label's images come from its class
            lo, hi = int(data.offsets[c]), int(data.offsets[c + 1])
            assert ((images[label] >= lo) & (images[label] < hi)).all()
    task = sampler.task(indices, 0)
    (xs, ys), (xq, yq) = task.support[0], task.query
    assert len(task.support) == 1
    assert xs.shape == (6, 1, 6, 6) and xq.shape == (9, 1, 6, 6)
    assert xs.dtype == torch.float32
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # labels follow the drawn class order, identities from the images themselves
    raw = (xs * 255).round().to(torch.uint8)
    ids = identity(raw)
    for i, label in enumerate(ys.tolist()):
        assert ids[i][0] == int(indices.classes[0, label])
    assert not set(ids) & set(identity((xq * 255).round().to(torch.uint8)))


def test_labels_are_a_random_order_of_the_classes():
    sampler = EpisodeSampler(tagged([5] * 6), ways=3, shots=1, queries=1)
    classes = sampler.draw(300, torch.Generator().manual_seed(1)).classes
    # every class appears with every label; the order within an episode is not sorted
    for label in range(3):
        assert set(classes[:, label].tolist()) == set(range(6))
    assert (classes[:, 0] > classes[:, 1]).any() and (classes[:, 0] < classes[:, 1]).any()


def test_same_seed_same_episodes_other_seed_differs():
    sampler = EpisodeSampler(tagged([6, 7, 8, 9]), ways=2, shots=1, queries=2)

    def episodes(seed):
        return sampler.sample(5, torch.Generator().manual_seed(seed))

    a, b, c = episodes(3), episodes(3), episodes(4)
    for ta, tb in zip(a, b):
        assert torch.equal(ta.support[0][0], tb.support[0][0])
        assert torch.equal(ta.query[0], tb.query[0])
    assert any(not torch.equal(ta.support[0][0], tc.support[0][0])
               or not torch.equal(ta.query[0], tc.query[0]) for ta, tc in zip(a, c))
    # consecutive episodes from one generator differ
    assert not all(torch.equal(a[0].query[0], t.query[0]) for t in a[1:])


def test_unequal_class_sizes_use_every_image_and_never_go_past_a_class():
    data = tagged([3, 12, 5])
    sampler = EpisodeSampler(data, ways=3, shots=1, queries=2)
    indices = sampler.draw(400, torch.Generator().manual_seed(0))
    used = set(torch.cat([indices.support, indices.query], -1).flatten().tolist())
    assert used == set(range(20))  # every image of every class, nothing outside them
    for e in range(5):
        for label, c in enumerate(indices.classes[e].tolist()):
            picked = torch.cat([indices.support[e, label], indices.query[e, label]])
            assert int(picked.min()) >= int(data.offsets[c])
            assert int(picked.max()) < int(data.offsets[c + 1])


def test_rotations_are_distinct_classes_equal_to_rot90_of_the_original():
    data = tagged([4, 5])
    sampler = EpisodeSampler(data, ways=8, shots=1, queries=1, rotations=True)
    assert sampler.num_classes == 8
    assert sampler.names == ("class0@0", "class1@0", "class0@90", "class1@90", "class0@180",
                             "class1@180", "class0@270", "class1@270")
    gen = torch.Generator().manual_seed(0)
    indices = sampler.draw(20, gen)
    for e in range(20):
        task = sampler.task(indices, e)
        xs = (task.support[0][0] * 255).round().to(torch.uint8)
        assert sorted(indices.classes[e].tolist()) == list(range(8))  # all 8 distinct classes
        for label, c in enumerate(indices.classes[e].tolist()):
            original, turns = c % 2, c // 2
            # the image under this label is rot90^turns of an image of the original character
            candidates = data.images[int(data.offsets[original]):int(data.offsets[original + 1])]
            rotated = torch.rot90(candidates, turns, dims=(2, 3))
            matches = [torch.equal(xs[label], r) for r in rotated]
            assert sum(matches) == 1, (e, label, c)
    # the same drawing rotated by 90 degrees is a different class, and a different image
    assert sampler.names[0] != sampler.names[2]
    first = data.images[0]
    assert torch.equal(sampler.images[data.images.shape[0] * 1], torch.rot90(first, 1, (1, 2)))
    assert not torch.equal(torch.rot90(first, 1, (1, 2)), first)


def test_small_classes_raise_or_are_excluded_with_the_reason():
    data = tagged([2, 6, 6, 6])
    with pytest.raises(ValueError, match=r"class 'class0' has 2 images but shots \+ queries"):
        EpisodeSampler(data, ways=2, shots=1, queries=2)
    sampler = EpisodeSampler(data, ways=2, shots=1, queries=2, exclude_small=True)
    assert sampler.excluded == {"class0": 2}
    assert sampler.names == ("class1", "class2", "class3")
    indices = sampler.draw(100, torch.Generator().manual_seed(0))
    assert int(indices.support.min()) >= 2 and int(indices.query.min()) >= 2
    with pytest.raises(ValueError, match="ways=4 classes per episode, but only 3"):
        EpisodeSampler(data, ways=4, shots=1, queries=2, exclude_small=True)
    # rotations make 4 classes of each: 4-way fits
    assert EpisodeSampler(data, ways=4, shots=1, queries=2, exclude_small=True,
                          rotations=True).num_classes == 12


@pytest.mark.parametrize("kwargs, match", [
    ({"ways": 1}, "ways=1"), ({"shots": 0}, "shots=0"), ({"queries": True}, "queries=True"),
    ({"mean": [0.1, 0.2]}, "mean"), ({"std": 0.0}, "std=0.0 must be positive"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    args = {"ways": 2, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(tagged([3, 3, 3]), **args)
    with pytest.raises(ValueError, match="count=0"):
        EpisodeSampler(tagged([3, 3]), ways=2, shots=1, queries=1).draw(0, torch.Generator())


def test_rotations_need_square_images_and_collections_validate():
    data = LabelledImages.from_lists([torch.zeros(3, 1, 4, 6, dtype=torch.uint8)] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        EpisodeSampler(data, ways=2, shots=1, queries=1, rotations=True)
    with pytest.raises(ValueError, match="uint8"):
        LabelledImages(torch.zeros(2, 1, 3, 3), torch.tensor([0, 2]), ("a",))
    with pytest.raises(ValueError, match="offsets"):
        LabelledImages(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.tensor([0, 3]), ("a",))
    with pytest.raises(ValueError, match="2 image tensors for 1 names"):
        LabelledImages.from_lists([torch.zeros(1, 3, 3, dtype=torch.uint8)] * 2, ["a"])


def test_normalisation_and_device_dtype():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    data = LabelledImages.from_lists([x.clone(), x.clone()], ["a", "b"])
    plain = EpisodeSampler(data, ways=2, shots=1, queries=1, dtype=torch.float64)
    assert torch.equal(plain.to_float(x), x.double() / 255)
    sampler = EpisodeSampler(data, ways=2, shots=1, queries=1, mean=[0.5, 0.4, 0.3],
                             std=[0.5, 0.25, 0.2], dtype=torch.float64)
    out = sampler.to_float(x)
    expected = (x.double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1).double()) \
        / torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1).double()
    assert torch.allclose(out, expected, atol=1e-15)
    task = sampler.sample(1, torch.Generator().manual_seed(0))[0]
    assert task.support[0][0].dtype == torch.float64 and task.query[1].device.type == "cpu"


def test_omniglot_characters_as_classes(omniglot_root):
    images = load_alphabets(omniglot_root)
    data = LabelledImages.from_alphabets(images, ["Alpha", "Beta"])
    assert data.num_classes == 7 and data.names[:2] == ("Alpha/0", "Alpha/1")
    assert data.images.shape == (35, 1, 28, 28) and data.counts.tolist() == [5] * 7
    assert torch.equal(data.images[5:10, 0], images["Alpha"][1])
    small = data.resized(14)
    assert small.images.shape == (35, 1, 14, 14) and small.images.dtype == torch.uint8
    expected = torch.nn.functional.avg_pool2d(data.images[:1].float(), 2).round()
    assert torch.allclose(small.images[:1].float(), expected, atol=1.0)  # area averaging
    with pytest.raises(ValueError, match="Zeta"):
        LabelledImages.from_alphabets(images, ["Zeta"])


def test_split_alphabets_matches_the_alphabet_protocol_order():
    names = [f"A{i}" for i in range(7)]
    train, val, test = split_alphabets(names, seed=5, num_train=3, num_val=1, num_test=2)
    reference = make_split({n: 4 for n in names}, {n: [3] * 4 for n in names}, seed=5,
                           num_train=3, num_val=1, num_test=2, classes=2, train_images=1)
    assert (tuple(train), tuple(val), tuple(test)) == (reference.train, reference.val,
                                                        reference.test)
    order = sorted(names)
    random.Random(5).shuffle(order)
    assert test == order[:2]
    with pytest.raises(ValueError, match="7"):
        split_alphabets(names, seed=5, num_train=6, num_val=1, num_test=2)


def test_mean_ci():
    values = [1.0, 0.5, 0.75, 0.25, 1.0]
    result = mean_ci(values)
    assert result.mean == pytest.approx(0.7)
    assert result.std == pytest.approx(float(np.std(values)))
    assert result.ci95 == pytest.approx(1.96 * np.std(values) / np.sqrt(5))
    assert result.n == 5 and mean_ci([0.3]).ci95 == 0.0
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([0.5, float("nan")])


# -- image folders ----------------------------------------------------------------------------

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def write_folder(root: Path, split: str, counts: dict[str, int]) -> Path:
    """``root/<split>/<class>/`` with ``counts[class]`` images: one flat colour per class,
    PNG/JPG/JPEG mixed, sizes varying."""
    for c, n in counts.items():
        folder = root / split / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = (20 + 4 * i, 16 + 2 * i)
            suffix = (".png", ".jpg", ".JPEG")[i % 3]
            Image.new("RGB", size, COLOURS[c]).save(folder / f"img{i}{suffix}")
    return root


def test_image_folder_decodes_resizes_and_caches(tmp_path, monkeypatch):
    root = write_folder(tmp_path, "train", {"cat": 4, "dog": 3, "emu": 5})
    data = load_image_folder(root, "train", image_size=8)
    assert data.names == ("cat", "dog", "emu") and data.counts.tolist() == [4, 3, 5]
    assert data.images.shape == (12, 3, 8, 8) and data.images.dtype == torch.uint8
    for c, (name, colour) in enumerate(COLOURS.items()):
        block = data.images[int(data.offsets[c]):int(data.offsets[c + 1])].int()
        # a flat colour stays that colour through the resize (JPEG within a few levels)
        assert (block - torch.tensor(colour).view(1, 3, 1, 1)).abs().max() <= 6, name
    grey = load_image_folder(root, "train", image_size=5, channels="grey")
    assert grey.images.shape == (12, 1, 5, 5)
    caches = sorted(p.name for p in root.glob("fewshot_cache_train_*.pt"))
    assert len(caches) == 2  # one per (size, channels)

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(Image, "open", refuse)
    again = load_image_folder(root, "train", image_size=8)
    assert torch.equal(again.images, data.images) and again.names == data.names
    assert torch.equal(again.offsets, data.offsets)
    # normalised floats from the sampler
    sampler = EpisodeSampler(again, ways=3, shots=1, queries=2, mean=0.5, std=0.5)
    x = sampler.sample(1, torch.Generator().manual_seed(0))[0].support[0][0]
    assert x.shape == (3, 3, 8, 8) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_image_folder_cache_elsewhere_and_a_changed_folder_is_decoded_again(tmp_path):
    root = write_folder(tmp_path / "d", "test", {"cat": 2, "dog": 2})
    first = load_image_folder(root, "test", image_size=4, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("fewshot_cache_test_*.pt"))
    assert not list(root.glob("*.pt"))
    write_folder(root, "test", {"emu": 2})
    second = load_image_folder(root, "test", image_size=4, cache_dir=tmp_path / "cache")
    assert first.num_classes == 2 and second.num_classes == 3


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="root/<split>/<class>"):
        load_image_folder(tmp_path, "train", image_size=4)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path, "train", image_size=4)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(ValueError, match="holds images directly"):
        load_image_folder(tmp_path, "train", image_size=4)
    (tmp_path / "train" / "loose.png").unlink()
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"has no \.png/\.jpg/\.jpeg image"):
        load_image_folder(tmp_path, "train", image_size=4)
    with pytest.raises(ValueError, match="channels='cmyk'"):
        load_image_folder(tmp_path, "train", image_size=4, channels="cmyk")
    with pytest.raises(ValueError, match="image_size=0"):
        load_image_folder(tmp_path, "train", image_size=0)
