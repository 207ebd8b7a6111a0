"""Benchmarks run at small sizes on the CPU and at Qwen3-VL-8B sizes on a GPU (SAGA_BENCH_SIZE)."""
import os
import sys

import pytest
import torch

from _memory import peak_memory

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # utils.py

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# "real" = the sizes named in the issues (GPU); "small" = CPU-friendly; default by device.
SIZE = os.environ.get("SAGA_BENCH_SIZE", "real" if DEVICE.type == "cuda" else "small")


@pytest.fixture
def device():
    return DEVICE


def record(benchmark, **info):
    """Attach facts (peak memory, sizes, card) to a benchmark's JSON record."""
    benchmark.extra_info.update(info)
    benchmark.extra_info.setdefault("device", torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu")


def synchronized(fn, device=None):
    """``fn`` followed by a CUDA synchronize when ``device`` (default: the benchmarks' device) is a GPU, so that a
    timed call includes the kernels it queued."""
    device = torch.device(device or DEVICE)

    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def oom_errors() -> tuple:
    return (torch.cuda.OutOfMemoryError, MemoryError) if torch.cuda.is_available() else (MemoryError,)


def measure(benchmark, step, *, rounds: int, device=None, warmup: bool = True, warmup_rounds: int = 0, reset=None,
            settle=None, check=None, facts=None, **info):
    """The harness every benchmark shares: a warm-up call (compilation, autotuning, the allocator), the peak extra
    memory of one call (``_memory.peak_memory``), ``rounds`` timed calls, and ``extra_info``: ``info``, the peak, the
    value the step returned as ``loss`` (when it returned one) and ``facts`` (a dict the step filled).

    A provider that runs out of memory is recorded, not skipped: ``extra_info["oom"]`` holds the message, the peak is
    None and ``summarize.py`` prints OOM. ``reset()`` runs before and after (free gradients and caches), ``settle()``
    between the warm-up and the memory call (e.g. hand freed heap back to the OS); ``check`` = ``(predicate, message)``
    is asserted after the memory call (e.g. that a gradient reached where it must). Returns the peak, or None (OOM).
    """
    reset = reset or (lambda: None)
    oom, value = None, None
    reset()
    try:
        value = step() if warmup else None
        if settle is not None:
            settle()
        ok = check is None or check[0]()
        peak, how = peak_memory(step, device or DEVICE)
    except oom_errors() as exc:
        oom = str(exc).splitlines()[0][:200]
    if oom is not None:  # handled outside the except block, whose traceback would keep the step's tensors alive
        reset()
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        record(benchmark, oom=oom, peak_bytes=None, peak_method=None, **info)
        return None
    assert ok, check[1]
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    reset()
    if value is not None:
        info["loss"] = float(value)
    record(benchmark, oom=None, peak_bytes=peak, peak_method=how, **info, **(facts or {}))
    return peak
