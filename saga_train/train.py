"""The SAGA training loop: one step = phase A (metric loss) + B (rollouts) + C (replay), METHOD.md.

``train(cfg) -> dict`` runs a whole training (or resumes one) and returns the final metrics; the
run directory gets ``config.json``, ``metrics.jsonl``, ``checkpoint.safetensors`` (encoder, pooler,
proxies, optimizer, scheduler, RNG states, step; written atomically) and ``embedder/`` (what the
retrieval tool loads with ``saga_train.model.load_embedder``).

A step (``train_step``) is ``phase_a`` (embed the batch, lambda_dml L_DML), ``phase_b`` (draw pairs,
sample all pairs of a draw in one ``generate`` call, keep groups with reward variance: rollout.py),
``phase_c`` (replay the kept groups, each prefix once, with gradients: replay.py), clip, step.
``RunLog`` does the bookkeeping (phase timings, totals, JSON lines, the tqdm postfix).

Determinism: the step's RNG is reseeded from ``(seed, step, rank)`` at the start of every step, the
batches of an epoch are a pure function of ``(seed, epoch)`` and the step's pairs and completions of
``(seed, step)``, so a resumed run continues exactly where an uninterrupted one would be, and a run on
N ranks trains the weights one process would (up to round-off; distributed.py). Images are decoded in
DataLoader workers (``--workers``).
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from . import distributed as dist_lib
from .config import SYNTHETIC_MODELS, Config, ConfigError
from .data.base import FileImageDataset
from .data.samplers import ClassBalancedBatchSampler, sample_pairs
from .losses import build_metric_loss
from .model import (Embedder, atomic_save_file, atomic_write_text, fix_image_resolution, freeze_language_model,
                    llm_num_layers, load_qwen3vl, resolve_kl_layer, square_rgb)
from .pooler import build_pooler
from .prompts import pair_prompt, prompt_spec
from .replay import ReplayOptions, StepCounts, filler_group, local_counts, micro_batches, replay_group
from .rollout import RolloutStats, SamplingOptions, mix_seed, pair_inputs, sample_groups

CHECKPOINT = "checkpoint.safetensors"
# settings a resumed run may change; any other difference from the checkpoint's config is an error
RESUME_MAY_CHANGE = ("resume", "stop_after", "progress", "eval_before", "eval_every_epoch", "eval_every",
                     "checkpoint_every", "threads", "device", "workers", "replay_tokens", "shard_llm")
METRICS = "metrics.jsonl"
RANDOM_INIT_NOTICE = ("NOTE: the MLLM is a randomly initialized tiny Qwen3-VL: its verdicts are noise, so the "
                      "GRPO / attention-distillation signal in this run means nothing; only the metric loss teaches.")


# ------------------------------------------------------------------------------------------ setup
def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def build_datasets(cfg: Config):
    """(train split, test split) of ``cfg.dataset`` (zero-shot: disjoint classes)."""
    from .data.registry import load_dataset

    train_kw = test_kw = {"image_size": cfg.image_size}
    if cfg.dataset == "synthetic":
        common = dict(train_kw, seed=cfg.world_seed, train_classes=cfg.synthetic_train_classes,
                      test_classes=cfg.synthetic_test_classes)
        train_kw = dict(common, images_per_class=cfg.synthetic_images_per_class)
        test_kw = dict(common, images_per_class=cfg.synthetic_test_images_per_class)
    try:
        return (load_dataset(cfg.dataset, cfg.data_root, split="train", **train_kw),
                load_dataset(cfg.dataset, cfg.data_root, split="test", **test_kw))
    except ValueError as e:
        raise ConfigError(f"dataset={cfg.dataset!r} (data_root={cfg.data_root!r}): {e}") from e


def resolve_model(cfg: Config, dataset, device: torch.device, dist: dist_lib.DistInfo | None = None):
    """``(model, processor, description)`` for ``cfg.model``; the one place model sources are resolved.

    A name in ``SYNTHETIC_MODELS`` ("synthetic-supervisor", "tiny-random"): the synthetic world's model
    (``saga_train.synthetic.load``). Anything else: a local Qwen3-VL checkpoint directory; one holding a synthetic
    supervisor's ``SUPERVISOR.json`` is first checked against its recorded sha256 (only then is the synthetic
    package imported on this path). With ``cfg.shard_llm`` the LLM's decoder layers are sharded over the ranks
    (FSDP2) before the model moves to ``device``: only shards reach the device.
    """
    bf16 = device.type == "cuda" and cfg.bf16
    if cfg.model in SYNTHETIC_MODELS:
        from . import synthetic

        model, processor, description = synthetic.load(cfg, dataset,
                                                       attn_implementation=attention_implementation(device))
    else:
        if os.path.isfile(os.path.join(cfg.model, "SUPERVISOR.json")):  # a synthetic supervisor's directory
            from .synthetic.supervisor import verify_supervisor

            verify_supervisor(cfg.model)  # its files against their recorded sha256
        model, processor = load_qwen3vl(cfg.model, dtype=torch.bfloat16 if bf16 else None,
                                        attn_implementation=attention_implementation(device))
        description = f"Qwen3-VL from {cfg.model}"
    try:
        fix_image_resolution(processor, cfg.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    freeze_language_model(model)
    if cfg.shard_llm:
        if not (dist and dist.enabled):
            raise ConfigError("--shard-llm shards the LLM over torchrun's ranks: run it under torchrun, >= 2 processes")
        dist_lib.shard_language_model(model, device)
    model.to(device)
    if bf16:
        model.model.visual.float()  # trainable weights stay fp32; compute runs under bf16 autocast
    if device.type == "cuda":
        apply_cuda_speedups(model, cfg)
    return model, processor, description


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def apply_cuda_speedups(model, cfg: Config) -> None:
    """Liger-Kernel's Qwen3-VL patches (when installed) and activation checkpointing on the LLM."""
    if cfg.liger and importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl

            apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                           fused_linear_cross_entropy=False, model=model)
        except ImportError as exc:  # e.g. liger-kernel 0.8.5 against transformers 5.24's Qwen3-VL module
            warnings.warn(f"Liger-Kernel's Qwen3-VL patches are unavailable here ({exc}); training without them")
    if cfg.grad_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Components:
    """Everything a run trains or uses, built deterministically from the config."""

    cfg: Config
    device: torch.device
    train_set: object
    test_set: object
    model: object
    processor: object
    embedder: Embedder
    metric_loss: torch.nn.Module
    model_description: str
    dist: dist_lib.DistInfo = field(default_factory=dist_lib.DistInfo)
    sync: dist_lib.GradientSync = None  # the gradient average over ranks (built with the components)

    def param_groups(self) -> dict:
        return {
            "encoder": [p for p in self.embedder.visual.parameters() if p.requires_grad],
            "pooler": list(self.embedder.pooler.parameters()),
            "proxies": [p for p in self.metric_loss.parameters() if p.requires_grad],
        }

    def trainable_parameters(self) -> list:
        return [p for group in self.param_groups().values() for p in group]


