"""What a run shows and chooses about its GRPO signal: the supervisor's readout in every evaluation record, phase B's
counts by pair kind, hard pairs, the attribute reward, the shuffled-reward control, a tower started from another run's
embedder. A tiny random MLLM (tests/fakes.py gives it verdicts where a test needs reward variance)."""
import json
import os
import types

import pytest
import torch

from saga_train import components, rollout, sources
from saga_train import step as step_lib
from saga_train import train as train_lib
from saga_train.__main__ import report
from saga_train.config import ConfigError, make_config
from saga_train.data import samplers
from saga_train.errors import MissingFileError
from saga_train.experiments.plot import plot_run, read_curves
from saga_train.synthetic.world import ATTRIBUTE_NAMES

from test_train import first_batch, small

pytestmark = pytest.mark.usefixtures("torch_kernels")


def records(cfg):
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_evaluation_carries_the_readout_and_every_step_its_kinds(tmp_path, signal, capsys):
    cfg = small(tmp_path, max_steps=2, readout_pairs=4, eval_before=True)
    result = train_lib.train(cfg, log=lambda *_: None)
    evals = [r for r in records(cfg) if "eval" in r]
    assert [r["eval"] for r in evals] == ["before", "epoch 0"]
    for r in evals:
        keys = {"readout/verdict", "readout/verdict/same", "readout/verdict/one_attribute", "readout/verdict/random",
                "readout/parsed", "readout/descriptions_agree/same", "readout/attributes"}
        keys |= {f"readout/attribute/{name}" for name in ATTRIBUTE_NAMES}
        assert keys <= set(r) and all(0.0 <= r[k] <= 1.0 for k in keys)
    for r in (r for r in records(cfg) if "eval" not in r):
        for count in ("pairs_drawn", "groups_contributing", "groups_kept"):
            assert r[count] == sum(r[f"{count}_{kind}"] for kind in samplers.PAIR_KINDS), count
    assert result["rollouts"]["pairs_drawn"] == sum(result["rollouts"][f"pairs_drawn_{k}"] for k in samplers.PAIR_KINDS)
    curves = read_curves(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert curves["readout"]["verdict/same"]["steps"] == [0, 2]
    assert plot_run(cfg.run_dir).is_file()
    report(result)
    out = capsys.readouterr().out
    assert "supervisor readout: verdict" in out and "(before training: verdict" in out
    assert "by pair kind (drawn / with reward variance / replayed): same" in out


def test_readout_pairs_are_the_same_in_every_run(tmp_path):
    a = components.build_components(small(tmp_path, seed=1))
    b = components.build_components(small(tmp_path, seed=2))
    calls = []
    for comps in (a, b):
        comps.cfg = make_config(comps.cfg, readout_pairs=6, max_new_tokens=2)
        original = train_lib.read_pairs
        train_lib.read_pairs = lambda *args, **kw: calls.append(args[4]) or original(*args, **kw)
        try:
            answers = train_lib.run_readout(comps)
        finally:
            train_lib.read_pairs = original
        assert len(answers.kinds) == 6 and answers.attribute_right.shape == (6, 2, len(ATTRIBUTE_NAMES))
    assert calls[0] == calls[1]  # fixed by the world, not the training seed


def test_hard_pairs_are_mined_from_the_batch_with_the_current_embedding(tmp_path, monkeypatch):
    comps = components.build_components(small(tmp_path, pair_sampling="hard", max_pair_draws=6))
    batch = first_batch(comps)
    seen_calls = []
    original = step_lib.sample_hard_pairs

    def spy(embeddings, labels, count, generator, seen):
        before = set(seen)
        pairs = original(embeddings, labels, count, generator, seen=seen)
        seen_calls.append((embeddings, labels, before, pairs))
        return pairs

    monkeypatch.setattr(step_lib, "sample_hard_pairs", spy)
    _, stats = step_lib.phase_b(comps, step_lib.step_plan(comps), batch, 0)
    assert len(seen_calls) == 3 and stats.pairs_drawn == 6  # a random MLLM: no variance, every draw taken
    want = comps.embedder.embed_images(batch.images)
    for embeddings, labels, before, pairs in seen_calls:
        torch.testing.assert_close(embeddings.cpu(), want, rtol=0, atol=1e-6)
        assert labels == batch.labels
        assert all(max(a, b) < len(batch.labels) for a, b, _ in pairs)  # every draw from the batch
    assert seen_calls[2][2] >= {(min(a, b), max(a, b)) for a, b, _ in seen_calls[0][3]}  # later draws skip them


def test_attribute_reward_gets_each_pairs_true_attributes(tmp_path, monkeypatch):
    comps = components.build_components(small(tmp_path, reward="attributes"))
    batch = first_batch(comps)
    captured = []
    original = step_lib.sample_groups

    def spy(*args, rewards=None, **kw):
        captured.append(rewards)
        return original(*args, rewards=rewards, **kw)

    monkeypatch.setattr(step_lib, "sample_groups", spy)
    monkeypatch.setattr(step_lib, "sample_pairs", lambda labels, n, gen: [(0, 1, True), (0, 2, False)][:n])
    groups, _ = step_lib.phase_b(comps, step_lib.step_plan(comps), batch, 0)
    ds = comps.train_set
    rewards = captured[0]
    for reward, (i, j) in zip(rewards, ((0, 1), (0, 2))):
        a, b = batch.labels[i], batch.labels[j]
        assert isinstance(reward, rollout.AttributeReward)
        assert reward.same == (a == b) and reward.truths == (ds.attributes(a), ds.attributes(b))


def test_attribute_reward_is_refused_where_it_cannot_apply(tmp_path):
    for dataset in ("folder", "cub"):  # refused by the config, before anything loads
        with pytest.raises(ConfigError, match="reward='attributes'.*knows its classes' attributes"):
            make_config(dataset=dataset, reward="attributes")
    comps = types.SimpleNamespace(cfg=make_config(reward="attributes"), train_set=object(), dist=None)
    with pytest.raises(ConfigError, match="reward='attributes'.*knows its classes' attributes"):
        step_lib.step_plan(comps)  # a split without attributes
    with pytest.raises(ConfigError, match="pair_sampling"):
        make_config(pair_sampling="hardest")
    assert sources.answer_reader(make_config(dataset="cub"), object()) is None


def test_shuffled_rewards_keep_each_groups_rewards(tmp_path, signal):
    plain = components.build_components(small(tmp_path / "a", group_size=4, max_new_tokens=16))
    control = components.build_components(small(tmp_path / "b", group_size=4, max_new_tokens=16,
                                                shuffle_rewards=True))
    got = [step_lib.phase_b(c, step_lib.step_plan(c), first_batch(c), 0)[0] for c in (plain, control)]
    assert len(got[0]) == len(got[1]) >= 1
    for a, b in zip(*got):
        assert a.texts == b.texts and torch.equal(a.rewards.sort().values, b.rewards.sort().values)
    assert any(not torch.equal(a.rewards, b.rewards) for a, b in zip(*got))


def test_init_embedder_starts_from_another_runs_embedder(tmp_path):
    first = small(tmp_path / "a", max_steps=2, lambda_lm=0.0, lambda_kl=0.0, lr_encoder=1e-2, warmup_fraction=0.0)
    train_lib.train(first, log=lambda *_: None)
    saved = os.path.join(first.run_dir, "embedder")
    comps = components.build_components(small(tmp_path / "b", init_embedder=saved))
    fresh = components.build_components(small(tmp_path / "c"))
    from saga_train.model import load_embedder

    want = load_embedder(saved).state_dict()
    got = comps.embedder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(fresh.embedder.state_dict()[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="do not fit"):
        components.build_components(small(tmp_path / "d", init_embedder=saved, embedding_size=8))
    with pytest.raises(MissingFileError):
        components.build_components(small(tmp_path / "e", init_embedder=str(tmp_path / "nothing")))


def test_a_resume_ignores_init_embedder(tmp_path):
    """The checkpoint holds the weights: a resume neither needs the init directory nor reloads it."""
    first = small(tmp_path / "a", max_steps=2, lambda_lm=0.0, lambda_kl=0.0, warmup_fraction=0.0)
    train_lib.train(first, log=lambda *_: None)
    init = tmp_path / "init"
    os.rename(os.path.join(first.run_dir, "embedder"), init)
    common = dict(max_steps=2, lambda_lm=0.0, lambda_kl=0.0, init_embedder=str(init), eval_every_epoch=False)
    straight = small(tmp_path / "b", **common)
    train_lib.train(straight, log=lambda *_: None)
    halves = small(tmp_path / "c", **common, stop_after=1)
    train_lib.train(halves, log=lambda *_: None)
    os.rename(init, tmp_path / "moved")
    train_lib.train(make_config(halves, resume=True, stop_after=0, init_embedder=""), log=lambda *_: None)
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(c.run_dir, "checkpoint.safetensors")) for c in (straight, halves))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("embedder."))


