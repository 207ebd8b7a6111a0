"""Streaming Multi-Similarity loss with the Multi-Similarity miner built in.

Same conventions as pytorch-metric-learning 2.9 ``MultiSimilarityLoss(alpha, beta, base)`` fed by
``MultiSimilarityMiner(epsilon)`` (CosineSimilarity, MeanReducer). With inverse norms
``r_i = 1 / max(||x_i||, eps)`` (:func:`~saga_kernels.metric_common.inverse_norms`), cosines
``s_ij = (x_i . x_j) r_i r_j``, positives ``P(i) = {j != i: y_j = y_i}`` and negatives
``N(i) = {j: y_j != y_i}``:

    miner:  keep p in P(i) iff s_ip - eps < max_{n in N(i)} s_in
            keep n in N(i) iff s_in + eps > min_{p in P(i)} s_ip
    lse_pos_i = log(1 + sum_{kept p} exp(-alpha (s_ip - base)))
    lse_neg_i = log(1 + sum_{kept n} exp(beta (s_in - base)))
    loss      = (1/N) sum_i (lse_pos_i / alpha + lse_neg_i / beta)

``miner_epsilon=None`` keeps every pair. Zero loss (never NaN; zero gradients), as in pml: at most one kept
positive pair and at most one kept negative pair in the batch (this covers pml's miner returning nothing for
a batch without positive or without negative pairs), or an empty batch (N = 0). Mining decisions are
constants for autograd.

Gradient. With the scalar ``coef = [batch active] / N * dL_out`` and the kept masks of row i:

    G_ij = dLoss/ds_ij = coef (exp(beta (s_ij - base) - lse_neg_i) [j kept neg of i]
                               - exp(-alpha (s_ij - base) - lse_pos_i) [j kept pos of i])
    u_i  = r_i dLoss/dxhat_i = sum_j (G_ij + G_ji) r_i r_j x_j   (s symmetric: G_ji from s_ij, row j's stats)
    dLoss/dx_i = u_i - r_i^2 <x_i, u_i> x_i                      (normalize_backward)

Kernels (the N x N matrix is never stored; raw rows in their own dtype feed ``tl.dot``: bf16/fp16 on the
tensor cores, fp32 as tf32x3/tf32 per ``torch.get_float32_matmul_precision()``, fp64 cast to fp32; labels as
int32 ids from :func:`~saga_kernels.pair_common.label_ids`, without a host sync):

* ``_ms_fwd_kernel``: row block x all column tiles, similarity streamed over D in BLOCK_K chunks; with the
  miner two passes (row min positive / max negative, then the two online log-sum-exps and the kept-pair
  counts): 2 similarity-sized matmuls (1 without the miner).
* ``_ms_bwd_kernel`` (D <= ``fused_max_d``: ``_MAX_FUSED_D`` = 256 for bf16, 64 for fp32 and fp16, which runs
  on fp32 operands as tf32: ``W`` is a dot operand and fp16 cannot hold it, ``_tl_utils.grad_dot_config``): one pass,
  row block resident in shared memory x all column tiles, each column tile loaded once for both the
  recomputed similarity and ``W @ x_cols`` (``W = (G + G^T) r r``), accumulated in a ``[64, next_pow2(D)]``
  fp32 register tile: 2 matmuls. Larger D does not fit in 255 registers on sm_90 (see supcon.py).
* ``_ms_grad_tile_kernel`` (larger D): writes ``W`` for a chunk of at most 64 MiB once (bf16 for bf16
  inputs on a GPU, else fp32), cuBLAS does ``W @ x``: 2 matmuls.

The gradient-tile kernel recomputes ``s_ij`` with the forward's BLOCK_K chunks; the fused kernel in one dot
over the padded D. A mining decision of the backward therefore equals the forward's except for a pair whose
cosine lies within the dot's rounding of its threshold (the G_ji term, from tile (i, j) instead of (j, i),
likewise). The torch fallback computes the same math in fp32 (fp64 for fp64 input) on ``[rows, N]`` tiles of
about 4 MiB, 2 matmuls per tile.
"""
from __future__ import annotations

