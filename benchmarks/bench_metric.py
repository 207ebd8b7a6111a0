"""Streaming metric losses (issue 4), forward + backward, saga vs pytorch-metric-learning 2.9.

Providers per loss:
  saga   saga_kernels.<loss> (Triton on CUDA; the tiled torch fallback on a CPU)
  pml    pytorch-metric-learning 2.9: SupConLoss, MultiSimilarityLoss + MultiSimilarityMiner(0.1),
         ProxyAnchorLoss (its own proxies, overwritten with ours)
  torch  Potential Field has no pml peer: an eager, materializing Gram-matrix implementation here
Sizes ("real" on a GPU): SupCon / MS at N = 65,536 and 16,384, D = 512 (the backward's gradient-tile +
cuBLAS path), and N = 16,384, D = 128 (D accumulated in one program: the fused path); Proxy Anchor with C = 100
and 10,000 classes (one proxy each) and Potential Field with C x M = 100 x 15 and 10,000 x 2 proxies at
N = 4,096, D = 512. A provider that runs out of memory is recorded (extra_info["oom"]), not skipped.
extra_info: peak extra memory of one step (CUDA: max_memory_allocated delta; CPU: VmHWM delta).

``test_cpu_memory_check`` is the issue's CPU check (saga fallback SupCon peak <= 1/4 of pml's) at
N = 4,096, D = 128 by default; SAGA_METRIC_CPU_CHECK_N=16384 runs the issue's N = 16,384 (pml then
needs several GB of RAM, so it is opt-in on shared machines).
"""
import ctypes
import gc
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import saga_kernels
from saga_kernels._dispatch import resolve_impl

from _memory import peak_memory
from conftest import DEVICE, SIZE, measure, record, synchronized

# (N, D) for SupCon and MS; on a GPU also N = 16,384, where pml still fits, for a time ratio
PAIR_SHAPES = {"real": [(65536, 512), (16384, 512), (16384, 128)], "small": [(2048, 64)]}
PROXY_SHAPES = {  # (N, D, [(classes, proxies per class), ...]) for Proxy Anchor and Potential Field
    "real": (4096, 512, [(100, 15), (10000, 2)]),
    "small": (512, 64, [(20, 3), (500, 2)]),
}
CLASSES_PER_BATCH = 64  # batch labels for SupCon / MS: N / 64 images per class


def _release_free_heap():
    """Return freed heap pages to the OS (glibc), so a CPU VmHWM delta counts this call's pages only."""
    if DEVICE.type == "cpu" and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the delta may under-count reused pages
            pass


def _pair_inputs(n, d, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, d, device=DEVICE, generator=g).requires_grad_(True)
    y = torch.randint(0, CLASSES_PER_BATCH, (n,), device=DEVICE, generator=g)
    return x, y


def _proxy_inputs(n, d, classes, per_class, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, d, device=DEVICE, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (n,), device=DEVICE, generator=g)
    proxies = torch.randn(classes * per_class, d, device=DEVICE, generator=g).requires_grad_(True)
    proxy_labels = torch.arange(classes, device=DEVICE).repeat_interleave(per_class)
    return x, y, proxies, proxy_labels


def _pf_eager(x, y, proxies, proxy_labels, alpha=4.0, delta=0.2, min_distance=1e-2):
    """Potential Field as METHOD.md defines it, materializing the (N + P)^2 distance matrix."""
    a = torch.cat([F.normalize(x, dim=1), F.normalize(proxies, dim=1)])
    cls = torch.cat([y, proxy_labels])
    d = (2 - 2 * a @ a.T).clamp(min=min_distance**2).sqrt()
    same = cls[:, None] == cls[None, :]
    psi = torch.where(same, -d.clamp(min=delta).pow(-alpha), d.clamp(max=delta).pow(-alpha))
    psi = psi.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), 0)
    return psi.sum(1).mean() / (a.shape[0] - 1)


def _stepper(loss_fn, *leaves):
    def step():
        for t in leaves:
            t.grad = None
        loss_fn().backward()

    return synchronized(step)


def _free():
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _run(benchmark, step, **info):
    """The shared harness (conftest.measure); a provider that runs out of memory is recorded as OOM."""
    measure(benchmark, step, rounds=3 if SIZE == "small" else 5, reset=_free, settle=_release_free_heap, **info)


