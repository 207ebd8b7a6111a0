"""Phase B mechanics: sample G completions for every pair of a draw in ONE ``generate`` call, reward them.

``sample_groups(model, tokenizer, pair_inputs, sames, options)`` takes the processor outputs of P pairs
(``pair_inputs``: one batch-1 dict per pair, built by ``pair_inputs``), left-pads them into one batch when
their lengths differ, and generates ``P x G`` sequences at once (on a GPU decoding is latency-bound: one
call of P x G sequences costs little more than one call of G). Each pair's two images go through the vision
tower once, whatever the transformers version does with ``num_return_sequences`` (``encode_images_once``).

Without ``seeds`` the completions sample from the global RNG (``generate(do_sample=True)``), so what a pair
gets depends on the other pairs of the call. With ``seeds`` (one int per pair; the trainer's choice) every
completion has its own ``torch.Generator`` (``SeededSampling``: temperature, top-p and the Gumbel-max
trick pick the token, an exact sample of the same distribution): a pair's completions are a function of its
seed and its own logits, whichever call, batch or rank samples it (the same up to the round-off of a
different batch shape).

Reward (``SamplingOptions.reward``): the paper's verdict reward ``r_g = 1`` iff the parsed verdict equals
``1[y_a == y_b]`` (unparseable -> 0, counted), or, where the dataset knows the attributes the answer names, the
attribute reward ``AttributeReward`` (the verdict's reward plus the fraction of attributes described right).
``shuffle_rewards`` (a control) permutes each group's rewards with the pair's own seed.
Advantage ``A_g = (r_g - mean(r)) / (std(r) + eps)`` within the group. Groups whose rewards are all
equal carry no signal (``Group.contributes`` is False); the trainer's ``phase_b`` keeps drawing until
K groups contribute or its cap of drawn pairs is reached (DAPO dynamic sampling), counting in
``RolloutStats``.
"""
import contextlib
import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import verdict as verdict_lib
from .model import suppressed_token_ids
from .prompts import ITEM_KEYS

ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class SamplingOptions:
    """How phase B samples: G, the sampling distribution, the answer length and what to parse."""

    group_size: int  # G completions per pair
    temperature: float
    top_p: float
    max_new_tokens: int
    verdict_key: str  # the JSON key holding "yes" / "no"
    item_masks: bool = False  # find the tokens describing item 1 / item 2 (for L_KL) in right-verdict rollouts
    shuffle_rewards: bool = False  # control: permute each group's rewards (the signal gone, the variance kept)


@dataclass
class Group:
    """One pair's G rollouts and everything phase C needs to replay them."""

    same: bool
    inputs: dict  # the pair's own processor outputs (batch of 1, no padding): the shared prefix
    completion_ids: torch.Tensor  # [G, T] (pad after the end of each completion; T = the longest completion)
    completion_mask: torch.Tensor  # [G, T] bool: generated tokens up to and including EOS
    texts: list
    verdicts: list  # True / False / None (unparseable)
    rewards: torch.Tensor  # [G] float
    advantages: torch.Tensor  # [G] float
    temperature: float = 1.0  # of the distribution the completions were sampled from (replay scores them under it)
    item_token_masks: dict = field(default_factory=dict)  # "item 1" -> [G, T] bool (right-verdict rollouts only)
    kind: str = ""  # the pair's kind (data.samplers.PAIR_KINDS), set by the trainer for its statistics

    @property
    def correct(self) -> torch.Tensor:
        """``[G]`` bool: the completion's verdict is right (what the paper's reward is 1 for; L_KL's teachers)."""
        return torch.tensor([v is not None and v == self.same for v in self.verdicts], device=self.rewards.device)

    @property
    def contributes(self) -> bool:
        return bool(self.rewards.max() > self.rewards.min())


