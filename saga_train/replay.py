"""Phase C mechanics: replay a group's G completions WITH gradients, its shared prefix forwarded once.

A group is one image pair: the prompt ``S = [X_a, X_b, T_inst]`` (P tokens) and G sampled completions
``y^g`` (up to T tokens each). A full replay forwards G sequences of P + T tokens; here the prefix goes
through the model once and the completions run on top of its key/value cache:

    tower        X, deepstack = visual(pixel_values)                       both images, once, with grad
    prefix       h_0 .. h_{P-1}, K_l, V_l = LLM(embed(S), X at the image placeholders)     1 x P tokens
    completions  h'_0 .. h'_{n-1} = LLM(embed(y[:, :n]) | cache K_l, V_l)                  m x n tokens

``y_0`` is predicted by ``h_{P-1}`` (the prefix's last state) and ``y_t`` (t >= 1) by ``h'_{t-1}``, so
the last completion token is forwarded only when L_KL needs its attention row: P + G (T - 1) tokens
instead of G (P + T).

MRoPE positions: the prefix's 3-D positions come from transformers' own ``get_rope_index`` (text tokens
count up on all three axes; an image's tokens get (t, row, column) positions offset by the running
count, which then resumes at that offset + max(h, w)). The completions continue the way ``generate``
continues after its prefill (``rope_deltas`` + cache length): token t sits at ``max(prefix) + 1 + t``
on all three axes.

Gradients: the cache's K_l, V_l (post-RoPE, per layer) and ``h_{P-1}`` reach the completion pass as
leaf tensors. Each completion micro-batch (at most ``replay_tokens`` completion tokens, see
``micro_batches``) back-propagates into those leaves and frees its activations; one last backward
(``Prefix.backward``) sends the accumulated leaf gradients through the prefix pass into X, the
deepstack features and the tower. Up to fp32 summation order this is the gradient of a full replay.

transformers APIs used: ``Qwen3VLModel.get_rope_index`` (positions), ``model.model.visual`` (the
tower), ``model.model.language_model`` called with ``inputs_embeds`` / ``position_ids`` / a cache /
``visual_pos_masks`` / ``deepstack_visual_embeds`` (what ``Qwen3VLModel.forward`` passes it), and
``transformers.cache_utils.Cache`` built from two ``DynamicLayer`` subclasses whose ``update`` returns the
same states when a checkpointed decoder layer is recomputed in the backward (the recording one keeps only
the first states it sees, the prefix one stores nothing). That makes them safe under gradient
checkpointing, so the decoder layers are told through ``_can_checkpoint_with_cache`` to keep them
(transformers 5.17 and 5.24; without it they would drop the cache: ``caches_under_checkpointing``).
"""
import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import distributed as dist_lib
from .losses import grpo_loss, kl_loss
from .prompts import ITEM_KEYS
from .rollout import Group


@dataclass(frozen=True)
class ReplayOptions:
    """How phase C replays a group (fixed for a run). The log-probs are taken under the temperature each group
    was sampled at (``Group.temperature``)."""

    lambda_lm: float = 1.0  # weight of L_GRPO (0: no gradient through the LLM)
    lambda_kl: float = 0.0  # weight of L_KL (0: no attention probe)
    kl_layer: int = 0  # LLM layer whose attention teaches the pooler
    replay_tokens: int = 0  # completion tokens per forward (rows x longest completion); 0 = a whole group


@dataclass(frozen=True)
class StepCounts:
    """The step's normalizers, over every group of every rank (TRL's ``num_items_in_batch`` convention)."""

    completion_tokens: int  # |T|: L_GRPO = sum of token terms / |T|
    kl_rollouts: int  # right-verdict (r = 1) rollouts with item tokens: L_KL = sum of KL terms / this


