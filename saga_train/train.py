"""The SAGA training loop: one step = phase A (metric loss) + B (rollouts) + C (replay), METHOD.md.

``train(cfg) -> dict`` runs a whole training (or resumes one) and returns the final metrics; the
run directory gets ``config.json``, ``metrics.jsonl``, ``checkpoint.safetensors`` (encoder, pooler,
proxies, optimizer, scheduler, RNG states, step; written atomically) and ``embedder/`` (what the
retrieval tool loads with ``saga_train.model.load_embedder``).

Determinism: the step's RNG is reseeded from ``(seed, step, rank)`` at the start of every step and
the batches of an epoch are a pure function of ``(seed, epoch)``, so a resumed run continues
exactly where an uninterrupted one would be.
"""
import contextlib
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

from . import distributed as dist_lib
from .config import Config, ConfigError
from .losses import build_metric_loss, replay_group
from .model import (Embedder, atomic_save_file, atomic_write_text, fix_image_resolution, freeze_language_model,
                    llm_num_layers, load_qwen3vl, resolve_kl_layer, square_rgb)
from .pooler import build_pooler
from .prompts import pair_prompt, prompt_spec, vocabulary
from .rollout import collect_groups

CHECKPOINT = "checkpoint.safetensors"
# settings a resumed run may change; any other difference from the checkpoint's config is an error
RESUME_MAY_CHANGE = ("resume", "stop_after", "progress", "eval_before", "eval_every_epoch", "checkpoint_every",
                     "threads", "device")
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
    from .data import load_dataset

    kw = {"image_size": cfg.image_size}
    if cfg.dataset == "synthetic":
        kw.update(seed=cfg.seed, images_per_class=cfg.synthetic_images_per_class)
    try:
        return (load_dataset(cfg.dataset, cfg.data_root, split="train", **kw),
                load_dataset(cfg.dataset, cfg.data_root, split="test", **kw))
    except ValueError as e:
        raise ConfigError(f"dataset={cfg.dataset!r} (data_root={cfg.data_root!r}): {e}") from e


def synthetic_supervisor(cfg: Config):
    """Directory of the synthetic-world supervisor whose held-out classes are this run's test classes."""
    from .supervisor import SupervisorConfig, check_writable, ensure_supervisor, supervisor_dir

    if cfg.dataset != "synthetic":
        raise ConfigError(f"model='synthetic-supervisor' only knows the synthetic world, not dataset={cfg.dataset!r}; "
                          "give --model a local Qwen3-VL checkpoint directory")
    scfg = SupervisorConfig(seed=cfg.seed, image_size=cfg.image_size)
    path = supervisor_dir(scfg)
    if check_writable(path, scfg) == "train":
        print(f"training the synthetic supervisor once (cached in {path}; about 10-20 minutes on a CPU)", flush=True)
    return ensure_supervisor(scfg, progress=cfg.progress)


