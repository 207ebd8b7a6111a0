"""The synthetic world: what ``python -m saga_train`` needs when nothing is on disk and nothing can be downloaded.

- ``world.py``: ``SyntheticBirds``, a fine-grained dataset of drawn birds (a class is a combination of six
  attributes), its zero-shot splits (``split_combinations``) and ``render_bird``.
- ``tiny.py``: a tiny Qwen3-VL built offline: word-level tokenizer with Qwen3-VL's special tokens and chat
  template, image processor, randomly initialized model.
- ``perception.py``: the supervisor's stage 1, its vision tower learning to see the attributes.
- ``supervisor.py``: that model taught to compare two birds attribute by attribute (its answer format,
  training, held-out evaluation, the shipped weights and the cache; ``python -m saga_train.synthetic.supervisor``).
- ``weights/``: the supervisor of ``SupervisorConfig()``, shipped (safetensors + config + metrics + sha256).

The trainer reaches all of it through one entry point, ``load``, for the model names in
``saga_train.config.SYNTHETIC_MODELS``; ``load_dataset("synthetic")`` imports ``SyntheticBirds`` on demand.
The real-model path (a local Qwen3-VL directory and a dataset on disk) never imports this package.
"""
from .world import ATTRIBUTES, SyntheticBirds

__all__ = ["ATTRIBUTES", "SyntheticBirds", "load"]


def load(cfg, dataset, *, attn_implementation: str = "sdpa"):
    """``(model, processor, description)`` of the synthetic-world model named by ``cfg.model``.

    ``cfg`` is the trainer's ``Config`` (``model``, ``dataset``, ``seed``, ``world_seed``, ``image_size``, ``progress`` are read),
    ``dataset`` its train split. "tiny-random": a tiny Qwen3-VL with random (seeded) weights and a word-level
    tokenizer knowing every text of this dataset's prompt and answer. "synthetic-supervisor": the tiny Qwen3-VL
    trained on the synthetic world's training classes, whose held-out classes are this run's test classes
    (``cfg.world_seed``, ``cfg.synthetic_test_classes``): the shipped one for the default world, else trained on
    first use and cached; loaded with ``attn_implementation``.
    """
    from ..config import ConfigError, SYNTHETIC_MODELS
    from . import supervisor as sup

    if cfg.model not in SYNTHETIC_MODELS:
        raise ConfigError(f"model={cfg.model!r} is not a synthetic-world model ({', '.join(SYNTHETIC_MODELS)})")
    if cfg.model == "tiny-random":
        from ..prompts import prompt_spec
        from .tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

        tokenizer = build_tokenizer(sup.vocabulary(prompt_spec(cfg.dataset, dataset), dataset))
        model = build_tiny_qwen3vl(tokenizer, image_size=cfg.image_size, seed=cfg.seed)
        return model, build_processor(tokenizer, cfg.image_size), "tiny Qwen3-VL, RANDOM INIT (no trained supervisor)"
    if cfg.dataset != "synthetic":
        raise ConfigError(f"model='synthetic-supervisor' only knows the synthetic world, not dataset={cfg.dataset!r}; "
                          "give --model a local Qwen3-VL checkpoint directory")
    scfg = sup.SupervisorConfig(seed=cfg.world_seed, test_classes=cfg.synthetic_test_classes, image_size=cfg.image_size)
    path = sup.shipped_or_cached(scfg, progress=cfg.progress, log=lambda m: print(m, flush=True))
    model, processor = sup.load_supervisor(path, attn_implementation=attn_implementation)
    heldout = (sup.read_marker(path).get("metrics") or {}).get("heldout", {})
    description = (f"synthetic supervisor {path} (tiny Qwen3-VL trained on the world-seed-{cfg.world_seed} training classes; "
                   f"held-out verdict accuracy {heldout.get('verdict_accuracy', float('nan')):.3f})")
    return model, processor, description
