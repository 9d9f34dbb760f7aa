"""Curation: which crawled images join the extra set, and the text feature each one trains with.

Every crawled image gets one decision: `kept`, or the first reason it was dropped. The reasons come from detectors,
each a small unit that scores the images it is given into its own decision columns and drops some of them; they run
in the order of DETECTORS (fetch errors and refusals are decided before, from the crawl's status): exact and near
duplicates (one copy of each group is kept), leaks (near copies of seed *test* images), the paper's two outlier
detectors (clusters far from the seed set; a seed-class classifier that disagrees with the query), and the distance to
the seed set (by default only for seed sets without classes). Kept images get the paper's linear text extrapolation
(filter/extrapolate.py). The same inputs give the same outputs bit for bit, whatever the number of threads
(filter/index.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from dextra.filter.copies import decode, pair_scorer, verifier
from dextra.filter.dedup import exact_duplicates, near_duplicates
from dextra.filter.detectors import SeedClassifier, cluster_detector, seed_spread_threshold
from dextra.filter.extrapolate import extrapolate_batch
from dextra.filter.index import (
    SEARCH_BATCH,
    add_to_lists,
    build_index,
    empty_lists,
    search,
    search_lists,
)
from dextra.pipeline.params import CurateParams


@dataclass
class SeedSet:
    """What curation needs of the seed set: train image embeddings, classes, caption features (one per train image)
    and first captions; test image embeddings and encoded test images (for the leak detector's hashes)."""

    train_ids: list[str]
    train_vectors: np.ndarray
    train_classes: list[str | None]
    caption_features: np.ndarray
    first_captions: list[str]
    test_ids: list[str]
    test_vectors: np.ndarray
    test_images: list[bytes] | None

    @property
    def has_classes(self) -> bool:
        return all(c is not None for c in self.train_classes) and len(set(self.train_classes)) > 1


@dataclass
class Crawl:
    """The fetched crawled images in question, aligned row by row."""

    ids: list[str]
    vectors: np.ndarray
    queries: list[str | None]
    classes: list[str | None]
    digests: list[str]
    hashes: list[bytes] | None
    read_images: Callable[[Sequence[int]], list[bytes]] | None  # encoded images of the given rows, read on demand
    urls: list[str] | None = None  # copies keep their first URL, and k-means meets rows in URL order


@dataclass
class Decisions:
    """One entry per crawled image, as columns (a dict per row would not fit a million rows): the outcome and its
    detail, and each detector's scores."""

    outcome: np.ndarray
    detail: np.ndarray
    duplicate_of: np.ndarray
    leak_of: np.ndarray
    cluster: np.ndarray
    predicted_class: np.ndarray
    leak_similarity: np.ndarray
    leak_copy_score: np.ndarray
    seed_similarity: np.ndarray
    cluster_similarity: np.ndarray
    class_confidence: np.ndarray

    @classmethod
    def empty(cls, n: int) -> Decisions:
        def text() -> np.ndarray:
            return np.full(n, None, object)

        def number() -> np.ndarray:
            return np.full(n, np.nan, np.float32)

        return cls(text(), text(), text(), text(), text(), text(), number(), number(), number(), number(), number())

    def drop(self, rows, outcome: str, details) -> None:
        """Give `outcome` to the rows that have none yet: the first reason found is the one recorded. Looks only at
        `rows` (detectors drop copies one at a time: a whole-column mask per call made 1M crawled quadratic)."""
        rows = np.asarray(rows, np.int64)
        still_open = np.equal(self.outcome[rows], None)
        self.outcome[rows[still_open]] = outcome
        self.detail[rows[still_open]] = np.asarray(details, object)[still_open]

    def open_mask(self) -> np.ndarray:
        return np.equal(self.outcome, None)

    def open_rows(self) -> np.ndarray:
        return np.flatnonzero(self.open_mask())


@dataclass
class Extrapolation:
    """For each kept row: its k nearest seed rows, their least-squares weights and the extrapolated text feature."""

    rows: np.ndarray
    neighbor_rows: np.ndarray
    weights: np.ndarray
    text: np.ndarray


@dataclass
class Context:
    """What every detector may read: the inputs, the params, and the search of the seed set done once up front
    (its neighbours are scores, extrapolation neighbours and near-copy lists alike)."""

    seed: SeedSet
    crawl: Crawl
    cfg: CurateParams
    random_seed: int
    seed_index: faiss.Index
    seed_scores: np.ndarray  # (crawl, K) similarities to the nearest seed train images, best first
    seed_neighbors: np.ndarray  # their rows in seed.train_vectors
    by_url: np.ndarray  # crawl rows in URL order
    url_rank: np.ndarray  # each crawl row's place in that order
    thresholds: dict[str, float] = field(default_factory=dict)


LIST_ROWS = 1_000_000  # crawled images held in inverted lists at once (fp16 codes: 1 GB at d = 512)


def _pairs(first: np.ndarray, second: np.ndarray, n_seed: int) -> np.ndarray:
    """The key of each pair of seed rows, whichever comes first; -1 where either is missing (-1)."""
    low, high = np.minimum(first, second), np.maximum(first, second)
    return np.where(low >= 0, low * n_seed + high, -1)


def _crawl_neighbors(
    vectors: np.ndarray, rows: np.ndarray, n_seed: int, seed_neighbors: np.ndarray, cfg: CurateParams, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Each of `vectors[rows]`'s k nearest neighbours among them (positions into rows). Exact up to
    exact_index_max; beyond, inverted lists keyed by seed images, whose neighbours are known already: every crawled
    image is filed under the pair of its two nearest seed images and probes every pair of its nprobe + 2 nearest, so
    lists cost no training and stay short at any crawl size (lists keyed by one seed image held n / n_seed images
    each: a scan quadratic in the crawl, hours at 10M). A near copy shares its original's nearest seed images: on
    tests/test_curate.py's crawl, 0.995 of copy pairs share a list so (a list per nearest seed image, 4 probed: 0.999).
    The lists hold LIST_ROWS images at a time; each part's neighbours are merged by (similarity, position)."""
    if len(rows) <= cfg.exact_index_max:
        members = vectors[rows]
        return search(build_index(members, cfg.exact_index_max), members, k)
    top = seed_neighbors[:, : cfg.nprobe + 2]
    if top.shape[1] == 1:  # a seed set of one image: one list
        top = np.repeat(top, 2, axis=1)
    filed = _pairs(top[rows, 0], top[rows, 1], n_seed)
    probed = list(itertools.combinations(range(top.shape[1]), 2))
    batches = [np.arange(start, min(len(rows), start + SEARCH_BATCH)) for start in range(0, len(rows), SEARCH_BATCH)]
    # what search_lists reports for a neighbour not found, so that a row's k best start as k such entries
    scores = np.full((len(rows), k), np.finfo(np.float32).min, np.float32)
    neighbors = np.full((len(rows), k), -1, np.int64)
    for part in range(0, len(rows), LIST_ROWS):
        held = np.arange(part, min(len(rows), part + LIST_ROWS))
        keys = np.unique(filed[held])
        lists = empty_lists(vectors.shape[1], len(keys))
        for start in range(0, len(held), SEARCH_BATCH):
            chunk = held[start : start + SEARCH_BATCH]
            add_to_lists(lists, vectors[rows[chunk]], np.searchsorted(keys, filed[chunk]))
        for b in batches:  # merged batch by batch: no (n, 2k) temporaries
            wanted = np.stack([_pairs(top[rows[b], i], top[rows[b], j], n_seed) for i, j in probed], axis=1)
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            probes = np.where((keys[at] == wanted) & (wanted >= 0), at, -1)
            found_scores, found = search_lists(lists, vectors[rows[b]], k, probes, np.zeros(probes.shape, np.float32))
            merged_scores = np.concatenate([scores[b], found_scores], axis=1)
            merged = np.concatenate([neighbors[b], np.where(found >= 0, found + part, -1)], axis=1)
            best = np.lexsort((np.where(merged >= 0, merged, len(rows)), -merged_scores), axis=-1)[:, :k]
            scores[b], neighbors[b] = np.take_along_axis(merged_scores, best, 1), np.take_along_axis(merged, best, 1)
        del lists
    return scores, neighbors


def _drop_copies(decisions: Decisions, ids: Sequence[str], copies: dict, outcome: str, detail: str) -> None:
    """Drop each copy row of {copy row: original row}, naming its original."""
    rows = np.fromiter(copies.keys(), np.int64, len(copies))
    decisions.duplicate_of[rows] = [ids[copies[r]] for r in rows]
    decisions.drop(rows, outcome, [detail] * len(rows))


class ExactDuplicates:
    """Same bytes as an earlier crawled image (in URL order): the first copy stays."""

    outcome = "duplicate"

    def __call__(self, ctx: Context, decisions: Decisions) -> None:
        crawl, by_url = ctx.crawl, ctx.by_url
        copies = exact_duplicates(by_url, [crawl.digests[r] for r in by_url])  # rows, not ids: no id -> row map
        _drop_copies(decisions, crawl.ids, copies, self.outcome, "same bytes")


class NearDuplicates:
    """A near copy of another crawled image still in question: CLIP neighbours propose, and alignment
    (filter/copies.py, the leak check's) confirms where the pHashes differ by more than
    curate.near_duplicate_hash_distance bits: crops, flips, rotations, borders and recolourings that pHash misses."""

    outcome = "duplicate"

    def __call__(self, ctx: Context, decisions: Decisions) -> None:
        crawl, cfg = ctx.crawl, ctx.cfg
        candidates = decisions.open_rows()
        scores, neighbors = _crawl_neighbors(crawl.vectors, candidates, ctx.seed_index.ntotal, ctx.seed_neighbors, cfg)

        def aligned(pairs: np.ndarray) -> np.ndarray:
            """Whether each pair (positions into candidates) copies: READ_ROWS pairs' pictures read at a time."""
            copies = []
            with pair_scorer(_workers(cfg), len(pairs)) as scores_of:
                for start in range(0, len(pairs), READ_ROWS):
                    used, at = np.unique(pairs[start : start + READ_ROWS], return_inverse=True)
                    scores = scores_of(crawl.read_images(candidates[used]), at.reshape(-1, 2).tolist(), cfg.leak_gate)
                    copies.append(np.array(scores) >= cfg.near_duplicate_copy_score)
            return np.concatenate(copies)

        near = near_duplicates(
            candidates,  # rows, not ids: no id -> row map
            neighbors,
            scores,
            cfg.near_duplicate_similarity,
            [crawl.hashes[r] for r in candidates] if crawl.hashes is not None else None,
            cfg.near_duplicate_hash_distance,
            aligned if crawl.read_images is not None else None,
            ctx.url_rank[candidates],
        )
        _drop_copies(decisions, crawl.ids, near, self.outcome, "near copy")


READ_ROWS = 10_000  # crawled images (leaks) or pairs (near copies) read and aligned at once


def _workers(cfg: CurateParams) -> int:
    """The processes that align pairs: curate.leak_workers, or one per CPU this process may use."""
    return cfg.leak_workers or len(os.sched_getaffinity(0))


class Leaks:
    """A near copy of a seed test image: CLIP proposes the curate.leak_candidates test images nearest to each crawled
    image still in question, a whole-picture comparison with every test image in its 8 turns proposes
    curate.leak_proposals more (CLIP misses rotated, mirrored and recoloured copies), and alignment verifies each
    pair (filter/copies.py); a copy's alignment score needs no CLIP agreement (the demo CLIP can call a recoloured
    copy dissimilar). A pair's coarse score must pass curate.leak_gate to be refined; a refined score of
    curate.leak_copy_score or more is a leak."""

    outcome = "leak"

    def __call__(self, ctx: Context, decisions: Decisions) -> None:
        seed, crawl, cfg = ctx.seed, ctx.crawl, ctx.cfg
        test_index = build_index(
            seed.test_vectors, cfg.exact_index_max, nprobe=cfg.nprobe, seed=ctx.random_seed, queries=len(crawl.ids)
        )
        leak_scores, leak_rows = search(test_index, crawl.vectors, min(cfg.leak_candidates, len(seed.test_ids)))
        decisions.leak_similarity[:] = leak_scores[:, 0]
        decisions.leak_of[:] = np.asarray(seed.test_ids, object)[leak_rows[:, 0]]
        if crawl.read_images is None or seed.test_images is None:
            return
        open_rows = decisions.open_rows()
        pictures = [decode(image) for image in seed.test_images]
        with verifier(seed.test_ids, pictures, _workers(cfg), len(open_rows)) as best_of_each:
            for start in range(0, len(open_rows), READ_ROWS):
                rows = open_rows[start : start + READ_ROWS]
                proposed = [leak_rows[row][leak_rows[row] >= 0] for row in rows]
                found = best_of_each(crawl.read_images(rows), proposed, cfg.leak_gate, cfg.leak_proposals)
                for row, (score, test_row) in zip(rows, found):
                    decisions.leak_copy_score[row] = score
                    if score < cfg.leak_copy_score:
                        continue
                    test_id = seed.test_ids[test_row]
                    similarity = float(seed.test_vectors[test_row] @ crawl.vectors[row])
                    decisions.leak_of[row], decisions.leak_similarity[row] = test_id, similarity
                    detail = f"copies seed test image {test_id}: alignment R^2 {score:.3f} >= {cfg.leak_copy_score}"
                    decisions.drop([row], self.outcome, [f"{detail}, CLIP {similarity:.3f}"])


class Clusters:
    """Detector 1: per query, k-means on the images still in question (copies and leaks don't shape clusters); a
    cluster whose centre is far from the seed set, by the seed's own spread, is dropped whole."""

    outcome = "cluster"

    def __call__(self, ctx: Context, decisions: Decisions) -> None:
        seed, crawl, cfg = ctx.seed, ctx.crawl, ctx.cfg
        if not cfg.cluster_detector:
            return
        threshold = seed_spread_threshold(ctx.seed_index, seed.train_vectors, cfg.seed_k, cfg.cluster_percentile)
        ctx.thresholds["cluster"] = threshold
        rows = ctx.by_url[decisions.open_mask()[ctx.by_url]]
        labels, centre = cluster_detector(
            crawl.vectors,
            rows,
            [crawl.queries[r] for r in rows],
            ctx.seed_index,
            cfg.seed_k,
            cfg.clusters_per_query,
            cfg.min_cluster_size,
            ctx.random_seed,
        )
        decisions.cluster[rows], decisions.cluster_similarity[rows] = labels, centre
        far = np.flatnonzero(centre < threshold)
        details = [f"cluster {labels[j]} centre similarity {centre[j]:.3f} < {threshold:.3f}" for j in far]
        decisions.drop(rows[far], self.outcome, details)


class Classes:
    """Detector 2: a classifier trained on the seed classes names another class than the query's, or is unsure."""

    outcome = "class"

    def __call__(self, ctx: Context, decisions: Decisions) -> None:
        seed, crawl, cfg = ctx.seed, ctx.crawl, ctx.cfg
        if not (cfg.class_detector and seed.has_classes):
            return
        classifier = SeedClassifier(seed.train_vectors, seed.train_classes, cfg.classifier_c, ctx.random_seed)
        predicted, confidence = classifier.predict(crawl.vectors)
        decisions.predicted_class[:], decisions.class_confidence[:] = predicted, confidence
        query_class = np.asarray(crawl.classes, object)
        wrong = np.flatnonzero(np.not_equal(query_class, None) & (predicted != query_class))
        details = [
            f"looks like class {predicted[r]} ({confidence[r]:.2f}), query is for class {query_class[r]}" for r in wrong
        ]
        decisions.drop(wrong, self.outcome, details)
        unsure = np.flatnonzero(confidence < cfg.min_class_confidence)
        details = [f"class confidence {confidence[r]:.2f} < {cfg.min_class_confidence}" for r in unsure]
        decisions.drop(unsure, self.outcome, details)


class Distance:
    """Less similar to its nearest seed images than the seed's own spread allows (curate.distance_detector; `auto`
    turns it on for seed sets without classes, where the class detector cannot run)."""

    outcome = "distance"

    def __call__(self, ctx: Context, decisions: Decisions) -> None:
        seed, cfg = ctx.seed, ctx.cfg
        if not (cfg.distance_detector == "on" or (cfg.distance_detector == "auto" and not seed.has_classes)):
            return
        threshold = seed_spread_threshold(ctx.seed_index, seed.train_vectors, cfg.seed_k, cfg.distance_percentile)
        ctx.thresholds["distance"] = threshold
        similarity = decisions.seed_similarity
        far = np.flatnonzero(similarity < threshold)
        decisions.drop(far, self.outcome, [f"seed similarity {similarity[r]:.3f} < {threshold:.3f}" for r in far])


Detector = Callable[[Context, Decisions], None]
# The order detectors run in; the first that drops an image gives its outcome.
DETECTORS: tuple[Detector, ...] = (ExactDuplicates(), NearDuplicates(), Leaks(), Clusters(), Classes(), Distance())


def curate(
    seed: SeedSet,
    crawl: Crawl,
    cfg: CurateParams,
    random_seed: int,
    device: torch.device,
    detectors: Sequence[Detector] = DETECTORS,
    scratch: Path | None = None,
) -> tuple[Decisions, Extrapolation, dict[str, float]]:
    """Decide every crawled image and extrapolate the kept ones; also returns the thresholds the detectors used.
    With a `scratch` folder, the kept images' text features are a memory-mapped float16 file there."""
    n = len(crawl.ids)
    # Where order matters (which copy a group keeps, k-means' sample), rows go in URL order, not url_id order:
    # url_ids hash the whole URL, so the demo's file:// URLs in another folder would shuffle the rows.
    by_url = np.array(sorted(range(n), key=crawl.urls.__getitem__) if crawl.urls is not None else range(n), np.int64)
    url_rank = np.empty(n, np.int64)
    url_rank[by_url] = np.arange(n)
    seed_index = build_index(seed.train_vectors, cfg.exact_index_max, nprobe=cfg.nprobe, seed=random_seed, queries=n)
    # nprobe + 2: the crawl's near-copy lists are keyed by pairs of them (_crawl_neighbors)
    seed_scores, seed_neighbors = search(seed_index, crawl.vectors, max(cfg.seed_k, cfg.k_neighbors, cfg.nprobe + 2))
    ctx = Context(seed, crawl, cfg, random_seed, seed_index, seed_scores, seed_neighbors, by_url, url_rank)
    decisions = Decisions.empty(n)
    decisions.seed_similarity[:] = seed_scores[:, : cfg.seed_k].mean(axis=1)
    for detector in detectors:
        detector(ctx, decisions)

    kept = decisions.open_rows()
    decisions.outcome[kept] = "kept"
    neighbors = seed_neighbors[kept, : cfg.k_neighbors]
    shape = (len(kept), seed.caption_features.shape[1])
    texts = None if scratch is None else np.lib.format.open_memmap(scratch / "kept_texts.npy", "w+", np.float16, shape)
    weights, text = extrapolate_batch(
        seed.train_vectors, seed.caption_features, crawl.vectors, neighbors, cfg.ridge, device, kept, texts
    )
    return decisions, Extrapolation(kept, neighbors, weights, text), ctx.thresholds