def test_what_cannot_work_is_refused_before_training(tmp_path, capsys):
    from saga_train.__main__ import main

    with pytest.raises(ConfigError, match="class with >= 2 images"):
        train_lib.train(small(tmp_path, synthetic_test_images_per_class=1, max_steps=1), log=lambda *_: None)
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoint.safetensors"))  # refused before step 1
    with pytest.raises(ConfigError, match="max_eval_images"):
        train_lib.train(small(tmp_path, max_eval_images=1, max_steps=1), log=lambda *_: None)
    split = dict(synthetic_test_classes=30, synthetic_test_images_per_class=2)
    assert train_lib.readout_size(small(tmp_path, readout_pairs=2000, **split), sources.load_splits(
        small(tmp_path, **split))[1]) == 1770  # a small split is read whole (with a note in the log)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be a run directory"):
        train_lib.train(small(tmp_path, run_dir=str(tmp_path / "a-file" / "run"), max_steps=1), log=lambda *_: None)
    with pytest.raises(ConfigError, match="reward='attributes'"):
        make_config(dataset="folder", reward="attributes")
    assert main(["--model", "tiny-random", "--run-dir", str(tmp_path / "a-file"), "--max-steps", "1"]) == 2
    assert "cannot be a run directory" in capsys.readouterr().err
    with pytest.raises(MissingFileError, match="a file, not a directory"):
        components.build_components(small(tmp_path / "x", init_embedder=str(tmp_path / "a-file")))


def test_a_fresh_start_removes_an_earlier_runs_embedder(tmp_path):
    cfg = small(tmp_path, max_steps=1, lambda_lm=0.0, lambda_kl=0.0)
    train_lib.train(cfg, log=lambda *_: None)
    assert os.path.isdir(os.path.join(cfg.run_dir, "embedder"))
    train_lib.train(make_config(cfg, stop_after=0, max_steps=2, eval_every_epoch=False, eval_before=False,
                                checkpoint_every=0), log=lambda *_: None)
    halted = make_config(cfg, max_steps=4, stop_after=1)
    train_lib.train(halted, log=lambda *_: None)  # fresh, stopped before the end: no embedder of its own yet
    assert not os.path.exists(os.path.join(cfg.run_dir, "embedder"))