@pytest.mark.parametrize("shape", PAIR_SHAPES[SIZE], ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("provider", ["saga", "pml"])
def test_supcon_fwd_bwd(benchmark, provider, shape):
    n, d = shape
    x, y = _pair_inputs(n, d)
    if provider == "saga":
        fn = lambda: saga_kernels.supcon_loss(x, y, temperature=0.1)  # noqa: E731
    else:
        losses = pytest.importorskip("pytorch_metric_learning.losses")
        pml = losses.SupConLoss(temperature=0.1)
        fn = lambda: pml(x, y)  # noqa: E731
    _run(benchmark, _stepper(fn, x), provider=provider, loss="supcon", N=n, D=d,
         saga_impl=resolve_impl(None, x) if provider == "saga" else None)


@pytest.mark.parametrize("shape", PAIR_SHAPES[SIZE], ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("provider", ["saga", "pml"])
def test_multi_similarity_fwd_bwd(benchmark, provider, shape):
    n, d = shape
    x, y = _pair_inputs(n, d)
    if provider == "saga":
        fn = lambda: saga_kernels.multi_similarity_loss(x, y, miner_epsilon=0.1)  # noqa: E731
    else:
        losses = pytest.importorskip("pytorch_metric_learning.losses")
        miners = pytest.importorskip("pytorch_metric_learning.miners")
        loss = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        miner = miners.MultiSimilarityMiner(epsilon=0.1)
        fn = lambda: loss(x, y, miner(x, y))  # noqa: E731
    _run(benchmark, _stepper(fn, x), provider=provider, loss="multi_similarity", N=n, D=d,
         saga_impl=resolve_impl(None, x) if provider == "saga" else None)


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("provider", ["saga", "pml"])
def test_proxy_anchor_fwd_bwd(benchmark, provider, case):
    n, d, cases = PROXY_SHAPES[SIZE]
    classes, _ = cases[case]
    x, y, proxies, _ = _proxy_inputs(n, d, classes, 1)
    if provider == "saga":
        fn = lambda: saga_kernels.proxy_anchor_loss(x, y, proxies, margin=0.1, alpha=32.0)  # noqa: E731
        leaves = (x, proxies)
    else:
        losses = pytest.importorskip("pytorch_metric_learning.losses")
        pml = losses.ProxyAnchorLoss(classes, d, margin=0.1, alpha=32).to(DEVICE)
        with torch.no_grad():
            pml.proxies.copy_(proxies)
        fn = lambda: pml(x, y)  # noqa: E731
        leaves = (x, pml.proxies)
    _run(benchmark, _stepper(fn, *leaves), provider=provider, loss="proxy_anchor", N=n, D=d, classes=classes,
         saga_impl=resolve_impl(None, x) if provider == "saga" else None)


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("provider", ["saga", "torch"])
def test_potential_field_fwd_bwd(benchmark, provider, case):
    n, d, cases = PROXY_SHAPES[SIZE]
    classes, per_class = cases[case]
    x, y, proxies, proxy_labels = _proxy_inputs(n, d, classes, per_class)
    if provider == "saga":
        fn = lambda: saga_kernels.potential_field_loss(x, y, proxies, proxy_labels, alpha=4.0, delta=0.2)  # noqa: E731
    else:
        fn = lambda: _pf_eager(x, y, proxies, proxy_labels)  # noqa: E731
    _run(benchmark, _stepper(fn, x, proxies), provider=provider, loss="potential_field", N=n, D=d,
         proxies=f"{classes}x{per_class}", saga_impl=resolve_impl(None, x) if provider == "saga" else None)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the issue's CPU memory check (fallback vs pml)")
def test_cpu_memory_check(benchmark):
    """D = 128, fp32: the saga fallback's SupCon peak must be <= 1/4 of pml's SupConLoss peak."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    n = int(os.environ.get("SAGA_METRIC_CPU_CHECK_N", "4096"))
    x, y = _pair_inputs(n, 128)
    pml = losses.SupConLoss(temperature=0.1)
    step = _stepper(lambda: saga_kernels.supcon_loss(x, y, impl="torch"), x)
    step()  # warm-up: first-touch of library code and thread pools is not the loss's memory
    _release_free_heap()
    saga_peak, how = peak_memory(step, DEVICE)
    _release_free_heap()
    pml_peak, _ = peak_memory(_stepper(lambda: pml(x, y), x), DEVICE)
    benchmark.pedantic(step, rounds=1, iterations=1)
    record(benchmark, provider="saga", loss="supcon", N=n, D=128, peak_bytes=saga_peak, pml_peak_bytes=pml_peak,
           peak_method=how, saga_impl="torch")
    print(f"\nCPU memory check (N = {n}, D = 128): saga fallback SupCon peak {saga_peak / 2**20:.0f} MiB, "
          f"pml SupConLoss peak {pml_peak / 2**20:.0f} MiB, ratio {saga_peak / pml_peak:.4f}")
    assert saga_peak <= pml_peak / 4
