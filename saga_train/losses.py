"""The three SAGA losses, as glue around saga_kernels.

* L_DML (phase A): the chosen metric loss module on the batch embeddings.
* L_GRPO (phase C): ``-(1/|T|) sum_g sum_t A_g log pi(y_t^g | y_<t^g, S)`` from the frozen LLM's final
  hidden states via ``saga_kernels.linear_grpo_loss`` (the LM head never materializes logits).
* L_KL (phase C, rollouts with r = 1): ``KL(alpha_a || beta_a) + KL(alpha_b || beta_b)`` via
  ``saga_kernels.attention_kl``; alpha = the LLM's head-mean attention at one layer from the tokens
  describing an item to that item's patch tokens, renormalized over those patches and averaged over
  the tokens; beta = softmax of the pooler logits on detached X (only the pooler gets this gradient).
"""
import contextlib
from dataclasses import dataclass

import torch

import saga_kernels

from .prompts import ITEM_KEYS


def build_metric_loss(name: str, num_classes: int, embedding_size: int, proxies_per_class: int):
    """The saga_kernels nn.Module for ``--dml`` (proxy-based ones own their proxies)."""
    from saga_kernels import MultiSimilarityLoss, PotentialFieldLoss, ProxyAnchorLoss, SupConLoss

    if name == "potential_field":
        return PotentialFieldLoss(num_classes, embedding_size, proxies_per_class=proxies_per_class)
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


@dataclass
class ReplayResult:
    loss: torch.Tensor  # weighted contribution of this group (already scaled for accumulation)
    grpo: float
    kl: float
    kl_rollouts: int


def _image_positions(input_ids: torch.Tensor, image_token_id: int, tokens_per_image):
    """Positions of image a's and image b's placeholder tokens in a 1-row prompt."""
    pos = (input_ids[0] == image_token_id).nonzero().squeeze(-1)
    n_a = tokens_per_image[0]
    return pos[:n_a], pos[n_a:]


@contextlib.contextmanager
def _reuse_image_features(vlm, features):
    """Make ``vlm.get_image_features`` return ``features`` (the images encoded once, repeated for the
    G sequences) for the duration of the block. This works on every transformers version that has
    Qwen3-VL, unlike passing precomputed encoder outputs, which older versions silently ignore."""
    vlm.get_image_features = lambda *args, **kwargs: features
    try:
        yield
    finally:
        del vlm.get_image_features


def replay_forward(model, group, kl_layer: int | None = None):
    """Differentiable forward of tower -> frozen LLM over the group's G sequences (prompt + completion).

    Returns ``(hidden [G, T, H] at the positions that predict the completion tokens, (x_a, x_b),
    maps)``; ``maps`` (the ``AttentionProbe`` maps of layer ``kl_layer`` from the completion tokens to
    image a's / b's patch tokens, ``{"a": [G, T, n_a], "b": [G, T, n_b]}``) only when kl_layer is given.
    """
    inputs = group.inputs
    G, T = group.completion_ids.shape
    P = inputs["input_ids"].shape[1]
    grid = inputs["image_grid_thw"]
    image_out = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
    x_a, x_b = image_out.pooler_output  # each image encoded once, shared by all G sequences
    image_out.pooler_output = (x_a, x_b) * G
    # transformers < 5.24 returns one tensor per deepstack level, newer versions one tuple per image
    image_out.deepstack_features = [level.repeat(G, 1) if torch.is_tensor(level) else tuple(level) * G
                                    for level in image_out.deepstack_features]
    input_ids = torch.cat([inputs["input_ids"].expand(G, P), group.completion_ids], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"].expand(G, P), group.completion_mask.long()], dim=1)
    forward_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                          image_grid_thw=grid.repeat(G, 1), use_cache=False)
    if "mm_token_type_ids" in inputs:
        forward_kwargs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"].expand(G, P), torch.zeros_like(group.completion_ids, dtype=torch.int)], 1)
    maps = None
    if kl_layer is None:
        with _reuse_image_features(model.model, image_out):
            out = model.model(**forward_kwargs)
    else:
        from saga_kernels.integrations.hf import AttentionProbe

        pos_a, pos_b = _image_positions(inputs["input_ids"], model.config.image_token_id,
                                        [x_a.shape[0], x_b.shape[0]])
        steps = torch.arange(T, device=input_ids.device)
        # rows after a completion's end point at its first token instead (a valid, ignored query row)
        query_positions = torch.where(group.completion_mask, P + steps, P).expand(G, T)
        key_index = {"a": pos_a.expand(G, -1), "b": pos_b.expand(G, -1)}
        probe = AttentionProbe(model, layers=[kl_layer])
        with probe.capture(query_positions=query_positions, key_index=key_index), \
                _reuse_image_features(model.model, image_out):
            out = model.model(**forward_kwargs)
        maps = probe.maps[kl_layer]
    hidden = out.last_hidden_state[:, P - 1: P - 1 + T]
    return hidden, (x_a, x_b), maps


def replay_group(model, group, *, temperature: float, kl_layer: int, lambda_lm: float, lambda_kl: float,
                 pooler, token_weight: float, kl_weight: float) -> ReplayResult:
    """The group's share of ``lambda_lm L_GRPO + lambda_kl L_KL`` (token_weight = |T_group| / |T_step|,
    kl_weight = 1 / number of r = 1 rollouts with item tokens in the step); call ``.loss.backward()``."""
    kl_rows = group.rewards.to(group.completion_mask.device) == 1
    want_kl = lambda_kl > 0 and pooler is not None and kl_weight > 0 and bool(kl_rows.any())
    hidden, (x_a, x_b), maps = replay_forward(model, group, kl_layer if want_kl else None)
    grpo, _ = saga_kernels.linear_grpo_loss(
        hidden, model.lm_head.weight, group.completion_ids, group.completion_mask,
        group.advantages.to(hidden.device), temperature=temperature)
    total = lambda_lm * token_weight * grpo
    kl_value, kl_count = 0.0, 0
    if want_kl:
        kl_terms = []
        for name, item, x in (("a", ITEM_KEYS[0], x_a), ("b", ITEM_KEYS[1], x_b)):
            tokens = group.item_token_masks[item] & group.completion_mask
            rows = kl_rows & tokens.any(-1)
            if not rows.any():
                continue
            alpha = teacher_map(maps[name][rows].float(), tokens[rows])
            alpha = alpha[alpha.sum(-1) > 0]  # attention that underflowed to 0 on every patch teaches nothing
            if alpha.shape[0] == 0:
                continue
            logits = pooler.logits(x.detach()[None]).expand(alpha.shape[0], -1)
            kl_terms.append(saga_kernels.attention_kl(logits, alpha, reduction="sum"))
            kl_count = max(kl_count, alpha.shape[0])
        if kl_terms:
            kl = torch.stack(kl_terms).sum()
            total = total + lambda_kl * kl_weight * kl
            kl_value = float(kl.detach()) / max(kl_count, 1)
    return ReplayResult(loss=total, grpo=float(grpo.detach()), kl=kl_value, kl_rollouts=kl_count)
