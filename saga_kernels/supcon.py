"""Streaming supervised contrastive loss (SupCon / InfoNCE with several positives).

Same conventions as pytorch-metric-learning 2.9 ``SupConLoss(temperature)`` with its defaults
(CosineSimilarity, AvgNonZeroReducer). Queries are the rows ``x_i`` of ``embeddings``; keys ``k_j`` are the
batch itself or a plain reference set (pml's ``ref_emb``). With inverse norms ``r_i = 1 / max(||x_i||, eps)``
(:func:`~saga_kernels.metric_common.inverse_norms`), unit rows ``xhat_i = r_i x_i``, cosines
``s_ij = (x_i . k_j) r_i r_j``, logits ``z_ij = s_ij / T`` and the kept columns ``K(i)`` = every key except
``j = i`` when the keys' labels are the ``labels`` tensor itself (pml's rule):

    lse_i  = logsumexp_{j in K(i)} z_ij,        P(i) = {j in K(i): y_j = y_i}
    loss_i = lse_i - (1 / |P(i)|) sum_{p in P(i)} z_ip              (0 when P(i) is empty)
    loss   = (1 / |C|) sum_{i in C} loss_i,      C = {i: loss_i > 0}

Zero loss (never NaN; zero gradients): no positive or no negative pair in the whole batch, at most one of
each (pml's rule), no anchor with loss_i > 0, or an empty batch (N = 0).

Gradient. With ``coef = [batch active] / |C| * dL_out / T`` (a scalar) and the softmax
``p_ij = exp(z_ij - lse_i)`` over K(i):

    G_ij = dLoss/ds_ij = coef [i in C] (p_ij - [j in P(i)] / |P(i)|)
    u_i  = r_i dLoss/dxhat_i = sum_j G_ij r_i r_j k_j                        (queries)
    w_j  = r_j dLoss/dkhat_j = sum_i G_ij r_i r_j x_i                        (reference keys)
    dLoss/dx_i = u_i - r_i^2 <x_i, u_i> x_i                                  (normalize_backward)

``[i in C]`` is folded into the row statistics (lse_i = +inf and 1/|P(i)| = 0 for rows outside C), so the
kernels read two numbers per row and one scalar. Batch against itself (keys = queries): ``s`` is symmetric,
so ``u_i = sum_j (G_ij + G_ji) r_i r_j x_j`` where ``G_ji`` comes from the same tile ``s_ij`` with the row
statistics of ``j``: one pass. The pair counts |P(i)| and |negatives of i| depend on the labels only and come
from a sort and a binary search (:func:`~saga_kernels.pair_common.pair_counts`), not from the kernels.

Kernels (the N x M similarity matrix is never stored; raw rows in their own dtype feed ``tl.dot``: bf16/fp16
on the tensor cores, fp32 as tf32x3/tf32 per ``torch.get_float32_matmul_precision()``, fp64 cast to fp32;
labels as int32 ids from :func:`~saga_kernels.pair_common.label_ids`, without a host sync):

* ``_supcon_fwd_kernel``: row block x all key tiles, the similarity streamed over D in BLOCK_K chunks
  (``cosine_tile``); online log-sum-exp and the positive-logit sum per row. 1 similarity-sized matmul.
* ``_supcon_bwd_kernel`` (D <= ``fused_max_d``: ``_MAX_FUSED_D`` = 256 for bf16, 64 for fp32 and fp16, which
  runs on fp32 operands as tf32: ``W`` is a dot operand and fp16 cannot hold it, ``_tl_utils.grad_dot_config``):
  row block of ``a`` resident in shared memory x all tiles of ``b``; each b tile is loaded once and feeds both the
  recomputed similarity and ``W @ b`` (``W = coef G r r`` from the stats of the rows of ``a``, of ``b``, or
  both), accumulated in a ``[64, next_pow2(D)]`` fp32 register tile. Self: one launch (a = b = x, both
  stats), 2 matmuls. Reference set: a rows launch (a = x, b = k) and a columns launch (a = k, b = x), 4.
  Above those D the [64, D] accumulator does not fit next to the tile math in 255 registers on sm_90
  (D = 512 bf16 spills at any BLOCK_N >= 32; fp32's tf32x3 split operands spill from D = 128).
* ``_supcon_grad_tile_kernel`` (larger D): writes ``W`` for a chunk of at most 64 MiB once (bf16 for bf16
  inputs on a GPU, else fp32); cuBLAS does ``W @ x`` (self: 2 matmuls in all) or ``W @ k`` and ``W^T @ x``
  (reference set: 3), accumulating in fp32.

The forward streams the similarity in BLOCK_K chunks, the fused backward in one dot over the padded D, so
the two can differ in the last bit (harmless: SupCon makes no decision on s). The torch fallback computes the
same math in fp32 (fp64 for fp64 input) on ``[rows, M]`` tiles of about 4 MiB
(:func:`~saga_kernels.pair_common.pair_tiles`), 2 matmuls per tile for the batch against itself.
"""
from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor
from ._dispatch import resolve_impl
from ._tl_utils import (
    block_range,
    cdiv,
    dot_config,
    grad_dot_config,
    grad_dtype,
    load_rows,
    lse_update,
    next_pow2,
    on_device,
    store_rows,
)
from ._triton import tl, triton
from .metric_common import (
    block_k,
    check_embeddings_labels,
    check_positive,
    inverse_norms,
    is_half,
    kernel_operand,
    launch_grad_chunks,
    normalize_backward,
)
from .pair_common import (
    label_ids,
    norms_labels,
    pair_counts,
    pair_tiles,
    resident_pair_tile,
    streamed_pair_tile,
    tiled_pair_products,
)

