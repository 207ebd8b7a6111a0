"""Plain-PyTorch definitions of every saga_kernels op: the obvious, materializing formula.

This module is the test oracle and nothing else: call it in float64 and compare. It may
allocate [N, V] logits, [N, N] similarity matrices and full attention maps freely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_logprobs_reference(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False, logit_scale=1.0, softcap=None):
    """log softmax(z)[target] (0 where ignored), optionally the entropy of softmax(z), with
    z = logit_scale * (hidden @ weight.T + bias) / T, or cap * tanh(logit_scale * (hidden @ weight.T + bias) / cap) / T.

    The raw logits are formed in the inputs' dtype (float64 for the oracle; bf16 gives "eager bf16"),
    then everything else runs in at least fp32.
    """
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, torch.zeros_like(targets), targets)
    logp = torch.where(ignored, 0.0, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1))
    if not return_entropy:
        return logp
    entropy = torch.where(ignored, 0.0, -(logp_all.exp() * logp_all).sum(-1))
    return logp, entropy


def grpo_loss_reference(logprobs, completion_mask, advantages, old_logprobs=None, ref_logprobs=None, beta=0.0,
                        epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", max_completion_length=None,
                        importance_sampling_level="token", use_bias_correction_kl=False, token_weights=None):
    """TRL's GRPO-family loss on [B, T] log-probs (scalar).

    per-token loss = -w min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3(ref, logp) [* r],
    r = exp(logp - old) per token, or exp(masked mean over the sequence of (logp - old)) per sequence;
    A per sequence [B] or per token [B, T], w the token weights (1 when None), the k3 term times r with
    use_bias_correction_kl; k3 = exp(ref - logp) - (ref - logp) - 1. Normalizations: grpo = mean over sequences of the
    per-sequence token mean; bnpo and dapo = sum over tokens / number of tokens; dr_grpo = sum over
    tokens / (B * max_completion_length).
    """
    mask = completion_mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = logprobs - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.to(logprobs.dtype)
    if beta != 0.0:
        d = ref_logprobs.to(logprobs.dtype) - logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    per_token = per_token * mask
    batch = logprobs.shape[0]
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / batch
    if loss_type in ("bnpo", "dapo"):
        return per_token.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return per_token.sum() / (batch * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def proxy_anchor_loss_reference(embeddings, labels, proxies, *, margin=0.1, alpha=32.0):
    """Proxy Anchor (pml 2.9 conventions): s = cos(x_i, w_c), P = classes present in the batch,
    L = 1/|P| sum_c log(1 + sum_{y_i=c} e^{-alpha (s - margin)})
        + 1/C sum_c log(1 + sum_{y_i!=c} e^{alpha (s + margin)})."""
    num_classes = proxies.shape[0]
    cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T
    pos = F.one_hot(labels.long(), num_classes).bool()
    pos_sum = torch.where(pos, torch.exp(-alpha * (cos - margin)), torch.zeros_like(cos)).sum(0)
    neg_sum = torch.where(pos, torch.zeros_like(cos), torch.exp(alpha * (cos + margin))).sum(0)
    num_present = pos.any(0).sum()
    return torch.log1p(pos_sum).sum() / num_present + torch.log1p(neg_sum).sum() / num_classes


def potential_field_loss_reference(embeddings, labels, proxies, proxy_labels, *, alpha=4.0, delta=0.2,
                                   min_distance=1e-2):
    """Potential Field energy over A = normalized embeddings U normalized proxies (METHOD.md):
    d = max(||a - s||, min_distance), psi = -max(d, delta)^-alpha (same class) or min(d, delta)^-alpha (other),
    L = mean_a mean_{s != a (by index)} psi(d(a, s))."""
    points = torch.cat([F.normalize(embeddings, dim=1), F.normalize(proxies, dim=1)])
    classes = torch.cat([labels.long(), proxy_labels.long()])
    n = points.shape[0]
    sq = (points[:, None, :] - points[None, :, :]).pow(2).sum(-1)
    dist = sq.clamp(min=min_distance**2).sqrt()
    same = classes[:, None] == classes[None, :]
    psi = torch.where(same, -dist.clamp(min=delta).pow(-alpha), dist.clamp(max=delta).pow(-alpha))
    others = ~torch.eye(n, dtype=torch.bool, device=points.device)
    per_element = torch.where(others, psi, torch.zeros_like(psi)).sum(1) / (n - 1)
    return per_element.mean()


def supcon_loss_reference(embeddings, labels, *, temperature=0.1, ref_embeddings=None, ref_labels=None):
    """SupCon (pml 2.9 SupConLoss conventions): z = cos(q_i, k_j) / T over kept pairs (j != i unless a
    reference set is given), loss_i = -mean_{positives p} log softmax_j(z_ij)[p], mean over anchors with
    loss_i > 0; 0 without a positive pair, without a negative pair, or with at most one of each."""
    q = F.normalize(embeddings, dim=1)
    self_pairs = ref_embeddings is None
    k = q if self_pairs else F.normalize(ref_embeddings, dim=1)
    key_labels = labels if self_pairs else ref_labels
    z = q @ k.T / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if self_pairs or ref_labels is labels:  # pml drops (i, i) when the key labels are the labels tensor itself
        keep.fill_diagonal_(False)
    same = labels[:, None] == key_labels[None, :]
    pos, neg = same & keep, ~same & keep
    zero = z.sum() * 0
    num_pos, num_neg = int(pos.sum()), int(neg.sum())
    if num_pos == 0 or num_neg == 0 or (num_pos <= 1 and num_neg <= 1):
        return zero
    log_prob = z - torch.logsumexp(z.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(z)).sum(1) / pos.sum(1).clamp(min=1)
    counted = per_anchor > 0
    return per_anchor[counted].mean() if bool(counted.any()) else zero


def multi_similarity_loss_reference(embeddings, labels, *, alpha=2.0, beta=50.0, base=0.5, miner_epsilon=0.1):
    """Multi-Similarity (pml 2.9 MultiSimilarityLoss + MultiSimilarityMiner(epsilon) conventions), s = cos:
    keep positive (i, p) iff s_ip - eps < max negative s_i., negative (i, n) iff s_in + eps > min positive s_i.;
    L = mean_i [1/alpha log(1 + sum_p e^{-alpha (s_ip - base)}) + 1/beta log(1 + sum_n e^{beta (s_in - base)})];
    0 when (mining) the batch lacks positive or negative pairs, or at most one pair of each kind is kept."""
    x = F.normalize(embeddings, dim=1)
    s = x @ x.T
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~eye, ~same
    zero = s.sum() * 0
    if miner_epsilon is not None:
        if not bool(pos.any()) or not bool(neg.any()):
            return zero
        hardest_neg = torch.where(neg, s, torch.full_like(s, float("-inf"))).amax(1, keepdim=True)
        hardest_pos = torch.where(pos, s, torch.full_like(s, float("inf"))).amin(1, keepdim=True)
        pos = pos & (s - miner_epsilon < hardest_neg)
        neg = neg & (s + miner_epsilon > hardest_pos)
    if int(pos.sum()) <= 1 and int(neg.sum()) <= 1:
        return zero
    pos_term = torch.log1p(torch.where(pos, torch.exp(-alpha * (s - base)), torch.zeros_like(s)).sum(1)) / alpha
    neg_term = torch.log1p(torch.where(neg, torch.exp(beta * (s - base)), torch.zeros_like(s)).sum(1)) / beta
    return (pos_term + neg_term).mean()


def attention_probs_reference(q, k, key_index, query_positions=None, key_padding_mask=None, scale=None,
                              reduce_heads="mean"):
    """Full softmax(scale * q k^T) over visible keys (causal at query_positions, padding), gathered at key_index."""
    bsz, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if query_positions is None:
        query_positions = torch.arange(lk - lq, lk, device=q.device).expand(bsz, lq)
    scale = dim ** -0.5 if scale is None else scale
    k_full = k.repeat_interleave(hq // hkv, dim=1)
    scores = scale * q @ k_full.transpose(-1, -2)  # [B, Hq, Lq, Lk]
    visible = torch.arange(lk, device=q.device)[None, None, :] <= query_positions[:, :, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, :]
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    probs = probs.gather(3, key_index[:, None, None, :].expand(bsz, hq, lq, key_index.shape[1]))
    return probs.mean(dim=1) if reduce_heads == "mean" else probs


def attention_kl_reference(logits, target, mask=None, reduction="batchmean"):
    """KL(t || softmax(logits)) per row over the masked entries, t = target renormalized there; 0 log 0 = 0."""
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    t = torch.where(mask, target, torch.zeros_like(target))
    t = t / t.sum(dim=-1, keepdim=True)
    log_q = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    terms = torch.where(t > 0, t * (torch.log(t) - log_q), torch.zeros_like(t))
    per_row = terms.sum(dim=-1)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / per_row.numel() if reduction == "batchmean" else total
