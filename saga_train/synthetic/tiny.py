"""A tiny Qwen3-VL built entirely offline: word-level tokenizer, image processor, random model.

Everything a real Qwen3-VL checkpoint directory provides, small enough to train on a laptop CPU:

- ``build_tokenizer(words)``: a ``tokenizers`` WordLevel vocabulary. Text is split by the regex
  ``TOKEN_PATTERN`` into words, single digits and single punctuation marks, each optionally carrying
  ONE leading space (``" red"`` and ``"red"`` are two tokens), and single whitespace characters. The
  decoder concatenates tokens, so ``decode(encode(text)) == text`` for any text made of known
  pieces (JSON answers parse after decoding). Qwen3-VL's special tokens and a Qwen-style chat
  template (images rendered as ``<|vision_start|><|image_pad|><|vision_end|>``) are included.
- ``build_processor(tokenizer, image_size)``: ``Qwen3VLImageOnlyProcessor``, i.e. ``Qwen3VLProcessor``
  with the PIL image processor and no video processor (transformers 5.24 cannot build a
  ``Qwen3VLProcessor`` without torchvision). Images are resized to ``image_size`` squared; with
  patch 8 and merge 2 a 64x64 image is 8x8 patches -> 16 LLM tokens.
- ``build_tiny_qwen3vl(tokenizer, ...)``: ``Qwen3VLForConditionalGeneration`` with random (seeded)
  weights, sdpa attention, the tokenizer's special-token ids in its config, deepstack layers that
  exist in both towers and MRoPE sections that sum to half the head dimension.

``model.save_pretrained(d)`` + ``processor.save_pretrained(d)`` give a directory that loads with
``Qwen3VLForConditionalGeneration.from_pretrained(d)`` and ``saga_train.processor.load_processor(d)``
(or both with ``saga_train.model.load_qwen3vl(d)``).
"""
import re

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..processor import Qwen3VLImageOnlyProcessor

UNK_TOKEN = "<unk>"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN,
                  IMAGE_TOKEN, VIDEO_TOKEN)

# a word, one digit, or one punctuation mark, each with at most one leading space; or one whitespace character
TOKEN_PATTERN = r" ?[A-Za-z_]+| ?[0-9]| ?[^\sA-Za-z0-9_]|\s"
_ALWAYS_WORDS = ("system", "user", "assistant")
_PUNCTUATION = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum() and chr(c) != "_")
_WHITESPACE = (" ", "\n", "\t", "\r")

# Qwen-style chat template: string or list content; images/videos become vision placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_pieces(text: str) -> list:
    """The words of ``text`` as the tokenizer splits them, without their leading space."""
    pieces = (p.lstrip(" ") for p in re.findall(TOKEN_PATTERN, text))
    return [p for p in pieces if p and not p.isspace()]


def build_tokenizer(vocab_words) -> PreTrainedTokenizerFast:
    """A word-level tokenizer knowing every word piece of ``vocab_words`` (words or whole texts).

    The vocabulary is: ``<unk>``; each word, digit and ASCII punctuation mark with and without one
    leading space; space, newline, tab and carriage return; the role words of the chat template; then the special
    tokens. Padding is on the left (batched generation); eos is ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    if isinstance(vocab_words, str):
        raise TypeError("vocab_words must be a list of words or texts, not a single string")
    pieces = list(_ALWAYS_WORDS) + list("0123456789") + list(_PUNCTUATION)
    for text in vocab_words:
        if not isinstance(text, str):
            raise TypeError(f"vocab_words must contain strings, got {type(text).__name__}")
        pieces.extend(word_pieces(text))
    vocab = {UNK_TOKEN: 0}
    for piece in pieces:
        for token in (piece, " " + piece):
            vocab.setdefault(token, len(vocab))
    for space in _WHITESPACE:
        vocab.setdefault(space, len(vocab))

    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
        padding_side="left", model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, image_size: int = 64, *, patch_size: int = 8,
                    merge_size: int = 2) -> Qwen3VLImageOnlyProcessor:
    """Processor resizing every image to ``image_size`` x ``image_size`` (PIL backend).

    ``image_size`` must be a multiple of ``patch_size * merge_size``; an image then becomes
    ``(image_size / patch_size)^2`` patches and ``(image_size / (patch_size * merge_size))^2`` LLM tokens.
    """
    factor = patch_size * merge_size
    if image_size <= 0 or image_size % factor:
        raise ValueError(f"image_size={image_size} must be a positive multiple of patch_size*merge_size={factor}")
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
    )
    return Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template or CHAT_TEMPLATE)


def mrope_sections(head_dim: int) -> list:
    """(temporal, height, width) rotary sections summing to ``head_dim / 2``, in Qwen3-VL's 24:20:20 ratio."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim={head_dim} must be even and >= 6 for MRoPE")
    half = head_dim // 2
    spatial = max(1, round(half * 20 / 64))
    return [half - 2 * spatial, spatial, spatial]


def default_deepstack_layers(vision_depth: int, text_layers: int) -> list:
    """Up to 3 evenly spaced vision layers (not the last), no more than there are LLM layers."""
    count = min(3, vision_depth - 1, text_layers)
    return [(i + 1) * vision_depth // (count + 1) - 1 for i in range(count)] if count > 0 else []


def build_tiny_qwen3vl(tokenizer, *, text_hidden: int = 128, text_layers: int = 2, heads: int = 4,
                       kv_heads: int = 2, text_intermediate: int = None, vision_hidden: int = 64,
                       vision_depth: int = 2, vision_heads: int = 4, vision_intermediate: int = None,
                       patch_size: int = 8, merge_size: int = 2, image_size: int = 64,
                       deepstack_layers=None, rope_theta: float = 10000.0,
                       seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """A randomly initialized Qwen3-VL (fp32, sdpa) sized for CPU training.

    Intermediate sizes default to 4x the hidden sizes; the vision position table is
    ``(image_size / patch_size)^2``; weights depend only on ``seed`` (the global RNG is untouched).
    """
    if text_hidden % heads:
        raise ValueError(f"text_hidden={text_hidden} must be divisible by heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be divisible by kv_heads={kv_heads}")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise ValueError(f"vision_hidden / vision_heads = {vision_hidden}/{vision_heads} must be a multiple of 4")
    if image_size % (patch_size * merge_size):
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size*merge_size")
    if deepstack_layers is None:
        deepstack_layers = default_deepstack_layers(vision_depth, text_layers)
    deepstack_layers = [int(i) for i in deepstack_layers]
    if any(not 0 <= i < vision_depth for i in deepstack_layers) or len(deepstack_layers) > text_layers:
        raise ValueError(f"deepstack_layers={deepstack_layers} must be < vision_depth={vision_depth} "
                         f"and at most text_layers={text_layers} of them")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN),
        ("vision_start_token_id", VISION_START_TOKEN), ("vision_end_token_id", VISION_END_TOKEN))}
    if tokenizer.unk_token_id in ids.values():
        raise ValueError("tokenizer lacks Qwen3-VL's vision special tokens; build it with build_tokenizer")
    head_dim = text_hidden // heads
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_intermediate or 4 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                         "mrope_section": mrope_sections(head_dim), "mrope_interleaved": True},
    )
    vision_config = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=2,
        out_hidden_size=text_hidden, num_position_embeddings=(image_size // patch_size) ** 2,
        deepstack_visual_indexes=deepstack_layers,
    )
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                             dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
