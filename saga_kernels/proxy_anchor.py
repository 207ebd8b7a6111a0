"""Proxy Anchor loss (Kim et al., CVPR 2020) on tensor cores, streamed over (proxy x embedding) tiles.

Notation: raw embeddings ``x`` [N, D] with integer labels ``y`` [N] in [0, C), raw proxies ``w`` [C, D] (any
float dtypes), inverse row norms ``r_i = 1 / max(||x_i||, eps)`` and ``q_c = 1 / max(||w_c||, eps)``
(:func:`~saga_kernels.metric_common.inverse_norms`, fp32), cosines ``s_ic = (x_i . w_c) r_i q_c`` and P the set
of classes present in the batch. pytorch-metric-learning 2.9's ``ProxyAnchorLoss`` (cosine distance, default
reducer) is

    lse_pos[c] = log(1 + sum_{i: y_i = c}  exp(-alpha (s_ic - margin)))
    lse_neg[c] = log(1 + sum_{i: y_i != c} exp( alpha (s_ic + margin)))
    L = 1/|P| sum_c lse_pos[c] + 1/C sum_c lse_neg[c]

(an empty inner sum is log 1 = 0; N = 0 gives L = 0 with zero gradients for both inputs). Backward, with the
upstream gradient g:

    G_ic = dL/ds_ic = -alpha g/|P| exp(-alpha (s_ic - margin) - lse_pos[c])   if y_i = c
                      +alpha g/C   exp( alpha (s_ic + margin) - lse_neg[c])   otherwise
    u_i = r_i dL/dxhat_i = sum_c (G_ic r_i q_c) w_c,      v_c = q_c dL/dwhat_c = sum_i (G_ic r_i q_c) x_i
    dL/dx_i = u_i - r_i^2 <x_i, u_i> x_i,                 dL/dw_c = v_c - q_c^2 <w_c, v_c> w_c

(:func:`~saga_kernels.metric_common.normalize_backward`). Both exponents are <= 0 (each term is part of its
log-sum-exp), so G never overflows.

Kernels. Raw rows in their own dtype go to ``tl.dot`` (bf16/fp16 on the tensor cores; fp32 as tf32x3 / tf32
following ``torch.get_float32_matmul_precision()``, see :func:`saga_kernels._tl_utils.dot_config`); nothing
of size N x C is stored except one bounded chunk in the large-D backward; fp64 inputs run in fp32 there.
Similarity-sized matmuls (N x C x D products) per call:

* ``_pa_fwd_kernel``: rows = a block of proxies, columns = a split of the embeddings; an online
  log-sum-exp per proxy and sign (:func:`~saga_kernels._tl_utils.lse_update`), the splits merged by torch ops
  (few proxies still fill the GPU). 1 matmul.
* ``_pa_bwd_emb_kernel`` / ``_pa_bwd_proxy_kernel`` (D <= ``_MAX_FUSED_D`` = 512 for bf16/fp16, half that
  for fp32: :func:`fused_backward`): rows = embeddings (u) or proxies (v), columns split when rows are few;
  each recomputes the cosine tile once and accumulates ``(G r q) @ other`` into a [BLOCK_M, next_pow2(D)]
  fp32 accumulator held by one program. 2 + 2 = 4 (2 when one input is frozen).
* ``_pa_grad_tile_kernel`` (larger D): writes ``G r q`` for a chunk of embedding rows (at most
  ``_GRAD_CHUNK_BYTES``; bf16/fp16 for half inputs on a GPU, else fp32) once; cuBLAS forms ``u`` and ``v``
  from it. 1 + 2 = 3.

The torch fallback computes the same math in fp32 (fp64 for fp64 inputs) on [chunk_rows(C), C] tiles.
Labels are compared with the proxy index as int64 values, as given: no remapping, no host sync.
"""
from __future__ import annotations

import math

import torch

from ._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from ._dispatch import resolve_impl
from ._tl_utils import cdiv, dot_config, lse_update, next_pow2, on_device, tile_dot
from ._triton import tl, triton
from .metric_common import (
    FALLBACK_TILE_ELEMS,
    INT_DTYPES,
    check_embeddings_labels,
    check_label_range,
    check_positive,
    compute_dtype,
    inverse_norms,
    normalize_backward,
)

