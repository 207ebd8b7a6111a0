"""verl's fused-kernel contract, served by :func:`saga_kernels.linear_logprobs`.

With ``actor_rollout_ref.model.use_fused_kernels=True`` and the triton backend, verl's model forwards call
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature, "none")``
on every token and back-propagate through both outputs (the entropy feeds verl's entropy bonus). This module
offers the same function; :func:`install` puts it in verl's place (verl imports the name at call time, so the
swap holds for every later forward), and importing ``saga_kernels.integrations.verl_plugin`` does that, which is
what verl's ``actor_rollout_ref.model.external_lib`` option runs in every worker.

Cost per call with N = hidden rows (every token is scored, as verl does): 2NHV forward, and the backward
recomputes the logits: 6NHV in all with a frozen head, 8NHV when the head trains (verl's actor).
"""
from __future__ import annotations

import importlib

import torch

from .._checks import check_index_range, check_number, check_tensor
from ..logprob import linear_logprobs

REDUCTIONS = ("none", "sum", "mean")
VERL_MODULE = "verl.utils.kernel.linear_cross_entropy"


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None, *,
                         impl=None):
    """verl's ``linear_cross_entropy``: ``(log_probs, entropy)`` of ``labels`` under softmax(hidden @ weight.T / T).

    hidden ``[N, H]`` or ``[B, T, H]`` (fp32 / fp16 / bf16), weight ``[V, H]``, labels ``[N]`` / ``[B, T]`` (or flat
    ``[B * T]``, which verl's kernel reads the same way) int64 or int32 in [0, V) (every token is scored: there is
    no ignore index). Returns fp32 log-probs and entropy of shape ``hidden.shape[:-1]``; with ``reduction="sum"`` /
    ``"mean"`` the log-probs are summed / averaged over every token (the negative of ``F.cross_entropy`` with that
    reduction, as verl defines it) and the entropy stays per token. Gradients flow through both outputs to hidden
    and, when it requires grad, to weight. ``dist_process_group``: None, or a group of one process (Megatron's
    tensor-parallel group at TP = 1). ``impl`` as in :func:`saga_kernels.linear_logprobs`.

    Raises NotImplementedError for a process group of more than one process (a vocabulary-parallel head: not
    supported yet), and TypeError / ValueError naming the argument for a reduction outside ("none", "sum",
    "mean"), a temperature that is not > 0, wrong shapes or dtypes, or labels outside [0, V).
    """
    if dist_process_group is not None and torch.distributed.get_world_size(dist_process_group) != 1:
        raise NotImplementedError("dist_process_group: a vocabulary-parallel (tensor-parallel) head over "
                                  f"{torch.distributed.get_world_size(dist_process_group)} processes is not "
                                  "supported by saga_kernels yet; use an unsharded head (tensor parallelism 1)")
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_number("temperature", temperature, minimum=0, strict=True)
    check_tensor("hidden", hidden, ndim=(2, 3))
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    if labels.dim() == 1 and hidden.dim() == 3 and labels.numel() == hidden.shape[0] * hidden.shape[1]:
        labels = labels.view(hidden.shape[:-1])  # verl flattens both: the same tokens in the same order
    check_tensor("labels", labels, shape=tuple(hidden.shape[:-1]))
    check_index_range("labels", labels, weight.shape[0])
    log_probs, entropy = linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
                                         impl=impl)
    reduction = reduction.lower()
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy


def install():
    """Replace verl's ``linear_cross_entropy`` (module ``verl.utils.kernel.linear_cross_entropy``) with this one;
    returns the function it replaced. Raises ImportError naming the module when verl (or that module) is missing."""
    try:
        module = importlib.import_module(VERL_MODULE)
    except ImportError as exc:
        raise ImportError(f"saga_kernels.integrations.verl.install() needs verl ({VERL_MODULE} did not "
                          "import)") from exc
    previous = module.linear_cross_entropy
    module.linear_cross_entropy = linear_cross_entropy
    return previous


__all__ = ["linear_cross_entropy", "install"]
