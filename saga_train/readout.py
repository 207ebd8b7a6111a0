"""The supervisor's readout of the current tower: what GRPO is teaching, at every evaluation.

SAGA's supervisor is the frozen LLM reading the tower being trained (METHOD.md): as the tower changes, so does what
the LLM sees. The readout asks it, greedily, about a FIXED set of held-out pairs and scores the answers:

- ``readout_pairs(test_set, count, seed)``: half the pairs same-class (rounded up), a quarter one attribute apart
  (rounded down; where the split knows its classes' attributes and some class has a neighbour in it; else those go
  to random pairs) and the rest two random distinct classes, as ``ReadoutPair(kind, index_a, index_b)`` (dataset
  indices: two distinct images). Each pair is drawn independently, so a pair can repeat (e.g. 253 distinct of 256
  on the default 1,000-image test split); the set is fixed, and a paired comparison resamples it as it is.
- ``read_pairs(...)``: the greedy answers, parsed: per pair the verdict's correctness and whether the two item
  descriptions are the same text, and (with ``read``, a dataset that knows its classes' attributes) per pair, item
  and attribute whether the described value is the true one. ``ReadoutAnswers`` keeps them per pair, for paired
  comparisons between runs (``experiments/mechanism.py``).
- ``readout_metrics(answers)``: the flat record an evaluation logs (``metrics.jsonl``)::

    readout/verdict                      fraction of pairs whose verdict is right (an unreadable verdict is wrong)
    readout/verdict/<kind>               the same per pair kind (same, one_attribute, random)
    readout/parsed                       fraction of answers with a readable verdict
    readout/descriptions_agree/same      same-class pairs whose two item descriptions are the same text
    readout/attributes                   fraction of the 2A described values that are right (both items)
    readout/attribute/<name>             the same per attribute (e.g. ``readout/attribute/wing pattern``)

Chance verdict accuracy is 0.5 (half the pairs are same-class).
"""
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from . import verdict as verdict_lib
from .model import square_rgb, suppressed_token_ids
from .prompts import ITEM_KEYS
from .rollout import left_pad, pair_inputs, stop_token_ids

READOUT_KINDS = ("same", "one_attribute", "random")
READOUT_MIX = (0.5, 0.25, 0.25)  # same class, one attribute apart, random classes
PREFIX = "readout/"


@dataclass(frozen=True)
class ReadoutPair:
    kind: str  # one of READOUT_KINDS
    index_a: int  # dataset indices of the two images
    index_b: int


@dataclass
class ReadoutAnswers:
    """Per-pair results of one readout (``read_pairs``)."""

    kinds: list  # [P] str
    verdict_right: np.ndarray  # [P] bool
    parsed: np.ndarray  # [P] bool: a readable verdict
    descriptions_agree: np.ndarray  # [P] bool: the two item descriptions are the same (normalized) text
    attribute_names: list = field(default_factory=list)  # [A]
    attribute_right: np.ndarray | None = None  # [P, 2, A] bool, or None when the attributes cannot be checked
    texts: list = field(default_factory=list)  # [P] the answers


def _one_attribute_partners(dataset, label: int) -> list:
    """Classes of ``dataset`` one attribute away from ``label`` (empty when the split does not know attributes)."""
    neighbours = getattr(dataset, "neighbours", None)
    return list(neighbours(label)) if callable(neighbours) else []


def distinct_pairs(dataset) -> int:
    """How many distinct pairs of two images ``dataset`` has: ``N (N - 1) / 2``."""
    return len(dataset.labels) * (len(dataset.labels) - 1) // 2


