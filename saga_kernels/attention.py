"""Attention probabilities of chosen query rows at chosen key columns, without an [Lq, Lk] buffer.

For query row i (absolute position p_i) of query head h, whose key/value head is g(h) = h // (Hq / Hkv):

    s[h, i, j] = scale * <q[h, i], k[g(h), j]>
    visible(i, j) = (j <= p_i) and key_padding_mask[j]                  (causal + padding)
    P[h, i, j] = exp(s[h, i, j] - m[h, i]) / l[h, i]  for visible j, else 0
    m[h, i] = max_{visible j} s[h, i, j],   l[h, i] = sum_{visible j} exp(s[h, i, j] - m[h, i])
    out[i, c] = (1 / Hq) * sum_h P[h, i, key_index[c]]                  (reduce_heads="mean")

Both paths make two passes over the keys: pass 1 streams every key tile and keeps only the online
row statistics (m, l) (``_tl_utils.lse_update``), pass 2 recomputes the scores of the n requested key
columns and normalizes them. Memory is O(B * Hq * Lq * (1 + n)); no [Lq, Lk] score buffer exists beyond
one tile. The q tile of a program stays resident (loaded once, reused for every key tile of both passes).

Keys no query row can see may hold anything (+-inf, NaN: a padded KV buffer): a key that is padding or
lies after every query row of a program (Triton) / batch row (torch) is replaced by 0 when it is loaded,
before any product; a key that is in the future of one row but visible to another only ever reaches
its own score column, which ``tl.where`` / ``masked_fill`` replaces by -inf before the exponential.
Keys some row can see, and every query, must be finite: a non-finite value there is an error naming
``q`` or ``k`` (see ``saga_kernels._checks.input_checks``: raised on the CPU, asserted on device
without a host sync on CUDA).

The map is a detached teacher: there is no backward. When q or k require grad the result does too,
only so that a backward through it raises a clear error instead of silently yielding zeros.
"""
from __future__ import annotations

import torch

from ._checks import check_finite, check_index_range, check_mode, check_same_device, check_tensor, check_values
from ._dispatch import resolve_impl
from ._tl_utils import cdiv, dot_config, lse_update, next_pow2, on_device
from ._triton import tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)

# Fallback: one [B, Hkv, G * Lq, chunk] fp32 score tile holds about this many elements (16 MB).
_TORCH_TILE_ELEMS = 1 << 22

# Triton tiles (one fixed config; every tl.dot dim >= 16 and a power of two).
_ROWS_PER_PROGRAM = 64  # (query head in the GQA group) x (query row) rows share one K tile: wgmma M = 64
_MAX_HEADS_PER_PROGRAM = 8  # larger GQA groups are split over programs (tile <= 128 rows)
_BLOCK_N = 64  # keys per tile in pass 1
_MAX_BLOCK_IDX = 64  # requested key columns (key_index entries) per tile in pass 2


