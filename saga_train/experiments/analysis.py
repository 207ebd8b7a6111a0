"""What an ablation measures beyond R@K: per-query hits, a paired bootstrap, attribute linear probes.

Pure functions on arrays (numpy / scikit-learn), so each is checked against a direct computation:

- ``query_hits``: 1.0 where a query's nearest other item (cosine) shares its label, per query (R@1 per query).
- ``paired_bootstrap``: mean difference of two per-query score vectors on the SAME queries and its
  percentile bootstrap CI (queries resampled with replacement; Efron & Tibshirani 1993, ch. 13).
- ``attribute_probes``: per attribute, the accuracy of a logistic-regression probe predicting the attribute
  value from a feature vector, cross-validated over CLASSES (``GroupKFold``): the probe is always scored on
  classes it never saw, so it measures whether the features encode the attribute, not the class.
"""
import numpy as np


def query_hits(embeddings, labels) -> np.ndarray:
    """``[N]`` float64: 1.0 where query i's nearest other row (max cosine, self excluded) has ``labels[i]``.

    ``embeddings`` ``[N, D]`` (rows are L2-normalized here), ``labels`` ``[N]`` ints. Ties go to the lowest index.
    Queries whose class has no other item score 0 (the trainer's R@1 leaves them out; a held-out split of
    SyntheticBirds has none). Memory ``N x N`` fp32: for the few thousand queries of an ablation.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need embeddings [N, D] and labels [N], got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("need at least 2 items")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return (y[sim.argmax(axis=1)] == y).astype(np.float64)


def paired_bootstrap(a, b, *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` over queries and its percentile bootstrap CI.

    ``a``, ``b``: per-query scores ``[N]`` of two systems on the same queries. Returns ``{"diff", "lo", "hi",
    "resamples", "n"}``; ``lo``/``hi`` are the ``(1 -/+ confidence) / 2`` quantiles of the resampled means.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two non-empty per-query vectors of one length, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: bounded memory
        count = min(1000, resamples - start)
        means[start:start + count] = d[rng.integers(0, len(d), size=(count, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "resamples": resamples, "n": len(d)}


def attribute_probes(features, targets, groups, *, folds: int = 5, seed: int = 0) -> list:
    """Per attribute: mean held-out-class accuracy of a logistic-regression probe ``features -> value``.

    ``features`` ``[N, F]``, ``targets`` ``[N, A]`` (value index of each attribute), ``groups`` ``[N]`` (class id).
    Folds split the classes (``GroupKFold``), so every probe is scored on classes it was not fitted on; features
    are standardized on the training folds. Returns ``A`` floats.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    t = np.asarray(targets)
    g = np.asarray(groups)
    if x.ndim != 2 or t.ndim != 2 or len(x) != len(t) or g.shape != (len(x),):
        raise ValueError(f"need features [N, F], targets [N, A], groups [N]; got {x.shape}, {t.shape}, {g.shape}")
    if len(np.unique(g)) < folds:
        raise ValueError(f"need at least folds={folds} classes, got {len(np.unique(g))}")
    splits = list(GroupKFold(n_splits=folds).split(x, groups=g))
    out = []
    for a in range(t.shape[1]):
        correct = 0
        for train, test in splits:
            if len(np.unique(t[train, a])) < 2:  # one value only among the training classes: predict it
                correct += int((t[test, a] == t[train[0], a]).sum())
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
            probe.fit(x[train], t[train, a])
            correct += int((probe.predict(x[test]) == t[test, a]).sum())
        out.append(correct / len(x))
    return out
