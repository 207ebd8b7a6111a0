"""What the pair losses (SupCon, Multi-Similarity) share, on top of :mod:`saga_kernels.metric_common`.

* :func:`label_ids` gives equality-preserving ``int32`` ids and :func:`pair_counts` the per-row positive /
  negative pair counts without a host sync (sort + binary search);
* :func:`pair_tiles` and :func:`tiled_pair_products` are the PyTorch fallbacks' streaming loops over row
  blocks of the similarity matrix (one ``[rows, M]`` tile alive at a time, masks from :func:`pair_masks`);
* device helpers of the pair-loss kernels: :func:`pair_tile_masks`, :func:`norms_labels`, and one column tile
  with its masks: :func:`streamed_pair_tile` over raw rows through :func:`saga_kernels._tl_utils.cosine_tile`,
  :func:`resident_pair_tile` against rows resident in a fused backward program.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ._tl_utils import block_range, cosine_tile, load_rows
from ._triton import tl, triton
from .metric_common import compute_dtype, tile_size


# ----------------------------------------------------------------------------------------------------
# Labels: int32 ids and pair counts, without a host sync
# ----------------------------------------------------------------------------------------------------
def label_ids(*labels: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous ``int32`` ids for the values of all ``labels`` tensors jointly: equal ids iff equal labels.

    No host sync: a value's id is the position of its first occurrence in the sorted concatenation (ids lie
    in ``[0, total length)``, not dense). The kernels compare 32-bit ids, whatever the labels' dtype and
    range: half the label traffic and fewer registers than int64 labels.
    """
    flat = torch.cat([lab.reshape(-1).to(torch.int64) for lab in labels])
    ordered = torch.sort(flat).values
    return [torch.searchsorted(ordered, lab.to(torch.int64).contiguous()).to(torch.int32) for lab in labels]


def pair_counts(lq: torch.Tensor, lk: torch.Tensor, exclude_diagonal: bool):
    """(positive, negative) pair counts per query (int64 [N]) against the keys' labels ``lk``: keys with the
    same / a different label, the pair (i, i) not counted when ``exclude_diagonal``. No host sync (sort and
    binary search), so the kernels need not count."""
    ordered = torch.sort(lk.to(torch.int64)).values
    q = lq.to(torch.int64).contiguous()
    same = torch.searchsorted(ordered, q, right=True) - torch.searchsorted(ordered, q)
    return same - int(exclude_diagonal), lk.numel() - same


# ----------------------------------------------------------------------------------------------------
# PyTorch fallbacks: streamed [rows, M] similarity tiles
# ----------------------------------------------------------------------------------------------------
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


def pair_tiles(q: torch.Tensor, k: torch.Tensor, lq: torch.Tensor, lk: torch.Tensor,
               exclude_diagonal: bool) -> Iterator:
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


def tiled_pair_products(
    q: torch.Tensor,
    k: torch.Tensor | None,
    lq: torch.Tensor,
    lk: torch.Tensor,
    grad_tile: Callable,
    *,
    exclude_diagonal: bool,
    need_dq: bool,
    need_dk: bool,
):
    """The fallbacks' backward products for ``G = dLoss/dS`` built tile by tile by
    ``grad_tile(r0, r1, s, pos, neg, diag)`` (same arguments as :func:`pair_tiles` yields).

    ``k`` None (the batch against itself): ``grad_tile`` returns the symmetrized tile ``G_ij + G_ji`` and
    ``dq = sum_j (G + G^T)_ij q_j`` costs two matmuls per tile (similarity and product); dk is None.
    Otherwise ``dq = G k`` and ``dk = G^T q`` (each only if needed). Returns (dq, dk) in the compute dtype.
    """
    cd = compute_dtype(q.dtype)
    keys, lkeys = (q, lq) if k is None else (k, lk)
    kc = keys.to(cd)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device) if (need_dq or k is None) else None
    dk = torch.zeros(keys.shape, dtype=cd, device=q.device) if (need_dk and k is not None) else None
    for r0, r1, s, pos, neg, diag in pair_tiles(q, keys, lq, lkeys, exclude_diagonal):
        g = grad_tile(r0, r1, s, pos, neg, diag)
        if dq is not None:
            dq[r0:r1] = g @ kc
        if dk is not None:
            dk += g.T @ q[r0:r1].to(cd)
    return dq, dk


# ----------------------------------------------------------------------------------------------------
# Pair-loss kernels: device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL: tl.constexpr):
    """(positive, negative) pair masks of a tile: in range, equal / different label ids, and with
    EXCLUDE_DIAGONAL the pairs ``rows == cols`` dropped."""
    valid = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_DIAGONAL:
        valid = valid & (rows[:, None] != cols[None, :])
    same = la[:, None] == lb[None, :]
    return valid & same, valid & (la[:, None] != lb[None, :])


@triton.jit
def norms_labels(r_ptr, l_ptr, idx, ok):
    """(fp32 inverse norms, int32 label ids) of the rows ``idx`` of a pair-loss kernel (0 where masked)."""
    return tl.load(r_ptr + idx, mask=ok, other=0.0), tl.load(l_ptr + idx, mask=ok, other=0)


@triton.jit
def streamed_pair_tile(a_ptr, b_ptr, ra, la, rb_ptr, lb_ptr, rows, row_ok, c0, c1, K, stride_a, stride_b,
                       EXCLUDE_DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Columns ``[c0, c0 + BLOCK_N)`` (< c1) of b against the rows of a, the similarity streamed over K
    (:func:`~saga_kernels._tl_utils.cosine_tile`): (cols, col_ok, rb, cosines, positive, negative)."""
    cols, col_ok = block_range(c0, c1, BLOCK_N)
    rb, lb = norms_labels(rb_ptr, lb_ptr, cols, col_ok)
    s = cosine_tile(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, K, stride_a, stride_b,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    pos, neg = pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL)
    return cols, col_ok, rb, s, pos, neg


@triton.jit
def resident_pair_tile(xa, ra, la, rows, row_ok, b_ptr, rb_ptr, lb_ptr, c0, c1, stride_b, dd, d_ok,
                       EXCLUDE_DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Columns ``[c0, c0 + BLOCK_N)`` (< c1) of b against rows ``xa`` resident in one fused-backward program
    (the whole D in one dot): (cols, col_ok, the b tile in DOT_DTYPE (for ``W @ b``), ra_i rb_j, cosines,
    positive, negative)."""
    cols, col_ok = block_range(c0, c1, BLOCK_N)
    rb, lb = norms_labels(rb_ptr, lb_ptr, cols, col_ok)
    xb = load_rows(b_ptr, cols, col_ok, stride_b, dd, d_ok).to(DOT_DTYPE)
    rr = ra[:, None] * rb[None, :]
    s = tl.dot(xa, tl.trans(xb), input_precision=PRECISION) * rr
    pos, neg = pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL)
    return cols, col_ok, xb, rr, s, pos, neg
