"""The paper's two outlier detectors, and the distance fallback for datasets without classes.

All work on L2-normalised CLIP image embeddings; "similarity to the seed set" is the mean cosine similarity to
the k nearest seed train images, and thresholds are percentiles of the seed's own spread (each seed image's
similarity to its k nearest *other* seed images), so they adapt to the dataset and the CLIP model.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
from sklearn.linear_model import LogisticRegression

from dextra.filter.index import gpus, inner_products, search, single_threaded


def seed_similarity(seed_index: faiss.Index, vectors: np.ndarray, k: int) -> np.ndarray:
    scores, _ = search(seed_index, vectors, k)
    return scores.mean(axis=1)


def seed_spread_threshold(seed_index: faiss.Index, seed: np.ndarray, k: int, percentile: float) -> float:
    """The percentile of each seed image's mean similarity to its k nearest other seed images."""
    scores, _ = search(seed_index, seed, k + 1)
    return float(np.percentile(scores[:, 1:].mean(axis=1), percentile))


def cluster_detector(
    vectors: np.ndarray,
    rows: np.ndarray,
    queries: Sequence[str | None],
    seed_index: faiss.Index,
    k: int,
    clusters_per_query: int,
    min_cluster_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Detector 1: per query, k-means (faiss, spherical) on the crawled images `vectors[rows]`; returns each row's
    cluster label ("<query>#<n>") and the similarity of its cluster's centre to the seed set. A whole cluster far
    from the seed is off-topic for its query (e.g. the band, not the bird), even where a few members lie close."""
    labels = np.empty(len(rows), object)
    centre_of = np.empty(len(rows), np.int64)  # row of each member's centre in `centres`
    centres, offset = [], 0
    names, group = np.unique(np.asarray([str(q) for q in queries], object), return_inverse=True)
    by_group = np.argsort(group, kind="stable")
    for query, positions in zip(names, np.split(by_group, np.cumsum(np.bincount(group, minlength=len(names)))[:-1])):
        members = np.ascontiguousarray(vectors[rows[positions]], dtype=np.float32)
        n_clusters = max(1, min(clusters_per_query, len(positions) // min_cluster_size))
        if n_clusters == 1:
            assignment = np.zeros(len(positions), np.int64)
            centres.append(members.mean(axis=0, keepdims=True))
        else:
            # faiss trains on at most 256 sampled points a centre, then every member is assigned; on the GPU when
            # faiss-gpu sees one (its sums are ordered otherwise, so its centres differ from the CPU's in the last bits)
            kmeans = faiss.Kmeans(
                members.shape[1],
                n_clusters,
                niter=10,
                seed=seed,
                spherical=True,
                min_points_per_centroid=1,
                gpu=gpus() > 0,
            )
            with single_threaded():  # centres and assignments must not depend on the thread count
                kmeans.train(members)
                assignment = kmeans.index.search(members, 1)[1][:, 0]
            centres.append(kmeans.centroids)
        centre_of[positions] = offset + assignment
        offset += len(centres[-1])
        labels[positions] = [f"{query}#{c}" for c in assignment]
    if not centres:
        return labels, np.empty(0, np.float32)
    centres = np.concatenate(centres)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return labels, seed_similarity(seed_index, centres, k)[centre_of]


class SeedClassifier:
    """The class detector's classifier (scikit-learn logistic regression) trained on the seed train embeddings and
    classes."""

    def __init__(self, seed: np.ndarray, classes: Sequence[str], regularisation: float, random_state: int):
        self.model = LogisticRegression(C=regularisation, max_iter=2000, random_state=random_state)
        with single_threaded():  # multi-threaded BLAS would change the weights' last bits with the thread count
            self.model.fit(seed, np.asarray(classes))

    def predict(self, vectors: np.ndarray, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class and its probability for every vector: the model's softmax, with the logits summed
        pair by pair so that they do not depend on the thread count or the row's position (filter/index.py)."""
        weights = self.model.coef_.astype(np.float32)
        bias = self.model.intercept_.astype(np.float32)
        every_class = np.broadcast_to(np.arange(len(weights)), (min(batch, len(vectors)), len(weights)))
        labels, confidence = [], []
        for start in range(0, len(vectors), batch):
            chunk = vectors[start : start + batch]
            logits = inner_products(chunk, weights, every_class[: len(chunk)]) + bias
            if logits.shape[1] == 1:  # two classes: scikit-learn keeps one row of weights, for the second class
                logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
            probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            best = probabilities.argmax(axis=1)
            labels.append(self.model.classes_[best])
            confidence.append(probabilities[np.arange(len(best)), best])
        if not labels:
            return np.array([], object), np.array([], np.float32)
        return np.concatenate(labels), np.concatenate(confidence).astype(np.float32)
