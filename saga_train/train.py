"""The SAGA training loop: ``train(cfg) -> dict`` runs a whole training (or resumes one) and returns the final metrics.

The run directory gets ``config.json``, ``metrics.jsonl`` (runlog.py), ``checkpoint.safetensors`` and
``checkpoint.previous.safetensors`` (checkpoints.py) and ``embedder/`` (what the retrieval tool loads with
``saga_train.model.load_embedder``). The pieces: the run's components (components.py), its batch stream
(data/stream.py), one step = phases A, B, C (step.py), the bookkeeping (runlog.py), evaluation (evaluate.py),
preemption (preemption.py).

After each step: the checkpoint when one is due (epoch end, ``--checkpoint-every``, the last step, a preemption
signal), then the evaluation when one is due. A process killed at any instant and resumed (``--resume``,
``--auto-resume``) continues from the newest readable checkpoint: the metrics written after it are cut
(``runlog.restore_records``), an evaluation due at its step that did not finish runs first, and the embedder is
written again when training was already complete; the weights end bitwise equal to an uninterrupted run's
(tests/test_crash_consistency.py).

Determinism: the step's RNG is reseeded from ``(seed, step, rank)`` at the start of every step, the batches of an
epoch are a pure function of ``(seed, epoch)`` and the step's pairs and completions of ``(seed, step)``, so a
resumed run continues exactly where an uninterrupted one would be, and a run on N ranks trains the weights one
process would (up to round-off; distributed.py). Images are decoded in DataLoader workers (``--workers``).
"""
import hashlib
import json
import os
import shutil
import time

import torch

from . import atomic, checkpoints
from . import distributed as dist_lib
from .components import autocast, build_components, build_optimizer, resolve_device
from .data.stream import StepBatches, data_loader, data_workers, steps_per_epoch
from .errors import ConfigError, MissingFileError
from .evaluate import evaluate_embedder
from .model import EMBEDDER_CONFIG
from .preemption import PreemptionWatch
from .prompts import pair_prompt, prompt_spec
from .readout import distinct_pairs, format_readout, read_pairs, readout_metrics, readout_pairs
from .runlog import RunLog, restore_records
from .sources import answer_reader
from .step import step_plan, step_seed, train_step

METRICS = "metrics.jsonl"
EMBEDDER = "embedder"
RANDOM_INIT_NOTICE = ("NOTE: the MLLM is a randomly initialized tiny Qwen3-VL: its verdicts are noise, so the "
                      "GRPO / attention-distillation signal in this run means nothing; only the metric loss teaches.")


SHARDED_READOUT_NOTICE = ("NOTE: no supervisor readout in this run: it generates with the whole LLM on rank 0, which "
                          "--shard-llm splits over the ranks (--readout-pairs is ignored)")


def train(cfg, log=print) -> dict:
    """Train (or resume) per ``cfg``; returns ``{"before": metrics, "after": metrics, ...}``, with ``"preempted":
    k`` when a preemption signal stopped it after step k (a checkpoint holds step k)."""
    with PreemptionWatch(cfg.preempt_signal) as watch:
        return _train(cfg, log, watch)


def resuming(cfg, ckpt_path: str, log=print) -> bool:
    """Whether the run continues from a checkpoint: ``--resume`` (MissingFileError when there is none) or
    ``--auto-resume`` with a checkpoint in the run directory."""
    found = checkpoints.checkpoint_files(ckpt_path)
    if cfg.resume and not found:
        raise MissingFileError(f"--resume: no checkpoint at {ckpt_path}")
    if cfg.auto_resume and not found:
        log(f"--auto-resume: no checkpoint in {cfg.run_dir}: starting fresh")
    return bool(found) and (cfg.resume or cfg.auto_resume)


def make_run_dir(path: str) -> None:
    """Create the run directory ``path`` (and its parents); ConfigError naming it when it cannot be one (a file in
    the way, no permission)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={path!r} cannot be a run directory: {e.strerror or e}") from e


def check_test_split(cfg, test_set) -> None:
    """The evaluations and the readout can run on the test split (checked before training, not after it):
    ConfigError naming what is wrong."""
    if cfg.eval_before or cfg.eval_every_epoch or cfg.eval_every:
        n = len(test_set) if not cfg.max_eval_images else min(len(test_set), cfg.max_eval_images)
        labels = list(test_set.labels[:n])
        if len(set(labels)) == len(labels):
            raise ConfigError(f"the evaluation needs a class with >= 2 images among the {n} test images it embeds "
                              "(max_eval_images, synthetic_test_images_per_class); every class there has one")
    if cfg.readout_pairs and not cfg.shard_llm:
        try:
            readout_pairs(test_set, readout_size(cfg, test_set), seed=cfg.world_seed)
        except ValueError as e:
            raise ConfigError(f"readout_pairs={cfg.readout_pairs}: {e}") from e


def readout_size(cfg, test_set) -> int:
    """``cfg.readout_pairs``, at most the test split's distinct pairs (a small split is read whole, with a note)."""
    return min(cfg.readout_pairs, distinct_pairs(test_set))


