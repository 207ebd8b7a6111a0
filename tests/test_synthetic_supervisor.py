"""The synthetic supervisor: answer format, pairs, SFT batches, a micro training run, the cache rules."""
import dataclasses
import json
import random

import pytest
import torch

from saga_train import prompts as prompt_lib
from saga_train.synthetic import __main__ as synthetic_cli
from saga_train.synthetic import answers, store
from saga_train.synthetic import supervisor as sup
from saga_train.synthetic.world import ATTRIBUTE_NAMES, num_differences
from saga_train.verdict import item_span, parse_verdict

NAMES = list(ATTRIBUTE_NAMES)
A = {"body color": "red", "wing color": "blue", "head color": "green", "wing pattern": "striped",
     "beak shape": "long", "tail shape": "fan"}
B = dict(A, **{"beak shape": "hooked", "tail shape": "forked"})
MICRO = sup.SupervisorConfig(image_size=32, text_hidden=32, heads=2, kv_heads=1, vision_hidden=16, vision_depth=2,
                             steps=15, batch_pairs=4, lr=3e-3, warmup_steps=2, eval_pairs=8, eval_batch=8,
                             tower_steps=3, tower_batch=8, threads=1)


@pytest.fixture(scope="module")
def world():
    train_set, test_set = sup.synthetic_splits(MICRO)
    model, processor, prompts, spec = sup.build_untrained(MICRO, train_set)
    return train_set, test_set, model, processor, prompts, spec


def test_answer_round_trip_and_verdict():
    same, diff = answers.build_answer(A, A, NAMES), answers.build_answer(A, B, NAMES)
    data = json.loads(diff)
    assert list(data) == ["item 1", "item 2", "differences", "confidence", "reasoning", "same_species"]
    assert data["item 1"] == ("red body color, blue wing color, green head color, striped wing pattern, "
                              "long beak shape, fan tail shape")
    assert data["differences"] == ("body color red vs red match, wing color blue vs blue match, "
                                   "head color green vs green match, wing pattern striped vs striped match, "
                                   "beak shape long vs hooked differ, tail shape fan vs forked differ")
    assert data["reasoning"] == "2 of 6 attributes differ" and data["same_species"] == "no"
    assert json.loads(same)["same_species"] == "yes"
    for text, (a, b), verdict in ((same, (A, A), True), (diff, (A, B), False)):
        got = answers.parse_answer(text, NAMES)
        differences = {n: "match" if a[n] == b[n] else "differ" for n in NAMES}
        assert got == {"item 1": a, "item 2": b, "differences": differences, "verdict": verdict}
        assert parse_verdict(text, answers.VERDICT_KEY) is verdict  # the trainer's reward reads it the same way
        start, end = item_span(text, "item 1")  # the span L_KL uses
        assert json.loads(text[start:end]) == answers.describe(a, NAMES)
    with pytest.raises(KeyError, match="missing"):
        answers.build_answer(A, {"body color": "red"}, NAMES)


def test_parse_answer_tolerates_broken_text():
    text = answers.build_answer(A, B, NAMES)
    cut = text[:text.index('"differences"') + 40]  # truncated inside the differences block
    got = answers.parse_answer("Sure! " + cut, NAMES)
    assert got["item 1"] == A and got["item 2"] == B
    assert got["verdict"] is None and all(v is None for v in got["differences"].values())
    spaced = text.replace('": "', '" : "').replace(", ", " , ")  # a decode that spaces out punctuation
    assert answers.parse_answer(spaced, NAMES)["item 2"] == B
    shuffled = '{"item 1": "fan tail shape, red body color, red body color, oops", "same_species": "yes"}'
    got = answers.parse_answer(shuffled, NAMES)
    assert got["item 1"] == dict(dict.fromkeys(NAMES), **{"tail shape": "fan", "body color": "red"})
    assert got["verdict"] is True
    nothing = answers.parse_answer("no json here", NAMES)
    assert nothing["verdict"] is None and nothing["item 1"] == dict.fromkeys(NAMES)


