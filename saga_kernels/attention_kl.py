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

Entries outside the mask may hold anything in ``logits`` and ``target`` (+-inf, NaN: a padded buffer):
they are never loaded by the kernel (masked ``tl.load``) and replaced with ``torch.where`` before any
arithmetic in the fallback, so loss and gradient equal those of a clean input and the gradient there is
exactly 0. At entries inside the mask, non-finite logits or target values and negative target values
are errors naming the argument (``saga_kernels._checks.input_checks``: raised on the CPU, asserted on
device without a host sync on CUDA). An empty input (no rows) gives a zero loss and a zero gradient.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_finite, check_mode, check_same_device, check_tensor, check_values
from ._dispatch import resolve_impl
from ._tl_utils import cdiv, lse_update, next_pow2, on_device
from ._triton import tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("batchmean", "sum", "none")
_TORCH_ROWS_PER_CHUNK = 4096
_MAX_BLOCK = 1024  # entries per row tile
_TILE_ELEMS = 2048  # rows x entries of one program's tile (16 fp32 values per thread per live tensor)


@triton.jit
def _kl_kernel(z_ptr, a_ptr, m_ptr, loss_ptr, grad_ptr, R, N, s_z, s_a, s_m, s_g,
               HAS_MASK: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_M rows. Pass 1: online lse of z (``lse_update``) and the sum of a over the mask;
    pass 2: KL terms and (WITH_GRAD) the gradient q - t. Masked entries are never loaded."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    z_rows = z_ptr + rows[:, None] * s_z
    a_rows = a_ptr + rows[:, None] * s_a
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    a_sum = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < N)[None, :]
        if HAS_MASK:
            ok = ok & (tl.load(m_ptr + rows[:, None] * s_m + cols[None, :], mask=ok, other=0) != 0)
        z = tl.load(z_rows + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m, l = lse_update(m, l, z)
        a_sum += tl.sum(tl.load(a_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32), 1)
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), 0.0)
    inv_a = 1.0 / tl.where(a_sum > 0, a_sum, 1.0)

    kl = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_row = (cols < N)[None, :]
        ok = row_ok[:, None] & in_row
        if HAS_MASK:
            ok = ok & (tl.load(m_ptr + rows[:, None] * s_m + cols[None, :], mask=ok, other=0) != 0)
        log_q = tl.load(z_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) - lse[:, None]
        t = tl.load(a_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_a[:, None]
        pos = t > 0
        kl += tl.sum(tl.where(pos, t * (tl.log(tl.where(pos, t, 1.0)) - log_q), 0.0), 1)
        if WITH_GRAD:
            tl.store(grad_ptr + rows[:, None] * s_g + cols[None, :], tl.where(ok, tl.exp(log_q) - t, 0.0),
                     mask=row_ok[:, None] & in_row)
    tl.store(loss_ptr + rows, kl, mask=row_ok)


def kl_config(n: int) -> dict:
    """The one launch configuration of ``_kl_kernel`` (used by the launcher and the sm_90 compile test):
    a row tile of up to 1024 entries, and as many rows per program as fill 2048 elements (short rows, e.g.
    one image's patches, share a program), 4 warps; the loops stream row tiles, no shared-memory pipeline."""
    block = min(_MAX_BLOCK, max(16, next_pow2(n)))
    return dict(BLOCK_M=max(1, _TILE_ELEMS // block), BLOCK_N=block, num_warps=4, num_stages=1)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_forward(z, a, mask, with_grad):
    rows, n = z.shape
    loss = torch.empty(rows, device=z.device, dtype=torch.float32)
    grad = torch.empty((rows, n), device=z.device, dtype=torch.float32) if with_grad else loss
    z, a = _unit_last(z), _unit_last(a)
    m_arg = _unit_last(mask).view(torch.int8) if mask is not None else z  # bool -> int8: a view, no copy
    cfg = kl_config(n)
    with on_device(z):
        _kl_kernel[(cdiv(rows, cfg["BLOCK_M"]),)](
            z, a, m_arg, loss, grad, rows, n, z.stride(0), a.stride(0), m_arg.stride(0),
            grad.stride(0) if with_grad else 0, HAS_MASK=mask is not None, WITH_GRAD=with_grad, **cfg,
        )
    return loss, grad if with_grad else None


def _torch_forward(z, a, mask, with_grad):
    """Row-chunked fallback: a few fp32 [chunk, N] temporaries at a time."""
    rows, n = z.shape
    loss = torch.empty(rows, device=z.device, dtype=torch.float32)
    grad = torch.empty((rows, n), device=z.device, dtype=torch.float32) if with_grad else None
    for r0 in range(0, rows, _TORCH_ROWS_PER_CHUNK):
        r1 = min(rows, r0 + _TORCH_ROWS_PER_CHUNK)
        zf, af = z[r0:r1].float(), a[r0:r1].float()
        if mask is not None:  # masked entries may hold anything: replace them before any arithmetic
            mk = mask[r0:r1]
            zf = torch.where(mk, zf, float("-inf"))
            af = torch.where(mk, af, 0.0)
        lse = torch.logsumexp(zf, dim=-1, keepdim=True)
        lse = torch.where(lse == float("-inf"), 0.0, lse)  # an empty row (only when checks are off)
        log_q = zf - lse  # -inf at masked entries; only read where t > 0 (loss) or mk (gradient)
        mass = af.sum(dim=-1, keepdim=True)
        t = af / torch.where(mass > 0, mass, 1.0)
        pos = t > 0
        loss[r0:r1] = torch.where(pos, t * (torch.log(torch.where(pos, t, 1.0)) - torch.where(pos, log_q, 0.0)),
                                  0.0).sum(-1)
        if with_grad:
            grad[r0:r1] = torch.exp(log_q) - t  # exp(-inf) - 0 = 0 at masked entries, exactly
    return loss, grad


class _AttentionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, target2d, mask2d, reduction, path):
        with_grad = ctx.needs_input_grad[0]
        fn = _triton_forward if path == "triton" else _torch_forward
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
    """Every argument of :func:`attention_kl`, errors naming it. Then the values: finite logits; a non-negative,
    finite target with positive mass on every row's mask (entries outside the mask are not read). Mode-aware
    (``_checks.check_mode``): no host sync unless the mode is "sync"."""
    check_tensor("logits", logits, dtypes=_FLOAT_DTYPES)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dim ([..., N]), got a scalar")
    check_tensor("target", target, dtypes=_FLOAT_DTYPES + (torch.float64,), shape=tuple(logits.shape))
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), shape=tuple(logits.shape))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(logits=logits, target=target, mask=mask)
    a = target.detach()
    check_finite("logits", logits, where=mask)
    check_finite("target", a, where=mask)
    non_negative = a >= 0 if mask is None else (a >= 0) | ~mask
    check_values("target", non_negative, "be non-negative (a distribution, renormalized over the mask)")
    mass = (a if mask is None else torch.where(mask, a, 0.0)).sum(dim=-1).reshape(-1) > 0  # one per row
    if mass.numel() == 0:
        return
    if check_mode(mass) != "sync":
        check_values("target", mass, "have positive mass on every row's mask (no empty mask row, no all-zero row)")
    elif not bool(mass.all()):
        row = int((~mass).nonzero()[0, 0])
        raise ValueError(f"target row {row} has no positive mass on its mask (empty mask row or all-zero target)")


