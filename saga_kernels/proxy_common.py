"""What the proxy losses (Proxy Anchor, Potential Field) share, on top of :mod:`saga_kernels.metric_common`.

* :func:`check_proxy_inputs` validates a possibly empty batch plus a proxy table, :func:`check_label_range`
  labels that index the proxy table (errors name the argument);
* what their launchers share: :func:`kernel_labels` (labels as the kernels read them), :func:`launch_dtype`
  (the common dtype of the two operands), :func:`column_splits` (split the columns of a sweep when rows are
  few) with :func:`partial_sums_cap`, and the fused backward's limits and launch configuration
  (:func:`fits_fused_backward`, :func:`fused_backward_config`).
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_finite, check_index_range, check_same_device, check_tensor
from ._tl_utils import cdiv, next_pow2
from .metric_common import INT_DTYPES, block_k, check_embeddings_labels, is_half


def check_proxy_inputs(embeddings, labels, proxies, proxy_labels=None, *, rows: str) -> None:
    """The inputs of a proxy loss: ``embeddings`` [N >= 0, D] with ``labels`` [N] (an empty batch needs only
    empty labels), finite float ``proxies`` [``rows`` >= 1, D] and, when given, integer ``proxy_labels`` (one
    per proxy), all on one device. Errors name the argument; ``rows`` names the proxy count in them."""
    check_tensor("embeddings", embeddings, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, ndim=1, dtypes=INT_DTYPES)
    if embeddings.shape[0] > 0:
        check_embeddings_labels(embeddings, labels)
    elif labels.shape[0] != 0:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has 0 rows; they must match")
    check_tensor("proxies", proxies, ndim=2, dtypes=FLOAT_DTYPES)
    named = dict(embeddings=embeddings, labels=labels, proxies=proxies)
    if proxy_labels is not None:
        check_tensor("proxy_labels", proxy_labels, ndim=1, dtypes=INT_DTYPES)
        named["proxy_labels"] = proxy_labels
    if proxies.shape[0] == 0 or proxies.shape[1] != embeddings.shape[1] or proxies.shape[1] == 0:
        raise ValueError(
            f"proxies must have shape [{rows} >= 1, {embeddings.shape[1]}] (embeddings are {list(embeddings.shape)}), "
            f"got {list(proxies.shape)}"
        )
    if proxy_labels is not None and proxy_labels.shape[0] != proxies.shape[0]:
        raise ValueError(
            f"proxy_labels has {proxy_labels.shape[0]} entries but proxies has {proxies.shape[0]} rows; they must match"
        )
    check_same_device(**named)
    check_finite("proxies", proxies)


def check_label_range(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Every label lies in ``[0, num_classes)`` (e.g. labels indexing a proxy table)."""
    check_index_range(name, labels, num_classes)


# ----------------------------------------------------------------------------------------------------
# What the launchers share: labels and dtypes as the kernels read them, column splits, fused-backward limits
# ----------------------------------------------------------------------------------------------------
def kernel_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as loaded by the kernels: int32/int64 as they are (unit stride), other int dtypes widened."""
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    return labels if labels.stride(0) == 1 else labels.contiguous()


def launch_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype both operands of a dot are cast to inside the kernels (a no-op when they match)."""
    return x.dtype if x.dtype == w.dtype else torch.promote_types(x.dtype, w.dtype)


TARGET_PROGRAMS = 528  # column splits until about this many programs run (4 per SM of an H100 SXM)
PARTIAL_BYTES = 256 * 2**20  # fused backward: fp32 partial sums over column splits stay under this


def column_splits(row_programs: int, n_cols: int, block: int, cap: int | None = None) -> tuple[int, int]:
    """(number of column splits, columns per split: a multiple of ``block``) for a sweep over ``n_cols``
    columns by ``row_programs`` row blocks: split until about TARGET_PROGRAMS programs run (at most ``cap``
    splits)."""
    tiles = max(1, cdiv(n_cols, block))
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(row_programs, 1), cap if cap is not None else tiles))
    per_split = cdiv(tiles, splits)
    return cdiv(tiles, per_split), per_split * block


def partial_sums_cap(rows: int, d: int) -> int:
    """Most column splits whose fp32 partial sums (``[splits, rows, d]``) stay under PARTIAL_BYTES."""
    return max(1, PARTIAL_BYTES // (4 * max(1, rows) * d))


def fits_fused_backward(d: int, dtype: torch.dtype, max_fused_d: int) -> bool:
    """Whether a proxy loss's backward accumulates D in one program: D <= ``max_fused_d`` for half inputs,
    D <= ``max_fused_d`` / 2 for fp32 (tf32x3 splits the [BLOCK_N, BLOCK_D] product operand into three
    register copies: at D = 512 that and the 128-register accumulator spill 4-8 KB per thread at any
    BLOCK_N)."""
    return d <= (max_fused_d if is_half(dtype) else max_fused_d // 2)


def fused_backward_config(d: int, dtype: torch.dtype) -> dict:
    """A proxy loss's fused backward kernel: the [BLOCK_M, BLOCK_D] fp32 accumulator lives in registers
    (64 x 512 over 8 warps: 128 per thread), the [BLOCK_N, BLOCK_D] product operand in shared memory next
    to the similarity's two pipelined stages. BLOCK_N = 32 (16 for fp32 beyond D = 128) keeps registers at
    <= 252 with no spills (sm_90 compile, tests); 64 spills at D = 512."""
    block_d = max(16, next_pow2(d))
    block_m = 128 if block_d <= 128 else 64
    block_n = 32 if (is_half(dtype) or block_d <= 128) else 16
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k(dtype), BLOCK_D=block_d, num_warps=8,
                num_stages=2)