def test_vocabulary_covers_prompt_and_every_answer(world):
    train_set, _, _, processor, prompts, spec = world
    tokenizer = processor.tokenizer
    assert set(prompts) == {"dataset", "generic"} and prompts["dataset"] != prompts["generic"]
    for prompt in prompts.values():
        assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]
    rng = random.Random(0)
    for _ in range(30):
        a, b = rng.randrange(len(train_set.combinations)), rng.randrange(len(train_set.combinations))
        answer = answers.build_answer(train_set.attributes(a), train_set.attributes(b), spec.attributes)
        ids = tokenizer(answer)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == answer


def test_shipped_supervisor_is_intact_and_reads_every_attribute(world):
    """The package ships the supervisor of ``SupervisorConfig()``: every file matches its recorded sha256, the code
    still builds its tokenizer (same words, same ids), and its recorded held-out metrics meet the bar."""
    cfg = sup.SupervisorConfig()
    path = store.shipped_dir(cfg)
    assert path is not None, f"no supervisor shipped for SupervisorConfig() (hash {store.config_hash(cfg)})"
    marker = store.verify_supervisor(path, cfg)
    _, processor = store.load_supervisor(path)
    assert processor.tokenizer.get_vocab() == world[3].tokenizer.get_vocab()  # MICRO: the default's seed and split
    for key in ("heldout", "heldout_generic"):
        held = marker["metrics"][key]
        assert held["pairs"] >= 256 and held["verdict_accuracy"] >= 0.95, key
        assert min(held["attribute_accuracy_by_name"].values()) >= 0.90, key


def test_shipped_supervisor_answers_held_out_pairs():
    """A few held-out-class pairs (every kind), greedy, both prompts: what the recorded metrics claim holds."""
    from saga_train.prompts import pair_prompt, prompt_spec

    cfg = sup.SupervisorConfig()
    model, processor = store.load_supervisor(store.shipped_dir(cfg))
    train_set, test_set = sup.synthetic_splits(cfg)
    spec = prompt_spec("synthetic", train_set)
    pairs = sup.eval_pairs(cfg, test_set)[::16]  # 8 same-class, 4 one-attribute, 4 random pairs
    assert [p[0] for p in pairs].count("same") == 8
    for style in prompt_lib.PROMPT_STYLES:
        scores = sup.evaluate_supervisor(model, processor, pair_prompt(processor, spec, style), test_set, pairs, spec,
                                         batch=16)
        assert scores["verdict_accuracy"] >= 14 / 16 and scores["attribute_accuracy"] >= 0.9, (style, scores)


def test_pair_sampler_kinds_and_eval_pairs(world):
    train_set, test_set, *_ = world
    sampler = sup.PairSampler(train_set)
    rng = random.Random(1)
    for kind, differences in (("same", {0}), ("one_attribute", {1}), ("random", set(range(1, 7)))):
        for _ in range(20):
            a, b = sampler.sample(rng, kind)
            assert num_differences(train_set.combinations[a], train_set.combinations[b]) in differences
    with pytest.raises(ValueError, match="pair kind"):
        sampler.sample(rng, "other")
    cfg = dataclasses.replace(MICRO, eval_pairs=40)
    pairs = sup.eval_pairs(cfg, test_set)
    assert pairs == sup.eval_pairs(cfg, test_set)  # fixed by the seed
    assert [p[0] for p in pairs].count("same") == 20 and [p[0] for p in pairs].count("one_attribute") == 10
    assert all(a != b or ia != ib for _, a, ia, b, ib in pairs)  # a same-class pair shows two images
    held_out = set(map(tuple, test_set.combinations))
    assert not held_out & set(map(tuple, train_set.combinations))


def test_sft_batch_labels_only_the_answer(world):
    train_set, _, _, processor, prompts, spec = world
    rng = random.Random(2)
    batch = sup.train_batch(MICRO, rng, sup.PairSampler(train_set), train_set, prompts, processor, spec)
    tokenizer = processor.tokenizer
    styles = []
    assert (batch["input_ids"].shape[0] == MICRO.batch_pairs
            and batch["image_grid_thw"].shape[0] == 2 * MICRO.batch_pairs)
    for row in range(MICRO.batch_pairs):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        text = tokenizer.decode(labelled)
        assert text.endswith(tokenizer.eos_token)
        answer = answers.parse_answer(text[:-len(tokenizer.eos_token)], NAMES)
        assert None not in answer["item 1"].values() and answer["verdict"] is not None
        first = (batch["labels"][row] != -100).nonzero()[0, 0]
        prompt = tokenizer.decode(batch["input_ids"][row, :first], skip_special_tokens=False)
        assert prompt.endswith("<|im_start|>assistant\n")
        styles.append(next(style for style in prompts if prompt_lib.instruction(spec, style) in prompt))
    assert set(styles) == {"dataset", "generic"}  # MICRO: half the pairs are asked with the generic prompt
    with pytest.raises(ValueError, match="one prompt and two images per answer"):
        sup.sft_batch(processor, [prompts["dataset"]], [], ["{}"])


