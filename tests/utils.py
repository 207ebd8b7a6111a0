"""The one tolerance rule of the test suite (CONVENTIONS.md, from ml-cross-entropy), and small helpers.

Every value and gradient of an op is compared with a float64 ``gold`` and with a ``peer``: the same
computation done the obvious way in the op's own dtype (torch eager, or a real peer library). The op
passes when its error is no larger than the peer's plus a slack:

    err(ours) <= err(peer) + slack + rel_slack * size(gold)

with ``err(x) = max |x - gold|`` and ``size(gold) = max |gold|`` (``norm="max"``), or Frobenius norms
(``norm="fro"``) where one bad element matters less than the overall error.
"""
from __future__ import annotations

import torch


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
