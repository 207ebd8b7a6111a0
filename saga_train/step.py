"""One SAGA step (METHOD.md): phase A (embed the batch, lambda_dml L_DML), phase B (draw pairs, sample G
completions per pair, keep the groups with reward variance: rollout.py), phase C (replay the kept groups with
gradients, each prefix once: replay.py), then clip, optimizer and schedule step.

Phase B's pairs (``--pair-sampling``): "balanced", the paper's (random same / different pairs of the batch, later
draws from the train split), or "hard" (``data.samplers.sample_hard_pairs`` on the batch's current embeddings, every
draw from the batch). Its reward (``--reward``): "verdict", the paper's, or "attributes" (``rollout.AttributeReward``,
where the dataset knows its classes' attributes).

Determinism: the step's pairs and completions are a pure function of ``(seed, step)`` (``step_seed``,
``pair_seed``), the same on every rank and world size (distributed.py).
"""
import dataclasses
from dataclasses import dataclass

import torch

from . import distributed as dist_lib
from .components import Components, autocast
from .config import ConfigError
from .data.samplers import pair_kind, sample_hard_pairs, sample_pairs
from .data.stream import Batch
from .model import llm_num_layers, resolve_kl_layer, square_rgb
from .prompts import pair_prompt, prompt_spec
from .replay import ReplayOptions, StepCounts, local_counts, replay_group, replay_plan
from .rollout import (
    AttributeReward,
    RolloutStats,
    SamplingOptions,
    filler_group,
    mix_seed,
    pair_inputs,
    sample_groups,
)
from .sources import answer_reader


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def pair_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the step's ``index``-th drawn pair (the same on every rank and world size)."""
    return mix_seed("pair", seed, step, index)


@dataclass(frozen=True)
class StepPlan:
    """What phases B and C need at every step, fixed for a run."""

    prompt: str
    sampling: SamplingOptions
    replay: ReplayOptions
    want: int  # K: contributing groups the step buffers (over all ranks)
    max_draws: int  # cap on the pairs the step samples (over all ranks)
    lockstep: bool = False  # the LLM's layers are sharded: every rank runs the same LLM passes
    hard_pairs: bool = False  # pairs mined with the current embedding (data.samplers.sample_hard_pairs)
    read_answer: object = None  # text -> described attributes, for the attribute reward (None: the verdict reward)


def step_plan(comps: Components) -> StepPlan | None:
    """The run's phase B / C settings; None when neither L_GRPO nor L_KL is on (no rollouts)."""
    cfg = comps.cfg
    lockstep = cfg.shard_llm and comps.dist.enabled
    kl = cfg.lambda_kl > 0 and cfg.pooler == "attention"
    if not (cfg.lambda_lm > 0 or kl):
        return None
    read = None
    if cfg.reward == "attributes":
        read = answer_reader(cfg, comps.train_set)
        if read is None:
            raise ConfigError(f"reward='attributes' checks the attributes an answer describes, which needs a dataset "
                              f"that knows its classes' attributes (the synthetic world); dataset={cfg.dataset!r} "
                              "does not: use reward='verdict'")
    spec = prompt_spec(cfg.dataset, comps.train_set)
    kl_layer = resolve_kl_layer(cfg.kl_layer, llm_num_layers(comps.model))
    return StepPlan(
        prompt=pair_prompt(comps.processor, spec, cfg.prompt),
        sampling=SamplingOptions(group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, verdict_key=spec.verdict_key, item_masks=kl,
                                 shuffle_rewards=cfg.shuffle_rewards),
        replay=ReplayOptions(lambda_lm=cfg.lambda_lm, lambda_kl=cfg.lambda_kl if kl else 0.0, kl_layer=kl_layer,
                             replay_tokens=cfg.replay_tokens),
        want=cfg.contributing_pairs, max_draws=cfg.max_pair_draws, lockstep=lockstep,
        hard_pairs=cfg.pair_sampling == "hard", read_answer=read)


