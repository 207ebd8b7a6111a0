"""The ablation's statistics against direct computations: per-query hits, paired bootstrap, attribute probes."""
import numpy as np
import pytest
import torch

from saga_train.evaluate import evaluate
from saga_train.experiments.analysis import attribute_probes, paired_bootstrap, query_hits


def test_query_hits_match_the_trainers_r_at_1_and_a_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(97, 7))
    y = rng.integers(0, 9, size=97)
    hits = query_hits(x, y)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(len(x)):
        sims = unit @ unit[i]
        sims[i] = -np.inf
        assert hits[i] == float(y[np.argmax(sims)] == y[i])
    assert hits.mean() == pytest.approx(evaluate(torch.tensor(x), torch.tensor(y), ks=(1,), nmi=False,
                                                 map_at_r=False)["R@1"])
    with pytest.raises(ValueError, match="labels"):
        query_hits(x, y[:-1])


def test_paired_bootstrap_brackets_the_mean_difference():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.7).astype(float)
    b = (rng.random(400) < 0.5).astype(float)
    out = paired_bootstrap(a, b, resamples=4000, seed=3)
    assert out["diff"] == pytest.approx((a - b).mean()) and out["n"] == 400
    se = (a - b).std(ddof=1) / np.sqrt(400)  # the normal-approximation interval is close to the percentile one
    assert out["lo"] == pytest.approx(out["diff"] - 1.96 * se, abs=0.015)
    assert out["hi"] == pytest.approx(out["diff"] + 1.96 * se, abs=0.015)
    same = paired_bootstrap(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    assert paired_bootstrap(a, b, resamples=4000, seed=3) == out
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(a, b[:10])


def test_attribute_probes_score_unseen_classes():
    rng = np.random.default_rng(2)
    classes = 20
    values = rng.integers(0, 3, size=(classes, 2))  # two attributes with 3 values, one combination per class
    groups = np.repeat(np.arange(classes), 10)
    targets = values[groups]
    readable = np.eye(3)[targets[:, 0]] + 0.1 * rng.normal(size=(len(groups), 3))  # attribute 0 readable
    noise = rng.normal(size=(len(groups), 3))
    acc = attribute_probes(np.hstack([readable, noise]), targets, groups)
    assert acc[0] > 0.95 and acc[1] < 0.7
    # a feature that only identifies the class (one-hot of the class id) says nothing about unseen classes
    class_id = np.eye(classes)[groups]
    assert max(attribute_probes(class_id, targets, groups)) < 0.7
    with pytest.raises(ValueError, match="at least folds"):
        attribute_probes(readable[:30], targets[:30], groups[:30])
