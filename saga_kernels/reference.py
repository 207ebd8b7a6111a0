"""Plain-PyTorch definitions of every saga_kernels op: the obvious, materializing formula.

This module is the test oracle and nothing else: call it in float64 and compare. It may
allocate [N, V] logits, [N, N] similarity matrices and full attention maps freely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_logprobs_reference(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False):
    """log softmax((hidden @ weight.T + bias) / T)[target] (0 where ignored), optionally the entropy.

    The logits are formed in the inputs' dtype (float64 for the oracle; bf16 gives "eager bf16"),
    then softmax runs in at least fp32.
    """
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
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
                        importance_sampling_level="token"):
    """TRL's GRPO-family loss on [B, T] log-probs (scalar).

    per-token loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3(ref, logp),
    r = exp(logp - old) per token, or exp(masked mean over the sequence of (logp - old)) per sequence;
    k3 = exp(ref - logp) - (ref - logp) - 1. Normalizations: grpo = mean over sequences of the
    per-sequence token mean; bnpo and dapo = sum over tokens / number of tokens; dr_grpo = sum over
    tokens / (B * max_completion_length).
    """
    mask = completion_mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = logprobs - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if beta != 0.0:
        d = ref_logprobs.to(logprobs.dtype) - logprobs
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    per_token = per_token * mask
    batch = logprobs.shape[0]
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / batch
    if loss_type in ("bnpo", "dapo"):
        return per_token.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return per_token.sum() / (batch * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")
