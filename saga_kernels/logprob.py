"""Fused linear -> per-token log-probs (and entropy) without materializing the [N, V] logits.

Math. For one row h (a hidden state), LM head W [V, H] (+ bias b), temperature T and target y:

    z = (W h + b) / T,   lse = log sum_v exp(z_v),   p = softmax(z)
    logprob = z_y - lse,   entropy = lse - E_p[z]

Gradients, for upstream g (log-prob) and g_H (entropy):

    d logprob / d h = J = (W_y - sum_v p_v W_v) / T = ((1 - p_y) W_y - sum_{v != y} p_v W_v) / T
    dlogits_v = g (1[v = y] - p_v) - g_H p_v (z_v - E_p[z])
    d_hidden = dlogits @ W / T,   d_weight = dlogits^T h / T,   d_bias = sum_rows dlogits / T

Three paths, chosen per call from what needs a gradient (flops for N rows; the matmul floor):

1. forward only (nothing needs a gradient, e.g. old/ref log-probs under no_grad): one pass over
   vocab tiles with an online log-sum-exp. 2NHV.
2. Jacobian (hidden needs a gradient, the head and bias are frozen, no entropy): the forward also
   forms J per row, by an online-rescaled accumulation of P_tile @ W_tile next to the online
   log-sum-exp. The target column is left out of that sum and 1 - p_y = sum_{v != y} p_v is summed
   directly (rather than -expm1(logprob): lse = m + log(sum) has already lost the tiny part when
   p_y -> 1), so J keeps its relative precision there; for the same reason logprob = log1p(-(1 - p_y))
   once p_y > 1/2. The backward is d_hidden = g J: O(NH), no recompute. 4NHV in all.
3. recompute (entropy requested, or the head / bias trains): the forward keeps (lse, E_p[z]); the
   backward recomputes logit tiles and forms dlogits chunk by chunk. 6NHV (8NHV with a trained head).

Memory (beyond inputs and outputs): path 1 keeps a few fp32 numbers per row and vocab split. Path 2
saves J ([N, H] in the hidden dtype: the size of the hidden states, instead of the hidden states
themselves) and works on one row chunk at a time (``_JAC_ROWS`` rows): an fp32 [rows, H] accumulator
and the probability tile of one vocab segment ([rows, ``_JAC_SEGMENT``] in the hidden dtype), about
50 MiB at H = 4096. Path 3 writes dlogits for at most ``_DZ_CHUNK_BYTES`` at a time.

Rows whose target is ``ignore_index`` get log-prob 0, entropy 0 and an exactly zero gradient. In paths
1 and 2 they are compacted out before any matmul: a stable sort puts the active rows first, kernels read
rows through that order and programs past the active count (a device scalar) exit at once, so no host
sync is needed; results are scattered back. Path 3 computes every row and masks the ignored ones.

Triton kernels (sm_90 tiles: 128 rows x 128 vocab x 64 hidden, 8 warps, fp32 accumulation; half inputs
on the tensor cores as they are, fp32 per ``_tl_utils.dot_config``):
- ``_stats_kernel``: one program per (row block, vocab split); programs of consecutive ids share a
  row block and differ in the split, so the resident programs (about 8 row blocks x 16 splits) keep
  their hidden rows and the W tiles they share in L2 at any N. 16 splits (32 for small N).
- ``_expect_kernel`` (path 2): per vocab segment, E[rows, H-block] = E * alpha + P @ W[segment] where
  P = the stats kernel's stored tile probabilities rescaled to the segment's running maximum.
- ``_dlogits_kernel`` (path 3): one dlogits tile per program; cuBLAS turns the chunk into gradients.
``SAGA_AUTOTUNE=1`` autotunes the two forward kernels on CUDA (key: H, V); else one fixed config.
The torch fallback runs the same algorithms on [rows x vocab] chunks of fp32 logits (<= 32 MiB each).
"""
from __future__ import annotations

import math
import os

import torch

from ._checks import check_index_range, check_same_device, check_tensor
from ._dispatch import resolve_impl
from ._tl_utils import cdiv, dot_config, mm_fp32, on_device, tile_dot
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

