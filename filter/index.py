"""faiss indexes chosen by size, as autofaiss does: exact search while it is cheap, then inverted lists with
half-precision codes, then product quantisation when even those would not fit the memory budget.
An exact index is searched on the GPU when faiss-gpu sees a CUDA device; inverted lists stay on the CPU, filled
and probed through list numbers computed here (below). Vectors are L2-normalised, so inner
product = cosine similarity.

Every result is the same whatever the number of threads. faiss's exact search runs on BLAS, whose sums are
ordered by how the work is split between threads (1 vs 2 threads move a similarity by up to 1e-6 relative),
enough to move an image across a threshold. So BLAS only proposes neighbours; their similarities are recomputed
pair by pair (faiss's per-pair kernel, one fixed order) and ranked with ties broken by row. Inverted lists are
trained single-threaded and filled and probed by those exact similarities, and their scan is per pair already.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

SEARCH_BATCH = 65_536
# (query, vector) pairs up to which a search is exact: 1M crawled x 10k seed images, about 3 CPU-minutes on 2 cores;
# 10M crawled would take half an hour
EXACT_PAIRS = 10**10
RESCORE_MARGIN = 8  # extra candidates fetched so that a near-tie at rank k cannot drop a true neighbour


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS and one OpenMP thread: for what BLAS shapes (k-means centres, a classifier), whose result would
    otherwise depend on the thread count."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(threads)


def describe(n: int, dim: int, exact_max: int, memory_budget_bytes: int) -> str:
    """The faiss factory string for n vectors of dim dimensions."""
    if n <= exact_max:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))  # ~√n lists keep training (64 points a list) cheap at 1M+
    if n * dim * 2 <= memory_budget_bytes:
        return f"IVF{nlist},SQfp16"
    return f"IVF{nlist},PQ{max(1, dim // 8)}x8"


def gpus() -> int:
    """CUDA devices faiss can use: 0 with faiss-cpu, which has no get_num_gpus."""
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def _to_gpu(index: faiss.Index) -> faiss.Index:
    if gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _batches(vectors: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """float32 copies of SEARCH_BATCH rows at a time (vectors may be float16)."""
    for start in range(0, len(vectors), SEARCH_BATCH):
        yield start, np.ascontiguousarray(vectors[start : start + SEARCH_BATCH], dtype=np.float32)


def build_index(
    vectors: np.ndarray,
    exact_max: int = 200_000,
    memory_budget_bytes: int = 2 << 30,
    nprobe: int = 4,
    seed: int = 0,
    queries: int = 0,
) -> faiss.Index:
    """An index over `vectors` (float16 or float32; converted batch by batch, never copied whole) for `queries`
    queries: exact up to exact_max vectors unless the queries would compare more than EXACT_PAIRS pairs."""
    n, dim = vectors.shape
    if n * queries > EXACT_PAIRS:
        exact_max = 0
    index = faiss.index_factory(dim, describe(n, dim, exact_max, memory_budget_bytes), faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        for _, batch in _batches(vectors):
            index.add(batch)
        return _to_gpu(index)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, 64 * faiss.extract_index_ivf(index).nlist), replace=False))
    with single_threaded():
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    for _, batch in _batches(vectors):
        add_to_lists(ivf, batch, _exact_search(quantizer, batch, 1)[1][:, 0])
    return index


def empty_lists(dim: int, nlist: int) -> faiss.IndexIVF:
    """nlist empty inverted lists (half-precision codes), filled and probed through add_to_lists and search_lists with
    list numbers the caller computes: their coarse quantizer is never trained or searched (an empty one holds its
    place)."""
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False
    )  # by_residual False: the codes are the vectors themselves
    ivf.referenced_objects = [quantizer]  # keep the quantizer alive as long as the lists
    ivf.is_trained = True  # fp16 codes have nothing to learn
    return ivf


def add_to_lists(ivf: faiss.IndexIVF, vectors: np.ndarray, lists: np.ndarray) -> None:
    """Append float32 `vectors` to the given lists (one list number per vector); ids continue from ntotal."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    ivf.add_core(len(vectors), faiss.swig_ptr(vectors), None, faiss.swig_ptr(lists))


def search_lists(
    ivf: faiss.IndexIVF, queries: np.ndarray, k: int, probes: np.ndarray, probe_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every query among the lists it probes (rows of `probes`, with the query's
    similarity to each list's centre); -1 where fewer than k were found."""
    ivf.nprobe = probes.shape[1]
    ivf.parallel_mode = 3  # queries split between threads inside search_preassigned too (mode 0 splits only in search)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start, batch in _batches(queries):
        end = start + len(batch)
        probe, probe_score = (
            np.ascontiguousarray(probes[start:end], np.int64),
            np.ascontiguousarray(probe_scores[start:end], np.float32),
        )
        scores[start:end], ids[start:end] = ivf.search_preassigned(batch, k, probe, probe_score)
    return scores, ids


def inner_products(queries: np.ndarray, base: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """⟨queries[i], base[pairs[i, j]]⟩, each summed in one fixed order (faiss's per-pair kernel): the same bits
    whatever the thread count or the row's position in the batch."""
    queries, base = np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(base, np.float32)
    pairs = np.ascontiguousarray(pairs, np.int64)
    out = np.empty(pairs.shape, np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(queries),
        faiss.swig_ptr(base),
        faiss.swig_ptr(pairs),
        queries.shape[1],
        *pairs.shape,
    )
    return out


def _exact_search(index: faiss.IndexFlat, batch: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """BLAS proposes k + RESCORE_MARGIN candidates; per-pair inner products rank them, ties by row."""
    _, candidates = index.search(batch, min(index.ntotal, k + RESCORE_MARGIN))
    scores = inner_products(
        batch, faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d), candidates
    )
    order = np.lexsort((candidates, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every query, in batches so float32 copies stay small."""
    k = min(k, index.ntotal)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        probe_scores, probes = search(faiss.downcast_index(ivf.quantizer), queries, ivf.nprobe)
        return search_lists(ivf, queries, k, probes, probe_scores)
    find = (
        functools.partial(_exact_search, index) if isinstance(index, faiss.IndexFlat) else index.search
    )  # else a GPU copy
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start, batch in _batches(queries):
        scores[start : start + len(batch)], ids[start : start + len(batch)] = find(batch, k)
    return scores, ids
