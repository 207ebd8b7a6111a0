"""Shared machinery of the streaming metric losses (SupCon, Multi-Similarity, Proxy Anchor, Potential Field).

* :func:`check_embeddings_labels` validates an ``[N, D]`` float embedding matrix and its ``[N]`` integer
  labels (lengths, dtypes, device, finiteness) with errors that name the argument;
* :func:`l2_normalize` is ``x / max(||x||_2, eps)`` row-wise (pytorch-metric-learning's cosine
  convention), differentiable through autograd, so the kernels only ever see unit rows;
* :func:`remap_labels` turns arbitrary integer labels (negative, sparse, huge) into dense ``int32``
  class ids ``0..K-1`` shared across several label tensors, which is all the kernels compare;
* :func:`check_real` / :func:`check_positive` validate scalar hyper-parameters;
* :func:`compute_dtype` / :func:`tile_size` fix the precision and tile size of the PyTorch fallbacks;
  :func:`pair_tiles` and :func:`tiled_pair_backward` are the fallbacks' streaming loops over row
  blocks of the similarity matrix (one ``[rows, M]`` tile alive at a time, never ``[N, M]``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_finite, check_index_range, check_same_device, check_tensor

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Rows x columns of one similarity tile in the PyTorch fallbacks: 4 MiB of fp32 per tile.
FALLBACK_TILE_ELEMS = 1 << 20


def check_embeddings_labels(
    embeddings,
    labels,
    *,
    embeddings_name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Raise a TypeError/ValueError naming the argument unless ``embeddings`` is a finite float ``[N, D]``
    tensor (N, D >= 1) and ``labels`` an integer ``[N]`` tensor on the same device."""
    check_tensor(embeddings_name, embeddings, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(labels_name, labels, ndim=1, dtypes=INT_DTYPES)
    n, d = embeddings.shape
    if n == 0 or d == 0:
        raise ValueError(f"{embeddings_name} must have at least one row and one column, got shape {list(embeddings.shape)}")
    if labels.shape[0] != n:
        raise ValueError(
            f"{labels_name} has {labels.shape[0]} entries but {embeddings_name} has {n} rows; they must match"
        )
    check_same_device(**{embeddings_name: embeddings, labels_name: labels})
    check_finite(embeddings_name, embeddings)


def check_label_range(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Every label lies in ``[0, num_classes)`` (e.g. labels indexing a proxy table)."""
    check_index_range(name, labels, num_classes)


def check_real(name: str, value) -> float:
    """``value`` is a finite real number; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """``value`` is a finite real number > 0; return it as a float."""
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


NORM_EPS = 1e-12  # pytorch-metric-learning's (and F.normalize's) clamp of the row norm


def inverse_norms(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``r_i = 1 / max(||x_i||_2, eps)`` per row, computed and returned in float32 (float64 for float64 x)
    without an upcast copy of ``x``. The kernels take raw rows plus ``r`` and form unit-row similarities as
    ``(x_i . x_j) r_i r_j``: half-precision rows feed the tensor cores as they are, and the normalization
    itself is never rounded to the input dtype."""
    acc = compute_dtype(x.dtype)
    return torch.linalg.vector_norm(x, dim=1, dtype=acc).clamp_min(eps).reciprocal()


def normalize_backward(x: torch.Tensor, inv_norm: torch.Tensor, u: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """dL/dx from ``u_i = r_i * dL/dxhat_i`` for ``xhat_i = x_i r_i`` (r from :func:`inverse_norms`):

        dL/dx_i = r_i (g_i - xhat_i <xhat_i, g_i>) = u_i - r_i^2 <x_i, u_i> x_i,     g_i = dL/dxhat_i

    (rows whose norm was clamped at ``eps`` have the Jacobian r I, so there dL/dx_i = u_i). In u's dtype."""
    xc = x.to(u.dtype)
    radial = (xc * u).sum(dim=1) * inv_norm.to(u.dtype).square()
    clamped = inv_norm >= 1.0 / eps
    return u - torch.where(clamped, 0.0, radial)[:, None] * xc


def l2_normalize(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Row-wise ``x / max(||x||_2, eps)``; its backward is autograd's
    ``(g - x_hat * <x_hat, g>) / ||x||`` (pytorch-metric-learning's CosineSimilarity uses the same)."""
    return F.normalize(x, p=2, dim=1, eps=eps)


def remap_labels(*labels: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Map the values of all ``labels`` tensors jointly to dense ``int32`` ids in ``[0, K)``.

    Equal values get equal ids across tensors, so ``a[i] == b[j]`` is preserved. Returns the remapped
    tensors (same shapes, contiguous) and K, the number of distinct values.
    """
    flat = torch.cat([lab.reshape(-1).to(torch.int64) for lab in labels])
    uniq, inverse = torch.unique(flat, return_inverse=True)
    out, start = [], 0
    for lab in labels:
        out.append(inverse[start : start + lab.numel()].to(torch.int32).reshape(lab.shape).contiguous())
        start += lab.numel()
    return out, int(uniq.numel())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fallbacks: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_size(n_cols: int, tile_elems: int = FALLBACK_TILE_ELEMS) -> int:
    """Rows per fallback tile so that one ``[rows, n_cols]`` tile holds about ``tile_elems`` entries."""
    return max(1, min(n_cols, tile_elems // max(n_cols, 1)))


def pair_masks(lq: torch.Tensor, lk: torch.Tensor, row_offset: int, exclude_diagonal: bool):
    """(positive, negative, diag) for the tile ``rows = row_offset + arange(len(lq))`` x all columns.

    With ``exclude_diagonal`` (the key set is the query batch itself) the pairs ``i == j`` are neither
    positive nor negative, and ``diag`` indexes them in the tile (for ``tile[diag] = ...``); else None.
    """
    pos = lq[:, None] == lk[None, :]
    neg = ~pos  # (i, i) has equal labels, so it is never a negative
    diag = None
    if exclude_diagonal:
        r = torch.arange(lq.numel(), device=lq.device)
        diag = (r, r + row_offset)
        pos[diag] = False
    return pos, neg, diag


def pair_tiles(q: torch.Tensor, k: torch.Tensor, lq: torch.Tensor, lk: torch.Tensor, exclude_diagonal: bool) -> Iterator:
    """Yield ``(r0, r1, s, pos, neg, diag)`` per block of query rows (see :func:`pair_masks`),
    ``s = q[r0:r1] @ k^T`` a fresh tensor in the compute dtype (callers may overwrite it). The tiling
    depends only on the shapes, so a backward that calls this again sees bit-identical similarities
    (and identical mining decisions)."""
    cd = compute_dtype(q.dtype)
    kc = k.to(cd)
    rows = tile_size(k.shape[0])
    for r0 in range(0, q.shape[0], rows):
        r1 = min(q.shape[0], r0 + rows)
        s = q[r0:r1].to(cd) @ kc.T
        yield (r0, r1, s, *pair_masks(lq[r0:r1], lk, r0, exclude_diagonal))


def tiled_pair_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    lq: torch.Tensor,
    lk: torch.Tensor,
    grad_tile: Callable,
    *,
    exclude_diagonal: bool,
    need_dq: bool,
    need_dk: bool,
):
    """``dq = G k`` and ``dk = G^T q`` for ``G = dLoss/dS`` built tile by tile by
    ``grad_tile(r0, r1, s, pos, neg, diag)``; returns (dq, dk) in the compute dtype (None if not needed)."""
    cd = compute_dtype(q.dtype)
    kc = k.to(cd)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device) if need_dq else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_dk else None
    for r0, r1, s, pos, neg, diag in pair_tiles(q, k, lq, lk, exclude_diagonal):
        g = grad_tile(r0, r1, s, pos, neg, diag)
        if need_dq:
            dq[r0:r1] = g @ kc
        if need_dk:
            dk += g.T @ q[r0:r1].to(cd)
    return dq, dk