def evaluation_due(cfg, done: int, spe: int, total: int) -> str | None:
    """The name of the evaluation due once ``done`` >= 1 steps are done (``"epoch e"``, ``"step k"``), or None."""
    if cfg.eval_every_epoch and (done % spe == 0 or done == total):
        return f"epoch {(done - 1) // spe}"
    if cfg.eval_every and done % cfg.eval_every == 0:
        return f"step {done}"
    return None


def _start_fresh(cfg, metrics_path: str, log) -> None:
    """A fresh run owns its directory: the metrics, checkpoints and stale temporaries of an earlier run go."""
    names = (checkpoints.CHECKPOINT, checkpoints.PREVIOUS)
    old = [p for p in (metrics_path, *(os.path.join(cfg.run_dir, n) for n in names)) if os.path.exists(p)]
    if any(p.endswith(".safetensors") for p in old):
        log(f"starting fresh in {cfg.run_dir}: removing the checkpoints of an earlier run (--auto-resume or "
            "--resume continues one)")
    for path in old:
        os.remove(path)
    embedder = os.path.join(cfg.run_dir, EMBEDDER)
    if os.path.isfile(os.path.join(embedder, EMBEDDER_CONFIG)):  # an earlier run's: it would outlive this one's start
        shutil.rmtree(embedder)
    atomic.remove_stale_temporaries(cfg.run_dir)
    atomic.atomic_write_text(os.path.join(cfg.run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2))