@triton.jit
def _probs_kernel(q_ptr, k_ptr, pos_ptr, pad_ptr, idx_ptr, out_ptr,
                  Lq, Lk, n, D, HKV, GROUP, HEAD_BLOCKS, scale,
                  sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, s_pos_b, s_pad_b, s_idx_b, so_b, so_h, so_l,
                  HAS_PAD: tl.constexpr, SUM_HEADS: tl.constexpr, HP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_IDX: tl.constexpr,
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
    scale = tl.cast(scale, tl.float32)

    r = tl.arange(0, BLOCK_M)
    in_group = (part % HEAD_BLOCKS) * HP + r // BLOCK_Q
    head = g * GROUP + in_group
    qi = pid_q * BLOCK_Q + r % BLOCK_Q
    row_ok = (in_group < GROUP) & (qi < Lq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_l + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    qpos = tl.load(pos_ptr + b * s_pos_b + qi, mask=row_ok, other=-1)  # -1: sees nothing
    q_last = tl.max(qpos)  # keys after it are visible to no row of this program
    k_base = k_ptr + b * sk_b + g * sk_h

    # pass 1: online max / sum of exp over the visible keys
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    hi = tl.minimum(q_last + 1, Lk).to(tl.int32)
    for start in range(0, hi, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        k_live = kj < hi  # padded keys load as 0: nothing they hold reaches a product
        if HAS_PAD:
            k_live = k_live & (tl.load(pad_ptr + b * s_pad_b + kj, mask=k_live, other=0) != 0)
        kt = tl.load(k_base + kj[None, :] * sk_l + d[:, None], mask=k_live[None, :] & d_ok[:, None],
                     other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        s = tl.where((kj[None, :] <= qpos[:, None]) & k_live[None, :], s, float("-inf"))
        m, l = lse_update(m, l, s)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    inv_l = 1.0 / tl.where(l > 0, l, 1.0)  # rows without visible keys (tile padding) get p = 0

    # pass 2: normalized probabilities at the requested key columns
    for c0 in range(0, n, BLOCK_IDX):
        c = c0 + tl.arange(0, BLOCK_IDX)
        c_ok = c < n
        kidx = tl.load(idx_ptr + b * s_idx_b + c, mask=c_ok, other=0)
        k_live = c_ok & (kidx <= q_last)
        if HAS_PAD:
            k_live = k_live & (tl.load(pad_ptr + b * s_pad_b + kidx, mask=k_live, other=0) != 0)
        kt = tl.load(k_base + kidx[None, :] * sk_l + d[:, None], mask=k_live[None, :] & d_ok[:, None],
                     other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        vis = (kidx[None, :] <= qpos[:, None]) & k_live[None, :]
        p = tl.exp(tl.where(vis, s - m_ref[:, None], float("-inf"))) * inv_l[:, None]
        if SUM_HEADS:
            psum = tl.sum(tl.reshape(p, (HP, BLOCK_Q, BLOCK_IDX)), 0)
            qo = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
            tl.store(out_ptr + b * so_b + part * so_h + qo[:, None] * so_l + c[None, :], psum,
                     mask=(qo < Lq)[:, None] & c_ok[None, :])
        else:
            tl.store(out_ptr + b * so_b + head[:, None] * so_h + qi[:, None] * so_l + c[None, :], p,
                     mask=row_ok[:, None] & c_ok[None, :])


def probs_config(group: int, n: int, dim: int) -> dict:
    """The one launch configuration of ``_probs_kernel`` (used by the launcher and the sm_90 compile test).

    HP heads of a GQA group share a program (their K tiles are the same), with BLOCK_Q query rows each, so
    the resident q tile is BLOCK_M = HP * BLOCK_Q = 64 rows (128 for groups > 4) x BLOCK_D: one wgmma M
    per warpgroup; 4 warps, 3 stages pipeline the K tiles.
    """
    hp = min(next_pow2(group), _MAX_HEADS_PER_PROGRAM)
    block_q = max(16, _ROWS_PER_PROGRAM // hp)
    return dict(HP=hp, BLOCK_Q=block_q, BLOCK_M=hp * block_q, BLOCK_N=_BLOCK_N,
                BLOCK_IDX=min(_MAX_BLOCK_IDX, max(16, next_pow2(n))), BLOCK_D=max(16, next_pow2(dim)),
                num_warps=4, num_stages=3)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_forward(q, k, key_index, qpos, pad, scale, mean):
    bsz, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n = key_index.shape[1]
    group = hq // hkv
    cfg = probs_config(group, n, dim)
    head_blocks = cdiv(group, cfg["HP"])
    q, k, key_index, qpos = _unit_last(q), _unit_last(k), _unit_last(key_index), _unit_last(qpos)
    out = torch.empty((bsz, hkv * head_blocks if mean else hq, lq, n), device=q.device, dtype=torch.float32)
    pad_arg = _unit_last(pad).view(torch.int8) if pad is not None else qpos  # bool -> int8: a view, no copy
    dot_dtype, precision = dot_config(q.dtype, q.device)
    grid = (bsz * hkv * head_blocks, cdiv(lq, cfg["BLOCK_Q"]))
    with on_device(q):
        _probs_kernel[grid](
            q, k, qpos, pad_arg, key_index, out,
            lq, lk, n, dim, hkv, group, head_blocks, scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qpos.stride(0), pad_arg.stride(0), key_index.stride(0), out.stride(0), out.stride(1), out.stride(2),
            HAS_PAD=pad is not None, SUM_HEADS=mean, DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg,
        )
    return out.sum(dim=1) / hq if mean else out


def _torch_forward(q, k, key_index, qpos, pad, scale, mean):
    """Same two passes in PyTorch, over key chunks of a bounded [B, Hkv, G * Lq, chunk] score tile."""
    bsz, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n = key_index.shape[1]
    group = hq // hkv
    qf = q.float().reshape(bsz, hkv, group * lq, dim) * scale  # rows: (head in group, query row)
    row_pos = qpos.repeat(1, group)[:, None, :, None]  # [B, 1, G * Lq, 1]
    keys = torch.arange(lk, device=q.device)
    live = keys <= qpos.amax(dim=1, keepdim=True)  # [B, Lk]: keys some row of the batch row can see
    if pad is not None:
        live = live & pad
    m = torch.full((bsz, hkv, group * lq), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    chunk = max(16, min(lk, _TORCH_TILE_ELEMS // max(1, bsz * hq * lq)))
    for s0 in range(0, lk, chunk):
        s1 = min(lk, s0 + chunk)
        kc = torch.where(live[:, None, s0:s1, None], k[:, :, s0:s1].float(), 0.0)  # dead keys: 0 before the product
        s = qf @ kc.transpose(-1, -2)
        s.masked_fill_(~((keys[s0:s1] <= row_pos) & live[:, None, None, s0:s1]), float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_ref = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - m_ref) + s.sub_(m_ref[..., None]).exp_().sum(dim=-1)  # in place: one tile alive
        m = m_new
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    inv_l = 1.0 / torch.where(l > 0, l, torch.ones_like(l))
    live_sel = live.gather(1, key_index)  # [B, n]
    k_sel = k.gather(2, key_index[:, None, :, None].expand(bsz, hkv, n, dim)).float()
    k_sel = torch.where(live_sel[:, None, :, None], k_sel, 0.0)
    s = qf @ k_sel.transpose(-1, -2)  # [B, Hkv, G * Lq, n]
    vis = (key_index[:, None, None, :] <= row_pos) & live_sel[:, None, None, :]
    p = torch.exp(s.sub_(m_ref[..., None]).masked_fill_(~vis, float("-inf"))) * inv_l[..., None]
    p = p.view(bsz, hq, lq, n)
    return p.mean(dim=1) if mean else p


class _AttentionProbs(torch.autograd.Function):
    """Passes the computed map through; a backward through it raises (the map is a detached teacher)."""

    @staticmethod
    def forward(ctx, out, q, k):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "attention_probs has no backward: its map is a detached teacher signal. "
            "Detach it (or pass q.detach(), k.detach()) before using it in a loss."
        )


def _query_positions(q, k, query_positions):
    """The query rows' absolute positions as int64 ``[B, Lq]`` (default: the last Lq of the Lk positions)."""
    if query_positions is None:
        bsz, _, lq, _ = q.shape
        lk = k.shape[2]
        query_positions = torch.arange(lk - lq, lk, device=q.device).expand(bsz, lq)
    return query_positions.long()


def _check_inputs(q, k, key_index, query_positions, key_padding_mask, reduce_heads):
    """Every argument of :func:`attention_probs`, errors naming it. Then the values: every query row sees at
    least one key (else its softmax is undefined); q and the keys some row can see are finite. Mode-aware
    (``_checks.check_mode``): no host sync unless the mode is "sync"."""
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
    elif lq > lk:
        raise ValueError(f"q has {lq} rows but k only {lk} keys; pass query_positions")
    qpos = _query_positions(q, k, query_positions)
    pad = key_padding_mask
    if qpos.numel() == 0:
        return
    check_finite("q", q)
    live = torch.arange(k.shape[2], device=k.device) <= qpos.amax(dim=1, keepdim=True)
    if pad is not None:
        live = live & pad
    check_finite("k", k, where=live[:, None, :, None])
    if pad is None:
        return  # qpos >= 0 always sees key 0
    seen = pad.long().cumsum(dim=1).gather(1, qpos.clamp(0, pad.shape[1] - 1)) > 0
    if check_mode(seen) != "sync":
        check_values("key_padding_mask", seen, "leave every query row at least one visible key (no visible key: "
                     "its softmax is undefined)")
    elif not bool(seen.all()):
        b, i = (~seen).nonzero()[0].tolist()
        raise ValueError(
            f"query row {i} of batch {b} (position {int(qpos[b, i])}) has no visible key: every key at or "
            "before it is masked by key_padding_mask"
        )


def attention_probs(q, k, key_index, *, query_positions=None, key_padding_mask=None, scale=None,
                    reduce_heads="mean", impl=None):
    """Softmax attention of chosen query rows over all visible keys, read at chosen key columns.

    Args:
        q: ``[B, Hq, Lq, D]`` post-RoPE queries of the rows of interest only.
        k: ``[B, Hkv, Lk, D]`` post-RoPE keys of the whole sequence; ``Hq % Hkv == 0`` (GQA). Keys that no
            query row can see (padding, after every row) may hold anything, NaN included.
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
    qpos = _query_positions(q, k, query_positions)
    key_index = key_index.long()
    scale = dim ** -0.5 if scale is None else float(scale)
    mean = reduce_heads == "mean"
    path = resolve_impl(impl, q, k)
    n = key_index.shape[1]
    if bsz == 0 or lq == 0 or n == 0:
        shape = (bsz, lq, n) if mean else (bsz, hq, lq, n)
        out = torch.zeros(shape, device=q.device, dtype=torch.float32)
    else:
        with torch.no_grad():
            fn = _triton_forward if path == "triton" else _torch_forward
            out = fn(q.detach(), k.detach(), key_index, qpos, key_padding_mask, scale, mean)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _AttentionProbs.apply(out, q, k)
    return out
