"""Shared machinery of the streaming metric losses (SupCon, Multi-Similarity, Proxy Anchor, Potential Field).

* :func:`check_embeddings_labels` validates an ``[N, D]`` float embedding matrix (N >= 0, D >= 1) and its
  ``[N]`` integer labels (lengths, dtypes, device, finiteness) with errors that name the argument;
  :func:`check_proxy_inputs` does the same for a possibly empty batch plus a proxy table (the proxy losses);
* :func:`inverse_norms` / :func:`normalize_backward` let the kernels take RAW rows plus fp32 inverse row
  norms ``r`` (cosine tile = ``(x_i . x_j) r_i r_j``) and turn ``u_i = r_i dL/dxhat_i`` into ``dL/dx``;
  :func:`l2_normalize` is ``x / max(||x||_2, eps)`` row-wise (pytorch-metric-learning's cosine
  convention) through autograd;
* :func:`remap_labels` turns arbitrary integer labels into dense ``int32`` ids (a host sync);
  :func:`label_ids` gives equality-preserving ``int32`` ids and :func:`pair_counts` the per-row positive /
  negative pair counts without one (sort + binary search), for the pair losses (SupCon, MS);
* :func:`check_real` / :func:`check_positive` validate scalar hyper-parameters;
* :func:`compute_dtype` / :func:`tile_size` fix the precision and tile size of the PyTorch fallbacks;
  :func:`pair_tiles` and :func:`tiled_pair_products` are the fallbacks' streaming loops over row blocks of
  the similarity matrix (one ``[rows, M]`` tile alive at a time);
* what the launchers share: :func:`kernel_operand` / :func:`kernel_labels` (the tensors as the kernels
  read them), :func:`is_half`, :func:`block_k`, :func:`launch_dtype`, :func:`column_splits` (split the
  columns of a sweep when rows are few), the fused-backward limits and launch configuration of the proxy
  losses (:func:`fits_fused_backward`, :func:`fused_backward_config`);
* device helpers of the pair-loss kernels (:func:`pair_tile_masks`, :func:`norms_labels`, and one column
  tile with its masks: :func:`streamed_pair_tile` over raw rows through
  :func:`saga_kernels._tl_utils.cosine_tile`, :func:`resident_pair_tile` against rows resident in a fused
  backward program) and the host driver of every large-D backward
  (:func:`chunked_grad_products`: a kernel writes the scaled gradient tile ``W`` for a bounded chunk
  once, cuBLAS does the products through :func:`mm_fp32`; :func:`launch_grad_chunks` launches that
  kernel per chunk).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_finite, check_index_range, check_same_device, check_tensor
from ._tl_utils import block_range, cdiv, cosine_tile, load_rows, mm_fp32, next_pow2, on_device
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


def check_proxy_inputs(embeddings, labels, proxies, proxy_labels=None, *, rows: str) -> None:
    """The inputs of a proxy loss: ``embeddings`` [N >= 0, D] with ``labels`` [N] (an empty batch needs only
    empty labels), finite float ``proxies`` [``rows`` >= 1, D] and, when given, integer ``proxy_labels`` (one
    per proxy), all on one device. Errors name the argument; ``rows`` names the proxy count in them."""
    check_tensor("embeddings", embeddings, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, ndim=1, dtypes=INT_DTYPES)
    if embeddings.shape[0] > 0:
        check_embeddings_labels(embeddings, labels)
    elif labels.shape[0] != 0:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has 0 rows; they must match")
    check_tensor("proxies", proxies, ndim=2, dtypes=FLOAT_DTYPES)
    named = dict(embeddings=embeddings, labels=labels, proxies=proxies)
    if proxy_labels is not None:
        check_tensor("proxy_labels", proxy_labels, ndim=1, dtypes=INT_DTYPES)
        named["proxy_labels"] = proxy_labels
    if proxies.shape[0] == 0 or proxies.shape[1] != embeddings.shape[1] or proxies.shape[1] == 0:
        raise ValueError(
            f"proxies must have shape [{rows} >= 1, {embeddings.shape[1]}] (embeddings are {list(embeddings.shape)}), "
            f"got {list(proxies.shape)}"
        )
    if proxy_labels is not None and proxy_labels.shape[0] != proxies.shape[0]:
        raise ValueError(
            f"proxy_labels has {proxy_labels.shape[0]} entries but proxies has {proxies.shape[0]} rows; they must match"
        )
    check_same_device(**named)
    check_finite("proxies", proxies)


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
# What the launchers share: operands as the kernels read them, dtypes, column splits, fused-backward limits
# ----------------------------------------------------------------------------------------------------
def kernel_operand(t: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows as the kernels read them: unit stride along D (any row stride); fp64 runs in fp32 on Triton."""
    if impl == "triton" and t.dtype == torch.float64:
        t = t.float()
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def kernel_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as loaded by the kernels: int32/int64 as they are (unit stride), other int dtypes widened."""
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    return labels if labels.stride(0) == 1 else labels.contiguous()


def is_half(dtype: torch.dtype) -> bool:
    """bf16 / fp16: fed to the tensor cores as they are."""
    return dtype in (torch.bfloat16, torch.float16)


def block_k(dtype: torch.dtype) -> int:
    """D chunk of the streamed similarity dots: 64 half elements or 32 fp32 ones, 128 bytes per row. A loss
    streams its forward and its gradient tile with the same chunk, so the backward recomputes the forward's
    similarities with the same summation order (bit for bit)."""
    return 64 if is_half(dtype) else 32


def launch_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype both operands of a dot are cast to inside the kernels (a no-op when they match)."""
    return x.dtype if x.dtype == w.dtype else torch.promote_types(x.dtype, w.dtype)


