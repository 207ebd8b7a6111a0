"""The one tolerance rule of the test suite (CONVENTIONS.md, from ml-cross-entropy), and small helpers.

Every value and gradient of an op is compared with a float64 ``gold`` and with a ``peer``: the same
computation done the obvious way in the op's own dtype (torch eager, or a real peer library). The op
passes when its error is no larger than the peer's plus a slack:

    err(ours) <= err(peer) + slack + rel_slack * size(gold)

with ``err(x) = max |x - gold|`` and ``size(gold) = max |gold|`` (``norm="max"``), or Frobenius norms
(``norm="fro"``) where one bad element matters less than the overall error.
"""
from __future__ import annotations

import concurrent.futures
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _size(x: torch.Tensor, norm: str) -> float:
    if x.numel() == 0:
        return 0.0
    return float(x.abs().max()) if norm == "max" else float(x.norm())


def assert_rule(ours, gold, peer, *, slack: float = 0.0, rel_slack: float = 0.0, norm: str = "max",
                what: str = "value") -> None:
    """Fail unless ``err(ours) <= err(peer) + slack + rel_slack * size(gold)`` (see the module docstring)."""
    assert norm in ("max", "fro"), norm
    assert ours is not None and gold is not None and peer is not None, f"{what}: missing tensor"
    assert ours.shape == gold.shape == peer.shape, f"{what}: shapes {ours.shape}, {gold.shape}, {peer.shape}"
    ours, gold, peer = (t.detach().double() for t in (ours, gold, peer))
    err_ours = _size(ours - gold, norm)
    err_peer = _size(peer - gold, norm)
    bound = err_peer + slack + rel_slack * _size(gold, norm)
    assert err_ours <= bound, (f"{what}: error {err_ours:.3g} > peer's {err_peer:.3g} + slack "
                               f"({bound - err_peer:.3g})")


def poison(like: torch.Tensor, keep: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``like`` holding ``value`` (+inf, -inf or NaN) wherever the bool ``keep`` is False."""
    return torch.where(keep, like, torch.full_like(like, value))


JUNK = (float("inf"), float("-inf"), float("nan"))


def canary_view(t, fill, extra_rows=3, extra_cols=5):
    """``t`` as a strided view into a larger buffer whose extra rows and columns hold ``fill``."""
    if t.dim() == 1:
        buf = torch.full((t.shape[0] + extra_rows,), fill, dtype=t.dtype, device=t.device)
        buf[: t.shape[0]] = t
        return buf, buf[: t.shape[0]]
    buf = torch.full((t.shape[0] + extra_rows, t.shape[1] + extra_cols), fill, dtype=t.dtype, device=t.device)
    buf[: t.shape[0], : t.shape[1]] = t
    return buf, buf[: t.shape[0], : t.shape[1]]


def assert_canary_grad(buf: torch.Tensor, want: torch.Tensor, fill) -> None:
    """The gradient of a :func:`canary_view` buffer equals ``want`` exactly on the view and is exactly zero in
    the padding (filled with ``fill``)."""
    torch.testing.assert_close(buf.grad[: want.shape[0], : want.shape[1]], want, rtol=0, atol=0)
    pad = buf.grad.clone()
    pad[: want.shape[0], : want.shape[1]] = 0
    assert torch.equal(pad, torch.zeros_like(pad)), f"gradient leaked into the padding (fill {fill})"


def assert_batch_input_errors(loss_fn, device) -> None:
    """The errors every loss over an embeddings [N, D] / labels [N] batch raises, each naming the argument:
    non-finite embeddings (+inf and NaN), too few or too many labels, float labels, no columns, not 2-D."""
    x = torch.randn(6, 4, device=device)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    for at, value in (((0, 0), float("inf")), ((2, 1), float("nan"))):
        bad = x.clone()
        bad[at] = value
        with pytest.raises(ValueError, match="embeddings contains 1 non-finite"):
            loss_fn(bad, y)
    for labels in (y[:5], torch.zeros(7, dtype=torch.long, device=device)):
        with pytest.raises(ValueError, match=f"labels has {labels.shape[0]} entries but embeddings has 6 rows"):
            loss_fn(x, labels)
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(TypeError, match="labels must have dtype"):
            loss_fn(x, y.to(dtype))
    with pytest.raises(ValueError, match="embeddings must have at least one column"):
        loss_fn(x[:, :0], y)
    with pytest.raises(ValueError, match="embeddings must have 2 dims"):
        loss_fn(x[0], y)


def odd_labels(dense: torch.Tensor) -> torch.Tensor:
    """Class ids in [0, 5) as arbitrary int64 values (negative, huge, sparse): equal where the ids are."""
    return torch.tensor([-7, 2**40, 3, -1, 99], device=dense.device)[dense]


def assert_only_label_equality_matters(loss_fn, x: torch.Tensor, dense: torch.Tensor, other_dtype) -> None:
    """``loss_fn(x, labels)`` is the same for ``dense`` ids in [0, 5), for the same classes as arbitrary int64
    values (:func:`odd_labels`) and for the dense ids in ``other_dtype``."""
    torch.testing.assert_close(loss_fn(x, odd_labels(dense)), loss_fn(x, dense))
    torch.testing.assert_close(loss_fn(x, dense.to(other_dtype)), loss_fn(x, dense))


def assert_specs_parallel(specs) -> None:
    """``aot.assert_specs`` with the list shared by two compiler processes."""
    from aot import assert_specs

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(assert_specs, [specs[0::2], specs[1::2]]))


class MatmulFlops(TorchDispatchMode):
    """Flops (2 m k n) of every matrix product dispatched inside the block: mm, addmm, addmm_ (which torch's
    FlopCounterMode misses: TRL's head accumulates with it), bmm. With ``dim``, only the products that have a
    dimension of that size (``dim=V``: the LM head's). ``flops`` holds the count."""

    _PACKETS = {torch.ops.aten.mm: 0, torch.ops.aten.bmm: 0, torch.ops.aten.addmm: 1, torch.ops.aten.addmm_: 1}

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim, self.flops = dim, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = self._PACKETS.get(func.overloadpacket)
        if first is not None:
            a, b = args[first], args[first + 1]
            if self.dim is None or self.dim in tuple(a.shape) + tuple(b.shape[-1:]):
                self.flops += 2 * math.prod(a.shape) * b.shape[-1]
        return func(*args, **(kwargs or {}))
