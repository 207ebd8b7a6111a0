"""Proxy Anchor loss (Kim et al., CVPR 2020), streamed over (proxy x embedding) tiles.

With unit rows e_i = x_i / ||x_i||, p_c = w_c / ||w_c||, s_ic = <e_i, p_c>, P = the classes present in the
batch and C = the number of proxies:

    L = 1/|P| sum_c log(1 + sum_{i: y_i = c}  exp(-alpha (s_ic - margin)))
      + 1/C   sum_c log(1 + sum_{i: y_i != c} exp( alpha (s_ic + margin)))

(an empty inner sum gives log 1 = 0), which is pytorch-metric-learning 2.9's ``ProxyAnchorLoss`` with its
default cosine distance and reducer. With lse_pos[c], lse_neg[c] the two logs, the backward is

    dL/ds_ic = -alpha/|P| exp(-alpha (s_ic - margin) - lse_pos[c])   if y_i = c
               +alpha/C   exp( alpha (s_ic + margin) - lse_neg[c])   otherwise
    dL/de = G @ p,  dL/dp = G.T @ e,  then through the row normalization.

Both paths keep only unit rows (O((N + C) D)) and the 2C statistics: the forward streams an online
log-sum-exp per proxy, the backward recomputes s in tiles (Triton: one pass with embeddings as rows,
one with proxies as rows; PyTorch: row chunks of a few MiB).
"""
from __future__ import annotations

import math

import torch

from ._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from ._dispatch import resolve_impl
from .metric_common import (
    FALLBACK_TILE_ELEMS,
    check_embeddings_labels,
    check_label_range,
    check_positive,
    compute_dtype,
    l2_normalize,
)


