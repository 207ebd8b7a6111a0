"""The learning-rate schedule of every training loop here (the SAGA trainer, the synthetic supervisor's SFT):
linear warm-up, then a cosine decay to 0.

It differs from transformers' ``get_cosine_schedule_with_warmup`` in one place: the warm-up's first step runs at
``1 / warmup`` of the learning rate, not at 0 (``(step + 1) / warmup`` where transformers has ``step / warmup``),
so no step is wasted at lr 0; the decay is the same half cosine, held at 0 past ``total`` steps.
"""
import math

import torch


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: ``(step + 1) / warmup`` during warm-up, then ``0.5 (1 + cos(pi progress))``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def cosine_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` of ``cosine_with_warmup`` over ``total`` steps (its state_dict restores on resume)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warmup, total))
