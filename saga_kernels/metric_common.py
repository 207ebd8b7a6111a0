"""What every streaming metric loss (SupCon, Multi-Similarity, Proxy Anchor, Potential Field) shares.

Helpers only the pair losses (SupCon, MS) use live in :mod:`saga_kernels.pair_common`, those only the proxy
losses (Proxy Anchor, Potential Field) use in :mod:`saga_kernels.proxy_common`.

* :func:`check_embeddings_labels` validates an ``[N, D]`` float embedding matrix (N >= 0, D >= 1) and its
  ``[N]`` integer labels (lengths, dtypes, device, finiteness) with errors that name the argument;
  :func:`check_real` / :func:`check_positive` validate scalar hyper-parameters;
* :func:`inverse_norms` / :func:`normalize_backward` let the kernels take RAW rows plus fp32 inverse row
  norms ``r`` (cosine tile = ``(x_i . x_j) r_i r_j``) and turn ``u_i = r_i dL/dxhat_i`` into ``dL/dx``;
* :func:`compute_dtype` / :func:`tile_size` fix the precision and tile size of the PyTorch fallbacks;
* what the launchers share: :func:`kernel_operand` (rows as the kernels read them), :func:`is_half`,
  :func:`block_k`, and the host driver of every large-D backward (:func:`chunked_grad_products`: a kernel
  writes the scaled gradient tile ``W`` for a bounded chunk once, cuBLAS does the products through
  :func:`mm_fp32`; :func:`launch_grad_chunks` launches that kernel per chunk).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from ._tl_utils import cdiv, grad_buffer_dtype, mm_fp32, on_device

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Rows x columns of one similarity tile in the PyTorch fallbacks: 4 MiB of fp32 per tile.
FALLBACK_TILE_ELEMS = 1 << 20


def check_embeddings_labels(
    embeddings,
    labels,
    *,
    embeddings_name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Raise a TypeError/ValueError naming the argument unless ``embeddings`` is a finite float ``[N, D]``
    tensor (N >= 0, D >= 1) and ``labels`` an integer ``[N]`` tensor on the same device. Finiteness is a
    value check (:func:`saga_kernels._checks.check_finite`: sync on the CPU, asynchronous on CUDA)."""
    check_tensor(embeddings_name, embeddings, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(labels_name, labels, ndim=1, dtypes=INT_DTYPES)
    n, d = embeddings.shape
    if d == 0:
        raise ValueError(f"{embeddings_name} must have at least one column, got shape {list(embeddings.shape)}")
    if labels.shape[0] != n:
        raise ValueError(
            f"{labels_name} has {labels.shape[0]} entries but {embeddings_name} has {n} rows; they must match"
        )
    check_same_device(**{embeddings_name: embeddings, labels_name: labels})
    check_finite(embeddings_name, embeddings)


def check_real(name: str, value) -> float:
    """``value`` is a finite real number; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """``value`` is a finite real number > 0; return it as a float."""
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


NORM_EPS = 1e-12  # pytorch-metric-learning's (and F.normalize's) clamp of the row norm


def inverse_norms(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``r_i = 1 / max(||x_i||_2, eps)`` per row, computed and returned in float32 (float64 for float64 x)
    without an upcast copy of ``x``. The kernels take raw rows plus ``r`` and form unit-row similarities as
    ``(x_i . x_j) r_i r_j``: half-precision rows feed the tensor cores as they are, and the normalization
    itself is never rounded to the input dtype."""
    acc = compute_dtype(x.dtype)
    return torch.linalg.vector_norm(x, dim=1, dtype=acc).clamp_min(eps).reciprocal()


def normalize_backward(x: torch.Tensor, inv_norm: torch.Tensor, u: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """dL/dx from ``u_i = r_i * dL/dxhat_i`` for ``xhat_i = x_i r_i`` (r from :func:`inverse_norms`):

        dL/dx_i = r_i (g_i - xhat_i <xhat_i, g_i>) = u_i - r_i^2 <x_i, u_i> x_i,     g_i = dL/dxhat_i

    (rows whose norm was clamped at ``eps`` have the Jacobian r I, so there dL/dx_i = u_i). In u's dtype."""
    xc = x.to(u.dtype)
    radial = (xc * u).sum(dim=1) * inv_norm.to(u.dtype).square()
    clamped = inv_norm >= 1.0 / eps
    return u - torch.where(clamped, 0.0, radial)[:, None] * xc


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fallbacks: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_size(n_cols: int, tile_elems: int = FALLBACK_TILE_ELEMS) -> int:
    """Rows per fallback tile so that one ``[rows, n_cols]`` tile holds about ``tile_elems`` entries."""
    return max(1, min(n_cols, tile_elems // max(n_cols, 1)))


# ----------------------------------------------------------------------------------------------------
# What the launchers share: operands as the kernels read them, dot chunk, the large-D backward driver
# ----------------------------------------------------------------------------------------------------
def kernel_operand(t: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows as the kernels read them: unit stride along D (any row stride); fp64 runs in fp32 on Triton."""
    if impl == "triton" and t.dtype == torch.float64:
        t = t.float()
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def is_half(dtype: torch.dtype) -> bool:
    """bf16 / fp16: fed to the tensor cores as they are."""
    return dtype in (torch.bfloat16, torch.float16)


def block_k(dtype: torch.dtype) -> int:
    """D chunk of the streamed similarity dots: 64 half elements or 32 fp32 ones, 128 bytes per row. A loss
    streams its forward and its gradient tile with the same chunk, so the backward recomputes the forward's
    similarities with the same summation order (bit for bit)."""
    return 64 if is_half(dtype) else 32


GRAD_CHUNK_BYTES = 64 * 2**20  # the large-D backward's gradient tile: at most this many bytes per chunk


def chunked_grad_products(write_chunk: Callable, a: torch.Tensor, b: torch.Tensor | None, *,
                          need_da: bool, need_db: bool, buf_dtype: torch.dtype, block_rows: int, block_cols: int):
    """The large-D backward: ``u_a = W b`` and ``u_b = W^T a`` (fp32) for the scaled gradient matrix
    ``W`` (``[Na, Nb]``), which is never whole in memory.

    For each chunk of rows ``[r0, r1)`` and columns ``[c0, c1)`` (at most :data:`GRAD_CHUNK_BYTES`,
    multiples of the kernel's blocks) ``write_chunk(w, r0, r1, c0, c1)`` fills ``w = W[r0:r1, c0:c1]``
    (one similarity recompute), then cuBLAS does the products. ``b`` None: the batch against itself, W
    is the symmetrized gradient and ``u_a = W a`` is the only product (2 similarity-sized matmuls in
    all); otherwise 3 (recompute, ``W b``, ``W^T a``). Returns (u_a, u_b), None where not needed.
    """
    symmetric = b is None
    keys = a if symmetric else b
    na, nb, d = a.shape[0], keys.shape[0], a.shape[1]
    u_a = torch.zeros(na, d, dtype=torch.float32, device=a.device) if (need_da or symmetric) else None
    u_b = torch.zeros(nb, d, dtype=torch.float32, device=a.device) if (need_db and not symmetric) else None
    if na == 0 or nb == 0 or (u_a is None and u_b is None):
        return u_a, u_b
    elt = torch.finfo(buf_dtype).bits // 8
    budget = max(1, GRAD_CHUNK_BYTES // elt)
    cols = min(nb, max(block_cols, budget // block_rows // block_cols * block_cols))
    rows = min(na, max(block_rows, budget // cols // block_rows * block_rows))
    buf = torch.empty(rows, cols, dtype=buf_dtype, device=a.device)
    for r0 in range(0, na, rows):
        r1 = min(na, r0 + rows)
        for c0 in range(0, nb, cols):
            c1 = min(nb, c0 + cols)
            w = buf[: r1 - r0, : c1 - c0]
            write_chunk(w, r0, r1, c0, c1)
            if u_a is not None:
                u_a[r0:r1] += mm_fp32(w, keys[c0:c1])
            if u_b is not None:
                u_b[c0:c1] += mm_fp32(w.T, a[r0:r1])
    return u_a, u_b


def launch_grad_chunks(kernel, cfg: dict, chunk_args: Callable, a: torch.Tensor, b: torch.Tensor | None, *,
                       dtype: torch.dtype, need_da: bool, need_db: bool):
    """:func:`chunked_grad_products` with a gradient-tile kernel as the chunk writer: chunk ``w`` (rows
    ``[r0, r1)``, columns ``[c0, c1)``) is one launch ``kernel[grid](*chunk_args(w, r0, r1, c0, c1), **cfg)``
    over its [BLOCK_M, BLOCK_N] tiles, on the inputs' device (``cfg``: the launch configuration plus the
    kernel's constexprs). The chunk buffer holds bf16 for bf16 inputs on a GPU, fp32 otherwise (fp16 cannot hold
    gradient weights: ``_tl_utils.grad_buffer_dtype``)."""

    def write_chunk(w, r0, r1, c0, c1):
        grid = (cdiv(r1 - r0, cfg["BLOCK_M"]), cdiv(c1 - c0, cfg["BLOCK_N"]))
        with on_device(a):
            kernel[grid](*chunk_args(w, r0, r1, c0, c1), **cfg)

    buf_dtype = grad_buffer_dtype(dtype, a.device)
    return chunked_grad_products(write_chunk, a, b, need_da=need_da, need_db=need_db, buf_dtype=buf_dtype,
                                 block_rows=cfg["BLOCK_M"], block_cols=cfg["BLOCK_N"])
