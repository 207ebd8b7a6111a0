"""SyntheticBirds: determinism, split structure, attribute text; the batch and pair samplers."""
import itertools
import random
from collections import Counter

import numpy as np
import pytest
import torch

from saga_train.data import ATTRIBUTES, ClassBalancedBatchSampler, SyntheticBirds, load_dataset, sample_pairs
from saga_train.data.synthetic import ALL_COMBINATIONS, num_differences, split_combinations


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
    ds = SyntheticBirds("test", images_per_class=1)
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
    assert SyntheticBirds("train", images_per_class=1, train_classes="open").label_of(held_out) is None


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


# ---------------------------------------------------------------- samplers
def test_class_balanced_batches():
    labels = [c for c in range(10) for _ in range(6)] + [10]  # class 10 has one image
    s = ClassBalancedBatchSampler(labels, classes_per_batch=4, images_per_class=3, seed=7)
    assert len(s) == len(labels) // 12
    batches = list(s)
    assert batches == list(ClassBalancedBatchSampler(labels, 4, 3, seed=7))
    seen = Counter()
    for b in batches:
        assert len(b) == 12
        by_class = Counter(labels[i] for i in b)
        assert len(by_class) == 4 and set(by_class.values()) == {3}
        for c in by_class:
            if c != 10:
                assert len({i for i in b if labels[i] == c}) == 3  # distinct images when the class has enough
        seen.update(set(by_class))
    assert len(seen) == 11 and max(seen.values()) - min(seen.values()) <= 1  # classes visited evenly
    s.set_epoch(1)
    assert list(s) != batches
    with pytest.raises(ValueError, match="classes_per_batch"):
        ClassBalancedBatchSampler(labels, 12, 2)


def test_sampler_small_class_with_replacement():
    labels = [0, 1, 1, 1, 1]
    b = next(iter(ClassBalancedBatchSampler(labels, 2, 3, seed=0)))
    assert b.count(0) == 3 and sorted(Counter(b).values())[-1] == 3


@pytest.mark.parametrize("generator", [torch.Generator().manual_seed(1), np.random.default_rng(1),
                                       random.Random(1), 1])
def test_sample_pairs_balanced(generator):
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    pairs = sample_pairs(labels, 7, generator)
    assert len(pairs) == 7 and sum(p[2] for p in pairs) == 4
    for i, j, same in pairs:
        assert i < j and (labels[i] == labels[j]) == same
    assert len({p[:2] for p in pairs}) == 7  # distinct while enough pairs exist
    # more same pairs than exist: repeats allowed, still correct
    many = sample_pairs(labels, 12, generator)
    assert sum(p[2] for p in many) == 6 and all((labels[i] == labels[j]) == s for i, j, s in many)


def test_sample_pairs_impossible():
    with pytest.raises(ValueError, match="no class in labels has 2 or more items"):
        sample_pairs([0, 1, 2], 2)
    with pytest.raises(ValueError, match="single class"):
        sample_pairs(torch.tensor([4, 4, 4]), 2)
    assert sample_pairs([4, 4], 1) == [(0, 1, True)]