def build_components(cfg: Config, dist: dist_lib.DistInfo | None = None) -> Components:
    dist = dist or dist_lib.DistInfo()
    device = resolve_device(cfg)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    train_set, test_set = build_datasets(cfg)
    model, processor, description = resolve_model(cfg, train_set, device, dist)
    hidden = model.config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        pooler = build_pooler(cfg.pooler, hidden, cfg.embedding_size).to(device)
        metric_loss = build_metric_loss(cfg.dml, len(train_set.class_names), cfg.embedding_size,
                                        cfg.proxies_per_class, pf_alpha=cfg.pf_alpha, pf_delta=cfg.pf_delta).to(device)
    embedder = Embedder(model.model.visual, pooler, processor.image_processor, cfg.image_size, cfg.pooler)
    comps = Components(cfg, device, train_set, test_set, model, processor, embedder, metric_loss, description, dist)
    dist_lib.broadcast_parameters(comps.trainable_parameters(), dist)
    comps.sync = dist_lib.GradientSync(comps.trainable_parameters(), dist)
    return comps


def build_optimizer(comps: Components, total_steps: int):
    """AdamW with encoder / pooler / proxies learning rates; cosine decay after linear warm-up."""
    cfg = comps.cfg
    lrs = {"encoder": cfg.lr_encoder, "pooler": cfg.lr_pooler, "proxies": cfg.lr_proxies}
    groups = [{"params": params, "lr": lrs[name], "name": name}
              for name, params in comps.param_groups().items() if params]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_fraction * total_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def steps_per_epoch(cfg: Config, train_set) -> int:
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    return len(ClassBalancedBatchSampler(train_set.labels, cfg.classes_per_batch, cfg.images_per_class, cfg.seed))


