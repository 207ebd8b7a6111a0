"""Fused linear -> per-token log-probs (and entropy) without materializing the [N, V] logits.

Math. For one row h (a hidden state), LM head W [V, H] (+ bias b), temperature T, target y, and a model's
logit scale s and optional final-logit softcap C (1 and None for most models):

    raw = W h + b,   z = s raw / T   (with a softcap: z = C tanh(s raw / C) / T)
    lse = log sum_v exp(z_v),   p = softmax(z),   logprob = z_y - lse,   entropy = lse - E_p[z]

Gradients, for upstream g (log-prob) and g_H (entropy), with d_v = dz_v / draw_v = (s / T)(1 - tanh^2):

    d logprob / d h = J = sum_v (1[v = y] - p_v) d_v W_v = (1 - p_y) d_y W_y - sum_{v != y} p_v d_v W_v
    dlogits_v = g (1[v = y] - p_v) - g_H p_v (z_v - E_p[z])
    d_hidden = (dlogits * d) @ W,   d_weight = (dlogits * d)^T h,   d_bias = sum_rows dlogits * d

Three paths, chosen per call from what needs a gradient (flops for N_active rows: the matmul floor):

1. forward only (nothing needs a gradient, e.g. old/ref log-probs under no_grad): one pass over
   vocab tiles with an online log-sum-exp (the entropy, when asked, from the same pass). 2NHV.
2. Jacobian (hidden needs a gradient, the head and bias are frozen, the entropy is not asked or only read:
   ``return_entropy="detached"``): the forward also forms J per row, by an online-rescaled accumulation of
   P_tile @ W_tile next to the online log-sum-exp. The backward is d_hidden = g J: O(NH), no recompute. 4NHV.
3. recompute (a differentiated entropy, or the head / bias trains): the forward keeps (lse, 1 - p_y, E_p[z],
   p_y (z_y - E_p[z])); the backward recomputes logit tiles and forms dlogits chunk by chunk, the target column from
   those statistics. 6NHV (8NHV with a trained head).

Near-certain targets (p_y -> 1, the usual case for a policy's own samples). Every path holds the target column
apart: the streaming state is the NON-target maximum mx, sx = sum_{v != y} exp(z_v - mx), the entropy's
sum_{v != y} exp(z_v - mx)(z_v - mx) and z_y, all fp32. With L = mx + log(sx) - z_y, logprob = -softplus(L),
1 - p_y = sigmoid(L) and the entropy (``_row_stats``) keep their relative precision however far the target
leads (no 1 - p_y, no z_y - lse: lse has already lost the tiny part). Path 2's probabilities are stored and
summed relative to mx, so the largest one is 1 (a half-precision dot operand cannot flush the rivals of a
near-certain token to 0: exp(-18) is 1.5e-8, below fp16's smallest number) and J = (1 - p_y) d_y W_y -
exp(mx - lse) E keeps its relative precision. Path 3 takes the target column's dlogit from the forward's
1 - p_y and z_y - E_p[z] instead of recomputed logits, which would cancel.

Rows whose target is ``ignore_index`` (prompt tokens, padding) get log-prob 0, entropy 0 and an exactly zero
gradient, and cost nothing on any path, in flops or in saved memory. In the forwards a stable sort puts the live
rows first, kernels read rows through that order and programs past the live count (a device scalar) exit at
once; path 1 needs no host sync, path 2 reads the live count once (one host sync on CUDA, as TRL's head's
``hidden[mask]``) to keep J of the live rows only. Path 3's backward gathers the live rows (one host sync on CUDA,
for the matmul sizes). While a CUDA graph is being captured, no sync: every row, the ignored ones zeroed.

Memory (beyond inputs and outputs): path 1 keeps a few fp32 numbers per row and vocab split. Path 2 saves J of
the live rows ([N_live, H] fp32: one rounding less than a half-precision J, so d_hidden = g J is rounded once,
like eager's) instead of the hidden states, and works on one row chunk at a time (``_JAC_ROWS`` rows): an fp32
[rows, H] accumulator and the probability tile of one vocab segment ([rows, ``_JAC_SEGMENT``], fp32 whatever
the inputs' dtype: probabilities never travel in a half dtype), about 80 MiB at H = 4096 (64 MiB of it the tile,
twice a half-precision tile's). Path 3 writes dlogits for at most ``_DZ_CHUNK_BYTES`` at a time.

Dtypes: hidden and head may differ (a half-precision model under autocast with an fp32 head): on CUDA the matmuls
run in the hidden states' dtype, each weight tile converted as it is loaded (never a V x H copy; path 3's cuBLAS
products convert one vocab chunk at a time); the CPU fallback computes in fp32. Every probability, exp-sum and
accumulator is fp32. Path 3's dlogits chunk, which cuBLAS consumes, is bf16 for bf16 hidden states (fp32's
range: a tiny dlogit is rounded relatively, as eager bf16 rounds its own) and fp32 for fp16 ones (fp16 flushes
dlogits below 6e-8 to 0: a near-certain token's rivals under an unscaled upstream gradient), so an fp16 model's
path-3 products run as fp32 cuBLAS products on upcast vocab chunks. An enclosing autocast region (forward or
backward) does not change any of it.

Triton kernels (sm_90 tiles: 128 rows x 128 vocab x 64 hidden, 8 warps, fp32 accumulation; half inputs
on the tensor cores as they are, fp32 per ``_tl_utils.dot_config``; smaller tiles with a softcap or an fp32
head under half hidden states, see the launch configurations):
- ``_stats_kernel``: one program per (row block, vocab split); programs of consecutive ids share a
  row block and differ in the split, so the resident programs (about 8 row blocks x 16 splits) keep
  their hidden rows and the W tiles they share in L2 at any N. 16 splits (32 for small N).
- ``_expect_kernel`` (path 2): per vocab segment, E[rows, H-block] = E * alpha + P @ W[segment] where
  P = the stats kernel's stored fp32 tile probabilities (0 at the target column) rescaled to the running
  non-target maximum (<= 1, so the half-precision dot operand keeps every term that matters).
- ``_dlogits_kernel`` (path 3): one dlogits tile per program; cuBLAS turns the chunk into gradients.
``SAGA_AUTOTUNE=1`` autotunes the two forward kernels on CUDA (key: H, V); else one fixed config.
The torch fallback runs the same algorithms on [rows x vocab] chunks of fp32 logits (<= 32 MiB each).

Under ``torch.compile`` the forward and path 3's backward are the torch.library ops
``saga_kernels::linear_logprobs_forward`` / ``_backward`` (fake and autograd implementations registered), so
``fullgraph=True`` traces through; in eager mode the same code runs in an autograd.Function, which dispatch
modes (FlopCounterMode) see into.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_finite_rows, check_index_range, check_number, check_same_device, check_tensor
from ._dispatch import resolve_impl
from ._tl_utils import cdiv, dot_config, grad_buffer_dtype, mm_fp32, on_device, softcap_logits, tile_dot
from ._triton import tl, triton

_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)

# Fallback chunking: one [ROWS, VOCAB] fp32 tile is 32 MB; a handful of such temporaries live at once.
_TORCH_ROWS_PER_CHUNK = 1024
_TORCH_VOCAB_PER_CHUNK = 8192

# Triton: vocab splits of the stats kernel, and path 2's row chunk / vocab segment.
_SPLITS = 16
_SPLITS_SMALL_N = 32  # when fewer than _SMALL_N_BLOCKS row blocks would leave the GPU underused
_SMALL_N_BLOCKS = 16
_JAC_ROWS = 1024
_JAC_SEGMENT = 16384
# Path 3: the dlogits chunk handed to the matmuls is at most this big, for row chunks of at most this many rows.
_DZ_CHUNK_BYTES = 64 * 2**20
_TRITON_ROWS_PER_CHUNK = 2048


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, order_ptr, n_active_ptr,
                  mx_ptr, sx_ptr, tx_ptr, zt_ptr, p_ptr, mt_ptr,
                  row0, R, v_begin, v_end, vocab_per_split, H, V, stride_h, stride_w, stride_p, stride_mt, inv_temp,
                  scale, cap, SPLITS: tl.constexpr, FIRST: tl.constexpr, HAS_BIAS: tl.constexpr,
                  WITH_ENT: tl.constexpr, WRITE_P: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Streaming statistics of one row block over one vocab split of [v_begin, v_end), the target column held
    apart from the others (``_row_stats`` turns them into log-prob, lse, 1 - p_y and the entropy).

    Rows are compacted: local row l is row ``order[row0 + l]`` of h; rows past the active count are
    skipped. State [SPLITS, R], all fp32: mx = running max of the NON-target logits (-inf before the first),
    sx = sum_{v != y} exp(z_v - mx), tx = sum_{v != y} exp(z_v - mx) (z_v - mx) when WITH_ENT (relative to mx:
    no cancellation against large absolute logits), zt = the target logit if in this split (else 0). It is
    initialized (FIRST) or continued from memory.
    WRITE_P: also stores each tile's exp(z - mx_running) (0 at the target column; times dz/draw's softcap factor
    1 - tanh^2 when SOFTCAP) in fp32 into p[l, v - v_begin] and the running maximum it is relative to into
    mt[l, (v - v_begin) // BLOCK_V] (path 2's probabilities, rescaled later). Relative to the non-target maximum
    the largest stored value is 1, however far the target leads: nothing that matters underflows, in fp32 here
    or in a half-precision dot operand later. Logits: z = raw * inv_temp, or with SOFTCAP
    z = cap * tanh(scale * raw / cap) * inv_temp.
    """
    pid = tl.program_id(0).to(tl.int64)
    rb = pid // SPLITS
    split = pid % SPLITS
    n_active = tl.load(n_active_ptr)
    if row0 + rb * BLOCK_N >= n_active:
        return
    inv_t = tl.cast(inv_temp, tl.float32)
    pre = tl.cast(scale, tl.float32)
    c = tl.cast(cap, tl.float32)
    local = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (local < R) & (row0 + local < n_active)
    rows = tl.load(order_ptr + row0 + local, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    state = split * R + local
    if FIRST:
        mx = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        sx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        tx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        mx = tl.load(mx_ptr + state, mask=row_ok, other=float("-inf"))
        sx = tl.load(sx_ptr + state, mask=row_ok, other=0.0)
        tx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if WITH_ENT:
            tx = tl.load(tx_ptr + state, mask=row_ok, other=0.0)
        zt = tl.load(zt_ptr + state, mask=row_ok, other=0.0)
    v_start = v_begin + split * vocab_per_split
    v_stop = tl.minimum(v_start + vocab_per_split, v_end)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_stop
        z = tile_dot(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            z, dcap = softcap_logits(z, pre, c, inv_t)
        else:
            z = z * inv_t
        # a masked column never equals the target: splits and segments are whole BLOCK_V tiles, so only the tiles
        # at the end of the vocabulary hang over (columns >= V)
        is_tgt = cols[None, :] == tgt[:, None]
        zt += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
        z = tl.where(col_ok[None, :] & ~is_tgt, z, float("-inf"))  # from here on the non-target logits only
        mx_new = tl.maximum(mx, tl.max(z, axis=1))  # -inf while a row has seen no non-target column
        shift = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        z = z - shift[:, None]
        e = tl.exp(z)  # <= 1; 0 at the target and masked columns
        if WRITE_P:
            # int32 offsets (a tile holds < 2^31 entries): fewer address registers than int64 ones (no spill)
            p_off = (local.to(tl.int32)[:, None] * stride_p + (v0 - v_begin).to(tl.int32)
                     + tl.arange(0, BLOCK_V)[None, :])
            if SOFTCAP:
                tl.store(p_ptr + p_off, e * dcap, mask=row_ok[:, None] & col_ok[None, :])
            else:
                tl.store(p_ptr + p_off, e, mask=row_ok[:, None] & col_ok[None, :])
            tl.store(mt_ptr + local * stride_mt + (v0 - v_begin) // BLOCK_V, mx_new, mask=row_ok)
        alpha = tl.exp(mx - shift)
        if WITH_ENT:
            moved = tl.where(mx == float("-inf"), 0.0, mx - shift)  # sx = 0 there
            tx = (tx + sx * moved) * alpha + tl.sum(e * tl.maximum(z, -3.0e38), axis=1)  # 0 * finite at -inf
        sx = sx * alpha + tl.sum(e, axis=1)
        mx = mx_new
    tl.store(mx_ptr + state, mx, mask=row_ok)
    tl.store(sx_ptr + state, sx, mask=row_ok)
    tl.store(zt_ptr + state, zt, mask=row_ok)
    if WITH_ENT:
        tl.store(tx_ptr + state, tx, mask=row_ok)


@triton.jit
def _expect_kernel(p_ptr, mt_ptr, w_ptr, n_active_ptr, m_ptr, mprev_ptr, e_ptr,
                   row0, R, v_begin, v_end, H, stride_p, stride_mt, stride_w, stride_e,
                   FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HO: tl.constexpr,
                   BLOCK_K: tl.constexpr, TILE_V: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """E[l, hcols] = E[l, hcols] * exp(M_prev - M) + sum_{v in segment, v != y} exp(z_v - M) W[v, hcols].

    M = ``m[l]``, the maximum NON-target logit of row l over every vocab column seen so far (this segment
    included), M_prev = ``mprev[l]`` the same before this segment (unused when FIRST); -inf while none was
    seen (then E = 0). The stats kernel's fp32 tile probabilities p (relative to mt, 0 at the target column)
    are rescaled by exp(mt - M) <= 1: the dot operand's largest entry per row is 1, so a half-precision operand
    cannot underflow for the terms that matter. One program per (row block, H block); H blocks vary fastest so
    resident programs share their probability rows in L2.
    """
    pid = tl.program_id(0).to(tl.int64)
    h_blocks = tl.cdiv(H, BLOCK_HO)
    rb = pid // h_blocks
    hb = pid % h_blocks
    n_active = tl.load(n_active_ptr)
    if row0 + rb * BLOCK_M >= n_active:
        return
    local = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (local < R) & (row0 + local < n_active)
    m_ref = tl.load(m_ptr + local, mask=row_ok, other=0.0)
    hcols = hb * BLOCK_HO + tl.arange(0, BLOCK_HO).to(tl.int64)
    h_ok = hcols < H
    acc = tl.zeros((BLOCK_M, BLOCK_HO), dtype=tl.float32)
    for k0 in range(v_begin, v_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < v_end
        mt = tl.load(mt_ptr + local * stride_mt + (k0 - v_begin) // TILE_V, mask=row_ok, other=float("-inf"))
        scale = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - m_ref))  # mt = -inf: no stored probability yet
        p = tl.load(p_ptr + local[:, None] * stride_p + (cols - v_begin)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + hcols[None, :], mask=col_ok[:, None] & h_ok[None, :],
                    other=0.0)
        acc = tl.dot((p * scale[:, None]).to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out = e_ptr + local[:, None] * stride_e + hcols[None, :]
    ok = row_ok[:, None] & h_ok[None, :]
    if not FIRST:
        m_prev = tl.load(mprev_ptr + local, mask=row_ok, other=float("-inf"))
        carry = tl.where(m_prev == float("-inf"), 0.0, tl.exp(m_prev - m_ref))  # E = 0 while m_prev = -inf
        acc += tl.load(out, mask=ok, other=0.0) * carry[:, None]
    tl.store(out, acc, mask=ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, ge_ptr, ez_ptr, dzy_ptr, dz_ptr,
                    N, v_start, v_stop, H, stride_h, stride_w, stride_dz, inv_temp, scale, cap, ignore_index,
                    HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, SOFTCAP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dz[rows, cols - v_start] = d(loss)/d(raw logits) for vocab columns [v_start, v_stop): one
    [BLOCK_N, BLOCK_V] tile per program, logits recomputed from h and W (transformed as in the stats
    kernel); 0 at ignored rows. Per row: lse, g, (WITH_ENT) g_ent and E_p[z], and dzy = d(loss)/dz_y, the
    target column's value, formed from the forward's precise statistics (``_target_dlogit``: recomputed, 1 - p_y =
    1 - exp(z_y - lse) and z_y - E_p[z] would cancel when the target is near-certain)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    inv_t = tl.cast(inv_temp, tl.float32)
    pre = tl.cast(scale, tl.float32)
    c = tl.cast(cap, tl.float32)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_stop
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    active = row_ok & (tgt != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    g = tl.load(g_ptr + rows, mask=active, other=0.0)
    z = tile_dot(h_ptr, w_ptr, rows, cols, active, col_ok, H, stride_h, stride_w,
                 BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        z, dcap = softcap_logits(z, pre, c, inv_t)
    else:
        z = z * inv_t
    p = tl.exp(z - lse[:, None])
    if WITH_ENT:
        g_ent = tl.load(ge_ptr + rows, mask=active, other=0.0)
        ez = tl.load(ez_ptr + rows, mask=active, other=0.0)
        dz = -p * (g[:, None] + g_ent[:, None] * (z - ez[:, None]))
    else:
        dz = -g[:, None] * p
    dzy = tl.load(dzy_ptr + rows, mask=active, other=0.0)
    dz = tl.where(cols[None, :] == tgt[:, None], dzy[:, None], dz)
    if SOFTCAP:
        dz = dz * dcap * (pre * inv_t)
    else:
        dz = dz * inv_t
    dz = tl.where(active[:, None] & col_ok[None, :], dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + (cols - v_start)[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launch configurations (one place, so the sm_90 compile test builds exactly what is launched)
# --------------------------------------------------------------------------------------------
# The tiles below are the largest whose sm_90 compile (tests/test_logprob.py::test_kernels_compile_for_sm90)
# shows wgmma and no spills: half inputs 128 x 128 x 64 with 8 warps and 3 stages; fp32 inputs run three
# TF32 products per dot (tf32x3) and hold hi/lo operand halves, so their tiles are halved along one side.
# A softcap holds a second fp32 tile (the tanh factor): 64-row blocks. An fp32 head under half hidden states
# (autocast) loads fp32 weight tiles and converts them: half the hidden (K) step (a quarter in path 2's stats
# launch, which also stores the fp32 probability tile). In the interpreter 64-row blocks (same code, fewer numpy
# ops per program).
def _wide_head(dtype: torch.dtype, w_dtype: torch.dtype | None) -> bool:
    return w_dtype is not None and torch.finfo(w_dtype).bits > torch.finfo(dtype).bits


def stats_config(device: torch.device, dtype: torch.dtype, w_dtype: torch.dtype | None = None,
                 softcap: bool = False, write_p: bool = False) -> dict:
    """Tiles of ``_stats_kernel`` (rows x vocab x hidden per dot step) for hidden states of ``dtype`` and a head
    of ``w_dtype`` (default the same); ``write_p``: path 2's launch, which also stores the fp32 probability tile
    (with an fp32 head under half hidden states that store needs the 16-wide hidden step: 32 spills)."""
    if device.type != "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    if dtype == torch.float32:
        return dict(BLOCK_N=64 if softcap else 128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=3)
    block_h = (16 if write_p and not softcap else 32) if _wide_head(dtype, w_dtype) else 64
    return dict(BLOCK_N=64 if softcap else 128, BLOCK_V=128, BLOCK_H=block_h, num_warps=8, num_stages=3)


def expect_config(device: torch.device, dtype: torch.dtype, w_dtype: torch.dtype | None = None) -> dict:
    """Tiles of ``_expect_kernel`` (rows x hidden columns x vocab per dot step); BLOCK_K divides the stats
    kernel's BLOCK_V, so one K step lies inside one stored probability tile."""
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_HO=64, BLOCK_K=64)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_HO=64, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_HO=64 if _wide_head(dtype, w_dtype) else 128, BLOCK_K=64, num_warps=8,
                num_stages=3)


def dlogits_config(device: torch.device, dtype: torch.dtype, w_dtype: torch.dtype | None = None,
                   softcap: bool = False) -> dict:
    """Tiles of ``_dlogits_kernel`` (rows x vocab x hidden per dot step)."""
    if device.type != "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    return dict(BLOCK_N=64 if softcap else 128, BLOCK_V=128, BLOCK_H=32 if _wide_head(dtype, w_dtype) else 64,
                num_warps=8, num_stages=3)


# opt-in (SAGA_AUTOTUNE=1, CUDA, half inputs). BLOCK_V / TILE_V stay fixed (buffer layouts); the space
# holds only the tilings whose sm_90 compile does not spill (128-row tiles need 8 warps; 128 x 256
# accumulators spill at any warp count): tests/test_logprob.py::test_autotune_space_compiles_for_sm90.
_AUTOTUNE_SPACE = {
    "stats": [dict(BLOCK_N=bn, BLOCK_V=128, BLOCK_H=bh, num_warps=w, num_stages=st)  # 64 x 64 on 4 warps spills
              for bn, w, bhs in ((64, 4, (32,)), (64, 8, (32, 64)), (128, 8, (32, 64))) for bh in bhs for st in (3, 4)],
    "expect": [dict(BLOCK_M=bm, BLOCK_HO=bh, BLOCK_K=64, num_warps=w, num_stages=st)
               for bm, bh, w in ((64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8)) for st in (3, 4)],
}
_autotuned: dict = {}


def _autotune_on(h: torch.Tensor, w: torch.Tensor, lg) -> bool:
    """The space was checked for half inputs with a head of their dtype and no softcap; elsewhere the fixed tiles."""
    return (h.device.type == "cuda" and h.dtype != torch.float32 and w.dtype == h.dtype and lg.cap is None
            and os.environ.get("SAGA_AUTOTUNE", "0") == "1")


def _tuned(name: str, kernel):
    """``kernel`` wrapped in triton.autotune over ``_AUTOTUNE_SPACE[name]``, keyed on (H, V)."""
    if name not in _autotuned:
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in _AUTOTUNE_SPACE[name]]
        # benchmarking reruns a launch: restore what a launch accumulates into (the split state, E)
        key, restore = (["H", "V"], ["mx_ptr", "sx_ptr", "tx_ptr", "zt_ptr"]) if name == "stats" else (
            ["H", "v_end"], ["e_ptr"])
        _autotuned[name] = triton.autotune(configs=configs, key=key, restore_value=restore)(kernel)
    return _autotuned[name]


def _num_splits(row_blocks: int, vocab_tiles: int) -> int:
    return max(1, min(vocab_tiles, _SPLITS if row_blocks >= _SMALL_N_BLOCKS else _SPLITS_SMALL_N))


# --------------------------------------------------------------------------------------------
# The logit transform: temperature, logit scale and softcap
# --------------------------------------------------------------------------------------------
class LogitTransform(NamedTuple):
    """z = scale * raw / T, or with a softcap C: z = C * tanh(scale * raw / C) / T (raw = h . W_v + b_v).

    ``scale`` is a model's logit multiplier (Granite's 1 / logits_scaling, Cohere's logit_scale), ``cap`` its
    final-logit softcap (Gemma 2's final_logit_softcapping) or None, ``inv_temp`` = 1 / temperature.
    dz / draw = scale * d / T with d = 1 - tanh^2 (d = 1 without a softcap).
    """

    scale: float
    cap: float | None
    inv_temp: float

    @property
    def grad_scale(self) -> float:
        """dz / draw without the softcap factor d."""
        return self.scale * self.inv_temp

    def kernel_args(self) -> tuple:
        """(inv_temp, scale, cap) as the kernels take them: without a softcap the scale is folded in."""
        if self.cap is None:
            return self.grad_scale, 1.0, 1.0
        return self.inv_temp, self.scale, self.cap

    def apply(self, raw: torch.Tensor):
        """(z, d) of an fp32 raw-logit chunk (``raw`` is overwritten); d is None without a softcap."""
        if self.cap is None:
            return raw.mul_(self.grad_scale), None
        x = raw.mul_(2.0 * self.scale / self.cap)
        d = torch.sigmoid(x) * torch.sigmoid(-x) * 4.0  # 1 - tanh^2 without cancellation where tanh saturates
        return torch.tanh(x.mul_(0.5)).mul_(self.cap * self.inv_temp), d

    def target_factor(self, zt: torch.Tensor):
        """d at the target logits ``zt`` (transformed), or None without a softcap."""
        if self.cap is None:
            return None
        t = zt / (self.cap * self.inv_temp)
        return (1.0 - t) * (1.0 + t)


# --------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------
def _compact(tgt, ignore_index):
    """(order, n_active): a stable order putting rows with target != ignore_index first, and their
    count as a device int64 scalar. No host sync."""
    ignored = tgt == ignore_index
    order = torch.sort(ignored.to(torch.uint8), stable=True).indices
    return order, (~ignored).sum().reshape(1)


def _active_rows(tgt, ignore_index):
    """Indices of the rows whose target is not ignored, for the recompute path's backward: one host sync on
    CUDA (the matmul sizes must be known), none on the CPU. While a CUDA graph is being captured (no sync
    allowed) every row, the kernels then zero the ignored ones."""
    if tgt.is_cuda and torch.cuda.is_current_stream_capturing():
        return torch.arange(tgt.numel(), device=tgt.device)
    return torch.nonzero(tgt != ignore_index)[:, 0]


def _launch_stats(h, w, b, tgt, order, n_active, state, p, mt, row0, rows, v_begin, v_end, lg, *,
                  first, with_ent, splits, cfg):
    """One launch of ``_stats_kernel`` over compacted rows [row0, row0 + rows) and vocab [v_begin, v_end)."""
    mx, sx, tx, zt = state
    block_v = cfg["BLOCK_V"]
    per_split = cdiv(cdiv(v_end - v_begin, block_v), splits) * block_v
    dot_dtype, precision = dot_config(h.dtype, h.device)
    args = (h, w, b if b is not None else h, tgt, order, n_active, mx, sx, tx, zt,
            p if p is not None else mx, mt if mt is not None else mx,
            row0, rows, v_begin, v_end, per_split, h.shape[1], w.shape[0], h.stride(0), w.stride(0),
            p.stride(0) if p is not None else 0, mt.stride(0) if mt is not None else 0, *lg.kernel_args())
    meta = dict(SPLITS=splits, FIRST=first, HAS_BIAS=b is not None, WITH_ENT=with_ent, WRITE_P=p is not None,
                SOFTCAP=lg.cap is not None, DOT_DTYPE=dot_dtype, PRECISION=precision)
    with on_device(h):
        if _autotune_on(h, w, lg):
            _tuned("stats", _stats_kernel)[lambda c: (cdiv(rows, c["BLOCK_N"]) * splits,)](*args, **meta)
        else:
            _stats_kernel[(cdiv(rows, cfg["BLOCK_N"]) * splits,)](*args, **meta, **cfg)


def _combine(state):
    """The split states [4, SPLITS, R] of ``_stats_kernel`` merged into one per row: (mx, sx, tx, zt) as the
    kernel defines them, relative to mx = the maximum non-target logit over every split."""
    mx, sx, tx, zt = state
    m_all = mx.max(dim=0).values
    shift = torch.where(m_all == float("-inf"), 0.0, m_all)
    weight = torch.exp(mx - shift)  # 0 for a split that saw no non-target column (mx = -inf, sx = tx = 0)
    moved = torch.where(mx == float("-inf"), 0.0, mx - shift)
    return m_all, (sx * weight).sum(dim=0), ((tx + sx * moved) * weight).sum(dim=0), zt.sum(dim=0)


def _row_stats(mx, sx, tx, zt, with_ent: bool):
    """(logp, lse, rest, rx, entropy, E_p[z]) per row from the merged statistics (the target column held apart:
    mx the maximum non-target logit, sx = sum_{v != y} exp(z_v - mx), tx = sum_{v != y} exp(z_v - mx) (z_v - mx),
    zt the target logit). With L = log(sum_{v != y} p_v / p_y) = mx + log(sx) - zt:

        log p_y = -softplus(L),   lse = zt + softplus(L),   rest = 1 - p_y = sigmoid(L),   rx = exp(mx - lse)
        entropy = p_y softplus(L) + rest (log(sx) + softplus(-L) - tx / sx),   E_p[z] = lse - entropy

    (the entropy's second term is sum_{v != y} p_v (lse - z_v), with lse - mx = log(sx) + softplus(-L)). Every one
    keeps its relative precision however close p_y is to 1 (no 1 - p_y, no z_y - lse) or to 0, and the entropy
    sums non-negative terms that do not involve the absolute size of the logits. rx is the probability of the
    largest non-target logit, the factor that turns path 2's sum (relative to mx) into probabilities. A row
    without a non-target column (V = 1) has L = -inf: log p_y = 0, rest = rx = 0, entropy 0. entropy / E_p[z]
    are None unless ``with_ent``."""
    lead = mx + torch.log(sx) - zt
    soft = torch.nn.functional.softplus(lead)
    logp, lse = -soft, zt + soft
    rest, rx = torch.sigmoid(lead), torch.exp(mx - lse)
    if not with_ent:
        return logp, lse, rest, rx, None, None
    has_rest = sx > 0
    spread = torch.log(sx) + torch.nn.functional.softplus(-lead) - tx / torch.where(has_rest, sx, 1.0)
    ent = torch.sigmoid(-lead) * soft + torch.where(has_rest, rest * spread, 0.0)
    return logp, lse, rest, rx, ent, lse - ent


def _triton_forward(h, w, b, tgt, lg, ignore_index, with_ent, jacobian):
    """Returns (logp, lse, entropy-or-None, E_p[z]-or-None, J-or-None, J's rows-or-None): the first four fp32 [N]
    in original row order (0 at ignored rows); path 2's J [L, H] fp32 for the L live rows, ``rows`` [L] their
    indices (``_live_count``)."""
    n, hd = h.shape
    v = w.shape[0]
    n_out = 4 if with_ent else 2
    if n == 0:
        empty = [torch.zeros(0, device=h.device, dtype=torch.float32) for _ in range(n_out)] + [None] * (4 - n_out)
        jac = (h.new_zeros((0, hd), dtype=torch.float32), tgt.new_zeros(0)) if jacobian else (None, None)
        return tuple(empty) + jac
    order, n_active = _compact(tgt, ignore_index)
    jac_rows = None
    scfg = stats_config(h.device, h.dtype, w.dtype, lg.cap is not None, write_p=jacobian)
    if not jacobian:
        splits = _num_splits(cdiv(n, scfg["BLOCK_N"]), cdiv(v, scfg["BLOCK_V"]))
        state = torch.empty((4, splits, n), device=h.device, dtype=torch.float32)
        _launch_stats(h, w, b, tgt, order, n_active, state, None, None, 0, n, 0, v, lg,
                      first=True, with_ent=with_ent, splits=splits, cfg=scfg)
        logp, lse, _, _, ent, ez = _row_stats(*_combine(state), with_ent)
        compact, jac = [logp, lse, ent, ez][:n_out], None
    else:
        live = _live_count(n_active, n)
        compact = [torch.zeros(n, device=h.device, dtype=torch.float32) for _ in range(n_out)]
        jac = torch.zeros((live, hd), device=h.device, dtype=torch.float32)
        jac_rows = order[:live]
        ecfg = expect_config(h.device, h.dtype, w.dtype)
        rows_per_chunk = max(1, min(live, _JAC_ROWS))
        segment = min(v, cdiv(_JAC_SEGMENT, scfg["BLOCK_V"]) * scfg["BLOCK_V"])  # whole tiles (see _stats_kernel)
        splits = _num_splits(cdiv(rows_per_chunk, scfg["BLOCK_N"]), cdiv(segment, scfg["BLOCK_V"]))
        # fp32, whatever the inputs' dtype: the tile holds probabilities (a half dtype would flush a near-certain
        # token's rivals to 0, and with them the whole gradient)
        p = torch.empty((rows_per_chunk, segment), device=h.device, dtype=torch.float32)
        mt = torch.empty((rows_per_chunk, cdiv(segment, scfg["BLOCK_V"])), device=h.device, dtype=torch.float32)
        acc = torch.empty((rows_per_chunk, hd), device=h.device, dtype=torch.float32)
        dot_dtype, precision = dot_config(h.dtype, h.device)
        for r0 in range(0, live, rows_per_chunk):
            rows = min(rows_per_chunk, live - r0)
            state = torch.empty((4, splits, rows), device=h.device, dtype=torch.float32)
            m_prev = None
            for v0 in range(0, v, segment):
                v1 = min(v, v0 + segment)
                _launch_stats(h, w, b, tgt, order, n_active, state, p, mt, r0, rows, v0, v1, lg,
                              first=m_prev is None, with_ent=with_ent, splits=splits, cfg=scfg)
                m_cur = state[0].max(dim=0).values  # running non-target max over every column so far
                args = (p, mt, w, n_active, m_cur, m_cur if m_prev is None else m_prev, acc,
                        r0, rows, v0, v1, hd, p.stride(0), mt.stride(0), w.stride(0), acc.stride(0))
                meta = dict(FIRST=m_prev is None, TILE_V=scfg["BLOCK_V"], DOT_DTYPE=dot_dtype, PRECISION=precision)
                with on_device(h):
                    if _autotune_on(h, w, lg):
                        grid = lambda c, rows=rows: (cdiv(rows, c["BLOCK_M"]) * cdiv(hd, c["BLOCK_HO"]),)  # noqa: E731
                        _tuned("expect", _expect_kernel)[grid](*args, **meta)
                    else:
                        grid = (cdiv(rows, ecfg["BLOCK_M"]) * cdiv(hd, ecfg["BLOCK_HO"]),)
                        _expect_kernel[grid](*args, **meta, **ecfg)
                m_prev = m_cur
            mx, sx, tx, zt = _combine(state)
            logp, lse, rest, rx, ent, ez = _row_stats(mx, sx, tx, zt, with_ent)
            for buf, val in zip(compact, (logp, lse, ent, ez)):
                buf[r0:r0 + rows] = val
            _finish_jacobian(jac[r0:r0 + rows], w, tgt, order[r0:r0 + rows], n_active, r0, rest,
                             acc[:rows] * rx[:, None], zt, lg)
    active_c = torch.arange(n, device=h.device) < n_active
    out = [torch.zeros(n, device=h.device, dtype=torch.float32) for _ in range(n_out)]
    for buf, val in zip(out, compact):
        buf[order] = torch.where(active_c, val, 0.0)
    return tuple(out) + (None,) * (4 - n_out) + (jac, jac_rows)


def _live_count(n_active, n: int) -> int:
    """The number of live rows as a Python int, for path 2's J of the live rows only: one host sync on CUDA (as
    TRL's head's ``hidden[mask]``). While a CUDA graph is being captured (no sync allowed) every row: J then also
    holds the ignored rows, as zeros."""
    if n_active.is_cuda and torch.cuda.is_current_stream_capturing():
        return n
    return int(n_active)


def _finish_jacobian(jac_chunk, w, tgt, order_rows, n_active, r0, rest, expect_rest, zt, lg):
    """``jac_chunk`` = (scale / T) ((1 - p_y) d_y W_y - sum_{v != y} p_v d_v W_v) for the chunk's compacted rows,
    with ``rest`` = 1 - p_y, ``expect_rest`` [rows, H] fp32 = the sum without the target column (d_v already
    folded in), ``zt`` the target logits (d = the softcap factor, 1 without one); 0 at ignored rows."""
    ok = (torch.arange(r0, r0 + order_rows.numel(), device=jac_chunk.device) < n_active)[:, None]
    y = torch.where(ok[:, 0], tgt[order_rows], 0)
    d_y = lg.target_factor(zt)
    coef = rest if d_y is None else rest * d_y
    j = (torch.where(ok, coef[:, None], 0.0) * w[y].float() - torch.where(ok, expect_rest, 0.0))
    jac_chunk.copy_(torch.where(ok, j * lg.grad_scale, 0.0))


def _triton_backward(h, w, b, tgt, lse, dzy, g, g_ent, ez, lg, ignore_index, need_dh, need_dw, need_db):
    """Path 3. Returns (fp32 d_hidden or None, fp32 d_weight or None, fp32 d_bias or None); the per-row
    statistics as ``_dlogits_kernel`` takes them.

    Only the rows whose target is not ignored are computed (``_active_rows``), in chunks gathered from them.
    Per (row chunk, vocab chunk) the dlogits kernel writes the chunk (at most _DZ_CHUNK_BYTES, in the matmul
    dtype ``grad_buffer_dtype``) and dense matmuls consume it: d_hidden_rows += dz @ W_chunk (an fp32 accumulator
    per row chunk), and only for a trainable head d_weight_chunk += dz.T @ h_rows. No atomics.
    """
    n, hd = h.shape
    v = w.shape[0]
    with_ent = g_ent is not None
    cfg = dlogits_config(h.device, h.dtype, w.dtype, lg.cap is not None)
    dot_dtype, precision = dot_config(h.dtype, h.device)
    # the dlogits chunk's dtype: bf16 for bf16 hidden states on CUDA (fp32's range: a tiny p_v g stays a tiny number,
    # rounded relatively as eager bf16 rounds its own gradient), else fp32 (fp16 flushes p_v g below 6e-8 to 0 and
    # keeps a few bits below 6e-5: a near-certain token's rivals under an unscaled upstream gradient)
    mm_dtype = grad_buffer_dtype(h.dtype, h.device)
    dh = torch.zeros((n, hd), device=h.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros((v, hd), device=h.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((v,), device=h.device, dtype=torch.float32) if need_db else None
    idx = _active_rows(tgt, ignore_index)
    n_rows = idx.numel()
    if n_rows == 0:
        return dh, dw, db
    rows_per_chunk = min(n_rows, _TRITON_ROWS_PER_CHUNK)
    elt = torch.finfo(mm_dtype).bits // 8
    vocab_per_chunk = max(cfg["BLOCK_V"], _DZ_CHUNK_BYTES // (rows_per_chunk * elt) // cfg["BLOCK_V"] * cfg["BLOCK_V"])
    dz_buf = torch.empty((rows_per_chunk, min(v, vocab_per_chunk)), device=h.device, dtype=mm_dtype)
    inv_t, scale, cap = lg.kernel_args()
    for r0 in range(0, n_rows, rows_per_chunk):
        rows = idx[r0:r0 + rows_per_chunk]
        count = rows.numel()
        tgt_rows = tgt[rows]
        h_rows = h[rows]
        ent_rows = (g_ent[rows], ez[rows]) if with_ent else (lse[rows],) * 2
        h_mm = torch.where((tgt_rows != ignore_index)[:, None], h_rows, 0).to(mm_dtype) if need_dw else None
        acc = torch.zeros((count, hd), device=h.device, dtype=torch.float32) if need_dh else None
        for v0 in range(0, v, vocab_per_chunk):
            v1 = min(v, v0 + vocab_per_chunk)
            dz = dz_buf[:count, : v1 - v0]
            with on_device(h):
                _dlogits_kernel[(cdiv(count, cfg["BLOCK_N"]), cdiv(v1 - v0, cfg["BLOCK_V"]))](
                    h_rows, w, b if b is not None else h, tgt_rows, lse[rows], g[rows], *ent_rows, dzy[rows], dz,
                    count, v0, v1, hd, h_rows.stride(0), w.stride(0), dz.stride(0), inv_t, scale, cap, ignore_index,
                    HAS_BIAS=b is not None, WITH_ENT=with_ent, SOFTCAP=lg.cap is not None, DOT_DTYPE=dot_dtype,
                    PRECISION=precision, **cfg,
                )
            if need_dh:
                acc += mm_fp32(dz, w[v0:v1].to(mm_dtype))
            if need_dw:
                dw[v0:v1] += mm_fp32(dz.t(), h_mm)
            if need_db:
                db[v0:v1] += dz.sum(dim=0, dtype=torch.float32)
        if need_dh:
            dh[rows] = acc
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# Chunked PyTorch fallback: same algorithms, [rows x vocab] chunks of at most 32 MB in fp32
# --------------------------------------------------------------------------------------------
def _chunk_logits(h32, w, b, v0, v1, lg):
    """(z, d): fp32 transformed logits of all rows of ``h32`` against vocab rows [v0, v1), and the softcap
    factor of dz/draw (None without a softcap)."""
    raw = h32 @ w[v0:v1].float().t()
    if b is not None:
        raw += b[v0:v1].float()
    return lg.apply(raw)


def _torch_forward(h, w, b, tgt, lg, ignore_index, with_ent, jacobian):
    """Returns (logp, lse, entropy-or-None, E_p[z]-or-None, J-or-None, J's rows-or-None) like ``_triton_forward``,
    with the same statistics (the target column held apart, ``_row_stats``); only live rows are computed."""
    n, hd = h.shape
    v = w.shape[0]
    idx = torch.nonzero(tgt != ignore_index)[:, 0]
    out = [torch.zeros(n, device=h.device, dtype=torch.float32) for _ in range(4 if with_ent else 2)]
    jac = torch.zeros((idx.numel(), hd), device=h.device, dtype=torch.float32) if jacobian else None
    for c0 in range(0, idx.numel(), _TORCH_ROWS_PER_CHUNK):
        rows = idx[c0:c0 + _TORCH_ROWS_PER_CHUNK]
        h32 = h[rows].float()
        y = tgt[rows]
        mx = torch.full((rows.numel(),), float("-inf"), device=h.device)
        sx = torch.zeros_like(mx)
        tx = torch.zeros_like(mx)
        zt = torch.zeros_like(mx)
        acc = torch.zeros((rows.numel(), hd), device=h.device) if jacobian else None
        for v0 in range(0, v, _TORCH_VOCAB_PER_CHUNK):
            v1 = min(v, v0 + _TORCH_VOCAB_PER_CHUNK)
            z, d = _chunk_logits(h32, w, b, v0, v1, lg)
            local = y - v0
            hit = (local >= 0) & (local < v1 - v0)
            at = local.clamp(0, v1 - v0 - 1)[:, None]
            zt += torch.where(hit, z.gather(1, at)[:, 0], 0.0)
            z.scatter_(1, at, torch.where(hit[:, None], float("-inf"), z.gather(1, at)))  # the target column apart
            mx_new = torch.maximum(mx, z.max(dim=1).values)
            shift = torch.where(mx_new == float("-inf"), 0.0, mx_new)
            alpha = torch.exp(mx - shift)
            z -= shift[:, None]
            e = torch.exp(z)  # <= 1, 0 at the target column
            if with_ent:
                moved = torch.where(mx == float("-inf"), 0.0, mx - shift)
                tx = (tx + sx * moved) * alpha + torch.where(e > 0, e * z, 0.0).sum(dim=1)
            sx = sx * alpha + e.sum(dim=1)
            if jacobian:  # sum over v != y of exp(z_v - mx) d_v W_v, rescaled online
                acc = torch.addmm(acc * alpha[:, None], e if d is None else e * d, w[v0:v1].float())
            mx = mx_new
        logp, lse, rest, rx, ent, ez = _row_stats(mx, sx, tx, zt, with_ent)
        for buf, val in zip(out, (logp, lse, ent, ez)):
            buf[rows] = val
        if jacobian:
            d_y = lg.target_factor(zt)
            j = (rest if d_y is None else rest * d_y)[:, None] * w[y].float() - acc * rx[:, None]
            jac[c0:c0 + rows.numel()] = j * lg.grad_scale
    return tuple(out) + (None,) * (4 - len(out)) + (jac, idx if jacobian else None)


def _torch_backward(h, w, b, tgt, lse, dzy, g, g_ent, ez, lg, ignore_index, need_dh, need_dw, need_db):
    """Path 3: fp32 (d_hidden, d_weight, d_bias), each None unless needed; recomputes the logits of the rows
    whose target is not ignored, chunk by chunk (the target column is ``dzy``, as in ``_dlogits_kernel``)."""
    n, hd = h.shape
    v = w.shape[0]
    idx = torch.nonzero(tgt != ignore_index)[:, 0]
    dh = torch.zeros((n, hd), device=h.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros((v, hd), device=h.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((v,), device=h.device, dtype=torch.float32) if need_db else None
    for v0 in range(0, v, _TORCH_VOCAB_PER_CHUNK):
        v1 = min(v, v0 + _TORCH_VOCAB_PER_CHUNK)
        w32 = w[v0:v1].float()
        for r0 in range(0, idx.numel(), _TORCH_ROWS_PER_CHUNK):
            rows = idx[r0:r0 + _TORCH_ROWS_PER_CHUNK]
            h32 = h[rows].float()
            z, d = _chunk_logits(h32, w, b, v0, v1, lg)
            p = torch.exp(z - lse[rows, None])
            g_rows = g[rows]
            dz = p.mul_(-g_rows[:, None]) if g_ent is None else (
                -g_rows[:, None] * p - g_ent[rows, None] * p * (z - ez[rows, None]))
            local = tgt[rows] - v0
            hit = torch.nonzero((local >= 0) & (local < v1 - v0))[:, 0]
            dz[hit, local[hit]] = dzy[rows[hit]]
            dz.mul_(lg.grad_scale)
            if d is not None:
                dz.mul_(d)
            if need_dh:
                dh.index_add_(0, rows, dz @ w32)
            if need_dw:
                dw[v0:v1] += dz.t() @ h32
            if need_db:
                db[v0:v1] += dz.sum(dim=0)
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# autograd: an autograd.Function in eager mode (transparent to dispatch modes such as FlopCounterMode),
# the same forward and backward as torch.library ops under torch.compile (opaque to tracing: the chunk loops,
# the compaction and the kernel launches stay out of the graph)
# --------------------------------------------------------------------------------------------
PATHS = ("forward", "jacobian", "recompute")


def _no_autocast(device: torch.device):
    """The kernels and the fallback choose their own precision: an enclosing autocast region (forward or backward)
    must not turn their fp32 products into half ones."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(h, w, b, tgt, lg, ignore_index, with_ent, impl, path):
    """(logp, ent, stats, jac, jac_rows): ent is empty without entropy; ``stats`` fp32 [2, N] = (lse, 1 - p_y), with
    entropy [4, N] = (lse, 1 - p_y, E_p[z], p_y (z_y - E_p[z])): what path 3's backward reads per row, the target
    column's terms from the forward's precise statistics (``_dlogits_kernel``); path 2's J [L, H] fp32 of the L
    live rows and their indices [L] (both empty on other paths)."""
    forward_fn = _triton_forward if impl == "triton" else _torch_forward
    with _no_autocast(h.device):
        logp, lse, ent, ez, jac, jac_rows = forward_fn(h, w, b, tgt, lg, ignore_index, with_ent, path == "jacobian")
        stats = [lse, -torch.expm1(logp)]
        if with_ent:  # (the entropy is 0 at ignored rows)
            stats += [ez, torch.exp(logp) * (logp + ent)]  # z_y - E_p[z] = log p_y + entropy
        else:
            ent = logp.new_empty(0)
        stats = torch.stack(stats)
    if jac is None:
        jac, jac_rows = h.new_empty((0, h.shape[1]), dtype=torch.float32), tgt.new_empty(0)
    return logp, ent, stats, jac, jac_rows


def _target_dlogit(stats, g, g_ent):
    """d(loss)/dz_y per row [N] fp32 for upstream gradients g (log-prob) and g_ent (entropy, or None):
    g (1 - p_y) - g_ent p_y (z_y - E_p[z]), from ``_forward``'s precise statistics."""
    if g_ent is None:
        return g * stats[1]
    return g * stats[1] - g_ent * stats[3]


def _backward_recompute(h, w, b, tgt, stats, g_logp, g_ent, lg, ignore_index, impl, need_dh, need_dw, need_db):
    """Path 3's gradients (dh, dw, db) in the inputs' dtypes, each None unless needed; ``stats`` as ``_forward``
    returns it."""
    lse, ez = stats[0], (stats[2] if g_ent is not None else None)
    g = g_logp.float().contiguous() if g_logp is not None else torch.zeros_like(lse)
    g_ent = g_ent.float().contiguous() if g_ent is not None else None
    backward_fn = _triton_backward if impl == "triton" else _torch_backward
    with _no_autocast(h.device):
        dh, dw, db = backward_fn(h, w, b, tgt, lse, _target_dlogit(stats, g, g_ent), g, g_ent, ez, lg, ignore_index,
                                 need_dh, need_dw, need_db and b is not None)
    return (dh.to(h.dtype) if dh is not None else None, dw.to(w.dtype) if dw is not None else None,
            db.to(b.dtype) if db is not None else None)


def _jacobian_grad(jac, jac_rows, tgt, g_logp, ignore_index, n: int, h_dtype):
    """Path 2's d_hidden [N, H] = g J on the live rows (0 at ignored rows and without an upstream gradient)."""
    dh = torch.zeros((n, jac.shape[1]), device=jac.device, dtype=h_dtype)
    if g_logp is not None:
        g = torch.where(tgt != ignore_index, g_logp.float(), 0.0)[jac_rows]
        dh[jac_rows] = (g[:, None] * jac).to(h_dtype)
    return dh


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, tgt, lg, ignore_index, with_ent, entropy_grad, impl, path, weight_context):
        """``path``: "forward" (no gradient will be asked), "jacobian" or "recompute" (module docstring)."""
        logp, ent, stats, jac, jac_rows = _forward(h, w, b, tgt, lg, ignore_index, with_ent, impl, path)
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        if path == "jacobian":
            ctx.save_for_backward(jac, jac_rows, tgt)
        elif path == "recompute":
            ctx.save_for_backward(h, w, b, tgt, stats)
        ctx.lg, ctx.ignore_index, ctx.impl, ctx.entropy_grad, ctx.path = lg, ignore_index, impl, entropy_grad, path
        ctx.h_dtype, ctx.n, ctx.weight_context = h.dtype, h.shape[0], weight_context
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]  # path "forward" never gets here: no grad asked
        none = (None,) * 8
        if ctx.path == "jacobian":
            jac, jac_rows, tgt = ctx.saved_tensors
            return (_jacobian_grad(jac, jac_rows, tgt, g_logp, ctx.ignore_index, ctx.n, ctx.h_dtype), None,
                    None) + none
        h, w, b, tgt, stats = ctx.saved_tensors
        with ctx.weight_context() if ctx.weight_context is not None else contextlib.nullcontext():
            grads = _backward_recompute(h, w, b, tgt, stats, g_logp, g_ent if ctx.entropy_grad else None, ctx.lg,
                                        ctx.ignore_index, ctx.impl, need_dh, need_dw, need_db)
        return grads + none


@torch.library.custom_op("saga_kernels::linear_logprobs_forward", mutates_args=())
def _forward_op(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tgt: torch.Tensor, scale: float,
                cap: float | None, inv_temp: float, ignore_index: int, with_ent: bool, impl: str,
                path: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp, ent, stats, jac, jac_rows) of ``_forward``, as an op torch.compile does not trace into."""
    return _forward(h, w, b, tgt, LogitTransform(scale, cap, inv_temp), ignore_index, with_ent, impl, path)


@_forward_op.register_fake
def _(h, w, b, tgt, scale, cap, inv_temp, ignore_index, with_ent, impl, path):
    n, hd = h.shape
    vec = h.new_empty(n, dtype=torch.float32)
    stat = h.new_empty(n if with_ent else 0, dtype=torch.float32)
    live = torch.library.get_ctx().new_dynamic_size() if path == "jacobian" else 0  # the live rows: data-dependent
    stats = h.new_empty((4 if with_ent else 2, n), dtype=torch.float32)
    return (vec, stat, stats, h.new_empty((live, hd), dtype=torch.float32), tgt.new_empty(live, dtype=torch.int64))


@torch.library.custom_op("saga_kernels::linear_logprobs_backward", mutates_args=())
def _backward_op(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tgt: torch.Tensor, stats: torch.Tensor,
                 g_logp: torch.Tensor, g_ent: torch.Tensor | None, scale: float, cap: float | None,
                 inv_temp: float, ignore_index: int, impl: str, need_dh: bool, need_dw: bool,
                 need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Path 3's (dh, dw, db) as an op; a gradient not needed is an empty tensor."""
    grads = _backward_recompute(h, w, b, tgt, stats, g_logp, g_ent, LogitTransform(scale, cap, inv_temp),
                                ignore_index, impl, need_dh, need_dw, need_db)
    return tuple(g if g is not None else h.new_empty(0) for g in grads)


@_backward_op.register_fake
def _(h, w, b, tgt, stats, g_logp, g_ent, scale, cap, inv_temp, ignore_index, impl, need_dh, need_dw, need_db):
    return (torch.empty_like(h) if need_dh else h.new_empty(0), torch.empty_like(w) if need_dw else h.new_empty(0),
            torch.empty_like(b) if need_db and b is not None else h.new_empty(0))


@torch.library.custom_op("saga_kernels::linear_logprobs_jacobian_grad", mutates_args=())
def _jacobian_grad_op(jac: torch.Tensor, jac_rows: torch.Tensor, tgt: torch.Tensor, g_logp: torch.Tensor | None,
                      ignore_index: int, n: int, h_dtype: torch.dtype) -> torch.Tensor:
    """Path 2's d_hidden (``_jacobian_grad``) as an op: inductor's own code for its data-dependent index_put wrote
    garbage into some columns when it vectorizes for AVX2 or none (``ATEN_CPU_CAPABILITY=avx2`` / ``default``,
    torch 2.13; tests/test_kernel_compile.py)."""
    return _jacobian_grad(jac, jac_rows, tgt, g_logp, ignore_index, n, h_dtype)


@_jacobian_grad_op.register_fake
def _(jac, jac_rows, tgt, g_logp, ignore_index, n, h_dtype):
    return jac.new_empty((n, jac.shape[1]), dtype=h_dtype)


def _setup_op_context(ctx, inputs, output):
    h, w, b, tgt, scale, cap, inv_temp, ignore_index, with_ent, impl, path = inputs
    _, _, stats, jac, jac_rows = output
    if path == "jacobian":
        ctx.save_for_backward(jac, jac_rows, tgt)
    elif path == "recompute":
        ctx.save_for_backward(h, w, b, tgt, stats)
    ctx.transform, ctx.ignore_index, ctx.with_ent, ctx.impl, ctx.path = (scale, cap, inv_temp), ignore_index, \
        with_ent, impl, path
    ctx.h_dtype, ctx.n = h.dtype, h.shape[0]


def _op_backward(ctx, g_logp, g_ent, *_):
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    none = (None,) * 8
    if ctx.path == "jacobian":
        jac, jac_rows, tgt = ctx.saved_tensors
        return (_jacobian_grad_op(jac, jac_rows, tgt, g_logp, ctx.ignore_index, ctx.n, ctx.h_dtype), None,
                None) + none
    h, w, b, tgt, stats = ctx.saved_tensors
    g_logp = g_logp if g_logp is not None else torch.zeros_like(stats[0])
    dh, dw, db = _backward_op(h, w, b, tgt, stats, g_logp, g_ent if ctx.with_ent else None, *ctx.transform,
                              ctx.ignore_index, ctx.impl, need_dh, need_dw, need_db and b is not None)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db and b is not None else None) + none


_forward_op.register_autograd(_op_backward, setup_context=_setup_op_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
ENTROPY_MODES = (False, True, "detached")


def _check_inputs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, logit_scale, softcap,
                  weight_context):
    check_tensor("hidden", hidden, dtypes=_HALF_OR_FLOAT)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, ndim=2, shape=(None, hidden.shape[-1]), dtypes=_HALF_OR_FLOAT)
    check_tensor("targets", targets, dtypes=_INT_DTYPES, shape=tuple(hidden.shape[:-1]))
    if bias is not None:
        check_tensor("bias", bias, dtypes=_HALF_OR_FLOAT, shape=(weight.shape[0],))
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_number("temperature", temperature, minimum=0, strict=True)
    check_number("logit_scale", logit_scale)
    if softcap is not None:
        check_number("softcap", softcap, minimum=0, strict=True)
    if weight_context is not None and not callable(weight_context):
        raise TypeError(f"weight_context must be None or a callable returning a context manager, got "
                        f"{type(weight_context).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < weight.shape[0]:
        raise ValueError(f"ignore_index must lie outside [0, V={weight.shape[0]}), got {ignore_index}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape [0, H]")
    if not any(return_entropy is mode or (isinstance(mode, str) and return_entropy == mode)
               for mode in ENTROPY_MODES):
        raise ValueError(f"return_entropy must be False, True or 'detached', got {return_entropy!r}")
    check_index_range("targets", targets, weight.shape[0], ignore_index=ignore_index)
    check_finite_rows("hidden", hidden, targets != ignore_index)  # ignored rows may hold anything
    check_finite_rows("weight", weight)
    if bias is not None:
        check_finite_rows("bias", bias[:, None])


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, logit_scale=1.0, softcap=None, weight_context=None, impl=None):
    """Per-token log pi(target) under softmax(z), z = logit_scale * (hidden @ weight.T + bias) / temperature
    (with ``softcap`` C: z = C * tanh(logit_scale * (hidden @ weight.T + bias) / C) / temperature).

    hidden ``[..., H]`` and weight ``[V, H]`` in fp32 / fp16 / bf16 (they may differ: the matmuls run in the
    hidden states' dtype, each weight tile cast on the fly as autocast would, never a V x H copy), bias ``[V]``
    or None, targets ``[...]`` int64/int32 in [0, V) or ``ignore_index``. Returns fp32 log-probs ``[...]`` (0
    at ignored tokens) and, with ``return_entropy``, also the fp32 entropy ``[...]`` of softmax(z) (0 at
    ignored tokens): ``True`` differentiable (dH/dz_v = -p_v (z_v - E_p[z])), ``"detached"`` a value without
    gradient, from the forward's streaming statistics (no extra matmul, and the cheapest path stays open: use
    it whenever the entropy is only read, e.g. for metrics or an entropy mask).

    Gradients flow to hidden, and to weight/bias only when they require grad; an empty batch (no rows)
    still gives zero gradients of the right shape. Ignored targets cost nothing on every path. No [N, V]
    buffer is allocated; see the module docstring for the three paths (2NHV forward only, 4NHV frozen head,
    6NHV differentiable entropy / 8NHV trained head) and their memory. ``logit_scale`` / ``softcap``: a
    model's logit multiplier and final-logit softcap (transformers' config fields, e.g. Granite, Gemma 2).
    ``weight_context``: a zero-argument callable returning a context manager entered around the backward's
    reads of weight and bias (e.g. DeepSpeed ZeRO-3's gather), eager mode only. ``impl``: "triton" |
    "torch" | None (see saga_kernels._dispatch). Works under ``torch.compile(fullgraph=True)`` (the kernels
    are registered as torch.library ops).

    Raises TypeError / ValueError naming the argument for wrong dtypes, shapes, devices, temperature,
    logit_scale, softcap, return_entropy, weight_context, ignore_index, and (value checks: see
    ``saga_kernels.input_checks``) for targets outside [0, V) and non-finite values in the hidden states of the
    rows that are used, the weight or the bias.
    """
    _check_inputs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, logit_scale, softcap,
                  weight_context)
    chosen = resolve_impl(impl, hidden, weight, targets, bias)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.shape[1] > 0 and h.stride(1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    tgt = targets.reshape(-1).to(torch.int64).contiguous()
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_head = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    with_ent = return_entropy is not False
    entropy_grad = return_entropy is True
    if not (need_dh or need_head):
        path = "forward"
    elif need_dh and not need_head and not entropy_grad:
        path = "jacobian"
    else:
        path = "recompute"
    lg = LogitTransform(float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature))
    if torch.compiler.is_compiling():
        if weight_context is not None:
            raise ValueError("weight_context is not supported under torch.compile (it is entered in eager backward)")
        logp, ent, *_ = _forward_op(h, w, b, tgt, *lg, ignore_index, with_ent, chosen, path)
        if not entropy_grad:
            ent = ent.detach()
    else:
        logp, ent = _LinearLogprobs.apply(h, w, b, tgt, lg, ignore_index, with_ent, entropy_grad, chosen, path,
                                          weight_context)
    if with_ent:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)
