"""Zero-shot retrieval metrics: Recall@K, MAP@R and NMI, with faiss and without an N x N matrix.

Every embedding is a query against all the others (self-match excluded), by cosine similarity
(inner product of L2-normalized rows). Queries are searched in chunks, each returning only its
k = max(max(ks), R_max) nearest neighbours, so memory is O(chunk * k), never O(N^2).

- Recall@K: fraction of queries with at least one same-class item among their K nearest neighbours.
- MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check"): with R = (class size - 1),
  AP@R = (1/R) * sum_{i<=R} P(i) * rel(i), P(i) = precision of the first i neighbours; averaged over queries.
- NMI: k-means (faiss, k = number of classes, seeded) on the normalized embeddings, then
  sklearn's ``normalized_mutual_info_score(labels, clusters)``.
Queries whose class has no other member cannot be answered and are left out of Recall@K and MAP@R
(as pytorch-metric-learning's AccuracyCalculator does); NMI uses every point.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

_CHUNK_ENTRIES = 1 << 22  # neighbours held per chunk when chunk_size is None (about 100 MB of transients)
_FAISS_GPU_MAX_K = 2048


def _faiss():
    import faiss

    return faiss


def _use_gpu(embeddings) -> bool:
    faiss = _faiss()
    return (isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
            and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def _as_numpy_embeddings(embeddings) -> np.ndarray:
    """L2-normalized float32 C-contiguous rows."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().float().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"embeddings must be 2-D [N >= 2, D >= 1], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def _as_numpy_labels(labels, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be 1-D with one entry per embedding ({n}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def recall_at_k(matches: np.ndarray, k: int) -> np.ndarray:
    """Per query: 1.0 if any of the first ``k`` neighbours is relevant. ``matches``: bool [n, >=k]."""
    return matches[:, :k].any(axis=1).astype(np.float64)


def map_at_r(matches: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per query AP@R = (1/R) * sum_{i<=R} P(i) * rel(i). ``matches``: bool [n, >= max r]; ``r``: int [n] >= 1."""
    r = np.asarray(r)
    width = int(r.max())
    rel = matches[:, :width] & (np.arange(width)[None, :] < r[:, None])
    precision = np.cumsum(rel, axis=1) / np.arange(1, width + 1)
    return (precision * rel).sum(axis=1) / r


_map_at_r = map_at_r  # ``evaluate``'s keyword of the same name shadows the function inside it


def nmi_from_clusters(labels, clusters) -> float:
    """Normalized mutual information between class labels and a cluster assignment (sklearn's definition)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(labels), np.asarray(clusters)))


def kmeans_clusters(x: np.ndarray, num_clusters: int, seed: int = 0, gpu: bool = False, niter: int = 20) -> np.ndarray:
    """Cluster id of each row of ``x`` after faiss k-means (seeded; ``niter`` as pytorch-metric-learning). Every point
    trains (``min_points_per_centroid=1``: faiss's default of 39 only prints a warning when a held-out split has few
    images per class; the clustering is the same)."""
    faiss = _faiss()
    km = faiss.Kmeans(x.shape[1], num_clusters, niter=niter, seed=seed, verbose=False, gpu=gpu,
                      min_points_per_centroid=1)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


_gpu_resources = []  # one faiss StandardGpuResources, created on first GPU use and kept alive


def _build_index(x: np.ndarray, gpu: bool):
    faiss = _faiss()
    if gpu:
        if not _gpu_resources:
            _gpu_resources.append(faiss.StandardGpuResources())
        index = faiss.GpuIndexFlatIP(_gpu_resources[0], x.shape[1])
    else:
        index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def knn_excluding_self(index, x: np.ndarray, k: int, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start row, neighbour ids [chunk, k]) for every query chunk; each row's own id is removed
    (or, if a tie pushed it out of the first k + 1, the (k+1)-th neighbour is dropped)."""
    for start in range(0, len(x), chunk_size):
        stop = min(start + chunk_size, len(x))
        _, ids = index.search(x[start:stop], k + 1)
        is_self = ids == np.arange(start, stop)[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        yield start, ids[~is_self].reshape(stop - start, k)


def evaluate(embeddings, labels, ks: Sequence[int] = (1, 2, 4, 8), *, nmi: bool = True, map_at_r: bool = True,
             chunk_size: int | None = None, seed: int = 0) -> dict:
    """Retrieval metrics of ``embeddings`` [N, D] (torch or numpy) with integer ``labels`` [N].

    Returns {"R@k" for k in ks, "NMI" (if nmi), "MAP@R" (if map_at_r)} as floats. ``chunk_size``: queries
    per faiss search (default: about 4M neighbours per chunk). ``seed``: the k-means seed.
    """
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    use_gpu = _use_gpu(embeddings)
    x = _as_numpy_embeddings(embeddings)
    y = _as_numpy_labels(labels, len(x))
    n = len(x)
    if max(ks) > n - 1:
        raise ValueError(f"ks must be <= N - 1 = {n - 1} (self-match excluded), got max {max(ks)}")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1  # relevant items per query
    answerable = r > 0
    if not answerable.any():
        raise ValueError("every class in labels has a single item: no query has a correct neighbour")
    k = min(n - 1, max(max(ks), int(r.max()) if map_at_r else 0))
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ENTRIES // (k + 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    index = _build_index(x, use_gpu and k + 1 <= _FAISS_GPU_MAX_K)
    hits = {kk: 0.0 for kk in ks}
    ap_sum = 0.0
    for start, ids in knn_excluding_self(index, x, k, chunk_size):
        rows = slice(start, start + len(ids))
        keep = answerable[rows]
        if not keep.any():  # a chunk of queries whose classes have no other member: nothing to score
            continue
        matches = (y[ids] == y[rows, None])[keep]
        for kk in ks:
            hits[kk] += recall_at_k(matches, kk).sum()
        if map_at_r:
            ap_sum += _map_at_r(matches, r[rows][keep]).sum()
    num_queries = int(answerable.sum())
    out = {f"R@{kk}": float(hits[kk] / num_queries) for kk in ks}
    if nmi:
        out["NMI"] = nmi_from_clusters(y, kmeans_clusters(x, len(classes), seed=seed, gpu=use_gpu))
    if map_at_r:
        out["MAP@R"] = float(ap_sum / num_queries)
    return out


def evaluate_embedder(embedder, dataset, *, max_images: int = 0, workers: int = 0,
                      autocast=contextlib.nullcontext) -> dict:
    """:func:`evaluate` of ``embedder``'s embeddings of ``dataset``'s first ``max_images`` images (0: all), decoded by
    ``workers`` DataLoader processes and embedded in batches of 64 inside the ``autocast()`` context."""
    from .data.stream import data_loader

    n = len(dataset) if not max_images else min(len(dataset), max_images)
    chunks, labels = [], []
    with autocast():
        for batch in data_loader(torch.utils.data.Subset(dataset, range(n)), workers, batch_size=64):
            chunks.append(embedder.embed_images(batch.images))
            labels.extend(batch.labels)
    return evaluate(torch.cat(chunks).float(), torch.tensor(labels))
