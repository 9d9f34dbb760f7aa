"""faiss indexes chosen by size, as autofaiss does: exact search while it is cheap, then inverted lists with
half-precision codes, then product quantisation when even those would not fit the memory budget.
A GPU copy of the index is used when faiss-gpu sees a CUDA device. Vectors are L2-normalised, so inner
product = cosine similarity."""
from __future__ import annotations

import math

import faiss
import numpy as np

SEARCH_BATCH = 65_536


def describe(n: int, dim: int, exact_max: int, memory_budget_bytes: int) -> str:
    """The faiss factory string for n vectors of dim dimensions."""
    if n <= exact_max:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))  # ~√n lists keep training (64 points a list) cheap at 1M+
    if n * dim * 2 <= memory_budget_bytes:
        return f"IVF{nlist},SQfp16"
    return f"IVF{nlist},PQ{max(1, dim // 8)}x8"


def _to_gpu(index: faiss.Index) -> faiss.Index:
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def build_index(vectors: np.ndarray, exact_max: int = 200_000, memory_budget_bytes: int = 2 << 30, nprobe: int = 4, seed: int = 0) -> faiss.Index:
    """An index over `vectors` (float16 or float32; converted batch by batch, never copied whole)."""
    n, dim = vectors.shape
    spec = describe(n, dim, exact_max, memory_budget_bytes)
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 64 * faiss.extract_index_ivf(index).nlist), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        faiss.extract_index_ivf(index).nprobe = nprobe
    index = _to_gpu(index)
    for start in range(0, n, SEARCH_BATCH):
        index.add(np.ascontiguousarray(vectors[start : start + SEARCH_BATCH], dtype=np.float32))
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every query, in batches so float32 copies stay small."""
    k = min(k, index.ntotal)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), SEARCH_BATCH):
        chunk = np.ascontiguousarray(queries[start : start + SEARCH_BATCH], dtype=np.float32)
        scores[start : start + len(chunk)], ids[start : start + len(chunk)] = index.search(chunk, k)
    return scores, ids