def phase_a(comps: Components, batch: Batch) -> float:
    """Embed this rank's slice of the batch, all-gather the embeddings (this rank's rows keep their graph),
    and back-propagate lambda_dml * L_DML of the WHOLE batch (distributed.py: the scaling)."""
    cfg = comps.cfg
    if cfg.lambda_dml <= 0:
        return 0.0
    mine = dist_lib.batch_slice(len(batch.labels), comps.dist)
    if mine.stop > mine.start:
        with autocast(comps.device, cfg):
            z, _, _ = comps.embedder(**comps.embedder.pixel_inputs(batch.images[mine]))
        z = z.float()
    else:  # more ranks than images: this rank embeds nothing, but still takes part (and feeds the proxies)
        z = torch.zeros(0, cfg.embedding_size, device=comps.device)
    z, labels = dist_lib.gather_rows(z, torch.tensor(batch.labels[mine], device=comps.device), comps.dist)
    loss = comps.metric_loss(z, labels)
    if loss.requires_grad:  # not on a rank with no rows and a loss without proxies
        (cfg.lambda_dml * loss).backward()
    return float(loss.detach())


def pair_rewards(plan: StepPlan, dataset, labels: list) -> list | None:
    """The attribute reward of each ``(label_a, label_b)`` (None for the verdict reward)."""
    if plan.read_answer is None:
        return None
    return [AttributeReward(a == b, (dataset.attributes(a), dataset.attributes(b)), plan.read_answer)
            for a, b in labels]


def phase_b(comps: Components, plan: StepPlan, batch: Batch, step: int):
    """Draw pairs and sample them until ``plan.want`` groups have reward variance or ``plan.max_draws`` pairs were
    sampled: balanced pairs from the batch (first draw), then from the train split; hard pairs always from the batch,
    mined with its current embeddings (every rank embeds the whole batch, so every rank mines the same pairs).
    Returns (this rank's groups among the step's first ``want`` contributing ones, RolloutStats of this rank's pairs,
    by pair kind too).

    Every rank draws the same pairs (a generator seeded by (seed, step)); pair p of a draw is sampled by
    rank p % world, a rank's pairs of a draw in one ``generate`` call, each pair from its own seed
    (``pair_seed``). The ranks then share which pairs contribute, so every rank knows the step's first K
    contributing pairs in draw order: what is kept, and when drawing stops, do not depend on the world size.
    """
    cfg, ds, model, info = comps.cfg, comps.train_set, comps.model, comps.dist
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step))
    stats, kept = RolloutStats(), []
    drawn = draws = kept_total = 0
    if plan.hard_pairs:
        with autocast(comps.device, cfg):
            embeddings, seen = comps.embedder.embed_images(batch.images), set()

    def from_batch() -> bool:
        return draws == 0 or plan.hard_pairs

    def image(i: int):  # balanced: the first draw indexes the (decoded) batch, later draws the train split
        return square_rgb(batch.images[i] if from_batch() else ds[i][0], cfg.image_size)

    model.eval()
    while kept_total < plan.want and drawn < plan.max_draws:
        labels = batch.labels if from_batch() else ds.labels
        count = min(cfg.pairs_per_step, plan.max_draws - drawn)
        pairs = (sample_hard_pairs(embeddings, labels, count, generator, seen=seen) if plan.hard_pairs
                 else sample_pairs(labels, count, generator))
        mine = list(range(info.rank, len(pairs), info.world_size))
        # lockstep: a rank without a pair in this draw samples the draw's first one anyway (not counted, dropped)
        todo = mine or ([0] if plan.lockstep else [])
        groups = []
        if todo:
            inputs = [pair_inputs(model, comps.processor, plan.prompt, image(pairs[p][0]), image(pairs[p][1]))
                      for p in todo]
            pair_labels = [(labels[pairs[p][0]], labels[pairs[p][1]]) for p in todo]
            with autocast(comps.device, cfg):
                groups = sample_groups(model, comps.processor.tokenizer, inputs, [pairs[p][2] for p in todo],
                                       plan.sampling, seeds=[pair_seed(cfg.seed, step, drawn + p) for p in todo],
                                       synced_gpus=plan.lockstep, rewards=pair_rewards(plan, ds, pair_labels))
            for group, (a, b) in zip(groups, pair_labels):
                group.kind = pair_kind(ds, a, b)
        if mine:
            stats.add(groups)
        contributes = [0] * len(pairs)
        for p, group in zip(mine, groups):
            contributes[p] = int(group.contributes)
        for p, flag in enumerate(dist_lib.all_max(contributes, info)):  # every rank's flags
            if flag and kept_total < plan.want:
                kept_total += 1
                if p in mine:
                    kept.append(groups[mine.index(p)])
        drawn, draws = drawn + len(pairs), draws + 1
    stats.keep(kept)
    stats.shortfall = plan.want - kept_total if info.is_main else 0  # counted once: the log sums over ranks
    return kept, stats


