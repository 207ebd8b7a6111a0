"""The Qwen3-VL processor for images and text, loadable from any local Qwen3-VL directory without torchvision.

Used by the real-model path (``saga_train.model.load_qwen3vl``) and by the synthetic world's tiny model kit
(``saga_train.synthetic.tiny.build_processor``).
"""
import math

from PIL import Image
from transformers import Qwen3VLProcessor


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images and text only (no video processor, so no torchvision).

    Loads the tokenizer and image processor of any Qwen3-VL directory, tiny or real.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """As ``Qwen3VLProcessor``; PIL images are first resized to a square when the image processor
        pins the pixel count (``shortest_edge == longest_edge == side^2``, as ``build_processor`` does)."""
        side = square_side(self.image_processor)
        if images is not None and side:
            images = _resize_pil(images, side)
        return super().__call__(images=images, text=text, videos=videos, **kwargs)


def square_side(image_processor):
    """``side`` when the image processor pins ``shortest_edge == longest_edge == side^2``, else None."""
    size = image_processor.size
    low, high = size.get("shortest_edge"), size.get("longest_edge")
    side = math.isqrt(high) if high else 0
    return side if low == high and side * side == high else None


def _resize_pil(images, side: int):
    """PIL images (possibly in nested lists) resized to ``side`` x ``side``; other inputs unchanged."""
    if isinstance(images, (list, tuple)):
        return [_resize_pil(image, side) for image in images]
    if isinstance(images, Image.Image) and images.size != (side, side):
        return images.convert("RGB").resize((side, side), Image.BICUBIC)
    return images


def load_processor(path) -> Qwen3VLImageOnlyProcessor:
    """The processor saved in ``path`` (offline; works without torchvision)."""
    return Qwen3VLImageOnlyProcessor.from_pretrained(str(path), local_files_only=True)
