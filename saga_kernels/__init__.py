"""saga-kernels: memory-lean Triton kernels for training vision encoders through frozen MLLMs.

Every op has three implementations (Triton, a tiled PyTorch fallback, and ``reference``); see
``saga_kernels._dispatch`` for which one runs.
"""
from ._checks import input_checks
from ._dispatch import ImplUnavailableError

__version__ = "0.1.0"
from .logprob import linear_logprobs  # noqa: E402
from .grpo import LinearGRPOLoss, grpo_loss, linear_grpo_loss  # noqa: E402
from .supcon import supcon_loss  # noqa: E402
from .multi_similarity import multi_similarity_loss  # noqa: E402
from .proxy_anchor import proxy_anchor_loss  # noqa: E402
from .potential_field import potential_field_loss  # noqa: E402
from .metric_modules import MultiSimilarityLoss, PotentialFieldLoss, ProxyAnchorLoss, SupConLoss  # noqa: E402
from .attention import attention_probs  # noqa: E402
from .attention_kl import attention_kl  # noqa: E402

__all__ = [
    "ImplUnavailableError", "input_checks",
    "linear_logprobs", "grpo_loss", "linear_grpo_loss", "LinearGRPOLoss",
    "supcon_loss", "multi_similarity_loss", "proxy_anchor_loss", "potential_field_loss",
    "SupConLoss", "MultiSimilarityLoss", "ProxyAnchorLoss", "PotentialFieldLoss",
    "attention_probs", "attention_kl",
]