def attention_kl(logits, target, *, mask=None, reduction="batchmean", impl=None):
    """KL(target || softmax(logits)) per row over the entries where ``mask`` is True.

    Args:
        logits: ``[..., N]`` student scores (e.g. the pooler's patch logits); receives the gradient.
        target: ``[..., N]`` non-negative teacher weights (e.g. an ``attention_probs`` map). Each row is
            renormalized over its mask inside, so it need not sum to 1. Detached: no gradient.
        mask: ``[..., N]`` bool, True = entry belongs to the row (rows of different lengths); None = all.
            Entries outside the mask may hold anything (NaN, +-inf) in logits and target.
        reduction: ``"batchmean"`` (sum / rows), ``"sum"`` or ``"none"`` (shape ``logits.shape[:-1]``).
        impl: ``"triton"`` | ``"torch"`` | None (see ``saga_kernels._dispatch``).

    Returns the fp32 loss. Entries with t_j = 0 contribute 0 (0 log 0 = 0); masked-out entries get a
    zero gradient. Every row needs positive target mass on its mask (else ValueError).
    """
    _check_inputs(logits, target, mask, reduction)
    n = logits.shape[-1]
    rows = math.prod(logits.shape[:-1])
    z = logits.reshape(rows, n)
    a = target.detach().reshape(rows, n)
    m = mask.reshape(rows, n) if mask is not None else None
    path = resolve_impl(impl, logits, target)
    if z.shape[0] == 0:  # no rows: a zero loss whose gradient is zeros of logits' shape
        zero = logits.float().sum(dim=-1) * 0.0
        return zero if reduction == "none" else zero.sum()
    loss = _AttentionKL.apply(z, a, m, reduction, path)
    return loss.view(logits.shape[:-1]) if reduction == "none" else loss
