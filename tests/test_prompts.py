"""Per-dataset prompts (METHOD.md), the verdict parser and the item-description spans."""
import json

import pytest

from saga_train.prompts import (
    AIRCRAFT_ATTRIBUTES,
    BIRD_ATTRIBUTES,
    CAR_ATTRIBUTES,
    instruction,
    pair_messages,
    pair_prompt,
    prompt_spec,
)
from saga_train.synthetic.answers import vocabulary
from saga_train.verdict import item_span, parse_verdict


def test_dataset_specs_match_method():
    assert len(BIRD_ATTRIBUTES) == 28 and len(CAR_ATTRIBUTES) == 17 and len(AIRCRAFT_ATTRIBUTES) == 17
    assert prompt_spec("cub").verdict_key == "same_species" == prompt_spec("inat_aves").verdict_key
    assert prompt_spec("cars").verdict_key == "same_model"
    assert prompt_spec("aircraft").verdict_key == "same_variant"
    text = instruction(prompt_spec("cars"))
    assert "automotive expert" in text and "fenders and wheel arches" in text and '"same_model"' in text
    for key in ('"item 1"', '"item 2"', '"differences"', '"confidence"', '"reasoning"'):
        assert key in text


def test_synthetic_spec_uses_the_dataset_attributes():
    from saga_train.synthetic import SyntheticBirds

    ds = SyntheticBirds("train", images_per_class=1)
    spec = prompt_spec("synthetic", ds)
    assert spec.attributes == tuple(ds.attribute_names)
    assert "wing pattern" in instruction(spec)
    words = " ".join(vocabulary(spec, ds))
    assert "striped" in words and "same_species" in words


def test_generic_prompt_has_no_role_or_attributes():
    spec = prompt_spec("cub")
    text = instruction(spec, "generic")
    assert "ornithologist" not in text and "bill shape" not in text and '"same_species"' in text
    with pytest.raises(ValueError, match="prompt style"):
        instruction(spec, "fancy")


def test_chat_template_prompt_has_two_images_in_order():
    from saga_train.synthetic.tiny import build_processor, build_tokenizer

    spec = prompt_spec("aircraft")
    tok = build_tokenizer(vocabulary(spec))
    text = pair_prompt(build_processor(tok, 32), spec)
    assert text.count("<|image_pad|>") == 2
    assert text.index("item 1") < text.index("<|image_pad|>") < text.index("item 2")
    assert text.rstrip().endswith("assistant")
    assert [p["type"] for p in pair_messages(spec)[0]["content"]] == ["text", "image", "text", "image", "text"]


@pytest.mark.parametrize("text, expected", [
    ('{"differences": "none", "same_species": "yes"}', True),
    ('Sure! Here it is:\n{"item 1": {"bill shape": "short"}, "same_species": "no"} hope that helps', False),
    ('{ " item 1 " : { } , " same_species " : " yes " }', True),  # word-level decode spacing
    ('{"same_species": true}', True),
    ('{"same_species": "maybe"}', None),
    ('no json and no verdict here', None),
    ('"same_species": "no"', False),  # truncated: no closing brace
    ('{"same_model": "yes"}', None),  # another dataset's key
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text, "same_species") is expected


def test_item_span_covers_the_item_object():
    answer = {"item 1": {"wing color": "red"}, "item 2": {"wing color": "blue"}, "same_species": "no"}
    text = "answer: " + json.dumps(answer)
    s1, s2 = item_span(text, "item 1"), item_span(text, "item 2")
    assert text[slice(*s1)] == '{"wing color": "red"}'
    assert text[slice(*s2)] == '{"wing color": "blue"}'
    assert item_span('{"item 1": "a small red bird", "x": 1}', "item 1") is not None
    assert item_span('{"item 1": {"open": "never closed"', "item 1") is None
    assert item_span("nothing", "item 2") is None
