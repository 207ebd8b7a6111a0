"""Model wiring: load (or build) Qwen3-VL, freeze its LLM, and the Embedder (tower + pooler).

Trainable: the vision tower ``model.model.visual`` (patch embed, ViT blocks, merger, deepstack
mergers) and the pooler. Frozen: the language model and the LM head (requires_grad False, still
differentiable, so GRPO gradients pass through them into the tower).
"""
import json
import os
from typing import NamedTuple

import torch
from PIL import Image
from torch import nn

from .atomic import atomic_save_file, atomic_write_text
from .errors import MissingFileError, UserError
from .pooler import build_pooler

QWEN3VL_MODEL_TYPES = ("qwen3_vl",)
EMBEDDER_WEIGHTS = "embedder.safetensors"
EMBEDDER_CONFIG = "embedder.json"


class ModelLoadError(UserError, ValueError):
    """A model source that cannot be used (missing, not Qwen3-VL, unreadable)."""


class LoadedModel(NamedTuple):
    """A run's MLLM as its source gives it: ``random_init`` is True for a randomly initialized model (its verdicts
    are noise: no GRPO or attention signal in a run means anything)."""

    model: object
    processor: object
    description: str
    random_init: bool = False


def load_qwen3vl(path: str, *, dtype=None, attn_implementation: str | None = None):
    """``(model, processor)`` from a local Qwen3-VL directory (no hub access)."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from .processor import load_processor

    if not os.path.isdir(path):
        raise ModelLoadError(f"--model {path!r} is not a directory (expected a local Qwen3-VL checkpoint)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {path!r}: cannot read a transformers config.json: {e}") from e
    if config.model_type not in QWEN3VL_MODEL_TYPES:
        raise ModelLoadError(
            f"--model {path!r} is a {config.model_type!r} checkpoint; SAGA needs Qwen3-VL (model_type 'qwen3_vl')")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, **kwargs)
    processor = load_processor(path)  # image-only processor: no torchvision needed
    return model, processor


def fix_image_resolution(processor, image_size: int) -> None:
    """Make the processor keep ``image_size`` x ``image_size`` inputs as they are (224 -> 14 x 14 patches
    -> 49 LLM tokens for Qwen3-VL) instead of rescaling them into its own pixel range."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    if image_size % factor:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size*merge_size={factor} for this model")
    ip.size = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}


def freeze_language_model(model) -> None:
    """LLM + LM head frozen, the whole vision tower trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.visual.parameters():
        p.requires_grad_(True)


def suppressed_token_ids(model) -> list:
    """Image / video / vision-delimiter tokens of a Qwen3-VL config: never sampled in an answer."""
    cfg = model.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None})


def llm_num_layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def resolve_kl_layer(kl_layer: int, num_layers: int) -> int:
    """-1 -> the layer at 26/36 of the depth (26 for Qwen3-VL-8B); otherwise checked against the depth."""
    if kl_layer < 0:
        return min(num_layers - 1, round(num_layers * 26 / 36))
    if kl_layer >= num_layers:
        raise ValueError(f"kl_layer={kl_layer} but the LLM has {num_layers} layers (0..{num_layers - 1})")
    return kl_layer


def square_rgb(image, size: int, name: str = "image"):
    """An RGB PIL image resized to ``size`` x ``size`` (METHOD.md: no crop)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image, got {type(image).__name__}")
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def tower_tokens(visual: nn.Module, pixel_values, image_grid_thw) -> torch.Tensor:
    """The merged patch tokens X ``[B, N, D]`` of a Qwen3-VL vision tower (what its LLM reads), for B images of one
    size (``image_grid_thw`` ``[B, 3]``); ``pixel_values`` is cast to the tower's dtype."""
    out = visual(pixel_values.to(next(visual.parameters()).dtype), grid_thw=image_grid_thw, return_dict=True)
    merged = out.pooler_output
    return merged.reshape(image_grid_thw.shape[0], -1, merged.shape[-1])


class Embedder(nn.Module):
    """Inference map g = pooler o tower: images -> unit embeddings ``[B, D_e]``."""

    def __init__(self, visual: nn.Module, pooler: nn.Module, image_processor, image_size: int, pooler_kind: str):
        super().__init__()
        self.visual = visual
        self.pooler = pooler
        self.image_processor = image_processor
        self.image_size = image_size
        self.pooler_kind = pooler_kind

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    def pixel_inputs(self, images) -> dict:
        """``pixel_values`` and ``image_grid_thw`` for a list of PIL images (resized to image_size)."""
        images = [square_rgb(im, self.image_size, f"images[{i}]") for i, im in enumerate(images)]
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device),
                "image_grid_thw": out["image_grid_thw"].to(self.device)}

    def patch_tokens(self, pixel_values, image_grid_thw) -> torch.Tensor:
        """Merged patch tokens X ``[B, N, D]`` (the tower output the LLM consumes); all images share N."""
        return tower_tokens(self.visual, pixel_values, image_grid_thw)

    def forward(self, pixel_values, image_grid_thw):
        """``(z [B, D_e], pooler logits [B, N] or None, X [B, N, D])``."""
        x = self.patch_tokens(pixel_values, image_grid_thw)
        z, logits = self.pooler(x)
        return z, logits, x

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """Unit embeddings ``[B, D_e]`` (fp32, on the CPU) of a list of PIL images."""
        was_training = self.training
        self.eval()
        try:
            z, _, _ = self(**self.pixel_inputs(list(images)))
        finally:
            self.train(was_training)
        return z.float().cpu()

    def save(self, path: str) -> None:
        """Weights (safetensors) + a JSON config + the image processor, into directory ``path``."""
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_file(state, os.path.join(path, EMBEDDER_WEIGHTS))
        meta = {
            "vision_config": self.visual.config.to_dict(),
            "pooler": self.pooler_kind,
            "hidden_size": self.visual.config.out_hidden_size,
            "embedding_size": self.pooler.proj.out_features,
            "image_size": self.image_size,
            "image_processor_class": type(self.image_processor).__name__,
        }
        atomic_write_text(os.path.join(path, EMBEDDER_CONFIG), json.dumps(meta, indent=2))
        self.image_processor.save_pretrained(path)


