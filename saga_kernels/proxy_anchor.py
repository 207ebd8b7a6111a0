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
* ``_pa_bwd_kernel`` (D <= ``_MAX_FUSED_D`` = 512 for bf16, half that for fp32 and fp16, which runs on fp32
  operands as tf32: ``G r q`` is a dot operand and fp16 cannot hold it, ``_tl_utils.grad_dot_config``):
  rows = embeddings (u) or proxies (v, ``PROXY_ROWS``), columns split when rows are few;
  each recomputes the cosine tile once and accumulates ``(G r q) @ other`` into a [BLOCK_M, next_pow2(D)]
  fp32 accumulator held by one program. 2 + 2 = 4 (2 when one input is frozen).
* ``_pa_grad_tile_kernel`` (larger D): writes ``G r q`` for a chunk of embedding rows and proxies (at most
  ``GRAD_CHUNK_BYTES``; bf16 for bf16 inputs on a GPU, else fp32) once; cuBLAS forms ``u`` and ``v``
  from it (:func:`~saga_kernels.metric_common.launch_grad_chunks`). 1 + 2 = 3.

The torch fallback computes the same math in fp32 (fp64 for fp64 inputs) on [chunk_rows(C), C] tiles.
Labels are compared with the proxy index as int64 values, as given: no remapping, no host sync.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import resolve_impl
from ._tl_utils import (
    block_range,
    cdiv,
    cosine_tile,
    dot_config,
    grad_dot_config,
    grad_dtype,
    load_rows,
    lse_update,
    on_device,
    split_range,
    store_rows,
)
from ._triton import tl, triton
from .metric_common import (
    FALLBACK_TILE_ELEMS,
    block_k,
    check_positive,
    compute_dtype,
    inverse_norms,
    kernel_operand,
    launch_grad_chunks,
    normalize_backward,
)
from .proxy_common import (
    check_label_range,
    check_proxy_inputs,
    column_splits,
    fits_fused_backward,
    fused_backward_config,
    kernel_labels,
    launch_dtype,
    partial_sums_cap,
)

_MAX_FUSED_D = 512  # largest D whose backward keeps the [BLOCK_M, next_pow2(D)] accumulator in one program


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _pa_scalars(alpha, margin, coef_ptr):
    """(alpha, margin, coef_pos, coef_neg) in fp32: the hyper-parameters and the two gradient coefficients."""
    return tl.cast(alpha, tl.float32), tl.cast(margin, tl.float32), tl.load(coef_ptr), tl.load(coef_ptr + 1)


