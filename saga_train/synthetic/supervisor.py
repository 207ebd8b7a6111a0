"""A supervisor that knows the synthetic world: a tiny Qwen3-VL taught to compare two birds attribute by attribute.

Training (``train_supervisor``) has two stages, both on TRAINING-class ``SyntheticBirds`` images (the "open"
pool: every attribute combination except the ``cfg.test_classes`` held-out classes of ``cfg.seed``):

1. ``stage1`` (``saga_train.synthetic.perception``): the vision tower learns to classify the six attributes of
   single images, as a real MLLM's tower is pretrained before its LLM learns to read it. Cached on its own
   (``stage1_path``), so changing only stage-2 settings does not redo it.
2. SFT of the whole model (the tower at ``sft_tower_lr``) on pairs asked with the trainer's own prompts
   (``saga_train.prompts.pair_prompt``; a ``generic_fraction`` of them with the generic prompt), the target
   being the JSON answer of METHOD.md built by ``build_answer``::

    {"item 1": "red body color, blue wing color, ..., fan tail shape", "item 2": "...",
     "differences": "body color red vs red match, wing color blue vs green differ, ...",
     "confidence": "high", "reasoning": "<n> of <m> attributes differ", "same_species": "yes" | "no"}

   The loss covers the answer tokens (and the closing ``<|im_end|>``) only.

Greedy decoding on held-out-class pairs (``EVAL_MIX``: half same-class) then gives verdict accuracy (as
``saga_train.verdict.parse_verdict`` reads it) and per-attribute accuracy, for each prompt.

Where a supervisor lives: the package ships the supervisor of ``SupervisorConfig()``
(``saga_train/synthetic/weights/supervisor-<config hash>``, ``shipped_dir``); any other config is trained on first
use into ``$SAGA_CACHE/supervisor-<config hash>`` (default cache ``~/.cache/saga_kernels``). Either directory
loads like a real checkpoint (``saga_train.model.load_qwen3vl(d)``). Its marker ``SUPERVISOR.json`` records the
config, the metrics and the sha256 of every other file (``verify_supervisor`` checks them before use); a
non-empty directory without the marker, or with another config's, is never overwritten (``--force`` replaces a
supervisor of another config); nothing is ever written into the package's ``weights/`` (shipping = copying a
verified directory there). ``python -m saga_train.synthetic.supervisor`` retrains from scratch into the cache and
prints its metrics next to the shipped ones.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from ..model import suppressed_token_ids
from ..prompts import ITEM_KEYS, PROMPT_STYLES, pair_prompt, prompt_spec
from .answers import DIFFER, FORMAT_VERSION, MATCH, build_answer, parse_answer, vocabulary
from .store import (
    SupervisorCacheError,
    cache_root,
    check_writable,
    config_hash,
    read_marker,
    shipped_dir,
    supervisor_dir,
    verify_supervisor,
    write_marker,
)

PAIR_KINDS = ("same", "one_attribute", "random")
EVAL_MIX = (0.5, 0.25, 0.25)  # held-out evaluation pairs: same class, one attribute apart, random classes


@dataclass(frozen=True)
class SupervisorConfig:
    """Everything that determines a trained supervisor (``threads`` changes speed and, at most, float rounding)."""

    seed: int = 0  # SyntheticBirds split seed (held-out classes), init, pairs
    test_classes: int = 200  # held-out classes (must match the SAGA run's dataset to stay held out)
    image_size: int = 64
    noise: float = 6.0  # SyntheticBirds pixel noise
    # model (saga_train.synthetic.tiny.build_tiny_qwen3vl)
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 96
    vision_depth: int = 3
    patch_size: int = 8
    # stage 1 (saga_train.synthetic.perception): the tower learns the attributes from labelled single images
    tower_steps: int = 3000
    tower_batch: int = 64  # images per step
    tower_lr: float = 1e-3
    # stage 2: SFT of the whole model on pair answers
    steps: int = 1200
    batch_pairs: int = 16
    lr: float = 1e-3  # LLM (and merger) learning rate
    sft_tower_lr: float = 1e-4  # the tower's learning rate in stage 2 (it already sees the attributes)
    weight_decay: float = 0.01
    warmup_steps: int = 30  # both stages
    grad_clip: float = 1.0
    # training pairs: same class, one attribute apart, the rest random classes. Fewer same-class pairs than the
    # evaluation's 50% so that copying item 1's description into item 2 is a poor strategy: it is what SFT learns
    # first otherwise (every pair then reads "yes")
    same_fraction: float = 0.2
    one_attribute_fraction: float = 0.3
    generic_fraction: float = 0.5  # pairs asked with the generic prompt (the rest: the dataset prompt)
    # evaluation on held-out-class pairs (greedy decoding)
    eval_pairs: int = 256
    eval_batch: int = 32
    threads: int = 0  # torch threads while training; 0 = leave torch's setting (OMP_NUM_THREADS)

    def __post_init__(self):
        for name in ("steps", "batch_pairs", "eval_pairs", "eval_batch", "test_classes", "tower_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's setting), got {self.threads}")
        if not (0 <= self.same_fraction and 0 <= self.one_attribute_fraction
                and self.same_fraction + self.one_attribute_fraction <= 1):
            raise ValueError("same_fraction and one_attribute_fraction must be >= 0 and sum to <= 1, got "
                             f"{self.same_fraction} and {self.one_attribute_fraction}")
        if self.tower_steps < 0:
            raise ValueError(f"tower_steps must be >= 0 (0 = no stage 1), got {self.tower_steps}")
        if not 0 <= self.generic_fraction <= 1:
            raise ValueError(f"generic_fraction must be in [0, 1], got {self.generic_fraction}")

    def fingerprint(self) -> dict:
        """The fields that determine the trained weights (everything but ``threads``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "threads"}