# Path 2 on/off (the benchmark measures path 3 for a frozen head side by side by switching it off).
JACOBIAN_PATH = True


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, order_ptr, n_active_ptr,
                  m_ptr, s_ptr, t_ptr, zt_ptr, sx_ptr, p_ptr, mt_ptr,
                  row0, R, v_begin, v_end, vocab_per_split, H, V, stride_h, stride_w, stride_p, stride_mt, inv_temp,
                  SPLITS: tl.constexpr, FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                  WRITE_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online log-sum-exp state of one row block over one vocab split of [v_begin, v_end).

    Rows are compacted: local row l is row ``order[row0 + l]`` of h; rows past the active count are
    skipped. State [SPLITS, R] (m = running max, s = sum exp(z - m), t = sum exp(z - m) z when
    WITH_ENT, zt = target logit if in this split, sx = sum over v != y of exp(z - m)) is initialized
    (FIRST) or continued from memory.
    WRITE_P: also stores each tile's exp(z - m_running) into p[l, v - v_begin] and the running max it
    is relative to into mt[l, (v - v_begin) // BLOCK_V] (path 2's probabilities, rescaled later).
    """
    pid = tl.program_id(0).to(tl.int64)
    rb = pid // SPLITS
    split = pid % SPLITS
    n_active = tl.load(n_active_ptr)
    if row0 + rb * BLOCK_N >= n_active:
        return
    inv_t = tl.cast(inv_temp, tl.float32)
    local = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (local < R) & (row0 + local < n_active)
    rows = tl.load(order_ptr + row0 + local, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    state = split * R + local
    if FIRST:
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        m = tl.load(m_ptr + state, mask=row_ok, other=float("-inf"))
        s = tl.load(s_ptr + state, mask=row_ok, other=0.0)
        t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if WITH_ENT:
            t = tl.load(t_ptr + state, mask=row_ok, other=0.0)
        zt = tl.load(zt_ptr + state, mask=row_ok, other=0.0)
        sx = tl.load(sx_ptr + state, mask=row_ok, other=0.0)
    v_start = v_begin + split * vocab_per_split
    v_stop = tl.minimum(v_start + vocab_per_split, v_end)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_stop
        z = tile_dot(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], z * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
        e = tl.exp(z - m_new[:, None])
        alpha = tl.exp(m - m_new)
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENT:
            t = t * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
        is_tgt = cols[None, :] == tgt[:, None]
        zt += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
        sx = sx * alpha + tl.sum(tl.where(is_tgt, 0.0, e), axis=1)
        if WRITE_P:
            tl.store(p_ptr + local[:, None] * stride_p + (cols - v_begin)[None, :], e.to(p_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
            tl.store(mt_ptr + local * stride_mt + (v0 - v_begin) // BLOCK_V, m_new, mask=row_ok)
        m = m_new
    tl.store(m_ptr + state, m, mask=row_ok)
    tl.store(s_ptr + state, s, mask=row_ok)
    tl.store(zt_ptr + state, zt, mask=row_ok)
    tl.store(sx_ptr + state, sx, mask=row_ok)
    if WITH_ENT:
        tl.store(t_ptr + state, t, mask=row_ok)


@triton.jit
def _expect_kernel(p_ptr, mt_ptr, w_ptr, tgt_ptr, order_ptr, n_active_ptr, m_ptr, mprev_ptr, e_ptr,
                   row0, R, v_begin, v_end, H, stride_p, stride_mt, stride_w, stride_e,
                   FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HO: tl.constexpr,
                   BLOCK_K: tl.constexpr, TILE_V: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """E[l, hcols] = E[l, hcols] * exp(M_prev - M) + sum_{v in segment, v != y} exp(z_v - M) W[v, hcols].

    M = ``m[l]``, the maximum logit of row l over every vocab column seen so far (this segment
    included), M_prev = ``mprev[l]`` the same before this segment (unused when FIRST). The stats
    kernel's tile probabilities p (relative to mt) are rescaled by exp(mt - M). One program per
    (row block, H block); H blocks vary fastest so resident programs share their probability rows in L2.
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
    rows = tl.load(order_ptr + row0 + local, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m_ref = tl.load(m_ptr + local, mask=row_ok, other=0.0)
    hcols = hb * BLOCK_HO + tl.arange(0, BLOCK_HO).to(tl.int64)
    h_ok = hcols < H
    acc = tl.zeros((BLOCK_M, BLOCK_HO), dtype=tl.float32)
    for k0 in range(v_begin, v_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < v_end
        mt = tl.load(mt_ptr + local * stride_mt + (k0 - v_begin) // TILE_V, mask=row_ok, other=0.0)
        scale = tl.where(row_ok, tl.exp(mt - m_ref), 0.0)
        p = tl.load(p_ptr + local[:, None] * stride_p + (cols - v_begin)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        p = tl.where(cols[None, :] == tgt[:, None], 0.0, p * scale[:, None])
        w = tl.load(w_ptr + cols[:, None] * stride_w + hcols[None, :], mask=col_ok[:, None] & h_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out = e_ptr + local[:, None] * stride_e + hcols[None, :]
    ok = row_ok[:, None] & h_ok[None, :]
    if not FIRST:
        m_prev = tl.load(mprev_ptr + local, mask=row_ok, other=0.0)
        acc += tl.load(out, mask=ok, other=0.0) * tl.exp(m_prev - m_ref)[:, None]
    tl.store(out, acc, mask=ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, ge_ptr, ez_ptr, dz_ptr,
                    N, v_start, v_stop, H, stride_h, stride_w, stride_dz, inv_temp, ignore_index,
                    HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dz[rows, cols - v_start] = d(loss)/d(raw logits) for vocab columns [v_start, v_stop): one
    [BLOCK_N, BLOCK_V] tile per program, logits recomputed from h and W; 0 at ignored rows."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    inv_t = tl.cast(inv_temp, tl.float32)
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
    z = z * inv_t
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if WITH_ENT:
        g_ent = tl.load(ge_ptr + rows, mask=active, other=0.0)
        ez = tl.load(ez_ptr + rows, mask=active, other=0.0)
        dz -= g_ent[:, None] * p * (z - ez[:, None])
    dz = tl.where(active[:, None] & col_ok[None, :], dz * inv_t, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + (cols - v_start)[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launch configurations (one place, so the sm_90 compile test builds exactly what is launched)
# --------------------------------------------------------------------------------------------
# The tiles below are the largest whose sm_90 compile (tests/test_logprob.py::test_kernels_compile_for_sm90)
# shows wgmma and no spills: half inputs 128 x 128 x 64 with 8 warps and 3 stages; fp32 inputs run three
# TF32 products per dot (tf32x3) and hold hi/lo operand halves, so their tiles are halved along one side.
# In the interpreter 64-row blocks (same code, fewer numpy ops per program).
def stats_config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tiles of ``_stats_kernel`` (rows x vocab x hidden per dot step)."""
    if device.type != "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    if dtype == torch.float32:
        return dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


def expect_config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tiles of ``_expect_kernel`` (rows x hidden columns x vocab per dot step); BLOCK_K divides the stats
    kernel's BLOCK_V, so one K step lies inside one stored probability tile."""
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_HO=64, BLOCK_K=64)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_HO=64, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_HO=128, BLOCK_K=64, num_warps=8, num_stages=3)


def dlogits_config(device: torch.device, dtype: torch.dtype) -> dict:
    """Tiles of ``_dlogits_kernel`` (rows x vocab x hidden per dot step)."""
    if device.type != "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


# opt-in (SAGA_AUTOTUNE=1, CUDA, half inputs). BLOCK_V / TILE_V stay fixed (buffer layouts); the space
# holds only the tilings whose sm_90 compile does not spill (128-row tiles need 8 warps; 128 x 256
# accumulators spill at any warp count): tests/test_logprob.py::test_autotune_space_compiles_for_sm90.
_AUTOTUNE_SPACE = {
    "stats": [dict(BLOCK_N=bn, BLOCK_V=128, BLOCK_H=bh, num_warps=w, num_stages=st)
              for bn, w in ((64, 4), (64, 8), (128, 8)) for bh in (32, 64) for st in (3, 4)],
    "expect": [dict(BLOCK_M=bm, BLOCK_HO=bh, BLOCK_K=64, num_warps=w, num_stages=st)
               for bm, bh, w in ((64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8)) for st in (3, 4)],
}
_autotuned: dict = {}


def _autotune_on(h: torch.Tensor) -> bool:
    return h.device.type == "cuda" and h.dtype != torch.float32 and os.environ.get("SAGA_AUTOTUNE", "0") == "1"


def _tuned(name: str, kernel):
    """``kernel`` wrapped in triton.autotune over ``_AUTOTUNE_SPACE[name]``, keyed on (H, V)."""
    if name not in _autotuned:
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in _AUTOTUNE_SPACE[name]]
        # benchmarking reruns a launch: restore what a launch accumulates into (the split state, E)
        key, restore = (["H", "V"], ["m_ptr", "s_ptr", "t_ptr", "zt_ptr", "sx_ptr"]) if name == "stats" else (
            ["H", "v_end"], ["e_ptr"])
        _autotuned[name] = triton.autotune(configs=configs, key=key, restore_value=restore)(kernel)
    return _autotuned[name]


def _num_splits(row_blocks: int, vocab_tiles: int) -> int:
    return max(1, min(vocab_tiles, _SPLITS if row_blocks >= _SMALL_N_BLOCKS else _SPLITS_SMALL_N))


# --------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------
def _compact(tgt, ignore_index):
    """(order, n_active): a stable order putting rows with target != ignore_index first, and their
    count as a device int64 scalar. No host sync."""
    ignored = tgt == ignore_index
    order = torch.sort(ignored.to(torch.uint8), stable=True).indices
    return order, (~ignored).sum().reshape(1)


def _launch_stats(h, w, b, tgt, order, n_active, state, p, mt, row0, rows, v_begin, v_end, inv_temp, *,
                  first, with_ent, splits, cfg):
    """One launch of ``_stats_kernel`` over compacted rows [row0, row0 + rows) and vocab [v_begin, v_end)."""
    m, s, t, zt, sx = state
    block_v = cfg["BLOCK_V"]
    per_split = cdiv(cdiv(v_end - v_begin, block_v), splits) * block_v
    dot_dtype, precision = dot_config(h.dtype, h.device)
    args = (h, w, b if b is not None else h, tgt, order, n_active, m, s, t, zt, sx,
            p if p is not None else h, mt if mt is not None else m,
            row0, rows, v_begin, v_end, per_split, h.shape[1], w.shape[0], h.stride(0), w.stride(0),
            p.stride(0) if p is not None else 0, mt.stride(0) if mt is not None else 0, inv_temp)
    meta = dict(SPLITS=splits, FIRST=first, HAS_BIAS=b is not None, WITH_ENT=with_ent, WRITE_P=p is not None,
                DOT_DTYPE=dot_dtype, PRECISION=precision)
    with on_device(h):
        if _autotune_on(h):
            _tuned("stats", _stats_kernel)[lambda c: (cdiv(rows, c["BLOCK_N"]) * splits,)](*args, **meta)
        else:
            _stats_kernel[(cdiv(rows, cfg["BLOCK_N"]) * splits,)](*args, **meta, **cfg)


def _combine(state):
    """(lse, zt, ez, rest, total) per row from the split states [5, SPLITS, R]: the log-sum-exp, the
    target logit, E_p[z], rest = 1 - p_y = sum_{v != y} p_v (summed directly: no cancellation as
    p_y -> 1) and total = sum exp(z - M) for M = the maximum logit."""
    m, s, t, zt, sx = state
    m_all = m.max(dim=0).values
    scale = torch.exp(m - m_all)
    total = (s * scale).sum(dim=0)
    return m_all + torch.log(total), zt.sum(dim=0), (t * scale).sum(dim=0) / total, (sx * scale).sum(dim=0) / total, total


def logprob_from_stats(zt, lse, rest):
    """log p_y: z_y - lse, or log1p(-rest) once p_y > 1/2 (there z_y - lse cancels, log1p does not)."""
    return torch.where(rest < 0.5, torch.log1p(-rest.clamp(max=0.5)), zt - lse)


def _triton_forward(h, w, b, tgt, inv_temp, ignore_index, with_ent, jacobian):
    """Returns (logp, lse, ez-or-None, J-or-None) in original row order; logp/lse/ez fp32 [N] (0 at
    ignored rows), J [N, H] in h's dtype (path 2, zeros at ignored rows)."""
    n, hd = h.shape
    v = w.shape[0]
    if n == 0:
        empty = torch.zeros(0, device=h.device, dtype=torch.float32)
        return empty, empty, (empty if with_ent else None), (torch.zeros_like(h) if jacobian else None)
    order, n_active = _compact(tgt, ignore_index)
    scfg = stats_config(h.device, h.dtype)
    if not jacobian:
        splits = _num_splits(cdiv(n, scfg["BLOCK_N"]), cdiv(v, scfg["BLOCK_V"]))
        state = torch.empty((5, splits, n), device=h.device, dtype=torch.float32)
        _launch_stats(h, w, b, tgt, order, n_active, state, None, None, 0, n, 0, v, inv_temp,
                      first=True, with_ent=with_ent, splits=splits, cfg=scfg)
        lse_c, zt, ez, rest, _ = _combine(state)
        logp_c, ez_c, jac = logprob_from_stats(zt, lse_c, rest), (ez if with_ent else None), None
    else:
        lse_c, logp_c = (torch.empty(n, device=h.device, dtype=torch.float32) for _ in range(2))
        ez_c = None
        jac = torch.zeros((n, hd), device=h.device, dtype=h.dtype)
        ecfg = expect_config(h.device, h.dtype)
        rows_per_chunk = min(n, _JAC_ROWS)
        segment = min(v, _JAC_SEGMENT)
        splits = _num_splits(cdiv(rows_per_chunk, scfg["BLOCK_N"]), cdiv(segment, scfg["BLOCK_V"]))
        p = torch.empty((rows_per_chunk, segment), device=h.device, dtype=h.dtype)
        mt = torch.empty((rows_per_chunk, cdiv(segment, scfg["BLOCK_V"])), device=h.device, dtype=torch.float32)
        acc = torch.empty((rows_per_chunk, hd), device=h.device, dtype=torch.float32)
        dot_dtype, precision = dot_config(h.dtype, h.device)
        for r0 in range(0, n, rows_per_chunk):
            rows = min(rows_per_chunk, n - r0)
            state = torch.empty((5, splits, rows), device=h.device, dtype=torch.float32)
            m_prev = None
            for v0 in range(0, v, segment):
                v1 = min(v, v0 + segment)
                _launch_stats(h, w, b, tgt, order, n_active, state, p, mt, r0, rows, v0, v1, inv_temp,
                              first=m_prev is None, with_ent=False, splits=splits, cfg=scfg)
                m_cur = state[0].max(dim=0).values  # running max over every column so far
                args = (p, mt, w, tgt, order, n_active, m_cur, m_cur if m_prev is None else m_prev, acc,
                        r0, rows, v0, v1, hd, p.stride(0), mt.stride(0), w.stride(0), acc.stride(0))
                meta = dict(FIRST=m_prev is None, TILE_V=scfg["BLOCK_V"], DOT_DTYPE=dot_dtype, PRECISION=precision)
                with on_device(h):
                    if _autotune_on(h):
                        grid = lambda c, rows=rows: (cdiv(rows, c["BLOCK_M"]) * cdiv(hd, c["BLOCK_HO"]),)  # noqa: E731
                        _tuned("expect", _expect_kernel)[grid](*args, **meta)
                    else:
                        grid = (cdiv(rows, ecfg["BLOCK_M"]) * cdiv(hd, ecfg["BLOCK_HO"]),)
                        _expect_kernel[grid](*args, **meta, **ecfg)
                m_prev = m_cur
            lse_rows, zt, _, rest, total = _combine(state)
            lse_c[r0:r0 + rows], logp_c[r0:r0 + rows] = lse_rows, logprob_from_stats(zt, lse_rows, rest)
            _finish_jacobian(jac, w, tgt, order[r0:r0 + rows], n_active, r0, rest, acc[:rows] / total[:, None],
                             inv_temp)
    active_c = torch.arange(n, device=h.device) < n_active
    out = [torch.zeros(n, device=h.device, dtype=torch.float32) for _ in range(3 if with_ent else 2)]
    for buf, val in zip(out, (logp_c, lse_c) + ((ez_c,) if with_ent else ())):
        buf[order] = torch.where(active_c, val, 0.0)
    return out[0], out[1], (out[2] if with_ent else None), jac


def _finish_jacobian(jac, w, tgt, order_rows, n_active, r0, rest, expect_rest, inv_temp):
    """jac[rows] = ((1 - p_y) W_y - sum_{v != y} p_v W_v) / T for the chunk's compacted rows, with
    ``rest`` = 1 - p_y and ``expect_rest`` [rows, H] fp32 = the sum without the target column."""
    ok = (torch.arange(r0, r0 + order_rows.numel(), device=jac.device) < n_active)[:, None]
    y = torch.where(ok[:, 0], tgt[order_rows], 0)
    j = (torch.where(ok, rest[:, None], 0.0) * w[y].float() - torch.where(ok, expect_rest, 0.0))
    jac[order_rows] = torch.where(ok, j * inv_temp, 0.0).to(jac.dtype)


def _triton_backward(h, w, b, tgt, lse, g, g_ent, ez, inv_temp, ignore_index, need_dw, need_db):
    """Path 3. Returns (d_hidden in hidden's dtype, fp32 d_weight or None, fp32 d_bias or None).

    Per (row chunk, vocab chunk) the dlogits kernel writes the chunk (at most _DZ_CHUNK_BYTES, in the
    matmul dtype) and dense matmuls consume it: d_hidden_rows += dz @ W_chunk (an fp32 accumulator
    per row chunk), and only for a trainable head d_weight_chunk += dz.T @ h_rows. No atomics.
    """
    n, hd = h.shape
    v = w.shape[0]
    with_ent = g_ent is not None
    cfg = dlogits_config(h.device, h.dtype)
    dot_dtype, precision = dot_config(h.dtype, h.device)
    mm_dtype = h.dtype if h.device.type == "cuda" else torch.float32  # interpreter: fp32 throughout
    active = tgt != ignore_index
    dh = torch.empty((n, hd), device=h.device, dtype=h.dtype)
    dw = torch.zeros((v, hd), device=h.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((v,), device=h.device, dtype=torch.float32) if need_db else None
    if n == 0:
        return dh, dw, db
    rows_per_chunk = min(n, _TRITON_ROWS_PER_CHUNK)
    elt = torch.finfo(mm_dtype).bits // 8
    vocab_per_chunk = max(cfg["BLOCK_V"], _DZ_CHUNK_BYTES // (rows_per_chunk * elt) // cfg["BLOCK_V"] * cfg["BLOCK_V"])
    dz_buf = torch.empty((rows_per_chunk, min(v, vocab_per_chunk)), device=h.device, dtype=mm_dtype)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        h_rows = h[r0:r1]
        h_mm = torch.where(active[r0:r1, None], h_rows, 0).to(mm_dtype) if need_dw else None  # NaN-proof
        acc = torch.zeros((r1 - r0, hd), device=h.device, dtype=torch.float32)
        for v0 in range(0, v, vocab_per_chunk):
            v1 = min(v, v0 + vocab_per_chunk)
            dz = dz_buf[: r1 - r0, : v1 - v0]
            with on_device(h):
                _dlogits_kernel[(cdiv(r1 - r0, cfg["BLOCK_N"]), cdiv(v1 - v0, cfg["BLOCK_V"]))](
                    h_rows, w, b if b is not None else h, tgt[r0:r1], lse[r0:r1], g[r0:r1],
                    (g_ent if with_ent else g)[r0:r1], (ez if with_ent else lse)[r0:r1], dz,
                    r1 - r0, v0, v1, hd, h.stride(0), w.stride(0), dz.stride(0), inv_temp, ignore_index,
                    HAS_BIAS=b is not None, WITH_ENT=with_ent, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg,
                )
            acc += mm_fp32(dz, w[v0:v1].to(mm_dtype))
            if need_dw:
                dw[v0:v1] += mm_fp32(dz.t(), h_mm)
            if need_db:
                db[v0:v1] += dz.sum(dim=0, dtype=torch.float32)
        dh[r0:r1] = acc
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# Chunked PyTorch fallback: same algorithms, [rows x vocab] chunks of at most 32 MB in fp32
# --------------------------------------------------------------------------------------------
def _chunk_logits(h32, w, b, v0, v1, inv_temp):
    """fp32 logits / T of all rows of ``h32`` against vocab rows [v0, v1)."""
    z = h32 @ w[v0:v1].float().t()
    if b is not None:
        z += b[v0:v1].float()
    return z.mul_(inv_temp)


def _torch_forward(h, w, b, tgt, inv_temp, ignore_index, with_ent, jacobian):
    """Returns (logp, lse, ez-or-None, J-or-None) like ``_triton_forward``; only active rows are computed."""
    n, hd = h.shape
    v = w.shape[0]
    active = tgt != ignore_index
    idx = torch.nonzero(active)[:, 0]
    lse = torch.zeros(n, device=h.device, dtype=torch.float32)
    logp = torch.zeros_like(lse)
    ez = torch.zeros_like(lse) if with_ent else None
    jac = torch.zeros((n, hd), device=h.device, dtype=h.dtype) if jacobian else None
    for c0 in range(0, idx.numel(), _TORCH_ROWS_PER_CHUNK):
        rows = idx[c0:c0 + _TORCH_ROWS_PER_CHUNK]
        h32 = h[rows].float()
        y = tgt[rows]
        m = torch.full((rows.numel(),), float("-inf"), device=h.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m) if with_ent else None
        z_y = torch.zeros_like(m)
        s_rest = torch.zeros_like(m)
        acc = torch.zeros((rows.numel(), hd), device=h.device) if jacobian else None
        for v0 in range(0, v, _TORCH_VOCAB_PER_CHUNK):
            v1 = min(v, v0 + _TORCH_VOCAB_PER_CHUNK)
            z = _chunk_logits(h32, w, b, v0, v1, inv_temp)
            m_new = torch.maximum(m, z.max(dim=1).values)
            alpha = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * alpha + e.sum(dim=1)
            if with_ent:
                t = t * alpha + (e * z).sum(dim=1)
            local = y - v0
            hit = (local >= 0) & (local < v1 - v0)
            at = local.clamp(0, v1 - v0 - 1)[:, None]
            z_y += torch.where(hit, z.gather(1, at)[:, 0], 0.0)
            e.scatter_(1, at, torch.where(hit[:, None], 0.0, e.gather(1, at)))  # the target column left out
            s_rest = s_rest * alpha + e.sum(dim=1)
            if jacobian:  # sum over v != y of exp(z_v - m) W_v, rescaled online
                acc = torch.addmm(acc * alpha[:, None], e, w[v0:v1].float())
            m = m_new
        lse_rows, rest = m + torch.log(s), s_rest / s
        lse[rows], logp[rows] = lse_rows, logprob_from_stats(z_y, lse_rows, rest)
        if with_ent:
            ez[rows] = t / s
        if jacobian:
            j = rest[:, None] * w[y].float() - acc / s[:, None]
            jac[rows] = (j * inv_temp).to(h.dtype)
    return logp, lse, ez, jac


def _torch_backward(h, w, b, tgt, lse, g, g_ent, ez, inv_temp, ignore_index, need_dw, need_db):
    """Path 3: fp32 (d_hidden, d_weight-or-None, d_bias-or-None); recomputes logits chunk by chunk."""
    n, hd = h.shape
    v = w.shape[0]
    active = tgt != ignore_index
    g = torch.where(active, g, 0.0)
    if g_ent is not None:
        g_ent = torch.where(active, g_ent, 0.0)
    dh = torch.zeros((n, hd), device=h.device, dtype=torch.float32)
    dw = torch.zeros((v, hd), device=h.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((v,), device=h.device, dtype=torch.float32) if need_db else None
    for v0 in range(0, v, _TORCH_VOCAB_PER_CHUNK):
        v1 = min(v, v0 + _TORCH_VOCAB_PER_CHUNK)
        w32 = w[v0:v1].float()
        for r0 in range(0, n, _TORCH_ROWS_PER_CHUNK):
            r1 = min(n, r0 + _TORCH_ROWS_PER_CHUNK)
            h32 = torch.where(active[r0:r1, None], h[r0:r1], 0).float()  # NaN-proof for ignored rows
            z = _chunk_logits(h32, w, b, v0, v1, inv_temp)
            p = torch.exp(z - lse[r0:r1, None])
            dz = p.mul_(-g[r0:r1, None]) if g_ent is None else (
                -g[r0:r1, None] * p - g_ent[r0:r1, None] * p * (z - ez[r0:r1, None]))
            local = tgt[r0:r1] - v0
            hit = (local >= 0) & (local < v1 - v0)
            rows = torch.nonzero(hit)[:, 0]
            dz[rows, local[rows]] += g[r0:r1][rows]
            dz = torch.where(active[r0:r1, None], dz, 0.0).mul_(inv_temp)
            dh[r0:r1] += dz @ w32
            if need_dw:
                dw[v0:v1] += dz.t() @ h32
            if need_db:
                db[v0:v1] += dz.sum(dim=0)
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# autograd + public API
# --------------------------------------------------------------------------------------------
class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, tgt, temperature, ignore_index, with_ent, impl, path):
        """``path``: "forward" (no gradient will be asked), "jacobian" or "recompute" (module docstring)."""
        inv_temp = 1.0 / temperature
        forward_fn = _triton_forward if impl == "triton" else _torch_forward
        logp, lse, ez, jac = forward_fn(h, w, b, tgt, inv_temp, ignore_index, with_ent, path == "jacobian")
        ignored = tgt == ignore_index
        ent = torch.where(ignored, 0.0, lse - ez) if with_ent else logp.new_empty(0)
        if not with_ent:
            ctx.mark_non_differentiable(ent)
        if path == "jacobian":
            ctx.save_for_backward(jac, tgt)
        elif path == "recompute":
            ctx.save_for_backward(h, w, b, tgt, lse, ez)
        ctx.inv_temp, ctx.ignore_index, ctx.impl, ctx.with_ent, ctx.path = inv_temp, ignore_index, impl, with_ent, path
        ctx.h_dtype = h.dtype
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]  # path "forward" never gets here: no grad asked
        if ctx.path == "jacobian":
            jac, tgt = ctx.saved_tensors
            if g_logp is None:
                return (torch.zeros_like(jac),) + (None,) * 8
            g = torch.where(tgt != ctx.ignore_index, g_logp.float(), 0.0)
            return ((g[:, None] * jac.float()).to(ctx.h_dtype),) + (None,) * 8
        h, w, b, tgt, lse, ez = ctx.saved_tensors
        g = g_logp.float().contiguous() if g_logp is not None else torch.zeros_like(lse)
        g_ent = g_ent.float().contiguous() if (ctx.with_ent and g_ent is not None) else None
        backward_fn = _triton_backward if ctx.impl == "triton" else _torch_backward
        dh, dw, db = backward_fn(h, w, b, tgt, lse, g, g_ent, ez if g_ent is not None else None,
                                 ctx.inv_temp, ctx.ignore_index, need_dw, need_db and b is not None)
        return (dh.to(h.dtype) if need_dh else None,
                dw.to(w.dtype) if dw is not None else None,
                db.to(b.dtype) if db is not None else None,
                None, None, None, None, None, None)


def _check_inputs(hidden, weight, targets, bias, temperature, ignore_index):
    check_tensor("hidden", hidden, dtypes=_HALF_OR_FLOAT)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, ndim=2, shape=(None, hidden.shape[-1]))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    check_tensor("targets", targets, dtypes=_INT_DTYPES, shape=tuple(hidden.shape[:-1]))
    if bias is not None:
        check_tensor("bias", bias, dtypes=_HALF_OR_FLOAT, shape=(weight.shape[0],))
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < weight.shape[0]:
        raise ValueError(f"ignore_index must lie outside [0, V={weight.shape[0]}), got {ignore_index}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape [0, H]")
    check_index_range("targets", targets, weight.shape[0], ignore_index=ignore_index)


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, impl=None):
    """Per-token log pi(target) under softmax((hidden @ weight.T + bias) / temperature).

    hidden ``[..., H]`` (fp32/fp16/bf16), weight ``[V, H]`` (same dtype), bias ``[V]`` or None,
    targets ``[...]`` int64/int32 in [0, V) or ``ignore_index``. Returns fp32 log-probs ``[...]`` (0 at
    ignored tokens) and, with ``return_entropy=True``, also the fp32 entropy ``[...]`` of the
    tempered softmax (0 at ignored tokens; differentiable: dH/dz_v = -p_v (z_v - E_p[z])).
    Gradients flow to hidden, and to weight/bias only when they require grad; an empty batch (no rows)
    still gives zero gradients of the right shape. No [N, V] buffer is allocated; see the module
    docstring for the three paths (2NHV forward only, 4NHV frozen head, 6NHV / 8NHV recompute) and their
    memory. ``impl``: "triton" | "torch" | None (see saga_kernels._dispatch).

    Raises TypeError / ValueError naming the argument for wrong dtypes, shapes, devices, temperature,
    ignore_index, and for targets outside [0, V) (a value check: see ``saga_kernels.input_checks``).
    """
    _check_inputs(hidden, weight, targets, bias, temperature, ignore_index)
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
    if not (need_dh or need_head):
        path = "forward"
    elif need_dh and not need_head and not return_entropy and JACOBIAN_PATH:
        path = "jacobian"
    else:
        path = "recompute"
    logp, ent = _LinearLogprobs.apply(h, w, b, tgt, float(temperature), ignore_index, return_entropy, chosen, path)
    if return_entropy:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)
