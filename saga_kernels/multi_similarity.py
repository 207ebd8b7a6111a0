"""Streaming Multi-Similarity loss with the Multi-Similarity miner built in.

Same conventions as pytorch-metric-learning 2.9 ``MultiSimilarityLoss(alpha, beta, base)`` fed by
``MultiSimilarityMiner(epsilon)`` (CosineSimilarity, MeanReducer). With unit rows ``q_i``,
``s_ij = <q_i, q_j>``, positives ``P(i) = {j != i: y_j = y_i}`` and negatives ``N(i) = {j: y_j != y_i}``:

    miner:  keep p in P(i) iff s_ip - eps < max_{n in N(i)} s_in,   keep n in N(i) iff s_in + eps > min_{p in P(i)} s_ip
    loss_i = (1/alpha) log(1 + sum_{kept p} exp(-alpha (s_ip - base)))
           + (1/beta)  log(1 + sum_{kept n} exp( beta (s_in - base)))
    loss   = (1/N) sum_i loss_i

``miner_epsilon=None`` keeps every pair. Documented zero loss (never NaN; zero gradients), as in pml:
at most one kept positive pair and at most one kept negative pair in the batch (this covers pml's
miner returning nothing for a batch without positive or without negative pairs: the miner then keeps
no pair at all). Mining decisions are constants for autograd.
The N x N matrix is never stored: the forward keeps six numbers per row (two streaming passes in
the Triton kernel: row min/max for the miner, then the two online log-sum-exps), the backward
recomputes the similarity tiles (see ``_metric_triton``).
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_impl
from .metric_common import (
    check_embeddings_labels,
    check_positive,
    check_real,
    compute_dtype,
    l2_normalize,
    pair_tiles,
    remap_labels,
    tiled_pair_backward,
)


def _mined(s, pos, neg, min_pos, max_neg, eps: float | None):
    """Kept (positive, negative) masks of one tile under the MS miner (all pairs when eps is None)."""
    if eps is None:
        return pos, neg
    return pos & (s - eps < max_neg[:, None]), neg & (s + eps > min_pos[:, None])


def _forward_torch(q, lq, alpha: float, beta: float, base: float, eps: float | None):
    """Row statistics (lse_pos, lse_neg, min_pos, max_neg, mined_pos, mined_neg)."""
    cd = compute_dtype(q.dtype)
    stats = [torch.zeros(q.shape[0], dtype=cd, device=q.device) for _ in range(6)]
    lse_pos, lse_neg, min_pos, max_neg, mined_pos, mined_neg = stats
    for r0, r1, s, pos, neg, _ in pair_tiles(q, q, lq, lq, True):
        lo = torch.where(pos, s, float("inf")).amin(1)
        hi = torch.where(neg, s, float("-inf")).amax(1)
        mp, mn = _mined(s, pos, neg, lo, hi, eps)
        zero = torch.zeros(r1 - r0, dtype=cd, device=q.device)
        shifted = s - base
        lse_pos[r0:r1] = torch.logaddexp(torch.logsumexp(torch.where(mp, shifted * -alpha, float("-inf")), 1), zero)
        lse_neg[r0:r1] = torch.logaddexp(torch.logsumexp(torch.where(mn, shifted * beta, float("-inf")), 1), zero)
        min_pos[r0:r1], max_neg[r0:r1] = lo, hi
        mined_pos[r0:r1], mined_neg[r0:r1] = mp.sum(1), mn.sum(1)
    return tuple(stats)


def ms_from_stats(stats, alpha: float, beta: float):
    """(loss, d loss / d loss_i) from the row statistics, without a host sync."""
    lse_pos, lse_neg, _, _, mined_pos, mined_neg = stats
    row_loss = lse_pos / alpha + lse_neg / beta
    active = (mined_pos.sum() > 1) | (mined_neg.sum() > 1)
    weight = active.to(row_loss.dtype).expand_as(row_loss) / row_loss.numel()
    return (weight * row_loss).sum(), weight


class _MultiSimilarityFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, lq, alpha: float, beta: float, base: float, eps: float | None, impl: str):
        if impl == "triton":
            from ._metric_triton import ms_forward

            stats = ms_forward(q, lq, alpha, beta, base, 0.0 if eps is None else eps, eps is not None)
        else:
            stats = _forward_torch(q, lq, alpha, beta, base, eps)
        loss, weight = ms_from_stats(stats, alpha, beta)
        ctx.save_for_backward(q, lq, *stats[:4], weight)
        ctx.params, ctx.impl = (alpha, beta, base, eps), impl
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, lq, lse_pos, lse_neg, min_pos, max_neg, weight = ctx.saved_tensors
        alpha, beta, base, eps = ctx.params
        coef = weight * grad
        # dLoss/dS_ij = coef_i * (exp(beta (s - base) - lse_neg_i) [kept neg] - exp(-alpha (s - base) - lse_pos_i) [kept pos])
        if ctx.impl == "triton":
            from ._metric_triton import MULTI_SIMILARITY, pair_backward

            dq, dk = pair_backward(q, q, lq, lq, (lse_pos, lse_neg, min_pos, max_neg), coef.float().contiguous(),
                                   (alpha, beta, base, 0.0 if eps is None else eps), loss=MULTI_SIMILARITY,
                                   exclude_diagonal=True, use_miner=eps is not None, need_dq=True, need_dk=True)
        else:
            def grad_tile(r0, r1, s, pos, neg, diag):
                mp, mn = _mined(s, pos, neg, min_pos[r0:r1], max_neg[r0:r1], eps)
                shifted = s - base
                gp = torch.where(mp, shifted * -alpha - lse_pos[r0:r1, None], float("-inf")).exp_()
                gn = torch.where(mn, shifted.mul_(beta).sub_(lse_neg[r0:r1, None]), float("-inf")).exp_()
                return gn.sub_(gp).mul_(coef[r0:r1, None])

            dq, dk = tiled_pair_backward(q, q, lq, lq, grad_tile, exclude_diagonal=True, need_dq=True, need_dk=True)
        return (dq + dk).to(q.dtype), None, None, None, None, None, None


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    miner_epsilon: float | None = 0.1,
    impl: str | None = None,
) -> torch.Tensor:
    """Multi-Similarity loss of ``embeddings [N, D]`` with integer ``labels [N]`` (see module doc).

    ``miner_epsilon`` is the MultiSimilarityMiner margin (``None``: no mining, all pairs). Gradients
    flow to ``embeddings``. Returns a scalar of ``embeddings.dtype``.
    """
    check_embeddings_labels(embeddings, labels)
    alpha = check_positive("alpha", alpha)
    beta = check_positive("beta", beta)
    base = check_real("base", base)
    miner_epsilon = None if miner_epsilon is None else check_real("miner_epsilon", miner_epsilon)
    (lq,), _ = remap_labels(labels)
    which = resolve_impl(impl, embeddings)
    q = l2_normalize(embeddings).contiguous()
    loss = _MultiSimilarityFunction.apply(q, lq, alpha, beta, base, miner_epsilon, which)
    return loss.to(embeddings.dtype)
