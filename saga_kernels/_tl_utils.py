"""Helpers shared by every kernel file: device functions (``@triton.jit``, inlined into the kernels that
call them) and the host-side choices every launcher makes the same way.

Device functions
    block_range     int64 indices ``start + [0, BLOCK)`` of a row / column block and their mask ``< end``
    split_range     (split, start, end) of the column split ``program_id(1)`` of a split sweep
    load_rows       a [rows, BLOCK_D] tile of a row-major matrix (0 where masked); store_rows writes one
    tile_dot        fp32 ``A[rows, :K] @ B[cols, :K]^T`` streamed over K with explicit row strides
    cosine_tile     ``tile_dot`` of raw rows scaled by their inverse norms: the cosine tile
    lse_update      one step of the online log-sum-exp (safe when a whole row is masked, -inf)
    softcap_logits  ``cap * tanh(scale * raw / cap) / T`` and its derivative factor (Gemma-style logit softcap)
Host helpers
    dot_config      the (operand dtype, input_precision) pair every ``tl.dot`` of a launch uses
    grad_dtype      the dtype computed gradient weights travel in (dot operand, buffer): never fp16
    grad_buffer_dtype  the dtype of a gradient tile a kernel writes for cuBLAS (grad_dtype on a GPU, else fp32)
    grad_dot_config dot_config for the dots of a fused backward, whose A operand is such a gradient tile
    on_device       the context every launch runs in: the inputs' CUDA device, not torch's current one
    mm_fp32         a @ b with an fp32 result (half operands accumulate in cuBLAS's fp32, no upcast copy)
    next_pow2, cdiv block-size arithmetic
    MASKED          the sentinel for masked scores (-inf), always placed with ``tl.where`` BEFORE any
                    arithmetic touches the masked value, so neither a value nor a 0 * inf gradient leaks

Precision (``dot_config``): half-precision inputs go to ``tl.dot`` as they are (bf16/fp16 wgmma on sm_90,
fp32 accumulation). fp32 inputs follow ``torch.get_float32_matmul_precision()``: "highest" (torch's
default) -> "tf32x3" (three TF32 products, about fp32 accuracy at tensor-core rate), "high" / "medium" ->
"tf32". Full-precision "ieee" products (scalar FMA, 10-30x slower) run only when asked:
``SAGA_FP32_DOT=ieee`` (or ``tf32`` / ``tf32x3`` to override torch's setting). An op whose accuracy needs
more than TF32 passes ``min_fp32_precision="tf32x3"``. In the interpreter (CPU) every dot runs in fp32:
its half-precision arithmetic is unreliable and it ignores ``input_precision``.

Half precision between and inside kernels: inputs may be bf16/fp16, but every probability, exp-sum, log-sum-exp
state, partial sum and accumulator is fp32. What a kernel computes and hands to a product (a backward's gradient
tile ``W`` for ``W @ x``, logprob's dlogits chunk) is held in bf16 at most (:func:`grad_dtype`): bf16 has fp32's
range, so a tiny probability stays a tiny number rounded relatively (as eager bf16 rounds its own gradient), while
fp16 flushes values below 6e-8 to 0, keeps a few bits below 6e-5 and overflows above 65504 (a probability times 1/N
under an unscaled loss, a Potential Field force d^-(alpha+2), the inverse norms of short rows). fp16 inputs
therefore run such products on fp32 operands: "tf32" tensor-core dots (:func:`grad_dot_config`; an fp16 value
converts to tf32 exactly, so a recomputed similarity equals the fp16 dot's) and fp32 buffers for cuBLAS.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ._triton import tl, triton

MASKED = float("-inf")
_FP32_PRECISIONS = ("tf32", "tf32x3", "ieee")  # weakest to strongest
_TORCH_TO_TRITON = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}


@triton.jit
def block_range(start, end, BLOCK: tl.constexpr):
    """int64 indices ``start + [0, BLOCK)`` and their mask ``< end`` (``start`` an int64 block offset, e.g.
    ``tl.program_id(0).to(tl.int64) * BLOCK`` or a loop variable)."""
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    return idx, idx < end


@triton.jit
def split_range(per_split, n):
    """(split, start, end): the split ``program_id(1)`` of a sweep over ``[0, n)`` cut into splits of
    ``per_split`` (the last one may be short or empty)."""
    split = tl.program_id(1).to(tl.int64)
    start = split * per_split
    return split, start, tl.minimum(start + per_split, n)


@triton.jit
def load_rows(ptr, rows, row_ok, stride, cols, col_ok):
    """``M[rows, cols]`` of a row-major matrix M (row stride ``stride``, unit column stride) in its own
    dtype, 0 where a row or column is masked."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_rows(ptr, rows, row_ok, stride, cols, col_ok, value):
    """``M[rows, cols] = value`` for a row-major matrix M (row stride ``stride``), masked rows/columns left alone."""
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def tile_dot(a_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_a, stride_b,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 ``acc[BLOCK_R, BLOCK_C] = A[rows, :K] @ B[cols, :K]^T``.

    A and B are row-major with unit stride along K (row strides ``stride_a`` / ``stride_b``, in elements);
    ``rows`` / ``cols`` are int64 index vectors, ``row_ok`` / ``col_ok`` their masks. Operands are loaded in
    their own dtype and cast to DOT_DTYPE (a no-op for half inputs on a GPU). Masked entries load as 0.
    """
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_b + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def cosine_tile(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, K, stride_a, stride_b,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 cosine tile ``(a_i . b_j) ra_i rb_j`` of raw rows (``ra`` / ``rb`` their fp32 inverse norms,
    0 on masked rows). ``ra_i rb_j`` is formed first, so the tile is bitwise symmetric in (a, b) as far
    as the dot itself is."""
    dots = tile_dot(a_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_a, stride_b,
                    BLOCK_R, BLOCK_C, BLOCK_K, DOT_DTYPE, PRECISION)
    return dots * (ra[:, None] * rb[None, :])


@triton.jit
def lse_update(m, s, z):
    """Fold the rows of tile ``z`` ([R, C], -inf where masked) into the running (max m, sum exp(. - m)).

    Returns the new (m, s). A row that has seen only masked entries keeps m = -inf and s = 0 (the shift
    uses 0 instead of -inf, so no -inf - -inf = NaN appears).
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def softcap_logits(raw, scale, cap, inv_t):
    """(z, d) for a tile of raw logits: ``z = cap * tanh(scale * raw / cap) * inv_t`` and ``d = 1 - tanh^2``, so
    that ``dz / draw = scale * d * inv_t``. tanh = 2 sigmoid(2x) - 1 (no libdevice); d = 4 sigmoid(2x) sigmoid(-2x)
    keeps its relative precision where tanh saturates (1 - tanh^2 would cancel)."""
    x = 2.0 * (raw * scale) / cap
    s = tl.sigmoid(x)
    return cap * (2.0 * s - 1.0) * inv_t, 4.0 * s * tl.sigmoid(-x)


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fp32_dot_precision(minimum: str | None = None) -> str:
    """input_precision for fp32 ``tl.dot`` operands (see the module docstring)."""
    forced = os.environ.get("SAGA_FP32_DOT", "").strip().lower()
    if forced:
        if forced not in _FP32_PRECISIONS:
            raise ValueError(f"SAGA_FP32_DOT={forced!r} is not one of {_FP32_PRECISIONS}")
        choice = forced
    else:
        choice = _TORCH_TO_TRITON.get(torch.get_float32_matmul_precision(), "tf32x3")
    if minimum is not None and _FP32_PRECISIONS.index(choice) < _FP32_PRECISIONS.index(minimum):
        choice = minimum
    return choice


def dot_config(dtype: torch.dtype, device: torch.device, *, min_fp32_precision: str | None = None):
    """(``tl`` dtype of the dot operands, input_precision) for inputs of ``dtype`` on ``device``."""
    if device.type != "cuda":  # the interpreter: fp32 numpy products
        return tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"  # precision only concerns fp32 operands
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.float64:
        return tl.float64, "ieee"
    return tl.float32, fp32_dot_precision(min_fp32_precision)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which computed gradient weights travel for inputs of ``dtype`` (a fused backward's dot operand,
    a gradient tile cuBLAS consumes): fp16 becomes fp32 (its range cannot hold them, see the module docstring),
    bf16 and fp32 stay. Also the dtype whose launch configuration such a backward uses."""
    return torch.float32 if dtype == torch.float16 else dtype


def grad_buffer_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of a gradient tile a kernel writes for cuBLAS to consume (a metric loss's ``W`` chunk, logprob's dlogits
    chunk), for inputs of ``dtype`` on ``device``: :func:`grad_dtype` on a GPU (bf16 stays bf16: half the bytes and
    a bf16 product; fp16 and fp32 give fp32), fp32 elsewhere (the CPU's products run in fp32)."""
    return grad_dtype(dtype) if device.type == "cuda" else torch.float32


def grad_dot_config(dtype: torch.dtype, device: torch.device, *, min_fp32_precision: str | None = None):
    """(operand dtype, input_precision) for the dots of a fused backward over inputs of ``dtype``, whose A operand
    is a computed gradient tile: as :func:`dot_config`, except fp16 inputs on a GPU, which run on fp32 operands as
    "tf32" (fp16 values convert to tf32 exactly: the recomputed similarity equals the fp16 dot's, and the gradient
    tile keeps fp16's 10-bit mantissa without fp16's range)."""
    if device.type == "cuda" and dtype == torch.float16:
        return tl.float32, "tf32"
    return dot_config(dtype, device, min_fp32_precision=min_fp32_precision)


def on_device(*tensors):
    """Context for a launch: Triton launches on torch's *current* CUDA device, so switch to the inputs'
    (a model spread with ``device_map="auto"`` otherwise crashes or computes on the wrong GPU)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result: the cuBLAS products that consume a gradient tile a kernel wrote. fp32
    operands as they are; bf16/fp16 operands on CUDA accumulate in fp32 inside cuBLAS (``out_dtype``) with
    no upcast copy; mixed or CPU operands are upcast (one bounded chunk at a time)."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(out_dtype=)
            return (a @ b).float()
    return a.float() @ b.float()
