"""The synthetic world: what ``python -m saga_train`` needs when nothing is on disk and nothing can be downloaded.

- ``world.py``: ``SyntheticBirds``, a fine-grained dataset of drawn birds (a class is a combination of six
  attributes), its zero-shot splits (``split_combinations``) and ``render_bird``.
- ``tiny.py``: a tiny Qwen3-VL built offline: word-level tokenizer with Qwen3-VL's special tokens and chat
  template, image processor, randomly initialized model.
- ``perception.py``: the supervisor's stage 1, its vision tower learning to see the attributes.
- ``answers.py``: the supervisor's answer format (build / parse) and the tiny tokenizer's vocabulary.
- ``supervisor.py``: that model taught to compare two birds attribute by attribute (training, held-out
  evaluation); ``store.py``: where a supervisor lives (the shipped weights, the cache, the sha256 marker);
  ``python -m saga_train.synthetic`` (``__main__.py``) trains or reuses one.
- ``weights/``: the supervisor of ``SupervisorConfig()``, shipped (safetensors + config + metrics + sha256).

The trainer reaches all of it through one entry point, ``load``, for the model names in
``saga_train.sources.SYNTHETIC_MODELS``; ``load_dataset("synthetic")`` imports ``SyntheticBirds`` on demand.
The real-model path (a local Qwen3-VL directory and a dataset on disk) never imports this package.
"""
from .world import ATTRIBUTES, SyntheticBirds

__all__ = ["ATTRIBUTES", "SyntheticBirds", "load"]


def load(name: str, dataset, *, dataset_name: str, image_size: int, seed: int, world_seed: int = 0,
         test_classes: int = 200, progress: bool = True, attn_implementation: str = "sdpa"):
    """``LoadedModel(model, processor, description, random_init)`` of the synthetic-world model ``name``.

    ``dataset`` is the run's train split (``dataset_name`` its name). "tiny-random": a tiny Qwen3-VL with random
    weights (seeded by ``seed``) and a word-level tokenizer knowing every text of this dataset's prompt and answer.
    "synthetic-supervisor": the tiny Qwen3-VL trained on the synthetic world's training classes of ``world_seed``,
    whose ``test_classes`` held-out classes are the run's test classes: the shipped one for the default world, else
    trained on first use (with a progress bar when ``progress``) and cached; loaded with ``attn_implementation``.
    Raises ValueError (a ``UserError``) for another name, or for the supervisor with a dataset it does not know.
    """
    from ..errors import ConfigError
    from ..model import LoadedModel
    from ..prompts import prompt_spec

    if name == "tiny-random":
        from .answers import vocabulary
        from .tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

        tokenizer = build_tokenizer(vocabulary(prompt_spec(dataset_name, dataset), dataset))
        model = build_tiny_qwen3vl(tokenizer, image_size=image_size, seed=seed)
        return LoadedModel(model, build_processor(tokenizer, image_size),
                           "tiny Qwen3-VL, RANDOM INIT (no trained supervisor)", random_init=True)
    if name != "synthetic-supervisor":
        raise ConfigError(f"model={name!r} is not a synthetic-world model (synthetic-supervisor, tiny-random)")
    if dataset_name != "synthetic":
        raise ConfigError(f"model='synthetic-supervisor' only knows the synthetic world, not dataset={dataset_name!r}; "
                          "give --model a local Qwen3-VL checkpoint directory")
    from . import supervisor as sup
    from .store import load_supervisor, read_marker

    scfg = sup.SupervisorConfig(seed=world_seed, test_classes=test_classes, image_size=image_size)
    path = sup.shipped_or_cached(scfg, progress=progress, log=lambda m: print(m, flush=True))
    model, processor = load_supervisor(path, attn_implementation=attn_implementation)
    heldout = (read_marker(path).get("metrics") or {}).get("heldout", {})
    description = (f"synthetic supervisor {path} (tiny Qwen3-VL trained on the world-seed-{world_seed} training "
                   f"classes; held-out verdict accuracy {heldout.get('verdict_accuracy', float('nan')):.3f})")
    return LoadedModel(model, processor, description)
