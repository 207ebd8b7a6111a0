"""Streaming supervised contrastive loss (SupCon / InfoNCE with several positives).

Same conventions as pytorch-metric-learning 2.9 ``SupConLoss(temperature)`` with its defaults
(CosineSimilarity, AvgNonZeroReducer). With unit rows ``q_i = e_i / ||e_i||``, keys ``k_j`` (the
batch itself, or a reference set / cross-batch memory), ``z_ij = <q_i, k_j> / T`` and the kept
columns ``K(i)`` = every key except ``j = i`` when the keys are the batch itself (pml's rule: no
reference labels are given, or they are the very ``labels`` tensor):

    loss_i = logsumexp_{j in K(i)} z_ij - (1 / |P(i)|) sum_{p in P(i)} z_ip,   P(i) = {j in K(i): y_j = y_i}
    loss   = mean of loss_i over the anchors with loss_i > 0 (anchors without a positive have loss_i = 0)

Documented zero loss (never NaN; gradients are zeros): no positive pair or no negative pair in the
whole batch, at most one positive and at most one negative pair (pml's rule), or no anchor with
loss_i > 0. The N x M similarity matrix is never stored: the Triton kernels and the PyTorch fallback
stream over tiles and keep four numbers per query row (see ``_metric_triton``).
"""
from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor
from ._dispatch import resolve_impl
from .metric_common import (
    check_embeddings_labels,
    check_positive,
    compute_dtype,
    l2_normalize,
    pair_tiles,
    remap_labels,
    tiled_pair_backward,
)


def _forward_torch(q, k, lq, lk, inv_temp: float, exclude_diagonal: bool):
    """Row statistics (lse, pos_sum, pos_cnt, neg_cnt) of ``z = q k^T / T``, one row block at a time."""
    cd = compute_dtype(q.dtype)
    n = q.shape[0]
    lse, pos_sum, pos_cnt, neg_cnt = (torch.zeros(n, dtype=cd, device=q.device) for _ in range(4))
    for r0, r1, s, pos, neg, diag in pair_tiles(q, k, lq, lk, exclude_diagonal):
        z = s.mul_(inv_temp)
        pos_sum[r0:r1] = torch.where(pos, z, 0.0).sum(1)
        pos_cnt[r0:r1] = pos.sum(1)
        neg_cnt[r0:r1] = neg.sum(1)
        if diag is not None:
            z[diag] = float("-inf")
        row_lse = torch.logsumexp(z, dim=1)
        lse[r0:r1] = torch.where(torch.isfinite(row_lse), row_lse, 0.0)
    return lse, pos_sum, pos_cnt, neg_cnt


def supcon_from_stats(lse, pos_sum, pos_cnt, neg_cnt):
    """(loss, d loss / d loss_i, 1 / |P(i)| or 0) from the row statistics, without a host sync."""
    has_pos = pos_cnt > 0
    inv_pos = torch.where(has_pos, 1.0 / pos_cnt.clamp_min(1), torch.zeros_like(pos_cnt))
    row_loss = torch.where(has_pos, lse - pos_sum * inv_pos, torch.zeros_like(lse))
    pos_total, neg_total = pos_cnt.sum(), neg_cnt.sum()
    counted = row_loss > 0
    active = (pos_total > 0) & (neg_total > 0) & ((pos_total > 1) | (neg_total > 1))
    weight = (counted & active).to(row_loss.dtype) / counted.sum().clamp_min(1)
    return (weight * row_loss).sum(), weight, inv_pos