_MAX_FUSED_D = 512  # largest D whose backward keeps the [BLOCK_M, next_pow2(D)] accumulator in one program
_GRAD_CHUNK_BYTES = 64 * 2**20  # large-D backward: the gradient tile written per chunk, at most this big
_TARGET_PROGRAMS = 528  # column splits until about this many programs run (4 per SM of an H100 SXM)
_PARTIAL_BYTES = 256 * 2**20  # fused backward: fp32 partial sums over column splits stay under this


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _pa_cosines(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 cosine tile ``(a_i . b_j) ra_i rb_j`` of raw rows; masked rows/columns give 0."""
    dots = tile_dot(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                    BLOCK_R, BLOCK_C, BLOCK_K, DOT_DTYPE, PRECISION)
    return dots * (ra[:, None] * rb[None, :])


@triton.jit
def _pa_grad(cos, is_pos, ok, lse_pos, lse_neg, coef_pos, coef_neg, alpha, margin):
    """G = dL/dcos of a tile (lse_* broadcast to it): one exp per entry, 0 where ``ok`` is False (the
    exponent is set to -inf there BEFORE the exp, so junk never reaches the arithmetic)."""
    z = tl.where(is_pos, -alpha * (cos - margin) - lse_pos, alpha * (cos + margin) - lse_neg)
    z = tl.where(ok, z, float("-inf"))
    return tl.where(is_pos, coef_pos, coef_neg) * tl.exp(z)


@triton.jit
def _pa_fwd_kernel(w_ptr, x_ptr, rw_ptr, rx_ptr, lab_ptr, stats_ptr,
                   C, N, D, stride_w, stride_x, cols_per_split, alpha, margin,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Rows = proxies c, embeddings of split program_id(1) as columns. Writes the online log-sum-exp state
    (max, sum exp(. - max)) of z = -alpha (s_ic - m) over y_i = c and of z = alpha (s_ic + m) over y_i != c
    to stats[0..3, split, c] (max -inf, sum 0 when the split holds none); the host merges the splits and
    adds the "1 +" term."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < C
    split = tl.program_id(1).to(tl.int64)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)
    m_pos = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s_pos = tl.zeros((BLOCK_R,), tl.float32)
    m_neg = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s_neg = tl.zeros((BLOCK_R,), tl.float32)
    for n0 in range(start, end, BLOCK_C):
        cols = n0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < end
        rx = tl.load(rx_ptr + cols, mask=col_ok, other=0.0)
        cos = _pa_cosines(w_ptr, x_ptr, rw, rx, rows, cols, row_ok, col_ok, D, stride_w, stride_x,
                          BLOCK_R, BLOCK_C, BLOCK_K, DOT_DTYPE, PRECISION)
        lab = tl.load(lab_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        is_pos = lab[None, :] == rows[:, None]
        m_pos, s_pos = lse_update(m_pos, s_pos, tl.where(ok & is_pos, -alpha * (cos - margin), float("-inf")))
        m_neg, s_neg = lse_update(m_neg, s_neg, tl.where(ok & ~is_pos, alpha * (cos + margin), float("-inf")))
    plane = tl.num_programs(1).to(tl.int64) * C
    out = stats_ptr + split * C + rows
    tl.store(out, m_pos, mask=row_ok)
    tl.store(out + plane, s_pos, mask=row_ok)
    tl.store(out + 2 * plane, m_neg, mask=row_ok)
    tl.store(out + 3 * plane, s_neg, mask=row_ok)


@triton.jit
def _pa_bwd_emb_kernel(x_ptr, w_ptr, rx_ptr, rw_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, u_ptr,
                       N, C, D, stride_x, stride_w, cols_per_split, alpha, margin,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Rows = embeddings i, proxies of split program_id(1) as columns:
    u[split, i, :] = sum_c (G_ic r_i q_c) w_c (fp32 [splits, N, D]; the host sums the splits)."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    coef_pos = tl.load(coef_ptr)
    coef_neg = tl.load(coef_ptr + 1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    split = tl.program_id(1).to(tl.int64)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, C)
    rx = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < end
        rw = tl.load(rw_ptr + cols, mask=col_ok, other=0.0)
        cos = _pa_cosines(x_ptr, w_ptr, rx, rw, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
                          BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        lse_pos = tl.load(lse_pos_ptr + cols, mask=col_ok, other=0.0)
        lse_neg = tl.load(lse_neg_ptr + cols, mask=col_ok, other=0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        g = _pa_grad(cos, lab[:, None] == cols[None, :], ok, lse_pos[None, :], lse_neg[None, :],
                     coef_pos, coef_neg, alpha, margin)
        g = g * (rx[:, None] * rw[None, :])
        wt = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(g.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out = u_ptr + split * N * D + rows[:, None] * D + dd[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _pa_bwd_proxy_kernel(w_ptr, x_ptr, rw_ptr, rx_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, v_ptr,
                         C, N, D, stride_w, stride_x, cols_per_split, alpha, margin,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Rows = proxies c, embeddings of split program_id(1) as columns:
    v[split, c, :] = sum_i (G_ic r_i q_c) x_i (fp32 [splits, C, D]; the host sums the splits)."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    coef_pos = tl.load(coef_ptr)
    coef_neg = tl.load(coef_ptr + 1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C
    split = tl.program_id(1).to(tl.int64)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)
    lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
    lse_neg = tl.load(lse_neg_ptr + rows, mask=row_ok, other=0.0)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < end
        rx = tl.load(rx_ptr + cols, mask=col_ok, other=0.0)
        cos = _pa_cosines(w_ptr, x_ptr, rw, rx, rows, cols, row_ok, col_ok, D, stride_w, stride_x,
                          BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        lab = tl.load(lab_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        g = _pa_grad(cos, lab[None, :] == rows[:, None], ok, lse_pos[:, None], lse_neg[:, None],
                     coef_pos, coef_neg, alpha, margin)
        g = g * (rw[:, None] * rx[None, :])
        xt = tl.load(x_ptr + cols[:, None] * stride_x + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(g.to(DOT_DTYPE), xt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out = v_ptr + split * C * D + rows[:, None] * D + dd[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _pa_grad_tile_kernel(x_ptr, w_ptr, rx_ptr, rw_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, g_ptr,
                         N, C, D, stride_x, stride_w, stride_g, alpha, margin,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """g[i, c] = G_ic r_i q_c for the N embedding rows given (a chunk) and all C proxies, in g's dtype."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    coef_pos = tl.load(coef_ptr)
    coef_neg = tl.load(coef_ptr + 1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < C
    rx = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
    rw = tl.load(rw_ptr + cols, mask=col_ok, other=0.0)
    cos = _pa_cosines(x_ptr, w_ptr, rx, rw, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse_pos = tl.load(lse_pos_ptr + cols, mask=col_ok, other=0.0)
    lse_neg = tl.load(lse_neg_ptr + cols, mask=col_ok, other=0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    g = _pa_grad(cos, lab[:, None] == cols[None, :], ok, lse_pos[None, :], lse_neg[None, :],
                 coef_pos, coef_neg, alpha, margin)
    g = g * (rx[:, None] * rw[None, :])
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------
# Launch configurations: one function per kernel, used by the launchers and by the sm_90 compile test
# (tests/test_proxy_anchor.py::AOT_SPECS), so the compiled artifact is what runs.
# --------------------------------------------------------------------------------------------------------
def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _block_k(dtype: torch.dtype) -> int:
    """D chunk of every similarity dot (the same in all kernels, so the backward recomputes the forward's
    cosines with the same summation order): 64 half elements or 32 fp32 ones, 128 bytes per row."""
    return 64 if _half(dtype) else 32


def fwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_pa_fwd_kernel``: 128 proxies x 64 embeddings per tile, 8 warps (the fp32 cosine tile and the two
    exponent tiles of the log-sum-exps are 32 registers per thread each; 4 warps or 128 x 128 tiles cost
    50-90 more registers per thread); the operands stream through shared memory in 3 stages."""
    return dict(BLOCK_R=128, BLOCK_C=64, BLOCK_K=_block_k(dtype), num_warps=8, num_stages=3)


def fused_backward(d: int, dtype: torch.dtype) -> bool:
    """Whether the backward accumulates D in one program: D <= _MAX_FUSED_D for half inputs, D <=
    _MAX_FUSED_D / 2 for fp32 (tf32x3 splits the [BLOCK_N, BLOCK_D] product operand into three register
    copies: at D = 512 that and the 128-register accumulator spill 4-8 KB per thread at any BLOCK_N)."""
    return d <= (_MAX_FUSED_D if _half(dtype) else _MAX_FUSED_D // 2)


def bwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_pa_bwd_emb_kernel`` / ``_pa_bwd_proxy_kernel`` (fused): the [BLOCK_M, BLOCK_D] fp32 accumulator
    lives in registers (64 x 512 over 8 warps: 128 per thread), the [BLOCK_N, BLOCK_D] product operand in
    shared memory next to the similarity's two pipelined stages. BLOCK_N = 32 (16 for fp32 beyond D = 128) keeps registers at
    <= 252 with no spills (sm_90 compile, tests); 64 spills at D = 512."""
    block_d = max(16, next_pow2(d))
    block_m = 128 if block_d <= 128 else 64
    block_n = 32 if (_half(dtype) or block_d <= 128) else 16
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(dtype), BLOCK_D=block_d, num_warps=8,
                num_stages=2)


def grad_tile_config(d: int, dtype: torch.dtype) -> dict:
    """``_pa_grad_tile_kernel`` (unfused backward): one 128 x 64 tile per program, 8 warps."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=_block_k(dtype), num_warps=8, num_stages=3)


def column_splits(row_programs: int, n_cols: int, block: int, cap: int | None = None) -> tuple[int, int]:
    """(number of column splits, columns per split: a multiple of ``block``) for a sweep over ``n_cols``
    columns by ``row_programs`` row blocks: split until about _TARGET_PROGRAMS programs run (at most ``cap``
    splits)."""
    tiles = max(1, cdiv(n_cols, block))
    splits = max(1, min(tiles, _TARGET_PROGRAMS // max(row_programs, 1), cap if cap is not None else tiles))
    per_split = cdiv(tiles, splits)
    return cdiv(tiles, per_split), per_split * block


def _launch_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype both operands of a dot are cast to inside the kernels (a no-op when they match)."""
    return x.dtype if x.dtype == w.dtype else torch.promote_types(x.dtype, w.dtype)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _triton_forward(x, w, rx, rw, labels, alpha: float, margin: float):
    """(lse_pos [C], lse_neg [C]) in fp32."""
    (n, d), c = x.shape, w.shape[0]
    dtype = _launch_dtype(x, w)
    dot_dtype, precision = dot_config(dtype, x.device)
    cfg = fwd_config(d, dtype)
    row_programs = cdiv(c, cfg["BLOCK_R"])
    splits, per_split = column_splits(row_programs, n, cfg["BLOCK_C"])
    stats = torch.empty((4, splits, c), device=x.device, dtype=torch.float32)
    with on_device(x):
        _pa_fwd_kernel[(row_programs, splits)](
            w_ptr=w, x_ptr=x, rw_ptr=rw, rx_ptr=rx, lab_ptr=labels, stats_ptr=stats, C=c, N=n, D=d,
            stride_w=w.stride(0), stride_x=x.stride(0), cols_per_split=per_split, alpha=alpha, margin=margin,
            DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
    zero = torch.zeros((), device=x.device, dtype=torch.float32)  # the "1 +" term, log 1
    lse_pos = torch.logaddexp(zero, torch.logsumexp(stats[0] + torch.log(stats[1]), dim=0))
    lse_neg = torch.logaddexp(zero, torch.logsumexp(stats[2] + torch.log(stats[3]), dim=0))
    return lse_pos, lse_neg


def _fused_pass(kernel, a, b, ra, rb, labels, lse_pos, lse_neg, coefs, alpha, margin):
    """One row pass of the fused backward: fp32 [a rows, D] sums over all rows of ``b``."""
    (na, d), nb = a.shape, b.shape[0]
    dtype = _launch_dtype(a, b)
    dot_dtype, precision = dot_config(dtype, a.device)
    cfg = bwd_config(d, dtype)
    row_programs = cdiv(na, cfg["BLOCK_M"])
    cap = max(1, _PARTIAL_BYTES // (4 * na * d))
    splits, per_split = column_splits(row_programs, nb, cfg["BLOCK_N"], cap=cap)
    out = torch.empty((splits, na, d), device=a.device, dtype=torch.float32)
    args = dict(lab_ptr=labels, lse_pos_ptr=lse_pos, lse_neg_ptr=lse_neg, coef_ptr=coefs, D=d,
                cols_per_split=per_split, alpha=alpha, margin=margin, DOT_DTYPE=dot_dtype, PRECISION=precision)
    with on_device(a):
        if kernel is _pa_bwd_emb_kernel:
            kernel[(row_programs, splits)](x_ptr=a, w_ptr=b, rx_ptr=ra, rw_ptr=rb, u_ptr=out, N=na, C=nb,
                                           stride_x=a.stride(0), stride_w=b.stride(0), **args, **cfg)
        else:
            kernel[(row_programs, splits)](w_ptr=a, x_ptr=b, rw_ptr=ra, rx_ptr=rb, v_ptr=out, C=na, N=nb,
                                           stride_w=a.stride(0), stride_x=b.stride(0), **args, **cfg)
    return out[0] if splits == 1 else out.sum(dim=0)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result: half operands on CUDA accumulate in fp32 inside cuBLAS with no upcast
    copy (``out_dtype``); mixed or CPU operands are upcast (one bounded chunk at a time)."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _half(a.dtype):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(out_dtype=)
            return (a @ b).float()
    return a.float() @ b.float()


def _unfused_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w):
    """Large D: (u, v) in fp32 from bounded chunks of ``G r q`` written once; 3 matmuls."""
    (n, d), c = x.shape, w.shape[0]
    dtype = _launch_dtype(x, w)
    dot_dtype, precision = dot_config(dtype, x.device)
    cfg = grad_tile_config(d, dtype)
    buf_dtype = dtype if (x.is_cuda and _half(dtype)) else torch.float32
    elt = torch.finfo(buf_dtype).bits // 8
    rows = max(cfg["BLOCK_M"], _GRAD_CHUNK_BYTES // (elt * c) // cfg["BLOCK_M"] * cfg["BLOCK_M"])
    rows = min(rows, n)
    u = torch.empty((n, d), device=x.device, dtype=torch.float32) if need_x else None
    v = torch.zeros((c, d), device=x.device, dtype=torch.float32) if need_w else None
    buf = torch.empty((rows, c), device=x.device, dtype=buf_dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        g = buf[: r1 - r0]
        with on_device(x):
            _pa_grad_tile_kernel[(cdiv(r1 - r0, cfg["BLOCK_M"]), cdiv(c, cfg["BLOCK_N"]))](
                x_ptr=x[r0:r1], w_ptr=w, rx_ptr=rx[r0:r1], rw_ptr=rw, lab_ptr=labels[r0:r1], lse_pos_ptr=lse_pos,
                lse_neg_ptr=lse_neg, coef_ptr=coefs, g_ptr=g, N=r1 - r0, C=c, D=d, stride_x=x.stride(0),
                stride_w=w.stride(0), stride_g=g.stride(0), alpha=alpha, margin=margin,
                DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
        if need_x:
            u[r0:r1] = _mm_fp32(g, w)
        if need_w:
            v += _mm_fp32(g.T, x[r0:r1])
    return u, v


def _triton_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w):
    """(u, v) in fp32 (None where not needed); see the module docstring."""
    if not fused_backward(x.shape[1], _launch_dtype(x, w)):
        return _unfused_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w)
    common = (labels, lse_pos, lse_neg, coefs, alpha, margin)
    u = _fused_pass(_pa_bwd_emb_kernel, x, w, rx, rw, *common) if need_x else None
    v = _fused_pass(_pa_bwd_proxy_kernel, w, x, rw, rx, *common) if need_w else None
    return u, v


# --------------------------------------------------------------------------------------------------------
# PyTorch fallback: the same math on [chunk_rows(C), C] tiles in fp32 (fp64 for fp64 inputs)
# --------------------------------------------------------------------------------------------------------
def chunk_rows(num_proxies: int) -> int:
    """Embedding rows per fallback chunk: one [rows, C] tile holds about FALLBACK_TILE_ELEMS entries."""
    return max(1, FALLBACK_TILE_ELEMS // num_proxies)


def pa_logits(cos: torch.Tensor, is_pos: torch.Tensor, alpha: float, margin: float):
    """The exponents of the positive and negative sums, -inf outside their masks."""
    neg_inf = torch.tensor(float("-inf"), dtype=cos.dtype, device=cos.device)
    z_pos = torch.where(is_pos, -alpha * (cos - margin), neg_inf)
    z_neg = torch.where(is_pos, neg_inf, alpha * (cos + margin))
    return z_pos, z_neg


def pa_grad_cos(cos, is_pos, lse_pos, lse_neg, coef_pos, coef_neg, alpha: float, margin: float) -> torch.Tensor:
    """dL/dcos for a tile whose columns are proxies (lse_* broadcast over rows); one exp per entry."""
    z = torch.where(is_pos, -alpha * (cos - margin) - lse_pos, alpha * (cos + margin) - lse_neg)
    return torch.where(is_pos, coef_pos, coef_neg) * torch.exp(z)


def _fallback_tiles(x, w, rx, rw, labels):
    """Yield (r0, r1, x rows, cos, is_pos) per chunk of embedding rows, in the compute dtype."""
    cd = rx.dtype
    # Contiguous operands: BLAS results then do not depend on the inputs' row strides (bit for bit).
    wc = w.to(cd).contiguous()
    classes = torch.arange(w.shape[0], device=x.device)
    step = chunk_rows(w.shape[0])
    for r0 in range(0, x.shape[0], step):
        r1 = min(x.shape[0], r0 + step)
        xc = x[r0:r1].to(cd).contiguous()
        cos = (xc @ wc.T) * (rx[r0:r1, None] * rw[None, :])
        yield r0, r1, xc, wc, cos, labels[r0:r1, None] == classes[None, :]


def _torch_forward(x, w, rx, rw, labels, alpha, margin):
    """(lse_pos, lse_neg) [C] folded over row chunks with logaddexp, starting from log 1 (the "1 +")."""
    lse_pos = torch.zeros(w.shape[0], dtype=rx.dtype, device=x.device)
    lse_neg = torch.zeros_like(lse_pos)
    for _, _, _, _, cos, is_pos in _fallback_tiles(x, w, rx, rw, labels):
        z_pos, z_neg = pa_logits(cos, is_pos, alpha, margin)
        lse_pos = torch.logaddexp(lse_pos, torch.logsumexp(z_pos, dim=0))
        lse_neg = torch.logaddexp(lse_neg, torch.logsumexp(z_neg, dim=0))
    return lse_pos, lse_neg


def _torch_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w):
    """(u, v) in the compute dtype (None where not needed), accumulated over row chunks."""
    cd = rx.dtype
    u = torch.empty(x.shape, dtype=cd, device=x.device) if need_x else None
    v = torch.zeros(w.shape, dtype=cd, device=x.device) if need_w else None
    coefs = coefs.to(cd)
    for r0, r1, xc, wc, cos, is_pos in _fallback_tiles(x, w, rx, rw, labels):
        g = pa_grad_cos(cos, is_pos, lse_pos[None, :], lse_neg[None, :], coefs[0], coefs[1], alpha, margin)
        g = g * (rx[r0:r1, None] * rw[None, :])
        if need_x:
            u[r0:r1] = g @ wc
        if need_w:
            v += g.T @ xc
    return u, v


# --------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------
class _ProxyAnchor(torch.autograd.Function):
    """Raw embeddings x [N >= 1, D], raw proxies w [C, D], int labels [N] in [0, C) -> scalar loss."""

    @staticmethod
    def forward(ctx, x, w, labels, alpha, margin, impl):
        c = w.shape[0]
        acc = compute_dtype(torch.promote_types(x.dtype, w.dtype))  # fp32 (fp64 only on the torch path)
        rx, rw = inverse_norms(x).to(acc), inverse_norms(w).to(acc)
        if impl == "triton":
            lse_pos, lse_neg = _triton_forward(x, w, rx, rw, labels, alpha, margin)
        else:
            lse_pos, lse_neg = _torch_forward(x, w, rx, rw, labels, alpha, margin)
        # |P|: classes present, counted on the device (no host sync); >= 1 since N >= 1.
        present = torch.zeros(c, dtype=torch.bool, device=x.device).index_fill_(0, labels.long(), True)
        num_present = present.sum().to(acc)
        ctx.save_for_backward(x, w, rx, rw, labels, lse_pos, lse_neg, num_present)
        ctx.alpha, ctx.margin, ctx.impl = alpha, margin, impl
        loss = lse_pos.sum() / num_present + lse_neg.sum() / c
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, rx, rw, labels, lse_pos, lse_neg, num_present = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if not (need_x or need_w):
            return None, None, None, None, None, None
        g = grad_out.to(rx.dtype)
        coefs = torch.stack([-ctx.alpha * g / num_present, ctx.alpha * g / w.shape[0]]).reshape(2).contiguous()
        run = _triton_backward if ctx.impl == "triton" else _torch_backward
        u, v = run(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, ctx.alpha, ctx.margin, need_x, need_w)
        grad_x = normalize_backward(x, rx, u).to(x.dtype) if need_x else None
        grad_w = normalize_backward(w, rw, v).to(w.dtype) if need_w else None
        return grad_x, grad_w, None, None, None, None


class _EmptyBatch(torch.autograd.Function):
    """N = 0: loss 0 (in the embeddings' dtype) and zero gradients of the right shape for both inputs (under
    DDP an empty rank still contributes a proxy gradient). No kernel runs."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.shapes = (x.shape, x.dtype, w.shape, w.dtype, x.device)
        return torch.zeros((), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_out):
        xs, xd, ws, wd, dev = ctx.shapes
        gx = torch.zeros(xs, dtype=xd, device=dev) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(ws, dtype=wd, device=dev) if ctx.needs_input_grad[1] else None
        return gx, gw


def _kernel_operand(t: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows as the kernels read them: unit stride along D (any row stride); fp64 runs in fp32 on Triton."""
    if impl == "triton" and t.dtype == torch.float64:
        t = t.float()
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def _kernel_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as loaded by the kernels: int32/int64 as they are (unit stride), other int dtypes widened."""
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    return labels if labels.stride(0) == 1 else labels.contiguous()


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    impl: str | None = None,
) -> torch.Tensor:
    """Proxy Anchor loss of ``embeddings`` [N, D] with integer ``labels`` [N] in [0, C) against ``proxies`` [C, D].

    Rows of both are L2-normalized inside; see the module docstring for the formula. Gradients flow to
    ``embeddings`` and ``proxies``. Computation runs in float32 (float64 for float64 inputs on the torch
    path); the loss comes back in ``embeddings.dtype``. N = 0 gives 0 with zero gradients.
    ``impl``: "triton", "torch" or None (auto).
    """
    check_tensor("embeddings", embeddings, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, ndim=1, dtypes=INT_DTYPES)
    if embeddings.shape[0] > 0:
        check_embeddings_labels(embeddings, labels)
    elif labels.shape[0] != 0:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has 0 rows; they must match")
    check_tensor("proxies", proxies, ndim=2, dtypes=FLOAT_DTYPES)
    num_classes = proxies.shape[0]
    if num_classes == 0 or proxies.shape[1] != embeddings.shape[1] or proxies.shape[1] == 0:
        raise ValueError(
            f"proxies must have shape [C >= 1, {embeddings.shape[1]}] (embeddings are {list(embeddings.shape)}), "
            f"got {list(proxies.shape)}"
        )
    check_same_device(embeddings=embeddings, labels=labels, proxies=proxies)
    check_finite("proxies", proxies)
    check_label_range("labels", labels, num_classes)
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin}")
    alpha = check_positive("alpha", alpha)
    which = resolve_impl(impl, embeddings, labels, proxies)
    if embeddings.shape[0] == 0:
        return _EmptyBatch.apply(embeddings, proxies)
    x, w = _kernel_operand(embeddings, which), _kernel_operand(proxies, which)
    loss = _ProxyAnchor.apply(x, w, _kernel_labels(labels), alpha, margin, which)
    return loss.to(embeddings.dtype)
