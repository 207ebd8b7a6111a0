"""Phase B (saga_train.rollout + train.phase_b): every pair of a draw in ONE generate call, each image
through the vision tower once, dynamic sampling until K contributing groups or the cap."""
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from saga_train import components, rollout, runlog
from saga_train import step as step_lib
from saga_train.config import make_config
from saga_train.data import stream
from saga_train.prompts import pair_prompt, prompt_spec
from saga_train.synthetic.answers import vocabulary
from saga_train.synthetic.tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

IMAGE_SIZE = 32  # 16 patches per image


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("SAGA_IMPL", "torch")


def random_image(rng):
    return Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


class Counter:
    """Counts ``model.generate`` calls (and their sequences) and the rows the vision tower encodes per call."""

    def __init__(self, model):
        self.generate_sequences, self.tower_rows = [], []
        original = model.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            self.generate_sequences.append(out.shape[0])
            return out

        model.generate = generate
        model.model.visual.register_forward_hook(lambda mod, args, out: self.tower_rows.append(args[0].shape[0]))


def test_one_generate_call_for_all_pairs_each_image_encoded_once():
    spec = prompt_spec("cub")
    tokenizer = build_tokenizer(vocabulary(spec))
    processor = build_processor(tokenizer, IMAGE_SIZE)
    model = build_tiny_qwen3vl(tokenizer, image_size=IMAGE_SIZE).eval()
    counter = Counter(model)
    rng = np.random.default_rng(0)
    prompts = [pair_prompt(processor, spec, "dataset"), pair_prompt(processor, spec, "generic"),
               pair_prompt(processor, spec, "dataset")]  # two prompt lengths: the batch is left-padded
    inputs = [rollout.pair_inputs(model, processor, p, random_image(rng), random_image(rng)) for p in prompts]
    options = rollout.SamplingOptions(group_size=4, temperature=1.0, top_p=0.95, max_new_tokens=6,
                                      verdict_key=spec.verdict_key)
    torch.manual_seed(0)
    groups = rollout.sample_groups(model, tokenizer, inputs, [True, False, True], options)
    assert counter.generate_sequences == [3 * 4]  # one call: pairs x G sequences
    assert counter.tower_rows == [3 * 2 * 16]  # one tower pass over the 6 images (not G copies of each)
    assert [g.same for g in groups] == [True, False, True]
    for group, pair in zip(groups, inputs):
        assert group.inputs is pair  # the pair's own unpadded prompt: phase C's shared prefix
        assert group.completion_ids.shape[0] == 4 == len(group.texts) == len(group.verdicts)
        assert group.completion_ids.shape[1] == int(group.completion_mask.sum(-1).max())  # trimmed to the longest
        assert not torch.isin(group.completion_ids, torch.tensor(rollout.suppressed_token_ids(model))).any()


def test_rollout_stats_fields_listed_once():
    stats = rollout.RolloutStats()
    group = rollout.Group(same=True, inputs={}, completion_ids=torch.zeros(3, 2, dtype=torch.long),
                          completion_mask=torch.ones(3, 2, dtype=torch.bool), texts=["", "", ""],
                          verdicts=[True, None, False], rewards=torch.tensor([1.0, 0.0, 0.0]),
                          advantages=torch.zeros(3))
    stats.add([group, group])
    assert (stats.pairs_drawn, stats.completions, stats.rewarded, stats.unparseable, stats.generate_calls) == (2, 6, 2,
                                                                                                            2, 1)
    derived = {"reward_rate", "reward_mean", "unparseable_rate"}
    assert set(rollout.RolloutStats.counts()) == set(stats.as_dict()) - derived
    assert stats.as_dict()["reward_rate"] == pytest.approx(1 / 3)
    assert set(rollout.RolloutStats.counts()) <= set(runlog.RunLog.SUMMED)


def small(tmp_path, **kw):
    base = dict(image_size=32, synthetic_images_per_class=2, classes_per_batch=4, images_per_class=2, group_size=3,
                max_new_tokens=6, embedding_size=16, proxies_per_class=2, progress=False, eval_before=False,
                steps_per_epoch=2, run_dir=str(tmp_path / "run"))
    return make_config(**{**base, **kw})