def epoch_batches(cfg: Config, train_set, epoch: int, count: int) -> list:
    """The epoch's ``count`` class-balanced batches (index lists), a pure function of (seed, epoch)."""
    sampler = ClassBalancedBatchSampler(train_set.labels, cfg.classes_per_batch, cfg.images_per_class, cfg.seed)
    sampler.set_epoch(epoch)
    batches = []
    while len(batches) < count:
        batches.extend(list(sampler))
        sampler.set_epoch(sampler.epoch + 1000)
    return batches[:count]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def pair_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the step's ``index``-th drawn pair (the same on every rank and world size)."""
    return mix_seed("pair", seed, step, index)


def autocast(device: torch.device, cfg: Config):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ data
def data_workers(cfg: Config, dataset, device: torch.device) -> int:
    """DataLoader workers decoding images: ``cfg.workers``, or (-1) 0 for in-memory datasets (the synthetic
    world) and, for images on disk, up to 8 on CUDA / 2 on a CPU, leaving one core to the trainer."""
    if cfg.workers >= 0:
        return cfg.workers
    if not isinstance(dataset, FileImageDataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8 if device.type == "cuda" else 2, cpus - 1))


@dataclass
class Batch:
    """A step's class-balanced micro-batch, decoded: PIL images and their labels."""

    images: list
    labels: list


def collate_batch(items) -> Batch:
    return Batch([image for image, _ in items], [label for _, label in items])


class StepBatches:
    """The batch sampler of steps ``start..stop-1``: each epoch's batches from ``epoch_batches`` (so resuming
    mid-epoch gives the same batches as an uninterrupted run), computed one epoch at a time."""

    def __init__(self, cfg: Config, train_set, start: int, stop: int, per_epoch: int):
        self.cfg, self.train_set, self.start, self.stop, self.per_epoch = cfg, train_set, start, stop, per_epoch

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        batches, epoch = None, None
        for step in range(self.start, self.stop):
            if epoch != step // self.per_epoch:
                epoch = step // self.per_epoch
                batches = epoch_batches(self.cfg, self.train_set, epoch, self.per_epoch)
            yield batches[step % self.per_epoch]


def data_loader(dataset, workers: int, **batching):
    """A DataLoader yielding ``Batch`` objects, images decoded in ``workers`` processes (0: in this one);
    ``batching``: ``batch_sampler=`` or ``batch_size=``."""
    return torch.utils.data.DataLoader(
        dataset, num_workers=workers, collate_fn=collate_batch, prefetch_factor=2 if workers else None,
        generator=torch.Generator(), **batching)  # its own generator: the global RNG stays untouched


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_embedder(comps: Components) -> dict:
    """Zero-shot retrieval metrics (R@K, NMI, MAP@R) of the current embedder on the test classes."""
    from .evaluate import evaluate

    ds = comps.test_set
    n = len(ds) if not comps.cfg.max_eval_images else min(len(ds), comps.cfg.max_eval_images)
    subset = torch.utils.data.Subset(ds, range(n))
    chunks, labels = [], []
    with autocast(comps.device, comps.cfg):
        for batch in data_loader(subset, data_workers(comps.cfg, ds, comps.device), batch_size=64):
            chunks.append(comps.embedder.embed_images(batch.images))
            labels.extend(batch.labels)
    return evaluate(torch.cat(chunks).float(), torch.tensor(labels))


