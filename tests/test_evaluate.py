"""evaluate() against pytorch-metric-learning's AccuracyCalculator and a float64 brute-force oracle."""
import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN

from saga_train.evaluate import evaluate, map_at_r, nmi_from_clusters, recall_at_k


def _data(n=203, d=24, classes=17, seed=0):
    """Clustered embeddings with uneven class sizes (some singletons), labels not 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g) * 3 + 5
    labels[:2] = torch.tensor([1000, 1001])  # two singleton classes
    centers = torch.randn(1100, d, generator=g)
    x = centers[labels] + 1.3 * torch.randn(n, d, generator=g)
    return x, labels


def _brute_force(x, labels, ks):
    """float64 N x N oracle: Recall@K and MAP@R over queries with at least one same-class item."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)[:, :-1]
    rel = (labels[order] == labels[:, None]).numpy()
    r = (labels[:, None] == labels[None, :]).sum(1).numpy() - 1
    keep = r > 0
    out = {f"R@{k}": rel[keep, :k].any(1).mean() for k in ks}
    aps = []
    for row, rq in zip(rel[keep], r[keep]):
        hits = np.cumsum(row[:rq])
        aps.append(sum(hits[i] / (i + 1) for i in range(rq) if row[i]) / rq)
    out["MAP@R"] = float(np.mean(aps))
    return out


@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_matches_bruteforce(chunk_size):
    x, labels = _data()
    ks = (1, 3, 4, 10)
    ours = evaluate(x, labels, ks, nmi=False, chunk_size=chunk_size)
    gold = _brute_force(x, labels, ks)
    assert set(ours) == {"R@1", "R@3", "R@4", "R@10", "MAP@R"}
    for key in gold:
        assert ours[key] == pytest.approx(gold[key], abs=1e-12), key
    assert 0.05 < ours["R@1"] < 0.95  # a discriminating dataset, not all-right or all-wrong


def test_matches_pml_accuracy_calculator():
    x, labels = _data(n=301, d=16, classes=23, seed=1)
    xn = torch.nn.functional.normalize(x, dim=1)
    ours = evaluate(x, labels, ks=(1, 2, 4, 8), seed=3)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "NMI"),
                              k="max_bin_count", device=torch.device("cpu"),
                              knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
                              kmeans_func=FaissKMeans(niter=20, seed=3))
    pml = calc.get_accuracy(xn, labels)
    assert ours["R@1"] == pml["precision_at_1"]
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], rel=1e-12)
    assert ours["NMI"] == pytest.approx(pml["NMI"], rel=1e-12)
    # pml's default L2 index on normalized rows ranks the same neighbours
    default = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                 device=torch.device("cpu")).get_accuracy(xn, labels)
    assert ours["R@1"] == default["precision_at_1"]
    assert ours["MAP@R"] == pytest.approx(default["mean_average_precision_at_r"], rel=1e-9)


def test_nmi_same_clustering_as_pml():
    x, labels = _data(n=150, d=8, classes=9, seed=2)
    clusters = torch.randint(0, 9, (150,), generator=torch.Generator().manual_seed(5))
    calc = AccuracyCalculator(include=("NMI",), device=torch.device("cpu"), kmeans_func=lambda emb, n: clusters)
    assert nmi_from_clusters(labels, clusters) == calc.get_accuracy(x, labels)["NMI"]


def test_pieces_by_hand():
    matches = np.array([[True, False, True, False], [False, False, False, True], [False, True, True, True]])
    assert recall_at_k(matches, 1).tolist() == [1.0, 0.0, 0.0]
    assert recall_at_k(matches, 2).tolist() == [1.0, 0.0, 1.0]
    # R = 2: (1/1 + 0) / 2; R = 1: 0; R = 3: (1/2 + 2/3) / 3
    assert map_at_r(matches, np.array([2, 1, 3])) == pytest.approx([0.5, 0.0, (1 / 2 + 2 / 3) / 3])


def test_self_match_excluded():
    # angles 0, 10, 90, 100 degrees, labels A B A B: each nearest other point is of the other class;
    # the second neighbours of 0 and 100 degrees are same-class, those of 10 and 90 are not
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 90.0, 100.0]))
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 0, 1])
    assert evaluate(x, labels, ks=(1, 2), nmi=False) == {"R@1": 0.0, "R@2": 0.5, "MAP@R": 0.0}


def test_bad_inputs():
    x, labels = _data(n=20)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        evaluate(x, labels[:-1])
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        evaluate(x[0], labels)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(torch.full_like(x, float("nan")), labels)
    with pytest.raises(ValueError, match="ks must be <= N - 1"):
        evaluate(x, labels, ks=(1, 20))
    with pytest.raises(ValueError, match="single item"):
        evaluate(x, torch.arange(20))
    with pytest.raises(ValueError, match="labels must be integers"):
        evaluate(x, labels.float())


def _layout(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """Labels of n items where some classes have a single member (their queries cannot be answered):
    scattered anywhere, all at the start (a whole first chunk unanswerable), or the last item alone."""
    labels = torch.randint(0, max(2, n // 4), (n,), generator=g)
    lone = 10_000 + torch.arange(n)
    if kind == "scattered":
        pick = torch.rand(n, generator=g) < 0.3
    elif kind == "first":
        pick = torch.arange(n) < n // 3
    else:  # "last"
        pick = torch.arange(n) == n - 1
    labels = torch.where(pick, lone, labels)
    if not any((labels == c).sum() > 1 for c in labels.unique()):
        labels[:2] = 0  # at least one answerable query
    return labels


@pytest.mark.parametrize("kind", ["scattered", "first", "last"])
def test_any_chunk_size_on_any_label_layout_matches_bruteforce(kind):
    """Property test: every chunk size, lone-class queries anywhere (a chunk whose queries are all lone, the last
    chunk of size 1), against the float64 brute force."""
    g = torch.Generator().manual_seed({"scattered": 0, "first": 1, "last": 2}[kind])
    for trial in range(4):
        n = int(torch.randint(12, 40, (1,), generator=g))
        labels = _layout(kind, n, g)
        x = torch.randn(n, 8, generator=g)
        gold = _brute_force(x, labels, (1, 2))
        for chunk_size in sorted({1, 2, 3, 5, n // 3 + 1, n - 1, n, n + 1}):
            ours = evaluate(x, labels, (1, 2), nmi=False, chunk_size=chunk_size)
            for key in gold:
                assert ours[key] == pytest.approx(gold[key], abs=1e-12), (kind, trial, chunk_size, key)
