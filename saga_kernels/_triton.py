"""The one Triton import guard of the library: every kernel file does ``from ._triton import triton, tl``.

With Triton installed these are the real modules. Without it (a laptop, a macOS wheel) they are stand-ins
that let the kernel files import and define their ``@triton.jit`` functions, so ``import saga_kernels``
and the PyTorch fallbacks keep working; launching a kernel then raises
:class:`saga_kernels.ImplUnavailableError` (``_dispatch.resolve_impl`` never routes there, so users only
meet it by calling a private launcher directly).
"""
from __future__ import annotations


class ImplUnavailableError(RuntimeError):
    """The requested implementation cannot run on these tensors / this machine."""


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install; exercised by tests/test_kernel_library.py
    HAS_TRITON = False

    class _MissingKernel:
        """What ``@triton.jit`` returns without Triton: defined, but not launchable."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise ImplUnavailableError(f"Triton is not installed; cannot launch {self.__name__}")

        def __call__(self, *args, **kwargs):
            raise ImplUnavailableError(f"Triton is not installed; cannot run {self.__name__}")

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    class _MissingLanguage:
        """Only what kernel signatures evaluate at definition time (``x: tl.constexpr``)."""

        constexpr = object

        def __getattr__(self, name):
            raise ImplUnavailableError(f"Triton is not installed; triton.language.{name} is unavailable")

    triton = _MissingTriton()
    tl = _MissingLanguage()

__all__ = ["HAS_TRITON", "ImplUnavailableError", "tl", "triton"]