import torch

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
    check_real,
    inverse_norms,
    is_half,
    kernel_operand,
    launch_grad_chunks,
    normalize_backward,
)
from .pair_common import (
    label_ids,
    norms_labels,
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
def _ms_mined(s, pos, neg, min_pos, max_neg, eps, USE_MINER: tl.constexpr):
    """MultiSimilarityMiner: positive kept iff s - eps < max_neg, negative iff s + eps > min_pos (row stats
    broadcast along their rows' axis). Comparisons only: +-inf thresholds of rows without pairs are safe."""
    if USE_MINER:
        mp = pos & (s - eps < max_neg)
        mn = neg & (s + eps > min_pos)
    else:
        mp = pos
        mn = neg
    return mp, mn


@triton.jit
def _ms_params(alpha, beta, base, eps):
    """The hyper-parameters in fp32."""
    return tl.cast(alpha, tl.float32), tl.cast(beta, tl.float32), tl.cast(base, tl.float32), tl.cast(eps, tl.float32)


@triton.jit
def _ms_fwd_kernel(x_ptr, r_ptr, l_ptr, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr,
                   mined_pos_ptr, mined_neg_ptr,
                   N, D, stride_x, alpha, beta, base, eps,
                   USE_MINER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Per row i over j != i: (pass 1, USE_MINER) min positive / max negative cosine; (pass 2) lse_pos_i,
    lse_neg_i (online log-sum-exps started from the "1 +" term) and the kept pair counts."""
    alpha, beta, base, eps = _ms_params(alpha, beta, base, eps)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, N, BLOCK_M)
    ri, li = norms_labels(r_ptr, l_ptr, rows, row_ok)
    min_pos = tl.full((BLOCK_M,), float("inf"), tl.float32)
    max_neg = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if USE_MINER:
        for n0 in range(0, N, BLOCK_N):
            _, _, _, s, pos, neg = streamed_pair_tile(x_ptr, x_ptr, ri, li, r_ptr, l_ptr, rows, row_ok, n0, N, D,
                                                      stride_x, stride_x, True, BLOCK_M, BLOCK_N, BLOCK_K,
                                                      DOT_DTYPE, PRECISION)
            min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, s, float("inf")), axis=1))
            max_neg = tl.maximum(max_neg, tl.max(tl.where(neg, s, float("-inf")), axis=1))
    m_p = tl.zeros((BLOCK_M,), dtype=tl.float32)  # log(1 + sum exp(x)): the "1" is exp(0), m starts at 0
    l_p = tl.full((BLOCK_M,), 1.0, tl.float32)
    m_n = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l_n = tl.full((BLOCK_M,), 1.0, tl.float32)
    mined_pos = tl.zeros((BLOCK_M,), dtype=tl.int32)
    mined_neg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        _, _, _, s, pos, neg = streamed_pair_tile(x_ptr, x_ptr, ri, li, r_ptr, l_ptr, rows, row_ok, n0, N, D,
                                                  stride_x, stride_x, True, BLOCK_M, BLOCK_N, BLOCK_K,
                                                  DOT_DTYPE, PRECISION)
        mp, mn = _ms_mined(s, pos, neg, min_pos[:, None], max_neg[:, None], eps, USE_MINER)
        m_p, l_p = lse_update(m_p, l_p, tl.where(mp, -alpha * (s - base), float("-inf")))
        m_n, l_n = lse_update(m_n, l_n, tl.where(mn, beta * (s - base), float("-inf")))
        mined_pos += tl.sum(mp.to(tl.int32), axis=1)
        mined_neg += tl.sum(mn.to(tl.int32), axis=1)
    tl.store(lse_pos_ptr + rows, m_p + tl.log(l_p), mask=row_ok)
    tl.store(lse_neg_ptr + rows, m_n + tl.log(l_n), mask=row_ok)
    tl.store(min_pos_ptr + rows, min_pos, mask=row_ok)
    tl.store(max_neg_ptr + rows, max_neg, mask=row_ok)
    tl.store(mined_pos_ptr + rows, mined_pos, mask=row_ok)
    tl.store(mined_neg_ptr + rows, mined_neg, mask=row_ok)


@triton.jit
def _ms_stats(lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, idx, ok, AXIS: tl.constexpr):
    """(lse_pos, lse_neg, min_pos, max_neg) of the rows ``idx`` (0 where masked), broadcast along the tile
    axis they belong to: AXIS = 1 gives [R, 1] (the tile's rows), AXIS = 0 gives [1, C] (its columns)."""
    return (tl.expand_dims(tl.load(lse_pos_ptr + idx, mask=ok, other=0.0), AXIS),
            tl.expand_dims(tl.load(lse_neg_ptr + idx, mask=ok, other=0.0), AXIS),
            tl.expand_dims(tl.load(min_pos_ptr + idx, mask=ok, other=0.0), AXIS),
            tl.expand_dims(tl.load(max_neg_ptr + idx, mask=ok, other=0.0), AXIS))


@triton.jit
def _ms_grad(s, pos, neg, lse_pos, lse_neg, min_pos, max_neg, alpha, beta, base, eps, USE_MINER: tl.constexpr):
    """G / coef on a tile from one side's row statistics (broadcast along that side's axis); 0 off the kept
    pairs."""
    mp, mn = _ms_mined(s, pos, neg, min_pos, max_neg, eps, USE_MINER)
    gp = tl.exp(tl.where(mp, -alpha * (s - base) - lse_pos, float("-inf")))
    gn = tl.exp(tl.where(mn, beta * (s - base) - lse_neg, float("-inf")))
    return gn - gp


@triton.jit
def _ms_side_grad(s, pos, neg, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, idx, ok, AXIS: tl.constexpr,
                  alpha, beta, base, eps, USE_MINER: tl.constexpr):
    """``_ms_grad`` with the statistics of the tile's rows (AXIS = 1) or columns (AXIS = 0) ``idx``."""
    lse_pos, lse_neg, min_pos, max_neg = _ms_stats(lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, idx, ok, AXIS)
    return _ms_grad(s, pos, neg, lse_pos, lse_neg, min_pos, max_neg, alpha, beta, base, eps, USE_MINER)


@triton.jit
def _ms_bwd_kernel(x_ptr, r_ptr, l_ptr, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, coef_ptr, u_ptr,
                   N, D, stride_x, stride_u, alpha, beta, base, eps,
                   USE_MINER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """u[rows] = sum_j (G_ij + G_ji) r_i r_j x_j over all columns j (coef: a device scalar), the whole D
    (BLOCK_D >= D) accumulated in this program. The program's [BLOCK_M, BLOCK_D] rows stay resident; each
    [BLOCK_N, BLOCK_D] column tile is loaded once (pipelined) and feeds both products:
    2 * 2 * BLOCK_M * BLOCK_N * BLOCK_D flops per tile."""
    alpha, beta, base, eps = _ms_params(alpha, beta, base, eps)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, N, BLOCK_M)
    ri, li = norms_labels(r_ptr, l_ptr, rows, row_ok)
    lse_pos_i, lse_neg_i, min_pos_i, max_neg_i = _ms_stats(lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr,
                                                           rows, row_ok, 1)
    coef = tl.load(coef_ptr)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    xi = load_rows(x_ptr, rows, row_ok, stride_x, dd, d_ok).to(DOT_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols, col_ok, xj, rr, s, pos, neg = resident_pair_tile(xi, ri, li, rows, row_ok, x_ptr, r_ptr, l_ptr, n0, N,
                                                               stride_x, dd, d_ok, True, BLOCK_N, DOT_DTYPE,
                                                               PRECISION)
        g = _ms_grad(s, pos, neg, lse_pos_i, lse_neg_i, min_pos_i, max_neg_i, alpha, beta, base, eps, USE_MINER)
        g += _ms_side_grad(s, pos, neg, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, cols, col_ok, 0,
                           alpha, beta, base, eps, USE_MINER)
        acc = tl.dot((g * (rr * coef)).to(DOT_DTYPE), xj, acc, input_precision=PRECISION)
    store_rows(u_ptr, rows, row_ok, stride_u, dd, d_ok, acc)


@triton.jit
def _ms_grad_tile_kernel(x_ptr, r_ptr, l_ptr, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, coef_ptr, w_ptr,
                         row0, row1, col0, col1, D, stride_x, stride_w, alpha, beta, base, eps,
                         USE_MINER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """w[i - row0, j - col0] = (G_ij + G_ji) r_i r_j for rows [row0, row1) x columns [col0, col1), one
    [BLOCK_M, BLOCK_N] tile per program."""
    alpha, beta, base, eps = _ms_params(alpha, beta, base, eps)
    rows, row_ok = block_range(row0 + tl.program_id(0).to(tl.int64) * BLOCK_M, row1, BLOCK_M)
    ri, li = norms_labels(r_ptr, l_ptr, rows, row_ok)
    cols, col_ok, rj, s, pos, neg = streamed_pair_tile(x_ptr, x_ptr, ri, li, r_ptr, l_ptr, rows, row_ok,
                                                       col0 + tl.program_id(1).to(tl.int64) * BLOCK_N, col1, D,
                                                       stride_x, stride_x, True, BLOCK_M, BLOCK_N, BLOCK_K,
                                                       DOT_DTYPE, PRECISION)
    g = _ms_side_grad(s, pos, neg, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, rows, row_ok, 1,
                      alpha, beta, base, eps, USE_MINER)
    g += _ms_side_grad(s, pos, neg, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr, cols, col_ok, 0,
                       alpha, beta, base, eps, USE_MINER)
    w = g * (ri[:, None] * rj[None, :] * tl.load(coef_ptr))
    store_rows(w_ptr, rows - row0, row_ok, stride_w, cols - col0, col_ok, w.to(w_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------------------
# Launch configurations (one function per kernel: the launchers and the sm_90 compile test use the same)
# --------------------------------------------------------------------------------------------------------
def fused_max_d(dtype: torch.dtype) -> int:
    """Largest D whose backward runs fused (``_ms_bwd_kernel``); larger D takes the gradient-tile path.
    Half precision: ``_MAX_FUSED_D``; fp32 (tf32x3 splits the operands in two): ``_MAX_FUSED_D_FP32``."""
    return _MAX_FUSED_D if is_half(dtype) else min(_MAX_FUSED_D, _MAX_FUSED_D_FP32)


def fwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_ms_fwd_kernel``, grid (cdiv(N, 128),): 128 x 64 tiles, 8 warps (the [128, 64] fp32 tile is 32
    registers per thread; the two online log-sum-exps and the miner's row min/max are per-row vectors);
    3-stage operand pipeline of (128 + 64) x BLOCK_K."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


def bwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_ms_bwd_kernel``, grid (cdiv(N, 64),), D <= fused_max_d(dtype): the [64, BLOCK_D] fp32 accumulator
    takes BLOCK_D / 4 registers per thread over 8 warps, the resident rows and two stages of [BLOCK_N,
    BLOCK_D] column tiles sit in shared memory. The miner's two-sided masks cost more registers than
    SupCon's: BLOCK_N = 32 (64 spills at D = 128 on sm_90), 16 for fp32 (tf32x3)."""
    return dict(BLOCK_M=64, BLOCK_N=32 if is_half(dtype) else 16, BLOCK_D=max(16, next_pow2(d)), num_warps=8,
                num_stages=2)


def grad_tile_config(d: int, dtype: torch.dtype) -> dict:
    """``_ms_grad_tile_kernel``, grid (cdiv(rows, 128), cdiv(cols, 32)) per chunk, D > fused_max_d: one
    128 x 32 tile per program, streamed like the forward (two-sided mining and the tile store: 128 x 64
    spills on sm_90, 128 x 32 takes 140 registers bf16, 165 fp32)."""
    return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _triton_forward(x, r, labels, alpha, beta, base, eps):
    """Row statistics (lse_pos, lse_neg, min_pos, max_neg fp32; mined_pos, mined_neg int32); eps None: no miner."""
    n, d = x.shape
    lse_pos, lse_neg = (torch.zeros(n, dtype=torch.float32, device=x.device) for _ in range(2))
    min_pos = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    max_neg = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    mined_pos, mined_neg = (torch.zeros(n, dtype=torch.int32, device=x.device) for _ in range(2))
    out = (lse_pos, lse_neg, min_pos, max_neg, mined_pos, mined_neg)
    if n == 0:
        return out
    dot_dtype, precision = dot_config(x.dtype, x.device)
    cfg = fwd_config(d, x.dtype)
    with on_device(x):
        _ms_fwd_kernel[(cdiv(n, cfg["BLOCK_M"]),)](
            x, r, labels, *out, n, d, x.stride(0), alpha, beta, base, 0.0 if eps is None else eps,
            USE_MINER=eps is not None, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
    return out


def _triton_backward(x, r, labels, stats, coef, alpha, beta, base, eps):
    """u = r * dLoss/dxhat (fp32 [N, D]); stats = (lse_pos, lse_neg, min_pos, max_neg) fp32, coef a
    1-element fp32 tensor."""
    n, d = x.shape
    if n == 0:
        return torch.zeros(n, d, dtype=torch.float32, device=x.device)
    params = (alpha, beta, base, 0.0 if eps is None else eps)
    if d <= fused_max_d(grad_dtype(x.dtype)):
        cfg = bwd_config(d, grad_dtype(x.dtype))
        dot_dtype, precision = grad_dot_config(x.dtype, x.device)  # the gradient tile is an operand: never fp16
        u = torch.empty(n, d, dtype=torch.float32, device=x.device)
        with on_device(x):
            _ms_bwd_kernel[(cdiv(n, cfg["BLOCK_M"]),)](
                x, r, labels, *stats, coef, u, n, d, x.stride(0), u.stride(0), *params,
                USE_MINER=eps is not None, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
        return u
    dot_dtype, precision = dot_config(x.dtype, x.device)
    cfg = dict(grad_tile_config(d, x.dtype), USE_MINER=eps is not None, DOT_DTYPE=dot_dtype,
               PRECISION=precision)

    def chunk_args(w, r0, r1, c0, c1):
        return (x, r, labels, *stats, coef, w, r0, r1, c0, c1, d, x.stride(0), w.stride(0), *params)

    u, _ = launch_grad_chunks(_ms_grad_tile_kernel, cfg, chunk_args, x, None, dtype=x.dtype, need_da=True,
                              need_db=False)
    return u


# --------------------------------------------------------------------------------------------------------
# PyTorch fallback (same math on ~4 MiB [rows, N] tiles, fp32 or fp64)
# --------------------------------------------------------------------------------------------------------
def _mined(s, pos, neg, min_pos, max_neg, eps: float | None):
    """Kept (positive, negative) masks of one tile under the MS miner (all pairs when eps is None)."""
    if eps is None:
        return pos, neg
    return pos & (s - eps < max_neg), neg & (s + eps > min_pos)


def _torch_forward(q, lq, alpha: float, beta: float, base: float, eps: float | None):
    """Row statistics (lse_pos, lse_neg, min_pos, max_neg, mined_pos, mined_neg) for unit rows q."""
    cd, n = q.dtype, q.shape[0]
    lse_pos, lse_neg = (torch.zeros(n, dtype=cd, device=q.device) for _ in range(2))
    min_pos = torch.full((n,), float("inf"), dtype=cd, device=q.device)
    max_neg = torch.full((n,), float("-inf"), dtype=cd, device=q.device)
    mined_pos, mined_neg = (torch.zeros(n, dtype=torch.int64, device=q.device) for _ in range(2))
    for r0, r1, s, pos, neg, _ in pair_tiles(q, q, lq, lq, True):
        if eps is not None:
            min_pos[r0:r1] = torch.where(pos, s, float("inf")).amin(1)
            max_neg[r0:r1] = torch.where(neg, s, float("-inf")).amax(1)
        mp, mn = _mined(s, pos, neg, min_pos[r0:r1, None], max_neg[r0:r1, None], eps)
        zero = torch.zeros(r1 - r0, dtype=cd, device=q.device)
        shifted = s - base
        lse_pos[r0:r1] = torch.logaddexp(torch.logsumexp(torch.where(mp, shifted * -alpha, float("-inf")), 1), zero)
        lse_neg[r0:r1] = torch.logaddexp(torch.logsumexp(torch.where(mn, shifted * beta, float("-inf")), 1), zero)
        mined_pos[r0:r1], mined_neg[r0:r1] = mp.sum(1), mn.sum(1)
    return lse_pos, lse_neg, min_pos, max_neg, mined_pos, mined_neg


def _torch_grad(s, pos, neg, lse_pos, lse_neg, min_pos, max_neg, alpha, beta, base, eps):
    """The fallback's ``_ms_grad``."""
    mp, mn = _mined(s, pos, neg, min_pos, max_neg, eps)
    shifted = s - base
    gp = torch.where(mp, shifted * -alpha - lse_pos, float("-inf")).exp_()
    gn = torch.where(mn, shifted * beta - lse_neg, float("-inf")).exp_()
    return gn.sub_(gp)


def _torch_backward(q, lq, stats, coef, alpha, beta, base, eps):
    """dLoss/dq for unit rows q: one symmetrized tile and one product per row block."""
    lse_pos, lse_neg, min_pos, max_neg = stats

    def grad_tile(r0, r1, s, pos, neg, diag):
        g = _torch_grad(s, pos, neg, lse_pos[r0:r1, None], lse_neg[r0:r1, None], min_pos[r0:r1, None],
                        max_neg[r0:r1, None], alpha, beta, base, eps)
        g.add_(_torch_grad(s, pos, neg, lse_pos[None, :], lse_neg[None, :], min_pos[None, :], max_neg[None, :],
                           alpha, beta, base, eps))
        return g.mul_(coef)

    dq, _ = tiled_pair_products(q, None, lq, lq, grad_tile, exclude_diagonal=True, need_dq=True, need_dk=False)
    return dq


# --------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------
def ms_from_stats(stats, alpha: float, beta: float):
    """(loss, scale) from the row statistics, without a host sync: d loss / d loss_i = scale (0-dim) for
    every row, ``[batch active] / N``."""
    lse_pos, lse_neg, _, _, mined_pos, mined_neg = stats
    row_loss = lse_pos / alpha + lse_neg / beta
    active = (mined_pos.sum() > 1) | (mined_neg.sum() > 1)
    scale = active.to(row_loss.dtype) / max(1, row_loss.numel())
    return row_loss.sum() * scale, scale


class _MultiSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, alpha: float, beta: float, base: float, eps: float | None, impl: str):
        """x: the rows as :func:`~saga_kernels.metric_common.kernel_operand` gives them."""
        r = inverse_norms(x)
        if impl == "triton":
            labels = label_ids(labels)[0]  # int32 ids, no host sync
            stats = _triton_forward(x, r, labels, alpha, beta, base, eps)
        else:
            labels = labels.contiguous()
            stats = _torch_forward(x.to(r.dtype) * r[:, None], labels, alpha, beta, base, eps)
        loss, scale = ms_from_stats(stats, alpha, beta)
        ctx.save_for_backward(x, r, labels, *stats[:4], scale)
        ctx.params, ctx.impl, ctx.x_dtype = (alpha, beta, base, eps), impl, x.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        xs, r, labels, lse_pos, lse_neg, min_pos, max_neg, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        alpha, beta, base, eps = ctx.params
        coef = scale * grad  # dLoss/ds_ij = coef * G_ij (see _ms_grad)
        if ctx.impl == "triton":
            stats = tuple(t.float().contiguous() for t in (lse_pos, lse_neg, min_pos, max_neg))
            u = _triton_backward(xs, r, labels, stats, coef.float().reshape(1), alpha, beta, base, eps)
        else:
            q = xs.to(r.dtype) * r[:, None]
            u = _torch_backward(q, labels, (lse_pos, lse_neg, min_pos, max_neg), coef, alpha, beta, base, eps)
            u = u * r[:, None]
        return normalize_backward(xs, r, u).to(ctx.x_dtype), None, None, None, None, None, None


def _check_inputs(embeddings, labels, alpha, beta, base, miner_epsilon) -> None:
    """Every argument of :func:`multi_similarity_loss`, errors naming it."""
    check_embeddings_labels(embeddings, labels)
    check_positive("alpha", alpha)
    check_positive("beta", beta)
    check_real("base", base)
    if miner_epsilon is not None:
        check_real("miner_epsilon", miner_epsilon)


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    miner_epsilon: float | None = 0.1,
    impl: str | None = None,
) -> torch.Tensor:
    """Multi-Similarity loss of ``embeddings [N, D]`` with integer ``labels [N]`` (see module doc).

    ``miner_epsilon`` is the MultiSimilarityMiner margin (``None``: no mining, all pairs). Gradients
    flow to ``embeddings``. Returns a scalar of ``embeddings.dtype``; an empty batch (N = 0) gives 0 and
    zero gradients.
    """
    _check_inputs(embeddings, labels, alpha, beta, base, miner_epsilon)
    which = resolve_impl(impl, embeddings)
    eps = None if miner_epsilon is None else float(miner_epsilon)
    x = kernel_operand(embeddings, which)
    loss = _MultiSimilarity.apply(x, labels, float(alpha), float(beta), float(base), eps, which)
    return loss.to(embeddings.dtype)