@dataclass
class RolloutStats:
    """Phase B's counts for one step (summed over ranks and steps by the trainer's bookkeeping)."""

    pairs_drawn: int = 0  # pairs sampled (a draw is sampled whole)
    groups_contributing: int = 0  # sampled groups with reward variance
    groups_kept: int = 0  # contributing groups handed to phase C (at most K)
    completions: int = 0
    rewarded: int = 0  # completions with the right verdict
    reward_total: float = 0.0  # sum of the rewards (= rewarded for the verdict reward)
    unparseable: int = 0
    shortfall: int = 0  # K minus the groups kept when the cap was hit
    generate_calls: int = 0
    # the same three counts by pair kind (data.samplers.PAIR_KINDS)
    pairs_drawn_same: int = 0
    pairs_drawn_one_attribute: int = 0
    pairs_drawn_different: int = 0
    groups_contributing_same: int = 0
    groups_contributing_one_attribute: int = 0
    groups_contributing_different: int = 0
    groups_kept_same: int = 0
    groups_kept_one_attribute: int = 0
    groups_kept_different: int = 0

    @classmethod
    def counts(cls) -> tuple:
        """The field names: every count the trainer logs and sums."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def add(self, groups) -> None:
        """Count one draw's sampled groups."""
        self.generate_calls += 1
        for group in groups:
            self.pairs_drawn += 1
            self.groups_contributing += int(group.contributes)
            self.completions += len(group.verdicts)
            self.rewarded += int(group.correct.sum())
            self.reward_total += float(group.rewards.sum())
            self.unparseable += sum(v is None for v in group.verdicts)
            if group.kind:
                self._count(f"pairs_drawn_{group.kind}")
                if group.contributes:
                    self._count(f"groups_contributing_{group.kind}")

    def keep(self, groups) -> None:
        """Count the groups handed to phase C."""
        self.groups_kept = len(groups)
        for group in groups:
            if group.kind:
                self._count(f"groups_kept_{group.kind}")

    def _count(self, name: str) -> None:
        if not hasattr(self, name):
            raise ValueError(f"unknown pair kind in {name!r}")
        setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reward_rate"] = self.rewarded / max(self.completions, 1)
        d["reward_mean"] = self.reward_total / max(self.completions, 1)
        d["unparseable_rate"] = self.unparseable / max(self.completions, 1)
        return d


def verdict_reward(verdict, same: bool) -> float:
    """The paper's reward: 1.0 iff the parsed verdict equals ``same`` (unparseable, None: 0.0)."""
    return float(verdict is not None and verdict == same)


@dataclass(frozen=True)
class AttributeReward:
    """The attribute-aware reward of one pair (an extension beyond the paper, which rewards the verdict only)::

        r = 1[verdict == same] + (1 / 2A) * sum over items i in {1, 2} and attributes a of 1[read_i(a) == truth_i(a)]

    in [0, 2]: the verdict's reward plus the fraction of the 2A attribute values the answer describes right (an
    attribute not read counts as wrong). ``truths``: the two classes' ``{attribute: value}`` (what the dataset knows);
    ``read``: ``text -> {"item 1": {attribute: value | None}, "item 2": {...}}`` (for the synthetic world
    ``saga_train.synthetic.answers.parse_answer``). Values compare as stripped lowercase strings.
    """

    same: bool
    truths: tuple  # ({attribute: value} of item 1, of item 2)
    read: Callable

    def __call__(self, text: str, verdict) -> float:
        right = [ok for item in verdict_lib.attributes_right(self.read(text), self.truths) for ok in item]
        return verdict_reward(verdict, self.same) + sum(right) / max(len(right), 1)


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """``(r - mean(r)) / (std(r) + eps)`` over the last dim (unbiased std, as TRL's GRPO)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


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
    """``(start, end)`` of each token in ``decode(ids, skip_special_tokens=True)``.

    Streamed in O(T) with tokenizers' ``DecodeStream`` (a token that ends inside a multi-byte character gets
    an empty range, the one completing it the whole character) when the streamed pieces add up to the full
    decode; otherwise by decoding growing prefixes, O(T^2) decode calls (~1,000 per 1,000-token answer).
    """
    streamed = _streamed_ranges(tokenizer, ids)
    if streamed is not None:
        return streamed
    ranges, prev = [], 0
    for t in range(len(ids)):
        cur = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
        ranges.append((prev, cur))
        prev = cur
    return ranges


def _streamed_ranges(tokenizer, ids):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    if backend is None:
        return None
    stream = DecodeStream(skip_special_tokens=True)
    ranges, pieces, pos = [], [], 0
    for token in ids:
        try:
            piece = stream.step(backend, int(token)) or ""
        except Exception:  # noqa: BLE001 -- e.g. an id the vocabulary lacks: decode the slow way
            return None
        pieces.append(piece)
        ranges.append((pos, pos + len(piece)))
        pos += len(piece)
    return ranges if "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) else None


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


# ------------------------------------------------------------------------------------------ inputs
def mm_token_types(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's ``mm_token_type_ids`` (0 text, 1 image, 2 video) from the placeholder tokens."""
    cfg = model.config
    return ((input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int())


def pair_inputs(model, processor, prompt: str, image_a, image_b) -> dict:
    """The processor's tensors for one pair (batch 1, on the model's device), with ``mm_token_type_ids``."""
    out = processor(text=[prompt], images=[image_a, image_b], return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in out.items() if isinstance(v, torch.Tensor)}
    if "mm_token_type_ids" not in inputs:  # processors that do not return it: derive it (get_rope_index needs it)
        inputs["mm_token_type_ids"] = mm_token_types(model, inputs["input_ids"])
    return inputs


def left_pad(inputs_list, pad_id: int) -> dict:
    """Batch per-pair inputs: token tensors padded on the LEFT to the longest prompt, images concatenated."""
    length = max(x["input_ids"].shape[1] for x in inputs_list)
    fill = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}
    batch = {}
    for key, value in fill.items():
        rows = []
        for x in inputs_list:
            t = x[key]
            pad = t.new_full((1, length - t.shape[1]), value)
            rows.append(torch.cat([pad, t], dim=1))
        batch[key] = torch.cat(rows)
    batch["pixel_values"] = torch.cat([x["pixel_values"] for x in inputs_list])
    batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in inputs_list])
    return batch