# ------------------------------------------------------------------------------------------ checkpoints
def _trainable_state(comps: Components) -> dict:
    state = {f"embedder.{k}": v for k, v in comps.embedder.state_dict().items()}
    state.update({f"metric.{k}": v for k, v in comps.metric_loss.state_dict().items()})
    return state


def save_checkpoint(comps: Components, optimizer, scheduler, step: int, path: str) -> None:
    """Encoder + pooler + proxies + optimizer + scheduler + RNG states + step, one atomic safetensors file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in _trainable_state(comps).items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "step": step,
        "optim_param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "config": comps.cfg.to_dict(),
    }
    atomic_save_file(tensors, path, metadata={"saga": json.dumps(meta)})


def load_checkpoint(comps: Components, optimizer, scheduler, path: str) -> int:
    """Restore everything ``save_checkpoint`` wrote; returns the step to continue from."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["saga"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    current = comps.cfg.to_dict()
    changed = sorted(k for k, v in meta["config"].items() if k not in RESUME_MAY_CHANGE and current.get(k) != v)
    if changed:
        raise ConfigError(f"--resume: {path} was written with other settings for: "
                          + ", ".join(f"{k} ({meta['config'][k]!r} -> {current.get(k)!r})" for k in changed))
    comps.embedder.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("embedder.")})
    comps.metric_loss.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("metric.")})
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optim_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    py = meta["rng_python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = meta["rng_numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    return int(meta["step"])


# ------------------------------------------------------------------------------------------ one step
@dataclass(frozen=True)
class StepPlan:
    """What phases B and C need at every step, fixed for a run."""

    prompt: str
    sampling: SamplingOptions
    replay: ReplayOptions
    want: int  # K: contributing groups the step buffers (over all ranks)
    max_draws: int  # cap on the pairs the step samples (over all ranks)
    lockstep: bool = False  # the LLM's layers are sharded: every rank runs the same LLM passes


def step_plan(comps: Components) -> StepPlan | None:
    """The run's phase B / C settings; None when neither L_GRPO nor L_KL is on (no rollouts)."""
    cfg = comps.cfg
    lockstep = cfg.shard_llm and comps.dist.enabled
    kl = cfg.lambda_kl > 0 and cfg.pooler == "attention"
    if not (cfg.lambda_lm > 0 or kl):
        return None
    spec = prompt_spec(cfg.dataset, comps.train_set)
    kl_layer = resolve_kl_layer(cfg.kl_layer, llm_num_layers(comps.model))
    return StepPlan(
        prompt=pair_prompt(comps.processor, spec, cfg.prompt),
        sampling=SamplingOptions(group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, verdict_key=spec.verdict_key, item_masks=kl,
                                 synced_gpus=lockstep),
        replay=ReplayOptions(temperature=cfg.temperature, lambda_lm=cfg.lambda_lm,
                             lambda_kl=cfg.lambda_kl if kl else 0.0, kl_layer=kl_layer,
                             replay_tokens=cfg.replay_tokens, lockstep=lockstep),
        want=cfg.contributing_pairs, max_draws=cfg.max_pair_draws, lockstep=lockstep)


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


def phase_b(comps: Components, plan: StepPlan, batch: Batch, step: int):
    """Draw pairs (first from the step's batch, then from the whole train split) and sample them until
    ``plan.want`` groups have reward variance or ``plan.max_draws`` pairs were sampled. Returns (this rank's
    groups among the step's first ``want`` contributing ones, RolloutStats of this rank's pairs).

    Every rank draws the same pairs (a generator seeded by (seed, step)); pair p of a draw is sampled by
    rank p % world, a rank's pairs of a draw in one ``generate`` call, each pair from its own seed
    (``pair_seed``). The ranks then share which pairs contribute, so every rank knows the step's first K
    contributing pairs in draw order: what is kept, and when drawing stops, do not depend on the world size.
    """
    cfg, ds, model, info = comps.cfg, comps.train_set, comps.model, comps.dist
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step))
    stats, kept = RolloutStats(), []
    drawn = draws = kept_total = 0

    def image(i: int):  # the first draw indexes the (decoded) batch, later draws the train split
        return square_rgb(batch.images[i] if draws == 0 else ds[i][0], cfg.image_size)

    model.eval()
    while kept_total < plan.want and drawn < plan.max_draws:
        labels = batch.labels if draws == 0 else ds.labels
        pairs = sample_pairs(labels, min(cfg.pairs_per_step, plan.max_draws - drawn), generator)
        mine = list(range(info.rank, len(pairs), info.world_size))
        # lockstep: a rank without a pair in this draw samples the draw's first one anyway (not counted, dropped)
        todo = mine or ([0] if plan.lockstep else [])
        groups = []
        if todo:
            inputs = [pair_inputs(model, comps.processor, plan.prompt, image(pairs[p][0]), image(pairs[p][1]))
                      for p in todo]
            with autocast(comps.device, cfg):
                groups = sample_groups(model, comps.processor.tokenizer, inputs, [pairs[p][2] for p in todo],
                                       plan.sampling, seeds=[pair_seed(cfg.seed, step, drawn + p) for p in todo])
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
    stats.groups_kept = len(kept)
    stats.shortfall = plan.want - kept_total if info.is_main else 0  # counted once: the log sums over ranks
    return kept, stats


