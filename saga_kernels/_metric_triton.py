"""Triton kernels of the streaming pairwise losses (SupCon/InfoNCE and Multi-Similarity).

Imported lazily by ``supcon.py`` / ``multi_similarity.py`` only when the Triton path runs, so the
library imports on machines without Triton.

Every kernel recomputes cosine tiles ``S[rows, cols] = q[rows] @ k[cols]^T`` (fp32, ``ieee`` dot,
streamed over D in ``BLOCK_K`` chunks) and never stores an N x M matrix:

* forward: one program per ``BLOCK_M`` query rows sweeps all key columns and keeps online row
  statistics (running max + rescaled sum for log-sum-exp, counts, sums, min/max);
* backward, rows: ``dq[i] = sum_j G_ij k_j`` - one program per (row block, D chunk) sweeps columns;
* backward, columns: ``dk[j] = sum_i G_ij q_i`` - one program per (column block, D chunk) sweeps
  rows, so each output row has one writer (no atomics); when k is q the caller adds both.

``G_ij = dLoss / dS_ij`` is rebuilt per tile from the row statistics (``_grad_tile``). Tiles are
indexed the same way in all kernels, so the recomputed S (and any mining decision on it) is
bit-identical between the forward and both backward kernels.
Per tile the kernels read ``(BLOCK_M + BLOCK_N) * D`` inputs and do ``2 * BLOCK_M * BLOCK_N * D`` flops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPCON, MULTI_SIMILARITY = 0, 1  # values of the LOSS constexpr
NEG_BIG = tl.constexpr(-1.0e30)  # finite stand-ins for -inf/+inf in running max/min (inf - inf is NaN)
POS_BIG = tl.constexpr(1.0e30)


@triton.jit
def _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, stride_q, stride_k,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``q[rows] @ k[cols]^T`` of shape [BLOCK_M, BLOCK_N], streamed over D."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dd = d0 + tl.arange(0, BLOCK_K)
        dmask = dd < D
        q = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + cols[:, None] * stride_k + dd[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(q, tl.trans(k), input_precision="ieee")
    return acc


@triton.jit
def _pair_masks(rows, cols, rmask, cmask, lq, lk, SELF: tl.constexpr):
    """(positive, negative, valid) pair masks of a tile; SELF drops the diagonal i == j."""
    valid = rmask[:, None] & cmask[None, :]
    if SELF:
        valid = valid & (rows[:, None] != cols[None, :])
    pos = valid & (lq[:, None] == lk[None, :])
    neg = valid & (lq[:, None] != lk[None, :])
    return pos, neg, valid


@triton.jit
def _ms_mined(s, pos, neg, min_pos, max_neg, eps, USE_MINER: tl.constexpr):
    """MultiSimilarityMiner: positive (i, j) kept iff s - eps < max_neg_i, negative iff s + eps > min_pos_i."""
    if USE_MINER:
        mp = pos & (s - eps < max_neg[:, None])
        mn = neg & (s + eps > min_pos[:, None])
    else:
        mp = pos
        mn = neg
    return mp, mn


@triton.jit
def _supcon_fwd_kernel(q_ptr, k_ptr, lq_ptr, lk_ptr, lse_ptr, pos_sum_ptr, pos_cnt_ptr, neg_cnt_ptr,
                       N, M, D, stride_q, stride_k, inv_temp,
                       SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Per query row i with z_ij = s_ij / T over kept columns j (j != i when SELF):
    lse_i = log sum_j exp(z_ij), pos_sum_i = sum_{j pos} z_ij, pos_cnt_i, neg_cnt_i."""
    inv_t = tl.cast(inv_temp, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    lq = tl.load(lq_ptr + rows, mask=rmask, other=-1)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    neg_cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < M
        lk = tl.load(lk_ptr + cols, mask=cmask, other=-2)
        z = _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, stride_q, stride_k,
                      BLOCK_M, BLOCK_N, BLOCK_K) * inv_t
        pos, neg, valid = _pair_masks(rows, cols, rmask, cmask, lq, lk, SELF)
        z_kept = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_kept, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z_kept - m_new[:, None]), axis=1)
        m_i = m_new
        pos_sum += tl.sum(tl.where(pos, z, 0.0), axis=1)
        pos_cnt += tl.sum(pos.to(tl.float32), axis=1)
        neg_cnt += tl.sum(neg.to(tl.float32), axis=1)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), 0.0)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(pos_sum_ptr + rows, pos_sum, mask=rmask)
    tl.store(pos_cnt_ptr + rows, pos_cnt, mask=rmask)
    tl.store(neg_cnt_ptr + rows, neg_cnt, mask=rmask)