def phase_c(comps: Components, plan: StepPlan, groups: list) -> dict:
    """Replay this rank's contributing groups with gradients (each prefix once): lambda_lm L_GRPO + lambda_kl L_KL.

    The normalizers count every rank's groups; in lockstep (``--shard-llm``) ``replay.replay_plan`` gives every rank
    the same passes (fillers where a rank is short of groups).
    """
    counts = dist_lib.all_sum(dataclasses.asdict(local_counts(groups)), comps.dist)  # over every rank's groups
    counts = StepCounts(**{k: int(v) for k, v in counts.items()})
    comps.model.train()
    if plan.lockstep:
        work = replay_plan(groups, plan.replay.replay_tokens, dist=comps.dist, slots=plan.want,
                           filler=lambda: filler_group(comps.model, comps.processor, plan.prompt, plan.sampling,
                                                       comps.cfg.image_size))
    else:
        work = replay_plan(groups, plan.replay.replay_tokens)
    grpo = kl = 0.0
    tokens = micro = 0
    for item in work:
        with autocast(comps.device, comps.cfg):
            result = replay_group(comps.model, item.group, plan.replay, counts, comps.embedder.pooler, item.batches,
                                  lockstep=plan.lockstep)
        if item.teaches:
            grpo, kl = grpo + result.grpo, kl + result.kl
            tokens, micro = tokens + result.tokens, micro + result.micro_batches
    return {"loss_grpo": grpo, "loss_kl": kl, "kl_rollouts": counts.kl_rollouts, "tokens_replayed": tokens,
            "replay_micro_batches": micro}


def clip_gradients(comps: Components) -> float:
    """Average the trainable gradients over ranks and clip their global norm; returns the norm before clipping."""
    comps.sync()
    return float(torch.nn.utils.clip_grad_norm_(comps.trainable_parameters(), comps.cfg.grad_clip))


def train_step(comps: Components, plan: StepPlan | None, optimizer, scheduler, batch: Batch, step: int,
               log) -> None:
    """One SAGA step (METHOD.md): A, B, C, clip, optimizer and schedule step; values go to ``log``."""
    optimizer.zero_grad(set_to_none=True)
    comps.embedder.train()
    with log.phase("a"):
        log.add(loss_dml=phase_a(comps, batch))
    if plan is not None:
        with log.phase("b"):
            groups, stats = phase_b(comps, plan, batch, step)
        with log.phase("c"):
            log.add(**stats.as_dict(), **phase_c(comps, plan, groups))
    with log.phase("opt"):
        log.add(grad_norm=clip_gradients(comps))
        optimizer.step()
        scheduler.step()
    log.add(lr_encoder=optimizer.param_groups[0]["lr"])


__all__ = ["StepPlan", "step_plan", "phase_a", "pair_rewards", "phase_b", "phase_c", "clip_gradients", "train_step",
           "step_seed", "pair_seed"]
