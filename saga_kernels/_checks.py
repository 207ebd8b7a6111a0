"""Argument validation shared by every op: each failure names the argument and what is wrong."""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
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
    """All given (non-None) tensors share one device, which holds values (not "meta"); return it. The error lists
    every argument's device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    device = next(iter(devices))
    if device.type == "meta":
        raise ValueError(f"{', '.join(present)} are on the meta device: they hold no values to compute with")
    return device


def check_number(name: str, value, *, minimum: float | None = None, strict: bool = False) -> None:
    """``value`` is a real number (a Python or numpy scalar, not a bool), finite, and ``>= minimum`` (``> minimum``
    with ``strict``); ValueError naming ``name`` otherwise. Not checked while torch.compile traces: a dynamic-shape
    trace turns Python numbers into symbols."""
    if torch.compiler.is_compiling():
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_bool(name: str, value) -> None:
    """``value`` is a bool; TypeError naming ``name`` otherwise (a string such as "yes" is not silently true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Value checks (they read tensor contents, so on a GPU a plain check is a host sync)
# ----------------------------------------------------------------------------------------------------
CHECK_MODES = ("sync", "async", "off")
_forced_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("saga_input_checks", default=None)


@contextlib.contextmanager
def input_checks(mode: str):
    """Choose how the ops check input *values* (non-finite numbers, indices out of range) inside the block.

    ``"sync"``: read the result on the host and raise ValueError naming the argument (a device sync per
    check on CUDA). ``"async"``: ``torch._assert_async`` with the same message, no host sync (on CUDA a
    failure surfaces as a device-side assert at a later synchronization, and the CUDA context is lost).
    ``"off"``: no value checks (shape, dtype and device checks always run; they read no values).
    Without a context the ``SAGA_CHECK_INPUTS`` environment variable decides (same three values or
    ``"auto"``); ``auto`` is "sync" on the CPU, "async" on CUDA, and "off" while a CUDA graph is being
    captured or torch.compile is tracing.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"input_checks mode must be one of {CHECK_MODES}, got {mode!r}")
    token = _forced_mode.set(mode)
    try:
        yield
    finally:
        _forced_mode.reset(token)


def check_mode(t: torch.Tensor) -> str:
    """The value-check mode for a tensor on ``t``'s device (see :func:`input_checks`). Asked first whether
    torch.compile is tracing, so a compiled graph never reads the context variable or the environment."""
    if torch.compiler.is_compiling() or (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return "off"
    mode = _forced_mode.get()
    if mode is None:
        mode = os.environ.get("SAGA_CHECK_INPUTS", "auto").strip().lower() or "auto"
        if mode not in CHECK_MODES + ("auto",):
            raise ValueError(f"SAGA_CHECK_INPUTS={mode!r} is not one of {CHECK_MODES + ('auto',)}")
    if mode == "auto":
        return "async" if t.device.type == "cuda" else "sync"
    return mode


def _assert_values(ok: torch.Tensor, describe) -> None:
    """Raise ValueError(describe()) unless the bool scalar ``ok`` is True (sync), or assert it on device (async)."""
    mode = check_mode(ok)
    if mode == "off":
        return
    if mode == "async":
        torch._assert_async(ok, describe(None))
    elif not bool(ok):
        raise ValueError(describe(True))


def check_finite(name: str, t: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Raise ValueError if ``t`` (only the entries where the bool ``where`` is True, if given) holds NaN or
    +-inf. Entries outside ``where`` may hold anything: they are never read as numbers."""
    if t.numel() == 0 or check_mode(t) == "off":
        return
    finite = torch.isfinite(t)
    if where is not None:
        finite = finite | ~where
    at = "" if where is None else " at positions the mask keeps"

    def describe(count):
        if count is None:
            return f"{name} contains non-finite value(s) (NaN or inf){at}"
        return f"{name} contains {int((~finite).sum())} non-finite value(s) (NaN or inf){at}"

    _assert_values(finite.all(), describe)


def check_finite_rows(name: str, t: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Raise ValueError if a row (last dimension) of ``t`` holds NaN or +-inf, among the rows where the bool ``rows``
    (``t.shape[:-1]``) is True, if given. One fp32 sum per row (no copy of ``t``); a row of finite values so large
    that their sum overflows fp32 counts as non-finite too."""
    if t.numel() == 0 or check_mode(t) == "off":
        return
    finite = torch.isfinite(t.detach().sum(-1, dtype=torch.float32))
    if rows is not None:
        finite = finite | ~rows
    at = "" if rows is None else " at rows that are used"

    def describe(sync):
        count = "" if sync is None else f"{int((~finite).sum())} row(s) with "
        return f"{name} contains {count}non-finite value(s) (NaN or inf){at}"

    _assert_values(finite.all(), describe)


def check_index_range(name: str, idx: torch.Tensor, upper: int, *, ignore_index: int | None = None,
                      where: torch.Tensor | None = None) -> None:
    """Every entry of ``idx`` lies in [0, upper): entries equal to ``ignore_index``, and entries where the
    bool ``where`` is False, excepted."""
    if idx.numel() == 0 or check_mode(idx) == "off":
        return
    skip = torch.zeros_like(idx, dtype=torch.bool) if ignore_index is None else idx == ignore_index
    if where is not None:
        skip = skip | ~where
    ok = skip | ((idx >= 0) & (idx < upper))
    extra = f" (or {ignore_index})" if ignore_index is not None else ""

    def describe(sync):
        if sync is None:
            return f"{name} must lie in [0, {upper}){extra}"
        bad = idx[~ok]
        return f"{name} must lie in [0, {upper}){extra}, found values in [{int(bad.min())}, {int(bad.max())}]"

    _assert_values(ok.all(), describe)


def check_values(name: str, ok: torch.Tensor, requirement: str) -> None:
    """Raise ValueError "``name`` must ``requirement``" unless every entry of the bool tensor ``ok`` is True."""
    if ok.numel() == 0 or check_mode(ok) == "off":
        return
    _assert_values(ok.all(), lambda _: f"{name} must {requirement}")
