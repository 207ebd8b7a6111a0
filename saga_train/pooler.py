"""Retrieval poolers c_phi: patch tokens X [B, N, D] -> unit embeddings z [B, D_e].

Attention pooler (METHOD.md): ``beta = softmax(q W_k X^T / sqrt(D))`` over an image's patches,
``z = normalize(Linear(beta X))``; it also returns the pre-softmax logits, which L_KL pulls
towards the MLLM's attention. Mean pooler (baselines): ``z = normalize(Linear(mean X))``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionPooler(nn.Module):
    """Single learnable query over the patches; returns ``(z, logits)``."""

    def __init__(self, hidden_size: int, embedding_size: int):
        super().__init__()
        # q = 0 makes beta uniform at the start: the pooler begins as mean pooling.
        self.query = nn.Parameter(torch.zeros(hidden_size))
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, embedding_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``q W_k x_i / sqrt(D)`` for every patch: [B, N, D] -> [B, N] (fp32)."""
        keys = self.key(x)
        return (keys.float() @ self.query.float()) / math.sqrt(x.shape[-1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        logits = self.logits(x)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        beta = torch.softmax(logits, dim=-1)
        pooled = torch.einsum("bn,bnd->bd", beta.to(x.dtype), x)
        return F.normalize(self.proj(pooled).float(), dim=-1), logits


class MeanPooler(nn.Module):
    """Mean over the (unmasked) patches; returns ``(z, None)``: there are no logits to distill."""

    def __init__(self, hidden_size: int, embedding_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, embedding_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            weights = mask.to(x.dtype)
            pooled = torch.einsum("bn,bnd->bd", weights, x) / weights.sum(1, keepdim=True).clamp_min(1)
        return F.normalize(self.proj(pooled).float(), dim=-1), None


def build_pooler(kind: str, hidden_size: int, embedding_size: int) -> nn.Module:
    if kind == "attention":
        return AttentionPooler(hidden_size, embedding_size)
    if kind == "mean":
        return MeanPooler(hidden_size, embedding_size)
    raise ValueError(f"pooler={kind!r} is not 'attention' or 'mean'")
