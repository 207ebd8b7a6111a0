"""Potential Field loss (METHOD.md, "Potential Field loss") on tensor cores, streamed over (point x point) tiles.

The point set A is the N batch embeddings ``x`` [N, D] followed by the P proxies ``w`` [P, D] (n = N + P
points; raw rows in any float dtype, never concatenated: the kernels read the two tensors through their
own pointers). Point a has class y(a) (``labels`` for embeddings, ``proxy_labels`` for proxies, compared by
equality only), inverse norm ``r_a = 1 / max(||a||, eps)`` (:func:`~saga_kernels.metric_common.inverse_norms`)
and unit row ``ahat = r_a a``. For unit rows

    d2(a, s) = ||ahat - shat||^2 = 2 - 2 c_as,   c_as = (a . s) r_a r_s,   d = sqrt(max(d2, MIN_DISTANCE^2))
    psi_att(d) = -1 / max(d, delta)^alpha      (y(a) = y(s): flat inside delta)
    psi_rep(d) =  1 / min(d, delta)^alpha      (y(a) != y(s): constant, i.e. zero force, beyond delta)
    L = 1 / (n (n - 1)) sum_a sum_{s != a} psi(d(a, s))

("s != a" is by index: two coincident points still feel each other, at the clamped distance; L = 0 when
n <= 1). N = 0 is the energy of the proxies alone (the definition with an empty batch).

Backward. psi is symmetric, so with the upstream gradient g and ``coef = 2 g / (n (n - 1))``,
dd/dahat = -shat / d on the sphere (the radial part is removed by the normalization's backward) and
psi'(d) / d = +alpha d^-(alpha + 2) (attraction, d > delta), -alpha d^-(alpha + 2) (repulsion, d < delta and
d2 > MIN_DISTANCE^2), 0 where a clamp holds d:

    W_as = -coef psi'(d_as) / d_as                          (0 for s = a)
    u_a  = r_a dL/dahat = sum_{s != a} (W_as r_a r_s) s
    dL/da = u_a - r_a^2 <a, u_a> a                          (normalize_backward)

so every point, embedding or proxy, gets its gradient as a row of one pass over the point set.

Kernels (raw rows in their own dtype feed ``tl.dot``: bf16/fp16 on the tensor cores; fp32 at least as
tf32x3, since the short distances sqrt(2 - 2 c) need about fp32 accuracy in c). Each launch takes one
source (embeddings or proxies) as its rows and sweeps both sources as columns. Similarity-sized matmuls
(n x n x D products, counting both row launches together) per call:

* ``_pf_fwd_kernel``: row sums of psi over a split of the columns (split when rows are few). 1 matmul.
* ``_pf_bwd_kernel`` (D <= ``_MAX_FUSED_D`` = 512 for bf16, half that for fp32 and fp16, which runs on fp32
  operands as tf32: the force ``W r r`` (up to d^-(alpha+2) = 1e12) is a dot operand and overflows fp16,
  ``_tl_utils.grad_dot_config``):
  recomputes the cosine tile once and accumulates ``(W r r) @ s`` into a [BLOCK_M, next_pow2(D)] fp32
  accumulator held by one program. 2 matmuls.
* ``_pf_grad_tile_kernel`` (larger D): writes ``W r r`` for a chunk of rows against a chunk of the columns
  of one source (at most ``GRAD_CHUNK_BYTES``; bf16 for bf16 inputs on a GPU, else fp32) once; cuBLAS
  does the product (:func:`~saga_kernels.metric_common.launch_grad_chunks`, once per row source and
  column source). 2 matmuls.

Accuracy near d = 0. ``2 - 2 c`` cancels: with c accumulated in fp32 (any Gram-matrix evaluation: this
kernel, torch's ``x @ x.T``, cuBLAS) d2 carries an absolute error of a few 1e-7, i.e. a relative force error
of about (alpha + 2) * 1e-7 / d2 (1e-3 at d = 0.03). Distances below ``MIN_DISTANCE`` are clamped (zero
force), so the error stays bounded; only the N x N x D differences avoid the cancellation.

The torch fallback computes the same math in fp32 (fp64 for fp64 inputs) on [tile_size(n), n] tiles.
"""
from __future__ import annotations

