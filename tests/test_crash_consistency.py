"""Crash consistency: a real training process SIGKILLed at any instant and then resumed (``--auto-resume``) ends with
the weights of an uninterrupted run, bitwise, and a metrics.jsonl with exactly one record per step and evaluation.

The kills: 13 named points (tests/crash_child.py: a half-written metrics line, a half-written checkpoint, a kill
while safetensors' own temporary file exists, between the checkpoint's rename of the old one and of the new one, a
written embedder not yet renamed in, inside an evaluation, inside a step before the update, between a step and its
checkpoint) and 12 instants drawn with a seeded RNG over the uninterrupted run's duration. The processes are forked
from a server that imported torch and saga_train once (multiprocessing forkserver): 52 runs in about 3 minutes on 2
cores.
"""
import json
import multiprocessing
import os
import random
import time

import pytest
import torch
from safetensors.torch import load_file

from saga_train.checkpoints import CHECKPOINT, PREVIOUS
from saga_train.train import EMBEDDER, METRICS

import crash_child

# a tiny run: 3 epochs x 2 steps, evaluations before and after each epoch, checkpoints at the epoch ends
CONFIG = dict(model="tiny-random", image_size=32, synthetic_images_per_class=2, classes_per_batch=4,
              images_per_class=2, pairs_per_step=2, group_size=3, contributing_pairs=1, max_pair_draws=3,
              max_new_tokens=10, embedding_size=16, proxies_per_class=2, progress=False, eval_before=True,
              max_eval_images=16, steps_per_epoch=2, epochs=3, temperature=1.0, auto_resume=True)
POINTS = [("record", 1), ("record", 5), ("checkpoint-file", 1), ("checkpoint-file", 3), ("library-temporary", 2),
          ("checkpoint-rename", 2),
          ("checkpoint-rename", 3), ("embedder", 1), ("evaluation", 1), ("evaluation", 3), ("optimizer", 3),
          ("optimizer", 6), ("after-step", 4)]
TIMED = 12
SEED = 22


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "saga_train.train", "saga_train.synthetic", "crash_child"])
    return ctx


def start(ctx, run_dir, cache, point=None):
    proc = ctx.Process(target=crash_child.run, args=({**CONFIG, "run_dir": str(run_dir)}, str(cache), point))
    proc.start()
    return proc


def finish(proc, timeout=300):
    proc.join(timeout)
    assert not proc.is_alive(), "the training process hung"
    return proc.exitcode


def records(run_dir):
    with open(os.path.join(run_dir, METRICS), encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def assert_same_run(ours, ref):
    for name in (CHECKPOINT, PREVIOUS, os.path.join(EMBEDDER, "embedder.safetensors")):
        a, b = load_file(os.path.join(ours, name)), load_file(os.path.join(ref, name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    got, want = records(ours), records(ref)
    assert [(r.get("eval"), r["step"]) for r in got] == [(r.get("eval"), r["step"]) for r in want]
    for r, w in zip(got, want):  # same values, but for the timings
        assert {k: v for k, v in r.items() if not k.startswith("time_")} == \
               {k: v for k, v in w.items() if not k.startswith("time_")}
    assert not [n for n in os.listdir(ours) if n.startswith(".")], "temporary files left behind"


def _killed_where_said(point, run_dir):
    """The run directory shows the kill came where the point says (the named points are not vacuous)."""
    names = os.listdir(run_dir)
    if point[0] == "record":
        with open(os.path.join(run_dir, METRICS), encoding="utf-8") as f:
            assert not f.read().endswith("\n")  # a torn last line
    elif point[0] == "checkpoint-file":
        assert any(n.startswith(f".{CHECKPOINT}.") for n in names)
    elif point[0] == "library-temporary":  # the writer's own temporary is inside ours, not loose in the run
        assert not any(n.startswith(".tmp") for n in names)
        assert any(n.startswith(f".{CHECKPOINT}.") and os.listdir(os.path.join(run_dir, n)) for n in names)
    elif point[0] == "checkpoint-rename":
        assert CHECKPOINT not in names and PREVIOUS in names
    elif point[0] == "embedder":
        assert EMBEDDER not in names and any(n.startswith(f".{EMBEDDER}.") for n in names)


def test_killed_at_any_instant_then_resumed_equals_uninterrupted(forkserver, tmp_path):
    cache = tmp_path / "cache"
    assert finish(start(forkserver, tmp_path / "ref", cache)) == 0  # (also starts the fork server)
    t0 = time.perf_counter()
    assert finish(start(forkserver, tmp_path / "again", cache)) == 0
    duration = time.perf_counter() - t0  # what the timed kills are drawn over
    assert_same_run(tmp_path / "again", tmp_path / "ref")  # two uninterrupted runs agree
    ref = records(tmp_path / "ref")
    assert sum("eval" in r for r in ref) == 4 and sum("eval" not in r for r in ref) == 6
    assert any(r.get("groups_kept") for r in ref)  # GRPO was part of the trajectory

    rng = random.Random(SEED)
    instants = [(point, None) for point in POINTS] + [(None, rng.uniform(0.0, duration)) for _ in range(TIMED)]
    killed = 0
    for k, (point, delay) in enumerate(instants):
        run_dir = tmp_path / f"run{k}"
        proc = start(forkserver, run_dir, cache, point)
        if delay is not None:
            proc.join(delay)
            proc.kill()
        code = finish(proc)
        killed += code == -9
        if point is not None:
            _killed_where_said(point, run_dir)
        assert code == -9 or (delay is not None and code == 0), f"{point or delay}: exit {code}"
        assert finish(start(forkserver, run_dir, cache)) == 0, f"resume after {point or delay}"
        assert_same_run(run_dir, tmp_path / "ref")
    print(f"{len(instants)} instants ({len(POINTS)} named, {TIMED} timed over {duration:.1f} s): {killed} killed the "
          f"run, {len(instants) - killed} came after its end; all {len(instants)} resumes bitwise equal")
    assert killed >= 20


WRITER = """
import os, signal, sys, threading, time
import torch
from saga_train.atomic import atomic_save_file
directory = sys.argv[1]

def kill_when_a_library_temporary_exists():
    while True:
        for root, _, files in os.walk(directory):
            if any(f.startswith(".tmp") for f in files):
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0005)

threading.Thread(target=kill_when_a_library_temporary_exists, daemon=True).start()
atomic_save_file({"x": torch.zeros(64 * 2**20)}, os.path.join(directory, "big.safetensors"))  # 256 MiB
"""


def test_a_kill_inside_the_safetensors_writer_leaves_only_what_the_next_start_removes(tmp_path):
    """The real safetensors (>= 0.7 writes a ``.tmp<6 random characters>`` of its own and renames it), SIGKILLed
    while that file exists: the directory holds only our private ``.big.safetensors.<random>.tmp/``, which
    remove_stale_temporaries takes away (the CI failure of a timed kill: a loose ``.tmppud2FN`` in the run
    directory)."""
    import subprocess
    import sys

    from saga_train.atomic import remove_stale_temporaries

    proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this safetensors writes no temporary file of its own")
    assert proc.returncode == -9, proc.stderr
    names = os.listdir(tmp_path)
    assert len(names) == 1 and names[0].startswith(".big.safetensors.") and names[0].endswith(".tmp"), names
    assert any(f.startswith(".tmp") for f in os.listdir(tmp_path / names[0]))  # the library's own, inside ours
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / names[0])]
    assert os.listdir(tmp_path) == []