# ---------------------------------------------------------------------------------------------
# The world: datasets, prompt, vocabulary, pairs
# ---------------------------------------------------------------------------------------------

def synthetic_splits(cfg: SupervisorConfig):
    """(train, test) ``SyntheticBirds``: the open pool of training classes and the held-out classes."""
    from .world import SyntheticBirds

    common = dict(seed=cfg.seed, images_per_class=1, image_size=cfg.image_size, test_classes=cfg.test_classes,
                  noise=cfg.noise, cache=False)
    return SyntheticBirds("train", train_classes="open", **common), SyntheticBirds("test", **common)


class PairSampler:
    """Label pairs of one split: same class, one attribute apart, or two random distinct classes."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.combinations = [tuple(c) for c in dataset.combinations]
        self.label_of = {c: i for i, c in enumerate(self.combinations)}
        self.values = [len(v) for v in dataset.attribute_values.values()]
        if len(self.combinations) < 2:
            raise ValueError("a pair sampler needs at least 2 classes")

    def neighbours(self, label: int) -> list:
        """Labels one attribute away from ``label`` within this split."""
        combo = self.combinations[label]
        out = []
        for a, count in enumerate(self.values):
            for v in range(count):
                other = combo[:a] + (v,) + combo[a + 1:]
                if v != combo[a] and other in self.label_of:
                    out.append(self.label_of[other])
        return out

    def sample(self, rng: random.Random, kind: str):
        """``(label_a, label_b)`` of the given kind (one of ``PAIR_KINDS``)."""
        n = len(self.combinations)
        if kind == "same":
            a = rng.randrange(n)
            return a, a
        if kind == "one_attribute":
            for _ in range(100):
                a = rng.randrange(n)
                near = self.neighbours(a)
                if near:
                    return a, rng.choice(near)
            raise ValueError("no class in this split has a one-attribute neighbour")
        if kind == "random":
            a, b = rng.sample(range(n), 2)
            return a, b
        raise ValueError(f"pair kind must be one of {PAIR_KINDS}, got {kind!r}")


def pair_kind(rng: random.Random, cfg: SupervisorConfig) -> str:
    """Draw a pair kind with the configured mix."""
    u = rng.random()
    if u < cfg.same_fraction:
        return "same"
    return "one_attribute" if u < cfg.same_fraction + cfg.one_attribute_fraction else "random"


def eval_pairs(cfg: SupervisorConfig, test_set) -> list:
    """Fixed held-out pairs ``(kind, label_a, index_a, label_b, index_b)``: ``EVAL_MIX`` of the kinds (half the
    pairs same-class, so that chance verdict accuracy is 0.5)."""
    rng = random.Random(f"supervisor-eval-{cfg.seed}")
    sampler = PairSampler(test_set)
    counts = [round(cfg.eval_pairs * EVAL_MIX[0]), round(cfg.eval_pairs * EVAL_MIX[1])]
    counts.append(cfg.eval_pairs - sum(counts))
    pairs = []
    for kind, count in zip(PAIR_KINDS, counts):
        for _ in range(count):
            a, b = sampler.sample(rng, kind)
            ia = rng.randrange(10**6)
            ib = ia + 1 + rng.randrange(10**6) if a == b else rng.randrange(10**6)
            pairs.append((kind, a, ia, b, ib))
    return pairs


# ---------------------------------------------------------------------------------------------
# Model, batches, training, evaluation
# ---------------------------------------------------------------------------------------------

def build_untrained(cfg: SupervisorConfig, train_set):
    """(model, processor, prompts, spec): the tiny Qwen3-VL at its seeded init and the pair prompt of each style
    (``prompts["dataset"]``, ``prompts["generic"]``)."""
    from .tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

    spec = prompt_spec("synthetic", train_set)
    tokenizer = build_tokenizer(vocabulary(spec, train_set))
    processor = build_processor(tokenizer, cfg.image_size, patch_size=cfg.patch_size)
    model = build_tiny_qwen3vl(tokenizer, text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, heads=cfg.heads,
                               kv_heads=cfg.kv_heads, vision_hidden=cfg.vision_hidden, vision_depth=cfg.vision_depth,
                               patch_size=cfg.patch_size, image_size=cfg.image_size, seed=cfg.seed)
    return model, processor, {style: pair_prompt(processor, spec, style) for style in PROMPT_STYLES}, spec


def sft_batch(processor, prompts: list, images: list, answers: list) -> dict:
    """Processor inputs for ``prompts[i] + answers[i] + <|im_end|>``, ``labels`` on the answer part only.

    ``images`` holds two images per answer. The tokenizer pads on the left, so each answer is the
    last tokens of its row.
    """
    tokenizer = processor.tokenizer
    if tokenizer.padding_side != "left":
        raise ValueError("sft_batch needs a left-padding tokenizer "
                         "(saga_train.synthetic.tiny.build_tokenizer pads left)")
    suffixes = [answer + tokenizer.eos_token for answer in answers]
    if len(prompts) != len(answers) or len(images) != 2 * len(answers):
        raise ValueError(f"sft_batch needs one prompt and two images per answer, got {len(prompts)} prompts, "
                         f"{len(images)} images, {len(answers)} answers")
    inputs = processor(text=[p + s for p, s in zip(prompts, suffixes)], images=images, return_tensors="pt",
                       padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, suffix in enumerate(suffixes):
        n = len(tokenizer(suffix)["input_ids"])
        labels[row, -n:] = inputs["input_ids"][row, -n:]
    inputs["labels"] = labels
    return inputs


def train_batch(cfg, rng: random.Random, sampler: PairSampler, train_set, prompts: dict, processor, spec):
    """One SFT batch of ``cfg.batch_pairs`` freshly rendered training-class pairs, each asked with the generic
    prompt with probability ``cfg.generic_fraction`` (else the dataset prompt)."""
    images, answers, texts = [], [], []
    for _ in range(cfg.batch_pairs):
        texts.append(prompts["generic" if rng.random() < cfg.generic_fraction else "dataset"])
        a, b = sampler.sample(rng, pair_kind(rng, cfg))
        index_a = rng.randrange(10**9)
        index_b = index_a + 1 + rng.randrange(10**6) if a == b else rng.randrange(10**9)
        images += [train_set.render(a, index_a), train_set.render(b, index_b)]
        answers.append(build_answer(train_set.attributes(a), train_set.attributes(b), spec.attributes,
                                    spec.verdict_key))
    return sft_batch(processor, texts, images, answers)


def _mean(values) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


@torch.no_grad()
def evaluate_supervisor(model, processor, prompt: str, test_set, pairs: list, spec, *, batch: int = 32,
                        max_new_tokens: int = None) -> dict:
    """Greedy answers on ``pairs`` (``eval_pairs`` tuples): verdict accuracy (overall, per kind),
    per-attribute accuracy over both items, match/differ accuracy, parse and exact-match rates.

    An unreadable verdict or attribute counts as wrong. Chance verdict accuracy is 0.5 for the default mix.
    """
    tokenizer = processor.tokenizer
    names = list(spec.attributes)
    if max_new_tokens is None:
        longest = build_answer(test_set.attributes(0), test_set.attributes(0), names, spec.verdict_key)
        max_new_tokens = len(tokenizer(longest)["input_ids"]) + 8
    was_training = model.training
    model.eval()
    verdict_ok = {k: [] for k in PAIR_KINDS}
    attr_ok = {n: [] for n in names}
    diff_ok, parsed, exact = [], [], []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        images = [img for (_, a, ia, b, ib) in chunk for img in (test_set.render(a, ia), test_set.render(b, ib))]
        inputs = processor(text=[prompt] * len(chunk), images=images, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             suppress_tokens=suppressed_token_ids(model))
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for (kind, a, _, b, _), text in zip(chunk, texts):
            attrs = (test_set.attributes(a), test_set.attributes(b))
            got = parse_answer(text, names, spec.verdict_key)
            verdict_ok[kind].append(got["verdict"] == (a == b))
            parsed.append(got["verdict"] is not None)
            exact.append(text.strip() == build_answer(*attrs, names, spec.verdict_key))
            for n in names:
                attr_ok[n] += [got[key][n] == truth[n] for key, truth in zip(ITEM_KEYS, attrs)]
                diff_ok.append(got["differences"][n] == (MATCH if attrs[0][n] == attrs[1][n] else DIFFER))
    model.train(was_training)
    all_verdicts = [ok for k in PAIR_KINDS for ok in verdict_ok[k]]
    return {
        "pairs": len(pairs),
        "verdict_accuracy": _mean(all_verdicts),
        "verdict_accuracy_by_kind": {k: _mean(v) for k, v in verdict_ok.items() if v},
        "attribute_accuracy": _mean([ok for v in attr_ok.values() for ok in v]),
        "attribute_accuracy_by_name": {n: _mean(v) for n, v in attr_ok.items()},
        "differences_accuracy": _mean(diff_ok),
        "parse_rate": _mean(parsed),
        "exact_match": _mean(exact),
    }


def heldout_images(cfg: SupervisorConfig, test_set, count: int = 512) -> list:
    """Fixed held-out images ``[(label, index), ...]`` for the stage-1 readout accuracy."""
    rng = random.Random(f"supervisor-readout-{cfg.seed}")
    return [(rng.randrange(len(test_set.combinations)), rng.randrange(10**6)) for _ in range(count)]


def _sft_optimizer(model, cfg: SupervisorConfig):
    """AdamW: the vision tower's blocks and patch/position embeddings at ``sft_tower_lr``, the rest (LLM, merger)
    at ``lr``."""
    visual = model.model.visual
    merger = {id(p) for name, m in visual.named_children() if "merger" in name for p in m.parameters()}
    tower = [p for p in visual.parameters() if id(p) not in merger]
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    return torch.optim.AdamW([{"params": tower, "lr": cfg.sft_tower_lr}, {"params": rest, "lr": cfg.lr}],
                             weight_decay=cfg.weight_decay)


STAGE1_FIELDS = ("seed", "test_classes", "image_size", "noise", "text_hidden", "text_layers", "heads", "kv_heads",
                 "vision_hidden", "vision_depth", "patch_size", "tower_steps", "tower_batch", "tower_lr",
                 "weight_decay", "warmup_steps", "grad_clip")


def stage1_path(cfg: SupervisorConfig) -> Path:
    """Where stage 1's tower is cached: ``$SAGA_CACHE/tower-<hash of STAGE1_FIELDS and FORMAT_VERSION>.safetensors``
    (so changing only stage-2 settings does not retrain the tower)."""
    fields = {name: getattr(cfg, name) for name in STAGE1_FIELDS}
    blob = json.dumps({"stage1": fields, "format": FORMAT_VERSION}, sort_keys=True)
    return cache_root() / f"tower-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.safetensors"


def stage1(cfg: SupervisorConfig, model, processor, train_set, test_set, spec, *, progress=True, log=None) -> dict:
    """Stage 1 on ``model``'s tower (in place): loaded from ``stage1_path(cfg)`` when cached, else trained
    (``perception.pretrain_tower``, torch seeded with ``cfg.seed``) and cached atomically. Returns its metrics, with
    the readout's per-attribute accuracy on 512 held-out-class images."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..atomic import atomic_save_file
    from .perception import pretrain_tower, readout_accuracy

    visual, path = model.model.visual, stage1_path(cfg)
    if path.is_file():
        visual.load_state_dict(load_file(path))
        with safe_open(path, "pt") as f:
            return dict(json.loads(f.metadata()["metrics"]), cached=str(path))
    torch.manual_seed(cfg.seed)
    out = pretrain_tower(visual, processor.image_processor, train_set, steps=cfg.tower_steps, batch=cfg.tower_batch,
                         lr=cfg.tower_lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                         grad_clip=cfg.grad_clip, seed=cfg.seed, progress=progress, log=log)
    readout = out.pop("readout")
    accuracy = readout_accuracy(visual, readout, processor.image_processor, test_set, heldout_images(cfg, test_set))
    metrics = dict(out, steps=cfg.tower_steps, heldout_readout_accuracy=dict(zip(spec.attributes, accuracy)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(path),
                     metadata={"metrics": json.dumps(metrics)})
    return metrics


def train_supervisor(cfg: SupervisorConfig, log_path=None, progress: bool = True, evaluate: bool = True):
    """Train a fresh tiny Qwen3-VL in two stages; returns ``(model, processor, metrics)``.

    Stage 1 (``cfg.tower_steps``, ``stage1``; cached on its own): the vision tower classifies the attributes of
    single training-class images. Stage 2 (``cfg.steps``): SFT of the whole model on pair answers
    (``train_batch``), the tower at ``cfg.sft_tower_lr``. ``metrics``: losses, wall times, s/step, the stage-1
    readout's held-out per-attribute accuracy, and (``evaluate``) ``evaluate_supervisor`` on held-out-class pairs for
    each prompt style (``heldout``: the dataset prompt, ``heldout_generic``: the generic one). ``log_path``
    gets one JSON line per step of either stage (stage, loss, lr, elapsed seconds).
    """
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        train_set, test_set = synthetic_splits(cfg)
        model, processor, prompts, spec = build_untrained(cfg, train_set)
        sampler = PairSampler(train_set)
        rng = random.Random(f"supervisor-train-{cfg.seed}")
        metrics = {"parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
                   "train_classes": len(train_set.combinations), "heldout_classes": len(test_set.combinations)}
        with torch.random.fork_rng(devices=[]), \
                (open(log_path, "w") if log_path else contextlib.nullcontext()) as log:
            if cfg.tower_steps:
                metrics["stage1"] = stage1(cfg, model, processor, train_set, test_set, spec, progress=progress, log=log)
            torch.manual_seed(cfg.seed + 1)
            optimizer = _sft_optimizer(model, cfg)
            schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
            model.train()
            start, losses = time.perf_counter(), []
            bar = tqdm(range(cfg.steps), desc="supervisor stage 2 (SFT)", disable=not progress, file=sys.stderr)
            for step in bar:
                inputs = train_batch(cfg, rng, sampler, train_set, prompts, processor, spec)
                loss = model(**inputs).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if log:
                    log.write(json.dumps({"stage": 2, "step": step + 1, "loss": losses[-1],
                                          "lr": schedule.get_last_lr()[-1],
                                          "elapsed_s": round(time.perf_counter() - start, 3)}) + "\n")
                    log.flush()
        train_s = time.perf_counter() - start
        tail = losses[-min(20, len(losses)):]
        metrics.update({"train_loss_first": losses[0], "train_loss_last20": sum(tail) / len(tail),
                        "train_seconds": round(train_s + metrics.get("stage1", {}).get("seconds", 0.0), 1),
                        "seconds_per_step": round(train_s / cfg.steps, 4)})
        if evaluate:
            t0 = time.perf_counter()
            pairs = eval_pairs(cfg, test_set)
            for style in PROMPT_STYLES:
                key = "heldout" if style == "dataset" else "heldout_generic"
                metrics[key] = evaluate_supervisor(model, processor, prompts[style], test_set, pairs, spec,
                                                   batch=cfg.eval_batch)
            metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(threads)
    return model, processor, metrics


def ensure_supervisor(cfg: SupervisorConfig = None, out_dir=None, *, force: bool = False,
                      progress: bool = True) -> Path:
    """The directory of a trained supervisor for ``cfg``; trains and saves it on first use.

    ``out_dir`` defaults to ``supervisor_dir(cfg)``. Training writes into ``<out_dir>.partial``
    (marked as ours) and renames it into place when complete, so an interrupted run leaves no
    half-written supervisor behind.
    """
    cfg = cfg or SupervisorConfig()
    out = Path(out_dir) if out_dir is not None else supervisor_dir(cfg)
    if check_writable(out, cfg, force) == "reuse":
        verify_supervisor(out, cfg)
        return out
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        if read_marker(partial) is None:
            raise SupervisorCacheError(f"refusing to overwrite {partial}: "
                                       "not written by saga_train.synthetic.supervisor")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_marker(partial, cfg, complete=False)
    try:
        model, processor, metrics = train_supervisor(cfg, log_path=partial / "train_log.jsonl", progress=progress)
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_marker(partial, cfg, complete=True, metrics=metrics)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours: nothing half-written stays behind
        raise
    if out.exists():  # ours (check_writable passed) or empty
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def shipped_or_cached(cfg: SupervisorConfig, progress: bool = True, log=print) -> Path:
    """The supervisor of ``cfg``: the one shipped in the package (checked against its sha256) when there is one, else
    the cached one, trained (``ensure_supervisor``) on first use with a note to ``log``."""
    shipped = shipped_dir(cfg)
    if shipped is not None:
        verify_supervisor(shipped, cfg)
        return shipped
    path = supervisor_dir(cfg)
    if check_writable(path, cfg) == "train":
        total = cfg.tower_steps + cfg.steps
        log(f"no supervisor is shipped for this config (hash {config_hash(cfg)}): training it once, {total} steps "
            f"(cached in {path}; about 45 minutes on 2 CPU cores)")
    return ensure_supervisor(cfg, path, progress=progress)
