"""The training process tests/test_crash_consistency.py kills: a tiny run of the real trainer that SIGKILLs itself at
a named point (the n-th call of a writer, an evaluation, a step), or that the parent kills after a seeded delay.

A point is ``(name, n)``:
- ``record``: the n-th metrics line is half written (no newline), then the kill;
- ``checkpoint-file``: the n-th checkpoint's temporary file is half written, then the kill;
- ``library-temporary``: the n-th checkpoint is being written by safetensors, which (>= 0.7) writes a
  ``.tmp<6 random characters>`` of its own beside the path it was given and renames it; the kill comes while that
  file exists;
- ``checkpoint-rename``: the n-th checkpoint is written and the one before renamed to ``.previous``; the kill comes
  before the new one is renamed in (no ``checkpoint.safetensors`` at that instant);
- ``embedder``: the embedder's temporary directory is written; the kill comes before it is renamed in;
- ``evaluation``: the n-th evaluation has computed its metrics; the kill comes before they are recorded;
- ``optimizer``: inside the n-th step, after phases A-C, before the optimizer's update;
- ``after-step``: the n-th step's record is written; the kill comes before the checkpoint / evaluation after it.
"""
import os
import signal

import pytest

import fakes


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(n, before=None, after=None):
    """A wrapper factory: ``wrap(real)`` calls ``before(*args)`` then kills at the n-th call, or calls ``real`` and
    then ``after(*args)`` and kills."""
    calls = [0]

    def wrap(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n and before is not None:
                before(*args, **kwargs)
                kill()
            out = real(*args, **kwargs)
            if calls[0] == n and after is not None:
                after(*args, **kwargs)
                kill()
            return out
        return wrapper
    return wrap


def _half_line(path, record):
    import json

    line = json.dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line[: len(line) // 2])


def _truncate(tensors, path, metadata=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _library_temporary(tensors, path, metadata=None):
    with open(os.path.join(os.path.dirname(path), ".tmpK1LLed"), "wb") as f:
        f.write(b"half")


def install_point(mp: pytest.MonkeyPatch, name: str, n: int) -> None:
    from saga_train import checkpoints, runlog, train
    from saga_train.model import Embedder

    nothing = lambda *a, **k: None  # noqa: E731
    if name == "record":
        mp.setattr(runlog, "write_record", _on_call(n, before=_half_line)(runlog.write_record))
    elif name == "checkpoint-file":
        mp.setattr(checkpoints, "save_file", _on_call(n, after=_truncate)(checkpoints.save_file))
    elif name == "library-temporary":
        mp.setattr(checkpoints, "save_file", _on_call(n, before=_library_temporary)(checkpoints.save_file))
    elif name == "checkpoint-rename":
        real_replace = os.replace
        count = [0]

        def replace(src, dst):
            if os.path.basename(dst) == checkpoints.CHECKPOINT and os.path.dirname(src).endswith(".tmp"):
                count[0] += 1
                if count[0] == n:
                    kill()
            return real_replace(src, dst)
        mp.setattr(checkpoints.os, "replace", replace)
    elif name == "embedder":
        mp.setattr(Embedder, "save", _on_call(n, after=nothing)(Embedder.save))
    elif name == "evaluation":
        mp.setattr(train, "evaluate_embedder", _on_call(n, after=nothing)(train.evaluate_embedder))
    elif name == "optimizer":
        import torch

        mp.setattr(torch.optim.AdamW, "step", _on_call(n, before=nothing)(torch.optim.AdamW.step))
    elif name == "after-step":
        mp.setattr(runlog.RunLog, "end", _on_call(n, after=nothing)(runlog.RunLog.end))
    else:
        raise ValueError(f"unknown kill point {name!r}")


def run(config: dict, cache: str, point=None) -> int:
    """Train the tiny run ``config`` (keys of saga_train.config.Config) with rewards that vary (tests/fakes.py);
    SIGKILL at ``point`` (``(name, n)``) when given. Returns 0 when the run finished."""
    from saga_train.config import make_config
    from saga_train.train import train

    os.environ["SAGA_CACHE"] = cache
    os.environ["SAGA_IMPL"] = "torch"  # the kernels' own tests cover their Triton path
    mp = pytest.MonkeyPatch()
    fakes.install(mp)
    if point is not None:
        install_point(mp, *point)
    train(make_config(**config), log=lambda *_: None)
    return 0