def resolve_model(cfg: Config, dataset, device: torch.device):
    """``(model, processor, description)`` for ``cfg.model``; the one place model sources are resolved.

    "tiny-random": a tiny Qwen3-VL with random weights and a word-level tokenizer built from the
    prompt vocabulary (saga_train.tiny). "synthetic-supervisor": the tiny Qwen3-VL fine-tuned on the
    synthetic world's training classes (saga_train.supervisor; trained on first use, then cached).
    Anything else: a local Qwen3-VL checkpoint directory.
    """
    bf16 = device.type == "cuda" and cfg.bf16
    if cfg.model == "synthetic-supervisor":
        from .supervisor import read_marker

        path = synthetic_supervisor(cfg)
        model, processor = load_qwen3vl(str(path), attn_implementation=attention_implementation(device))
        heldout = (read_marker(path).get("metrics") or {}).get("heldout", {})
        description = (f"synthetic supervisor {path} (tiny Qwen3-VL trained on the seed-{cfg.seed} training classes; "
                       f"held-out verdict accuracy {heldout.get('verdict_accuracy', float('nan')):.3f})")
    elif cfg.model == "tiny-random":
        from .tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

        tokenizer = build_tokenizer(vocabulary_for(cfg, dataset))
        processor = build_processor(tokenizer, cfg.image_size)
        model = build_tiny_qwen3vl(tokenizer, image_size=cfg.image_size, seed=cfg.seed)
        description = "tiny Qwen3-VL, RANDOM INIT (no trained supervisor)"
    else:
        model, processor = load_qwen3vl(cfg.model, dtype=torch.bfloat16 if bf16 else None,
                                        attn_implementation=attention_implementation(device))
        description = f"Qwen3-VL from {cfg.model}"
    try:
        fix_image_resolution(processor, cfg.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model.to(device)
    if bf16:
        model.model.visual.float()  # trainable weights stay fp32; compute runs under bf16 autocast
    freeze_language_model(model)
    if device.type == "cuda":
        apply_cuda_speedups(model, cfg)
    return model, processor, description


def vocabulary_for(cfg: Config, dataset) -> list:
    return vocabulary(prompt_spec(cfg.dataset, dataset), dataset)


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
    model, processor, description = resolve_model(cfg, train_set, device)
    hidden = model.config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        pooler = build_pooler(cfg.pooler, hidden, cfg.embedding_size).to(device)
        metric_loss = build_metric_loss(cfg.dml, len(train_set.class_names), cfg.embedding_size,
                                        cfg.proxies_per_class).to(device)
    embedder = Embedder(model.model.visual, pooler, processor.image_processor, cfg.image_size, cfg.pooler)
    comps = Components(cfg, device, train_set, test_set, model, processor, embedder, metric_loss, description, dist)
    dist_lib.broadcast_parameters(comps.trainable_parameters(), dist)
    return comps


def build_optimizer(comps: Components, total_steps: int):
    """AdamW with encoder / pooler / proxies learning rates; cosine decay after linear warm-up."""
    cfg = comps.cfg
    lrs = {"encoder": cfg.lr_encoder, "pooler": cfg.lr_pooler, "proxies": cfg.lr_proxies}
    groups = [{"params": params, "lr": lrs[name], "name": name}
              for name, params in comps.param_groups().items() if params]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total_steps))
    return optimizer, scheduler


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: ``(step + 1) / warmup`` during warm-up, then ``0.5 (1 + cos(pi progress))``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def steps_per_epoch(cfg: Config, train_set) -> int:
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    from .data import ClassBalancedBatchSampler

    return len(ClassBalancedBatchSampler(train_set.labels, cfg.classes_per_batch, cfg.images_per_class, cfg.seed))


def epoch_batches(cfg: Config, train_set, epoch: int, count: int) -> list:
    """The epoch's ``count`` class-balanced batches (index lists), a pure function of (seed, epoch)."""
    from .data import ClassBalancedBatchSampler

    sampler = ClassBalancedBatchSampler(train_set.labels, cfg.classes_per_batch, cfg.images_per_class, cfg.seed)
    sampler.set_epoch(epoch)
    batches = []
    while len(batches) < count:
        batches.extend(list(sampler))
        sampler.set_epoch(sampler.epoch + 1000)
    return batches[:count]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def autocast(device: torch.device, cfg: Config):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_embedder(comps: Components) -> dict:
    """Zero-shot retrieval metrics (R@K, NMI, MAP@R) of the current embedder on the test classes."""
    from .evaluate import evaluate

    ds = comps.test_set
    n = len(ds) if not comps.cfg.max_eval_images else min(len(ds), comps.cfg.max_eval_images)
    chunks, labels = [], []
    with autocast(comps.device, comps.cfg):
        for start in range(0, n, 64):
            items = [ds[i] for i in range(start, min(n, start + 64))]
            chunks.append(comps.embedder.embed_images([im for im, _ in items]))
            labels.extend(lab for _, lab in items)
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
def pair_batches(comps: Components, batch: list, generator: torch.Generator):
    """Pairs for phase B: first from the step's batch, then from further draws over the train split."""
    from .data import sample_pairs

    cfg, ds = comps.cfg, comps.train_set

    def images(pairs, index):
        return [(square_rgb(ds[index[i]][0], cfg.image_size), square_rgb(ds[index[j]][0], cfg.image_size), same)
                for i, j, same in pairs]

    labels = [ds.labels[i] for i in batch]
    yield images(sample_pairs(labels, cfg.pairs_per_step, generator), batch)
    everything = list(range(len(ds)))
    while True:
        yield images(sample_pairs(ds.labels, cfg.pairs_per_step, generator), everything)