def phase_c(comps: Components, plan: StepPlan, groups: list) -> dict:
    """Replay this rank's contributing groups with gradients (each prefix once): lambda_lm L_GRPO + lambda_kl L_KL.

    Lockstep (``--shard-llm``: every pass through a sharded layer is a collective): every rank replays as many
    groups as the rank with the most, the k-th split into as many micro-batches as the most any rank needs
    for its k-th; a rank short of groups replays fillers (zero advantages: the same passes, no gradient).
    """
    counts = dist_lib.all_sum(dataclasses.asdict(local_counts(groups)), comps.dist)  # over every rank's groups
    counts = StepCounts(**{k: int(v) for k, v in counts.items()})
    comps.model.train()
    work = [(group, 0) for group in groups]
    if plan.lockstep:
        natural = [len(micro_batches(g.completion_mask.sum(-1).cpu(), plan.replay.replay_tokens)) for g in groups]
        slots = [n for n in dist_lib.all_max(natural + [0] * (plan.want - len(groups)), comps.dist) if n]
        filler = (filler_group(comps.model, comps.processor, plan.prompt, comps.cfg.group_size, comps.cfg.image_size)
                  if len(slots) > len(groups) else None)
        work = [(groups[k] if k < len(groups) else filler, n) for k, n in enumerate(slots)]
    grpo = kl = 0.0
    tokens = micro = 0
    for k, (group, micro_count) in enumerate(work):
        # a filler's 2-token completions fit any micro-batch: it is split into exactly micro_count of them
        options = plan.replay if k < len(groups) else dataclasses.replace(plan.replay, replay_tokens=0)
        with autocast(comps.device, comps.cfg):
            result = replay_group(comps.model, group, options, counts, comps.embedder.pooler, micro_count)
        if k < len(groups):
            grpo, kl = grpo + result.grpo, kl + result.kl
            tokens, micro = tokens + result.tokens, micro + result.micro_batches
    return {"loss_grpo": grpo, "loss_kl": kl, "kl_rollouts": counts.kl_rollouts, "tokens_replayed": tokens,
            "replay_micro_batches": micro}


