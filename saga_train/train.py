"""The SAGA training loop: ``train(cfg) -> dict`` runs a whole training (or resumes one) and returns the final metrics.

The run directory gets ``config.json``, ``metrics.jsonl`` (runlog.py), ``checkpoint.safetensors`` (checkpoints.py)
and ``embedder/`` (what the retrieval tool loads with ``saga_train.model.load_embedder``). The pieces: the run's
components (components.py), its batch stream (data/stream.py), one step = phases A, B, C (step.py), the
bookkeeping (runlog.py), evaluation (evaluate.py).

Determinism: the step's RNG is reseeded from ``(seed, step, rank)`` at the start of every step, the batches of an
epoch are a pure function of ``(seed, epoch)`` and the step's pairs and completions of ``(seed, step)``, so a
resumed run continues exactly where an uninterrupted one would be, and a run on N ranks trains the weights one
process would (up to round-off; distributed.py). Images are decoded in DataLoader workers (``--workers``).
"""
import hashlib
import json
import os
import time

import torch

from . import distributed as dist_lib
from .checkpoints import CHECKPOINT, atomic_write_text, load_checkpoint, save_checkpoint
from .components import autocast, build_components, build_optimizer, resolve_device
from .data.stream import StepBatches, data_loader, data_workers, steps_per_epoch
from .errors import MissingFileError
from .evaluate import evaluate_embedder
from .runlog import RunLog
from .step import step_plan, step_seed, train_step

METRICS = "metrics.jsonl"
RANDOM_INIT_NOTICE = ("NOTE: the MLLM is a randomly initialized tiny Qwen3-VL: its verdicts are noise, so the "
                      "GRPO / attention-distillation signal in this run means nothing; only the metric loss teaches.")


def train(cfg, log=print) -> dict:
    """Train (or resume) per ``cfg``; returns ``{"before": metrics, "after": metrics, ...}``."""
    t_start = time.perf_counter()
    ckpt_path = os.path.join(cfg.run_dir, CHECKPOINT)
    if cfg.resume and not os.path.isfile(ckpt_path):
        raise MissingFileError(f"--resume: no checkpoint at {ckpt_path}")
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
        if comps.random_init:
            log(RANDOM_INIT_NOTICE)

    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    run_log = RunLog(metrics_path, dist, start=start, stop=stop, progress=cfg.progress, log=log)
    result = {"run_dir": cfg.run_dir, "steps": total, "model": comps.model_description, "rank": dist.rank,
              "random_init": comps.random_init, "llm_parameter_bytes": llm_bytes}
    if start == 0 and cfg.eval_before and main:
        result["before"] = evaluate_run(comps)
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
            metrics = evaluate_run(comps)
            result[f"epoch_{epoch}"] = metrics
            run_log.evaluation(f"epoch {epoch}", step + 1, metrics)
            run_log.write(f"epoch {epoch}: " + format_metrics(metrics))
        elif cfg.eval_every and (step + 1) % cfg.eval_every == 0 and main:
            metrics = evaluate_run(comps)
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


def evaluate_run(comps) -> dict:
    """Zero-shot retrieval metrics (R@K, NMI, MAP@R) of the current embedder on the test classes."""
    cfg = comps.cfg
    return evaluate_embedder(comps.embedder, comps.test_set, max_images=cfg.max_eval_images,
                             workers=data_workers(cfg, comps.test_set, comps.device),
                             autocast=lambda: autocast(comps.device, cfg))


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