_MAX_FUSED_D = 256  # largest D (half precision) whose backward keeps the [BLOCK_M, D] accumulator in one program
_MAX_FUSED_D_FP32 = 64  # the same for fp32 operands (tf32x3 splits them in two); see fused_max_d

# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _supcon_fwd_kernel(q_ptr, k_ptr, rq_ptr, rk_ptr, lq_ptr, lk_ptr,
                       lse_ptr, pos_sum_ptr,
                       N, M, D, stride_q, stride_k, inv_temp,
                       EXCLUDE_DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Per query row i over its kept columns: lse_i and pos_sum_i = sum_{p in P(i)} z_ip (the pair counts
    depend on the labels only and come from :func:`~saga_kernels.pair_common.pair_counts`; counting here
    would put a second, index-only copy of the masks in registers).

    Per key tile: (BLOCK_M + BLOCK_N) * D input elements read, 2 * BLOCK_M * BLOCK_N * D flops.
    """
    inv_t = tl.cast(inv_temp, tl.float32)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, N, BLOCK_M)
    rq, lq = norms_labels(rq_ptr, lq_ptr, rows, row_ok)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        _, _, _, z, pos, neg = streamed_pair_tile(q_ptr, k_ptr, rq, lq, rk_ptr, lk_ptr, rows, row_ok, n0, M, D,
                                                  stride_q, stride_k, EXCLUDE_DIAGONAL, BLOCK_M, BLOCK_N, BLOCK_K,
                                                  DOT_DTYPE, PRECISION)
        z = z * inv_t
        m, s = lse_update(m, s, tl.where(pos | neg, z, float("-inf")))
        pos_sum += tl.sum(tl.where(pos, z, 0.0), axis=1)
    lse = tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), 0.0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(pos_sum_ptr + rows, pos_sum, mask=row_ok)


@triton.jit
def _supcon_grad(z, pos, kept, lse, inv_pos):
    """G / coef = softmax - [pos] / |P| on a tile; ``lse``, ``inv_pos`` broadcast along the axis of the rows
    they belong to ([R, 1] for the tile's rows, [1, C] for its columns). 0 off the kept pairs and for rows
    outside C (their lse is +inf and inv_pos 0, see ``_backward_stats``)."""
    soft = tl.exp(tl.where(kept, z - lse, float("-inf")))
    return soft - tl.where(pos, inv_pos, 0.0)


@triton.jit
def _supcon_bwd_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, la_ptr, lb_ptr,
                       lse_a_ptr, inv_pos_a_ptr, lse_b_ptr, inv_pos_b_ptr, coef_ptr, u_ptr,
                       NA, NB, D, stride_a, stride_b, stride_u, inv_temp,
                       A_STATS: tl.constexpr, B_STATS: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """u[a rows] = sum_j W_ij b_j with W_ij = coef (A_STATS G(s_ij; stats of a_i) + B_STATS G(s_ij; stats of
    b_j)) ra_i rb_j (coef: a device scalar), s_ij the cosine of a_i and b_j; the whole D (BLOCK_D >= D) is
    accumulated in this program.

    Self: a = b = x with both stats. Reference set: (a = x, b = k, A_STATS) for the queries,
    (a = k, b = x, B_STATS) for the keys. The program's [BLOCK_M, BLOCK_D] rows of a stay resident; each
    [BLOCK_N, BLOCK_D] tile of b is loaded once (pipelined) and feeds both products, the recomputed
    similarity and ``W @ b``: 2 * 2 * BLOCK_M * BLOCK_N * BLOCK_D flops per b tile.
    """
    inv_t = tl.cast(inv_temp, tl.float32)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, NA, BLOCK_M)
    ra, la = norms_labels(ra_ptr, la_ptr, rows, row_ok)
    if A_STATS:
        lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0)[:, None]
        inv_pos_a = tl.load(inv_pos_a_ptr + rows, mask=row_ok, other=0.0)[:, None]
    coef = tl.load(coef_ptr)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    xa = load_rows(a_ptr, rows, row_ok, stride_a, dd, d_ok).to(DOT_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, NB, BLOCK_N):
        cols, col_ok, xb, rr, z, pos, neg = resident_pair_tile(xa, ra, la, rows, row_ok, b_ptr, rb_ptr, lb_ptr, n0,
                                                               NB, stride_b, dd, d_ok, EXCLUDE_DIAGONAL, BLOCK_N,
                                                               DOT_DTYPE, PRECISION)
        z = z * inv_t
        kept = pos | neg
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if A_STATS:
            g += _supcon_grad(z, pos, kept, lse_a, inv_pos_a)
        if B_STATS:
            lse_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=0.0)[None, :]
            inv_pos_b = tl.load(inv_pos_b_ptr + cols, mask=col_ok, other=0.0)[None, :]
            g += _supcon_grad(z, pos, kept, lse_b, inv_pos_b)
        acc = tl.dot((g * (rr * coef)).to(DOT_DTYPE), xb, acc, input_precision=PRECISION)
    store_rows(u_ptr, rows, row_ok, stride_u, dd, d_ok, acc)


@triton.jit
def _supcon_grad_tile_kernel(q_ptr, k_ptr, rq_ptr, rk_ptr, lq_ptr, lk_ptr, lse_ptr, inv_pos_ptr, coef_ptr, w_ptr,
                             row0, row1, col0, col1, D, stride_q, stride_k, stride_w, inv_temp,
                             SYMMETRIC: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """w[i - row0, j - col0] = W_ij for rows [row0, row1) x keys [col0, col1), one [BLOCK_M, BLOCK_N] tile per
    program: W = coef G r r with the query stats (SYMMETRIC, keys = queries: plus the transposed term G_ji)."""
    inv_t = tl.cast(inv_temp, tl.float32)
    rows, row_ok = block_range(row0 + tl.program_id(0).to(tl.int64) * BLOCK_M, row1, BLOCK_M)
    rq, lq = norms_labels(rq_ptr, lq_ptr, rows, row_ok)
    cols, col_ok, rk, z, pos, neg = streamed_pair_tile(q_ptr, k_ptr, rq, lq, rk_ptr, lk_ptr, rows, row_ok,
                                                       col0 + tl.program_id(1).to(tl.int64) * BLOCK_N, col1, D,
                                                       stride_q, stride_k, EXCLUDE_DIAGONAL, BLOCK_M, BLOCK_N,
                                                       BLOCK_K, DOT_DTYPE, PRECISION)
    z = z * inv_t
    kept = pos | neg
    g = _supcon_grad(z, pos, kept, tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None],
                     tl.load(inv_pos_ptr + rows, mask=row_ok, other=0.0)[:, None])
    if SYMMETRIC:
        g += _supcon_grad(z, pos, kept, tl.load(lse_ptr + cols, mask=col_ok, other=0.0)[None, :],
                          tl.load(inv_pos_ptr + cols, mask=col_ok, other=0.0)[None, :])
    w = g * (rq[:, None] * rk[None, :] * tl.load(coef_ptr))
    store_rows(w_ptr, rows - row0, row_ok, stride_w, cols - col0, col_ok, w.to(w_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------------------
# Launch configurations (one function per kernel: the launchers and the sm_90 compile test use the same)
# --------------------------------------------------------------------------------------------------------
def fused_max_d(dtype: torch.dtype) -> int:
    """Largest D whose backward runs fused (``_supcon_bwd_kernel``); larger D takes the gradient-tile path.

    Half precision: ``_MAX_FUSED_D``. fp32 operands go to the tensor cores as tf32x3 (three products on
    split hi/lo operands), which doubles the resident operands; above D = 64 the fused kernel spills on
    sm_90, so fp32 stops there (``_MAX_FUSED_D_FP32``)."""
    return _MAX_FUSED_D if is_half(dtype) else min(_MAX_FUSED_D, _MAX_FUSED_D_FP32)


def fwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_supcon_fwd_kernel``, grid (cdiv(N, 128),): 128 x 64 tiles, 8 warps (the [128, 64] fp32 logit tile is
    32 registers per thread); operands stream through shared memory in 3 stages of (128 + 64) x BLOCK_K.
    sm_90: 166 registers (bf16) / 208 (fp32), no spills."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


def bwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_supcon_bwd_kernel``, grid (cdiv(Na, 64),), D <= fused_max_d(dtype): the [64, BLOCK_D] fp32
    accumulator takes BLOCK_D / 4 registers per thread over 8 warps (64 at D = 256), the resident a rows
    and two stages of [BLOCK_N, BLOCK_D] b tiles sit in shared memory. BLOCK_N shrinks as D grows to stay
    clear of the 255-register limit (sm_90, bf16: 181 registers at D = 128 with BLOCK_N = 64, 189 at
    D = 256 with 32; D = 256 with BLOCK_N = 64 spills). D = 512 would spill at any BLOCK_N >= 32 and sit at
    exactly 255 registers with 16, where the resident rows are re-read from shared memory for every 16
    columns; hence _MAX_FUSED_D = 256 and the gradient-tile path above it."""
    block_d = max(16, next_pow2(d))
    block_n = 64 if (block_d <= 128 and is_half(dtype)) else 32
    return dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8, num_stages=2)


