"""The paper's two outlier detectors, and the distance fallback for datasets without classes.

All work on L2-normalised CLIP image embeddings; "similarity to the seed set" is the mean cosine similarity to
the k nearest seed train images, and thresholds are percentiles of the seed's own spread (each seed image's
similarity to its k nearest *other* seed images), so they adapt to the dataset and the CLIP model.
"""
from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
from sklearn.linear_model import LogisticRegression

from .index import search


def seed_similarity(seed_index: faiss.Index, vectors: np.ndarray, k: int) -> np.ndarray:
    scores, _ = search(seed_index, vectors, k)
    return scores.mean(axis=1)


def seed_spread_threshold(seed_index: faiss.Index, seed: np.ndarray, k: int, percentile: float) -> float:
    """The percentile of each seed image's mean similarity to its k nearest other seed images."""
    scores, _ = search(seed_index, seed, k + 1)
    return float(np.percentile(scores[:, 1:].mean(axis=1), percentile))


def cluster_detector(
    vectors: np.ndarray, rows: np.ndarray, queries: Sequence[str | None], seed_index: faiss.Index, k: int, clusters_per_query: int, min_cluster_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Detector 1: per query, k-means (faiss, spherical) on the crawled images `vectors[rows]`; returns each row's
    cluster label ("<query>#<n>") and the similarity of its cluster's centre to the seed set. A whole cluster far
    from the seed is off-topic for its query (e.g. the band, not the bird), even where a few members lie close."""
    labels = np.empty(len(rows), object)
    centre_similarity = np.empty(len(rows), np.float32)
    groups: dict[str | None, list[int]] = {}
    for position, query in enumerate(queries):
        groups.setdefault(query, []).append(position)
    for query, positions in sorted(groups.items(), key=lambda item: str(item[0])):
        members = np.ascontiguousarray(vectors[rows[positions]], dtype=np.float32)
        n_clusters = max(1, min(clusters_per_query, len(positions) // min_cluster_size))
        if n_clusters == 1:
            assignment = np.zeros(len(positions), np.int64)
            centres = members.mean(axis=0, keepdims=True)
        else:
            kmeans = faiss.Kmeans(members.shape[1], n_clusters, niter=10, seed=seed, spherical=True, min_points_per_centroid=1)
            kmeans.train(members)
            centres = kmeans.centroids
            assignment = kmeans.index.search(members, 1)[1][:, 0]
        centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
        centre_similarity[positions] = seed_similarity(seed_index, centres, k)[assignment]
        labels[positions] = [f"{query}#{c}" for c in assignment]
    return labels, centre_similarity


class ClassDetector:
    """Detector 2: a classifier (scikit-learn logistic regression) trained on the seed train embeddings and classes."""

    def __init__(self, seed: np.ndarray, classes: Sequence[str], regularisation: float, random_state: int):
        self.model = LogisticRegression(C=regularisation, max_iter=2000, random_state=random_state)
        self.model.fit(seed, np.asarray(classes))

    def predict(self, vectors: np.ndarray, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class and its probability for every vector."""
        labels, confidence = [], []
        for start in range(0, len(vectors), batch):
            probabilities = self.model.predict_proba(vectors[start : start + batch])
            best = probabilities.argmax(axis=1)
            labels.append(self.model.classes_[best])
            confidence.append(probabilities[np.arange(len(best)), best])
        if not labels:
            return np.array([], object), np.array([], np.float32)
        return np.concatenate(labels), np.concatenate(confidence).astype(np.float32)