def first_batch(comps):
    index = stream.epoch_batches(comps.cfg, comps.train_set, 0, 1)[0]
    return stream.collate_batch([comps.train_set[i] for i in index])


@pytest.mark.parametrize("verdict, expect_kept", [("mixed", True), ("never", False)])
def test_phase_b_draws_until_k_groups_or_the_cap(tmp_path, monkeypatch, verdict, expect_kept):
    """Draws of ``pairs_per_step`` pairs, one generate call each, until K groups have reward variance or
    ``max_pair_draws`` pairs were sampled; at most K groups are kept and the counts add up. "mixed": the
    G = 3 verdicts of every group are yes / no / unparseable, so every group has reward variance whatever
    was sampled and the first draw of 2 pairs is enough; "never": no verdict parses, the cap stops it."""
    cycle = itertools.cycle([True, False, None])
    parse = {"mixed": lambda text, key: next(cycle), "never": lambda text, key: None}[verdict]
    monkeypatch.setattr(rollout.verdict_lib, "parse_verdict", parse)
    comps = components.build_components(small(tmp_path, pairs_per_step=2, contributing_pairs=2, max_pair_draws=5))
    counter = Counter(comps.model)
    plan = step_lib.step_plan(comps)
    torch.manual_seed(0)  # the trainer seeds every step (generate samples from the global RNG)
    groups, stats = step_lib.phase_b(comps, plan, first_batch(comps), step=0)
    assert stats.generate_calls == len(counter.generate_sequences) == math.ceil(stats.pairs_drawn / 2)
    assert all(n == 3 * 2 for n in counter.generate_sequences[:-1])  # full draws; the last may be cut by the cap
    assert stats.completions == 3 * stats.pairs_drawn == sum(counter.generate_sequences)
    assert stats.groups_kept == len(groups) == min(2, stats.groups_contributing) and all(g.contributes for g in groups)
    assert stats.shortfall == 2 - len(groups)
    if expect_kept:
        assert len(groups) == 2 and stats.pairs_drawn == 2 and counter.generate_sequences == [6]
    else:
        assert groups == [] and stats.pairs_drawn == 5 and stats.unparseable == stats.completions
        assert counter.generate_sequences == [6, 6, 3]  # 2 + 2 + 1 pairs: the cap cuts the last draw
    # the same step draws the same pairs and samples the same completions
    torch.manual_seed(0)
    cycle = itertools.cycle([True, False, None])
    again, _ = step_lib.phase_b(comps, plan, first_batch(comps), step=0)
    assert [g.texts for g in again] == [g.texts for g in groups]


def test_token_char_ranges_streamed_equal_prefix_decoding():
    """The O(T) streamed ranges are those of decoding growing prefixes (the fallback)."""
    spec = prompt_spec("cub")
    answer = '{"item 1": {"bill shape": "hooked"}, "item 2": "short bill, blue crown", "same_species": "no"}'
    tokenizer = build_tokenizer(vocabulary(spec) + [answer])
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    class Slow:  # the same tokenizer without a tokenizers backend: the prefix-decoding fallback
        def decode(self, ids, skip_special_tokens=False):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    fast, slow = rollout.token_char_ranges(tokenizer, ids), rollout.token_char_ranges(Slow(), ids)
    assert fast == slow and fast[-1] == (len(answer), len(answer))  # EOS: skipped, empty
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(text[s:e] for s, e in fast) == text == answer


# ------------------------------------------------------------------------------------------ rewards, kinds
def _group(same, verdicts, rewards, kind=""):
    g = len(verdicts)
    return rollout.Group(same=same, inputs={}, completion_ids=torch.zeros(g, 2, dtype=torch.long),
                         completion_mask=torch.ones(g, 2, dtype=torch.bool), texts=[""] * g, verdicts=verdicts,
                         rewards=torch.tensor(rewards), advantages=torch.zeros(g), kind=kind)


