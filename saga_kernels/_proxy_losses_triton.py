"""Triton kernels of Proxy Anchor and Potential Field (see ``proxy_anchor.py``, ``potential_field.py``).

Every pass recomputes its similarity tiles from the unit-norm rows (a K-loop of ``tl.dot``) and keeps only
per-row accumulators, so nothing of size ``rows x cols`` ever reaches memory. Gradients are written by
the program that owns the output row (a second pass with the other operand as rows), never by atomics.
This module imports Triton at import time; ``proxy_anchor.py`` / ``potential_field.py`` import it lazily,
only when the Triton path runs, so ``import saga_kernels`` works without Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One fixed config (the interpreter cannot autotune): every tl.dot dimension is >= 16 and a power of two.
BLOCK_ROWS = 64
BLOCK_COLS = 64
NUM_WARPS = 4
# Small row counts (few proxies) would leave a GPU idle, so the column sweep is split across programs
# until about this many run; the host combines the partial results.
TARGET_PROGRAMS = 512


def _block_k(d: int) -> int:
    """Width of one K-chunk of the Gram tile."""
    return min(64, max(16, triton.next_power_of_2(d)))


def _block_out(d: int) -> int:
    """Width of the slice of the D output columns that one backward program accumulates."""
    return min(128, max(16, triton.next_power_of_2(d)))


def _column_splits(row_programs: int, n_cols: int, cap: int | None = None) -> tuple[int, int]:
    """(number of column splits, columns per split: a multiple of BLOCK_COLS) for a sweep over n_cols."""
    col_tiles = triton.cdiv(n_cols, BLOCK_COLS)
    splits = max(1, min(col_tiles, TARGET_PROGRAMS // max(row_programs, 1), cap if cap is not None else col_tiles))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split * BLOCK_COLS


@triton.jit
def _gram_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_R, BLOCK_C] = x[rows] @ y[cols].T for contiguous [*, D] x and y, fp32 accumulation."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        a = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(y_ptr + cols[None, :] * D + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _load_rows(x_ptr, rows, row_ok, outs, out_ok, D):
    """x[rows][:, outs] upcast to fp32 (zeros outside the masks)."""
    v = tl.load(x_ptr + rows[:, None] * D + outs[None, :], mask=row_ok[:, None] & out_ok[None, :], other=0.0)
    return v.to(tl.float32)


@triton.jit
def _lse_update(m, s, z):
    """Online log-sum-exp: fold the rows of tile z (entries -inf where masked) into (max m, sum exp(. - m))."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s


# ------------------------------------------------------------------------------------------------
# Proxy Anchor
# ------------------------------------------------------------------------------------------------
@triton.jit
def _pa_grad_tile(cos, is_pos, is_neg, lse_pos, lse_neg, coef_pos, coef_neg, alpha, margin):
    """dL/dcos: coef_pos * exp(-alpha (cos - m) - lse_pos) on positives, coef_neg * exp(alpha (cos + m) - lse_neg)
    on negatives (lse_* already broadcast to the tile)."""
    g_pos = coef_pos * tl.exp(-alpha * (cos - margin) - lse_pos)
    g_neg = coef_neg * tl.exp(alpha * (cos + margin) - lse_neg)
    return tl.where(is_pos, g_pos, 0.0) + tl.where(is_neg, g_neg, 0.0)


