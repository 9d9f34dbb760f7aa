"""The `curate` stage: which crawled images join the extra set, and the text feature each one trains with.

Every crawled URL gets one decision row: `kept`, or the first reason it was dropped, checked in this order —
fetch error / refused, duplicate (same bytes, or a near copy of another crawled image: one copy is kept),
leak (a near copy of a seed *test* image), cluster (detector 1), class (detector 2), distance (per-image
distance to the seed set; by default only for datasets without classes) — with every score computed for it.
Kept images get the paper's linear text extrapolation (filter/extrapolate.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dextra.pipeline.atomic import atomic_path, write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import CurateParams, Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import (
    CURATED_FIELDS,
    CURATED_SCHEMA,
    DECISION_SCHEMA,
    IMAGE_SCHEMA,
    STATUS_SCHEMA,
    URL_SCHEMA,
    read_embeddings,
    read_table,
    read_tables,
    shard_files,
    write_table,
)

from .dedup import LeakBank, exact_duplicates, near_duplicates
from .detectors import ClassDetector, cluster_detector, seed_spread_threshold
from .extrapolate import extrapolate_batch
from .index import build_index, search


@dataclass
class Seed:
    """What curate needs of the seed set: train embeddings and classes, caption features, test embeddings."""

    ids: list[str]
    vectors: np.ndarray
    classes: list[str | None]
    caption_features: np.ndarray
    first_captions: list[str]
    test_ids: list[str]
    test_vectors: np.ndarray
    test_images: list[bytes] | None


@dataclass
class Crawl:
    """The fetched crawled images still in question, aligned row by row."""

    ids: list[str]
    vectors: np.ndarray
    queries: list[str | None]
    classes: list[str | None]
    digests: list[str]
    hashes: list[bytes] | None
    images: list[bytes] | None


@dataclass
class Decisions:
    """One entry per crawled image in question, as columns: a dict per row would not fit a million rows."""

    outcome: np.ndarray
    detail: np.ndarray
    duplicate_of: np.ndarray
    leak_of: np.ndarray
    cluster: np.ndarray
    predicted_class: np.ndarray
    leak_similarity: np.ndarray
    leak_hash_distance: np.ndarray
    seed_similarity: np.ndarray
    cluster_similarity: np.ndarray
    class_confidence: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Decisions":
        text = lambda: np.full(n, None, object)  # noqa: E731
        number = lambda: np.full(n, np.nan, np.float32)  # noqa: E731
        return cls(text(), text(), text(), text(), text(), text(), number(), number(), number(), number(), number())

    def drop(self, rows, outcome: str, details) -> None:
        """Give `outcome` to the rows that have none yet: the first reason found is the one recorded."""
        for row, detail in zip(rows, details):
            if self.outcome[row] is None:
                self.outcome[row], self.detail[row] = outcome, detail

    def open_rows(self) -> np.ndarray:
        return np.flatnonzero(self.outcome == None)  # noqa: E711 (elementwise)


@dataclass
class Extrapolation:
    """For each kept row: its k nearest seed rows, their least-squares weights and the extrapolated text feature."""

    rows: np.ndarray
    neighbor_rows: np.ndarray
    weights: np.ndarray
    text: np.ndarray


def curate_core(seed: Seed, crawl: Crawl, cfg: CurateParams, random_seed: int, device: torch.device) -> tuple[Decisions, Extrapolation, dict]:
    """Decide every crawled image and extrapolate the kept ones; also returns the thresholds used."""
    n = len(crawl.ids)
    d = Decisions.empty(n)
    position = {image_id: row for row, image_id in enumerate(crawl.ids)}

    for copy, original in exact_duplicates(crawl.ids, crawl.digests).items():
        d.duplicate_of[position[copy]] = original
        d.drop([position[copy]], "duplicate", ["same bytes"])
    candidates = d.open_rows()
    crawl_index = build_index(crawl.vectors[candidates], cfg.exact_index_max, nprobe=cfg.nprobe, seed=random_seed)
    neighbor_scores, neighbor_rows = search(crawl_index, crawl.vectors[candidates], 10)
    del crawl_index
    near = near_duplicates(
        [crawl.ids[r] for r in candidates], neighbor_rows, neighbor_scores, cfg.near_duplicate_similarity,
        [crawl.hashes[r] for r in candidates] if crawl.hashes is not None else None,
        (lambda j: crawl.images[candidates[j]]) if crawl.images is not None else None,
        cfg.near_duplicate_hash_distance,
    )
    del neighbor_scores, neighbor_rows
    for copy, original in near.items():
        d.duplicate_of[position[copy]] = original
        d.drop([position[copy]], "duplicate", ["near copy"])

    # Leaks: the closest seed test image by CLIP, and by pHash against the crop banks of all test images.
    test_index = build_index(seed.test_vectors, cfg.exact_index_max, nprobe=cfg.nprobe, seed=random_seed)
    leak_scores, leak_rows = search(test_index, crawl.vectors, 1)
    d.leak_similarity[:] = leak_scores[:, 0]
    d.leak_of[:] = np.asarray(seed.test_ids, object)[leak_rows[:, 0]]
    if crawl.hashes is not None and seed.test_images is not None:
        closest, matched = LeakBank(seed.test_ids, seed.test_images).matches(crawl.hashes, cfg.leak_hash_distance)
        d.leak_hash_distance[:] = closest
        for row in np.flatnonzero(closest <= cfg.leak_hash_distance):
            similarities = seed.test_vectors[matched[row]] @ crawl.vectors[row].astype(np.float32)
            best = int(similarities.argmax())
            if similarities[best] >= cfg.leak_similarity:
                test_id = seed.test_ids[matched[row][best]]
                d.leak_of[row], d.leak_similarity[row] = test_id, similarities[best]
                d.drop([row], "leak", [f"copies seed test image {test_id}: pHash within {cfg.leak_hash_distance} bits, CLIP {similarities[best]:.3f}"])

    seed_index = build_index(seed.vectors, cfg.exact_index_max, nprobe=cfg.nprobe, seed=random_seed)
    seed_scores, seed_neighbors = search(seed_index, crawl.vectors, max(cfg.seed_k, cfg.k_neighbors))  # once, for scores and extrapolation
    d.seed_similarity[:] = seed_scores[:, : cfg.seed_k].mean(axis=1)
    del seed_scores
    thresholds = {}

    if cfg.cluster_detector:
        thresholds["cluster"] = seed_spread_threshold(seed_index, seed.vectors, cfg.seed_k, cfg.cluster_percentile)
        rows = d.open_rows()  # copies and leaks don't shape clusters
        labels, centre = cluster_detector(crawl.vectors, rows, [crawl.queries[r] for r in rows], seed_index, cfg.seed_k, cfg.clusters_per_query, cfg.min_cluster_size, random_seed)
        d.cluster[rows], d.cluster_similarity[rows] = labels, centre
        far = np.flatnonzero(centre < thresholds["cluster"])
        d.drop(rows[far], "cluster", [f"cluster {labels[j]} centre similarity {centre[j]:.3f} < {thresholds['cluster']:.3f}" for j in far])

    has_classes = all(c is not None for c in seed.classes) and len(set(seed.classes)) > 1
    if cfg.class_detector and has_classes:
        predicted, confidence = ClassDetector(seed.vectors, seed.classes, cfg.classifier_c, random_seed).predict(crawl.vectors)
        d.predicted_class[:], d.class_confidence[:] = predicted, confidence
        wrong = [r for r in range(n) if crawl.classes[r] is not None and predicted[r] != crawl.classes[r]]
        d.drop(wrong, "class", [f"looks like class {predicted[r]} ({confidence[r]:.2f}), query is for class {crawl.classes[r]}" for r in wrong])
        unsure = np.flatnonzero(confidence < cfg.min_class_confidence)
        d.drop(unsure, "class", [f"class confidence {confidence[r]:.2f} < {cfg.min_class_confidence}" for r in unsure])

    if cfg.distance_detector == "on" or (cfg.distance_detector == "auto" and not has_classes):
        thresholds["distance"] = seed_spread_threshold(seed_index, seed.vectors, cfg.seed_k, cfg.distance_percentile)
        far = np.flatnonzero(d.seed_similarity < thresholds["distance"])
        d.drop(far, "distance", [f"seed similarity {d.seed_similarity[r]:.3f} < {thresholds['distance']:.3f}" for r in far])

    kept = d.open_rows()
    d.outcome[kept] = "kept"
    neighbors = seed_neighbors[kept, : cfg.k_neighbors]
    weights, text = extrapolate_batch(seed.vectors, seed.caption_features, crawl.vectors[kept], neighbors, cfg.ridge, device)
    return d, Extrapolation(kept, neighbors, weights, text.astype(np.float16)), thresholds


def _caption_features(paths: Paths, seed_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """One text feature per seed train image (the normalised mean of its captions' features) and its first caption."""
    table, vectors = read_embeddings([paths.embedding_file("seed_captions", "train")])
    rows: dict[str, list[int]] = {}
    for row, image_id in enumerate(table.column("id").to_pylist()):
        rows.setdefault(image_id, []).append(row)
    missing = [i for i in seed_ids if i not in rows]
    if missing:
        raise InputError(f"{paths.embedding_file('seed_captions', 'train')}: no caption embedding for seed image {missing[0]} (re-run `dextra embed`)")
    captions = table.column("caption").to_pylist()
    mean = np.stack([vectors[rows[i]].mean(axis=0) for i in seed_ids])
    return mean / np.linalg.norm(mean, axis=1, keepdims=True), [captions[rows[i][0]] for i in seed_ids]


def load_seed(paths: Paths) -> Seed:
    train_info, train_vectors = read_embeddings([paths.embedding_file("seed_images", "train")])
    test_info, test_vectors = read_embeddings([paths.embedding_file("seed_images", "test")])
    ids = train_info.column("id").to_pylist()
    classes = dict(zip(*(read_table(paths.seed_split("train"), columns=["id", "class"]).column(c).to_pylist() for c in ("id", "class"))))
    test = read_table(paths.seed_split("test"), columns=["id", "image"])
    test_images = dict(zip(test.column("id").to_pylist(), test.column("image").to_pylist()))
    test_ids = test_info.column("id").to_pylist()
    caption_features, first_captions = _caption_features(paths, ids)
    return Seed(ids, train_vectors, [classes.get(i) for i in ids], caption_features, first_captions, test_ids, test_vectors, [test_images[i] for i in test_ids])


def _url_rows(paths: Paths) -> pa.Table:
    status = read_table(paths.crawl_status, STATUS_SCHEMA)
    urls = read_tables(sorted(paths.urls.glob("*.parquet")), URL_SCHEMA)
    first = {}
    for row, url_id in enumerate(urls.column("url_id").to_pylist()):
        first.setdefault(url_id, row)
    urls = urls.take(sorted(first.values()))  # a URL in several lists: the first list's row, as fetch does
    joined = status.join(urls, "url_id", join_type="left outer")
    unknown = pc.sum(pc.is_null(joined.column("url"))).as_py() or 0
    if unknown:
        raise InputError(f"{paths.crawl_status}: {unknown} url_id(s) are in no list under {paths.urls} (re-run `dextra urls` and `dextra fetch`)")
    return joined.sort_by("url_id")


def load_crawl(paths: Paths, rows: pa.Table) -> Crawl:
    fetched = set(rows.filter(pc.equal(rows["status"], "ok")).column("url_id").to_pylist())
    shards = read_tables(shard_files(paths.crawl_shards), IMAGE_SCHEMA, columns=["id", "sha256", "image"])
    info, vectors = read_embeddings(sorted((paths.embeddings / "crawl_images").glob("*.parquet")))
    position = {i: n for n, i in enumerate(info.column("id").to_pylist())}
    by_id = {i: n for n, i in enumerate(shards.column("id").to_pylist())}
    missing = sorted(fetched - by_id.keys())
    if missing:
        raise InputError(f"{paths.crawl_status}: {len(missing)} URL(s) marked ok have no image in {paths.crawl_shards}, e.g. {missing[0]}")
    ids = sorted(fetched)
    unembedded = [i for i in ids if i not in position]
    if unembedded:
        raise InputError(f"{paths.embeddings / 'crawl_images'}: no embedding for crawled image {unembedded[0]} (re-run `dextra embed`)")
    meta = {r["url_id"]: r for r in rows.select(["url_id", "query", "class"]).to_pylist()}
    hashes = info.column("phash").to_pylist() if "phash" in info.column_names else None
    images, digests = shards.column("image").to_pylist(), shards.column("sha256").to_pylist()
    return Crawl(
        ids=ids,
        vectors=vectors[[position[i] for i in ids]] if ids else np.zeros((0, vectors.shape[1] if vectors.size else 1), np.float32),
        queries=[meta[i]["query"] for i in ids],
        classes=[meta[i]["class"] for i in ids],
        digests=[digests[by_id[i]] for i in ids],
        hashes=[hashes[position[i]] for i in ids] if hashes is not None else None,
        images=[images[by_id[i]] for i in ids],
    )


def _decision_table(rows: pa.Table, crawl: Crawl, d: Decisions) -> pa.Table:
    """One row per URL: the crawl decisions for fetched URLs, fetch_error / refused for the rest."""
    url_ids = rows.column("url_id").to_pylist()
    position = {image_id: row for row, image_id in enumerate(crawl.ids)}
    at = np.array([position.get(u, -1) for u in url_ids], np.int64)
    fetched = at >= 0
    refused = np.isin(rows.column("status").to_numpy(zero_copy_only=False), ["refused", "opt-out"])  # not tried, by rule or by the site's wish
    outcome = np.where(refused, "refused", "fetch_error").astype(object)
    detail = np.asarray(rows.column("error").to_pylist(), object)
    outcome[fetched], detail[fetched] = d.outcome[at[fetched]], d.detail[at[fetched]]
    columns = {name: rows.column(name) for name in ("url_id", "url", "query", "class", "source")}
    columns.update(outcome=pa.array(outcome, pa.string()), detail=pa.array(detail, pa.string()))
    for field in DECISION_SCHEMA:
        if field.name in columns:
            continue
        values = getattr(d, field.name)[np.where(fetched, at, 0)]
        if values.dtype == object:
            columns[field.name] = pa.array(np.where(fetched, values, None), field.type)
        else:  # NaN marks a score never computed; int columns (pHash bits) hold whole numbers
            columns[field.name] = pa.array(np.nan_to_num(values), mask=~fetched | np.isnan(values)).cast(field.type)
    return pa.table(columns)


def run(params: Params, paths: Paths) -> dict:
    for needed in (paths.crawl_status, paths.embedding_file("seed_images", "train"), paths.embedding_file("seed_images", "test")):
        if not needed.exists():
            raise InputError(f"{needed}: not found (run the stages before `curate`: dvc repro curate)")
    rows = _url_rows(paths)
    seed, crawl = load_seed(paths), load_crawl(paths, rows)
    d, extra, thresholds = curate_core(seed, crawl, params.curate, params.seed, pick_device(params.device))
    decisions = _decision_table(rows, crawl, d)
    kept_at = {crawl.ids[r]: j for j, r in enumerate(extra.rows)}
    row_of = {image_id: row for row, image_id in enumerate(crawl.ids)}
    with atomic_path(paths.curated) as tmp:
        (tmp / paths.curated_shards.name).mkdir(parents=True)
        write_table(decisions, tmp / paths.decisions.name, DECISION_SCHEMA)
        for shard in shard_files(paths.crawl_shards):
            table = read_table(shard)
            table = table.filter(pa.array([u in kept_at for u in table.column("id").to_pylist()], pa.bool_()))
            ids = table.column("id").to_pylist()
            j = np.array([kept_at[u] for u in ids], np.int64)
            neighbours = extra.neighbor_rows[j]
            values = {
                "text_embedding": list(extra.text[j]),
                "neighbor_ids": [[seed.ids[s] for s in row] for row in neighbours],
                "neighbor_weights": list(extra.weights[j].astype(np.float32)),
                "neighbor_captions": [[seed.first_captions[s] for s in row] for row in neighbours],
            }
            for field in CURATED_FIELDS:
                table = table.append_column(field, pa.array(values[field.name], field.type))
            for name in ("seed_similarity", "leak_similarity", "cluster_similarity", "class_confidence"):
                scores = getattr(d, name)[[row_of[u] for u in ids]]
                table = table.append_column(name, pa.array(scores, pa.float32(), mask=np.isnan(scores)))
            write_table(table, tmp / paths.curated_shards.name / shard.name, CURATED_SCHEMA)
        outcomes = {o["values"]: o["counts"] for o in pc.value_counts(decisions.column("outcome")).to_pylist()}
        summary = {"outcomes": outcomes, "thresholds": thresholds, "leak_hash_distance": params.curate.leak_hash_distance}
        write_json(tmp / paths.curate_summary.name, summary)
    return summary