import torch

from ._checks import check_mode
from ._dispatch import resolve_impl
from ._tl_utils import (
    block_range,
    cdiv,
    cosine_tile,
    dot_config,
    grad_dot_config,
    grad_dtype,
    load_rows,
    on_device,
    store_rows,
)
from ._triton import tl, triton
from .metric_common import (
    block_k,
    check_positive,
    compute_dtype,
    inverse_norms,
    kernel_operand,
    launch_grad_chunks,
    normalize_backward,
    tile_size,
)
from .proxy_common import (
    check_proxy_inputs,
    column_splits,
    fits_fused_backward,
    fused_backward_config,
    kernel_labels,
    launch_dtype,
    partial_sums_cap,
)

# Distances are clamped to at least this (gradient 0 below it), so coincident points of different
# classes repel with the finite energy MIN_DISTANCE^-alpha. In float32 the Gram-matrix distance
# sqrt(2 - 2 cos) of unit rows carries an absolute error of about 3e-4 near 0 (sqrt of a few 1e-7), so the
# clamp sits well above that noise: coincident points land on the clamp in float32 as in float64.
MIN_DISTANCE = 1e-2

_MAX_FUSED_D = 512  # largest D whose backward keeps the [BLOCK_M, next_pow2(D)] accumulator in one program


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _pf_log_d2(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, D, stride_a, stride_b, min_dist,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(unclamped d2 = 2 - 2 c, log of the clamped d2) of a tile of raw rows; masked entries give c = 0."""
    d2 = 2.0 - 2.0 * cosine_tile(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                                 BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    return d2, tl.log(tl.maximum(d2, min_dist * min_dist))


@triton.jit
def _pf_energy(log_d2, same, keep, alpha, log_delta2):
    """psi = -max(d, delta)^-alpha (same class), min(d, delta)^-alpha (else), 0 where ``keep`` is False:
    one exp per entry, d^-alpha = exp(-alpha/2 log d2)."""
    e = tl.exp(-0.5 * alpha * tl.where(same, tl.maximum(log_d2, log_delta2), tl.minimum(log_d2, log_delta2)))
    return tl.where(keep, tl.where(same, -e, e), 0.0)


@triton.jit
def _pf_weight(d2, log_d2, same, keep, coef, alpha, delta, min_dist):
    """W = -coef psi'(d) / d: -coef alpha d^-(alpha+2) (attraction beyond delta), +coef alpha d^-(alpha+2)
    (repulsion inside delta, unclamped), 0 elsewhere and where ``keep`` is False."""
    slope = coef * alpha * tl.exp(-0.5 * (alpha + 2.0) * log_d2)
    attract = same & (d2 > delta * delta)
    repel = (~same) & (d2 < delta * delta) & (d2 > min_dist * min_dist)
    return tl.where(keep & attract, -slope, tl.where(keep & repel, slope, 0.0))


@triton.jit
def _pf_scalars(alpha, delta, min_dist):
    """The hyper-parameters in fp32."""
    return tl.cast(alpha, tl.float32), tl.cast(delta, tl.float32), tl.cast(min_dist, tl.float32)


@triton.jit
def _pf_points(r_ptr, l_ptr, idx, ok):
    """(inverse norms, int64 labels) of the points ``idx`` of one source (0 and -1 where masked)."""
    return tl.load(r_ptr + idx, mask=ok, other=0.0), tl.load(l_ptr + idx, mask=ok, other=-1).to(tl.int64)


@triton.jit
def _pf_row_block(n_rows, row_offset, N, P, cols_per_split, BLOCK_M: tl.constexpr):
    """(rows, row_ok, global row index as int32 (n < 2^31, for s != a), split, start, end) of this program:
    its block of rows and its split ``program_id(1)`` of the N + P columns (``_tl_utils.split_range``
    inlined: computing N + P first costs the forward registers)."""
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, n_rows, BLOCK_M)
    grow = (rows + row_offset).to(tl.int32)
    split = tl.program_id(1).to(tl.int64)
    start = split * cols_per_split
    return rows, row_ok, grow, split, start, tl.minimum(start + cols_per_split, N + P)


@triton.jit
def _pf_column_tile(row_ptr, rr, rows, row_ok, grow, stride_row, col_ptr, rc_ptr, lc_ptr, c0, end, col_offset,
                    stride_col, D, min_dist, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The column block ``[c0, c0 + BLOCK_N)`` (< end) of one source (global index col_offset + s) against
    the rows: (cols, col_ok, r, int64 labels, d2, log d2, keep = in range and s != a)."""
    cols, col_ok = block_range(c0, end, BLOCK_N)
    rc = tl.load(rc_ptr + cols, mask=col_ok, other=0.0)
    d2, log_d2 = _pf_log_d2(row_ptr, col_ptr, rr, rc, rows, cols, row_ok, col_ok, D, stride_row, stride_col,
                            min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    lc = tl.load(lc_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
    keep = row_ok[:, None] & col_ok[None, :] & (grow[:, None] != (cols + col_offset).to(tl.int32)[None, :])
    return cols, col_ok, rc, lc, d2, log_d2, keep


@triton.jit
def _pf_fwd_source(acc, row_ptr, rr, lr, rows, row_ok, grow, stride_row, col_ptr, rc_ptr, lc_ptr, start, end,
                   col_offset, stride_col, D, alpha, log_delta2, min_dist, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """acc + the row sums of psi over the columns [start, end) of one source."""
    for c0 in range(start, end, BLOCK_N):
        _, _, _, lc, _, log_d2, keep = _pf_column_tile(row_ptr, rr, rows, row_ok, grow, stride_row, col_ptr, rc_ptr,
                                                       lc_ptr, c0, end, col_offset, stride_col, D, min_dist,
                                                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        acc += tl.sum(_pf_energy(log_d2, lr[:, None] == lc[None, :], keep, alpha, log_delta2), axis=1)
    return acc


@triton.jit
def _pf_bwd_source(acc, row_ptr, rr, lr, rows, row_ok, grow, stride_row, col_ptr, rc_ptr, lc_ptr, start, end,
                   col_offset, stride_col, D, dd, d_ok, coef, alpha, delta, min_dist, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """acc + sum over the columns s in [start, end) of one source of (W_as r_a r_s) s."""
    for c0 in range(start, end, BLOCK_N):
        cols, col_ok, rc, lc, d2, log_d2, keep = _pf_column_tile(
            row_ptr, rr, rows, row_ok, grow, stride_row, col_ptr, rc_ptr, lc_ptr, c0, end, col_offset, stride_col,
            D, min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        wt = _pf_weight(d2, log_d2, lr[:, None] == lc[None, :], keep, coef, alpha, delta, min_dist)
        wt = wt * (rr[:, None] * rc[None, :])
        s = load_rows(col_ptr, cols, col_ok, stride_col, dd, d_ok)
        acc = tl.dot(wt.to(DOT_DTYPE), s.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _pf_fwd_kernel(row_ptr, rr_ptr, lr_ptr, n_rows, stride_row, row_offset,
                   x_ptr, rx_ptr, lx_ptr, N, stride_x,
                   w_ptr, rw_ptr, lw_ptr, P, stride_w,
                   out_ptr, D, cols_per_split, alpha, delta, min_dist,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """out[split, a] = sum over the split's columns s != a of psi(d(a, s)) for the rows a of one source
    (global index row_offset + a); columns run over the embeddings (global 0..N-1), then the proxies
    (N..N+P-1); the host sums the splits."""
    alpha, delta, min_dist = _pf_scalars(alpha, delta, min_dist)
    log_delta2 = tl.log(delta * delta)
    rows, row_ok, grow, split, start, end = _pf_row_block(n_rows, row_offset, N, P, cols_per_split, BLOCK_M)
    rr, lr = _pf_points(rr_ptr, lr_ptr, rows, row_ok)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = _pf_fwd_source(acc, row_ptr, rr, lr, rows, row_ok, grow, stride_row,  # embedding columns
                         x_ptr, rx_ptr, lx_ptr, start, tl.minimum(end, N), 0, stride_x, D, alpha, log_delta2,
                         min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    acc = _pf_fwd_source(acc, row_ptr, rr, lr, rows, row_ok, grow, stride_row,  # proxy columns
                         w_ptr, rw_ptr, lw_ptr, tl.maximum(start, N) - N, tl.maximum(end, N) - N, N, stride_w, D,
                         alpha, log_delta2, min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    tl.store(out_ptr + split * n_rows + rows, acc, mask=row_ok)


@triton.jit
def _pf_bwd_kernel(row_ptr, rr_ptr, lr_ptr, n_rows, stride_row, row_offset,
                   x_ptr, rx_ptr, lx_ptr, N, stride_x,
                   w_ptr, rw_ptr, lw_ptr, P, stride_w,
                   coef_ptr, u_ptr, D, cols_per_split, alpha, delta, min_dist,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """u[split, a, :] = sum over the split's columns s != a of (W_as r_a r_s) s for the rows a of one
    source (fp32 [splits, n_rows, D]; the host sums the splits)."""
    alpha, delta, min_dist = _pf_scalars(alpha, delta, min_dist)
    coef = tl.load(coef_ptr)
    rows, row_ok, grow, split, start, end = _pf_row_block(n_rows, row_offset, N, P, cols_per_split, BLOCK_M)
    rr, lr = _pf_points(rr_ptr, lr_ptr, rows, row_ok)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc = _pf_bwd_source(acc, row_ptr, rr, lr, rows, row_ok, grow, stride_row,  # embedding columns
                         x_ptr, rx_ptr, lx_ptr, start, tl.minimum(end, N), 0, stride_x, D, dd, d_ok, coef, alpha,
                         delta, min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    acc = _pf_bwd_source(acc, row_ptr, rr, lr, rows, row_ok, grow, stride_row,  # proxy columns
                         w_ptr, rw_ptr, lw_ptr, tl.maximum(start, N) - N, tl.maximum(end, N) - N, N, stride_w, D,
                         dd, d_ok, coef, alpha, delta, min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    store_rows(u_ptr + split * n_rows * D, rows, row_ok, D, dd, d_ok, acc)


@triton.jit
def _pf_grad_tile_kernel(row_ptr, rr_ptr, lr_ptr, n_rows, stride_row, row_offset,
                         col_ptr, rc_ptr, lc_ptr, n_cols, stride_col, col_offset,
                         coef_ptr, g_ptr, stride_g, D, alpha, delta, min_dist,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """g[a, s] = W_as r_a r_s (in g's dtype) for the given rows and columns (global indices row_offset + a,
    col_offset + s), one tile per program."""
    alpha, delta, min_dist = _pf_scalars(alpha, delta, min_dist)
    coef = tl.load(coef_ptr)
    rows, row_ok = block_range(tl.program_id(0).to(tl.int64) * BLOCK_M, n_rows, BLOCK_M)
    cols, col_ok = block_range(tl.program_id(1).to(tl.int64) * BLOCK_N, n_cols, BLOCK_N)
    rr = tl.load(rr_ptr + rows, mask=row_ok, other=0.0)
    rc = tl.load(rc_ptr + cols, mask=col_ok, other=0.0)
    d2, log_d2 = _pf_log_d2(row_ptr, col_ptr, rr, rc, rows, cols, row_ok, col_ok, D, stride_row, stride_col,
                            min_dist, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    lr = tl.load(lr_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lc = tl.load(lc_ptr + cols, mask=col_ok, other=-1).to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    keep = ok & ((rows + row_offset).to(tl.int32)[:, None] != (cols + col_offset).to(tl.int32)[None, :])
    wt = _pf_weight(d2, log_d2, lr[:, None] == lc[None, :], keep, coef, alpha, delta, min_dist)
    wt = wt * (rr[:, None] * rc[None, :])
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], wt.to(g_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------
# Launch configurations: one function per kernel, used by the launchers and by the sm_90 compile test
# (tests/test_potential_field.py::AOT_SPECS), so the compiled artifact is what runs.
# --------------------------------------------------------------------------------------------------------
def fwd_config(d: int, dtype: torch.dtype) -> dict:
    """``_pf_fwd_kernel``: 64 x 64 tiles, 8 warps: the energy keeps about 8 registers per tile entry alive
    (cosine, log d2, exp, masks), i.e. 130 (bf16) / 190 (fp32, tf32x3 splits) registers per thread;
    128 x 64 tiles need 245-255, 4 warps 200-245."""
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


def fused_backward(d: int, dtype: torch.dtype) -> bool:
    """Whether the backward runs fused (``_pf_bwd_kernel``): D <= _MAX_FUSED_D for half inputs, half that
    for fp32 (:func:`~saga_kernels.proxy_common.fits_fused_backward`)."""
    return fits_fused_backward(d, dtype, _MAX_FUSED_D)


# ``_pf_bwd_kernel`` (fused): the [BLOCK_M, BLOCK_D] fp32 accumulator in registers, see fused_backward_config
bwd_config = fused_backward_config


def grad_tile_config(d: int, dtype: torch.dtype) -> dict:
    """``_pf_grad_tile_kernel`` (unfused backward): one 128 x 64 tile per program, 8 warps."""
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=block_k(dtype), num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------------------
# Launchers. ``pts`` = ((x, r_x, labels), (w, r_w, proxy_labels)); x may have 0 rows.
# --------------------------------------------------------------------------------------------------------
def _sources(pts):
    """Kernel arguments of the two column sources (an empty x is replaced by w's pointers: never read)."""
    (x, rx, lx), (w, rw, lw) = pts
    if x.shape[0] == 0:
        x, rx, lx = w, rw, lw
    return dict(x_ptr=x, rx_ptr=rx, lx_ptr=lx, N=pts[0][0].shape[0], stride_x=x.stride(0),
                w_ptr=w, rw_ptr=rw, lw_ptr=lw, P=w.shape[0], stride_w=w.stride(0))


def _row_launches(pts, needed=(True, True)):
    """(source index, rows, r, labels, global offset) of each needed, non-empty row source."""
    offset = 0
    for i, (t, r, lab) in enumerate(pts):
        if needed[i] and t.shape[0] > 0:
            yield i, t, r, lab, offset
        offset += t.shape[0]


def _launch_setup(pts, config, fused_backward=False):
    """(n, D, launch dtype, dot operand dtype, dot precision, ``config(D, dtype)``) of a launch over ``pts``;
    ``fused_backward``: the dots of ``_pf_bwd_kernel``, whose gradient tile is an operand (never fp16:
    ``_tl_utils.grad_dot_config``, and the configuration of that dtype)."""
    (x, _, _), (w, _, _) = pts
    d, dtype = w.shape[1], launch_dtype(x, w)
    choose = grad_dot_config if fused_backward else dot_config
    dot_dtype, precision = choose(dtype, w.device, min_fp32_precision="tf32x3")
    return (x.shape[0] + w.shape[0], d, dtype, dot_dtype, precision,
            config(d, grad_dtype(dtype) if fused_backward else dtype))


def _triton_forward(pts, alpha: float, delta: float) -> torch.Tensor:
    """sum_a sum_{s != a} psi(d(a, s)) over all points, fp32 scalar."""
    n, d, _, dot_dtype, precision, cfg = _launch_setup(pts, fwd_config)
    w = pts[1][0]
    total = torch.zeros((), device=w.device, dtype=torch.float32)
    row_programs = sum(cdiv(t.shape[0], cfg["BLOCK_M"]) for t, _, _ in pts)
    splits, per_split = column_splits(row_programs, n, cfg["BLOCK_N"])
    for _, rows, r, lab, offset in _row_launches(pts):
        out = torch.empty((splits, rows.shape[0]), device=w.device, dtype=torch.float32)
        with on_device(w):
            _pf_fwd_kernel[(cdiv(rows.shape[0], cfg["BLOCK_M"]), splits)](
                row_ptr=rows, rr_ptr=r, lr_ptr=lab, n_rows=rows.shape[0], stride_row=rows.stride(0),
                row_offset=offset, **_sources(pts), out_ptr=out, D=d, cols_per_split=per_split, alpha=alpha,
                delta=delta, min_dist=MIN_DISTANCE, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
        total = total + out.sum()
    return total


def _fused_backward(pts, coef, alpha, delta, needed):
    n, d, _, dot_dtype, precision, cfg = _launch_setup(pts, bwd_config, fused_backward=True)
    w = pts[1][0]
    us = [None, None]
    row_programs = sum(cdiv(t.shape[0], cfg["BLOCK_M"]) for (t, _, _), need in zip(pts, needed) if need)
    splits, per_split = column_splits(row_programs, n, cfg["BLOCK_N"], cap=partial_sums_cap(n, d))
    for i, rows, r, lab, offset in _row_launches(pts, needed):
        out = torch.empty((splits, rows.shape[0], d), device=w.device, dtype=torch.float32)
        with on_device(w):
            _pf_bwd_kernel[(cdiv(rows.shape[0], cfg["BLOCK_M"]), splits)](
                row_ptr=rows, rr_ptr=r, lr_ptr=lab, n_rows=rows.shape[0], stride_row=rows.stride(0),
                row_offset=offset, **_sources(pts), coef_ptr=coef, u_ptr=out, D=d, cols_per_split=per_split,
                alpha=alpha, delta=delta, min_dist=MIN_DISTANCE, DOT_DTYPE=dot_dtype, PRECISION=precision,
                **cfg)
        us[i] = out[0] if splits == 1 else out.sum(dim=0)
    return us


def _unfused_backward(pts, coef, alpha, delta, needed):
    """Large D: u per needed row source, from bounded chunks of ``W r r`` against each column source
    written once (:func:`~saga_kernels.metric_common.launch_grad_chunks`); cuBLAS forms the product.
    2 matmuls."""
    _, d, dtype, dot_dtype, precision, cfg = _launch_setup(pts, grad_tile_config)
    cfg = dict(cfg, DOT_DTYPE=dot_dtype, PRECISION=precision)
    us = [None, None]
    for i, rows, r, lab, offset in _row_launches(pts, needed):
        for _, cols, rc, lc, col_offset in _row_launches(pts):  # every non-empty source as the columns

            def chunk_args(g, r0, r1, c0, c1):  # used before the loops move on
                return (rows[r0:r1], r[r0:r1], lab[r0:r1], r1 - r0, rows.stride(0), offset + r0, cols[c0:c1],
                        rc[c0:c1], lc[c0:c1], c1 - c0, cols.stride(0), col_offset + c0, coef, g, g.stride(0), d,
                        alpha, delta, MIN_DISTANCE)

            u, _ = launch_grad_chunks(_pf_grad_tile_kernel, cfg, chunk_args, rows, cols, dtype=dtype, need_da=True,
                                      need_db=False)
            us[i] = u if us[i] is None else us[i].add_(u)
    return us


def _triton_backward(pts, coef, alpha, delta, needed):
    (x, _, _), (w, _, _) = pts
    if not fused_backward(w.shape[1], grad_dtype(launch_dtype(x, w))):
        return _unfused_backward(pts, coef, alpha, delta, needed)
    return _fused_backward(pts, coef, alpha, delta, needed)


# --------------------------------------------------------------------------------------------------------
# PyTorch fallback: the same math on [tile_size(n), n] tiles in fp32 (fp64 for fp64 inputs)
# --------------------------------------------------------------------------------------------------------
def pf_energy(d: torch.Tensor, same: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """psi(d): -max(d, delta)^-alpha where ``same``, min(d, delta)^-alpha elsewhere."""
    return torch.where(same, -d.clamp(min=delta).pow(-alpha), d.clamp(max=delta).pow(-alpha))


def pf_slope(d: torch.Tensor, d2: torch.Tensor, same: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """psi'(d) / d, zero where a clamp (delta, or MIN_DISTANCE on the unclamped d2) holds d."""
    slope = alpha * d.pow(-(alpha + 2.0))
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    attract = torch.where(d > delta, slope, zero)
    repel = torch.where((d < delta) & (d2 > MIN_DISTANCE**2), -slope, zero)
    return torch.where(same, attract, repel)


def _fallback_tiles(pts, needed=(True, True)):
    """Yield (source, r0, r1, d, d2, same, keep, column blocks) per row chunk of each needed source, in the
    compute dtype: d/d2 are [rows, n] over the columns x then w; ``keep`` drops s = a."""
    cd = pts[1][1].dtype
    # Contiguous operands: BLAS results then do not depend on the inputs' row strides (bit for bit).
    cols = [(t.to(cd).contiguous(), r, lab) for t, r, lab in pts]
    col_lab = torch.cat([lab.to(torch.int64) for _, _, lab in pts])
    col_r = torch.cat([r for _, r, _ in pts])
    n = col_lab.shape[0]
    gcol = torch.arange(n, device=col_lab.device)
    offset = 0
    step = tile_size(n)
    for i, (t, r, lab) in enumerate(pts):
        if needed[i]:
            for r0 in range(0, t.shape[0], step):
                r1 = min(t.shape[0], r0 + step)
                rows = t[r0:r1].to(cd).contiguous()
                dots = torch.cat([rows @ c.T for c, _, _ in cols], dim=1)
                d2 = 2.0 - 2.0 * dots * (r[r0:r1, None] * col_r[None, :])
                d = d2.clamp(min=MIN_DISTANCE**2).sqrt()
                same = lab[r0:r1, None].to(torch.int64) == col_lab[None, :]
                keep = gcol[None, :] != (offset + torch.arange(r0, r1, device=gcol.device))[:, None]
                yield i, r0, r1, d, d2, same, keep, cols
        offset += t.shape[0]


def _torch_forward(pts, alpha, delta):
    total = torch.zeros((), dtype=pts[1][1].dtype, device=pts[1][1].device)
    for _, _, _, d, _, same, keep, _ in _fallback_tiles(pts):
        total = total + torch.where(keep, pf_energy(d, same, alpha, delta), 0.0).sum()
    return total


def _torch_backward(pts, coef, alpha, delta, needed):
    us = [torch.empty(t.shape, dtype=r.dtype, device=t.device) if need else None
          for (t, r, _), need in zip(pts, needed)]
    for i, r0, r1, d, d2, same, keep, cols in _fallback_tiles(pts, needed):
        wt = torch.where(keep, -coef * pf_slope(d, d2, same, alpha, delta), 0.0)
        rr = pts[i][1][r0:r1]
        c0, acc = 0, 0
        for c, rc, _ in cols:
            c1 = c0 + c.shape[0]
            acc = acc + (wt[:, c0:c1] * (rr[:, None] * rc[None, :])) @ c
            c0 = c1
        us[i][r0:r1] = acc
    return us


# --------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------
class _PotentialField(torch.autograd.Function):
    """Raw embeddings x [N >= 0, D] and proxies w [P >= 1, D], int labels -> scalar loss (x's dtype)."""

    @staticmethod
    def forward(ctx, x, w, labels, proxy_labels, alpha, delta, impl):
        acc = compute_dtype(torch.promote_types(x.dtype, w.dtype))  # fp32 (fp64 only on the torch path)
        pts = ((x, inverse_norms(x).to(acc), labels), (w, inverse_norms(w).to(acc), proxy_labels))
        n = x.shape[0] + w.shape[0]
        ctx.save_for_backward(x, w, pts[0][1], pts[1][1], labels, proxy_labels)
        ctx.alpha, ctx.delta, ctx.impl = alpha, delta, impl
        if n <= 1:  # no pair
            return torch.zeros((), dtype=x.dtype, device=x.device)
        total = _triton_forward(pts, alpha, delta) if impl == "triton" else _torch_forward(pts, alpha, delta)
        return (total / (n * (n - 1))).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, rx, rw, labels, proxy_labels = ctx.saved_tensors
        needed = tuple(ctx.needs_input_grad[:2])
        n = x.shape[0] + w.shape[0]
        grads = [None, None]
        if n <= 1 or not any(needed):
            grads = [torch.zeros_like(t) if need else None for t, need in zip((x, w), needed)]
            return grads[0], grads[1], None, None, None, None, None
        pts = ((x, rx, labels), (w, rw, proxy_labels))
        coef = (grad_out.to(rx.dtype) * (2.0 / (n * (n - 1)))).reshape(1)
        run = _triton_backward if ctx.impl == "triton" else _torch_backward
        us = run(pts, coef, ctx.alpha, ctx.delta, needed)
        for i, (t, r, _) in enumerate(pts):
            if needed[i]:
                grads[i] = normalize_backward(t, r, us[i]).to(t.dtype) if t.shape[0] > 0 else torch.zeros_like(t)
        return grads[0], grads[1], None, None, None, None, None


def _check_inputs(embeddings, labels, proxies, proxy_labels, alpha, delta) -> None:
    """Every argument of :func:`potential_field_loss`, errors naming it; every label must be the class of at
    least one proxy (a value check, mode-aware: no host sync on CUDA by default)."""
    check_proxy_inputs(embeddings, labels, proxies, proxy_labels, rows="P")
    mode = check_mode(labels) if labels.numel() > 0 else "off"
    if mode != "off":
        # sort + searchsorted rather than torch.isin, whose sorting path calls unique (a host sync on CUDA)
        classes = proxy_labels.to(torch.int64).sort().values
        lab = labels.to(torch.int64)
        ok = classes[torch.searchsorted(classes, lab).clamp_(max=classes.numel() - 1)] == lab
        message = "labels holds classes that no proxy has (see proxy_labels)"
        if mode == "async":
            torch._assert_async(ok.all(), message)
        elif not bool(ok.all()):
            shown = sorted(set(labels[~ok].tolist()))[:10]
            raise ValueError(f"{message}: {shown}")
    check_positive("alpha", alpha)
    check_positive("delta", delta)


def potential_field_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxy_labels: torch.Tensor,
    *,
    alpha: float = 4.0,
    delta: float = 0.2,
    impl: str | None = None,
) -> torch.Tensor:
    """Potential Field energy of ``embeddings`` [N, D] (integer ``labels`` [N]) and ``proxies`` [P, D]
    (integer ``proxy_labels`` [P], the class of each proxy); see the module docstring for the formula.

    Every label must be the class of at least one proxy. Gradients flow to ``embeddings`` and ``proxies``.
    Computation runs in float32 (float64 for float64 inputs on the torch path); the loss comes back in
    ``embeddings.dtype``. N = 0 gives the energy of the proxies alone. ``impl``: "triton", "torch" or None
    (auto).
    """
    _check_inputs(embeddings, labels, proxies, proxy_labels, alpha, delta)
    which = resolve_impl(impl, embeddings, labels, proxies, proxy_labels)
    x, w = kernel_operand(embeddings, which), kernel_operand(proxies, which)
    loss = _PotentialField.apply(x, w, kernel_labels(labels), kernel_labels(proxy_labels), float(alpha), float(delta),
                                 which)
    return loss.to(embeddings.dtype)
