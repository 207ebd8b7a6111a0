"""The GRPO-family policy loss (grpo / bnpo / dr_grpo / dapo, as TRL defines them), on log-probs or
fused with the LM head.

Per completion token t of sequence i, with advantage A_it (one per sequence, A_i, or one per token), token
weight w_it (1 when not given) and log-probs lp (current), old, ref:

    r      = exp(lp - old)                                  (importance_sampling_level="token")
           = exp(sum_t m (lp - old) / sum_t m)              ("sequence", GSPO; one ratio per sequence)
    k3     = exp(ref - lp) - (ref - lp) - 1                 (times r with use_bias_correction_kl)
    L_it   = -w_it min(r A_it, clip(r, 1 - eps_low, 1 + eps_high) A_it) + beta * k3

The token weights multiply the policy term only, as TRL's ``importance_sampling_ratio`` (vLLM's sampler vs
the trainer) and verl's ``rollout_is_weights`` do. ``use_bias_correction_kl`` (DeepSeek-V3.2; TRL's
GRPOConfig default since 1.x, Liger's ``use_bias_correction_kl``) multiplies k3 by the importance ratio, with
its gradient, which makes the KL term's gradient the unbiased reverse-KL gradient.

and the masked per-token losses are reduced by the loss type:

    grpo     (1/B) sum_i (sum_t m L / sum_t m)          per-sequence mean, then mean over sequences
    bnpo     sum m L / sum m                            token mean over the batch
    dapo     sum m L / sum m                            or / (num_items_in_batch / world_size) when
                                                        given: TRL's convention (see below)
    dr_grpo  sum m L / (B * max_completion_length)

``num_items_in_batch`` is the completion-token count of the whole generation batch: every
gradient-accumulation micro-batch of every process. As in TRL and Liger-Kernel, under an initialized
``torch.distributed`` it is divided by the world size, because DDP then averages the gradients over
the processes: the summed token losses of all ranks end up divided by the global token count once.

Masked positions (completion_mask 0) may hold anything in logprobs, old_logprobs, ref_logprobs, per-token
advantages and token_weights (+-inf or NaN from a model's log_softmax or a padded rollout buffer): they are
replaced by 0 before any arithmetic, so neither the loss nor any gradient sees them, and their gradient is
exactly 0.
Non-finite values at kept positions are errors naming the argument (a value check, see
``saga_kernels.input_checks``: no host sync on CUDA).

Without old log-probs, old = lp.detach(): r == 1 exactly, clipping never acts, and the gradient is
that of the advantage-weighted NLL -sum m A lp / norm (SAGA's L_GRPO with "dapo"); the loss
*value* is then -sum m A / norm, the surrogate at r = 1, as in TRL.
"""
from __future__ import annotations

import torch

from ._checks import (
    check_bool,
    check_finite,
    check_index_range,
    check_number,
    check_same_device,
    check_tensor,
    check_values,
)
from .logprob import linear_logprobs

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
_LOGPROB_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_options(beta, epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
                   use_bias_correction_kl=False):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    for name, value in (("beta", beta), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        check_number(name, value, minimum=0)
    check_bool("use_bias_correction_kl", use_bias_correction_kl)
    if loss_type == "dr_grpo" and not torch.compiler.is_compiling():
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) \
                or max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be a positive int for loss_type='dr_grpo', "
                             f"got {max_completion_length!r}")


def _check_ref(beta, ref_logprobs):
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0 (the KL term needs the reference log-probs)")


def _check_num_items(num_items_in_batch, loss_type):
    if num_items_in_batch is None:
        return
    if loss_type != "dapo":
        raise ValueError(f"num_items_in_batch only applies to loss_type='dapo', got loss_type={loss_type!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {list(num_items_in_batch.shape)}")
        if num_items_in_batch.is_complex() or num_items_in_batch.dtype == torch.bool:
            raise TypeError(f"num_items_in_batch must be a real number, got dtype {num_items_in_batch.dtype}")
        check_values("num_items_in_batch", torch.isfinite(num_items_in_batch) & (num_items_in_batch >= 0),
                     "be a finite number >= 0")
        return
    check_number("num_items_in_batch", num_items_in_batch, minimum=0)


def _check_per_token(advantages, token_weights, completion_mask, b, t):
    """advantages [B] or [B, T] and token_weights [B, T] or None: shapes, dtypes and finite kept values."""
    check_tensor("advantages", advantages, ndim=(1, 2), dtypes=_LOGPROB_DTYPES)
    check_tensor("advantages", advantages, shape=(b,) if advantages.dim() == 1 else (b, t))
    if token_weights is not None:
        check_tensor("token_weights", token_weights, shape=(b, t), dtypes=_LOGPROB_DTYPES)
    keep = completion_mask.bool()
    check_finite("advantages", advantages.detach(), where=keep if advantages.dim() == 2 else None)
    if token_weights is not None:
        check_finite("token_weights", token_weights.detach(), where=keep)


