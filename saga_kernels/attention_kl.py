"""KL(target || softmax(logits)) per row over a masked set of entries, fused forward + backward.

For one row with entry set M (``mask`` True), target a and logits z:

    t_j = a_j / sum_{k in M} a_k                         (target renormalized over M)
    log q_j = z_j - lse_M(z),   lse_M(z) = log sum_{k in M} exp(z_k)
    KL = sum_{j in M, t_j > 0} t_j * (log t_j - log q_j)         (0 * log 0 = 0)
    dKL/dz_j = q_j - t_j for j in M, 0 elsewhere

This is SAGA's pooler loss L_KL (teacher attention map first). The forward also forms dKL/dz when the
logits require grad (one more pass over the row), so the backward only scales it by the upstream
gradient. ``target`` is a detached teacher: it never receives a gradient. Reductions: "batchmean"
(sum over rows / number of rows), "sum", "none" (per row, shape ``logits.shape[:-1]``).
"""
from __future__ import annotations

import torch

from ._checks import check_finite, check_same_device, check_tensor
from ._dispatch import resolve_impl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("batchmean", "sum", "none")
_TORCH_ROWS_PER_CHUNK = 4096
_MAX_BLOCK = 1024

_KERNEL = None


def _kernel():
    """Build the @triton.jit kernel on first use (never at import time)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _kl_kernel(z_ptr, a_ptr, m_ptr, loss_ptr, grad_ptr, N, s_z, s_a, s_m, s_g,
                   HAS_MASK: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row: pass 1 = per-lane online lse of z and sum of a over the mask;
        pass 2 = KL terms and (WITH_GRAD) the gradient q - t."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * s_z
        a_row = a_ptr + row * s_a
        m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
        l_lane = tl.zeros((BLOCK,), tl.float32)
        a_sum = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < N
            if HAS_MASK:
                ok = ok & (tl.load(m_ptr + row * s_m + cols, mask=ok, other=0) != 0)
            z = tl.where(ok, tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), float("-inf"))
            a = tl.load(a_row + cols, mask=ok, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_lane, z)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_lane = l_lane * tl.exp(m_lane - m_ref) + tl.exp(z - m_ref)
            m_lane = m_new
            a_sum += a
        m_row = tl.max(m_lane, 0)
        lse = m_row + tl.log(tl.sum(l_lane * tl.exp(m_lane - m_row), 0))
        inv_a = 1.0 / tl.sum(a_sum, 0)

        kl = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < N
            if HAS_MASK:
                ok = ok & (tl.load(m_ptr + row * s_m + cols, mask=ok, other=0) != 0)
            log_q = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) - lse
            t = tl.load(a_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_a
            pos = t > 0
            kl += tl.where(pos, t * (tl.log(tl.where(pos, t, 1.0)) - log_q), 0.0)
            if WITH_GRAD:
                tl.store(grad_ptr + row * s_g + cols, tl.where(ok, tl.exp(log_q) - t, 0.0), mask=cols < N)
        tl.store(loss_ptr + row, tl.sum(kl, 0))

    _KERNEL = _kl_kernel
    return _KERNEL


def _triton_kl(z, a, mask, with_grad):
    rows, n = z.shape
    loss = torch.empty(rows, device=z.device, dtype=torch.float32)
    grad = torch.empty((rows, n), device=z.device, dtype=torch.float32) if with_grad else loss
    z, a = z.contiguous(), a.contiguous()
    m_arg = mask.to(torch.int8).contiguous() if mask is not None else z
    block = min(_MAX_BLOCK, max(16, 1 << (n - 1).bit_length()))
    _kernel()[(rows,)](
        z, a, m_arg, loss, grad, n, z.stride(0), a.stride(0), m_arg.stride(0), grad.stride(0) if with_grad else 0,
        HAS_MASK=mask is not None, WITH_GRAD=with_grad, BLOCK=block,
    )
    return loss, grad if with_grad else None


def _torch_kl(z, a, mask, with_grad):
    """Row-chunked fallback: a few fp32 [chunk, N] temporaries at a time."""
    rows, n = z.shape
    loss = torch.empty(rows, device=z.device, dtype=torch.float32)
    grad = torch.empty((rows, n), device=z.device, dtype=torch.float32) if with_grad else None
    for r0 in range(0, rows, _TORCH_ROWS_PER_CHUNK):
        r1 = min(rows, r0 + _TORCH_ROWS_PER_CHUNK)
        zf, af = z[r0:r1].float(), a[r0:r1].float()
        mk = mask[r0:r1] if mask is not None else torch.ones_like(zf, dtype=torch.bool)
        lse = torch.logsumexp(zf.masked_fill(~mk, float("-inf")), dim=-1, keepdim=True)
        log_q = torch.where(mk, zf - lse, torch.zeros_like(zf))
        t = torch.where(mk, af, torch.zeros_like(af))
        t = t / t.sum(dim=-1, keepdim=True)
        pos = t > 0
        loss[r0:r1] = torch.where(pos, t * (torch.log(torch.where(pos, t, torch.ones_like(t))) - log_q), 0.0).sum(-1)
        if with_grad:
            grad[r0:r1] = torch.where(mk, torch.exp(log_q) - t, torch.zeros_like(t))
    return loss, grad


class _AttentionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, target2d, mask2d, reduction, path):
        with_grad = ctx.needs_input_grad[0]
        fn = _triton_kl if path == "triton" else _torch_kl
        loss, grad = fn(logits2d.detach(), target2d.detach(), mask2d, with_grad)
        ctx.reduction = reduction
        ctx.logits_dtype = logits2d.dtype
        ctx.save_for_backward(grad if with_grad else None)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total / loss.numel() if reduction == "batchmean" else total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        if ctx.reduction == "none":
            dz = grad * g.float()[:, None]
        else:
            scale = g.float() / grad.shape[0] if ctx.reduction == "batchmean" else g.float()
            dz = grad * scale
        return dz.to(ctx.logits_dtype), None, None, None, None


def _check_inputs(logits, target, mask, reduction):
    check_tensor("logits", logits, dtypes=_FLOAT_DTYPES)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dim ([..., N]), got a scalar")
    check_tensor("target", target, dtypes=_FLOAT_DTYPES + (torch.float64,), shape=tuple(logits.shape))
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), shape=tuple(logits.shape))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(logits=logits, target=target, mask=mask)


def _check_values(z, a, mask):
    """Finite logits; a non-negative, finite target with positive mass on every row's mask."""
    check_finite("logits", z if mask is None else z[mask])
    check_finite("target", a)
    if bool((a < 0).any()):
        raise ValueError("target must be non-negative (a distribution, renormalized over the mask)")
    mass = (a if mask is None else torch.where(mask, a, torch.zeros_like(a))).sum(dim=-1)
    if bool((mass <= 0).any()):
        row = int((mass <= 0).nonzero()[0, 0])
        raise ValueError(f"target row {row} has no positive mass on its mask (empty mask row or all-zero target)")


