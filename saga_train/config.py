"""The one training configuration: a frozen dataclass, presets, and CLI flags generated from it.

Precedence: dataclass defaults < ``--preset`` < ``--config file.json`` < explicit CLI flags.
``python -m saga_train`` with no flags is the embedded CPU default: ``Config()`` with the "default"
preset, which uses the synthetic-world supervisor (``Config()`` alone uses a random tiny model, for tests).
"""
import argparse
import dataclasses
import inspect
import os
import re
import tokenize
import typing
from dataclasses import dataclass

from .errors import ConfigError
from .prompts import PROMPT_STYLES

POOLERS = ("attention", "mean")
PAIR_SAMPLING = ("balanced", "hard")
REWARDS = ("verdict", "attributes")
DML_LOSSES = ("potential_field", "proxy_anchor", "multi_similarity", "supcon")
DEVICES = ("auto", "cpu", "cuda")
CHOICES = {"pooler": POOLERS, "dml": DML_LOSSES, "prompt": PROMPT_STYLES, "device": DEVICES,
           "pair_sampling": PAIR_SAMPLING, "reward": REWARDS}


@dataclass(frozen=True)
class Config:
    """Every setting of a SAGA training run (METHOD.md names in comments)."""

    # model and data
    model: str = "tiny-random"  # a local Qwen3-VL directory, "synthetic-supervisor" or "tiny-random" (random init)
    dataset: str = "synthetic"  # synthetic | cub | cars | aircraft | inat | folder
    data_root: str = ""  # dataset directory (unused for "synthetic")
    image_size: int = 64  # images are resized to image_size x image_size (paper: 224)
    synthetic_images_per_class: int = 8  # SyntheticBirds images per training class
    synthetic_test_images_per_class: int = 8  # SyntheticBirds images per held-out class
    synthetic_train_classes: int = 100  # SyntheticBirds training classes (its supervisor knows all but the held-out)
    synthetic_test_classes: int = 200  # SyntheticBirds held-out classes (the synthetic supervisor never saw them)
    world_seed: int = 0  # SyntheticBirds split (held-out classes) and its supervisor; training randomness is `seed`
    max_eval_images: int = 0  # cap on test images for evaluation (0 = all)
    readout_pairs: int = 0  # held-out pairs the supervisor reads at each evaluation (readout.py; 0 = off; not sharded)
    # embedding map g = pooler o tower
    pooler: str = "attention"  # attention | mean
    embedding_size: int = 128  # D_e (paper: 4096)
    init_embedder: str = ""  # start tower + pooler from a saved embedder directory (another run's embedder/)
    # losses: lambda_dml L_DML + lambda_lm L_GRPO + lambda_kl L_KL (0 turns one off)
    dml: str = "potential_field"
    lambda_dml: float = 1.0
    lambda_lm: float = 1.0
    lambda_kl: float = 1.0
    proxies_per_class: int = 15  # Potential Field M
    pf_alpha: float = 4.0  # Potential Field exponent alpha (METHOD.md)
    pf_delta: float = 0.2  # Potential Field radius delta: repulsion acts, attraction stops, inside it (METHOD.md)
    # optimization
    lr_encoder: float = 2e-5
    lr_pooler: float = 1e-4
    lr_proxies: float = 2e-3  # 100x the encoder lr (PF / PA papers)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    epochs: int = 1
    steps_per_epoch: int = 0  # 0 = one pass of the class-balanced sampler over the train split
    max_steps: int = 0  # 0 = epochs * steps_per_epoch; otherwise the schedule's total number of steps
    stop_after: int = 0  # stop (with a checkpoint) once this many steps are done; the schedule is unchanged
    warmup_fraction: float = 0.05
    classes_per_batch: int = 8  # P x K images per micro-batch (paper: 64 images)
    images_per_class: int = 4
    # phase B: rollouts
    pairs_per_step: int = 4  # P pairs drawn per micro-batch (paper: 8)
    group_size: int = 4  # G samples per pair (paper: 8)
    contributing_pairs: int = 2  # K pairs with reward variance buffered per step (paper: 8)
    max_pair_draws: int = 4  # cap on pairs drawn per step while looking for K contributing pairs
    temperature: float = 1.0  # paper: 0.7
    top_p: float = 0.95
    max_new_tokens: int = 192  # room for the synthetic supervisor's JSON answer, ~125-150 tokens (paper: 1024)
    kl_layer: int = -1  # LLM layer of the attention teacher; -1 = round(26/36 * layers) (26 for 8B)
    replay_tokens: int = 0  # phase C: completion tokens per forward (rows x longest); 0 = a whole group at once
    prompt: str = "dataset"  # dataset | generic
    pair_sampling: str = "balanced"  # balanced (paper: random same / different pairs) | hard (see data/samplers.py)
    reward: str = "verdict"  # verdict (paper) | attributes: + fraction of attributes described right (rollout.py)
    shuffle_rewards: bool = False  # control: permute each group's rewards (their signal gone, their variance kept)
    # run
    seed: int = 0
    run_dir: str = "runs/saga-default"
    resume: bool = False  # continue from run_dir's checkpoint (an error when there is none)
    auto_resume: bool = False  # continue from run_dir's checkpoint when there is one, else start fresh (requeued jobs)
    preempt_signal: str = "USR1"  # stops the run like SIGTERM: step in flight, checkpoint, exit 75 ("" = SIGTERM only)
    eval_before: bool = True
    eval_every_epoch: bool = True
    eval_every: int = 0  # also evaluate every this many steps (0 = only before and at epoch ends)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end of each epoch)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # CPU intra-op threads (0 = torch's default); tiny models on a shared CPU run best on 1
    workers: int = -1  # DataLoader workers decoding images; -1 = auto (0 in-memory, on-disk up to 8 CUDA / 2 CPU)
    bf16: bool = True  # autocast on CUDA only
    grad_checkpointing: bool = True  # on the LLM, CUDA only
    liger: bool = True  # Liger-Kernel Qwen3-VL patches, CUDA only and when installed
    shard_llm: bool = False  # torchrun: shard the frozen LLM's decoder layers over the ranks (FSDP2)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        _check_choice("pooler", self.pooler, POOLERS)
        _check_choice("dml", self.dml, DML_LOSSES)
        _check_choice("prompt", self.prompt, PROMPT_STYLES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("pair_sampling", self.pair_sampling, PAIR_SAMPLING)
        _check_choice("reward", self.reward, REWARDS)
        for name in ("image_size", "embedding_size", "epochs", "classes_per_batch", "images_per_class",
                     "pairs_per_step", "group_size", "contributing_pairs", "max_pair_draws", "max_new_tokens",
                     "synthetic_images_per_class", "synthetic_test_images_per_class", "proxies_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pf_alpha <= 0 or self.pf_delta <= 0:
            raise ConfigError(f"pf_alpha and pf_delta must be > 0, got {self.pf_alpha} and {self.pf_delta}")
        for name in ("lambda_dml", "lambda_lm", "lambda_kl", "lr_encoder", "lr_pooler", "lr_proxies",
                     "weight_decay", "grad_clip", "steps_per_epoch", "max_steps", "stop_after", "checkpoint_every",
                     "threads", "max_eval_images", "replay_tokens", "eval_every", "readout_pairs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.workers < -1:
            raise ConfigError(f"workers must be >= 0 (or -1 = auto), got {self.workers}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"need 0 < top_p <= 1 and temperature > 0, got {self.top_p}, {self.temperature}")
        if self.group_size < 2 and self.lambda_lm > 0:
            raise ConfigError("group_size must be >= 2 for group-normalized advantages")
        if self.preempt_signal:
            from .preemption import signal_number

            signal_number(self.preempt_signal)
        if self.reward == "attributes" and self.dataset != "synthetic":
            raise ConfigError(f"reward='attributes' checks the attributes an answer describes, which needs a dataset "
                              f"that knows its classes' attributes (the synthetic world); dataset={self.dataset!r} "
                              "does not: use reward='verdict'")
        if self.images_per_class < 2:
            raise ConfigError("images_per_class must be >= 2 so that a batch holds same-class pairs")

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The 8B recipe of METHOD.md (one H200, bf16); pass --model DIR --dataset NAME --data-root DIR with it.
PRESETS = {
    # the embedded CPU default (README "Quick start"): the shipped synthetic supervisor, 200 held-out classes x 5
    # images, 6 epochs of the 100 training classes (150 steps, R@1 after each). SupCon, not Potential Field:
    # measured on this world (DML alone, 150 steps) it gains more R@1 (+0.23 against +0.15) in half the phase-A
    # time, and its value visibly falls where PF's stays near its plateau (README "The embedded default")
    "default": dict(model="synthetic-supervisor", dml="supcon", lr_encoder=1e-4, epochs=6,
                    synthetic_test_images_per_class=5, readout_pairs=128),
    "paper": dict(
        image_size=224, pooler="attention", embedding_size=4096, dml="potential_field", pf_alpha=4.0, pf_delta=0.2,
        proxies_per_class=15, epochs=3,
        classes_per_batch=16, images_per_class=4, pairs_per_step=8, group_size=8, contributing_pairs=8,
        max_pair_draws=64, temperature=0.7, top_p=0.95, max_new_tokens=1024, kl_layer=26,
        lr_encoder=2e-5, lr_pooler=1e-4, lr_proxies=2e-3, run_dir="runs/saga-paper", checkpoint_every=500,
        readout_pairs=64,
    ),
}


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _field_types() -> dict:
    return typing.get_type_hints(Config)


def make_config(base: Config | None = None, **overrides) -> Config:
    """``base`` (default: ``Config()``) with ``overrides``; an unknown key raises ConfigError naming it."""
    types = _field_types()
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(types)})")
    clean = {}
    for key, value in overrides.items():
        kind = types[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"config key {key!r} needs a {kind.__name__}, got {value!r}")
        clean[key] = value
    return dataclasses.replace(base or Config(), **clean)


def load_config_file(path: str) -> dict:
    """The config keys of the JSON file ``path`` (for ``--config``). A missing, empty, truncated or garbage file, one
    that is not a JSON object, an unknown key or a value of another type raises ConfigError naming the file."""
    from .files import damaged, field, read_json

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} " + ("is not a file" if os.path.exists(path) else "does not exist"))
    try:
        data = read_json(path, error=ConfigError)
        types = _field_types()
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise damaged(path, f"unknown config key(s) {', '.join(unknown)} (known: {', '.join(types)})",
                          error=ConfigError)
        for key in data:
            field(data, key, types[key], path=path, error=ConfigError)
    except ConfigError as e:
        raise ConfigError(f"config file {e}") from e
    return data


def field_comments(cls) -> dict:
    """``{field: its trailing comment}`` in the source of the dataclass ``cls``: what each setting means, written once,
    next to the field, and shown by ``--help``."""
    lines = inspect.getsource(cls).splitlines(keepends=True)
    names = set(f.name for f in dataclasses.fields(cls))
    comments = {}
    for token in tokenize.generate_tokens(iter(lines).__next__):
        if token.type == tokenize.COMMENT:
            match = re.match(r"\s+(\w+)\s*:", token.line)
            if match and match.group(1) in names and token.line.lstrip().startswith(match.group(1)):
                comments[match.group(1)] = token.string.lstrip("#").strip()
    return comments


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, choices: dict | None = None,
                        defaults=None) -> argparse.ArgumentParser:
    """One flag per field of the dataclass ``cls``: ``--field-name`` typed by its annotation, booleans as
    ``--x / --no-x``, ``choices[field]`` where given; the help is the field's own comment in the source
    (``field_comments``) and the value a run without the flag uses (the field of the instance ``defaults``, else the
    field's default). A flag left out is absent from the parsed namespace, so the caller layers the flags given over
    its own defaults."""
    types = typing.get_type_hints(cls)
    meaning = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), types[f.name]
        default = getattr(defaults, f.name) if defaults is not None else f.default
        text = (meaning[f.name] + " " if f.name in meaning else "").replace("%", "%%")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{text}(default {default})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(flag, type=kind, choices=(choices or {}).get(f.name), **common)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saga_train",
        description="SAGA: train a Qwen3-VL vision tower + pooler through its own frozen LLM. "
        "No arguments = the embedded CPU default (synthetic birds, tiny Qwen3-VL).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="settings under the --config file and flags; "
                             "the defaults shown are the 'default' preset's")
    parser.add_argument("--config", help="JSON file of config keys (CLI flags win)")
    return add_dataclass_flags(parser, Config, CHOICES, defaults=make_config(**PRESETS["default"]))


def parse_args(argv=None) -> Config:
    """Config from the command line: defaults < preset < --config file < explicit flags."""
    args = vars(build_parser().parse_args(argv))
    base = make_config(**PRESETS[args.pop("preset")])
    config_path = args.pop("config")
    if config_path:
        base = make_config(base, **load_config_file(config_path))
    return make_config(base, **args)
