"""Shared machinery of the streaming metric losses (SupCon, Multi-Similarity, Proxy Anchor, Potential Field).

* :func:`check_embeddings_labels` validates an ``[N, D]`` float embedding matrix (N >= 0, D >= 1) and its
  ``[N]`` integer labels (lengths, dtypes, device, finiteness) with errors that name the argument;
* :func:`inverse_norms` / :func:`normalize_backward` let the kernels take RAW rows plus fp32 inverse row
  norms ``r`` (cosine tile = ``(x_i . x_j) r_i r_j``) and turn ``u_i = r_i dL/dxhat_i`` into ``dL/dx``;
  :func:`l2_normalize` is ``x / max(||x||_2, eps)`` row-wise (pytorch-metric-learning's cosine
  convention) through autograd;
* :func:`remap_labels` turns arbitrary integer labels into dense ``int32`` ids (a host sync);
  :func:`label_ids` gives equality-preserving ``int32`` ids and :func:`pair_counts` the per-row positive /
  negative pair counts without one (sort + binary search), for the pair losses (SupCon, MS);
* :func:`check_real` / :func:`check_positive` validate scalar hyper-parameters;
* :func:`compute_dtype` / :func:`tile_size` fix the precision and tile size of the PyTorch fallbacks;
  :func:`pair_tiles`, :func:`tiled_pair_backward` and :func:`tiled_pair_products` are the fallbacks'
  streaming loops over row blocks of the similarity matrix (one ``[rows, M]`` tile alive at a time);
* device helpers of the pair-loss kernels (:func:`cosine_tile`, :func:`pair_tile_masks`) and the host
  driver of their large-D backward (:func:`chunked_grad_products`: a kernel writes the scaled gradient
  tile ``W`` for a bounded chunk once, cuBLAS does the products).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_finite, check_index_range, check_same_device, check_tensor
from ._tl_utils import tile_dot
from ._triton import tl, triton

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


def check_label_range(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Every label lies in ``[0, num_classes)`` (e.g. labels indexing a proxy table)."""
    check_index_range(name, labels, num_classes)


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