def local_counts(groups) -> StepCounts:
    """This rank's completion tokens and teaching rollouts (right verdict, with item tokens) over ``groups``."""
    tokens = kl = 0
    for group in groups:
        mask = group.completion_mask.bool()
        tokens += int(mask.sum())
        if group.item_token_masks:
            described = torch.stack([(m.to(mask.device) & mask).any(-1) for m in group.item_token_masks.values()])
            kl += int((group.correct.to(mask.device) & described.any(0)).sum())
    return StepCounts(completion_tokens=tokens, kl_rollouts=kl)


@dataclass
class ReplayResult:
    """One group's contribution, already back-propagated: loss values and tokens forwarded."""

    grpo: float
    kl: float
    tokens: int  # tokens forwarded through the LLM (prefix once + completion micro-batches)
    micro_batches: int


# ------------------------------------------------------------------------------------------ caches
class _RecordingLayer(DynamicLayer):
    """Prefix pass: returns the key/value states as given and keeps the first ones (those autograd
    tracks); reports an empty cache, so the prefix is masked as an ordinary causal sequence."""

    def __init__(self):
        super().__init__()
        self.recorded = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.recorded is None:
            self.recorded = (key_states, value_states)
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """Completion pass: holds the prefix states ``[m, kv_heads, P, head_dim]``; ``update`` returns
    prefix ++ new states and stores nothing (the cache length stays P for the mask)."""

    def __init__(self, keys, values):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _cache_keyword(language_model) -> str:
    """The text model's cache argument: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def _reentrant(checkpoint_func) -> bool:
    """Whether a layer's ``_gradient_checkpointing_func`` (transformers: a ``functools.partial`` of torch's
    ``checkpoint``) runs reentrant checkpointing (``use_reentrant`` True, or left to torch's default, True)."""
    func = checkpoint_func
    while isinstance(func, functools.partial):
        if "use_reentrant" in func.keywords:
            return func.keywords["use_reentrant"] is not False
        func = func.func
    return func is torch.utils.checkpoint.checkpoint


@contextlib.contextmanager
def caches_under_checkpointing(language_model):
    """Let checkpointed decoder layers keep this module's caches (their ``update`` has no side effect).

    Raises ValueError for reentrant activation checkpointing: it tracks only tensors passed as arguments, and the
    prefix's keys/values reach the layers inside the cache object, so the tower's gradient would silently be wrong.
    """
    layers = [m for m in language_model.layers if getattr(m, "gradient_checkpointing", False)]
    if any(_reentrant(getattr(m, "_gradient_checkpointing_func", None)) for m in layers):
        raise ValueError("the LLM's decoder layers use reentrant activation checkpointing (use_reentrant=True, "
                         "torch's default): it does not track the prefix keys/values the replay hands over inside "
                         "the cache, so the tower's gradient would be wrong. Enable it with "
                         "gradient_checkpointing_kwargs={'use_reentrant': False} (what the trainer does)")
    if layers and not hasattr(type(layers[0]), "_can_checkpoint_with_cache"):
        raise RuntimeError("this transformers version drops caches in checkpointed layers (no "
                           "_can_checkpoint_with_cache); run with --no-grad-checkpointing")
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


# ------------------------------------------------------------------------------------------ the prefix
def prefix_positions(model, inputs: dict) -> torch.Tensor:
    """MRoPE positions ``[3, 1, P]`` of a prompt with images: transformers' ``get_rope_index``."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    return positions


@dataclass
class Prefix:
    """A group's image + prompt prefix after its one forward pass (see the module docstring)."""

    length: int  # P
    next_position: int  # max MRoPE position + 1: where the completions continue
    image_positions: dict  # "a" / "b" -> the prompt positions of that image's tokens
    patches: dict  # "a" / "b" -> X of that image, detached (the pooler's input for L_KL)
    keys: list  # per layer, leaf [1, kv_heads, P, head_dim]
    values: list
    last_hidden: torch.Tensor  # leaf [1, 1, D]: h_{P-1}, predicts completion token 0
    outputs: list  # the graph-carrying tensors behind the leaves (keys, values, last_hidden)

    def leaves(self) -> list:
        return [*self.keys, *self.values, self.last_hidden]

    def backward(self) -> None:
        """Send the gradients accumulated on the leaves through the prefix pass into X and the tower."""
        pairs = [(out, leaf.grad) for out, leaf in zip(self.outputs, self.leaves())
                 if leaf.grad is not None and out.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def forward_prefix(model, inputs: dict) -> Prefix:
    """Tower + LLM over the prompt (batch 1, unpadded), recording every layer's key/value states."""
    vlm, lm = model.model, model.model.language_model
    visual = vlm.visual
    grid = inputs["image_grid_thw"]
    tower = visual(inputs["pixel_values"].type(visual.dtype), grid_thw=grid, return_dict=True)
    x = tower.pooler_output  # [N_a + N_b, D]: both images' merged patch tokens
    input_ids = inputs["input_ids"]
    image_mask = input_ids == model.config.image_token_id
    if int(image_mask.sum()) != x.shape[0]:
        raise ValueError(f"the prompt has {int(image_mask.sum())} image tokens but the tower gave {x.shape[0]}")
    embeds = lm.embed_tokens(input_ids)
    embeds = embeds.masked_scatter(image_mask[..., None], x.to(embeds.dtype))
    positions = prefix_positions(model, inputs)
    layers = [_RecordingLayer() for _ in range(len(lm.layers))]
    out = _run_language_model(lm, layers, inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                              position_ids=positions, visual_pos_masks=image_mask,
                              deepstack_visual_embeds=list(tower.deepstack_features))
    keys = [layer.recorded[0] for layer in layers]
    values = [layer.recorded[1] for layer in layers]
    last = out.last_hidden_state[:, -1:]
    sizes = (grid.prod(-1) // visual.spatial_merge_size**2).tolist()
    where = image_mask[0].nonzero().squeeze(-1)
    outputs = [*keys, *values, last]
    leaves = [_leaf(t) for t in outputs]
    n_layers = len(keys)
    return Prefix(length=input_ids.shape[1], next_position=int(positions.max()) + 1,
                  image_positions=dict(zip("ab", where.split(sizes))),
                  patches=dict(zip("ab", x.detach().split(sizes))),
                  keys=leaves[:n_layers], values=leaves[n_layers:2 * n_layers], last_hidden=leaves[-1],
                  outputs=outputs)


def forward_completions(model, prefix: Prefix, token_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[m, n, D]`` of ``token_ids [m, n]`` on top of the prefix cache (``keep``: real tokens)."""
    lm = model.model.language_model
    m, n = token_ids.shape
    embeds = lm.embed_tokens(token_ids)
    attention_mask = torch.cat([keep.new_ones(m, prefix.length), keep], dim=1).long()
    steps = torch.arange(n, device=token_ids.device) + prefix.next_position
    positions = steps.view(1, 1, n).expand(3, m, n)
    layers = [_PrefixLayer(k.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1))
              for k, v in zip(prefix.keys, prefix.values)]
    return _run_language_model(lm, layers, inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=positions).last_hidden_state


def _run_language_model(lm, cache_layers, **inputs):
    """The text model on a ``Cache`` of ``cache_layers``. The cache is passed explicitly (the text model hands it
    to every layer and to the mask builder); ``use_cache=False`` only stops transformers from creating one of
    its own and from warning that caches and gradient checkpointing do not mix."""
    with caches_under_checkpointing(lm):
        return lm(use_cache=False, **inputs, **{_cache_keyword(lm): Cache(layers=cache_layers)})


# ------------------------------------------------------------------------------------------ a group
def micro_batches(lengths: torch.Tensor, budget: int, count: int = 0) -> list:
    """Row index lists of the completion micro-batches: longest first, each holding at most ``budget``
    tokens counted as rows x its longest completion (at least one row); ``budget`` 0 = all rows.
    ``count``: at least that many micro-batches (``split_batches``)."""
    if count > len(lengths):
        raise ValueError(f"count={count} micro-batches of {len(lengths)} rows")
    if budget <= 0:
        return split_batches([torch.arange(len(lengths))], count)
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    batches, current = [], []
    for row in order:
        longest = int(lengths[current[0]]) if current else int(lengths[row])
        if current and (len(current) + 1) * longest > budget:
            batches.append(torch.tensor(current))
            current = []
        current.append(row)
    batches.append(torch.tensor(current))
    return split_batches(batches, count)


def split_batches(batches: list, count: int) -> list:
    """``batches`` with the one holding the most rows halved until there are at least ``count`` (lockstep replay,
    where every rank runs as many micro-batches as the rank that needs the most). Splitting keeps every batch
    within the token budget it met."""
    batches = list(batches)
    if count > sum(len(b) for b in batches):
        raise ValueError(f"count={count} micro-batches of {sum(len(b) for b in batches)} rows")
    while len(batches) < count:
        k = max(range(len(batches)), key=lambda i: len(batches[i]))
        half = (len(batches[k]) + 1) // 2
        batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


@dataclass
class ReplayWork:
    """One group of a rank's replay and its completion micro-batches (row index tensors). ``teaches`` is False for
    a lockstep filler: its passes run, its losses are not counted."""

    group: Group
    batches: list
    teaches: bool = True


def replay_plan(groups: list, replay_tokens: int, *, dist=None, slots: int = 0, filler=None) -> list:
    """What this rank replays: each group with its micro-batches (``micro_batches`` with the ``replay_tokens``
    budget).

    Lockstep (``dist`` given: the LLM's decoder layers are sharded over its ranks, so every pass is a collective):
    every rank replays as many groups as the rank with the most (at most ``slots``), the k-th split into as many
    micro-batches as the most any rank needs for its k-th; a rank short of groups replays ``filler()`` groups
    (zero advantages: the same passes, no gradient), built once and only when needed.
    """
    natural = [micro_batches(g.completion_mask.sum(-1).cpu(), replay_tokens) for g in groups]
    if dist is None:
        return [ReplayWork(g, b) for g, b in zip(groups, natural)]
    counts = [n for n in dist_lib.all_max([len(b) for b in natural] + [0] * (slots - len(groups)), dist) if n]
    work = [ReplayWork(g, split_batches(b, n)) for g, b, n in zip(groups, natural, counts)]
    if len(counts) > len(groups):
        spare = filler()
        rows = torch.arange(spare.completion_mask.shape[0])
        work += [ReplayWork(spare, split_batches([rows], n), teaches=False) for n in counts[len(groups):]]
    return work


def replay_group(model, group, options: ReplayOptions, counts: StepCounts, pooler=None, batches=None,
                 lockstep: bool = False) -> ReplayResult:
    """``lambda_lm L_GRPO + lambda_kl L_KL`` of one group, back-propagated (gradients accumulate).

    L_GRPO's token terms are divided by ``counts.completion_tokens`` and L_KL's rollout terms by
    ``counts.kl_rollouts`` (each over the whole step), so summing the groups gives the step's losses.
    ``batches``: the completion micro-batches (``replay_plan``; default ``micro_batches`` with
    ``options.replay_tokens``). ``lockstep``: the LLM is sharded, so the passes run even when nothing is learned
    and every micro-batch forwards at least one completion token.
    """
    ids, mask = group.completion_ids, group.completion_mask.bool()
    device = ids.device
    rewarded = group.correct.to(device)  # the right-verdict rollouts teach L_KL (the paper's r = 1)
    item_masks = {name: group.item_token_masks[item].to(device) & mask
                  for name, item in zip("ab", ITEM_KEYS)} if group.item_token_masks else {}
    want_kl = (options.lambda_kl > 0 and pooler is not None and counts.kl_rollouts > 0 and bool(item_masks)
               and bool((rewarded & torch.stack([m.any(-1) for m in item_masks.values()]).any(0)).any()))
    want_lm = options.lambda_lm > 0 and counts.completion_tokens > 0
    if not (want_lm or want_kl or lockstep):
        return ReplayResult(0.0, 0.0, 0, 0)
    with torch.set_grad_enabled(want_lm):
        prefix = forward_prefix(model, group.inputs)
    grpo_total, kl_total, tokens = 0.0, 0.0, prefix.length
    if batches is None:
        batches = micro_batches(mask.sum(-1).cpu(), options.replay_tokens)
    for rows in batches:
        rows = rows.to(device)
        length = int(mask[rows].sum(-1).max())
        b_ids, b_mask = ids[rows, :length], mask[rows, :length]
        b_items = {name: m[rows, :length] for name, m in item_masks.items()}
        kl_rows = rewarded[rows] & torch.stack([m.any(-1) for m in b_items.values()]).any(0) if want_kl else None
        probe = want_kl and bool(kl_rows.any())
        # the last token predicts nothing: forwarded only when its attention row teaches the pooler (or, in
        # lockstep, when it is the only token: every rank then runs one completion pass per micro-batch)
        last = (probe and any(bool((m[:, -1] & kl_rows).any()) for m in b_items.values())) or (
            lockstep and length == 1)
        with torch.set_grad_enabled(want_lm):
            hidden, maps = completion_states(model, prefix, b_ids, b_mask, forward_last=last,
                                             kl_layer=options.kl_layer if probe else None)
        loss = hidden.new_zeros((), dtype=torch.float32)
        if want_lm:
            grpo, value = grpo_loss(hidden, model.lm_head.weight, b_ids, b_mask, group.advantages.to(device)[rows],
                                    temperature=group.temperature, num_tokens=counts.completion_tokens)
            loss = loss + options.lambda_lm * grpo
            grpo_total += value
        if probe:
            kl = kl_loss(pooler, prefix.patches, maps, b_items, kl_rows, num_rollouts=counts.kl_rollouts)
            loss = loss + options.lambda_kl * kl
            kl_total += float(kl.detach())
        if loss.requires_grad:
            loss.backward()
        tokens += len(rows) * (length if last else length - 1)
    if want_lm:
        prefix.backward()
    return ReplayResult(grpo=grpo_total, kl=kl_total, tokens=tokens, micro_batches=len(batches))


def completion_states(model, prefix: Prefix, completion_ids, completion_mask, *, kl_layer=None,
                      forward_last: bool = False):
    """``(hidden [m, T, D], maps)``: the states predicting ``completion_ids [m, T]`` on top of the prefix.

    Completion token 0 is predicted by the prefix's last state; tokens ``0..T-2`` are forwarded (``T-1``
    too with ``forward_last``). ``maps`` (when ``kl_layer`` is given): the ``AttentionProbe`` maps of that
    layer from each completion token's query row to image a's / b's patch tokens, ``{"a": [m, T, n_a],
    "b": [m, T, n_b]}``; rows that were not forwarded or follow a completion's end are not meaningful.
    """
    m, length = completion_ids.shape
    n_in = length if forward_last else length - 1
    token_ids, keep = completion_ids[:, :n_in], completion_mask[:, :n_in].bool()
    first = prefix.last_hidden.expand(m, 1, -1)
    if n_in == 0:
        return first, None
    maps = None
    if kl_layer is None:
        out = forward_completions(model, prefix, token_ids, keep)
    else:
        from saga_kernels.integrations.hf import AttentionProbe

        steps = torch.arange(length, device=token_ids.device)
        forwarded = torch.zeros(m, length, dtype=torch.bool, device=token_ids.device)
        forwarded[:, :n_in] = keep
        # rows not forwarded (or after a completion's end) point at the first completion token: valid, ignored
        query_positions = torch.where(forwarded, prefix.length + steps, prefix.length)
        key_index = {name: pos.expand(m, -1) for name, pos in prefix.image_positions.items()}
        probe = AttentionProbe(model, layers=[kl_layer])
        with probe.capture(query_positions=query_positions, key_index=key_index):
            out = forward_completions(model, prefix, token_ids, keep)
        maps = probe.maps[kl_layer]
    return torch.cat([first, out[:, : length - 1]], dim=1), maps
