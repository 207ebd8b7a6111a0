"""Phase B: sample G completions per image pair, reward the verdicts, keep pairs with signal.

Reward ``r_g = 1`` iff the parsed verdict equals ``1[y_a == y_b]`` (unparseable -> 0, counted).
Advantage ``A_g = (r_g - mean(r)) / (std(r) + eps)`` within the group. Groups whose rewards are all
equal carry no signal and are skipped (DAPO dynamic sampling); pairs keep being drawn until K
groups contribute or the per-step cap of drawn pairs is reached (the shortfall is reported).
"""
from dataclasses import dataclass, field

import torch

from . import verdict as verdict_lib
from .prompts import ITEM_KEYS

ADVANTAGE_EPS = 1e-4


@dataclass
class Group:
    """One pair's G rollouts and everything phase C needs to replay them."""

    same: bool
    inputs: dict  # processor outputs for the prompt with both images (batch of 1)
    completion_ids: torch.Tensor  # [G, T] (pad after the end of each completion)
    completion_mask: torch.Tensor  # [G, T] bool: generated tokens up to and including EOS
    texts: list
    verdicts: list  # True / False / None (unparseable)
    rewards: torch.Tensor  # [G] float
    advantages: torch.Tensor  # [G] float
    item_token_masks: dict = field(default_factory=dict)  # "item 1" -> [G, T] bool (r = 1 rollouts only)

    @property
    def contributes(self) -> bool:
        return bool(self.rewards.max() > self.rewards.min())


@dataclass
class RolloutStats:
    pairs_drawn: int = 0
    groups_kept: int = 0
    completions: int = 0
    rewarded: int = 0
    unparseable: int = 0
    shortfall: int = 0  # K minus the groups found when the cap was hit

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["reward_rate"] = self.rewarded / max(self.completions, 1)
        d["unparseable_rate"] = self.unparseable / max(self.completions, 1)
        return d


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """``(r - mean(r)) / (std(r) + eps)`` over the last dim (unbiased std, as TRL's GRPO)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def suppressed_token_ids(model) -> list:
    """Image / video / vision-delimiter tokens: never sampled in a completion."""
    cfg = model.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None})


def stop_token_ids(model, tokenizer) -> list:
    """EOS ids: the generation config's, the tokenizer's, and the chat template's ``<|im_end|>``."""
    ids = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


def completion_mask(completion_ids: torch.Tensor, stop_ids) -> torch.Tensor:
    """True for every token up to and including the first stop token of each row."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return ~after_stop


def token_char_ranges(tokenizer, ids) -> list:
    """``(start, end)`` of each token in ``decode(ids)``, by decoding growing prefixes."""
    ranges, prev = [], 0
    for t in range(len(ids)):
        cur = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
        ranges.append((prev, cur))
        prev = cur
    return ranges


def item_token_masks(tokenizer, ids, text: str) -> dict:
    """Per item key, a bool mask of the tokens inside the JSON value describing it (empty when absent)."""
    ranges = None
    masks = {}
    for item in ITEM_KEYS:
        mask = torch.zeros(len(ids), dtype=torch.bool)
        span = verdict_lib.item_span(text, item)
        if span is not None:
            ranges = ranges or token_char_ranges(tokenizer, ids)
            for t, (s, e) in enumerate(ranges):
                mask[t] = e > s and s < span[1] and e > span[0]
        masks[item] = mask
    return masks


@torch.no_grad()
def sample_group(model, processor, prompt: str, image_a, image_b, same: bool, *, verdict_key: str,
                 group_size: int, temperature: float, top_p: float, max_new_tokens: int,
                 need_item_masks: bool) -> Group:
    """Generate G completions for one pair (each image encoded once, reused by all G samples)."""
    tokenizer = processor.tokenizer
    device = model.device
    inputs = processor(text=[prompt], images=[image_a, image_b], return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out = model.generate(
        **inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=group_size, suppress_tokens=suppressed_token_ids(model), eos_token_id=stops,
        pad_token_id=pad,
    )
    completion_ids = out[:, inputs["input_ids"].shape[1]:]
    mask = completion_mask(completion_ids, stops)
    rows = [ids[m].tolist() for ids, m in zip(completion_ids, mask)]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    verdicts = [verdict_lib.parse_verdict(t, verdict_key) for t in texts]
    rewards = torch.tensor([float(v is not None and v == same) for v in verdicts])
    group = Group(same=same, inputs=inputs, completion_ids=completion_ids, completion_mask=mask, texts=texts,
                  verdicts=verdicts, rewards=rewards, advantages=group_advantages(rewards))
    if need_item_masks:
        masks = {item: torch.zeros_like(mask, device="cpu") for item in ITEM_KEYS}
        for g, (r, text) in enumerate(zip(rows, texts)):
            if rewards[g] == 1:
                for item, m in item_token_masks(tokenizer, r, text).items():
                    masks[item][g, : len(r)] = m
        group.item_token_masks = {item: m.to(mask.device) for item, m in masks.items()}
    return group


def collect_groups(model, processor, prompt: str, pair_batches, *, verdict_key: str, want: int, max_draws: int,
                   group_size: int, temperature: float, top_p: float, max_new_tokens: int,
                   need_item_masks: bool):
    """Draw pairs from ``pair_batches`` (an iterator of lists of ``(image_a, image_b, same)``) until
    ``want`` groups have reward variance or ``max_draws`` pairs were drawn. Returns (groups, stats)."""
    stats, groups = RolloutStats(), []
    for pairs in pair_batches:
        for image_a, image_b, same in pairs:
            if len(groups) >= want or stats.pairs_drawn >= max_draws:
                break
            group = sample_group(model, processor, prompt, image_a, image_b, same, verdict_key=verdict_key,
                                 group_size=group_size, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, need_item_masks=need_item_masks)
            stats.pairs_drawn += 1
            stats.completions += group_size
            stats.rewarded += int(group.rewards.sum())
            stats.unparseable += sum(v is None for v in group.verdicts)
            if group.contributes:
                groups.append(group)
        if len(groups) >= want or stats.pairs_drawn >= max_draws:
            break
    stats.groups_kept = len(groups)
    stats.shortfall = want - len(groups)
    return groups, stats
