"""Phase C written the plain way: the oracle of ``replay.py`` and the path it replaced (tests and the step benchmark).

Every rollout is its own sequence (prompt ++ completion), the groups in ONE left-padded batch (or a batch per
group) through ``model.model`` with the pixel values repeated per sequence (transformers computes the MRoPE
positions and places the image features); log-probs come from full logits under the temperature each group was
sampled at; the teacher attention of L_KL is read from eager attention weights at ``kl_layer``. No cache, no shared
prefix, no kernel of this project: what ``replay.replay_group`` must equal (in float64 it is the gold, in the
inputs' dtype the peer of the tolerance rule).

    L_GRPO = -(1 / |T|) sum_rows sum_t m A log pi(y_t)          (METHOD.md; its value and its gradient)
    L_KL   = (1 / #rollouts) sum_{r = 1 rows, items} KL(alpha_item || softmax(pooler logits of the item's patches))
"""
import contextlib

import torch

from .losses import teacher_map
from .prompts import ITEM_KEYS


@contextlib.contextmanager
def eager_attention_weights(model, layer: int):
    """Inside the block the text model runs eager attention; ``weights["w"]`` holds layer ``layer``'s head-averaged
    attention weights ``[B, L, L]`` of the last forward."""
    config = model.config.get_text_config(decoder=True)
    weights = {}
    handle = model.model.language_model.layers[layer].self_attn.register_forward_hook(
        lambda mod, args, result: weights.__setitem__("w", result[1].mean(1)))
    original, config._attn_implementation = config._attn_implementation, "eager"
    try:
        yield weights
    finally:
        config._attn_implementation = original
        handle.remove()


def full_replay(model, groups, pooler, counts, *, kl_layer: int, lambda_lm: float = 1.0, lambda_kl: float = 1.0,
                one_batch: bool = True):
    """``lambda_lm L_GRPO + lambda_kl L_KL`` over ``groups`` (module docstring), BACK-PROPAGATED (gradients accumulate;
    inside the eager-attention block, so that a checkpointed layer recomputes what it ran); returns the detached
    ``(loss, GRPO sum, KL sum)``, the sums un-normalized; ``counts`` (``replay.StepCounts``) gives the normalizers.
    ``one_batch=False`` forwards each group as its own batch (no left padding)."""
    loss, grpo, kl = 0.0, 0.0, 0.0
    for batch in ([groups] if one_batch else [[g] for g in groups]):
        with eager_attention_weights(model, kl_layer) as weights:
            g_sum, k_sum = _full_replay_batch(model, batch, pooler, weights, want_kl=lambda_kl > 0)
            part = lambda_lm * g_sum / max(counts.completion_tokens, 1) + lambda_kl * k_sum / max(counts.kl_rollouts, 1)
            if part.requires_grad:
                part.backward()
        loss, grpo, kl = loss + part.detach(), grpo + g_sum.detach(), kl + k_sum.detach()
    return loss, grpo, kl


def _full_replay_batch(model, groups, pooler, weights, want_kl):
    rows = [(group, g) for group in groups for g in range(group.completion_ids.shape[0])]
    prompt_len = max(group.inputs["input_ids"].shape[1] for group in groups)
    T = max(group.completion_ids.shape[1] for group in groups)
    device = groups[0].completion_ids.device
    pad = 0
    ids, attn, mm, pixels, grids = [], [], [], [], []
    for group, g in rows:
        p_ids = group.inputs["input_ids"][0]
        left = prompt_len - len(p_ids)
        zeros = torch.zeros(left, dtype=torch.long, device=device)
        c_ids = torch.nn.functional.pad(group.completion_ids[g], (0, T - group.completion_ids.shape[1]), value=pad)
        c_mask = torch.nn.functional.pad(group.completion_mask[g].long(), (0, T - group.completion_mask.shape[1]))
        ids.append(torch.cat([zeros + pad, p_ids, c_ids]))
        attn.append(torch.cat([zeros, group.inputs["attention_mask"][0], c_mask]))
        mm.append(torch.cat([zeros, group.inputs["mm_token_type_ids"][0].long(),
                             torch.zeros(T, dtype=torch.long, device=device)]))
        pixels.append(group.inputs["pixel_values"])
        grids.append(group.inputs["image_grid_thw"])
    ids = torch.stack(ids)
    dtype = next(model.model.language_model.parameters()).dtype
    out = model.model(input_ids=ids, attention_mask=torch.stack(attn), mm_token_type_ids=torch.stack(mm),
                      pixel_values=torch.cat(pixels).to(model.model.visual.dtype), image_grid_thw=torch.cat(grids),
                      use_cache=False)
    hidden = out.last_hidden_state[:, prompt_len - 1: prompt_len - 1 + T]
    grpo = hidden.new_zeros((), dtype=torch.float32 if dtype != torch.float64 else dtype)
    kl = grpo.clone()
    for b, (group, g) in enumerate(rows):
        n = group.completion_ids.shape[1]
        keep = group.completion_mask[g].bool()
        logp = torch.log_softmax(model.lm_head(hidden[b, :n]).to(grpo.dtype) / group.temperature, dim=-1)
        lp = logp.gather(-1, group.completion_ids[g, :, None])[:, 0]
        grpo = grpo - (lp * group.advantages[g].to(lp))[keep].sum()  # METHOD.md's L_GRPO: its value and gradient
        if not want_kl or group.rewards[g] != 1 or not group.item_token_masks:
            continue
        image_cols = (ids[b] == model.config.image_token_id).nonzero()[:, 0].chunk(2)
        x = model.model.visual(group.inputs["pixel_values"].to(model.model.visual.dtype),
                               grid_thw=group.inputs["image_grid_thw"],
                               return_dict=True).pooler_output.detach().chunk(2)
        for item, cols, patches in zip(ITEM_KEYS, image_cols, x):
            tokens = group.item_token_masks[item][g].bool() & keep
            if not tokens.any():
                continue
            attention = weights["w"][b, prompt_len + torch.arange(n, device=device)][:, cols].detach()  # a teacher
            alpha = teacher_map(attention[None], tokens[None])[0].to(grpo.dtype)
            log_q = torch.log_softmax(pooler.logits(patches[None])[0].to(grpo.dtype), -1)
            kl = kl + torch.where(alpha > 0, alpha * (alpha.log() - log_q), 0.0).sum()
    return grpo, kl


__all__ = ["eager_attention_weights", "full_replay"]