TARGET_PROGRAMS = 528  # column splits until about this many programs run (4 per SM of an H100 SXM)
PARTIAL_BYTES = 256 * 2**20  # fused backward: fp32 partial sums over column splits stay under this


def column_splits(row_programs: int, n_cols: int, block: int, cap: int | None = None) -> tuple[int, int]:
    """(number of column splits, columns per split: a multiple of ``block``) for a sweep over ``n_cols``
    columns by ``row_programs`` row blocks: split until about TARGET_PROGRAMS programs run (at most ``cap``
    splits)."""
    tiles = max(1, cdiv(n_cols, block))
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(row_programs, 1), cap if cap is not None else tiles))
    per_split = cdiv(tiles, splits)
    return cdiv(tiles, per_split), per_split * block


def partial_sums_cap(rows: int, d: int) -> int:
    """Most column splits whose fp32 partial sums (``[splits, rows, d]``) stay under PARTIAL_BYTES."""
    return max(1, PARTIAL_BYTES // (4 * max(1, rows) * d))


def fits_fused_backward(d: int, dtype: torch.dtype, max_fused_d: int) -> bool:
    """Whether a proxy loss's backward accumulates D in one program: D <= ``max_fused_d`` for half inputs,
    D <= ``max_fused_d`` / 2 for fp32 (tf32x3 splits the [BLOCK_N, BLOCK_D] product operand into three
    register copies: at D = 512 that and the 128-register accumulator spill 4-8 KB per thread at any
    BLOCK_N)."""
    return d <= (max_fused_d if is_half(dtype) else max_fused_d // 2)


def fused_backward_config(d: int, dtype: torch.dtype) -> dict:
    """A proxy loss's fused backward kernel: the [BLOCK_M, BLOCK_D] fp32 accumulator lives in registers
    (64 x 512 over 8 warps: 128 per thread), the [BLOCK_N, BLOCK_D] product operand in shared memory next
    to the similarity's two pipelined stages. BLOCK_N = 32 (16 for fp32 beyond D = 128) keeps registers at
    <= 252 with no spills (sm_90 compile, tests); 64 spills at D = 512."""
    block_d = max(16, next_pow2(d))
    block_m = 128 if block_d <= 128 else 64
    block_n = 32 if (is_half(dtype) or block_d <= 128) else 16
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k(dtype), BLOCK_D=block_d, num_warps=8,
                num_stages=2)


# ----------------------------------------------------------------------------------------------------
# Pair-loss kernels: device helpers and the large-D backward driver
# ----------------------------------------------------------------------------------------------------
@triton.jit
def pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL: tl.constexpr):
    """(positive, negative) pair masks of a tile: in range, equal / different label ids, and with
    EXCLUDE_DIAGONAL the pairs ``rows == cols`` dropped."""
    valid = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_DIAGONAL:
        valid = valid & (rows[:, None] != cols[None, :])
    same = la[:, None] == lb[None, :]
    return valid & same, valid & (la[:, None] != lb[None, :])


