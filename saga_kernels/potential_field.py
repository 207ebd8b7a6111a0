"""Potential Field loss (METHOD.md, "Potential Field loss"), streamed over (element x element) tiles.

Let A = the L2-normalized batch embeddings followed by the L2-normalized proxies (n = N + P elements),
y(a) the class of element a (``labels`` for embeddings, ``proxy_labels`` for proxies) and d(a, s) their
Euclidean distance, clamped below at ``MIN_DISTANCE``. Then

    psi_att(d) = -1 / max(d, delta)^alpha      (y(a) = y(s): flat inside delta)
    psi_rep(d) =  1 / min(d, delta)^alpha      (y(a) != y(s): constant, i.e. zero force, beyond delta)
    L = 1/n sum_a 1/(n - 1) sum_{s != a} psi(d(a, s))

("s != a" is by index: two coincident elements still feel each other). psi is symmetric, so with
d = sqrt(2 - 2 <a, s>) for unit rows,

    dL/da = 2 / (n (n - 1)) sum_{s != a} psi'(d(a, s)) * (-s / d(a, s))

up to a radial term that the normalization's backward removes. Both paths keep only the unit rows and
n row sums: the forward streams row sums of psi, the backward recomputes distances tile by tile (the
set is its own column side, so every element, proxy or embedding, gets its gradient as a row).
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from ._dispatch import resolve_impl
from .metric_common import (
    INT_DTYPES,
    check_embeddings_labels,
    check_positive,
    compute_dtype,
    l2_normalize,
    remap_labels,
    tile_size,
)

# Distances are clamped to at least this (gradient 0 below it), so coincident points of different
# classes repel with the finite energy MIN_DISTANCE^-alpha. In float32 the Gram-matrix distance
# sqrt(2 - 2 cos) of unit rows carries an absolute error of about 3e-4 near 0, so the clamp sits well
# above that noise and the float32 kernels agree with a float64 evaluation.
MIN_DISTANCE = 1e-2


def pf_energy(d: torch.Tensor, same: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """psi(d): -max(d, delta)^-alpha where ``same``, min(d, delta)^-alpha elsewhere."""
    return torch.where(same, -d.clamp(min=delta).pow(-alpha), d.clamp(max=delta).pow(-alpha))


def pf_slope(d: torch.Tensor, d2: torch.Tensor, same: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """psi'(d) / d, zero where a clamp (delta, or MIN_DISTANCE on the unclamped d2) holds d."""
    slope = alpha * d.pow(-(alpha + 2.0))
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    attract = torch.where(d > delta, slope, zero)
    repel = torch.where((d < delta) & (d2 > MIN_DISTANCE**2), -slope, zero)
    return torch.where(same, attract, repel)


def _distances(rows: torch.Tensor, x: torch.Tensor):
    """(clamped d, unclamped d^2) between unit ``rows`` and unit ``x``."""
    d2 = 2.0 - 2.0 * (rows @ x.T)
    return d2.clamp(min=MIN_DISTANCE**2).sqrt(), d2


def _torch_forward(x, labels, alpha, delta):
    """Row sums [n] of psi over s != a, in row chunks."""
    n = x.shape[0]
    rowsum = torch.empty(n, dtype=x.dtype, device=x.device)
    cols = torch.arange(n, device=x.device)
    step = tile_size(n)
    for r0 in range(0, n, step):
        d, _ = _distances(x[r0 : r0 + step], x)
        same = labels[r0 : r0 + step, None] == labels[None, :]
        psi = pf_energy(d, same, alpha, delta)
        psi = psi.masked_fill(cols[r0 : r0 + step, None] == cols[None, :], 0.0)
        rowsum[r0 : r0 + step] = psi.sum(dim=1)
    return rowsum


