"""The synthetic world's SyntheticBirds: determinism, split structure, attribute text."""
import itertools

import numpy as np
import pytest

from saga_train.data import load_dataset
from saga_train.synthetic import ATTRIBUTES, SyntheticBirds
from saga_train.synthetic.world import ALL_COMBINATIONS, num_differences, split_combinations


def _pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_deterministic_by_seed_and_distinct_across_seeds():
    a = SyntheticBirds("test", seed=3, images_per_class=2, cache=False)
    b = SyntheticBirds("test", seed=3, images_per_class=2, cache=False)
    c = SyntheticBirds("test", seed=4, images_per_class=2, cache=False)
    assert a.class_names == b.class_names and a.class_names != c.class_names
    for i in (0, 1, 17, len(a) - 1):
        assert np.array_equal(_pixels(a[i][0]), _pixels(b[i][0]))
    assert not np.array_equal(_pixels(a[0][0]), _pixels(a[1][0]))  # two images of one class differ (pose)
    img, label = a[0]
    assert img.mode == "RGB" and img.size == (64, 64) and label == 0


def test_cache_returns_same_image():
    ds = SyntheticBirds("test", images_per_class=2, image_size=32)
    assert ds._cache is not None
    assert ds[5][0] is ds[5][0]
    assert np.array_equal(_pixels(ds[5][0]), _pixels(ds.render(ds.labels[5], 5 % 2)))


def test_split_structure_and_open_pool():
    splits = split_combinations(seed=0, test_classes=30, train_classes=100)
    test, train = set(splits["test"]), set(splits["train"])
    assert len(test) == 30 and len(train) == 100 and not test & train
    # the held-out set is built from near-neighbour pairs: at least 15 pairs one attribute apart
    near = sum(num_differences(x, y) == 1 for x, y in itertools.combinations(splits["test"], 2))
    assert near >= 15
    assert sum(num_differences(x, y) == 1 for x, y in itertools.combinations(splits["train"], 2)) >= 50
    # the held-out set does not depend on the train setting; the open pool is everything else
    open_ = split_combinations(seed=0, test_classes=30, train_classes="open")
    assert open_["test"] == splits["test"]
    assert len(open_["train"]) == len(ALL_COMBINATIONS) - 30 and not set(open_["train"]) & test
    with pytest.raises(ValueError, match="train_classes"):
        split_combinations(train_classes=10**6)


def test_attribute_text_and_lookup():
    ds = SyntheticBirds("test", images_per_class=1, test_classes=30)
    assert ds.attribute_names == ["body color", "wing color", "head color", "wing pattern", "beak shape",
                                  "tail shape"]
    assert len(ds.class_attributes) == len(ds.class_names) == 30 == len(set(ds.class_names))
    for label, (attrs, name) in enumerate(zip(ds.class_attributes, ds.class_names)):
        assert set(attrs) == set(ATTRIBUTES) and all(attrs[a] in ATTRIBUTES[a] for a in attrs)
        assert name.split() == [f"{attrs['body color']}-body", f"{attrs['wing color']}-wing",
                                f"{attrs['head color']}-head", f"{attrs['wing pattern']}-wing",
                                f"{attrs['beak shape']}-beak", f"{attrs['tail shape']}-tail"]
        assert ds.label_of(ds.attributes(label)) == label
        assert ds.neighbours(label) == [j for j, d in enumerate(ds.combinations)
                                        if num_differences(ds.combinations[label], d) == 1]
        for n in ds.neighbours(label):
            diff = [a for a in attrs if ds.class_attributes[n][a] != attrs[a]]
            assert len(diff) == 1
    assert sum(len(ds.neighbours(k)) for k in range(30)) >= 30
    with pytest.raises(ValueError, match=r"\['beak shape'\]"):
        ds.label_of({**ds.attributes(0), "beak shape": "curved"})
    held_out = ds.attributes(0)
    assert SyntheticBirds("train", images_per_class=1, train_classes="open", test_classes=30).label_of(held_out) is None
    assert len(SyntheticBirds("test", images_per_class=1).combinations) == 200  # the default: the trainer's


def test_colours_are_visible():
    """A red-bodied bird has many clearly red pixels; with body color subtle, far fewer (low contrast)."""
    def red_pixels(subtle):
        ds = SyntheticBirds("train", train_classes="open", images_per_class=1, subtle=subtle, noise=0, cache=False)
        label = ds.label_of({"body color": "red", "wing color": "blue", "head color": "blue",
                             "wing pattern": "plain", "beak shape": "short", "tail shape": "short"})
        arr = _pixels(ds.render(label, 0))
        return int(((arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)).sum())
    assert red_pixels(()) > 150
    assert red_pixels(("body color",)) < 10


def test_subtle_validation_and_load_dataset():
    with pytest.raises(ValueError, match="unknown attributes"):
        SyntheticBirds(subtle=["beak colour"])
    ds = load_dataset("synthetic", split="train", seed=1, images_per_class=2, train_classes=12)
    assert len(ds) == 24 and ds.labels[:4] == [0, 0, 1, 1] and "12 classes" in ds.summary()
