"""Turn the Triton interpreter on before saga_kernels is imported when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from saga_kernels._dispatch import resolve_impl  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture(params=["triton", "torch"])
def impl(request):
    """Both implementations of an op; triton runs under the interpreter on CPU."""
    t = torch.empty(0, device=DEVICE)
    resolve_impl(request.param, t)  # raises if the path cannot run here, rather than skipping silently
    return request.param


@pytest.fixture
def torch_kernels(monkeypatch):
    """The kernels' own tests cover their Triton path; trainer tests use the fast fallback."""
    monkeypatch.setenv("SAGA_IMPL", "torch")


@pytest.fixture
def signal(monkeypatch):
    """Rewards with variance and item spans from a random MLLM (tests/fakes.py)."""
    import fakes

    fakes.install(monkeypatch)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test writes the synthetic supervisor's cache (stage-1 towers, supervisors) into a fresh directory,
    never into the user's ~/.cache/saga_kernels."""
    monkeypatch.setenv("SAGA_CACHE", str(tmp_path_factory.mktemp("saga-cache")))