def test_attribute_reward_is_the_verdict_plus_the_fraction_described_right():
    from saga_train.synthetic.answers import build_answer, parse_answer
    from saga_train.synthetic.world import ATTRIBUTE_NAMES
    from saga_train.verdict import parse_verdict

    names = list(ATTRIBUTE_NAMES)
    a = dict(zip(names, ("red", "blue", "green", "striped", "long", "fan")))
    b = dict(a, **{"wing color": "red"})
    reward = rollout.AttributeReward(False, (a, b), lambda t: parse_answer(t, names))

    def score(text):
        return reward(text, parse_verdict(text, "same_species"))

    assert score(build_answer(a, b, names)) == 2.0
    assert score(build_answer(a, b, names).replace('"no"', '"yes"')) == 1.0  # every value right, verdict wrong
    seen_as = dict(b, **{"tail shape": "forked", "beak shape": "hooked"})  # item 2 read with two values wrong
    assert score(build_answer(a, seen_as, names)) == pytest.approx(1.0 + 10 / 12, abs=1e-15)
    assert score("not an answer") == 0.0
    assert rollout.AttributeReward(True, (a, a), lambda t: {})("", True) == 1.0  # nothing described


def test_shuffled_rewards_are_a_seeded_permutation():
    rewards = torch.arange(8.0)
    once = rollout.shuffled(rewards, 5)
    assert torch.equal(once, rollout.shuffled(rewards, 5)) and not torch.equal(once, rewards)
    assert torch.equal(once.sort().values, rewards)


def test_sample_groups_uses_the_pair_rewards_and_shuffles_them():
    spec = prompt_spec("cub")
    tokenizer = build_tokenizer(vocabulary(spec))
    processor = build_processor(tokenizer, IMAGE_SIZE)
    model = build_tiny_qwen3vl(tokenizer, image_size=IMAGE_SIZE).eval()
    rng = np.random.default_rng(0)
    inputs = [rollout.pair_inputs(model, processor, pair_prompt(processor, spec), random_image(rng),
                                  random_image(rng)) for _ in range(2)]
    options = rollout.SamplingOptions(group_size=4, temperature=1.0, top_p=1.0, max_new_tokens=5,
                                      verdict_key=spec.verdict_key)
    by_length = [lambda text, verdict: float(len(text)), lambda text, verdict: -float(len(text))]
    groups = rollout.sample_groups(model, tokenizer, inputs, [True, False], options, seeds=[1, 2], rewards=by_length)
    for group, sign in zip(groups, (1, -1)):
        assert group.rewards.tolist() == [sign * float(len(t)) for t in group.texts]
        assert torch.equal(group.correct, torch.zeros(4, dtype=torch.bool))  # no verdict from a random model
    control = rollout.sample_groups(model, tokenizer, inputs, [True, False], replace(options, shuffle_rewards=True),
                                    seeds=[1, 2], rewards=by_length)
    for group, shuffled, seed in zip(groups, control, (1, 2)):
        assert group.texts == shuffled.texts  # the same completions ...
        assert torch.equal(shuffled.rewards, rollout.shuffled(group.rewards, seed))  # ... rewards permuted
    with pytest.raises(ValueError, match="rewards 1"):
        rollout.sample_groups(model, tokenizer, inputs, [True, False], options, rewards=by_length[:1])


def test_rollout_stats_by_pair_kind():
    stats = rollout.RolloutStats()
    groups = [_group(True, [True, False], [1.0, 0.0], "same"), _group(True, [True, True], [1.0, 1.0], "same"),
              _group(False, [False, None], [1.5, 0.25], "one_attribute"), _group(False, [True, True], [0.0, 0.0],
                                                                                 "different")]
    stats.add(groups)
    stats.keep([groups[0], groups[2]])
    d = stats.as_dict()
    assert (d["pairs_drawn_same"], d["pairs_drawn_one_attribute"], d["pairs_drawn_different"]) == (2, 1, 1)
    assert (d["groups_contributing_same"], d["groups_contributing_one_attribute"],
            d["groups_contributing_different"]) == (1, 1, 0)
    assert (d["groups_kept"], d["groups_kept_same"], d["groups_kept_one_attribute"]) == (2, 1, 1)
    assert d["rewarded"] == 4 and d["reward_total"] == 4.75  # right verdicts; the sum of the rewards
    assert d["reward_rate"] == 0.5 and d["reward_mean"] == 4.75 / 8
    with pytest.raises(ValueError, match="unknown pair kind"):
        stats.add([_group(True, [True], [1.0], "odd")])
