"""Checkpoints of a run, and the atomic file writers every file the project writes goes through.

``save_checkpoint`` writes encoder + pooler + proxies + optimizer + scheduler + RNG states + step into one
safetensors file (metadata: the step, the optimizer's param groups, the scheduler, the Python / numpy RNG states and
the config); ``load_checkpoint`` restores all of it and refuses a checkpoint written with other settings than those
in ``RESUME_MAY_CHANGE``. A write goes to a temporary file in the same directory and ``os.replace`` puts it in
place, so a reader never sees a half-written file.
"""
import json
import os
import random
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

from .config import ConfigError

CHECKPOINT = "checkpoint.safetensors"
# settings a resumed run may change; any other difference from the checkpoint's config is an error
RESUME_MAY_CHANGE = ("resume", "stop_after", "progress", "eval_before", "eval_every_epoch", "eval_every",
                     "checkpoint_every", "threads", "device", "workers", "replay_tokens", "shard_llm")


def atomic_save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors ``save_file`` through a temp file in the same directory + ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """``text`` into ``path`` (UTF-8) through a temp file in the same directory + ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _trainable_state(comps) -> dict:
    state = {f"embedder.{k}": v for k, v in comps.embedder.state_dict().items()}
    state.update({f"metric.{k}": v for k, v in comps.metric_loss.state_dict().items()})
    return state


def save_checkpoint(comps, optimizer, scheduler, step: int, path: str) -> None:
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


def load_checkpoint(comps, optimizer, scheduler, path: str) -> int:
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


__all__ = ["CHECKPOINT", "RESUME_MAY_CHANGE", "atomic_save_file", "atomic_write_text", "load_checkpoint",
           "save_checkpoint"]
