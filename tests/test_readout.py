"""The supervisor's readout (saga_train.readout): the fixed pairs, the scoring of one answer, the metrics, and the
whole readout on the shipped supervisor against an independent computation (``evaluate_supervisor``)."""
import json

import numpy as np
import pytest

from saga_train import readout
from saga_train.prompts import pair_prompt, prompt_spec
from saga_train.synthetic import answers, store
from saga_train.synthetic import supervisor as sup
from saga_train.synthetic.world import ATTRIBUTE_NAMES, SyntheticBirds, num_differences

NAMES = list(ATTRIBUTE_NAMES)


@pytest.fixture(scope="module")
def test_set():
    return SyntheticBirds("test", seed=0, images_per_class=3, image_size=64, test_classes=200)


def read(text):
    return answers.parse_answer(text, NAMES)


def test_pairs_are_fixed_and_of_their_kind(test_set):
    pairs = readout.readout_pairs(test_set, 40, seed=0)
    assert pairs == readout.readout_pairs(test_set, 40, seed=0) != readout.readout_pairs(test_set, 40, seed=1)
    kinds = [p.kind for p in pairs]
    assert (kinds.count("same"), kinds.count("one_attribute"), kinds.count("random")) == (20, 10, 10)
    for p in pairs:
        la, lb = test_set.labels[p.index_a], test_set.labels[p.index_b]
        differ = num_differences(test_set.combinations[la], test_set.combinations[lb])
        assert differ == {"same": 0, "one_attribute": 1}.get(p.kind, differ) and (p.kind == "same") == (la == lb)
        assert p.index_a != p.index_b


def test_pairs_without_attributes_are_same_and_random():
    class Plain:  # a split that knows nothing of attributes (e.g. CUB from disk)
        labels = [0, 0, 1, 1, 2]

    kinds = [p.kind for p in readout.readout_pairs(Plain(), 9)]
    assert kinds.count("same") == 5 and kinds.count("random") == 4  # half, rounded up
    assert [p.kind for p in readout.readout_pairs(Plain(), 1)] == ["same"]
    with pytest.raises(ValueError, match="exceeds the 10 distinct pairs"):
        readout.readout_pairs(Plain(), 11)
    with pytest.raises(ValueError, match="class of >= 2 images"):
        readout.readout_pairs(type("One", (), {"labels": [0, 1, 2]})(), 4)
    with pytest.raises(ValueError, match="count"):
        readout.readout_pairs(Plain(), 0)


def test_score_answer():
    a = dict(zip(NAMES, ("red", "blue", "green", "striped", "long", "fan")))
    b = dict(a, **{"tail shape": "forked"})
    right = answers.build_answer(a, b, NAMES)
    got = readout.score_answer(right, False, "same_species", (a, b), read)
    assert got == {"verdict_right": True, "parsed": True, "descriptions_agree": False,
                   "attribute_right": [[True] * 6, [True] * 6]}
    # the same-class answer of a supervisor that sees item 2 with another tail: agreement lost, verdict wrong
    wrong = json.loads(answers.build_answer(a, b, NAMES))
    got = readout.score_answer(json.dumps(wrong), True, "same_species", (a, a), read)
    assert got["verdict_right"] is False and got["descriptions_agree"] is False
    assert got["attribute_right"] == [[True] * 6, [True] * 5 + [False]]
    same = answers.build_answer(a, a, NAMES)
    assert readout.score_answer(same.replace('"item 2": "red', '"item 2":   "Red'), True, "same_species")[
        "descriptions_agree"]  # case and spacing do not matter
    garbage = readout.score_answer("{no json", True, "same_species", (a, a), read)
    assert garbage == {"verdict_right": False, "parsed": False, "descriptions_agree": False,
                       "attribute_right": [[False] * 6, [False] * 6]}


def test_metrics_against_a_direct_computation():
    rng = np.random.default_rng(0)
    kinds = ["same"] * 7 + ["one_attribute"] * 4 + ["random"] * 5
    verdict = rng.random(16) < 0.6
    agree = rng.random(16) < 0.5
    attrs = rng.random((16, 2, 3)) < 0.7
    got = readout.readout_metrics(readout.ReadoutAnswers(kinds, verdict, verdict | (rng.random(16) < 0.5), agree,
                                                         ["a", "b c", "d"], attrs))
    want = {"readout/verdict": sum(verdict) / 16,
            "readout/verdict/same": sum(verdict[:7]) / 7, "readout/verdict/one_attribute": sum(verdict[7:11]) / 4,
            "readout/verdict/random": sum(verdict[11:]) / 5, "readout/descriptions_agree/same": sum(agree[:7]) / 7,
            "readout/attributes": attrs.sum() / 96, "readout/attribute/a": attrs[:, :, 0].sum() / 32,
            "readout/attribute/b c": attrs[:, :, 1].sum() / 32, "readout/attribute/d": attrs[:, :, 2].sum() / 32}
    assert set(got) == set(want) | {"readout/parsed"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    line = readout.format_readout(got)
    assert line.startswith(f"supervisor readout: verdict {sum(verdict) / 16:.3f}") and "attributes" in line


def test_shipped_supervisor_readout_equals_evaluate_supervisor(test_set):
    """The readout's batched, left-padded greedy answers score exactly as ``evaluate_supervisor`` (its own prompt
    batching, its own parser) scores the same pairs; the agreement from ``parse_answer``'s items."""
    cfg = sup.SupervisorConfig()
    model, processor = store.load_supervisor(store.shipped_dir(cfg))
    spec = prompt_spec("synthetic", test_set)
    prompt = pair_prompt(processor, spec, "dataset")
    pairs = readout.readout_pairs(test_set, 12, seed=3)
    model.train()
    got = readout.read_pairs(model, processor, prompt, test_set, pairs, verdict_key=spec.verdict_key, image_size=64,
                             max_new_tokens=192, read=read, batch=5)
    per = test_set.images_per_class
    as_eval = [(p.kind, test_set.labels[p.index_a], p.index_a % per, test_set.labels[p.index_b], p.index_b % per)
               for p in pairs]
    want = sup.evaluate_supervisor(model, processor, prompt, test_set, as_eval, spec, batch=12)
    metrics = readout.readout_metrics(got)
    assert metrics["readout/verdict"] == want["verdict_accuracy"]
    for kind, value in want["verdict_accuracy_by_kind"].items():
        assert metrics[f"readout/verdict/{kind}"] == value
    assert metrics["readout/attributes"] == pytest.approx(want["attribute_accuracy"], abs=1e-12)
    for name, value in want["attribute_accuracy_by_name"].items():
        assert metrics[f"readout/attribute/{name}"] == pytest.approx(value, abs=1e-12)
    same = [t for t, p in zip(got.texts, pairs) if p.kind == "same"]
    agree = [read(t)["item 1"] == read(t)["item 2"] and None not in read(t)["item 1"].values() for t in same]
    assert metrics["readout/descriptions_agree/same"] == sum(agree) / len(same)
    assert metrics["readout/verdict"] >= 10 / 12  # the shipped supervisor reads its own tower
    assert model.training  # the mode it had is restored
