"""Stage 1 of the synthetic supervisor: its vision tower learns to see the six attributes.

A real MLLM's vision tower is pretrained on its own before the LLM learns to read it; the synthetic
supervisor does the same. The tower of ``saga_train.synthetic.tiny`` is trained, with a throw-away
``AttributeReadout`` on its merged tokens, to classify every attribute of single training-class images
(cross-entropy summed over the attributes). Stage 2 (``saga_train.synthetic.supervisor``) then teaches
the whole model to compare two birds in words; reading attributes is a classification problem the
tower learns ~20x faster from direct labels than through a 150-token answer.
"""
import json
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from ..model import tower_tokens


class AttributeReadout(nn.Module):
    """Per-attribute attention pooling + a linear classifier: tokens ``[B, N, D]`` -> logits ``[B, n_a]`` per attribute.

    ``beta_a = softmax(q_a W_k X^T / sqrt(D))``, ``logits_a = W_a (beta_a X) + b_a``: each attribute looks at
    its own part of the bird (the beak lives in one or two tokens, the body colour in most of them).
    """

    def __init__(self, hidden_size: int, value_counts):
        super().__init__()
        self.value_counts = [int(n) for n in value_counts]
        self.queries = nn.Parameter(torch.randn(len(self.value_counts), hidden_size) * 0.02)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, n) for n in self.value_counts)

    def forward(self, x: torch.Tensor) -> list:
        scores = torch.einsum("ad,bnd->ban", self.queries, self.key(x)) / x.shape[-1] ** 0.5
        pooled = torch.einsum("ban,bnd->bad", scores.softmax(-1), x)
        return [head(pooled[:, a]) for a, head in enumerate(self.heads)]


def attribute_targets(dataset, labels) -> torch.Tensor:
    """Value index of every attribute for each label: ``[B, A]`` int64 (``dataset.combinations[label]``)."""
    return torch.tensor([list(dataset.combinations[label]) for label in labels], dtype=torch.long)


def readout_loss(logits: list, targets: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy."""
    return sum(F.cross_entropy(lg, targets[:, a]) for a, lg in enumerate(logits))


def image_inputs(image_processor, images) -> dict:
    out = image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


@torch.no_grad()
def readout_accuracy(visual, readout, image_processor, dataset, items, batch: int = 128) -> list:
    """Per-attribute accuracy of ``readout`` on images ``items`` = ``[(label, index), ...]`` of ``dataset``."""
    was_training = visual.training
    visual.eval()
    correct = torch.zeros(len(readout.value_counts))
    try:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            x = tower_tokens(visual, **image_inputs(image_processor, [dataset.render(l, i) for l, i in chunk]))
            targets = attribute_targets(dataset, [l for l, _ in chunk])
            for a, lg in enumerate(readout(x)):
                correct[a] += (lg.argmax(-1) == targets[:, a]).sum()
    finally:
        visual.train(was_training)
    return (correct / len(items)).tolist()


def pretrain_tower(visual, image_processor, train_set, *, steps: int, batch: int, lr: float, weight_decay: float,
                   warmup_steps: int, grad_clip: float, seed: int, progress: bool = True, log=None) -> dict:
    """Train ``visual`` (in place) to classify every attribute of fresh training-class images.

    Each step renders ``batch`` new images (random class of ``train_set``, random index), so no image is
    seen twice. Returns ``{"readout": AttributeReadout, "loss_first", "loss_last20", "seconds"}``;
    ``log`` (an open text file) gets one JSON line per step.
    """
    from tqdm.auto import tqdm

    hidden = visual.config.out_hidden_size
    readout = AttributeReadout(hidden, [len(v) for v in train_set.attribute_values.values()])
    params = list(visual.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    rng = random.Random(f"supervisor-perception-{seed}")
    classes = len(train_set.combinations)
    visual.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="supervisor stage 1 (tower)", disable=not progress, file=sys.stderr)
    for step in bar:
        items = [(rng.randrange(classes), rng.randrange(10**9)) for _ in range(batch)]
        x = tower_tokens(visual, **image_inputs(image_processor, [train_set.render(l, i) for l, i in items]))
        loss = readout_loss(readout(x), attribute_targets(train_set, [l for l, _ in items]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log:
            log.write(json.dumps({"stage": 1, "step": step + 1, "loss": losses[-1], "lr": schedule.get_last_lr()[0],
                                  "elapsed_s": round(time.perf_counter() - start, 3)}) + "\n")
            log.flush()
    tail = losses[-min(20, len(losses)):]
    return {"readout": readout, "loss_first": losses[0], "loss_last20": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - start, 1)}
