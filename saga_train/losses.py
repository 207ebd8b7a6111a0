"""The three SAGA losses, as glue around saga_kernels.

* L_DML (phase A): the chosen metric loss module on the batch embeddings.
* L_GRPO (phase C): ``-(1/|T|) sum_g sum_t A_g log pi(y_t^g | y_<t^g, S)`` from the frozen LLM's final
  hidden states via ``saga_kernels.linear_logprobs`` + ``saga_kernels.grpo_loss`` (the LM head never
  materializes logits).
* L_KL (phase C, rollouts with r = 1): ``KL(alpha_a || beta_a) + KL(alpha_b || beta_b)`` via
  ``saga_kernels.attention_kl``; alpha = the LLM's head-mean attention at one layer from the tokens
  describing an item to that item's patch tokens, renormalized over those patches and averaged over
  the tokens; beta = softmax of the pooler logits on detached X (only the pooler gets this gradient).

Both phase C terms are pure functions of tensors that take the step's normalizer explicitly (|T|, the
number of r = 1 rollouts): a step's groups and micro-batches each add their share, and under
torch.distributed the normalizer is the count over all ranks divided by the world size (TRL's
``num_items_in_batch`` convention: DDP's gradient average then divides by the global count once).
"""
import torch

import saga_kernels

from .distributed import world_size


def build_metric_loss(name: str, num_classes: int, embedding_size: int, proxies_per_class: int, *,
                      pf_alpha: float = 4.0, pf_delta: float = 0.2):
    """The saga_kernels nn.Module for ``--dml`` (proxy-based ones own their proxies); ``pf_alpha`` / ``pf_delta``:
    the Potential Field's exponent and radius (METHOD.md: 4 and 0.2)."""
    from saga_kernels import MultiSimilarityLoss, PotentialFieldLoss, ProxyAnchorLoss, SupConLoss

    if name == "potential_field":
        return PotentialFieldLoss(num_classes, embedding_size, proxies_per_class=proxies_per_class, alpha=pf_alpha,
                                  delta=pf_delta)
    if name == "proxy_anchor":
        return ProxyAnchorLoss(num_classes, embedding_size)
    if name == "multi_similarity":
        return MultiSimilarityLoss()
    if name == "supcon":
        return SupConLoss()
    raise ValueError(f"dml={name!r} is not one of potential_field, proxy_anchor, multi_similarity, supcon")


def teacher_map(maps: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """alpha per rollout: rows ``maps [R, T, n]`` renormalized over n, averaged over masked tokens -> [R, n]."""
    rows = maps / maps.sum(-1, keepdim=True).clamp_min(1e-30)
    weights = token_mask.to(rows.dtype)
    return torch.einsum("rt,rtn->rn", weights, rows) / weights.sum(-1, keepdim=True)


def grpo_loss(hidden, lm_head_weight, completion_ids, completion_mask, advantages, *, temperature: float,
              num_tokens: int):
    """These completions' share of L_GRPO, as ``(loss, value)``.

    ``loss``: ``saga_kernels.grpo_loss`` ("dapo", ``num_items_in_batch = num_tokens``) on the log-probs of
    ``saga_kernels.linear_logprobs`` (what ``linear_grpo_loss`` composes); without old log-probs its ratio is
    exactly 1, so its gradient is that of METHOD.md's ``-sum_t m A log pi / (num_tokens / world_size)`` while its
    value is the surrogate at ratio 1 (~0, as TRL logs it). ``value``: METHOD.md's L_GRPO share itself (detached,
    float), what the run logs and plots. ``hidden [R, T, H]`` are the states predicting ``completion_ids [R, T]``;
    ``num_tokens`` is |T| of the whole step (every group, micro-batch and rank).
    """
    keep = completion_mask.bool()
    targets = torch.where(keep, completion_ids.to(torch.int64), -1)
    logprobs = saga_kernels.linear_logprobs(hidden, lm_head_weight, targets, temperature=temperature,
                                            ignore_index=-1)
    loss, _ = saga_kernels.grpo_loss(logprobs, completion_mask, advantages, num_items_in_batch=num_tokens)
    with torch.no_grad():
        weighted = torch.where(keep, advantages.to(logprobs.dtype)[:, None] * logprobs, 0.0)
        value = float(-weighted.sum() / (num_tokens / world_size()))
    return loss, value


def kl_loss(pooler, patches: dict, maps: dict, token_masks: dict, rows: torch.Tensor, *,
            num_rollouts: int) -> torch.Tensor:
    """These rollouts' share of L_KL: ``sum_rows sum_items KL(alpha || softmax(pooler logits)) / (num_rollouts /
    world_size)``.

    ``patches[name]``: image ``name``'s patch tokens X ``[n, D]`` (detached here: only the pooler learns);
    ``maps[name]``: attention ``[R, T, n]`` from each completion token to those patches; ``token_masks[name]``:
    ``[R, T]`` the tokens describing that image; ``rows [R]``: the rollouts that teach (r = 1). Rows whose
    attention underflowed to 0 on every patch teach nothing and are skipped.
    """
    terms = []
    for name, x in patches.items():
        tokens = token_masks[name]
        sel = rows & tokens.any(-1)
        if not sel.any():
            continue
        alpha = teacher_map(maps[name][sel].float(), tokens[sel])
        alpha = alpha[alpha.sum(-1) > 0]
        if alpha.shape[0] == 0:
            continue
        logits = pooler.logits(x.detach()[None]).expand(alpha.shape[0], -1)
        terms.append(saga_kernels.attention_kl(logits, alpha, reduction="sum"))
    if not terms:
        return torch.zeros((), device=rows.device)
    return torch.stack(terms).sum() / (num_rollouts / world_size())

