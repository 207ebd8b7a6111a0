"""Attention probabilities of chosen query rows at chosen key columns, without an [Lq, Lk] buffer.

For query row i (absolute position p_i) of query head h, whose key/value head is g(h) = h // (Hq / Hkv):

    s[h, i, j] = scale * <q[h, i], k[g(h), j]>
    visible(i, j) = (j <= p_i) and key_padding_mask[j]                  (causal + padding)
    P[h, i, j] = exp(s[h, i, j] - m[h, i]) / l[h, i]  for visible j, else 0
    m[h, i] = max_{visible j} s[h, i, j],   l[h, i] = sum_{visible j} exp(s[h, i, j] - m[h, i])
    out[i, c] = (1 / Hq) * sum_h P[h, i, key_index[c]]                  (reduce_heads="mean")

Both paths make two passes over the keys: pass 1 streams every key tile and keeps only the online
row statistics (m, l), pass 2 recomputes the scores of the n requested key columns and normalizes
them. Memory is O(B * Hq * Lq * (1 + n)); no [Lq, Lk] score buffer exists beyond one tile.

The map is a detached teacher: there is no backward. When q or k require grad the result does too,
only so that a backward through it raises a clear error instead of silently yielding zeros.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_index_range, check_same_device, check_tensor
from ._dispatch import resolve_impl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)
_LOG2E = 1.4426950408889634

# Fallback: one [B, Hkv, G * Lq, chunk] fp32 score tile holds about this many elements (16 MB).
_TORCH_TILE_ELEMS = 1 << 22

# Triton tiles (one fixed config; every tl.dot dim >= 16 and a power of two).
_ROWS_PER_PROGRAM = 64  # (query head in the GQA group) x (query row) rows share one K tile
_MAX_HEADS_PER_PROGRAM = 8  # larger GQA groups are split over programs (tile <= 128 rows)
_BLOCK_N = 64  # keys per tile in pass 1
_MAX_BLOCK_K = 64  # requested key columns per tile in pass 2

_KERNEL = None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _kernel():
    """Build the @triton.jit kernel on first use (never at import time)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _probs_kernel(q_ptr, k_ptr, pos_ptr, pad_ptr, idx_ptr, out_ptr,
                      Lq, Lk, n, D, HKV, GROUP, HEAD_BLOCKS, scale_log2e,
                      sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, s_pos_b, s_pad_b, s_idx_b, so_b, so_h, so_l,
                      HAS_PAD: tl.constexpr, SUM_HEADS: tl.constexpr, HP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        """One program = (batch b, kv head g, block hb of HP of its GROUP query heads, BLOCK_Q query rows).

        Rows of the [BLOCK_M = HP * BLOCK_Q, D] query tile are (head, query row) pairs, so one K tile
        serves HP heads of the GQA group. SUM_HEADS: writes those heads' sum [BLOCK_Q, n] to
        out[b, g * HEAD_BLOCKS + hb]; otherwise every head's probabilities to out[b, h].
        """
        pid_0 = tl.program_id(0).to(tl.int64)
        pid_q = tl.program_id(1).to(tl.int64)
        b = pid_0 // (HKV * HEAD_BLOCKS)
        part = pid_0 % (HKV * HEAD_BLOCKS)  # = g * HEAD_BLOCKS + hb
        g = part // HEAD_BLOCKS
        scale = tl.cast(scale_log2e, tl.float32)

        r = tl.arange(0, BLOCK_M)
        in_group = (part % HEAD_BLOCKS) * HP + r // BLOCK_Q
        head = g * GROUP + in_group
        qi = pid_q * BLOCK_Q + r % BLOCK_Q
        row_ok = (in_group < GROUP) & (qi < Lq)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_l + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32).to(DOT_DTYPE)
        qpos = tl.load(pos_ptr + b * s_pos_b + qi, mask=row_ok, other=-1)  # -1: sees nothing
        k_base = k_ptr + b * sk_b + g * sk_h

        # pass 1: online max / sum of exp2 over the visible keys (scores kept in log2 units)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        hi = tl.minimum(tl.max(qpos) + 1, Lk).to(tl.int32)  # keys past the last query row: never visible
        for start in range(0, hi, BLOCK_N):
            kj = start + tl.arange(0, BLOCK_N)
            k_ok = kj < Lk
            kt = tl.load(k_base + kj[None, :] * sk_l + d[:, None], mask=k_ok[None, :] & d_ok[:, None],
                         other=0.0).to(tl.float32).to(DOT_DTYPE)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
            vis = (kj[None, :] <= qpos[:, None]) & k_ok[None, :]
            if HAS_PAD:
                pad = tl.load(pad_ptr + b * s_pad_b + kj, mask=k_ok, other=0)
                vis = vis & (pad[None, :] != 0)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        inv_l = 1.0 / tl.where(l > 0, l, 1.0)  # rows without visible keys are padding rows (p = 0)

        # pass 2: normalized probabilities at the requested key columns
        for c0 in range(0, n, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_ok = c < n
            kidx = tl.load(idx_ptr + b * s_idx_b + c, mask=c_ok, other=0)
            kt = tl.load(k_base + kidx[None, :] * sk_l + d[:, None], mask=c_ok[None, :] & d_ok[:, None],
                         other=0.0).to(tl.float32).to(DOT_DTYPE)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
            vis = (kidx[None, :] <= qpos[:, None]) & c_ok[None, :]
            if HAS_PAD:
                pad = tl.load(pad_ptr + b * s_pad_b + kidx, mask=c_ok, other=0)
                vis = vis & (pad[None, :] != 0)
            p = tl.exp2(tl.where(vis, s - m_ref[:, None], float("-inf"))) * inv_l[:, None]
            if SUM_HEADS:
                psum = tl.sum(tl.reshape(p, (HP, BLOCK_Q, BLOCK_K)), 0)
                qo = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
                tl.store(out_ptr + b * so_b + part * so_h + qo[:, None] * so_l + c[None, :], psum,
                         mask=(qo < Lq)[:, None] & c_ok[None, :])
            else:
                tl.store(out_ptr + b * so_b + head[:, None] * so_h + qi[:, None] * so_l + c[None, :], p,
                         mask=row_ok[:, None] & c_ok[None, :])

    _KERNEL = _probs_kernel
    return _KERNEL


def _dot_config(dtype: torch.dtype, device: torch.device):
    """(tl dtype of the tl.dot operands, input_precision): fp32 everywhere in the interpreter (its
    half-precision arithmetic is unreliable); on a GPU half inputs feed the tensor cores as they are,
    fp32 inputs use full-precision ("ieee") products like torch's default fp32 matmul."""
    import triton.language as tl

    if device.type != "cuda" or dtype == torch.float32:
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "ieee"


def _triton_probs(q, k, key_index, qpos, pad, scale, mean):
    bsz, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n = key_index.shape[1]
    group = hq // hkv
    heads_per_program = min(_next_pow2(group), _MAX_HEADS_PER_PROGRAM)
    head_blocks = math.ceil(group / heads_per_program)
    block_q = max(16, _ROWS_PER_PROGRAM // heads_per_program)
    block_k = min(_MAX_BLOCK_K, max(16, _next_pow2(n)))
    block_d = max(16, _next_pow2(dim))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    key_index = key_index.contiguous()
    qpos = qpos.contiguous()
    out = torch.empty((bsz, hkv * head_blocks if mean else hq, lq, n), device=q.device, dtype=torch.float32)
    pad_arg = pad.to(torch.int8).contiguous() if pad is not None else qpos
    dot_dtype, precision = _dot_config(q.dtype, q.device)
    grid = (bsz * hkv * head_blocks, math.ceil(lq / block_q))
    _kernel()[grid](
        q, k, qpos, pad_arg, key_index, out,
        lq, lk, n, dim, hkv, group, head_blocks, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qpos.stride(0), pad_arg.stride(0), key_index.stride(0), out.stride(0), out.stride(1), out.stride(2),
        HAS_PAD=pad is not None, SUM_HEADS=mean, HP=heads_per_program,
        BLOCK_M=heads_per_program * block_q, BLOCK_Q=block_q, BLOCK_N=_BLOCK_N, BLOCK_K=block_k, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    return out.sum(dim=1) / hq if mean else out


def _torch_probs(q, k, key_index, qpos, pad, scale, mean):
    """Same two passes in PyTorch, over key chunks of a bounded [B, Hkv, G * Lq, chunk] score tile."""
    bsz, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n = key_index.shape[1]
    group = hq // hkv
    qf = q.float().reshape(bsz, hkv, group * lq, dim) * scale  # rows: (head in group, query row)
    row_pos = qpos.repeat(1, group)[:, None, :, None]  # [B, 1, G * Lq, 1]
    m = torch.full((bsz, hkv, group * lq), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    chunk = max(16, min(lk, _TORCH_TILE_ELEMS // max(1, bsz * hq * lq)))
    for s0 in range(0, lk, chunk):
        s1 = min(lk, s0 + chunk)
        s = qf @ k[:, :, s0:s1].float().transpose(-1, -2)
        vis = torch.arange(s0, s1, device=q.device) <= row_pos
        if pad is not None:
            vis = vis & pad[:, None, None, s0:s1]
        s.masked_fill_(~vis, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - m_ref) + s.sub_(m_ref[..., None]).exp_().sum(dim=-1)  # in place: one tile alive
        m = m_new
    k_sel = k.gather(2, key_index[:, None, :, None].expand(bsz, hkv, n, dim)).float()
    s = qf @ k_sel.transpose(-1, -2)  # [B, Hkv, G * Lq, n]
    vis = key_index[:, None, None, :] <= row_pos
    if pad is not None:
        vis = vis & pad.gather(1, key_index)[:, None, None, :]
    p = torch.exp(s.masked_fill_(~vis, float("-inf")) - m[..., None]) / l[..., None]
    p = p.view(bsz, hq, lq, n)
    return p.mean(dim=1) if mean else p


class _DetachedTeacher(torch.autograd.Function):
    """Passes the map through; a backward through it raises (the map is a detached teacher)."""

    @staticmethod
    def forward(ctx, out, q, k):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "attention_probs has no backward: its map is a detached teacher signal. "
            "Detach it (or pass q.detach(), k.detach()) before using it in a loss."
        )


def _check_inputs(q, k, key_index, query_positions, key_padding_mask, reduce_heads):
    check_tensor("q", q, ndim=4, dtypes=_FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=_FLOAT_DTYPES)
    bsz, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(bsz, None, None, dim))
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k heads ({hkv}) (grouped-query attention)")
    check_tensor("key_index", key_index, ndim=2, dtypes=_INT_DTYPES)
    check_tensor("key_index", key_index, shape=(bsz, None))
    if query_positions is not None:
        check_tensor("query_positions", query_positions, dtypes=_INT_DTYPES, shape=(bsz, lq))
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), shape=(bsz, lk))
    if reduce_heads not in ("mean", None):
        raise ValueError(f"reduce_heads must be 'mean' or None, got {reduce_heads!r}")
    check_same_device(q=q, k=k, key_index=key_index, query_positions=query_positions,
                      key_padding_mask=key_padding_mask)
    if lk == 0:
        raise ValueError("k has no keys (Lk = 0): every query row would have no visible key")
    check_index_range("key_index", key_index, lk)
    if query_positions is not None:
        check_index_range("query_positions", query_positions, lk)


def _check_visible(qpos, pad):
    """Every query row sees at least one key (else its softmax is undefined)."""
    if qpos.numel() == 0:
        return
    if pad is None:
        return  # qpos >= 0 always sees key 0
    seen = pad.long().cumsum(dim=1).gather(1, qpos)
    if bool((seen == 0).any()):
        b, i = (seen == 0).nonzero()[0].tolist()
        raise ValueError(
            f"query row {i} of batch {b} (position {int(qpos[b, i])}) has no visible key: every key at or "
            "before it is masked by key_padding_mask"
        )


def attention_probs(q, k, key_index, *, query_positions=None, key_padding_mask=None, scale=None,
                    reduce_heads="mean", impl=None):
    """Softmax attention of chosen query rows over all visible keys, read at chosen key columns.

    Args:
        q: ``[B, Hq, Lq, D]`` post-RoPE queries of the rows of interest only.
        k: ``[B, Hkv, Lk, D]`` post-RoPE keys of the whole sequence; ``Hq % Hkv == 0`` (GQA).
        key_index: ``[B, n]`` int key positions to return (e.g. one image's patch tokens), in [0, Lk).
        query_positions: ``[B, Lq]`` int absolute positions of the query rows for the causal mask
            (key j is visible to row i iff j <= query_positions[i]); default the last Lq positions.
        key_padding_mask: ``[B, Lk]`` bool, True = real key; None = no padding.
        scale: score scale, default ``D ** -0.5``.
        reduce_heads: ``"mean"`` -> ``[B, Lq, n]`` head mean; ``None`` -> ``[B, Hq, Lq, n]``.
        impl: ``"triton"`` | ``"torch"`` | None (see ``saga_kernels._dispatch``).

    Returns fp32 probabilities (0 at key columns the row cannot see). No backward (detached teacher):
    a backward through the result raises RuntimeError.
    """
    _check_inputs(q, k, key_index, query_positions, key_padding_mask, reduce_heads)
    bsz, hq, lq, dim = q.shape
    lk = k.shape[2]
    if query_positions is None:
        if lq > lk:
            raise ValueError(f"q has {lq} rows but k only {lk} keys; pass query_positions")
        query_positions = torch.arange(lk - lq, lk, device=q.device).expand(bsz, lq)
    qpos = query_positions.long()
    _check_visible(qpos, key_padding_mask)
    key_index = key_index.long()
    scale = dim ** -0.5 if scale is None else float(scale)
    mean = reduce_heads == "mean"
    path = resolve_impl(impl, q, k)
    n = key_index.shape[1]
    if lq == 0 or n == 0:
        shape = (bsz, lq, n) if mean else (bsz, hq, lq, n)
        out = torch.zeros(shape, device=q.device, dtype=torch.float32)
    else:
        with torch.no_grad():
            fn = _triton_probs if path == "triton" else _torch_probs
            out = fn(q.detach(), k.detach(), key_index, qpos, key_padding_mask, scale, mean)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _DetachedTeacher.apply(out, q, k)
    return out
