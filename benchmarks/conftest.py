"""Benchmarks run at small sizes on the CPU and at Qwen3-VL-8B sizes on a GPU (SAGA_BENCH_SIZE)."""
import os
import sys

import pytest
import torch

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