def chunk_rows(num_proxies: int) -> int:
    """Embedding rows per fallback chunk: one [rows, C] tile holds about FALLBACK_TILE_ELEMS entries."""
    return max(1, FALLBACK_TILE_ELEMS // num_proxies)


def pa_logits(cos: torch.Tensor, is_pos: torch.Tensor, alpha: float, margin: float):
    """The exponents of the positive and negative sums, -inf outside their masks."""
    neg_inf = torch.tensor(float("-inf"), dtype=cos.dtype, device=cos.device)
    z_pos = torch.where(is_pos, -alpha * (cos - margin), neg_inf)
    z_neg = torch.where(is_pos, neg_inf, alpha * (cos + margin))
    return z_pos, z_neg


def pa_grad_cos(cos, is_pos, lse_pos, lse_neg, coef_pos, coef_neg, alpha: float, margin: float) -> torch.Tensor:
    """dL/dcos for a tile whose columns are proxies (lse_* broadcast over rows)."""
    g_pos = coef_pos * torch.exp(-alpha * (cos - margin) - lse_pos)
    g_neg = coef_neg * torch.exp(alpha * (cos + margin) - lse_neg)
    return torch.where(is_pos, g_pos, g_neg)


def _torch_forward(e, p, labels, alpha, margin):
    """(lse_pos, lse_neg) [C] folded over row chunks of embeddings with logaddexp."""
    lse_pos = torch.zeros(p.shape[0], dtype=e.dtype, device=e.device)  # log 1: the "1 +" term
    lse_neg = torch.zeros_like(lse_pos)
    classes = torch.arange(p.shape[0], device=e.device)
    step = chunk_rows(p.shape[0])
    for r0 in range(0, e.shape[0], step):
        cos = e[r0 : r0 + step] @ p.T
        is_pos = labels[r0 : r0 + step, None] == classes[None, :]
        z_pos, z_neg = pa_logits(cos, is_pos, alpha, margin)
        lse_pos = torch.logaddexp(lse_pos, torch.logsumexp(z_pos, dim=0))
        lse_neg = torch.logaddexp(lse_neg, torch.logsumexp(z_neg, dim=0))
    return lse_pos, lse_neg


def _torch_backward(e, p, labels, lse_pos, lse_neg, coef_pos, coef_neg, alpha, margin, need_e=True, need_p=True):
    """(dL/de or None, dL/dp or None), accumulated over row chunks of embeddings."""
    grad_e = torch.empty_like(e) if need_e else None
    grad_p = torch.zeros_like(p) if need_p else None
    classes = torch.arange(p.shape[0], device=e.device)
    step = chunk_rows(p.shape[0])
    for r0 in range(0, e.shape[0], step):
        rows = e[r0 : r0 + step]
        cos = rows @ p.T
        is_pos = labels[r0 : r0 + step, None] == classes[None, :]
        g = pa_grad_cos(cos, is_pos, lse_pos[None, :], lse_neg[None, :], coef_pos, coef_neg, alpha, margin)
        if need_e:
            grad_e[r0 : r0 + step] = g @ p
        if need_p:
            grad_p += g.T @ rows
    return grad_e, grad_p


class _ProxyAnchor(torch.autograd.Function):
    """Unit rows e [N, D], p [C, D] (compute dtype), int labels [N] -> scalar loss."""

    @staticmethod
    def forward(ctx, e, p, labels, num_present, alpha, margin, impl):
        if impl == "triton":
            from ._proxy_losses_triton import pa_forward

            lse_pos, lse_neg = pa_forward(e, p, labels, alpha, margin)
        else:
            lse_pos, lse_neg = _torch_forward(e, p, labels, alpha, margin)
        ctx.save_for_backward(e, p, labels, lse_pos, lse_neg, num_present)
        ctx.alpha, ctx.margin, ctx.impl = alpha, margin, impl
        loss = lse_pos.sum() / num_present + lse_neg.sum() / p.shape[0]
        return loss.to(e.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        e, p, labels, lse_pos, lse_neg, num_present = ctx.saved_tensors
        alpha, margin = ctx.alpha, ctx.margin
        coef_pos = -alpha * grad_out / num_present
        coef_neg = alpha * grad_out / p.shape[0]
        need_e, need_p = ctx.needs_input_grad[:2]
        if ctx.impl == "triton":
            from ._proxy_losses_triton import pa_backward

            coefs = torch.stack([coef_pos, coef_neg]).to(torch.float32).reshape(2)
            grad_e, grad_p = pa_backward(e, p, labels, lse_pos, lse_neg, coefs, alpha, margin, need_e, need_p)
            grad_e = grad_e.to(e.dtype) if need_e else None
            grad_p = grad_p.to(p.dtype) if need_p else None
        else:
            grad_e, grad_p = _torch_backward(e, p, labels, lse_pos, lse_neg, coef_pos, coef_neg, alpha, margin,
                                             need_e, need_p)
        return grad_e, grad_p, None, None, None, None, None


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    impl: str | None = None,
) -> torch.Tensor:
    """Proxy Anchor loss of ``embeddings`` [N, D] with integer ``labels`` [N] in [0, C) against ``proxies`` [C, D].

    Rows of both are L2-normalized inside; see the module docstring for the formula. Gradients flow to
    ``embeddings`` and ``proxies``. Computation runs in float32 (float64 for float64 inputs on the torch
    path); the loss comes back in ``embeddings.dtype``. ``impl``: "triton", "torch" or None (auto).
    """
    check_embeddings_labels(embeddings, labels)
    check_tensor("proxies", proxies, ndim=2, dtypes=FLOAT_DTYPES)
    num_classes = proxies.shape[0]
    if num_classes == 0 or proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"proxies must have shape [C >= 1, {embeddings.shape[1]}] (embeddings are {list(embeddings.shape)}), "
            f"got {list(proxies.shape)}"
        )
    check_same_device(embeddings=embeddings, labels=labels, proxies=proxies)
    check_finite("proxies", proxies)
    check_label_range("labels", labels, num_classes)
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin}")
    alpha = check_positive("alpha", alpha)
    which = resolve_impl(impl, embeddings, labels, proxies)
    dtype = torch.float32 if which == "triton" else compute_dtype(embeddings.dtype)
    e = l2_normalize(embeddings.to(dtype)).contiguous()
    p = l2_normalize(proxies.to(dtype)).contiguous()
    num_present = (torch.bincount(labels.to(torch.int64), minlength=num_classes) > 0).sum().to(dtype)
    lab = labels.to(torch.int32 if which == "triton" else torch.int64).contiguous()
    loss = _ProxyAnchor.apply(e, p, lab, num_present, alpha, margin, which)
    return loss.to(embeddings.dtype)