def _repeat_per_sample(items, per_sample: int, copies: int) -> list:
    """``[s0 images, s1 images, ...]`` -> each sample's images repeated ``copies`` times, samples in order."""
    out = []
    for start in range(0, len(items), per_sample):
        out.extend(list(items[start:start + per_sample]) * copies)
    return out


@contextlib.contextmanager
def encode_images_once(vlm, pixels: torch.Tensor, grid: torch.Tensor, samples: int, copies: int):
    """Inside the block, ``generate(..., num_return_sequences=copies)`` runs the tower once per image.

    ``pixels`` / ``grid``: the batch's ``pixel_values`` / ``image_grid_thw`` (``samples`` prompts).
    transformers >= 5.24 encodes the images before it expands the batch (``mm_encoder_outputs``):
    nothing to do. Older versions (5.17) repeat ``pixel_values`` ``copies`` times per sample and encode
    every copy; the wrapper then encodes the original images once and repeats the features per sample
    (pooled tokens and deepstack features, in the version's own layout).
    """
    original = vlm.get_image_features
    per_sample = grid.shape[0] // samples

    @functools.wraps(original)  # generate reads the signature to find the encoder's inputs
    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        if copies == 1 or pixel_values.shape[0] != pixels.shape[0] * copies:
            return original(pixel_values, image_grid_thw, **kwargs)
        out = original(pixels, grid, **kwargs)
        out.pooler_output = tuple(_repeat_per_sample(out.pooler_output, per_sample, copies))
        sizes = (grid.prod(-1) // vlm.visual.spatial_merge_size**2).tolist()
        levels = []
        for level in out.deepstack_features:
            if torch.is_tensor(level):  # 5.17: one tensor per level over all images
                levels.append(torch.cat(_repeat_per_sample(torch.split(level, sizes), per_sample, copies)))
            else:  # one tuple of per-image tensors per level
                levels.append(tuple(_repeat_per_sample(level, per_sample, copies)))
        out.deepstack_features = levels
        return out

    vlm.get_image_features = get_image_features
    try:
        yield
    finally:
        del vlm.get_image_features


# ------------------------------------------------------------------------------------------ sampling
def mix_seed(*values) -> int:
    """A 63-bit seed that is a hash of ``values`` (ints and strings; distinct tuples give unrelated streams)."""
    digest = hashlib.blake2b("/".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampling(LogitsProcessor):
    """Sampling with one generator per sequence, as the last logits processor of ``generate``.

    Scores are divided by the temperature, the top-p nucleus is kept (transformers' ``TopPLogitsWarper``:
    the smallest set of most likely tokens whose probability exceeds ``top_p``, at least one), and
    Gumbel(0, 1) noise from the sequence's own generator is added; the argmax is a sample of
    ``softmax(top_p(logits / temperature))`` (the Gumbel-max trick). The processor returns that choice
    as the only finite score, so ``generate``'s own draw (``do_sample=True``: greedy decoding refuses
    ``num_return_sequences``) has nothing left to choose. Runs after ``suppress_tokens``, whose -inf it keeps.
    """

    def __init__(self, seeds, temperature: float, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                               for g in self.generators])
        choice = (scores - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)  # u = 0: -inf, never chosen
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


@torch.no_grad()
def sample_groups(model, tokenizer, pair_inputs_list, sames, options: SamplingOptions, seeds=None,
                  synced_gpus: bool = False, rewards=None) -> list:
    """One ``generate`` call for all pairs: ``len(pairs) x G`` sequences -> one Group per pair (in order).

    ``seeds``: one int per pair; completion g of pair p then samples from its own generator seeded with
    ``mix_seed("completion", seeds[p], g)`` (see the module docstring), and ``options.shuffle_rewards`` permutes
    with ``mix_seed("shuffle", seeds[p])``. None: the global RNG.
    ``synced_gpus``: every rank keeps decoding until all ranks are done (the LLM's layers are sharded).
    ``rewards``: one ``(text, verdict) -> float`` per pair (e.g. ``AttributeReward``); None: ``verdict_reward``.
    """
    if len(pair_inputs_list) != len(sames) or any(x is not None and len(x) != len(sames) for x in (seeds, rewards)):
        raise ValueError(f"pair_inputs_list has {len(pair_inputs_list)} pairs, sames {len(sames)}"
                         + ("" if seeds is None else f", seeds {len(seeds)}")
                         + ("" if rewards is None else f", rewards {len(rewards)}"))
    if not pair_inputs_list:
        return []
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    batch = left_pad(pair_inputs_list, pad)
    G = options.group_size
    if seeds is None:
        sampling = dict(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=0)
    else:
        rows = [mix_seed("completion", seed, g) for seed in seeds for g in range(G)]  # generate's order: pair-major
        sampler = SeededSampling(rows, options.temperature, options.top_p, batch["input_ids"].device)
        sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                        logits_processor=LogitsProcessorList([sampler]))
    with encode_images_once(model.model, batch["pixel_values"], batch["image_grid_thw"], len(sames), G):
        out = model.generate(
            **batch, **sampling, max_new_tokens=options.max_new_tokens, num_return_sequences=G,
            suppress_tokens=suppressed_token_ids(model), eos_token_id=stops, pad_token_id=pad,
            synced_gpus=synced_gpus)
    completions = out[:, batch["input_ids"].shape[1]:]
    masks = completion_mask(completions, stops)
    return [_make_group(tokenizer, inputs, same, completions[p * G:(p + 1) * G], masks[p * G:(p + 1) * G], options,
                        reward=None if rewards is None else rewards[p], seed=None if seeds is None else seeds[p])
            for p, (inputs, same) in enumerate(zip(pair_inputs_list, sames))]


