"""saga-kernels: memory-lean Triton kernels for training vision encoders through frozen MLLMs.

Every op has three implementations (Triton, a tiled PyTorch fallback, and ``reference``); see
``saga_kernels._dispatch`` for which one runs.

How a kernel file is laid out (``logprob.py``, ``supcon.py``, ``multi_similarity.py``, ``proxy_anchor.py``,
``potential_field.py``, ``attention.py``, ``attention_kl.py``; a new kernel follows the same order):

* the Triton kernels ``_[<op>_]<kernel>_kernel`` (``_supcon_fwd_kernel``, ``_pa_grad_tile_kernel``,
  ``_stats_kernel``, ``_kl_kernel``) with their device helpers;
* one launch configuration per kernel, ``<kernel>_config(...) -> dict`` (``fwd_config``, ``bwd_config``,
  ``grad_tile_config``, ``probs_config``, ``kl_config``; logprob's ``stats_config`` / ``expect_config`` /
  ``dlogits_config``): the launcher and the file's sm_90 compile test (``AOT_SPECS``) call the same function;
* the launchers ``_triton_forward`` / ``_triton_backward`` and the PyTorch fallbacks ``_torch_forward`` /
  ``_torch_backward`` (attention and attention_kl, whose forward also forms the gradient, have the forward pair
  only);
* one ``_check_inputs`` that validates every argument (types, shapes, devices, hyper-parameters, then the
  value checks) and is the first thing the public function does;
* one ``torch.autograd.Function`` named ``_<Op>`` (``_LinearLogprobs``, ``_SupCon``, ``_MultiSimilarity``,
  ``_ProxyAnchor``, ``_PotentialField``, ``_AttentionProbs``, ``_AttentionKL``); the public function prepares
  its operands (``metric_common.kernel_operand`` / ``proxy_common.kernel_labels``: the tensors as the kernels
  read them) after ``_check_inputs`` and ``resolve_impl``, right before ``_<Op>.apply``;
* one public function (``supcon_loss``, ``attention_kl``, ...), re-exported below.

Shared helpers: ``_tl_utils.py`` (device helpers: tile matmul, cosine tile, online log-sum-exp, dot
precision, launch device), ``_checks.py`` (argument and value checks), ``metric_common.py`` (what all four
metric losses share), ``pair_common.py`` (SupCon, Multi-Similarity only), ``proxy_common.py`` (Proxy Anchor,
Potential Field only). Tile constants: ``BLOCK_M`` rows of a program's tile, ``BLOCK_N`` columns per step,
``BLOCK_K`` the chunk of the reduction dimension per dot step, ``BLOCK_D`` the whole (padded) feature
dimension held by one program; an op's extra tiles name what they tile (attention's ``HP`` heads,
``BLOCK_Q`` query rows per head, ``BLOCK_IDX`` requested key columns); logprob keeps its vocabulary-head
names (``BLOCK_N`` / ``BLOCK_M`` rows, ``BLOCK_V`` vocabulary, ``BLOCK_H`` / ``BLOCK_HO`` hidden).
"""
from ._checks import input_checks
from ._dispatch import ImplUnavailableError

__version__ = "0.1.0"
from .attention import attention_probs  # noqa: E402
from .attention_kl import attention_kl  # noqa: E402
from .grpo import LinearGRPOLoss, grpo_loss, linear_grpo_loss  # noqa: E402
from .logprob import linear_logprobs  # noqa: E402
from .metric_modules import MultiSimilarityLoss, PotentialFieldLoss, ProxyAnchorLoss, SupConLoss  # noqa: E402
from .multi_similarity import multi_similarity_loss  # noqa: E402
from .potential_field import potential_field_loss  # noqa: E402
from .proxy_anchor import proxy_anchor_loss  # noqa: E402
from .supcon import supcon_loss  # noqa: E402

__all__ = [
    "ImplUnavailableError", "input_checks",
    "linear_logprobs", "grpo_loss", "linear_grpo_loss", "LinearGRPOLoss",
    "supcon_loss", "multi_similarity_loss", "proxy_anchor_loss", "potential_field_loss",
    "SupConLoss", "MultiSimilarityLoss", "ProxyAnchorLoss", "PotentialFieldLoss",
    "attention_probs", "attention_kl",
]