def readout_pairs(dataset, count: int, seed: int = 0) -> list:
    """``count`` fixed pairs of ``dataset`` (a test split: ``labels`` and ``ds[i] -> (image, label)``) by
    ``READOUT_MIX``, drawn by ``random.Random(f"readout-{seed}")``; ValueError when the split has no class with two
    images or a single class."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    by_class = {}
    for i, y in enumerate(dataset.labels):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    multi = [c for c in classes if len(by_class[c]) >= 2]
    if not multi or len(classes) < 2:
        raise ValueError("the readout needs a split with a class of >= 2 images and >= 2 classes")
    near = {c: [d for d in _one_attribute_partners(dataset, c) if d in by_class] for c in classes}
    with_near = [c for c in classes if near[c]]
    possible = distinct_pairs(dataset)
    if count > possible:
        raise ValueError(f"count={count} exceeds the {possible} distinct pairs of the split's {len(dataset.labels)} "
                         "images")
    rng = random.Random(f"readout-{seed}")
    n_same = math.ceil(count * READOUT_MIX[0])  # an odd count keeps its same-class half
    n_near = math.floor(count * READOUT_MIX[1]) if with_near else 0
    pairs = []
    for k in range(count):
        if k < n_same:
            a, b = rng.sample(by_class[rng.choice(multi)], 2)
            pairs.append(ReadoutPair("same", a, b))
            continue
        if k < n_same + n_near:
            c = rng.choice(with_near)
            kind, d = "one_attribute", rng.choice(near[c])
        else:
            c, d = rng.sample(classes, 2)
            kind = "random"
        pairs.append(ReadoutPair(kind, rng.choice(by_class[c]), rng.choice(by_class[d])))
    return pairs


def _normalized(text: str | None) -> str | None:
    return " ".join(text.lower().split()) if text else None


def item_descriptions(text: str) -> tuple:
    """The two item descriptions of an answer as normalized text (None where absent)."""
    out = []
    for item in ITEM_KEYS:
        span = verdict_lib.item_span(text, item)
        out.append(_normalized(text[span[0]:span[1]].strip('"')) if span else None)
    return tuple(out)


def score_answer(text: str, same: bool, verdict_key: str, truths=None, read=None) -> dict:
    """One answer scored: ``verdict_right``, ``parsed``, ``descriptions_agree`` and (with ``read`` and ``truths``,
    the two classes' ``{attribute: value}``) ``attribute_right`` ``[2][A]`` in the order of ``truths[0]``."""
    verdict = verdict_lib.parse_verdict(text, verdict_key)
    first, second = item_descriptions(text)
    out = {"verdict_right": verdict is not None and verdict == same, "parsed": verdict is not None,
           "descriptions_agree": first is not None and first == second}
    if read is not None and truths is not None:
        out["attribute_right"] = verdict_lib.attributes_right(read(text), truths)
    return out


@torch.no_grad()
def read_pairs(model, processor, prompt: str, dataset, pairs: list, *, verdict_key: str, image_size: int,
               max_new_tokens: int, read=None, batch: int = 16, progress=None) -> ReadoutAnswers:
    """The model's greedy answers to ``prompt`` on ``pairs`` (``readout_pairs``), scored by ``score_answer``.

    ``read``: ``text -> {"item 1": {attribute: value}, ...}`` for a ``dataset`` with ``attributes(label)``
    (``sources.answer_reader``); None: no attribute scores. The model is put in eval mode and restored. ``progress``:
    an optional callable given the number of pairs answered so far.
    """
    tokenizer = processor.tokenizer
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    knows = read is not None and callable(getattr(dataset, "attributes", None))
    was_training = model.training
    model.eval()
    texts, rows = [], []
    try:
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            inputs = [pair_inputs(model, processor, prompt, square_rgb(dataset[p.index_a][0], image_size),
                                  square_rgb(dataset[p.index_b][0], image_size)) for p in chunk]
            padded = left_pad(inputs, pad)
            out = model.generate(**padded, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=pad, suppress_tokens=suppressed_token_ids(model), top_p=None,
                                 top_k=None, temperature=None)
            chunk_texts = tokenizer.batch_decode(out[:, padded["input_ids"].shape[1]:], skip_special_tokens=True)
            for p, text in zip(chunk, chunk_texts):
                la, lb = int(dataset.labels[p.index_a]), int(dataset.labels[p.index_b])
                truths = (dataset.attributes(la), dataset.attributes(lb)) if knows else None
                rows.append(score_answer(text, la == lb, verdict_key, truths, read if knows else None))
                texts.append(text)
            if progress is not None:
                progress(len(texts))
    finally:
        model.train(was_training)
    names = list(dataset.attributes(int(dataset.labels[0]))) if knows else []
    return ReadoutAnswers(kinds=[p.kind for p in pairs],
                          verdict_right=np.array([r["verdict_right"] for r in rows], dtype=bool),
                          parsed=np.array([r["parsed"] for r in rows], dtype=bool),
                          descriptions_agree=np.array([r["descriptions_agree"] for r in rows], dtype=bool),
                          attribute_names=names,
                          attribute_right=np.array([r["attribute_right"] for r in rows], dtype=bool) if knows else None,
                          texts=texts)


def readout_metrics(answers: ReadoutAnswers) -> dict:
    """The flat evaluation record of one readout (keys in the module docstring); a kind, an attribute or the
    same-class agreement without any pair is left out."""
    kinds = np.array(answers.kinds)
    out = {f"{PREFIX}verdict": float(answers.verdict_right.mean()), f"{PREFIX}parsed": float(answers.parsed.mean())}
    for kind in READOUT_KINDS:
        if (kinds == kind).any():
            out[f"{PREFIX}verdict/{kind}"] = float(answers.verdict_right[kinds == kind].mean())
    if (kinds == "same").any():
        out[f"{PREFIX}descriptions_agree/same"] = float(answers.descriptions_agree[kinds == "same"].mean())
    if answers.attribute_right is not None and answers.attribute_names:
        out[f"{PREFIX}attributes"] = float(answers.attribute_right.mean())
        for a, name in enumerate(answers.attribute_names):
            out[f"{PREFIX}attribute/{name}"] = float(answers.attribute_right[:, :, a].mean())
    return out


def format_readout(metrics: dict) -> str:
    """One line: verdict overall and by kind, attributes, same-class agreement (what the summary prints)."""
    if f"{PREFIX}verdict" not in metrics:
        return ""
    kinds = " / ".join(f"{metrics[f'{PREFIX}verdict/{k}']:.2f}" for k in READOUT_KINDS
                       if f"{PREFIX}verdict/{k}" in metrics)
    shown = [k for k in READOUT_KINDS if f"{PREFIX}verdict/{k}" in metrics]
    text = f"supervisor readout: verdict {metrics[f'{PREFIX}verdict']:.3f} ({' / '.join(shown)}: {kinds})"
    if f"{PREFIX}attributes" in metrics:
        text += f", attributes {metrics[f'{PREFIX}attributes']:.3f}"
    if f"{PREFIX}descriptions_agree/same" in metrics:
        text += f", same-class descriptions agree {metrics[f'{PREFIX}descriptions_agree/same']:.2f}"
    return text


__all__ = ["READOUT_KINDS", "READOUT_MIX", "ReadoutAnswers", "ReadoutPair", "distinct_pairs", "format_readout",
           "item_descriptions",
           "read_pairs", "readout_metrics", "readout_pairs", "score_answer"]