def phase_a(comps: Components, batch: list) -> float:
    """Embed this rank's share of the batch (whole classes) and back-propagate lambda_dml * L_DML."""
    cfg = comps.cfg
    labels_all = [comps.train_set.labels[i] for i in batch]
    mine = set(dist_lib.shard(sorted(set(labels_all)), comps.dist))
    index = [i for i, lab in zip(batch, labels_all) if lab in mine]
    items = [comps.train_set[i] for i in index]
    with autocast(comps.device, cfg):
        inputs = comps.embedder.pixel_inputs([im for im, _ in items])
        z, _, _ = comps.embedder(**inputs)
    labels = torch.tensor([lab for _, lab in items], device=comps.device)
    loss = comps.metric_loss(z.float(), labels)
    (cfg.lambda_dml * loss).backward()
    return float(loss.detach())


def phases_b_c(comps: Components, batch: list, step: int, prompt: str, verdict_key: str, kl_layer: int) -> dict:
    """Sample rollouts (B), then replay the contributing groups with gradients (C)."""
    cfg, model = comps.cfg, comps.model
    share = math.ceil(cfg.contributing_pairs / comps.dist.world_size)
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, comps.dist.rank))
    need_kl = cfg.lambda_kl > 0 and cfg.pooler == "attention"
    t0 = time.perf_counter()
    model.eval()
    with autocast(comps.device, cfg):
        groups, stats = collect_groups(
            model, comps.processor, prompt, pair_batches(comps, batch, generator), verdict_key=verdict_key,
            want=share, max_draws=math.ceil(cfg.max_pair_draws / comps.dist.world_size),
            group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, need_item_masks=need_kl)
    t1 = time.perf_counter()
    total_tokens = sum(int(g.completion_mask.sum()) for g in groups)
    kl_rollouts = sum(int(((g.rewards == 1).to(g.completion_mask.device)
                           & torch.stack([m.any(-1) for m in g.item_token_masks.values()]).any(0)).sum())
                      for g in groups if g.item_token_masks)
    grpo_sum, kl_sum, kl_n = 0.0, 0.0, 0
    model.train()
    for group in groups:
        with autocast(comps.device, cfg):
            result = replay_group(
                model, group, temperature=cfg.temperature, kl_layer=kl_layer, lambda_lm=cfg.lambda_lm,
                lambda_kl=cfg.lambda_kl if need_kl else 0.0, pooler=comps.embedder.pooler,
                token_weight=int(group.completion_mask.sum()) / max(total_tokens, 1),
                kl_weight=1.0 / kl_rollouts if kl_rollouts else 0.0)
        result.loss.backward()
        grpo_sum += result.grpo * int(group.completion_mask.sum()) / max(total_tokens, 1)
        kl_sum += result.kl * result.kl_rollouts
        kl_n += result.kl_rollouts
    t2 = time.perf_counter()
    out = stats.as_dict()
    out.update(loss_grpo=grpo_sum, loss_kl=kl_sum / kl_n if kl_n else 0.0, kl_rollouts=kl_n,
               time_b=t1 - t0, time_c=t2 - t1)
    return out


