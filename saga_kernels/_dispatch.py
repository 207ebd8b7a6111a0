"""Which implementation of an op runs: the Triton kernel or the memory-efficient PyTorch fallback.

Order of precedence: the op's ``impl=`` argument, then the ``SAGA_IMPL`` environment variable
(``triton`` | ``torch`` | ``auto``), then ``auto``:

* ``triton`` when every tensor is on CUDA and Triton imports, or when the tensors are on the CPU
  and ``TRITON_INTERPRET=1`` is set (how CI tests the kernels);
* ``torch`` otherwise (a laptop without Triton, or CPU tensors without the interpreter).

Forcing ``triton`` where it cannot run raises :class:`ImplUnavailableError` instead of silently
falling back.
"""
from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON, ImplUnavailableError  # the library's one Triton import guard

IMPLS = ("triton", "torch")
__all__ = ["IMPLS", "ImplUnavailableError", "interpreter_on", "resolve_impl", "triton_importable"]


def triton_importable() -> bool:
    return HAS_TRITON


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_problem(tensors) -> str | None:
    """Why Triton cannot run on ``tensors`` here, or None when it can."""
    if not triton_importable():
        return "triton is not installed (pip install triton)"
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if devices <= {"cuda"}:
        return None if interpreter_on() or torch.cuda.is_available() else "CUDA is not available"
    if devices <= {"cpu"}:
        if interpreter_on():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return f"tensors live on {sorted(devices)}; Triton runs on CUDA (or on the CPU under TRITON_INTERPRET=1)"


def resolve_impl(impl: str | None, *tensors) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors`` (see module docstring)."""
    choice = impl if impl is not None else os.environ.get("SAGA_IMPL", "auto")
    choice = choice.strip().lower()
    if choice not in IMPLS + ("auto",):
        source = "impl=" if impl is not None else "SAGA_IMPL="
        raise ValueError(f"{source}{choice!r} is not one of 'triton', 'torch', 'auto'")
    problem = _triton_problem(tensors)
    if choice == "triton" and problem is not None:
        raise ImplUnavailableError(f"impl='triton' was forced but cannot run: {problem}")
    if choice == "auto":
        return "triton" if problem is None else "torch"
    return choice