def _check_batch(logprobs, completion_mask, advantages, old_logprobs, ref_logprobs, token_weights):
    check_tensor("logprobs", logprobs, ndim=2, dtypes=_LOGPROB_DTYPES)
    b, t = logprobs.shape
    _check_mask(completion_mask, (b, t))
    if old_logprobs is not None:
        check_tensor("old_logprobs", old_logprobs, shape=(b, t), dtypes=_LOGPROB_DTYPES)
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, shape=(b, t), dtypes=_LOGPROB_DTYPES)
    check_same_device(logprobs=logprobs, completion_mask=completion_mask, advantages=advantages,
                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, token_weights=token_weights)
    _check_per_token(advantages, token_weights, completion_mask, b, t)
    keep = completion_mask.bool()
    for name, value in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            check_finite(name, value.detach(), where=keep)


def _check_mask(completion_mask, shape):
    check_tensor("completion_mask", completion_mask, shape=shape)
    if completion_mask.is_complex():
        raise TypeError("completion_mask must be bool, integer or floating point, got a complex dtype")
    if completion_mask.dtype != torch.bool:
        check_values("completion_mask", (completion_mask == 0) | (completion_mask == 1), "hold only 0 and 1")


def _world_size() -> int:
    """Processes of the default torch.distributed group (1 when it is not initialized)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _masked_mean(x, mask):
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def _grpo_core(logprobs, completion_mask, advantages, old_logprobs, ref_logprobs, beta, epsilon_low, epsilon_high,
               loss_type, max_completion_length, importance_sampling_level, num_items_in_batch,
               use_bias_correction_kl, token_weights):
    """The loss math (inputs already validated); returns (loss, stats)."""
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    keep = completion_mask.bool()
    mask = keep.to(dtype)
    # masked positions may hold +-inf / NaN: select them away before any arithmetic (value and gradient)
    lp = torch.where(keep, logprobs.to(dtype), 0.0)
    if advantages.dim() == 1:
        adv = advantages.to(dtype).unsqueeze(-1)  # [B, 1]
    else:
        adv = torch.where(keep, advantages.to(dtype), 0.0)  # [B, T]
    old = lp.detach() if old_logprobs is None else torch.where(keep, old_logprobs.to(dtype), 0.0)
    log_ratio = lp - old
    if importance_sampling_level == "sequence":
        log_ratio = (torch.where(keep, log_ratio, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    if token_weights is not None:
        per_token = per_token * torch.where(keep, token_weights.to(dtype), 0.0)
    kl = None
    if ref_logprobs is not None:
        d = torch.where(keep, ref_logprobs.to(dtype), 0.0) - lp
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi || pi_ref)
        if use_bias_correction_kl:
            kl = kl * ratio
        if beta > 0:
            per_token = per_token + beta * kl
    masked = torch.where(keep, per_token, 0.0)  # where, not *, so junk at padded positions cannot leak
    batch = lp.shape[0]
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(batch, 1)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (batch * max_completion_length)
    elif loss_type == "dapo" and num_items_in_batch is not None:  # clamped at 1 as TRL does (no tokens: loss 0)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        else:
            num_items_in_batch = max(num_items_in_batch, 1)
        loss = masked.sum() / (num_items_in_batch / _world_size())
    else:  # bnpo, dapo
        loss = masked.sum() / mask.sum().clamp(min=1)

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).expand_as(mask).to(dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).expand_as(mask).to(dtype)
        stats = {
            "kl": _masked_mean(kl, mask) if kl is not None else lp.new_zeros(()),
            "clip_ratio": _masked_mean(low + high, mask),
            "clip_ratio_low": _masked_mean(low, mask),
            "clip_ratio_high": _masked_mean(high, mask),
            "ratio_mean": _masked_mean(ratio.expand_as(mask), mask),
            "num_tokens": mask.sum(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def grpo_loss(logprobs, completion_mask, advantages, *, old_logprobs=None, ref_logprobs=None, beta=0.0,
              epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", max_completion_length=None,
              importance_sampling_level="token", num_items_in_batch=None, use_bias_correction_kl=False,
              token_weights=None):
    """GRPO-family loss on per-token log-probs (formulas in the module docstring).

    logprobs ``[B, T]`` (differentiable), completion_mask ``[B, T]`` (0/1, bool or numeric),
    advantages ``[B]`` or ``[B, T]`` (finite where kept), old_logprobs / ref_logprobs ``[B, T]`` or None,
    token_weights ``[B, T]`` or None (multiply the policy term per token: TRL's ``importance_sampling_ratio``,
    verl's ``rollout_is_weights``), ``use_bias_correction_kl`` (the k3 KL times the importance ratio, TRL's
    definition; TRL's GRPOConfig turns it on by default, here it is off as in Liger). ``beta > 0``
    needs ref_logprobs; "dr_grpo" needs max_completion_length; ``num_items_in_batch`` (dapo only; a
    number or a scalar tensor >= 0, clamped at 1 as TRL does) replaces this call's token count as the divisor,
    for gradient accumulation: the token count of the whole generation batch, divided by the world size under
    torch.distributed (TRL's convention, module docstring). Masked positions may hold anything; non-finite
    values at kept positions raise ValueError naming the argument. Returns ``(loss, stats)``: a scalar
    in at least fp32, and detached scalars "kl" (masked mean k3 KL to ref; 0 without ref),
    "clip_ratio", "clip_ratio_low", "clip_ratio_high" (fractions of completion tokens whose
    objective is clipped, TRL's definition), "ratio_mean" and "num_tokens". With ``use_bias_correction_kl`` the
    "kl" statistic is the corrected one, as TRL logs it.
    """
    _check_options(beta, epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
                   use_bias_correction_kl)
    _check_ref(beta, ref_logprobs)
    _check_num_items(num_items_in_batch, loss_type)
    _check_batch(logprobs, completion_mask, advantages, old_logprobs, ref_logprobs, token_weights)
    return _grpo_core(logprobs, completion_mask, advantages, old_logprobs, ref_logprobs, beta, epsilon_low,
                      epsilon_high, loss_type, max_completion_length, importance_sampling_level, num_items_in_batch,
                      use_bias_correction_kl, token_weights)


def linear_grpo_loss(hidden, weight, completion_ids, completion_mask, advantages, *, bias=None, temperature=1.0,
                     old_logprobs=None, ref_logprobs=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                     loss_type="dapo", max_completion_length=None, importance_sampling_level="token",
                     num_items_in_batch=None, use_bias_correction_kl=False, token_weights=None, logit_scale=1.0,
                     softcap=None, impl=None):
    """``grpo_loss`` straight from hidden states ``[B, T, H]`` and the LM head ``weight [V, H]``
    (+ ``bias [V]``): log-probs of ``completion_ids [B, T]`` under softmax(logits / temperature)
    come from :func:`saga_kernels.linear_logprobs` (no [B*T, V] buffer; ``logit_scale`` / ``softcap`` as
    there). Masked positions are passed to it as ignored tokens: their ids are never read, they cost
    nothing, and their hidden-state gradient is exactly 0. Returns ``(loss, stats)`` like ``grpo_loss``.
    """
    _check_options(beta, epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
                   use_bias_correction_kl)
    _check_ref(beta, ref_logprobs)
    _check_num_items(num_items_in_batch, loss_type)
    check_tensor("hidden", hidden, ndim=3)
    b, t, _ = hidden.shape
    check_tensor("weight", weight, ndim=2)
    check_tensor("completion_ids", completion_ids, shape=(b, t), dtypes=(torch.int64, torch.int32))
    _check_mask(completion_mask, (b, t))
    check_same_device(hidden=hidden, weight=weight, completion_ids=completion_ids, completion_mask=completion_mask)
    keep = completion_mask.bool()
    check_index_range("completion_ids", completion_ids, weight.shape[0], where=keep)
    ignore_index = -1
    targets = torch.where(keep, completion_ids.to(torch.int64), ignore_index)
    logprobs = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, impl=impl)
    return grpo_loss(logprobs, completion_mask, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                     beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
                     max_completion_length=max_completion_length,
                     importance_sampling_level=importance_sampling_level, num_items_in_batch=num_items_in_batch,
                     use_bias_correction_kl=use_bias_correction_kl, token_weights=token_weights)


class LinearGRPOLoss(torch.nn.Module):
    """Module form of :func:`linear_grpo_loss`; the options are fixed at construction.

    ``loss_fn(hidden, weight, completion_ids, completion_mask, advantages, bias=None,
    old_logprobs=None, ref_logprobs=None, num_items_in_batch=None, token_weights=None) -> (loss, stats)``.
    """

    def __init__(self, *, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", max_completion_length=None,
                 importance_sampling_level="token", temperature=1.0, use_bias_correction_kl=False, logit_scale=1.0,
                 softcap=None, impl=None):
        super().__init__()
        _check_options(beta, epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
                       use_bias_correction_kl)
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length = loss_type, max_completion_length
        self.importance_sampling_level, self.temperature, self.impl = importance_sampling_level, temperature, impl
        self.use_bias_correction_kl, self.logit_scale, self.softcap = use_bias_correction_kl, logit_scale, softcap

    def forward(self, hidden, weight, completion_ids, completion_mask, advantages, bias=None, old_logprobs=None,
                ref_logprobs=None, num_items_in_batch=None, token_weights=None):
        return linear_grpo_loss(hidden, weight, completion_ids, completion_mask, advantages, bias=bias,
                                temperature=self.temperature, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                                loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                                importance_sampling_level=self.importance_sampling_level,
                                num_items_in_batch=num_items_in_batch,
                                use_bias_correction_kl=self.use_bias_correction_kl, token_weights=token_weights,
                                logit_scale=self.logit_scale, softcap=self.softcap, impl=self.impl)

    def extra_repr(self):
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon=({self.epsilon_low}, {self.epsilon_high}), "
                f"importance_sampling_level={self.importance_sampling_level!r}, temperature={self.temperature}, "
                f"use_bias_correction_kl={self.use_bias_correction_kl}"
                + (f", logit_scale={self.logit_scale}" if self.logit_scale != 1.0 else "")
                + (f", softcap={self.softcap}" if self.softcap is not None else ""))
