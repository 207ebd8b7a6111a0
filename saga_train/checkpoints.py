"""Checkpoints of a run.

``save_checkpoint`` writes encoder + pooler + proxies + optimizer + scheduler + RNG states + step into one
safetensors file (metadata: the step, the optimizer's param groups, the scheduler, the Python / numpy RNG states and
the config); ``load_checkpoint`` restores all of it and refuses a checkpoint written with other settings than those
in ``RESUME_MAY_CHANGE``.

Every file is written through ``saga_train.atomic`` (crash consistency: a reader sees the old file or the new one).
The newest checkpoint is ``checkpoint.safetensors``, the one before ``checkpoint.previous.safetensors`` (rotated by
the save); the loader takes the newest that reads whole and warns when it falls back.
"""
import json
import os
import random
import warnings

import numpy as np
import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .config import ConfigError
from .errors import DamagedFileError, MissingFileError
from .files import damaged, one_line

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.previous.safetensors"
META_KEYS = ("step", "optim_param_groups", "scheduler", "rng_python", "rng_numpy", "config")
# settings a resumed run may change; any other difference from the checkpoint's config is an error
RESUME_MAY_CHANGE = ("resume", "auto_resume", "preempt_signal", "stop_after", "progress", "eval_before",
                     "eval_every_epoch", "eval_every", "checkpoint_every", "threads", "device", "workers",
                     "replay_tokens", "shard_llm", "init_embedder")  # init_embedder: the checkpoint holds the weights


def _trainable_state(comps) -> dict:
    state = {f"embedder.{k}": v for k, v in comps.embedder.state_dict().items()}
    state.update({f"metric.{k}": v for k, v in comps.metric_loss.state_dict().items()})
    return state


def save_checkpoint(comps, optimizer, scheduler, step: int, path: str) -> None:
    """Encoder + pooler + proxies + optimizer + scheduler + RNG states + step, one atomic safetensors file at
    ``path``; the checkpoint it replaces becomes ``checkpoint.previous.safetensors`` beside it."""
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
    with atomic_path(path, previous=previous_path(path)) as tmp:
        save_file(tensors, tmp, metadata={"saga": json.dumps(meta)})


def previous_path(path: str) -> str:
    """Where the checkpoint before ``path`` is kept."""
    return os.path.join(os.path.dirname(path), PREVIOUS)


def checkpoint_files(path: str) -> list:
    """The checkpoints a resume may read, newest first: ``path`` and the previous one, those that exist."""
    return [p for p in (path, previous_path(path)) if os.path.isfile(p)]


def read_checkpoint(path: str) -> tuple:
    """``(metadata, tensors)`` of the checkpoint ``path``; ``DamagedFileError`` naming it when it is empty,
    truncated, not safetensors or without the trainer's metadata."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise MissingFileError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise damaged(path, "the file is empty")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(path, f"not a whole safetensors file ({one_line(e)})") from e
    try:
        meta = json.loads(header["saga"])
    except (KeyError, json.JSONDecodeError) as e:
        raise damaged(path, f"not a saga_train checkpoint: no readable 'saga' metadata ({one_line(e)})") from e
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    missing += [k for k in ("rng.torch",) if k not in tensors]
    if missing:
        raise damaged(path, f"not a saga_train checkpoint: it lacks {', '.join(map(repr, missing))}")
    return meta, tensors


def load_checkpoint(comps, optimizer, scheduler, path: str, warn=None) -> int:
    """Restore everything ``save_checkpoint`` wrote; returns the step to continue from.

    Reads ``path``, or, when it is missing or damaged (a crash while it was replaced, a damaged disk), the previous
    checkpoint, with a warning through ``warn`` (default ``warnings.warn``). Raises ``MissingFileError`` when there is
    neither, ``DamagedFileError`` naming each file when none reads whole, ``ConfigError`` when the checkpoint was
    written with other settings than the run's (outside ``RESUME_MAY_CHANGE``).
    """
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    candidates = checkpoint_files(path)
    if not candidates:
        raise MissingFileError(f"--resume: no checkpoint at {path}")
    problems = []
    for candidate in candidates:
        try:
            meta, tensors = read_checkpoint(candidate)
            break
        except DamagedFileError as e:
            problems.append(str(e))
    else:
        raise DamagedFileError("--resume: no readable checkpoint: " + "; ".join(problems))
    if problems or candidate != path:
        warn(f"WARNING: resuming from the previous checkpoint {candidate} (step {meta['step']}): "
             + ("; ".join(problems) if problems else f"{path} is missing (the run was killed while replacing it)"))
    current = comps.cfg.to_dict()
    changed = sorted(k for k, v in meta["config"].items() if k not in RESUME_MAY_CHANGE and current.get(k) != v)
    if changed:
        raise ConfigError(f"--resume: {candidate} was written with other settings for: "
                          + ", ".join(f"{k} ({meta['config'][k]!r} -> {current.get(k)!r})" for k in changed))
    try:
        _restore(comps, optimizer, scheduler, meta, tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise damaged(candidate, f"does not fit this run's model or optimizer ({one_line(e)})") from e
    return int(meta["step"])


def _restore(comps, optimizer, scheduler, meta, tensors) -> None:
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


__all__ = ["CHECKPOINT", "PREVIOUS", "RESUME_MAY_CHANGE", "checkpoint_files", "load_checkpoint", "previous_path",
           "read_checkpoint", "save_checkpoint"]
