"""The synthetic world's one entry point, ``saga_train.synthetic.load``, as the trainer reaches it
(``saga_train.sources``): what the trainer gets for its model names."""
import pytest
from transformers import Qwen3VLForConditionalGeneration

from saga_train import sources, synthetic
from saga_train.config import ConfigError, make_config
from saga_train.prompts import pair_prompt, prompt_spec
from saga_train.synthetic import store
from saga_train.synthetic import supervisor as sup


@pytest.fixture(scope="module")
def train_set():
    return synthetic.SyntheticBirds("train", images_per_class=1, image_size=32)


def test_tiny_random_is_a_random_tiny_qwen3vl(train_set):
    cfg = make_config(model="tiny-random", image_size=32, seed=3)
    model, processor, description, random_init = sources.load_model(cfg, train_set)
    assert isinstance(model, Qwen3VLForConditionalGeneration) and "RANDOM INIT" in description
    assert random_init
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.image_processor.size["longest_edge"] == 32 * 32
    tokenizer = processor.tokenizer
    for style in ("dataset", "generic"):  # the trainer's prompts are made of known words
        assert tokenizer.unk_token_id not in tokenizer(pair_prompt(processor, prompt_spec("synthetic", train_set),
                                                                   style))["input_ids"]
    again = sources.load_model(cfg, train_set).model
    assert all((p == q).all() for p, q in zip(model.parameters(), again.parameters()))  # seeded


def test_synthetic_supervisor_needs_the_synthetic_world():
    with pytest.raises(ConfigError, match="synthetic-supervisor.*dataset='cub'"):
        sources.load_model(make_config(model="synthetic-supervisor", dataset="cub"), None)
    with pytest.raises(ConfigError, match="not a synthetic-world model"):
        synthetic.load("/models/Qwen3-VL-8B-Instruct", None, dataset_name="synthetic", image_size=32, seed=0)


def test_synthetic_supervisor_loads_from_the_cache(train_set, tmp_path, monkeypatch):
    """The default model: the supervisor of (seed, image_size) from the cache, never retrained when it is there."""
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path))
    scfg = sup.SupervisorConfig(seed=0, image_size=32)
    model, processor, _, _ = sup.build_untrained(scfg, train_set)
    path = store.supervisor_dir(scfg)
    path.mkdir()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    store.write_marker(path, scfg, complete=True, metrics={"heldout": {"verdict_accuracy": 0.875}})

    def no_training(*args, **kwargs):
        raise AssertionError("a complete cached supervisor must be loaded, not retrained")

    monkeypatch.setattr(sup, "train_supervisor", no_training)
    loaded, loaded_processor, description, random_init = sources.load_model(
        make_config(model="synthetic-supervisor", image_size=32), train_set)
    assert not random_init
    assert description.startswith(f"synthetic supervisor {path}") and "verdict accuracy 0.875" in description
    assert all((p == q).all() for p, q in zip(model.parameters(), loaded.parameters()))
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_the_default_run_loads_the_shipped_supervisor_without_training(tmp_path, monkeypatch):
    from saga_train.config import parse_args

    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "empty"))

    def no_training(*args, **kwargs):
        raise AssertionError("the default run must load the shipped supervisor, not train one")

    monkeypatch.setattr(sup, "train_supervisor", no_training)
    cfg = parse_args([])
    dataset = synthetic.SyntheticBirds("train", images_per_class=1, test_classes=cfg.synthetic_test_classes)
    description = sources.load_model(cfg, dataset).description
    assert description.startswith(f"synthetic supervisor {store.shipped_dir(sup.SupervisorConfig())}")
    assert not (tmp_path / "empty").exists()  # nothing written to the cache


def test_a_supervisor_directory_given_as_model_is_verified_first(tmp_path):
    """``--model DIR`` on a synthetic supervisor's directory checks its files' sha256 before loading them."""
    import shutil

    from saga_train import components

    copy = tmp_path / "copy"
    shutil.copytree(store.shipped_dir(sup.SupervisorConfig()), copy)
    with open(copy / "model.safetensors", "r+b") as f:  # flip bytes in the tensor data: it would still load
        f.seek(-4000, 2)
        f.write(b"\xff" * 4000)
    cfg = make_config(model=str(copy), device="cpu")
    with pytest.raises(store.SupervisorCacheError, match="model.safetensors"):
        components.resolve_model(cfg, None, components.resolve_device(cfg))