def clip_gradients(comps: Components) -> float:
    """Average the trainable gradients over ranks and clip their global norm; returns the norm before clipping."""
    comps.sync()
    return float(torch.nn.utils.clip_grad_norm_(comps.trainable_parameters(), comps.cfg.grad_clip))


def train_step(comps: Components, plan: StepPlan | None, optimizer, scheduler, batch: Batch, step: int,
               log: "RunLog") -> None:
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


# ------------------------------------------------------------------------------------------ bookkeeping
class RunLog:
    """Bookkeeping of a run: per-step records (phase times, losses, counts) as JSON lines, totals over
    steps (counts summed and losses averaged over ranks), the tqdm postfix, evaluation records."""

    PHASES = ("a", "b", "c", "opt")
    SUMMED = RolloutStats.counts() + ("tokens_replayed",)  # per-rank counts, summed over ranks
    AVERAGED = ("loss_dml", "loss_grpo", "loss_kl")  # L_DML: the same on every rank; L_GRPO, L_KL: world x shares

    def __init__(self, path: str, dist: dist_lib.DistInfo, *, start: int, stop: int, progress: bool, log=print):
        self.path, self.dist, self.main = path, dist, dist.is_main
        self.totals = dict.fromkeys([f"time_{p}" for p in self.PHASES] + list(self.SUMMED), 0)
        self.record = {}
        self.bar = None
        self._log = log
        if progress and self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=stop, initial=start, desc="saga", dynamic_ncols=True)

    def begin(self, step: int, epoch: int) -> None:
        self.record = {"step": step + 1, "epoch": epoch}

    def add(self, **values) -> None:
        self.record.update(values)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record[f"time_{name}"] = time.perf_counter() - start

    def end(self) -> dict:
        """Combine ranks, add to the totals, write the JSON line and the progress bar; returns the record."""
        record = self.record
        present = [k for k in self.SUMMED + self.AVERAGED if k in record]
        combined = dist_lib.all_sum({k: record[k] for k in present}, self.dist)
        for key in present:
            record[key] = combined[key] / self.dist.world_size if key in self.AVERAGED else combined[key]
        for key in self.totals:
            self.totals[key] += record.get(key, 0)
        if self.main:
            _log(self.path, record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(dml=f"{record['loss_dml']:.3f}", grpo=f"{record.get('loss_grpo', 0):.3f}",
                                 kl=f"{record.get('loss_kl', 0):.3f}",
                                 reward=f"{self.totals['rewarded'] / max(self.totals['completions'], 1):.2f}")
        return record

    def evaluation(self, name: str, step: int, metrics: dict) -> None:
        if self.main:
            _log(self.path, {"eval": name, "step": step, **metrics})

    def write(self, message: str) -> None:
        (self.bar.write if self.bar is not None else self._log)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, steps: int, rollouts: bool) -> dict:
        """Phase shares, seconds per step and (with rollouts) the reward rate and rollout totals."""
        t = self.totals
        step_time = sum(t[f"time_{p}"] for p in self.PHASES)
        out = {"phase_share": {p: t[f"time_{p}"] / step_time for p in self.PHASES} if step_time else {},
               "seconds_per_step": step_time / max(steps, 1)}
        if rollouts:
            out["reward_rate"] = t["rewarded"] / max(t["completions"], 1)
            out["rollouts"] = {k: t[k] for k in self.SUMMED}
        return out