@triton.jit
def _pa_column_tile(a_ptr, b_ptr, ra, rb_ptr, rows, row_ok, c0, end, D, stride_a, stride_b,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(cols, col_ok, rb, cosines) of the column block ``[c0, c0 + BLOCK_N)`` (< end) of b against the rows
    of a; masked rows/columns give 0."""
    cols, col_ok = block_range(c0, end, BLOCK_N)
    rb = tl.load(rb_ptr + cols, mask=col_ok, other=0.0)
    cos = cosine_tile(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    return cols, col_ok, rb, cos


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
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Rows = proxies c, embeddings of split program_id(1) as columns. Writes the online log-sum-exp state
    (max, sum exp(. - max)) of z = -alpha (s_ic - m) over y_i = c and of z = alpha (s_ic + m) over y_i != c
    to stats[0..3, split, c] (max -inf, sum 0 when the split holds none); the host merges the splits and
    adds the "1 +" term."""
    alpha = tl.cast(alpha, tl.float32)
    margin = tl.cast(margin, tl.float32)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, C, BLOCK_M)
    split, start, end = split_range(cols_per_split, N)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)
    m_pos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_pos = tl.zeros((BLOCK_M,), tl.float32)
    m_neg = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_neg = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols, col_ok, _, cos = _pa_column_tile(w_ptr, x_ptr, rw, rx_ptr, rows, row_ok, n0, end, D, stride_w,
                                               stride_x, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
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
def _pa_bwd_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, u_ptr,
                   NA, NB, D, stride_a, stride_b, cols_per_split, alpha, margin,
                   PROXY_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Rows of a, the rows of b in split program_id(1) as columns: u[split, row, :] = sum_col (G r q) b_col
    (fp32 [splits, NA, D]; the host sums the splits). PROXY_ROWS False: a = x (labels ``lab`` per row),
    b = w (lse per column), the embeddings' u_i; True: a = w, b = x, the proxies' v_c."""
    alpha, margin, coef_pos, coef_neg = _pa_scalars(alpha, margin, coef_ptr)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, NA, BLOCK_M)
    split, start, end = split_range(cols_per_split, NB)
    ra = tl.load(ra_ptr + rows, mask=row_ok, other=0.0)
    if PROXY_ROWS:
        lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)[:, None]
        lse_neg = tl.load(lse_neg_ptr + rows, mask=row_ok, other=0.0)[:, None]
    else:
        lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols, col_ok, rb, cos = _pa_column_tile(a_ptr, b_ptr, ra, rb_ptr, rows, row_ok, c0, end, D, stride_a,
                                                stride_b, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        if PROXY_ROWS:
            is_pos = tl.load(lab_ptr + cols, mask=col_ok, other=-1).to(tl.int64)[None, :] == rows[:, None]
        else:
            lse_pos = tl.load(lse_pos_ptr + cols, mask=col_ok, other=0.0)[None, :]
            lse_neg = tl.load(lse_neg_ptr + cols, mask=col_ok, other=0.0)[None, :]
            is_pos = lab[:, None] == cols[None, :]
        g = _pa_grad(cos, is_pos, row_ok[:, None] & col_ok[None, :], lse_pos, lse_neg, coef_pos, coef_neg, alpha,
                     margin)
        g = g * (ra[:, None] * rb[None, :])
        bt = load_rows(b_ptr, cols, col_ok, stride_b, dd, d_ok)
        acc = tl.dot(g.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    store_rows(u_ptr + split * NA * D, rows, row_ok, D, dd, d_ok, acc)


@triton.jit
def _pa_grad_tile_kernel(x_ptr, w_ptr, rx_ptr, rw_ptr, lab_ptr, lse_pos_ptr, lse_neg_ptr, coef_ptr, g_ptr,
                         N, C, D, stride_x, stride_w, stride_g, alpha, margin,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """g[i, c] = G_ic r_i q_c for the N embedding rows and the C proxies given (a chunk; the labels index the
    proxies given), in g's dtype."""
    alpha, margin, coef_pos, coef_neg = _pa_scalars(alpha, margin, coef_ptr)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, N, BLOCK_M)
    cols, col_ok = block_range(tl.program_id(1).to(tl.int64) * BLOCK_N, C, BLOCK_N)
    rx = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
    rw = tl.load(rw_ptr + cols, mask=col_ok, other=0.0)
    cos = cosine_tile(x_ptr, w_ptr, rx, rw, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
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
def fwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_pa_fwd_kernel``: 128 proxies x 64 embeddings per tile, 8 warps (the fp32 cosine tile and the two
    exponent tiles of the log-sum-exps are 32 registers per thread each; 4 warps or 128 x 128 tiles cost
    50-90 more registers per thread); the operands stream through shared memory in 3 stages."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


def fused_backward(d: int, dtype: torch.dtype) -> bool:
    """Whether the backward runs fused (``_pa_bwd_kernel``): D <= _MAX_FUSED_D for half inputs, half that for
    fp32 (:func:`~saga_kernels.proxy_common.fits_fused_backward`)."""
    return fits_fused_backward(d, dtype, _MAX_FUSED_D)


# ``_pa_bwd_kernel`` (fused, both row passes): the [BLOCK_M, BLOCK_D] fp32 accumulator in registers,
# see fused_backward_config
bwd_config = fused_backward_config


def grad_tile_config(d: int, dtype: torch.dtype) -> dict:
    """``_pa_grad_tile_kernel`` (unfused backward): one 128 x 64 tile per program, 8 warps."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _triton_forward(x, w, rx, rw, labels, alpha: float, margin: float):
    """(lse_pos [C], lse_neg [C]) in fp32."""
    (n, d), c = x.shape, w.shape[0]
    dtype = launch_dtype(x, w)
    dot_dtype, precision = dot_config(dtype, x.device)
    cfg = fwd_config(d, dtype)
    row_programs = cdiv(c, cfg["BLOCK_M"])
    splits, per_split = column_splits(row_programs, n, cfg["BLOCK_N"])
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


def _fused_pass(proxy_rows, a, b, ra, rb, labels, lse_pos, lse_neg, coefs, alpha, margin):
    """One row pass of the fused backward (``_pa_bwd_kernel``): fp32 [a rows, D] sums over all rows of ``b``."""
    (na, d), nb = a.shape, b.shape[0]
    dtype = launch_dtype(a, b)
    dot_dtype, precision = grad_dot_config(dtype, a.device)  # the gradient tile is an operand: never fp16
    cfg = bwd_config(d, grad_dtype(dtype))
    row_programs = cdiv(na, cfg["BLOCK_M"])
    splits, per_split = column_splits(row_programs, nb, cfg["BLOCK_N"], cap=partial_sums_cap(na, d))
    out = torch.empty((splits, na, d), device=a.device, dtype=torch.float32)
    with on_device(a):
        _pa_bwd_kernel[(row_programs, splits)](
            a, b, ra, rb, labels, lse_pos, lse_neg, coefs, out, na, nb, d, a.stride(0), b.stride(0), per_split,
            alpha, margin, PROXY_ROWS=proxy_rows, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
    return out[0] if splits == 1 else out.sum(dim=0)


def _unfused_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w):
    """Large D: (u, v) in fp32 from bounded chunks of ``G r q`` written once
    (:func:`~saga_kernels.metric_common.launch_grad_chunks`); 3 matmuls."""
    d, dtype = x.shape[1], launch_dtype(x, w)
    dot_dtype, precision = dot_config(dtype, x.device)
    cfg = dict(grad_tile_config(d, dtype), DOT_DTYPE=dot_dtype, PRECISION=precision)

    def chunk_args(g, r0, r1, c0, c1):  # the chunk's proxies are c0..c1-1: its labels are shifted by c0
        lab = labels[r0:r1] if c0 == 0 else labels[r0:r1] - c0
        return (x[r0:r1], w[c0:c1], rx[r0:r1], rw[c0:c1], lab, lse_pos[c0:c1], lse_neg[c0:c1], coefs, g, r1 - r0,
                c1 - c0, d, x.stride(0), w.stride(0), g.stride(0), alpha, margin)

    return launch_grad_chunks(_pa_grad_tile_kernel, cfg, chunk_args, x, w, dtype=dtype, need_da=need_x, need_db=need_w)


def _triton_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w):
    """(u, v) in fp32 (None where not needed); see the module docstring."""
    if not fused_backward(x.shape[1], grad_dtype(launch_dtype(x, w))):
        return _unfused_backward(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, alpha, margin, need_x, need_w)
    common = (labels, lse_pos, lse_neg, coefs, alpha, margin)
    u = _fused_pass(False, x, w, rx, rw, *common) if need_x else None
    v = _fused_pass(True, w, x, rw, rx, *common) if need_w else None
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
    """Raw embeddings x [N >= 0, D], raw proxies w [C, D], int labels [N] in [0, C) -> scalar loss.

    N = 0: loss 0 (in the embeddings' dtype) and zero gradients of the right shape for both inputs (under DDP
    an empty rank still contributes a proxy gradient). No kernel runs."""

    @staticmethod
    def forward(ctx, x, w, labels, alpha, margin, impl):
        ctx.empty = x.shape[0] == 0
        if ctx.empty:
            ctx.shapes = (x.shape, x.dtype, w.shape, w.dtype, x.device)
            return torch.zeros((), dtype=x.dtype, device=x.device)
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
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.empty:
            xs, xd, ws, wd, dev = ctx.shapes
            gx = torch.zeros(xs, dtype=xd, device=dev) if need_x else None
            gw = torch.zeros(ws, dtype=wd, device=dev) if need_w else None
            return gx, gw, None, None, None, None
        x, w, rx, rw, labels, lse_pos, lse_neg, num_present = ctx.saved_tensors
        if not (need_x or need_w):
            return None, None, None, None, None, None
        g = grad_out.to(rx.dtype)
        coefs = torch.stack([-ctx.alpha * g / num_present, ctx.alpha * g / w.shape[0]]).reshape(2).contiguous()
        run = _triton_backward if ctx.impl == "triton" else _torch_backward
        u, v = run(x, w, rx, rw, labels, lse_pos, lse_neg, coefs, ctx.alpha, ctx.margin, need_x, need_w)
        grad_x = normalize_backward(x, rx, u).to(x.dtype) if need_x else None
        grad_w = normalize_backward(w, rw, v).to(w.dtype) if need_w else None
        return grad_x, grad_w, None, None, None, None


def _check_inputs(embeddings, labels, proxies, margin, alpha) -> None:
    """Every argument of :func:`proxy_anchor_loss`, errors naming it."""
    check_proxy_inputs(embeddings, labels, proxies, rows="C")
    check_label_range("labels", labels, proxies.shape[0])
    if not math.isfinite(float(margin)):
        raise ValueError(f"margin must be a finite number, got {float(margin)}")
    check_positive("alpha", alpha)


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
    _check_inputs(embeddings, labels, proxies, margin, alpha)
    which = resolve_impl(impl, embeddings, labels, proxies)
    x, w = kernel_operand(embeddings, which), kernel_operand(proxies, which)
    loss = _ProxyAnchor.apply(x, w, kernel_labels(labels), float(alpha), float(margin), which)
    return loss.to(embeddings.dtype)
