"""The tiny Qwen3-VL kit: tokenizer, chat template, processor, model, save/load round trip."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from saga_train.processor import Qwen3VLImageOnlyProcessor, load_processor
from saga_train.synthetic.tiny import (
    IMAGE_TOKEN,
    build_processor,
    build_tiny_qwen3vl,
    build_tokenizer,
    default_deepstack_layers,
    mrope_sections,
)

ANSWER = {"item 1": {"body color": "red", "beak shape": "long"},
          "item 2": {"body color": "blue", "beak shape": "long"},
          "differences": {"body color": "differ", "beak shape": "match"}, "same_species": "no"}
PROMPT = "Compare item 1 and item 2: are they the same bird species? Answer in JSON."
SIZES = dict(text_hidden=64, text_layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_depth=2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([json.dumps(ANSWER), PROMPT, "item 1: item 2:"])


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer, image_size=64)


def _images(n, seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _messages():
    return [{"role": "user", "content": [
        {"type": "text", "text": "item 1:"}, {"type": "image"},
        {"type": "text", "text": "item 2:"}, {"type": "image"},
        {"type": "text", "text": PROMPT}]}]


def test_decode_round_trip_of_json_answer(tokenizer):
    for text in (json.dumps(ANSWER), json.dumps(ANSWER, indent=1), json.dumps(ANSWER, separators=(",", ":"))):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        decoded = tokenizer.decode(ids)
        assert decoded == text
        assert json.loads(decoded) == ANSWER


def test_tokenizer_specials_and_unknown_words(tokenizer):
    ids = tokenizer("<|im_start|>assistant\nzebra 7<|im_end|>")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|im_start|>", "assistant", "\n", "<unk>", " 7", "<|im_end|>"]
    assert tokenizer.decode(ids) == "<|im_start|>assistant\n<unk> 7<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n 7"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(set(tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                    "<|vision_end|>", "<|im_start|>", "<|im_end|>"]))) == 6
    with pytest.raises(TypeError, match="vocab_words"):
        build_tokenizer("a single string")


def test_chat_template_with_two_images(processor, tokenizer):
    text = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == (f"<|im_start|>user\nitem 1:{block}item 2:{block}{PROMPT}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    images = _images(2) + _images(1, seed=1, size=(50, 70))  # a non-square image is resized to 64x64
    inputs = processor(text=[text, text.replace("item 1:", "")], images=[images[:2], [images[0], images[2]]],
                       return_tensors="pt", padding=True)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
    assert inputs["pixel_values"].shape == (4 * 64, 3 * 2 * 8 * 8)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [32, 32]  # 16 LLM tokens per image
    assert inputs["attention_mask"][1, 0] == 0 and inputs["attention_mask"][0].all()  # left padding


def test_forward_generate_and_seeding(processor, tokenizer):
    model = build_tiny_qwen3vl(tokenizer, **SIZES, seed=3)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    same = build_tiny_qwen3vl(tokenizer, **SIZES, seed=3)
    other = build_tiny_qwen3vl(tokenizer, **SIZES, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))

    text = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=_images(2), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert 1 <= out.shape[1] - prompt_len <= 6
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # images reach the loss


def test_save_load_round_trip(processor, tokenizer, tmp_path):
    model = build_tiny_qwen3vl(tokenizer, **SIZES)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    loaded_processor = load_processor(tmp_path)
    assert isinstance(loaded_processor, Qwen3VLImageOnlyProcessor)
    assert loaded.config._attn_implementation == "sdpa"

    text = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    assert loaded_processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True) == text
    images = _images(2, seed=5)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    again = loaded_processor(text=[text], images=images, return_tensors="pt")
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(inputs[key], again[key])
    loaded_tokenizer = loaded_processor.tokenizer
    assert loaded_tokenizer.decode(loaded_tokenizer(json.dumps(ANSWER))["input_ids"]) == json.dumps(ANSWER)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)


def test_config_helpers_and_errors(tokenizer):
    for head_dim in (16, 32, 64, 128):
        sections = mrope_sections(head_dim)
        assert sum(sections) == head_dim // 2 and min(sections) > 0
    assert mrope_sections(128) == [24, 20, 20]  # Qwen3-VL's own split
    assert default_deepstack_layers(27, 36) == [5, 12, 19]
    assert default_deepstack_layers(2, 2) == [0] and default_deepstack_layers(1, 2) == []
    with pytest.raises(ValueError, match="heads"):
        build_tiny_qwen3vl(tokenizer, text_hidden=30, heads=4)
    with pytest.raises(ValueError, match="deepstack_layers"):
        build_tiny_qwen3vl(tokenizer, vision_depth=2, deepstack_layers=[2])
    with pytest.raises(ValueError, match="image_size"):
        build_processor(tokenizer, image_size=60)