def _log(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ the loop
def train(cfg: Config, log=print) -> dict:
    """Train (or resume) per ``cfg``; returns ``{"before": metrics, "after": metrics, ...}``."""
    t_start = time.perf_counter()
    ckpt_path = os.path.join(cfg.run_dir, CHECKPOINT)
    if cfg.resume and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    probe_device = resolve_device(cfg)
    if probe_device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = dist_lib.init_distributed(probe_device.type)
    comps = build_components(cfg, dist)
    llm_bytes = dist_lib.llm_parameter_bytes(comps.model)
    spe = steps_per_epoch(cfg, comps.train_set)
    total = cfg.max_steps or cfg.epochs * spe
    optimizer, scheduler = build_optimizer(comps, total)
    plan = step_plan(comps)
    os.makedirs(cfg.run_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.run_dir, METRICS)
    main = dist.is_main

    start = 0
    if cfg.resume:
        start = load_checkpoint(comps, optimizer, scheduler, ckpt_path)
        log(f"resumed from {ckpt_path} at step {start}/{total}")
    elif main:
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
        atomic_write_text(os.path.join(cfg.run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
    if main:
        log(f"model: {comps.model_description}; {comps.train_set!r} / {comps.test_set!r}")
        log(f"LLM parameters on rank 0: decoder layers {llm_bytes['decoder_layers'] / 2**20:.1f} MiB of "
            f"{llm_bytes['decoder_layers_total'] / 2**20:.1f} MiB ({'sharded' if cfg.shard_llm else 'replicated'} "
            f"over {dist.world_size} rank(s)), embedding + norm + LM head {llm_bytes['replicated'] / 2**20:.1f} MiB")
        if cfg.model == "tiny-random":
            log(RANDOM_INIT_NOTICE)

    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    run_log = RunLog(metrics_path, dist, start=start, stop=stop, progress=cfg.progress, log=log)
    result = {"run_dir": cfg.run_dir, "steps": total, "model": comps.model_description, "rank": dist.rank,
              "llm_parameter_bytes": llm_bytes}
    if start == 0 and cfg.eval_before and main:
        result["before"] = evaluate_embedder(comps)
        run_log.evaluation("before", 0, result["before"])
        log("before training: " + format_metrics(result["before"]))
    dist_lib.barrier(dist)

    loader = data_loader(comps.train_set, data_workers(cfg, comps.train_set, comps.device),
                         batch_sampler=StepBatches(cfg, comps.train_set, start, stop, spe))
    for step, batch in zip(range(start, stop), loader):
        epoch = step // spe
        torch.manual_seed(step_seed(cfg.seed, step, dist.rank))
        run_log.begin(step, epoch)
        train_step(comps, plan, optimizer, scheduler, batch, step, run_log)
        run_log.end()
        end_of_epoch = (step + 1) % spe == 0 or step + 1 == total
        if end_of_epoch and cfg.eval_every_epoch and main:
            metrics = evaluate_embedder(comps)
            result[f"epoch_{epoch}"] = metrics
            run_log.evaluation(f"epoch {epoch}", step + 1, metrics)
            run_log.write(f"epoch {epoch}: " + format_metrics(metrics))
        elif cfg.eval_every and (step + 1) % cfg.eval_every == 0 and main:
            metrics = evaluate_embedder(comps)
            run_log.evaluation(f"step {step + 1}", step + 1, metrics)
            run_log.write(f"step {step + 1}: " + format_metrics(metrics))
        periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        if main and (end_of_epoch or periodic or step + 1 == stop):
            save_checkpoint(comps, optimizer, scheduler, step + 1, ckpt_path)
        dist_lib.barrier(dist)
    run_log.close()

    done = stop - start
    if main and done:
        if stop == total:
            result["after"] = result.get(f"epoch_{(stop - 1) // spe}")
            comps.embedder.save(os.path.join(cfg.run_dir, "embedder"))
        result.update(run_log.summary(done, rollouts=plan is not None))
    result["parameter_digest"] = parameter_digest(comps.trainable_parameters())
    result["wall_seconds"] = time.perf_counter() - t_start
    result["final_step"] = stop
    return result


def parameter_digest(params) -> str:
    """sha256 of every trainable tensor's bytes (to check that data-parallel ranks agree exactly)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def format_metrics(m: dict | None) -> str:
    if not m:
        return "(not evaluated)"
    return " ".join(f"{k}={m[k]:.3f}" for k in ("R@1", "R@4", "NMI") if k in m)