@triton.jit
def _ms_fwd_kernel(q_ptr, lq_ptr, lse_pos_ptr, lse_neg_ptr, min_pos_ptr, max_neg_ptr,
                   mined_pos_ptr, mined_neg_ptr,
                   N, D, stride_q, alpha, beta, base, eps,
                   USE_MINER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Per row i over j != i: (pass 1, miner) min positive / max negative similarity; (pass 2)
    lse_pos_i = log(1 + sum_{mined pos} exp(-alpha (s_ij - base))),
    lse_neg_i = log(1 + sum_{mined neg} exp(beta (s_ij - base))), and the mined pair counts."""
    alpha = tl.cast(alpha, tl.float32)
    beta = tl.cast(beta, tl.float32)
    base = tl.cast(base, tl.float32)
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    lq = tl.load(lq_ptr + rows, mask=rmask, other=-1)
    min_pos = tl.full([BLOCK_M], POS_BIG, tl.float32)
    max_neg = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    if USE_MINER:
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < N
            lk = tl.load(lq_ptr + cols, mask=cmask, other=-2)
            s = _sim_tile(q_ptr, q_ptr, rows, cols, rmask, cmask, D, stride_q, stride_q,
                          BLOCK_M, BLOCK_N, BLOCK_K)
            pos, neg, valid = _pair_masks(rows, cols, rmask, cmask, lq, lk, True)
            min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, s, POS_BIG), axis=1))
            max_neg = tl.maximum(max_neg, tl.max(tl.where(neg, s, NEG_BIG), axis=1))
    # log(1 + sum exp(x)): start the online log-sum-exp from the "+1" term, exp(0).
    m_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_p = tl.full([BLOCK_M], 1.0, tl.float32)
    m_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_n = tl.full([BLOCK_M], 1.0, tl.float32)
    mined_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    mined_neg = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        lk = tl.load(lq_ptr + cols, mask=cmask, other=-2)
        s = _sim_tile(q_ptr, q_ptr, rows, cols, rmask, cmask, D, stride_q, stride_q,
                      BLOCK_M, BLOCK_N, BLOCK_K)
        pos, neg, valid = _pair_masks(rows, cols, rmask, cmask, lq, lk, True)
        mp, mn = _ms_mined(s, pos, neg, min_pos, max_neg, eps, USE_MINER)
        xp = tl.where(mp, -alpha * (s - base), float("-inf"))
        xn = tl.where(mn, beta * (s - base), float("-inf"))
        mp_new = tl.maximum(m_p, tl.max(xp, axis=1))
        l_p = l_p * tl.exp(m_p - mp_new) + tl.sum(tl.exp(xp - mp_new[:, None]), axis=1)
        m_p = mp_new
        mn_new = tl.maximum(m_n, tl.max(xn, axis=1))
        l_n = l_n * tl.exp(m_n - mn_new) + tl.sum(tl.exp(xn - mn_new[:, None]), axis=1)
        m_n = mn_new
        mined_pos += tl.sum(mp.to(tl.float32), axis=1)
        mined_neg += tl.sum(mn.to(tl.float32), axis=1)
    tl.store(lse_pos_ptr + rows, m_p + tl.log(l_p), mask=rmask)
    tl.store(lse_neg_ptr + rows, m_n + tl.log(l_n), mask=rmask)
    tl.store(min_pos_ptr + rows, min_pos, mask=rmask)
    tl.store(max_neg_ptr + rows, max_neg, mask=rmask)
    tl.store(mined_pos_ptr + rows, mined_pos, mask=rmask)
    tl.store(mined_neg_ptr + rows, mined_neg, mask=rmask)


@triton.jit
def _grad_tile(s, pos, neg, valid, st0, st1, st2, st3, coef, p0, p1, p2, p3,
               LOSS: tl.constexpr, USE_MINER: tl.constexpr):
    """G = dLoss/dS on one tile, from row statistics st* and per-row weights coef.

    SupCon (p0 = 1/T; st0 = lse, st1 = 1/P or 0): G = coef * (softmax_ij - [j pos] / P_i).
    MS (p0..p3 = alpha, beta, base, eps; st0/st1 = lse_pos/lse_neg, st2/st3 = min_pos/max_neg):
    G = coef * (-exp(-alpha (s - base) - lse_pos) [mined pos] + exp(beta (s - base) - lse_neg) [mined neg]).
    """
    if LOSS == 0:
        z = s * p0
        soft = tl.exp(tl.where(valid, z - st0[:, None], float("-inf")))
        g = soft - tl.where(pos, st1[:, None], 0.0)
    else:
        mp, mn = _ms_mined(s, pos, neg, st2, st3, p3, USE_MINER)
        gp = tl.exp(tl.where(mp, -p0 * (s - p2) - st0[:, None], float("-inf")))
        gn = tl.exp(tl.where(mn, p1 * (s - p2) - st1[:, None], float("-inf")))
        g = gn - gp
    return coef[:, None] * g


@triton.jit
def _load_row_stats(st0_ptr, st1_ptr, st2_ptr, st3_ptr, coef_ptr, rows, rmask, LOSS: tl.constexpr):
    st0 = tl.load(st0_ptr + rows, mask=rmask, other=0.0)
    st1 = tl.load(st1_ptr + rows, mask=rmask, other=0.0)
    if LOSS == 0:
        st2 = st0
        st3 = st1
    else:
        st2 = tl.load(st2_ptr + rows, mask=rmask, other=POS_BIG)
        st3 = tl.load(st3_ptr + rows, mask=rmask, other=NEG_BIG)
    coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    return st0, st1, st2, st3, coef


@triton.jit
def _bwd_rows_kernel(q_ptr, k_ptr, lq_ptr, lk_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, coef_ptr, dq_ptr,
                     N, M, D, stride_q, stride_k, stride_dq, p0, p1, p2, p3,
                     LOSS: tl.constexpr, SELF: tl.constexpr, USE_MINER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_DO: tl.constexpr):
    """dq[rows, d-chunk] = sum_j G[rows, j] k[j, d-chunk]."""
    p0 = tl.cast(p0, tl.float32)
    p1 = tl.cast(p1, tl.float32)
    p2 = tl.cast(p2, tl.float32)
    p3 = tl.cast(p3, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    do = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    lq = tl.load(lq_ptr + rows, mask=rmask, other=-1)
    st0, st1, st2, st3, coef = _load_row_stats(st0_ptr, st1_ptr, st2_ptr, st3_ptr, coef_ptr, rows, rmask, LOSS)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < M
        lk = tl.load(lk_ptr + cols, mask=cmask, other=-2)
        s = _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, stride_q, stride_k, BLOCK_M, BLOCK_N, BLOCK_K)
        pos, neg, valid = _pair_masks(rows, cols, rmask, cmask, lq, lk, SELF)
        g = _grad_tile(s, pos, neg, valid, st0, st1, st2, st3, coef, p0, p1, p2, p3, LOSS, USE_MINER)
        kd = tl.load(k_ptr + cols[:, None] * stride_k + do[None, :],
                     mask=cmask[:, None] & domask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(g, kd, input_precision="ieee")
    tl.store(dq_ptr + rows[:, None] * stride_dq + do[None, :], acc, mask=rmask[:, None] & domask[None, :])


@triton.jit
def _bwd_cols_kernel(q_ptr, k_ptr, lq_ptr, lk_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, coef_ptr, dk_ptr,
                     N, M, D, stride_q, stride_k, stride_dk, p0, p1, p2, p3,
                     LOSS: tl.constexpr, SELF: tl.constexpr, USE_MINER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_DO: tl.constexpr):
    """dk[cols, d-chunk] = sum_i G[i, cols] q[i, d-chunk] (S recomputed row-major, as in the forward)."""
    p0 = tl.cast(p0, tl.float32)
    p1 = tl.cast(p1, tl.float32)
    p2 = tl.cast(p2, tl.float32)
    p3 = tl.cast(p3, tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < M
    do = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    lk = tl.load(lk_ptr + cols, mask=cmask, other=-2)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < N
        lq = tl.load(lq_ptr + rows, mask=rmask, other=-1)
        st0, st1, st2, st3, coef = _load_row_stats(st0_ptr, st1_ptr, st2_ptr, st3_ptr, coef_ptr, rows, rmask, LOSS)
        s = _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, stride_q, stride_k, BLOCK_M, BLOCK_N, BLOCK_K)
        pos, neg, valid = _pair_masks(rows, cols, rmask, cmask, lq, lk, SELF)
        g = _grad_tile(s, pos, neg, valid, st0, st1, st2, st3, coef, p0, p1, p2, p3, LOSS, USE_MINER)
        qd = tl.load(q_ptr + rows[:, None] * stride_q + do[None, :],
                     mask=rmask[:, None] & domask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(g), qd, input_precision="ieee")
    tl.store(dk_ptr + cols[:, None] * stride_dk + do[None, :], acc, mask=cmask[:, None] & domask[None, :])


# ----------------------------------------------------------------------------------------- launchers

# One fixed configuration (no autotuning; every tl.dot dimension a power of two >= 16). Independent of D,
# so each (LOSS, SELF, USE_MINER, dtype) compiles once; D is streamed and masked.
BLOCK_M = BLOCK_N = 64  # rows / columns per similarity tile
BLOCK_K = 64  # D chunk of the similarity dot
BLOCK_DO = 128  # D chunk of a gradient output tile (one backward program per chunk)


def _rows(n: int, device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=device)


def supcon_forward(q, k, lq, lk, inv_temp: float, exclude_diagonal: bool):
    """Row statistics (lse, pos_sum, pos_cnt, neg_cnt) of SupCon; see ``_supcon_fwd_kernel``."""
    n, d = q.shape
    m = k.shape[0]
    lse, pos_sum, pos_cnt, neg_cnt = (_rows(n, q.device) for _ in range(4))
    _supcon_fwd_kernel[(triton.cdiv(n, BLOCK_M),)](
        q, k, lq, lk, lse, pos_sum, pos_cnt, neg_cnt, n, m, d, q.stride(0), k.stride(0), inv_temp,
        SELF=exclude_diagonal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return lse, pos_sum, pos_cnt, neg_cnt


def ms_forward(q, lq, alpha: float, beta: float, base: float, eps: float, use_miner: bool):
    """Row statistics of Multi-Similarity: (lse_pos, lse_neg, min_pos, max_neg, mined_pos, mined_neg);
    see ``_ms_fwd_kernel``."""
    n, d = q.shape
    out = [_rows(n, q.device) for _ in range(6)]
    _ms_fwd_kernel[(triton.cdiv(n, BLOCK_M),)](
        q, lq, *out, n, d, q.stride(0), alpha, beta, base, eps,
        USE_MINER=use_miner, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return tuple(out)


def pair_backward(q, k, lq, lk, stats, coef, params, *, loss: int, exclude_diagonal: bool, use_miner: bool,
                  need_dq: bool, need_dk: bool):
    """(dq, dk) in fp32 for ``G = dLoss/dS`` rebuilt from ``stats`` (4 row tensors) and ``coef``;
    ``params`` are the 4 scalars ``_grad_tile`` reads. A gradient that is not needed comes back None."""
    n, d = q.shape
    m = k.shape[0]
    # GPU only (the interpreter ignores them): 8 warps share the [64, 128] fp32 accumulator and operands;
    # num_stages=2 bounds the pipelined fp32 dot operands in shared memory.
    meta = dict(LOSS=loss, SELF=exclude_diagonal, USE_MINER=use_miner, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_K=BLOCK_K, BLOCK_DO=BLOCK_DO, num_warps=8, num_stages=2)
    dq = dk = None
    if need_dq:
        dq = torch.empty(n, d, dtype=torch.float32, device=q.device)
        _bwd_rows_kernel[(triton.cdiv(n, BLOCK_M), triton.cdiv(d, BLOCK_DO))](
            q, k, lq, lk, *stats, coef, dq, n, m, d, q.stride(0), k.stride(0), dq.stride(0), *params, **meta)
    if need_dk:
        dk = torch.empty(m, d, dtype=torch.float32, device=q.device)
        _bwd_cols_kernel[(triton.cdiv(m, BLOCK_N), triton.cdiv(d, BLOCK_DO))](
            q, k, lq, lk, *stats, coef, dk, n, m, d, q.stride(0), k.stride(0), dk.stride(0), *params, **meta)
    return dq, dk