def shuffled(rewards: torch.Tensor, seed) -> torch.Tensor:
    """``rewards`` permuted (the shuffled-reward control): by a generator seeded with ``mix_seed("shuffle", seed)``,
    or by the global RNG when ``seed`` is None."""
    generator = None if seed is None else torch.Generator().manual_seed(mix_seed("shuffle", seed))
    return rewards[torch.randperm(len(rewards), generator=generator)]


def _make_group(tokenizer, inputs: dict, same: bool, completion_ids, mask, options: SamplingOptions, *,
                reward=None, seed=None) -> Group:
    """Decode, parse and reward one pair's G completions (trimmed to the group's longest completion)."""
    length = max(int(mask.sum(-1).max()), 1)
    completion_ids, mask = completion_ids[:, :length], mask[:, :length]
    rows = [ids[m].tolist() for ids, m in zip(completion_ids, mask)]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    verdicts = [verdict_lib.parse_verdict(t, options.verdict_key) for t in texts]
    if reward is None:
        rewards = torch.tensor([verdict_reward(v, same) for v in verdicts])
    else:
        rewards = torch.tensor([float(reward(t, v)) for t, v in zip(texts, verdicts)])
    if options.shuffle_rewards:
        rewards = shuffled(rewards, seed)
    group = Group(same=same, inputs=inputs, completion_ids=completion_ids, completion_mask=mask, texts=texts,
                  verdicts=verdicts, rewards=rewards, advantages=group_advantages(rewards),
                  temperature=options.temperature)
    if options.item_masks:
        correct = group.correct
        item_masks = {item: torch.zeros_like(mask, device="cpu") for item in ITEM_KEYS}
        for g, (r, text) in enumerate(zip(rows, texts)):
            if correct[g]:
                for item, m in item_token_masks(tokenizer, r, text).items():
                    item_masks[item][g, : len(r)] = m
        group.item_token_masks = {item: m.to(mask.device) for item, m in item_masks.items()}
    return group


def filler_group(model, processor, prompt: str, options: SamplingOptions, image_size: int) -> Group:
    """A group that teaches nothing (zero advantages and rewards) but runs the passes of a real one: blank
    images, the run's prompt, G two-token completions. Lockstep replay gives it to a rank short of groups."""
    from PIL import Image

    blank = Image.new("RGB", (image_size, image_size))
    eos = processor.tokenizer.eos_token_id
    g = options.group_size
    zeros = torch.zeros(g)
    return Group(same=False, inputs=pair_inputs(model, processor, prompt, blank, blank),
                 completion_ids=torch.full((g, 2), eos, device=model.device),
                 completion_mask=torch.ones(g, 2, dtype=torch.bool, device=model.device),
                 texts=[""] * g, verdicts=[None] * g, rewards=zeros, advantages=zeros, temperature=options.temperature)