def attention_kl(logits, target, *, mask=None, reduction="batchmean", impl=None):
    """KL(target || softmax(logits)) per row over the entries where ``mask`` is True.

    Args:
        logits: ``[..., N]`` student scores (e.g. the pooler's patch logits); receives the gradient.
        target: ``[..., N]`` non-negative teacher weights (e.g. an ``attention_probs`` map). Each row is
            renormalized over its mask inside, so it need not sum to 1. Detached: no gradient.
        mask: ``[..., N]`` bool, True = entry belongs to the row (rows of different lengths); None = all.
        reduction: ``"batchmean"`` (sum / rows), ``"sum"`` or ``"none"`` (shape ``logits.shape[:-1]``).
        impl: ``"triton"`` | ``"torch"`` | None (see ``saga_kernels._dispatch``).

    Returns the fp32 loss. Entries with t_j = 0 contribute 0 (0 log 0 = 0); masked-out entries get a
    zero gradient. Every row needs positive target mass on its mask (else ValueError).
    """
    _check_inputs(logits, target, mask, reduction)
    n = logits.shape[-1]
    z = logits.reshape(-1, n)
    a = target.detach().reshape(-1, n)
    m = mask.reshape(-1, n) if mask is not None else None
    path = resolve_impl(impl, logits, target)
    if z.shape[0] == 0:
        zero = logits.float().sum(dim=-1) * 0.0
        return zero if reduction == "none" else zero.sum()
    _check_values(z, a, m)
    loss = _AttentionKL.apply(z, a, m, reduction, path)
    return loss.view(logits.shape[:-1]) if reduction == "none" else loss
