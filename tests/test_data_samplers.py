"""The class-balanced batch sampler and the pair sampler."""
import random
from collections import Counter

import numpy as np
import pytest
import torch

from saga_train.data import ClassBalancedBatchSampler, sample_pairs


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
