"""Phase B (saga_train.rollout + train.phase_b): every pair of a draw in ONE generate call, each image
through the vision tower once, dynamic sampling until K contributing groups or the cap."""
import itertools
import math

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
    assert set(rollout.RolloutStats.counts()) == set(stats.as_dict()) - {"reward_rate", "unparseable_rate"}
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