def test_micro_sft_lowers_the_loss_and_is_deterministic(world):
    train_set, _, untrained, processor, prompts, spec = world
    fixed = sup.train_batch(MICRO, random.Random(99), sup.PairSampler(train_set), train_set, prompts, processor, spec)
    trained, _, metrics = sup.train_supervisor(MICRO, progress=False, evaluate=False)
    with torch.no_grad():
        before, after = untrained(**fixed).loss.item(), trained(**fixed).loss.item()
    assert after < before - 0.5, (before, after)
    assert metrics["train_loss_last20"] < metrics["train_loss_first"]
    again, _, _ = sup.train_supervisor(dataclasses.replace(MICRO, steps=3), progress=False, evaluate=False)
    twice, _, _ = sup.train_supervisor(dataclasses.replace(MICRO, steps=3), progress=False, evaluate=False)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), twice.parameters()))


def test_stage1_is_cached_apart_from_stage2(tmp_path, monkeypatch):
    cfg = dataclasses.replace(MICRO, steps=2)
    first, _, metrics = sup.train_supervisor(cfg, progress=False, evaluate=False)
    assert sup.stage1_path(cfg).is_file() and "cached" not in metrics["stage1"]
    other_sft = dataclasses.replace(cfg, steps=3, lr=1e-3, generic_fraction=0.0)
    assert sup.stage1_path(other_sft) == sup.stage1_path(cfg)
    assert sup.stage1_path(dataclasses.replace(cfg, tower_lr=5e-4)) != sup.stage1_path(cfg)
    reused, _, again = sup.train_supervisor(other_sft, progress=False, evaluate=False)
    assert again["stage1"].pop("cached") == str(sup.stage1_path(cfg)) and again["stage1"] == metrics["stage1"]
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "fresh"))  # from scratch: the same weights as with the cache
    scratch, _, _ = sup.train_supervisor(other_sft, progress=False, evaluate=False)
    assert all(torch.equal(p, q) for p, q in zip(reused.parameters(), scratch.parameters()))


class _OracleModel:
    """Stands in for the model in ``evaluate_supervisor``: answers with queued texts."""

    def __init__(self, tokenizer, answers, config):
        self.tokenizer, self.answers, self.training, self.config = tokenizer, list(answers), False, config

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, **_):
        rows = [self.tokenizer(self.answers.pop(0) + self.tokenizer.eos_token)["input_ids"] for _ in input_ids]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_scores_answers(world):
    _, test_set, model, processor, prompts, spec = world
    prompt = prompts["dataset"]
    pairs = sup.eval_pairs(dataclasses.replace(MICRO, eval_pairs=6), test_set)
    attrs = [(test_set.attributes(a), test_set.attributes(b)) for _, a, _, b, _ in pairs]
    truths = [answers.answer_dict(a, b, NAMES) for a, b in attrs]
    perfect = _OracleModel(processor.tokenizer, [json.dumps(t) for t in truths], model.config)
    scores = sup.evaluate_supervisor(perfect, processor, prompt, test_set, pairs, spec, batch=4)
    assert scores["verdict_accuracy"] == scores["attribute_accuracy"] == scores["exact_match"] == 1.0
    assert scores["differences_accuracy"] == scores["parse_rate"] == 1.0
    flipped = [dict(t, same_species="no" if t["same_species"] == "yes" else "yes") for t in truths]
    for t, (_, b) in zip(flipped, attrs):
        t["item 2"] = answers.describe(dict(b, **{"tail shape": "none"}), NAMES)
    scores = sup.evaluate_supervisor(_OracleModel(processor.tokenizer, [json.dumps(t) for t in flipped], model.config),
                                     processor, prompt, test_set, pairs, spec, batch=4)
    assert scores["verdict_accuracy"] == 0.0 and scores["exact_match"] == 0.0
    assert scores["attribute_accuracy_by_name"]["tail shape"] == 0.5  # item 1 right, item 2 wrong
    assert scores["attribute_accuracy_by_name"]["body color"] == 1.0