def _torch_backward(x, labels, coef, alpha, delta):
    """dL/dx for L = coef / 2 * sum(rowsum), in row chunks."""
    n = x.shape[0]
    grad = torch.empty_like(x)
    cols = torch.arange(n, device=x.device)
    step = tile_size(n)
    for r0 in range(0, n, step):
        d, d2 = _distances(x[r0 : r0 + step], x)
        same = labels[r0 : r0 + step, None] == labels[None, :]
        w = -coef * pf_slope(d, d2, same, alpha, delta)
        w = w.masked_fill(cols[r0 : r0 + step, None] == cols[None, :], 0.0)
        grad[r0 : r0 + step] = w @ x
    return grad


class _PotentialField(torch.autograd.Function):
    """Unit rows x [n, D] (compute dtype), dense int labels [n] -> scalar loss."""

    @staticmethod
    def forward(ctx, x, labels, alpha, delta, impl):
        if impl == "triton":
            from ._proxy_losses_triton import pf_forward

            rowsum = pf_forward(x, labels, alpha, delta, MIN_DISTANCE)
        else:
            rowsum = _torch_forward(x, labels, alpha, delta)
        ctx.save_for_backward(x, labels)
        ctx.alpha, ctx.delta, ctx.impl = alpha, delta, impl
        n = x.shape[0]
        return (rowsum.sum() / (n * (n - 1))).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, labels = ctx.saved_tensors
        n = x.shape[0]
        coef = grad_out * (2.0 / (n * (n - 1)))
        if ctx.impl == "triton":
            from ._proxy_losses_triton import pf_backward

            grad = pf_backward(x, labels, coef.to(torch.float32).reshape(1), ctx.alpha, ctx.delta, MIN_DISTANCE)
            grad = grad.to(x.dtype)
        else:
            grad = _torch_backward(x, labels, coef, ctx.alpha, ctx.delta)
        return grad, None, None, None, None


def potential_field_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxy_labels: torch.Tensor,
    *,
    alpha: float = 4.0,
    delta: float = 0.2,
    impl: str | None = None,
) -> torch.Tensor:
    """Potential Field energy of ``embeddings`` [N, D] (integer ``labels`` [N]) and ``proxies`` [P, D]
    (integer ``proxy_labels`` [P], the class of each proxy); see the module docstring for the formula.

    Every label must be the class of at least one proxy. Gradients flow to ``embeddings`` and ``proxies``.
    Computation runs in float32 (float64 for float64 inputs on the torch path); the loss comes back in
    ``embeddings.dtype``. ``impl``: "triton", "torch" or None (auto).
    """
    check_embeddings_labels(embeddings, labels)
    check_tensor("proxies", proxies, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("proxy_labels", proxy_labels, ndim=1, dtypes=INT_DTYPES)
    if proxies.shape[0] == 0 or proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"proxies must have shape [P >= 1, {embeddings.shape[1]}] (embeddings are {list(embeddings.shape)}), "
            f"got {list(proxies.shape)}"
        )
    if proxy_labels.shape[0] != proxies.shape[0]:
        raise ValueError(
            f"proxy_labels has {proxy_labels.shape[0]} entries but proxies has {proxies.shape[0]} rows; they must match"
        )
    check_same_device(embeddings=embeddings, labels=labels, proxies=proxies, proxy_labels=proxy_labels)
    check_finite("proxies", proxies)
    missing = labels[~torch.isin(labels, proxy_labels)]
    if missing.numel():
        shown = sorted(set(missing.tolist()))[:10]
        raise ValueError(f"labels holds classes that no proxy has (see proxy_labels): {shown}")
    alpha = check_positive("alpha", alpha)
    delta = check_positive("delta", delta)
    which = resolve_impl(impl, embeddings, labels, proxies, proxy_labels)
    dtype = torch.float32 if which == "triton" else compute_dtype(embeddings.dtype)
    x = torch.cat([l2_normalize(embeddings.to(dtype)), l2_normalize(proxies.to(dtype))]).contiguous()
    (lab_e, lab_p), _ = remap_labels(labels, proxy_labels)
    lab = torch.cat([lab_e, lab_p])
    loss = _PotentialField.apply(x, lab, alpha, delta, which)
    return loss.to(embeddings.dtype)