class _SupConFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lq, lk, temperature: float, exclude_diagonal: bool, impl: str):
        """k None: the keys are q itself. exclude_diagonal: drop pairs (i, i)."""
        keys, lk = (q, lq) if k is None else (k, lk)
        inv_temp = 1.0 / temperature
        if impl == "triton":
            from ._metric_triton import supcon_forward

            stats = supcon_forward(q, keys, lq, lk, inv_temp, exclude_diagonal)
        else:
            stats = _forward_torch(q, keys, lq, lk, inv_temp, exclude_diagonal)
        loss, weight, inv_pos = supcon_from_stats(*stats)
        ctx.save_for_backward(q, keys, lq, lk, stats[0], weight, inv_pos)
        ctx.inv_temp, ctx.self_keys, ctx.exclude_diagonal, ctx.impl = inv_temp, k is None, exclude_diagonal, impl
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, keys, lq, lk, lse, weight, inv_pos = ctx.saved_tensors
        self_keys, inv_temp = ctx.self_keys, ctx.inv_temp
        coef = weight * (grad * inv_temp)  # dLoss/dS_ij = coef_i * (softmax_ij - [j in P(i)] / |P(i)|)
        need_dq = self_keys or ctx.needs_input_grad[0]
        need_dk = self_keys or ctx.needs_input_grad[1]
        if ctx.impl == "triton":
            from ._metric_triton import SUPCON, pair_backward

            stats = (lse.float(), inv_pos.float(), lse.float(), inv_pos.float())
            dq, dk = pair_backward(q, keys, lq, lk, stats, coef.float().contiguous(), (inv_temp, 0.0, 0.0, 0.0),
                                   loss=SUPCON, exclude_diagonal=ctx.exclude_diagonal, use_miner=False,
                                   need_dq=need_dq, need_dk=need_dk)
        else:
            def grad_tile(r0, r1, s, pos, neg, diag):
                g = s.mul_(inv_temp).sub_(lse[r0:r1, None]).exp_()  # softmax over the kept columns
                if diag is not None:
                    g[diag] = 0.0
                g.sub_(torch.where(pos, inv_pos[r0:r1, None], 0.0))
                return g.mul_(coef[r0:r1, None])

            dq, dk = tiled_pair_backward(q, keys, lq, lk, grad_tile, exclude_diagonal=ctx.exclude_diagonal,
                                         need_dq=need_dq, need_dk=need_dk)
        if self_keys:
            return (dq + dk).to(q.dtype), None, None, None, None, None, None
        dq = dq.to(q.dtype) if dq is not None else None
        dk = dk.to(keys.dtype) if dk is not None else None
        return dq, dk, None, None, None, None, None


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss of ``embeddings [N, D]`` with integer ``labels [N]`` (see module doc).

    ``ref_embeddings [M, D]`` / ``ref_labels [M]`` (both or neither) replace the keys, as in pml's
    ``loss(embeddings, labels, ref_emb=..., ref_labels=...)``: every query is compared with every
    reference row, e.g. a cross-batch memory. As in pml, pairs (i, i) are dropped only when
    ``ref_labels is labels`` (the same tensor object). Gradients flow to ``embeddings`` and to
    ``ref_embeddings`` when it requires grad. Returns a scalar of ``embeddings.dtype``.
    """
    check_embeddings_labels(embeddings, labels)
    temperature = check_positive("temperature", temperature)
    if (ref_embeddings is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"ref_embeddings and ref_labels go together; {missing} is missing")
    if ref_embeddings is not None:
        check_embeddings_labels(ref_embeddings, ref_labels, embeddings_name="ref_embeddings", labels_name="ref_labels")
        check_tensor("ref_embeddings", ref_embeddings, shape=(None, embeddings.shape[1]))
        check_same_device(embeddings=embeddings, ref_embeddings=ref_embeddings)
        (lq, lk), _ = remap_labels(labels, ref_labels)
    else:
        (lq,), _ = remap_labels(labels)
        lk = None
    exclude_diagonal = ref_labels is None or ref_labels is labels
    if ref_embeddings is embeddings and ref_labels is labels:
        ref_embeddings = None  # the batch against itself: one tensor, one gradient
    which = resolve_impl(impl, embeddings, ref_embeddings)
    q = l2_normalize(embeddings).contiguous()
    k = l2_normalize(ref_embeddings).contiguous() if ref_embeddings is not None else None
    loss = _SupConFunction.apply(q, k, lq, lk, temperature, exclude_diagonal, which)
    return loss.to(embeddings.dtype)