def test_micro_evaluation_runs_on_the_real_model(world):
    _, test_set, model, processor, prompts, spec = world
    pairs = sup.eval_pairs(dataclasses.replace(MICRO, eval_pairs=4), test_set)
    scores = sup.evaluate_supervisor(model, processor, prompts["generic"], test_set, pairs, spec, batch=4,
                                     max_new_tokens=8)
    assert scores["pairs"] == 4 and 0.0 <= scores["verdict_accuracy"] <= 1.0
    assert set(scores["verdict_accuracy_by_kind"]) <= set(sup.PAIR_KINDS)


def test_cache_refuses_foreign_directories(tmp_path, monkeypatch):
    cfg = dataclasses.replace(MICRO, steps=2, eval_pairs=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("precious")
    with pytest.raises(store.SupervisorCacheError, match="refusing to overwrite"):
        sup.ensure_supervisor(cfg, foreign, progress=False)
    with pytest.raises(store.SupervisorCacheError):
        sup.ensure_supervisor(cfg, foreign, force=True, progress=False)
    assert (foreign / "weights.bin").read_text() == "precious"
    assert synthetic_cli.main(["--out", str(foreign), "--steps", "2"]) == 2

    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "cache"))
    target = store.supervisor_dir(cfg)
    assert target.parent == tmp_path / "cache" and target.name.startswith("supervisor-")
    assert store.supervisor_dir(dataclasses.replace(cfg, threads=2)) == target
    assert store.supervisor_dir(dataclasses.replace(cfg, seed=1)) != target
    path = sup.ensure_supervisor(cfg, progress=False)
    assert path == target and not target.with_name(target.name + ".partial").exists()
    marker = store.read_marker(path)
    assert marker["complete"] and marker["hash"] == store.config_hash(cfg)
    assert {"heldout", "heldout_generic", "stage1"} <= set(marker["metrics"])
    assert set(marker["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json", "metrics.json"}
    model, processor = store.load_supervisor(path)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def no_training(*args, **kwargs):
        raise AssertionError("a complete cached supervisor must be reused, not retrained")

    monkeypatch.setattr(sup, "train_supervisor", no_training)
    assert sup.ensure_supervisor(cfg, progress=False) == path
    other = dataclasses.replace(cfg, seed=3)
    with pytest.raises(store.SupervisorCacheError, match="another config"):
        sup.ensure_supervisor(other, path, progress=False)
    (path / "metrics.json").write_text("{}")  # a file changed after it was written: refused, not used
    with pytest.raises(store.SupervisorCacheError, match=r"changed since it was written: changed \[.metrics.json.\]"):
        sup.ensure_supervisor(cfg, progress=False)


def test_nothing_is_written_into_the_package_and_nothing_half_written_stays(tmp_path, monkeypatch):
    shipped = store.shipped_dir(sup.SupervisorConfig())
    before = store.file_digests(shipped)
    for out in (shipped, shipped.parent / "supervisor-other"):
        with pytest.raises(store.SupervisorCacheError, match="refusing to write into the package"):
            sup.ensure_supervisor(MICRO, out, force=True, progress=False)
        assert synthetic_cli.main(["--out", str(out), "--force", "--steps", "2"]) == 2
    assert store.file_digests(shipped) == before and not (shipped.parent / "supervisor-other").exists()

    def broken(*args, **kwargs):
        raise ValueError("heads=3 does not divide text_hidden=32")

    monkeypatch.setattr(sup, "train_supervisor", broken)
    with pytest.raises(ValueError, match="heads=3"):
        sup.ensure_supervisor(MICRO, tmp_path / "out", progress=False)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_corrupt_marker_is_named(tmp_path):
    (tmp_path / store.MARKER).write_text('{"hash": "abc", "compl')
    with pytest.raises(store.SupervisorCacheError, match="SUPERVISOR.json: not valid JSON"):
        store.verify_supervisor(tmp_path)