@triton.jit
def norms_labels(r_ptr, l_ptr, idx, ok):
    """(fp32 inverse norms, int32 label ids) of the rows ``idx`` of a pair-loss kernel (0 where masked)."""
    return tl.load(r_ptr + idx, mask=ok, other=0.0), tl.load(l_ptr + idx, mask=ok, other=0)


@triton.jit
def streamed_pair_tile(a_ptr, b_ptr, ra, la, rb_ptr, lb_ptr, rows, row_ok, c0, c1, K, stride_a, stride_b,
                       EXCLUDE_DIAGONAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Columns ``[c0, c0 + BLOCK_C)`` (< c1) of b against the rows of a, the similarity streamed over K
    (:func:`~saga_kernels._tl_utils.cosine_tile`): (cols, col_ok, rb, cosines, positive, negative)."""
    cols, col_ok = block_range(c0, c1, BLOCK_C)
    rb, lb = norms_labels(rb_ptr, lb_ptr, cols, col_ok)
    s = cosine_tile(a_ptr, b_ptr, ra, rb, rows, cols, row_ok, col_ok, K, stride_a, stride_b,
                    BLOCK_R, BLOCK_C, BLOCK_K, DOT_DTYPE, PRECISION)
    pos, neg = pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL)
    return cols, col_ok, rb, s, pos, neg


@triton.jit
def resident_pair_tile(xa, ra, la, rows, row_ok, b_ptr, rb_ptr, lb_ptr, c0, c1, stride_b, dd, d_ok,
                       EXCLUDE_DIAGONAL: tl.constexpr, BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Columns ``[c0, c0 + BLOCK_C)`` (< c1) of b against rows ``xa`` resident in one fused-backward program
    (the whole D in one dot): (cols, col_ok, the b tile in DOT_DTYPE (for ``W @ b``), ra_i rb_j, cosines,
    positive, negative)."""
    cols, col_ok = block_range(c0, c1, BLOCK_C)
    rb, lb = norms_labels(rb_ptr, lb_ptr, cols, col_ok)
    xb = load_rows(b_ptr, cols, col_ok, stride_b, dd, d_ok).to(DOT_DTYPE)
    rr = ra[:, None] * rb[None, :]
    s = tl.dot(xa, tl.trans(xb), input_precision=PRECISION) * rr
    pos, neg = pair_tile_masks(rows, cols, row_ok, col_ok, la, lb, EXCLUDE_DIAGONAL)
    return cols, col_ok, xb, rr, s, pos, neg


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
    kernel's constexprs). The chunk buffer holds ``dtype`` for half inputs on a GPU, fp32 otherwise."""

    def write_chunk(w, r0, r1, c0, c1):
        grid = (cdiv(r1 - r0, cfg["BLOCK_M"]), cdiv(c1 - c0, cfg["BLOCK_N"]))
        with on_device(a):
            kernel[grid](*chunk_args(w, r0, r1, c0, c1), **cfg)

    buf_dtype = dtype if (a.is_cuda and is_half(dtype)) else torch.float32
    return chunked_grad_products(write_chunk, a, b, need_da=need_da, need_db=need_db, buf_dtype=buf_dtype,
                                 block_rows=cfg["BLOCK_M"], block_cols=cfg["BLOCK_N"])