def load_embedder(path: str, device: str = "cpu") -> Embedder:
    """An Embedder saved by ``Embedder.save`` (what the retrieval tool loads).

    A missing directory or file raises ``MissingFileError``; an empty, truncated or garbage ``embedder.json``,
    ``preprocessor_config.json`` or ``embedder.safetensors``, one without a key it needs (or with a value of another
    type), or weights that do not fit ``embedder.json``, raise ``ModelLoadError`` naming the file and what is wrong.
    """
    import transformers
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from .files import damaged, field, read_json, read_safetensors, state_dict_problems

    if not os.path.isdir(path):
        raise MissingFileError(f"{path!r} is not a saved SAGA embedder: "
                               + ("a file, not a directory" if os.path.exists(path) else "no such directory"))
    config_path = os.path.join(path, EMBEDDER_CONFIG)
    if not os.path.isfile(config_path):
        raise MissingFileError(f"{path!r} is not a saved SAGA embedder: {EMBEDDER_CONFIG} is missing")
    meta = read_json(config_path, error=ModelLoadError)

    def bad_config(problem):
        return damaged(config_path, problem, error=ModelLoadError)

    def get(key, kind):
        return field(meta, key, kind, path=config_path, error=ModelLoadError)

    vision = get("vision_config", dict)
    pooler_kind = get("pooler", str)
    if pooler_kind not in ("attention", "mean"):
        raise bad_config(f"'pooler' must be 'attention' or 'mean', got {pooler_kind!r}")
    sizes = {key: get(key, int) for key in ("hidden_size", "embedding_size", "image_size")}
    for key, value in sizes.items():
        if value < 1:
            raise bad_config(f"{key!r} must be >= 1, got {value}")
    try:
        vision_config = Qwen3VLVisionConfig(**vision)
        visual = Qwen3VLVisionModel(vision_config)
    except Exception as e:  # transformers' config validation raises several types (TypeError, ValueError, ...)
        raise bad_config(f"'vision_config' does not build a Qwen3-VL vision tower ({type(e).__name__}: {e})") from e
    if vision_config.out_hidden_size != sizes["hidden_size"]:
        raise bad_config(f"'hidden_size' {sizes['hidden_size']} is not the vision tower's out_hidden_size "
                         f"{vision_config.out_hidden_size}")
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    if sizes["image_size"] % factor:
        raise bad_config(f"'image_size' {sizes['image_size']} is not a multiple of patch_size * spatial_merge_size "
                         f"= {factor}")
    class_name = get("image_processor_class", str)
    processor_class = getattr(transformers, class_name, None)
    if not (isinstance(processor_class, type) and issubclass(processor_class, transformers.ImageProcessingMixin)):
        raise bad_config(f"'image_processor_class' {class_name!r} is not an image processor class of transformers")
    image_processor = _load_image_processor(path, processor_class, vision_config, sizes["image_size"])
    embedder = Embedder(visual, build_pooler(pooler_kind, sizes["hidden_size"], sizes["embedding_size"]),
                        image_processor, sizes["image_size"], pooler_kind)
    weights_path = os.path.join(path, EMBEDDER_WEIGHTS)
    state = read_safetensors(weights_path, error=ModelLoadError)
    problems = state_dict_problems(embedder.state_dict(), state)
    if problems:
        raise damaged(weights_path, f"does not fit {EMBEDDER_CONFIG}: {problems}", error=ModelLoadError)
    embedder.load_state_dict(state)
    return embedder.to(device).eval()


def _load_image_processor(path: str, processor_class, vision_config, image_size: int):
    """The image processor saved in ``path`` by ``Embedder.save``, checked against the tower's patch geometry and run
    once on a blank image; ``ModelLoadError`` naming its file when it cannot be used."""
    from transformers.utils import IMAGE_PROCESSOR_NAME

    from .files import damaged, read_json

    processor_path = os.path.join(path, IMAGE_PROCESSOR_NAME)
    read_json(processor_path, error=ModelLoadError)  # missing, empty, garbage, truncated: named here
    try:
        image_processor = processor_class.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... for a config it cannot use
        raise damaged(processor_path, f"not a {processor_class.__name__} config ({type(e).__name__}: {e})",
                      error=ModelLoadError) from e
    for key, tower_key in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                           ("temporal_patch_size", "temporal_patch_size")):
        value, wanted = getattr(image_processor, key, None), getattr(vision_config, tower_key)
        if value is not None and value != wanted:
            raise damaged(processor_path, f"{key} is {value!r} but the vision tower's {tower_key} is {wanted}",
                          error=ModelLoadError)
    try:
        out = image_processor(images=[Image.new("RGB", (image_size, image_size))], return_tensors="pt")
        grid = tuple(out["image_grid_thw"].shape), tuple(out["pixel_values"].shape)
    except Exception as e:  # any setting that keeps it from turning an image into patches
        raise damaged(processor_path, f"cannot process an image ({type(e).__name__}: {e})",
                      error=ModelLoadError) from e
    if grid[0] != (1, 3):
        raise damaged(processor_path, f"turns one image into a patch grid of shape {grid[0]}, not (1, 3)",
                      error=ModelLoadError)
    return image_processor