def grad_tile_config(d: int, dtype: torch.dtype) -> dict:
    """``_supcon_grad_tile_kernel``, grid (cdiv(rows, 128), cdiv(cols, 64)) per chunk, D > fused_max_d: one
    128 x 64 tile per program, streamed like the forward (sm_90: 183 registers bf16, 203 fp32)."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _triton_forward(q, k, rq, rk, lq, lk, inv_temp: float, exclude_diagonal: bool):
    """Row statistics (lse, pos_sum) in fp32 of the queries ``q`` against keys ``k`` (int32 label ids)."""
    n, d = q.shape
    m = k.shape[0]
    lse, pos_sum = (torch.zeros(n, dtype=torch.float32, device=q.device) for _ in range(2))
    if n == 0 or m == 0:
        return lse, pos_sum
    dot_dtype, precision = dot_config(q.dtype, q.device)
    cfg = fwd_config(d, q.dtype)
    with on_device(q):
        _supcon_fwd_kernel[(cdiv(n, cfg["BLOCK_M"]),)](
            q, k, rq, rk, lq, lk, lse, pos_sum, n, m, d, q.stride(0), k.stride(0), inv_temp,
            EXCLUDE_DIAGONAL=exclude_diagonal, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
    return lse, pos_sum


def _fused_products(a, b, ra, rb, la, lb, stats_a, stats_b, coef, inv_temp, exclude_diagonal):
    """u[a rows] = sum_j W_ij b_j (fp32 [Na, D]) with ``_supcon_bwd_kernel``; stats_* = (lse, inv_pos) or
    None (that side's term is left out)."""
    na, d = a.shape
    u = torch.empty(na, d, dtype=torch.float32, device=a.device)
    dot_dtype, precision = grad_dot_config(a.dtype, a.device)  # the gradient tile is an operand: never fp16
    cfg = bwd_config(d, grad_dtype(a.dtype))
    sa = stats_a if stats_a is not None else (None, None)  # that side's term is compiled out
    sb = stats_b if stats_b is not None else (None, None)
    with on_device(a):
        _supcon_bwd_kernel[(cdiv(na, cfg["BLOCK_M"]),)](
            a, b, ra, rb, la, lb, *sa, *sb, coef, u, na, b.shape[0], d, a.stride(0), b.stride(0), u.stride(0),
            inv_temp, A_STATS=stats_a is not None, B_STATS=stats_b is not None, EXCLUDE_DIAGONAL=exclude_diagonal,
            DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
    return u


def _triton_backward(q, k, rq, rk, lq, lk, stats, coef, inv_temp, exclude_diagonal, need_dq, need_dk):
    """(u_q, u_k) in fp32, ``u = r * dLoss/dxhat`` (see the module docstring); k None: the batch against
    itself (u_k None). stats = (lse, inv_pos) of the queries (fp32, see ``_backward_stats``), coef a
    1-element fp32 tensor."""
    n, d = q.shape
    m = n if k is None else k.shape[0]
    if n == 0 or m == 0:
        zeros = lambda rows: torch.zeros(rows, d, dtype=torch.float32, device=q.device)  # noqa: E731
        return zeros(n) if (need_dq or k is None) else None, zeros(m) if (need_dk and k is not None) else None
    if d <= fused_max_d(grad_dtype(q.dtype)):
        if k is None:
            return _fused_products(q, q, rq, rq, lq, lq, stats, stats, coef, inv_temp, exclude_diagonal), None
        u_q = u_k = None
        if need_dq:
            u_q = _fused_products(q, k, rq, rk, lq, lk, stats, None, coef, inv_temp, exclude_diagonal)
        if need_dk:
            u_k = _fused_products(k, q, rk, rq, lk, lq, None, stats, coef, inv_temp, exclude_diagonal)
        return u_q, u_k
    keys, rkeys, lkeys = (q, rq, lq) if k is None else (k, rk, lk)
    dot_dtype, precision = dot_config(q.dtype, q.device)
    cfg = dict(grad_tile_config(d, q.dtype), SYMMETRIC=k is None, EXCLUDE_DIAGONAL=exclude_diagonal,
               DOT_DTYPE=dot_dtype, PRECISION=precision)

    def chunk_args(w, r0, r1, c0, c1):
        return (q, keys, rq, rkeys, lq, lkeys, *stats, coef, w, r0, r1, c0, c1, d, q.stride(0), keys.stride(0),
                w.stride(0), inv_temp)

    return launch_grad_chunks(_supcon_grad_tile_kernel, cfg, chunk_args, q, k, dtype=q.dtype, need_da=need_dq,
                              need_db=need_dk)


# --------------------------------------------------------------------------------------------------------
# PyTorch fallback (same math on ~4 MiB [rows, M] tiles, fp32 or fp64)
# --------------------------------------------------------------------------------------------------------
def _unit_rows(x, r):
    return x.to(r.dtype) * r[:, None]


def _torch_forward(q, k, lq, lk, inv_temp: float, exclude_diagonal: bool):
    """Row statistics (lse, pos_sum) of ``z = q k^T / T`` for unit rows q, k."""
    cd = q.dtype
    n = q.shape[0]
    lse, pos_sum = (torch.zeros(n, dtype=cd, device=q.device) for _ in range(2))
    if n == 0 or k.shape[0] == 0:
        return lse, pos_sum
    for r0, r1, s, pos, neg, _ in pair_tiles(q, k, lq, lk, exclude_diagonal):
        z = s.mul_(inv_temp)
        pos_sum[r0:r1] = torch.where(pos, z, 0.0).sum(1)
        row_lse = torch.logsumexp(torch.where(pos | neg, z, float("-inf")), dim=1)
        lse[r0:r1] = torch.where(torch.isfinite(row_lse), row_lse, 0.0)
    return lse, pos_sum


def _torch_grad(z, pos, kept, lse, inv_pos):
    """The fallback's ``_supcon_grad``."""
    soft = torch.where(kept, z - lse, float("-inf")).exp_()
    return soft.sub_(torch.where(pos, inv_pos, 0.0))


def _torch_backward(q, k, lq, lk, stats, coef, inv_temp, exclude_diagonal, need_dq, need_dk):
    """(dLoss/dq, dLoss/dk) for unit rows q, k (k None: the batch against itself); stats as the kernels'."""
    lse, inv_pos = stats
    self_keys = k is None

    def grad_tile(r0, r1, s, pos, neg, diag):
        z = s.mul_(inv_temp)
        kept = pos | neg
        g = _torch_grad(z, pos, kept, lse[r0:r1, None], inv_pos[r0:r1, None])
        if self_keys:
            g += _torch_grad(z, pos, kept, lse[None, :], inv_pos[None, :])
        return g.mul_(coef)

    return tiled_pair_products(q, k, lq, lk, grad_tile, exclude_diagonal=exclude_diagonal,
                               need_dq=need_dq, need_dk=need_dk)


# --------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------
def supcon_from_stats(lse, pos_sum, pos_cnt, neg_cnt):
    """(loss, counted, inv_pos, scale) from the row statistics and pair counts, without a host sync:
    ``counted_i`` = [i in C], ``inv_pos_i`` = 1 / |P(i)| (0 without positives) and the 0-dim
    ``scale = [batch active] / |C|``, so d loss / d loss_i = counted_i * scale."""
    cnt = pos_cnt.to(lse.dtype)
    has_pos = pos_cnt > 0
    inv_pos = torch.where(has_pos, 1.0 / cnt.clamp_min(1), 0.0)
    row_loss = torch.where(has_pos, lse - pos_sum * inv_pos, 0.0)
    pos_total, neg_total = pos_cnt.sum(), neg_cnt.sum()
    counted = row_loss > 0
    active = (pos_total > 0) & (neg_total > 0) & ((pos_total > 1) | (neg_total > 1))
    scale = active.to(row_loss.dtype) / counted.sum().clamp_min(1)
    return torch.where(counted, row_loss, 0.0).sum() * scale, counted, inv_pos, scale


def _backward_stats(lse, inv_pos, counted):
    """Row statistics the backward reads: rows outside C get lse = +inf and inv_pos = 0, so their G row is
    exactly 0 and the per-row weight becomes the scalar ``coef`` (one register, no per-row load)."""
    return torch.where(counted, lse, float("inf")).contiguous(), torch.where(counted, inv_pos, 0.0).contiguous()


class _SupCon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, lq, lk, temperature: float, exclude_diagonal: bool, impl: str):
        """x: query rows; k: reference rows, or None for the batch against itself (both as
        :func:`~saga_kernels.metric_common.kernel_operand` gives them)."""
        inv_temp = 1.0 / temperature
        self_keys = k is None
        counts = pair_counts(lq, lq if self_keys else lk, exclude_diagonal)
        xs, ks = x, (x if self_keys else k)
        rq = inverse_norms(xs)
        rk = rq if self_keys else inverse_norms(ks)
        if impl == "triton":
            lq, lk = label_ids(lq) * 2 if self_keys else label_ids(lq, lk)
            stats = _triton_forward(xs, ks, rq, rk, lq, lk, inv_temp, exclude_diagonal)
        else:
            lk = lq if self_keys else lk
            q = _unit_rows(xs, rq)
            stats = _torch_forward(q, q if self_keys else _unit_rows(ks, rk), lq, lk, inv_temp, exclude_diagonal)
        loss, counted, inv_pos, scale = supcon_from_stats(*stats, *counts)
        ctx.save_for_backward(xs, None if self_keys else ks, lq, lk, rq, rk,
                              *_backward_stats(stats[0], inv_pos, counted), scale)
        ctx.inv_temp, ctx.self_keys, ctx.exclude_diagonal, ctx.impl = inv_temp, self_keys, exclude_diagonal, impl
        ctx.dtypes = (x.dtype, None if self_keys else k.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        xs, ks, lq, lk, rq, rk, lse, inv_pos, scale = ctx.saved_tensors
        self_keys, inv_temp = ctx.self_keys, ctx.inv_temp
        need_dq = ctx.needs_input_grad[0]
        need_dk = (not self_keys) and ctx.needs_input_grad[1]
        if not (need_dq or need_dk):
            return (None,) * 7
        coef = scale * (grad * inv_temp)  # dLoss/ds_ij = coef * G_ij (see _supcon_grad)
        if ctx.impl == "triton":
            stats = (lse.float(), inv_pos.float())
            u_q, u_k = _triton_backward(xs, ks, rq, rk, lq, lk, stats, coef.float().reshape(1), inv_temp,
                                        ctx.exclude_diagonal, need_dq, need_dk)
        else:
            q = _unit_rows(xs, rq)
            k = None if self_keys else _unit_rows(ks, rk)
            g_q, g_k = _torch_backward(q, k, lq, lk, (lse, inv_pos), coef, inv_temp, ctx.exclude_diagonal,
                                       need_dq, need_dk)
            u_q = g_q * rq[:, None] if g_q is not None else None
            u_k = g_k * rk[:, None] if g_k is not None else None
        dx = normalize_backward(xs, rq, u_q).to(ctx.dtypes[0]) if need_dq else None
        dk = normalize_backward(ks, rk, u_k).to(ctx.dtypes[1]) if need_dk else None
        return dx, dk, None, None, None, None, None


def _check_inputs(embeddings, labels, temperature, ref_embeddings, ref_labels) -> None:
    """Every argument of :func:`supcon_loss`, errors naming it."""
    check_embeddings_labels(embeddings, labels)
    check_positive("temperature", temperature)
    if (ref_embeddings is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"ref_embeddings and ref_labels go together; {missing} is missing")
    if ref_embeddings is not None:
        check_embeddings_labels(ref_embeddings, ref_labels, embeddings_name="ref_embeddings", labels_name="ref_labels")
        check_tensor("ref_embeddings", ref_embeddings, shape=(None, embeddings.shape[1]))
        check_same_device(embeddings=embeddings, ref_embeddings=ref_embeddings)


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss of ``embeddings [N, D]`` with integer ``labels [N]`` (see module doc).

    ``ref_embeddings [M, D]`` / ``ref_labels [M]`` (both or neither) replace the keys, as in pml's
    ``loss(embeddings, labels, ref_emb=..., ref_labels=...)``: a plain reference set, every query is compared
    with every reference row (this is not pml's CrossBatchMemory, which also drops each query's own copy).
    As in pml, pairs (i, i) are dropped only when ``ref_labels is labels`` (the same tensor object).
    Gradients flow to ``embeddings`` and to ``ref_embeddings`` when it requires grad. Returns a scalar of
    ``embeddings.dtype``; an empty batch (N = 0) gives 0 and zero gradients.
    """
    _check_inputs(embeddings, labels, temperature, ref_embeddings, ref_labels)
    which = resolve_impl(impl, embeddings, ref_embeddings)
    exclude_diagonal = ref_labels is None or ref_labels is labels
    x, k = embeddings, ref_embeddings
    if k is embeddings and ref_labels is labels:
        k = None  # the batch against itself: one tensor, one gradient, one backward pass
    if k is not None and k.dtype != x.dtype:  # mixed precision: both at the wider of the two
        common = torch.promote_types(x.dtype, k.dtype)
        x, k = x.to(common), k.to(common)
    x, k = kernel_operand(x, which), (None if k is None else kernel_operand(k, which))
    loss = _SupCon.apply(x, k, labels, ref_labels, float(temperature), exclude_diagonal, which)
    return loss.to(embeddings.dtype)
