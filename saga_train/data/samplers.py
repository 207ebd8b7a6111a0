"""Class-balanced P x K batches; same/different pairs of a batch, balanced (the paper's) or hard (mined with the
current embedding); the kind of a pair."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch


def _as_label_list(labels, name: str = "labels") -> list[int]:
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
        labels = labels.tolist()
    out = [int(v) for v in labels]
    if not out:
        raise ValueError(f"{name} is empty")
    return out


class ClassBalancedBatchSampler:
    """Batches of ``classes_per_batch`` (P) distinct classes x ``images_per_class`` (K) indices each.

    Classes are visited in a shuffled cycle and each class's images in a shuffled cycle, so one epoch
    touches classes and images evenly. A class with fewer than K images contributes all of them plus
    draws with replacement. ``len`` = batches per epoch = max(1, N // (P * K)). Deterministic in
    (seed, epoch); call ``set_epoch`` to get the next epoch's order.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, images_per_class: int, seed: int = 0):
        labels = _as_label_list(labels)
        by_class = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[y].append(i)
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        if not 1 <= classes_per_batch <= len(by_class):
            raise ValueError(f"classes_per_batch must be in [1, {len(by_class)}] (the number of classes in labels), "
                             f"got {classes_per_batch}")
        self.classes = sorted(by_class)
        self.by_class = {c: np.array(by_class[c]) for c in self.classes}
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
        self.seed, self.epoch = seed, 0
        self.num_batches = max(1, len(labels) // (classes_per_batch * images_per_class))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        K = self.images_per_class
        orders = {c: rng.permutation(idx) for c, idx in self.by_class.items()}
        cursor = dict.fromkeys(self.classes, 0)
        queue: list = []
        for _ in range(self.num_batches):
            chosen: list = []
            while len(chosen) < self.classes_per_batch:
                if not queue:
                    queue = [self.classes[j] for j in rng.permutation(len(self.classes))]
                c = queue.pop()
                if c in chosen:  # only after a refill: keep it for a later batch
                    queue.insert(0, c)
                    continue
                chosen.append(c)
            batch = []
            for c in chosen:
                idx = self.by_class[c]
                if len(idx) < K:
                    batch.extend(idx.tolist() + rng.choice(idx, K - len(idx), replace=True).tolist())
                    continue
                if cursor[c] + K > len(idx):
                    orders[c], cursor[c] = rng.permutation(idx), 0
                batch.extend(orders[c][cursor[c]:cursor[c] + K].tolist())
                cursor[c] += K
            yield batch


def _randbelow(generator, n: int) -> int:
    """A uniform int in [0, n) from a torch / numpy / ``random`` generator."""
    if isinstance(generator, torch.Generator):
        return int(torch.randint(n, (1,), generator=generator).item())
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(n))
    return generator.randrange(n)


def _pair_plan(labels: list, num_pairs: int):
    """``(indices by class, same-class pairs to draw, different-class pairs, the classes with >= 2 items)``: half
    the pairs (rounded up) same-class; ValueError when a kind of pair is needed but impossible."""
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    n_same = (num_pairs + 1) // 2
    n_diff = num_pairs - n_same
    multi = [c for c in sorted(by_class) if len(by_class[c]) >= 2]
    if n_same and not multi:
        raise ValueError("cannot draw a same-class pair: no class in labels has 2 or more items "
                         "(use a class-balanced batch with images_per_class >= 2)")
    if n_diff and len(by_class) < 2:
        raise ValueError("cannot draw a different-class pair: labels hold a single class")
    return by_class, n_same, n_diff, multi


def _shuffled(pairs: list, generator) -> list:
    order = list(range(len(pairs)))
    for k in range(len(order) - 1, 0, -1):  # Fisher-Yates with the caller's generator
        r = _randbelow(generator, k + 1)
        order[k], order[r] = order[r], order[k]
    return [pairs[k] for k in order]


def _generator(generator):
    if generator is None or isinstance(generator, int):
        return random.Random(generator or 0)
    return generator


def sample_pairs(labels: Sequence[int], num_pairs: int, generator=None) -> list[tuple[int, int, bool]]:
    """``num_pairs`` index pairs (i, j, same) over a batch: ceil(num_pairs/2) same-class, the rest different.

    ``generator``: a ``torch.Generator``, ``numpy.random.Generator``, ``random.Random``, an int seed, or
    None (seed 0). Pairs are distinct (i < j, no repeats) while enough distinct pairs exist; beyond that
    repeats are allowed. Raises ValueError when a kind of pair is needed but impossible (no class with
    two items for a same pair, a single class for a different pair). The order is shuffled.
    """
    labels = _as_label_list(labels)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    generator = _generator(generator)
    by_class, n_same, n_diff, multi = _pair_plan(labels, num_pairs)
    possible_same = sum(len(by_class[c]) * (len(by_class[c]) - 1) // 2 for c in multi)
    possible_diff = len(labels) * (len(labels) - 1) // 2 - possible_same

    def draw_same():
        members = by_class[multi[_randbelow(generator, len(multi))]]
        a = _randbelow(generator, len(members))
        b = _randbelow(generator, len(members) - 1)
        return members[a], members[b + (b >= a)]

    def draw_diff():
        while True:
            a, b = _randbelow(generator, len(labels)), _randbelow(generator, len(labels))
            if labels[a] != labels[b]:
                return a, b

    pairs = []
    for count, possible, draw, same in ((n_same, possible_same, draw_same, True),
                                        (n_diff, possible_diff, draw_diff, False)):
        seen: set = set()
        for _ in range(count):
            i, j = sorted(draw())
            while (i, j) in seen and len(seen) < possible:
                i, j = sorted(draw())
            seen.add((i, j))
            pairs.append((i, j, same))
    return _shuffled(pairs, generator)


def sample_hard_pairs(embeddings: torch.Tensor, labels: Sequence[int], num_pairs: int, generator=None,
                      seen: set | None = None) -> list[tuple[int, int, bool]]:
    """``num_pairs`` hard index pairs ``(anchor, partner, same)`` over a batch, by the current embedding.

    ceil(num_pairs/2) same-class pairs: a uniform anchor among the items with a same-class partner, paired with the
    same-class item of LOWEST cosine similarity to it (the farthest); the rest different-class pairs: a uniform
    anchor, paired with the other-class item of HIGHEST cosine similarity (its nearest wrong-class neighbour: what
    retrieval confuses). A pair already in ``seen`` (sorted index tuples; updated in place, so a step's later draws
    take the next hardest) is skipped for the anchor's next hardest partner while one is left. Ties go to the lower
    index. ``embeddings`` ``[N, D]`` float (any norm), ``labels`` ``[N]``; generator as ``sample_pairs``. The order
    is shuffled. An extension beyond the paper (its pairs are ``sample_pairs``): hard-negative mining as in
    metric learning (e.g. Schroff et al. 2015, FaceNet), applied to the pairs the supervisor judges.
    """
    labels = _as_label_list(labels)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] != len(labels):
        raise ValueError(f"embeddings must be a [N, D] tensor with N = len(labels) = {len(labels)}, got "
                         f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)}")
    if not torch.is_floating_point(embeddings) or not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings must be finite floats")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    generator = _generator(generator)
    seen = set() if seen is None else seen
    by_class, n_same, n_diff, multi = _pair_plan(labels, num_pairs)
    x = torch.nn.functional.normalize(embeddings.detach().double().cpu(), dim=1)
    sim = (x @ x.T).tolist()
    y = labels
    anchors = {True: [i for c in multi for i in by_class[c]], False: list(range(len(y)))}
    pairs = []
    for count, same in ((n_same, True), (n_diff, False)):
        for _ in range(count):
            a = anchors[same][_randbelow(generator, len(anchors[same]))]
            partners = [j for j in range(len(y)) if j != a and (y[j] == y[a]) == same]
            # hardest first: same-class by ascending similarity, different-class by descending; then index
            partners.sort(key=lambda j: (sim[a][j] if same else -sim[a][j], j))
            fresh = [j for j in partners if (min(a, j), max(a, j)) not in seen]
            b = (fresh or partners)[0]
            seen.add((min(a, b), max(a, b)))
            pairs.append((a, b, same))
    return _shuffled(pairs, generator)


PAIR_KINDS = ("same", "one_attribute", "different")


def pair_kind(dataset, label_a: int, label_b: int) -> str:
    """``"same"`` (one class), ``"one_attribute"`` (classes one attribute apart, for a dataset that knows its classes'
    attributes: ``dataset.attributes(label) -> dict``) or ``"different"``."""
    if label_a == label_b:
        return "same"
    attributes = getattr(dataset, "attributes", None)
    if callable(attributes):
        a, b = attributes(label_a), attributes(label_b)
        if sum(a.get(k) != v for k, v in b.items()) == 1:
            return "one_attribute"
    return "different"
