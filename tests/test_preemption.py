"""Preemption (saga_train.preemption): SIGTERM or --preempt-signal stops the run after the step in flight with a
checkpoint, exit status 75; under torchrun a signal seen by one rank stops every rank after the same step; a
resumed run ends with the weights of an uninterrupted one. The newest checkpoint damaged: the previous one, with a
warning; both damaged: an error naming both.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file

from saga_train import train as train_lib
from saga_train.__main__ import main
from saga_train.checkpoints import CHECKPOINT, PREVIOUS
from saga_train.config import ConfigError, make_config
from saga_train.preemption import EXIT_PREEMPTED, PreemptionWatch, signal_number

import fakes
from test_distributed import free_port

pytestmark = pytest.mark.usefixtures("torch_kernels")

TINY = dict(model="tiny-random", image_size=32, synthetic_images_per_class=2, classes_per_batch=4, images_per_class=2,
            pairs_per_step=2, group_size=3, contributing_pairs=1, max_pair_draws=3, max_new_tokens=10,
            embedding_size=16, proxies_per_class=2, progress=False, eval_before=False, max_eval_images=16,
            steps_per_epoch=2, temperature=1.0)


def flags(config: dict) -> list:
    out = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def checkpoint_step(path) -> int:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["saga"])["step"]


def trained(run_dir, name=CHECKPOINT) -> dict:
    state = load_file(os.path.join(run_dir, name))
    return {k: v for k, v in state.items() if k.startswith(("embedder.", "metric.", "optim."))}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def step_records(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r["step"] for r in map(json.loads, f) if "eval" not in r]


@pytest.mark.parametrize("name, want", [("USR1", signal.SIGUSR1), ("sigusr2", signal.SIGUSR2),
                                        (str(int(signal.SIGINT)), signal.SIGINT)])
def test_signal_names(name, want):
    assert signal_number(name) == want
    assert make_config(preempt_signal=name).preempt_signal == name


@pytest.mark.parametrize("name, match", [("KILL", "cannot be caught"), ("SIGSTOP", "cannot be caught"),
                                         ("USR9", "not a signal name")])
def test_bad_signal_names_are_refused(name, match):
    with pytest.raises(ConfigError, match=match):
        make_config(preempt_signal=name)


def test_watch_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch("USR2") as watch:
        assert signal.getsignal(signal.SIGUSR2) == watch._handle
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert watch.received == "SIGUSR2"
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def test_sigterm_stops_the_cli_after_the_step_then_auto_resume_is_exact(tmp_path):
    """A real `python -m saga_train` gets SIGTERM once its first step is logged: it finishes the step in flight,
    writes a checkpoint holding every step it logged, says how to resume and exits 75; the same command with
    --auto-resume finishes with the weights of an uninterrupted run."""
    config = dict(TINY, steps_per_epoch=3, epochs=2)
    env = {**os.environ, "SAGA_IMPL": "torch", "SAGA_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "saga_train", *flags(config), "--auto-resume"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command + ["--run-dir", str(run_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('"step"') >= 1) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, out
    done = step_records(run_dir)
    k = len(done)
    assert 1 <= k < 6 and done == list(range(1, k + 1))
    assert f"preempted at step {k}; resume with --resume" in out and "SIGTERM received" in out
    assert checkpoint_step(run_dir / CHECKPOINT) == k

    resumed = subprocess.run(command + ["--run-dir", str(run_dir)], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(command + ["--run-dir", str(tmp_path / "straight")], env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    assert_same(trained(run_dir), trained(tmp_path / "straight"))
    assert step_records(run_dir) == list(range(1, 7))


def _rank(rank, world, port, config, out_dir, signal_rank, signal_step):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fakes.install()
    if rank == signal_rank:  # SIGUSR1 (SLURM's --signal) reaches this rank only, inside step `signal_step`
        real_step, calls = torch.optim.AdamW.step, [0]

        def step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == signal_step:
                os.kill(os.getpid(), signal.SIGUSR1)
            return real_step(self, *args, **kwargs)
        torch.optim.AdamW.step = step
    result = train_lib.train(make_config(**config), log=lambda *_: None)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"preempted": result.get("preempted"), "final_step": result["final_step"],
                   "digest": result["parameter_digest"]}, f)
    torch.distributed.destroy_process_group()


def run_ranks(config, out_dir, signal_rank=-1, signal_step=0) -> list:
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_rank, args=(2, free_port(), config, str(out_dir), signal_rank, signal_step), nprocs=2,
                       join=True, start_method="fork")
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    config = dict(TINY, steps_per_epoch=2, epochs=2, eval_every_epoch=False, auto_resume=True)
    run = dict(config, run_dir=str(tmp_path / "run"))
    stopped = run_ranks(run, tmp_path / "a", signal_rank=1, signal_step=2)
    assert [r["preempted"] for r in stopped] == [2, 2] and [r["final_step"] for r in stopped] == [2, 2]
    assert checkpoint_step(tmp_path / "run" / CHECKPOINT) == 2 and step_records(tmp_path / "run") == [1, 2]
    resumed = run_ranks(run, tmp_path / "b")
    straight = run_ranks(dict(config, run_dir=str(tmp_path / "straight")), tmp_path / "c")
    assert [r["preempted"] for r in resumed] == [None, None]
    assert resumed[0]["digest"] == resumed[1]["digest"] == straight[0]["digest"]
    assert step_records(tmp_path / "run") == [1, 2, 3, 4]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, signal, capsys):
    """Checkpoints after steps 2 and 4 of 6; the newest truncated: the resume warns, takes step 2 and ends where an
    uninterrupted run does. Both truncated: `error:` naming both files, exit 2."""
    config = dict(TINY, epochs=3, eval_every_epoch=False)
    straight = make_config(**config, run_dir=str(tmp_path / "straight"))
    train_lib.train(straight, log=lambda *_: None)
    cfg = make_config(**config, run_dir=str(tmp_path / "run"), stop_after=4)
    train_lib.train(cfg, log=lambda *_: None)
    assert checkpoint_step(tmp_path / "run" / PREVIOUS) == 2 and checkpoint_step(tmp_path / "run" / CHECKPOINT) == 4
    _truncate(tmp_path / "run" / CHECKPOINT)
    messages = []
    result = train_lib.train(make_config(cfg, stop_after=0, auto_resume=True), log=messages.append)
    warning = next(m for m in messages if m.startswith("WARNING"))
    assert f"previous checkpoint {tmp_path / 'run' / PREVIOUS} (step 2)" in warning
    assert str(tmp_path / "run" / CHECKPOINT) in warning and "not a whole safetensors file" in warning
    assert result["final_step"] == 6 and step_records(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    assert_same(trained(tmp_path / "run"), trained(tmp_path / "straight"))

    for name in (CHECKPOINT, PREVIOUS):
        _truncate(tmp_path / "run" / name)
    argv = flags(config) + ["--run-dir", str(tmp_path / "run"), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: no readable checkpoint") and err.count("\n") == 1
    assert str(tmp_path / "run" / CHECKPOINT) in err and str(tmp_path / "run" / PREVIOUS) in err
