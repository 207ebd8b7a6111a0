"""Building a run's components from its config: device, datasets, the model (frozen LLM, trainable tower), pooler,
metric loss and proxies, the gradient sync over ranks, the optimizer and its schedule."""
import contextlib
import importlib.util
import math
import warnings
from dataclasses import dataclass, field

import torch
from transformers import get_cosine_schedule_with_warmup

from . import distributed as dist_lib
from .config import Config, ConfigError
from .losses import build_metric_loss
from .model import Embedder, LoadedModel, fix_image_resolution, freeze_language_model
from .pooler import build_pooler
from .sources import load_model, load_splits


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_model(cfg: Config, dataset, device: torch.device, dist: dist_lib.DistInfo | None = None) -> LoadedModel:
    """The run's MLLM (``sources.load_model``), wired for training: its image resolution fixed, the LLM frozen, and
    with ``cfg.shard_llm`` the LLM's decoder layers sharded over the ranks (FSDP2) before the model moves to
    ``device`` (only shards reach the device); bf16 autocast and the CUDA speed-ups on CUDA."""
    bf16 = device.type == "cuda" and cfg.bf16
    loaded = load_model(cfg, dataset, dtype=torch.bfloat16 if bf16 else None,
                        attn_implementation=attention_implementation(device))
    model, processor = loaded.model, loaded.processor
    try:
        fix_image_resolution(processor, cfg.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    freeze_language_model(model)
    if cfg.shard_llm:
        if not (dist and dist.enabled):
            raise ConfigError("--shard-llm shards the LLM over torchrun's ranks: run it under torchrun, >= 2 processes")
        dist_lib.shard_language_model(model, device)
    model.to(device)
    if bf16:
        model.model.visual.float()  # trainable weights stay fp32; compute runs under bf16 autocast
    if device.type == "cuda":
        apply_cuda_speedups(model, cfg)
    return loaded


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def apply_cuda_speedups(model, cfg: Config) -> None:
    """Liger-Kernel's Qwen3-VL patches (when installed) and activation checkpointing on the LLM."""
    if cfg.liger and importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl

            apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                           fused_linear_cross_entropy=False, model=model)
        except ImportError as exc:  # e.g. liger-kernel 0.8.5 against transformers 5.24's Qwen3-VL module
            warnings.warn(f"Liger-Kernel's Qwen3-VL patches are unavailable here ({exc}); training without them")
    if cfg.grad_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Components:
    """Everything a run trains or uses, built deterministically from the config."""

    cfg: Config
    device: torch.device
    train_set: object
    test_set: object
    model: object
    processor: object
    embedder: Embedder
    metric_loss: torch.nn.Module
    model_description: str
    dist: dist_lib.DistInfo = field(default_factory=dist_lib.DistInfo)
    random_init: bool = False  # the MLLM is randomly initialized (sources.load_model): its verdicts are noise
    sync: dist_lib.GradientSync = None  # the gradient average over ranks (built with the components)

    def param_groups(self) -> dict:
        return {
            "encoder": [p for p in self.embedder.visual.parameters() if p.requires_grad],
            "pooler": list(self.embedder.pooler.parameters()),
            "proxies": [p for p in self.metric_loss.parameters() if p.requires_grad],
        }

    def trainable_parameters(self) -> list:
        return [p for group in self.param_groups().values() for p in group]


def build_components(cfg: Config, dist: dist_lib.DistInfo | None = None, *, initialize: bool = True) -> Components:
    """The run's components; ``initialize=False`` (a resume: the checkpoint holds the weights) skips
    ``cfg.init_embedder``."""
    dist = dist or dist_lib.DistInfo()
    device = resolve_device(cfg)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    train_set, test_set = load_splits(cfg)
    model, processor, description, random_init = resolve_model(cfg, train_set, device, dist)
    hidden = model.config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        pooler = build_pooler(cfg.pooler, hidden, cfg.embedding_size).to(device)
        metric_loss = build_metric_loss(cfg.dml, len(train_set.class_names), cfg.embedding_size,
                                        cfg.proxies_per_class, pf_alpha=cfg.pf_alpha, pf_delta=cfg.pf_delta).to(device)
    embedder = Embedder(model.model.visual, pooler, processor.image_processor, cfg.image_size, cfg.pooler)
    if cfg.init_embedder and initialize:
        init_from_embedder(embedder, cfg.init_embedder)
    comps = Components(cfg, device, train_set, test_set, model, processor, embedder, metric_loss, description, dist,
                       random_init=random_init)
    dist_lib.broadcast_parameters(comps.trainable_parameters(), dist)
    comps.sync = dist_lib.GradientSync(comps.trainable_parameters(), dist)
    return comps


def init_from_embedder(embedder: Embedder, path: str) -> None:
    """Copy the tower and pooler weights of the embedder saved in ``path`` (``Embedder.save``, e.g. another run's
    ``embedder/``) into ``embedder``; ``MissingFileError`` / ``ModelLoadError`` for a missing or damaged directory,
    ``ConfigError`` naming ``path`` when its tower or pooler is not this run's (another size, pooler or model)."""
    from .model import load_embedder

    saved = load_embedder(path).state_dict()
    mine = embedder.state_dict()
    wrong = sorted(set(saved) ^ set(mine))
    wrong += sorted(k for k in set(saved) & set(mine) if saved[k].shape != mine[k].shape)
    if wrong:
        raise ConfigError(f"init_embedder={path!r}: its weights do not fit this run's tower and pooler ({len(wrong)} "
                          f"tensors differ, e.g. {wrong[0]!r}): a run of another model, pooler or embedding size")
    embedder.load_state_dict(saved)


def build_optimizer(comps: Components, total_steps: int):
    """AdamW with encoder / pooler / proxies learning rates; cosine decay after linear warm-up."""
    cfg = comps.cfg
    lrs = {"encoder": cfg.lr_encoder, "pooler": cfg.lr_pooler, "proxies": cfg.lr_proxies}
    groups = [{"params": params, "lr": lrs[name], "name": name}
              for name, params in comps.param_groups().items() if params]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_fraction * total_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def autocast(device: torch.device, cfg: Config):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["Components", "build_components", "build_optimizer", "init_from_embedder", "resolve_device", "resolve_model",
           "apply_cuda_speedups", "attention_implementation", "autocast"]