@triton.jit
def _pa_fwd_kernel(p_ptr, e_ptr, lab_ptr, stats_ptr, C, N, D, cols_per_split, alpha, margin,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows = proxies c, one column split per program_id(1). Over the split's embeddings i it writes the
    online log-sum-exp state (max, sum exp(. - max)) of z = -alpha (cos_ic - m) over y_i = c and of
    z = alpha (cos_ic + m) over y_i != c to stats[0..3, split, c], split 0 adding the "1 +" term; the host
    combines the splits."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < C
    split = tl.program_id(1).to(tl.int64)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    # The "1 +" is a term exp(0): accumulators start at max 0 and sum 1 (split 0) or 0 (other splits).
    one = tl.where(split == 0, 1.0, 0.0)
    m_pos = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_pos = tl.zeros((BLOCK_R,), dtype=tl.float32) + one
    m_neg = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_neg = tl.zeros((BLOCK_R,), dtype=tl.float32) + one
    for n0 in range(start, end, BLOCK_C):
        cols = n0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < N
        cos = _gram_tile(p_ptr, e_ptr, rows, cols, row_ok, col_ok, D, BLOCK_R, BLOCK_C, BLOCK_K)
        lab = tl.load(lab_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
        same = lab[None, :] == rows[:, None]
        is_pos = same & col_ok[None, :]
        is_neg = (lab[None, :] != rows[:, None]) & col_ok[None, :]
        m_pos, s_pos = _lse_update(m_pos, s_pos, tl.where(is_pos, -alpha * (cos - margin), float("-inf")))
        m_neg, s_neg = _lse_update(m_neg, s_neg, tl.where(is_neg, alpha * (cos + margin), float("-inf")))
    plane = tl.num_programs(1).to(tl.int64) * C
    out = stats_ptr + split * C + rows
    tl.store(out, m_pos, mask=row_ok)
    tl.store(out + plane, s_pos, mask=row_ok)
    tl.store(out + 2 * plane, m_neg, mask=row_ok)
    tl.store(out + 3 * plane, s_neg, mask=row_ok)


@triton.jit
def _pa_bwd_emb_kernel(e_ptr, p_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, grad_ptr, N, C, D,
                       alpha, margin,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_O: tl.constexpr):
    """Rows = embeddings i, output columns outs: grad[i, outs] = sum_c G[i, c] p[c, outs]."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    coef_pos = tl.load(coef_ptr)
    coef_neg = tl.load(coef_ptr + 1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    outs = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < D
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        cos = _gram_tile(e_ptr, p_ptr, rows, cols, row_ok, col_ok, D, BLOCK_R, BLOCK_C, BLOCK_K)
        lse_pos = tl.load(lse_pos_ptr + cols, mask=col_ok, other=0.0)
        lse_neg = tl.load(lse_neg_ptr + cols, mask=col_ok, other=0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        is_pos = (lab[:, None] == cols[None, :]) & ok
        is_neg = (lab[:, None] != cols[None, :]) & ok
        g = _pa_grad_tile(cos, is_pos, is_neg, lse_pos[None, :], lse_neg[None, :], coef_pos, coef_neg, alpha, margin)
        acc = tl.dot(g, _load_rows(p_ptr, cols, col_ok, outs, out_ok, D), acc, input_precision="ieee")
    tl.store(grad_ptr + rows[:, None] * D + outs[None, :], acc, mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def _pa_bwd_proxy_kernel(p_ptr, e_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, grad_ptr, C, N, D,
                         cols_per_split, alpha, margin,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_O: tl.constexpr):
    """Rows = proxies c, output columns outs, embeddings of split program_id(2):
    grad[split, c, outs] = sum_{i in split} G[i, c] e[i, outs] (the host sums the splits)."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    coef_pos = tl.load(coef_ptr)
    coef_neg = tl.load(coef_ptr + 1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < C
    outs = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < D
    split = tl.program_id(2).to(tl.int64)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
    lse_neg = tl.load(lse_neg_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_C):
        cols = n0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < N
        cos = _gram_tile(p_ptr, e_ptr, rows, cols, row_ok, col_ok, D, BLOCK_R, BLOCK_C, BLOCK_K)
        lab = tl.load(lab_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        is_pos = (lab[None, :] == rows[:, None]) & ok
        is_neg = (lab[None, :] != rows[:, None]) & ok
        g = _pa_grad_tile(cos, is_pos, is_neg, lse_pos[:, None], lse_neg[:, None], coef_pos, coef_neg, alpha, margin)
        acc = tl.dot(g, _load_rows(e_ptr, cols, col_ok, outs, out_ok, D), acc, input_precision="ieee")
    grad_ptr += split * C * D
    tl.store(grad_ptr + rows[:, None] * D + outs[None, :], acc, mask=row_ok[:, None] & out_ok[None, :])


def pa_forward(e: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, alpha: float, margin: float):
    """(lse_pos [C], lse_neg [C]) in fp32 for unit rows e [N, D], p [C, D] and int labels [N] in [0, C)."""
    (n, d), c = e.shape, p.shape[0]
    row_programs = triton.cdiv(c, BLOCK_ROWS)
    splits, cols_per_split = _column_splits(row_programs, n)
    stats = torch.empty((4, splits, c), device=e.device, dtype=torch.float32)
    _pa_fwd_kernel[(row_programs, splits)](
        p, e, labels, stats, c, n, d, cols_per_split, alpha, margin,
        BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, BLOCK_K=_block_k(d), num_warps=NUM_WARPS)
    lse_pos = torch.logsumexp(stats[0] + torch.log(stats[1]), dim=0)
    lse_neg = torch.logsumexp(stats[2] + torch.log(stats[3]), dim=0)
    return lse_pos, lse_neg


def pa_backward(e, p, labels, lse_pos, lse_neg, coefs, alpha: float, margin: float, need_e=True, need_p=True):
    """(dL/de, dL/dp) in fp32 (None where not needed) with dL/dcos = G from ``_pa_grad_tile``; coefs = fp32
    [coef_pos, coef_neg]. dL/de: one pass with embeddings as rows; dL/dp: one with proxies as rows (column
    splits summed here)."""
    (n, d), c = e.shape, p.shape[0]
    bo = _block_out(d)
    # Proxy rows split the embedding sweep only while the partial gradients stay within N x D floats.
    proxy_programs = triton.cdiv(c, BLOCK_ROWS) * triton.cdiv(d, bo)
    splits, cols_per_split = _column_splits(proxy_programs, n, cap=max(1, n // c))
    grad_e = grad_p = None
    if need_e:
        grad_e = torch.empty((n, d), device=e.device, dtype=torch.float32)
        _pa_bwd_emb_kernel[(triton.cdiv(n, BLOCK_ROWS), triton.cdiv(d, bo))](
            e, p, labels, lse_pos, lse_neg, coefs, grad_e, n, c, d, alpha, margin,
            BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, BLOCK_K=_block_k(d), BLOCK_O=bo, num_warps=NUM_WARPS)
    if need_p:
        grad_p = torch.empty((splits, c, d), device=e.device, dtype=torch.float32)
        _pa_bwd_proxy_kernel[(triton.cdiv(c, BLOCK_ROWS), triton.cdiv(d, bo), splits)](
            p, e, labels, lse_pos, lse_neg, coefs, grad_p, c, n, d, cols_per_split, alpha, margin,
            BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, BLOCK_K=_block_k(d), BLOCK_O=bo, num_warps=NUM_WARPS)
        grad_p = grad_p.sum(dim=0) if splits > 1 else grad_p[0]
    return grad_e, grad_p


# ------------------------------------------------------------------------------------------------
# Potential Field
# ------------------------------------------------------------------------------------------------
@triton.jit
def _pf_distance(cos, min_dist):
    """Euclidean distance of unit rows, sqrt(max(2 - 2 cos, min_dist^2)), and the unclamped 2 - 2 cos."""
    d2 = 2.0 - 2.0 * cos
    return tl.sqrt(tl.maximum(d2, min_dist * min_dist)), d2


@triton.jit
def _pf_fwd_kernel(x_ptr, lab_ptr, rowsum_ptr, n, D, cols_per_split, alpha, delta, min_dist,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """rowsum[split, a] = sum_{s != a, s in split} psi(d(a, s)): psi = -max(d, delta)^-alpha (same label),
    min(d, delta)^-alpha (else); the host sums the splits."""
    alpha = tl.cast(alpha, tl.float32)
    delta = tl.cast(delta, tl.float32)
    min_dist = tl.cast(min_dist, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    split = tl.program_id(1).to(tl.int64)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, n)
    lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(start, end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < n
        cos = _gram_tile(x_ptr, x_ptr, rows, cols, row_ok, col_ok, D, BLOCK_R, BLOCK_C, BLOCK_K)
        d, _ = _pf_distance(cos, min_dist)
        lab_c = tl.load(lab_ptr + cols, mask=col_ok, other=-1)
        same = lab_r[:, None] == lab_c[None, :]
        attract = -tl.exp(-alpha * tl.log(tl.maximum(d, delta)))
        repel = tl.exp(-alpha * tl.log(tl.minimum(d, delta)))
        keep = col_ok[None, :] & (rows[:, None] != cols[None, :])
        acc += tl.sum(tl.where(keep, tl.where(same, attract, repel), 0.0), axis=1)
    tl.store(rowsum_ptr + split * n + rows, acc, mask=row_ok)


@triton.jit
def _pf_bwd_kernel(x_ptr, lab_ptr, coef_ptr, grad_ptr, n, D, alpha, delta, min_dist,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
    """grad[a, outs] = sum_{s != a} W[a, s] x[s, outs], W = -coef psi'(d) / d (d = sqrt(2 - 2 x_a.x_s), so
    dd/dx_a = -x_s / d; the radial part this drops is removed by the normalization's backward)."""
    alpha = tl.cast(alpha, tl.float32)
    delta = tl.cast(delta, tl.float32)
    min_dist = tl.cast(min_dist, tl.float32)
    coef = tl.load(coef_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    outs = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < D
    lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < n
        cos = _gram_tile(x_ptr, x_ptr, rows, cols, row_ok, col_ok, D, BLOCK_R, BLOCK_C, BLOCK_K)
        d, d2 = _pf_distance(cos, min_dist)
        lab_c = tl.load(lab_ptr + cols, mask=col_ok, other=-1)
        same = lab_r[:, None] == lab_c[None, :]
        # |psi'(d)| / d = alpha d^-(alpha + 2) where the clamps let d through, 0 where they hold it.
        slope = alpha * tl.exp(-(alpha + 2.0) * tl.log(d))
        attract = tl.where(d > delta, slope, 0.0)
        repel = tl.where((d < delta) & (d2 > min_dist * min_dist), -slope, 0.0)
        keep = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        w = tl.where(keep, -coef * tl.where(same, attract, repel), 0.0)
        acc = tl.dot(w, _load_rows(x_ptr, cols, col_ok, outs, out_ok, D), acc, input_precision="ieee")
    tl.store(grad_ptr + rows[:, None] * D + outs[None, :], acc, mask=row_ok[:, None] & out_ok[None, :])


def pf_forward(x: torch.Tensor, labels: torch.Tensor, alpha: float, delta: float, min_dist: float) -> torch.Tensor:
    """Per-row energy sums [n] (fp32) for unit rows x [n, D] and int labels [n]."""
    n, d = x.shape
    row_programs = triton.cdiv(n, BLOCK_ROWS)
    splits, cols_per_split = _column_splits(row_programs, n)
    rowsum = torch.empty((splits, n), device=x.device, dtype=torch.float32)
    _pf_fwd_kernel[(row_programs, splits)](
        x, labels, rowsum, n, d, cols_per_split, alpha, delta, min_dist,
        BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, BLOCK_K=_block_k(d), num_warps=NUM_WARPS)
    return rowsum.sum(dim=0)


def pf_backward(x, labels, coef: torch.Tensor, alpha: float, delta: float, min_dist: float) -> torch.Tensor:
    """dL/dx [n, D] (fp32) for L = coef * sum_a rowsum[a] / 2 (coef: fp32 [1], the upstream gradient folded in)."""
    n, d = x.shape
    grad = torch.empty((n, d), device=x.device, dtype=torch.float32)
    bo = _block_out(d)
    _pf_bwd_kernel[(triton.cdiv(n, BLOCK_ROWS), triton.cdiv(d, bo))](
        x, labels, coef, grad, n, d, alpha, delta, min_dist,
        BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, BLOCK_K=_block_k(d), BLOCK_O=bo, num_warps=NUM_WARPS)
    return grad
