"""Where a run's model and data come from: the one module in which the trainer meets the synthetic world.

``load_model(cfg, dataset, ...)``: ``cfg.model`` is a local Qwen3-VL checkpoint directory, or one of
``SYNTHETIC_MODELS``, which the synthetic world builds (``saga_train.synthetic.load``). A checkpoint directory that
holds a synthetic supervisor (its marker file) is checked against its recorded sha256 first.
``load_splits(cfg)``: the train and test splits of ``cfg.dataset`` (the synthetic world's take its
``world_seed`` / ``synthetic_*`` settings). The synthetic package is imported only for those names.
"""
import os

from .config import ConfigError
from .model import LoadedModel, load_qwen3vl

SYNTHETIC_MODELS = ("synthetic-supervisor", "tiny-random")  # built by saga_train.synthetic; else a directory
SYNTHETIC_DATASET = "synthetic"
SYNTHETIC_MARKER = "SUPERVISOR.json"  # saga_train.synthetic.store.MARKER


def load_model(cfg, dataset, *, dtype=None, attn_implementation: str = "sdpa") -> LoadedModel:
    """The model, processor, description and random-init flag of ``cfg.model`` (``dataset``: the train split)."""
    if cfg.model in SYNTHETIC_MODELS:
        from . import synthetic

        return synthetic.load(cfg.model, dataset, dataset_name=cfg.dataset, image_size=cfg.image_size,
                              seed=cfg.seed, world_seed=cfg.world_seed, test_classes=cfg.synthetic_test_classes,
                              progress=cfg.progress, attn_implementation=attn_implementation)
    if os.path.isfile(os.path.join(cfg.model, SYNTHETIC_MARKER)):  # a synthetic supervisor's directory
        from .synthetic.store import verify_supervisor

        verify_supervisor(cfg.model)  # its files against their recorded sha256
    model, processor = load_qwen3vl(cfg.model, dtype=dtype, attn_implementation=attn_implementation)
    return LoadedModel(model, processor, f"Qwen3-VL from {cfg.model}")


def load_splits(cfg):
    """(train split, test split) of ``cfg.dataset`` (zero-shot: disjoint classes); a reader's complaint becomes a
    ``ConfigError`` naming the dataset and its root."""
    from .data.registry import load_dataset

    train_kw = test_kw = {"image_size": cfg.image_size}
    if cfg.dataset == SYNTHETIC_DATASET:
        common = dict(train_kw, seed=cfg.world_seed, train_classes=cfg.synthetic_train_classes,
                      test_classes=cfg.synthetic_test_classes)
        train_kw = dict(common, images_per_class=cfg.synthetic_images_per_class)
        test_kw = dict(common, images_per_class=cfg.synthetic_test_images_per_class)
    try:
        return (load_dataset(cfg.dataset, cfg.data_root, split="train", **train_kw),
                load_dataset(cfg.dataset, cfg.data_root, split="test", **test_kw))
    except ValueError as e:
        raise ConfigError(f"dataset={cfg.dataset!r} (data_root={cfg.data_root!r}): {e}") from e


def answer_reader(cfg, dataset):
    """``text -> {"item 1": {attribute: value | None}, "item 2": {...}, "differences": ..., "verdict": ...}`` for a
    run whose dataset knows its classes' attributes (``dataset.attributes(label) -> dict``: the synthetic world, whose
    supervisor describes items as ``"<value> <attribute>, ..."``), else None (the answer's attributes cannot be
    checked)."""
    if cfg.dataset != SYNTHETIC_DATASET or not callable(getattr(dataset, "attributes", None)):
        return None
    import functools

    from .prompts import prompt_spec
    from .synthetic.answers import parse_answer

    spec = prompt_spec(cfg.dataset, dataset)
    return functools.partial(parse_answer, attribute_names=spec.attributes, verdict_key=spec.verdict_key)


__all__ = ["SYNTHETIC_MODELS", "answer_reader", "load_model", "load_splits"]