# ------------------------------------------------------------------------------------------ the loop
def _log(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
    spe = steps_per_epoch(cfg, comps.train_set)
    total = cfg.max_steps or cfg.epochs * spe
    optimizer, scheduler = build_optimizer(comps, total)
    spec = prompt_spec(cfg.dataset, comps.train_set)
    prompt = pair_prompt(comps.processor, spec, cfg.prompt)
    kl_layer = resolve_kl_layer(cfg.kl_layer, llm_num_layers(comps.model))
    rollouts_on = cfg.lambda_lm > 0 or (cfg.lambda_kl > 0 and cfg.pooler == "attention")
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
        if cfg.model == "tiny-random":
            log(RANDOM_INIT_NOTICE)

    result = {"run_dir": cfg.run_dir, "steps": total, "model": comps.model_description, "rank": dist.rank}
    if start == 0 and cfg.eval_before and main:
        result["before"] = evaluate_embedder(comps)
        _log(metrics_path, {"eval": "before", "step": 0, **result["before"]})
        log("before training: " + format_metrics(result["before"]))
    dist_lib.barrier(dist)

    params = comps.trainable_parameters()
    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    progress = None
    if cfg.progress and main:
        from tqdm import tqdm
        progress = tqdm(total=stop, initial=start, desc="saga", dynamic_ncols=True)
    totals = {"time_a": 0.0, "time_b": 0.0, "time_c": 0.0, "time_opt": 0.0, "completions": 0, "rewarded": 0,
              "unparseable": 0, "pairs_drawn": 0, "groups_kept": 0, "shortfall": 0}
    batches, batches_epoch = None, None
    for step in range(start, stop):
        epoch = step // spe
        if batches_epoch != epoch:
            batches, batches_epoch = epoch_batches(cfg, comps.train_set, epoch, spe), epoch
        batch = batches[step % spe]
        torch.manual_seed(step_seed(cfg.seed, step, dist.rank))
        comps.embedder.train()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "epoch": epoch}
        t0 = time.perf_counter()
        record["loss_dml"] = phase_a(comps, batch) if cfg.lambda_dml > 0 else 0.0
        record["time_a"] = time.perf_counter() - t0
        if rollouts_on:
            record.update(phases_b_c(comps, batch, step, prompt, spec.verdict_key, kl_layer))
        t1 = time.perf_counter()
        dist_lib.average_gradients(params, dist)
        record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        scheduler.step()
        record["time_opt"] = time.perf_counter() - t1
        record["lr_encoder"] = optimizer.param_groups[0]["lr"]
        counts = dist_lib.all_sum({k: record.get(k, 0) for k in ("completions", "rewarded", "unparseable",
                                                                   "pairs_drawn", "groups_kept", "shortfall")}, dist)
        for k in totals:
            totals[k] += counts[k] if k in counts else record.get(k, 0.0)
        if main:
            _log(metrics_path, record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(dml=f"{record['loss_dml']:.3f}", grpo=f"{record.get('loss_grpo', 0):.3f}",
                                 kl=f"{record.get('loss_kl', 0):.3f}",
                                 reward=f"{totals['rewarded'] / max(totals['completions'], 1):.2f}")
        end_of_epoch = (step + 1) % spe == 0 or step + 1 == total
        if end_of_epoch and cfg.eval_every_epoch and main:
            metrics = evaluate_embedder(comps)
            result[f"epoch_{epoch}"] = metrics
            _log(metrics_path, {"eval": f"epoch {epoch}", "step": step + 1, **metrics})
            (progress.write if progress is not None else log)(f"epoch {epoch}: " + format_metrics(metrics))
        periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        if main and (end_of_epoch or periodic or step + 1 == stop):
            save_checkpoint(comps, optimizer, scheduler, step + 1, ckpt_path)
        dist_lib.barrier(dist)
    if progress is not None:
        progress.close()

    done = stop - start
    if main and done:
        if stop == total:
            result["after"] = result.get(f"epoch_{(stop - 1) // spe}")
            comps.embedder.save(os.path.join(cfg.run_dir, "embedder"))
        step_time = sum(totals[k] for k in ("time_a", "time_b", "time_c", "time_opt"))
        result["phase_share"] = {k[5:]: totals[k] / step_time for k in ("time_a", "time_b", "time_c", "time_opt")} \
            if step_time else {}
        result["seconds_per_step"] = step_time / done
        result["reward_rate"] = totals["rewarded"] / max(totals["completions"], 1)
        result["rollouts"] = {k: totals[k] for k in ("completions", "rewarded", "unparseable", "pairs_drawn",
                                                     "groups_kept", "shortfall")}
    result["parameter_digest"] = parameter_digest(params)
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
