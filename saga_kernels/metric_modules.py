"""nn.Module wrappers of the metric losses: ``module(embeddings, labels) -> scalar loss``.

The proxy losses own their proxies as a Parameter (pytorch-metric-learning's initialisation:
``kaiming_normal_`` with ``mode="fan_out"``); give them their own optimizer group (the PA/PF papers
use 100x the backbone learning rate). ``impl`` (None, "triton", "torch") is passed to the function.
"""
from __future__ import annotations

import torch
from torch import nn

from .multi_similarity import multi_similarity_loss
from .potential_field import potential_field_loss
from .proxy_anchor import proxy_anchor_loss
from .supcon import supcon_loss


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class ProxyAnchorLoss(nn.Module):
    """Proxy Anchor loss with one learnable proxy per class (``proxies``: [num_classes, embedding_size])."""

    def __init__(self, num_classes: int, embedding_size: int, *, margin: float = 0.1, alpha: float = 32.0,
                 impl: str | None = None):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.alpha, self.impl = margin, alpha, impl
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return proxy_anchor_loss(embeddings, labels, self.proxies, margin=self.margin, alpha=self.alpha,
                                 impl=self.impl)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}")


class PotentialFieldLoss(nn.Module):
    """Potential Field loss with ``proxies_per_class`` learnable proxies per class.

    ``proxies`` is [num_classes * proxies_per_class, embedding_size]; the buffer ``proxy_labels`` gives
    each proxy's class (class c owns rows c*M .. c*M + M - 1).
    """

    def __init__(self, num_classes: int, embedding_size: int, *, proxies_per_class: int = 15, alpha: float = 4.0,
                 delta: float = 0.2, impl: str | None = None):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size, proxies_per_class=proxies_per_class)
        self.num_classes, self.embedding_size, self.proxies_per_class = num_classes, embedding_size, proxies_per_class
        self.alpha, self.delta, self.impl = alpha, delta, impl
        self.proxies = nn.Parameter(torch.empty(num_classes * proxies_per_class, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.register_buffer("proxy_labels", torch.arange(num_classes).repeat_interleave(proxies_per_class))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return potential_field_loss(embeddings, labels, self.proxies, self.proxy_labels, alpha=self.alpha,
                                    delta=self.delta, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"proxies_per_class={self.proxies_per_class}, alpha={self.alpha}, delta={self.delta}")


class SupConLoss(nn.Module):
    """Supervised contrastive (InfoNCE with several positives) loss; see :func:`saga_kernels.supcon_loss`."""

    def __init__(self, temperature: float = 0.1, *, impl: str | None = None):
        super().__init__()
        self.temperature, self.impl = temperature, impl

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(embeddings, labels, temperature=self.temperature, impl=self.impl)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss with its miner; see :func:`saga_kernels.multi_similarity_loss`."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 miner_epsilon: float | None = 0.1, *, impl: str | None = None):
        super().__init__()
        self.alpha, self.beta, self.base, self.miner_epsilon, self.impl = alpha, beta, base, miner_epsilon, impl

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return multi_similarity_loss(embeddings, labels, alpha=self.alpha, beta=self.beta, base=self.base,
                                     miner_epsilon=self.miner_epsilon, impl=self.impl)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, miner_epsilon={self.miner_epsilon}"