def _train(cfg, log, watch: PreemptionWatch) -> dict:
    t_start = time.perf_counter()
    ckpt_path = os.path.join(cfg.run_dir, checkpoints.CHECKPOINT)
    resume = resuming(cfg, ckpt_path, log)
    probe_device = resolve_device(cfg)
    if probe_device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = dist_lib.init_distributed(probe_device.type)
    comps = build_components(cfg, dist, initialize=not resume)
    llm_bytes = dist_lib.llm_parameter_bytes(comps.model)
    check_test_split(cfg, comps.test_set)
    spe = steps_per_epoch(cfg, comps.train_set)
    total = cfg.max_steps or cfg.epochs * spe
    optimizer, scheduler = build_optimizer(comps, total)
    plan = step_plan(comps)
    make_run_dir(cfg.run_dir)
    metrics_path = os.path.join(cfg.run_dir, METRICS)
    main = dist.is_main

    start, records = 0, []
    if resume:
        start = checkpoints.load_checkpoint(comps, optimizer, scheduler, ckpt_path, warn=log)
        log(f"resumed from {cfg.run_dir} at step {start}/{total}")
        if main:
            atomic.remove_stale_temporaries(cfg.run_dir)
            records = restore_records(metrics_path, start)
    elif main:
        _start_fresh(cfg, metrics_path, log)
    dist_lib.barrier(dist)
    if main:
        log(f"model: {comps.model_description}; {comps.train_set!r} / {comps.test_set!r}")
        log(f"LLM parameters on rank 0: decoder layers {llm_bytes['decoder_layers'] / 2**20:.1f} MiB of "
            f"{llm_bytes['decoder_layers_total'] / 2**20:.1f} MiB ({'sharded' if cfg.shard_llm else 'replicated'} "
            f"over {dist.world_size} rank(s)), embedding + norm + LM head {llm_bytes['replicated'] / 2**20:.1f} MiB")
        if comps.random_init:
            log(RANDOM_INIT_NOTICE)
        if cfg.readout_pairs and cfg.shard_llm:
            log(SHARDED_READOUT_NOTICE)
        elif readout_size(cfg, comps.test_set) < cfg.readout_pairs:
            log(f"NOTE: the supervisor readout reads {readout_size(cfg, comps.test_set)} pairs, all the test split "
                f"has, not readout_pairs={cfg.readout_pairs}")

    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    run_log = RunLog(metrics_path, dist, start=start, stop=stop, progress=cfg.progress, log=log)
    result = {"run_dir": cfg.run_dir, "steps": total, "model": comps.model_description, "rank": dist.rank,
              "random_init": comps.random_init, "llm_parameter_bytes": llm_bytes}
    result.update({r["eval"].replace(" ", "_"): _metrics(r) for r in records if "eval" in r})

    def evaluation(name: str, done: int) -> None:
        metrics = result[name.replace(" ", "_")] = evaluate_run(comps)
        run_log.evaluation(name, done, metrics)
        run_log.write(f"{'before training' if name == 'before' else name}: " + format_metrics(metrics))
        if format_readout(metrics):
            run_log.write("  " + format_readout(metrics))

    pending = evaluation_due(cfg, start, spe, total) if start else ("before" if cfg.eval_before else None)
    if main and pending and not any(r.get("eval") == pending and r["step"] == start for r in records):
        evaluation(pending, start)  # an evaluation the checkpoint was written before (killed or preempted)
    dist_lib.barrier(dist)

    loader = data_loader(comps.train_set, data_workers(cfg, comps.train_set, comps.device),
                         batch_sampler=StepBatches(cfg, comps.train_set, start, stop, spe))
    done = start
    for step, batch in zip(range(start, stop), loader):
        torch.manual_seed(step_seed(cfg.seed, step, dist.rank))
        run_log.begin(step, step // spe)
        train_step(comps, plan, optimizer, scheduler, batch, step, run_log)
        run_log.end()
        done = step + 1
        preempted = done < stop and watch.requested(dist)
        periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
        if main and (done % spe == 0 or done == total or periodic or done == stop or preempted):
            checkpoints.save_checkpoint(comps, optimizer, scheduler, done, ckpt_path)
        dist_lib.barrier(dist)
        if preempted:
            result["preempted"] = done
            if main:
                run_log.write(f"preempted at step {done}; resume with --resume (or --auto-resume)")
            break
        name = evaluation_due(cfg, done, spe, total)
        if name and main:
            evaluation(name, done)
        dist_lib.barrier(dist)
    run_log.close()

    if main and done == total and "preempted" not in result:
        result["after"] = result.get(f"epoch_{(total - 1) // spe}")
        atomic.atomic_replace_dir(os.path.join(cfg.run_dir, EMBEDDER), comps.embedder.save)
    if main and done > start:
        result.update(run_log.summary(done - start, rollouts=plan is not None))
    result["parameter_digest"] = parameter_digest(comps.trainable_parameters())
    result["wall_seconds"] = time.perf_counter() - t_start
    result["final_step"] = done
    return result


def _metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("eval", "step")}


def evaluate_run(comps) -> dict:
    """Zero-shot retrieval metrics (R@K, NMI, MAP@R) of the current embedder on the test classes and, with
    ``cfg.readout_pairs``, the supervisor's readout of the current tower (``run_readout``; not with ``--shard-llm``,
    whose LLM only all ranks together can run)."""
    cfg = comps.cfg
    metrics = evaluate_embedder(comps.embedder, comps.test_set, max_images=cfg.max_eval_images,
                                workers=data_workers(cfg, comps.test_set, comps.device),
                                autocast=lambda: autocast(comps.device, cfg))
    if cfg.readout_pairs and not cfg.shard_llm:  # SHARDED_READOUT_NOTICE
        metrics.update(readout_metrics(run_readout(comps)))
    return metrics


def run_readout(comps, pairs: list | None = None):
    """The supervisor's greedy answers on the run's fixed held-out readout pairs (``readout.readout_pairs`` of the test
    split, ``cfg.readout_pairs`` of them, seeded by the world: the same pairs in every run of a dataset), asked with
    the run's prompt, through the current tower: ``readout.ReadoutAnswers``."""
    cfg = comps.cfg
    spec = prompt_spec(cfg.dataset, comps.train_set)
    if pairs is None:
        pairs = readout_pairs(comps.test_set, readout_size(cfg, comps.test_set), seed=cfg.world_seed)
    with autocast(comps.device, cfg):
        return read_pairs(comps.model, comps.processor, pair_prompt(comps.processor, spec, cfg.prompt), comps.test_set,
                          pairs, verdict_key=spec.verdict_key, image_size=cfg.image_size,
                          max_new_tokens=cfg.max_new_tokens, read=answer_reader(cfg, comps.test_set))


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
