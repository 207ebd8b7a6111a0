"""Argument validation shared by every op: each failure names the argument and what is wrong."""
from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: tuple | None = None,
) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a tensor of the expected kind.

    ``shape`` may hold ``None`` for dimensions that are free.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    """All given (non-None) tensors share one device; return it. The error lists every argument's device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices))


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` holds NaN or +-inf (one device sync; call once per op, not per tile)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def check_index_range(name: str, idx: torch.Tensor, upper: int, *, ignore_index: int | None = None) -> None:
    """Every entry of ``idx`` lies in [0, upper) (entries equal to ``ignore_index`` excepted)."""
    if idx.numel() == 0:
        return
    valid = idx if ignore_index is None else idx[idx != ignore_index]
    if valid.numel() == 0:
        return
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= upper:
        extra = f" (or {ignore_index})" if ignore_index is not None else ""
        raise ValueError(f"{name} must lie in [0, {upper}){extra}, found values in [{lo}, {hi}]")
