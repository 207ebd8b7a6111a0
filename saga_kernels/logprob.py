"""Fused linear -> per-token log-probs (and entropy) without materializing the [N, V] logits.

With z = (h @ W.T + b) / T for one row h and target y:

    logprob = z[y] - lse(z),                  lse(z) = log sum_v exp(z[v])
    entropy = lse(z) - E_p[z],                 p = softmax(z)

Backward, for upstream gradients g (log-prob) and g_H (entropy), per logit column v:

    dlogits[v] = (g * (1[v == y] - p[v]) - g_H * p[v] * (z[v] - E_p[z])) / T
    d_hidden = dlogits @ W,  d_weight = dlogits.T @ h,  d_bias = sum_rows dlogits

Both paths stream over vocab tiles with an online log-sum-exp and keep only per-row statistics
(lse, E_p[z]) for the backward, which recomputes the logits:
- Triton: the forward kernel tiles (row blocks x vocab splits), each program folding its vocab
  range into (max, sum exp, sum exp * z, target logit) with fp32 tl.dot accumulation; the host
  merges the splits. The backward kernel writes dlogits for one (row chunk, vocab chunk) at a time
  (<= _DZ_CHUNK_BYTES) and dense matmuls turn it into d_hidden (and d_weight / d_bias): no atomics.
- torch fallback: the same math on [rows x vocab] chunks of fp32 logits (<= 32 MB each).
Rows whose target equals ``ignore_index`` get log-prob 0, entropy 0 and an exactly zero gradient.
The weight/bias gradients are formed only when those tensors require grad.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_index_range, check_same_device, check_tensor
from ._dispatch import resolve_impl

_HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)

# Fallback chunking: one [ROWS, VOCAB] fp32 tile is 32 MB; a handful of such temporaries live at once.
_TORCH_ROWS_PER_CHUNK = 1024
_TORCH_VOCAB_PER_CHUNK = 8192

# Triton tiles (one fixed config; all dims >= 16 and powers of two so tl.dot is legal on a GPU).
_BLOCK_N = 64
_BLOCK_V = 128
_BLOCK_H = 64
_TARGET_PROGRAMS = 512  # forward grid aims for about this many (row block, vocab split) programs
# Backward: the dlogits chunk handed to the matmuls is at most this big (64 MiB: < 1% of the eager
# path's peak at N = 8192, V = 151936), for row chunks of at most this many rows.
_DZ_CHUNK_BYTES = 64 * 2**20
_TRITON_ROWS_PER_CHUNK = 2048


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
try:  # the library stays importable without triton; the torch fallback then runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None

if triton is not None:

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, stride_h, stride_w, rows, cols, row_ok, col_ok, H,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        """acc[BLOCK_N, BLOCK_V] = h[rows] @ W[cols].T with fp32 accumulation."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + tl.arange(0, BLOCK_H)
            k_ok = kk < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(DOT_DTYPE)
            b = tl.load(w_ptr + cols[None, :] * stride_w + kk[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0).to(DOT_DTYPE)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr,
                    N, V, H, stride_h, stride_w, inv_temp, vocab_per_split,
                    HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        """Partial online-lse statistics of one row block over one vocab split.

        Writes, per row, the running max m, sum exp(z - m), sum exp(z - m) * z (entropy only) and
        the target logit if it falls in this split; the host combines the splits.
        """
        pid_n = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        inv_t = tl.cast(inv_temp, tl.float32)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        v_start = pid_s * vocab_per_split
        v_end = tl.minimum(v_start + vocab_per_split, V)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            z = _logit_tile(h_ptr, w_ptr, stride_h, stride_w, rows, cols, row_ok, col_ok, H,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.where(col_ok[None, :], z * inv_t, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(e, axis=1)
            if WITH_ENT:
                t = t * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)  # e = 0 off-vocab
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            m = m_new
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)
        if WITH_ENT:
            tl.store(t_ptr + out, t, mask=row_ok)

    @triton.jit
    def _dlogits_tile(h_ptr, w_ptr, b_ptr, stride_h, stride_w, rows, cols, row_ok, col_ok, H,
                      tgt, lse, g, g_ent, ez, active, inv_t,
                      HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        """Recompute one logit tile and return d(loss)/d(raw logits) for it (0 outside/ignored)."""
        z = _logit_tile(h_ptr, w_ptr, stride_h, stride_w, rows, cols, row_ok, col_ok, H,
                        BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = z * inv_t
        p = tl.exp(z - lse[:, None])
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz = g[:, None] * (onehot - p)
        if WITH_ENT:
            dz -= g_ent[:, None] * p * (z - ez[:, None])
        keep = active[:, None] & col_ok[None, :]
        return tl.where(keep, dz * inv_t, 0.0)

    @triton.jit
    def _dlogits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, ge_ptr, ez_ptr, dz_ptr,
                        N, v_start, v_stop, H, stride_h, stride_w, stride_dz, inv_temp, ignore_index,
                        HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        """dz[rows, cols - v_start] = d(loss)/d(raw logits) for vocab columns [v_start, v_stop):
        one [BLOCK_N, BLOCK_V] tile per program, logits recomputed from h and W."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_v = tl.program_id(1).to(tl.int64)
        inv_t = tl.cast(inv_temp, tl.float32)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
        active = row_ok & (tgt != ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        g_ent = g
        ez = lse
        if WITH_ENT:
            g_ent = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
            ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
        dz = _dlogits_tile(h_ptr, w_ptr, b_ptr, stride_h, stride_w, rows, cols, row_ok, col_ok, H,
                           tgt, lse, g, g_ent, ez, active, inv_t, HAS_BIAS, WITH_ENT,
                           BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, PRECISION)
        tl.store(dz_ptr + rows[:, None] * stride_dz + (cols - v_start)[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _dot_config(dtype: torch.dtype, device: torch.device):
    """(tl dtype for tl.dot operands, input_precision). The interpreter computes in fp32 (its bf16
    arithmetic is unreliable); on a GPU half inputs go to the tensor cores as they are (the
    precision flag only concerns fp32 operands) and fp32 inputs use full-precision ("ieee")
    products, matching torch's default fp32 matmul. The dlogits tile is rounded to the input
    dtype before its two matmuls on a GPU, as in an eager bf16 backward."""
    if device.type != "cuda" or dtype == torch.float32:
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), None


def _triton_forward(h, w, b, tgt, inv_temp, with_ent):
    """Returns (lse, zt, ez-or-None), all fp32 [N]."""
    n, hd = h.shape
    v = w.shape[0]
    row_blocks = math.ceil(n / _BLOCK_N)
    v_tiles = math.ceil(v / _BLOCK_V)
    splits = max(1, min(v_tiles, math.ceil(_TARGET_PROGRAMS / row_blocks)))
    vocab_per_split = math.ceil(v_tiles / splits) * _BLOCK_V
    splits = math.ceil(v / vocab_per_split)
    stats = torch.empty((4, splits, n), device=h.device, dtype=torch.float32)
    m, s, t, zt = stats.unbind(0)
    dot_dtype, precision = _dot_config(h.dtype, h.device)
    _fwd_kernel[(row_blocks, splits)](
        h, w, b if b is not None else h, tgt, m, s, t, zt,
        n, v, hd, h.stride(0), w.stride(0), inv_temp, vocab_per_split,
        HAS_BIAS=b is not None, WITH_ENT=with_ent,
        BLOCK_N=_BLOCK_N, BLOCK_V=_BLOCK_V, BLOCK_H=_BLOCK_H, DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    m_all = m.max(dim=0).values
    scale = torch.exp(m - m_all)
    total = (s * scale).sum(dim=0)
    lse = m_all + torch.log(total)
    ez = (t * scale).sum(dim=0) / total if with_ent else None
    return lse, zt.sum(dim=0), ez


def _mm_fp32(a, b):
    """a @ b with an fp32 result: fp32 operands as they are; half operands accumulate in fp32 and
    are rounded once (CUDA's mm with out_dtype when this torch has it, else a cast of the product)."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return (a @ b).float()


def _triton_backward(h, w, b, tgt, lse, g, g_ent, ez, inv_temp, ignore_index, need_dw, need_db):
    """Returns (d_hidden in hidden's dtype, fp32 d_weight or None, fp32 d_bias or None).

    Per (row chunk, vocab chunk) a Triton kernel writes the dlogits chunk (at most _DZ_CHUNK_BYTES,
    in the matmul dtype) and dense matmuls consume it: d_hidden_rows += dz @ W_chunk (an fp32
    accumulator per row chunk), and only for a trainable head d_weight_chunk += dz.T @ h_rows.
    No atomics, deterministic, no [N, V] buffer.
    """
    n, hd = h.shape
    v = w.shape[0]
    with_ent = g_ent is not None
    dot_dtype, precision = _dot_config(h.dtype, h.device)
    mm_dtype = h.dtype if h.device.type == "cuda" else torch.float32  # interpreter: fp32 throughout
    b_arg = b if b is not None else h
    ge_arg = g_ent if with_ent else g
    ez_arg = ez if with_ent else lse
    active = tgt != ignore_index
    dh = torch.empty((n, hd), device=h.device, dtype=h.dtype)
    dw = torch.zeros((v, hd), device=h.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((v,), device=h.device, dtype=torch.float32) if need_db else None
    rows_per_chunk = min(n, _TRITON_ROWS_PER_CHUNK)
    elt = torch.finfo(mm_dtype).bits // 8
    vocab_per_chunk = max(_BLOCK_V, _DZ_CHUNK_BYTES // (rows_per_chunk * elt) // _BLOCK_V * _BLOCK_V)
    dz_buf = torch.empty((rows_per_chunk, min(v, vocab_per_chunk)), device=h.device, dtype=mm_dtype)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        h_rows = h[r0:r1]
        h_mm = torch.where(active[r0:r1, None], h_rows, 0).to(mm_dtype) if need_dw else None  # NaN-proof
        acc = torch.zeros((r1 - r0, hd), device=h.device, dtype=torch.float32)
        for v0 in range(0, v, vocab_per_chunk):
            v1 = min(v, v0 + vocab_per_chunk)
            dz = dz_buf[: r1 - r0, : v1 - v0]
            _dlogits_kernel[(math.ceil((r1 - r0) / _BLOCK_N), math.ceil((v1 - v0) / _BLOCK_V))](
                h_rows, w, b_arg, tgt[r0:r1], lse[r0:r1], g[r0:r1], ge_arg[r0:r1], ez_arg[r0:r1], dz,
                r1 - r0, v0, v1, hd, h.stride(0), w.stride(0), dz.stride(0), inv_temp, ignore_index,
                HAS_BIAS=b is not None, WITH_ENT=with_ent, BLOCK_N=_BLOCK_N, BLOCK_V=_BLOCK_V, BLOCK_H=_BLOCK_H,
                DOT_DTYPE=dot_dtype, PRECISION=precision,
            )
            acc += _mm_fp32(dz, w[v0:v1].to(mm_dtype))
            if need_dw:
                dw[v0:v1] += _mm_fp32(dz.t(), h_mm)
            if need_db:
                db[v0:v1] += dz.sum(dim=0, dtype=torch.float32)
        dh[r0:r1] = acc
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# Chunked PyTorch fallback: same math, [rows x vocab] chunks of at most 32 MB in fp32
# --------------------------------------------------------------------------------------------
def _chunk_logits(h32, w, b, v0, v1, inv_temp):
    """fp32 logits / T of all rows of ``h32`` against vocab rows [v0, v1)."""
    z = h32 @ w[v0:v1].float().t()
    if b is not None:
        z += b[v0:v1].float()
    return z.mul_(inv_temp)


def _torch_forward(h, w, b, tgt, inv_temp, with_ent):
    """Returns (lse, zt, ez-or-None), all fp32 [N]; streams over vocab chunks (outer) and row chunks."""
    n = h.shape[0]
    v = w.shape[0]
    m = torch.full((n,), float("-inf"), device=h.device, dtype=torch.float32)
    s = torch.zeros((n,), device=h.device, dtype=torch.float32)
    t = torch.zeros((n,), device=h.device, dtype=torch.float32) if with_ent else None
    zt = torch.zeros((n,), device=h.device, dtype=torch.float32)
    for v0 in range(0, v, _TORCH_VOCAB_PER_CHUNK):
        v1 = min(v, v0 + _TORCH_VOCAB_PER_CHUNK)
        for r0 in range(0, n, _TORCH_ROWS_PER_CHUNK):
            r1 = min(n, r0 + _TORCH_ROWS_PER_CHUNK)
            z = _chunk_logits(h[r0:r1].float(), w, b, v0, v1, inv_temp)
            m_new = torch.maximum(m[r0:r1], z.max(dim=1).values)
            alpha = torch.exp(m[r0:r1] - m_new)
            e = torch.exp(z - m_new[:, None])
            s[r0:r1] = s[r0:r1] * alpha + e.sum(dim=1)
            if with_ent:
                t[r0:r1] = t[r0:r1] * alpha + (e * z).sum(dim=1)
            m[r0:r1] = m_new
            local = tgt[r0:r1] - v0
            hit = (local >= 0) & (local < v1 - v0)
            zt[r0:r1] += torch.where(hit, z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
    lse = m + torch.log(s)
    return lse, zt, (t / s if with_ent else None)


def _torch_backward(h, w, b, tgt, lse, g, g_ent, ez, inv_temp, ignore_index, need_dw, need_db):
    """Returns fp32 (d_hidden, d_weight-or-None, d_bias-or-None); recomputes logits chunk by chunk."""
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
            h32 = h[r0:r1].float()
            z = _chunk_logits(h32, w, b, v0, v1, inv_temp)
            p = torch.exp(z - lse[r0:r1, None])
            dz = p.mul_(-g[r0:r1, None]) if g_ent is None else (
                -g[r0:r1, None] * p - g_ent[r0:r1, None] * p * (z - ez[r0:r1, None]))
            local = tgt[r0:r1] - v0
            hit = (local >= 0) & (local < v1 - v0)
            rows = torch.nonzero(hit)[:, 0]
            dz[rows, local[rows]] += g[r0:r1][rows]
            dz = torch.where(active[r0:r1, None], dz, 0.0).mul_(inv_temp)  # NaN-proof for ignored rows
            dh[r0:r1] += dz @ w32
            if need_dw:
                dw[v0:v1] += dz.t() @ torch.where(active[r0:r1, None], h32, 0.0)
            if need_db:
                db[v0:v1] += dz.sum(dim=0)
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# autograd + public API
# --------------------------------------------------------------------------------------------
class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, tgt, temperature, ignore_index, with_ent, impl):
        inv_temp = 1.0 / temperature
        forward_fn = _triton_forward if impl == "triton" else _torch_forward
        lse, zt, ez = forward_fn(h, w, b, tgt, inv_temp, with_ent)
        ignored = tgt == ignore_index
        logp = torch.where(ignored, 0.0, zt - lse)
        ent = torch.where(ignored, 0.0, lse - ez) if with_ent else logp.new_empty(0)
        if not with_ent:
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(h, w, b, tgt, lse, ez)
        ctx.inv_temp, ctx.ignore_index, ctx.impl, ctx.with_ent = inv_temp, ignore_index, impl, with_ent
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, b, tgt, lse, ez = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        if not (need_dh or need_dw or need_db):
            return (None,) * 8
        g = g_logp.float().contiguous() if g_logp is not None else torch.zeros_like(lse)
        g_ent = g_ent.float().contiguous() if (ctx.with_ent and g_ent is not None) else None
        backward_fn = _triton_backward if ctx.impl == "triton" else _torch_backward
        dh, dw, db = backward_fn(h, w, b, tgt, lse, g, g_ent, ez if g_ent is not None else None,
                                 ctx.inv_temp, ctx.ignore_index, need_dw, need_db and b is not None)
        return (dh.to(h.dtype) if need_dh else None,
                dw.to(w.dtype) if dw is not None else None,
                db.to(b.dtype) if db is not None else None,
                None, None, None, None, None)


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
    targets ``[...]`` int64 in [0, V) or ``ignore_index``. Returns fp32 log-probs ``[...]`` (0 at
    ignored tokens) and, with ``return_entropy=True``, also the fp32 entropy ``[...]`` of the
    tempered softmax (0 at ignored tokens; differentiable: dH/dz_v = -p_v (z_v - E_p[z])).
    Gradients flow to hidden, and to weight/bias only when they require grad. No [N, V] buffer
    is allocated. ``impl``: "triton" | "torch" | None (see saga_kernels._dispatch).
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
    if h.shape[0] == 0:  # nothing to compute; keep the graph connected for autograd
        logp = (h.sum(dim=-1) * 0).float().reshape(lead)
        return (logp, logp.clone()) if return_entropy else logp
    logp, ent = _LinearLogprobs.apply(h, w, b, tgt, float(temperature), ignore_index, return_entropy, chosen)
    if return_entropy:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)
