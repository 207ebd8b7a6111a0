"""The class-balanced batch sampler and the pair sampler."""
import random
from collections import Counter

import numpy as np
import pytest
import torch

from saga_train.data import ClassBalancedBatchSampler, sample_pairs
from saga_train.data.samplers import pair_kind, sample_hard_pairs


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


# ------------------------------------------------------------------------------------------ hard pairs
def _hardest(sim, labels, anchor, same, seen=()):
    """Brute force: the anchor's hardest partner of the kind, skipping ``seen`` pairs while others are left."""
    partners = [j for j in range(len(labels)) if j != anchor and (labels[j] == labels[anchor]) == same]
    fresh = [j for j in partners if (min(anchor, j), max(anchor, j)) not in seen] or partners
    key = (lambda j: (sim[anchor, j], j)) if same else (lambda j: (-sim[anchor, j], j))
    return min(fresh, key=key)


def test_hard_pairs_are_each_anchors_hardest_partner():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    for seed in range(20):
        x = torch.randn(len(labels), 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        sim = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T).numpy()
        pairs = sample_hard_pairs(x * 3.0, labels, 2, random.Random(seed))  # one of each kind: no collision
        assert sorted(same for _, _, same in pairs) == [False, True]
        for a, b, same in pairs:
            assert (labels[a] == labels[b]) == same and b == _hardest(sim, labels, a, same)


def test_hard_pairs_take_the_next_hardest_once_the_hardest_was_drawn():
    labels = [0] * 4 + [1] * 4 + [2] * 3
    x = torch.randn(11, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sim = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T).numpy()
    drawn = {(min(a, b), max(a, b)) for a in range(11) for same in (True, False)
             for b in [_hardest(sim, labels, a, same)]}  # every anchor's hardest pair of each kind: already drawn
    fresh = 0
    for seed in range(20):
        seen = set(drawn)
        for a, b, same in sample_hard_pairs(x, labels, 2, random.Random(seed), seen=seen):
            left = [j for j in range(11) if j != a and (labels[j] == labels[a]) == same
                    and (min(a, j), max(a, j)) not in drawn]
            assert b == _hardest(sim, labels, a, same, drawn) and ((min(a, b), max(a, b)) not in drawn) == bool(left)
            fresh += bool(left)
        assert seen >= drawn and len(seen) <= len(drawn) + 2  # the caller's set records the new pairs
    assert fresh >= 20  # most anchors had a partner left


def test_hard_pairs_balance_determinism_and_errors():
    labels = [0, 0, 1, 1, 2, 2]
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    pairs = sample_hard_pairs(x, labels, 5, torch.Generator().manual_seed(4))
    assert sum(same for *_, same in pairs) == 3 and len(pairs) == 5
    assert pairs == sample_hard_pairs(x, labels, 5, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        sample_hard_pairs(x[:5], labels, 2)
    with pytest.raises(ValueError, match="finite"):
        sample_hard_pairs(x.clone().fill_(float("nan")), labels, 2)
    with pytest.raises(ValueError, match="same-class pair"):
        sample_hard_pairs(x[:3], [0, 1, 2], 2)
    with pytest.raises(ValueError, match="num_pairs"):
        sample_hard_pairs(x, labels, 0)


def test_pair_kind():
    from saga_train.synthetic.world import SyntheticBirds

    ds = SyntheticBirds("train", images_per_class=1, image_size=16, train_classes=100)
    label = 0
    near = ds.neighbours(label)
    assert near and pair_kind(ds, label, label) == "same" and pair_kind(ds, label, near[0]) == "one_attribute"
    far = next(j for j in range(len(ds.combinations)) if j != label and j not in near)
    assert pair_kind(ds, label, far) == "different"
    assert pair_kind(object(), 1, 2) == "different"  # a dataset without attributes
