"""Retrieval evaluation of N embeddings (issue 5): saga ``evaluate`` vs pytorch-metric-learning's AccuracyCalculator.

Sizes: "real" = 100,000 x 512 embeddings, 1,000 classes (the issue's CPU target); "small" = 10,000 x 128,
100 classes (the default on a CPU). Clustered Gaussian embeddings with equal class sizes.
Providers (both on the CPU, both faiss-based, same metrics):
  saga  saga_train.evaluate.evaluate: chunked IndexFlatIP search (k = max(ks, R_max)), never N x N
  pml   AccuracyCalculator(k="max_bin_count"): one search over all queries (its default k=None would ask
        for all N neighbours of every query, an N x N result, so it is not used)
metrics: "all" = Recall@K / precision_at_1 + MAP@R + NMI (k-means); "knn" = without NMI.
extra_info: peak extra memory of the last timed call (CPU: VmHWM delta, an upper bound) and the metrics.
"""
import pytest
import torch

from _memory import peak_memory
from conftest import SIZE, record

# (N, D, classes, noise std): the noise keeps R@1 well inside (0, 1) so the metrics discriminate
SHAPES = {"real": (100_000, 512, 1_000, 3.2), "small": (10_000, 128, 100, 2.2)}
CPU = torch.device("cpu")


def _data(n, d, classes, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = torch.randn(classes, d, generator=g)
    x = centers[labels] + noise * torch.randn(n, d, generator=g)
    return x, labels


def _fn(provider, metrics, x, labels):
    if provider == "saga":
        from saga_train.evaluate import evaluate

        return lambda: evaluate(x, labels, ks=(1, 2, 4, 8), nmi=metrics == "all")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    include = ("precision_at_1", "mean_average_precision_at_r") + (("NMI",) if metrics == "all" else ())
    calc = AccuracyCalculator(include=include, k="max_bin_count", device=CPU)
    xn = torch.nn.functional.normalize(x, dim=1)
    return lambda: calc.get_accuracy(xn, labels)


@pytest.mark.parametrize("metrics", ["all", "knn"])
@pytest.mark.parametrize("provider", ["saga", "pml"])
def test_evaluate(benchmark, provider, metrics):
    n, d, classes, noise = SHAPES[SIZE]
    x, labels = _data(n, d, classes, noise)
    fn = _fn(provider, metrics, x, labels)
    out = {}

    def call():
        out["result"] = fn()

    def measured():  # one call per round, timed and memory-measured at once (a real-size call takes minutes)
        out["peak"] = peak_memory(call, CPU)

    benchmark.pedantic(measured, rounds=3 if SIZE == "small" else 1, iterations=1)
    peak, how = out["peak"]
    record(benchmark, provider=provider, metrics=metrics, N=n, D=d, classes=classes, noise=noise, peak_bytes=peak,
           peak_method=how, nxn_bytes=n * n * 4, result={k: float(v) for k, v in out["result"].items()})


def test_providers_agree():
    """Both providers report the same R@1 / MAP@R on the small benchmark data (a race of different answers is moot)."""
    x, labels = _data(*SHAPES["small"])
    ours = _fn("saga", "knn", x, labels)()
    pml = _fn("pml", "knn", x, labels)()
    assert 0.2 < ours["R@1"] < 0.98
    assert ours["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-3)  # L2 vs IP ties may swap a few
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-3)