def l2_normalize(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Row-wise ``x / max(||x||_2, eps)``; its backward is autograd's
    ``(g - x_hat * <x_hat, g>) / ||x||`` (pytorch-metric-learning's CosineSimilarity uses the same)."""
    return F.normalize(x, p=2, dim=1, eps=eps)


def remap_labels(*labels: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Map the values of all ``labels`` tensors jointly to dense ``int32`` ids in ``[0, K)``.

    Equal values get equal ids across tensors, so ``a[i] == b[j]`` is preserved. Returns the remapped
    tensors (same shapes, contiguous) and K, the number of distinct values.
    """
    flat = torch.cat([lab.reshape(-1).to(torch.int64) for lab in labels])
    uniq, inverse = torch.unique(flat, return_inverse=True)
    out, start = [], 0
    for lab in labels:
        out.append(inverse[start : start + lab.numel()].to(torch.int32).reshape(lab.shape).contiguous())
        start += lab.numel()
    return out, int(uniq.numel())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fallbacks: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_size(n_cols: int, tile_elems: int = FALLBACK_TILE_ELEMS) -> int:
    """Rows per fallback tile so that one ``[rows, n_cols]`` tile holds about ``tile_elems`` entries."""
    return max(1, min(n_cols, tile_elems // max(n_cols, 1)))


def pair_masks(lq: torch.Tensor, lk: torch.Tensor, row_offset: int, exclude_diagonal: bool):
    """(positive, negative, diag) for the tile ``rows = row_offset + arange(len(lq))`` x all columns.

    With ``exclude_diagonal`` (the key set is the query batch itself) the pairs ``i == j`` are neither
    positive nor negative, and ``diag`` indexes them in the tile (for ``tile[diag] = ...``); else None.
    """
    pos = lq[:, None] == lk[None, :]
    neg = ~pos  # (i, i) has equal labels, so it is never a negative
    diag = None
    if exclude_diagonal:
        r = torch.arange(lq.numel(), device=lq.device)
        diag = (r, r + row_offset)
        pos[diag] = False
    return pos, neg, diag


def pair_tiles(q: torch.Tensor, k: torch.Tensor, lq: torch.Tensor, lk: torch.Tensor,
               exclude_diagonal: bool) -> Iterator:
    """Yield ``(r0, r1, s, pos, neg, diag)`` per block of query rows (see :func:`pair_masks`),
    ``s = q[r0:r1] @ k^T`` a fresh tensor in the compute dtype (callers may overwrite it). The tiling
    depends only on the shapes, so a backward that calls this again sees bit-identical similarities
    (and identical mining decisions)."""
    cd = compute_dtype(q.dtype)
    kc = k.to(cd)
    rows = tile_size(k.shape[0])
    for r0 in range(0, q.shape[0], rows):
        r1 = min(q.shape[0], r0 + rows)
        s = q[r0:r1].to(cd) @ kc.T
        yield (r0, r1, s, *pair_masks(lq[r0:r1], lk, r0, exclude_diagonal))


def tiled_pair_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    lq: torch.Tensor,
    lk: torch.Tensor,
    grad_tile: Callable,
    *,
    exclude_diagonal: bool,
    need_dq: bool,
    need_dk: bool,
):
    """``dq = G k`` and ``dk = G^T q`` for ``G = dLoss/dS`` built tile by tile by
    ``grad_tile(r0, r1, s, pos, neg, diag)``; returns (dq, dk) in the compute dtype (None if not needed)."""
    cd = compute_dtype(q.dtype)
    kc = k.to(cd)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device) if need_dq else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_dk else None
    for r0, r1, s, pos, neg, diag in pair_tiles(q, k, lq, lk, exclude_diagonal):
        g = grad_tile(r0, r1, s, pos, neg, diag)
        if need_dq:
            dq[r0:r1] = g @ kc
        if need_dk:
            dk += g.T @ q[r0:r1].to(cd)
    return dq, dk


def tiled_pair_products(
    q: torch.Tensor,
    k: torch.Tensor | None,
    lq: torch.Tensor,
    lk: torch.Tensor,
    grad_tile: Callable,
    *,
    exclude_diagonal: bool,
    need_dq: bool,
    need_dk: bool,
):
    """The fallbacks' backward products for ``G = dLoss/dS`` built tile by tile by
    ``grad_tile(r0, r1, s, pos, neg, diag)`` (same arguments as :func:`pair_tiles` yields).

    ``k`` None (the batch against itself): ``grad_tile`` returns the symmetrized tile ``G_ij + G_ji`` and
    ``dq = sum_j (G + G^T)_ij q_j`` costs two matmuls per tile (similarity and product); dk is None.
    Otherwise ``dq = G k`` and ``dk = G^T q`` (each only if needed). Returns (dq, dk) in the compute dtype.
    """
    cd = compute_dtype(q.dtype)
    keys, lkeys = (q, lq) if k is None else (k, lk)
    kc = keys.to(cd)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device) if (need_dq or k is None) else None
    dk = torch.zeros(keys.shape, dtype=cd, device=q.device) if (need_dk and k is not None) else None
    for r0, r1, s, pos, neg, diag in pair_tiles(q, keys, lq, lkeys, exclude_diagonal):
        g = grad_tile(r0, r1, s, pos, neg, diag)
        if dq is not None:
            dq[r0:r1] = g @ kc
        if dk is not None:
            dk += g.T @ q[r0:r1].to(cd)
    return dq, dk


# ----------------------------------------------------------------------------------------------------
# Pair-loss kernels: device helpers and the large-D backward driver
# ----------------------------------------------------------------------------------------------------
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
def pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL: tl.constexpr):
    """(positive, negative) pair masks of a tile: in range, equal / different label ids, and with
    EXCLUDE_DIAGONAL the pairs ``rows == cols`` dropped."""
    valid = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_DIAGONAL:
        valid = valid & (rows[:, None] != cols[None, :])
    same = la[:, None] == lb[None, :]
    return valid & same, valid & (la[:, None] != lb[None, :])


def label_ids(*labels: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous ``int32`` ids for the values of all ``labels`` tensors jointly: equal ids iff equal labels.

    No host sync (unlike :func:`remap_labels`): a value's id is the position of its first occurrence in the
    sorted concatenation (ids lie in ``[0, total length)``, not dense). The kernels compare 32-bit ids,
    whatever the labels' dtype and range: half the label traffic and fewer registers than int64 labels.
    """
    flat = torch.cat([lab.reshape(-1).to(torch.int64) for lab in labels])
    ordered = torch.sort(flat).values
    return [torch.searchsorted(ordered, lab.to(torch.int64).contiguous()).to(torch.int32) for lab in labels]


def pair_counts(lq: torch.Tensor, lk: torch.Tensor, exclude_diagonal: bool):
    """(positive, negative) pair counts per query (int64 [N]) against the keys' labels ``lk``: keys with the
    same / a different label, the pair (i, i) not counted when ``exclude_diagonal``. No host sync (sort and
    binary search), so the kernels need not count."""
    ordered = torch.sort(lk.to(torch.int64)).values
    q = lq.to(torch.int64).contiguous()
    same = torch.searchsorted(ordered, q, right=True) - torch.searchsorted(ordered, q)
    return same - int(exclude_diagonal), lk.numel() - same


GRAD_CHUNK_BYTES = 64 * 2**20  # the large-D backward's gradient tile: at most this many bytes per chunk


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result. fp32 operands as they are; half operands on CUDA accumulate in fp32
    inside cuBLAS (``out_dtype``) with no upcast copy; elsewhere (the CPU) they are upcast."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            return (a @ b).float()
    return a.float() @ b.float()


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
