"""The `curate` stage: which crawled images join the extra set, and the text feature each one trains with.

Every crawled URL gets one decision row: `kept`, or the first reason it was dropped, checked in this order —
fetch error / refused, duplicate (same bytes, or a near copy of another crawled image: one copy is kept),
leak (a near copy of a seed *test* image), cluster (detector 1), class (detector 2), distance (per-image
distance to the seed set; by default only for datasets without classes) — with every score computed for it.
Kept images get the paper's linear text extrapolation (filter/extrapolate.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dextra.filter.dedup import LeakBank, exact_duplicates, near_duplicates
from dextra.filter.detectors import ClassDetector, cluster_detector, seed_spread_threshold
from dextra.filter.extrapolate import extrapolate_batch
from dextra.filter.index import (
    SEARCH_BATCH,
    add_to_lists,
    build_index,
    inner_products,
    lists_over,
    search,
    search_lists,
)
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
    read_images: Callable[[Sequence[int]], list[bytes]] | None  # encoded images of the given rows, read on demand
    urls: list[str] | None = None  # copies keep their first URL, and k-means meets rows in URL order


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
    def empty(cls, n: int) -> Decisions:
        text = lambda: np.full(n, None, object)  # noqa: E731
        number = lambda: np.full(n, np.nan, np.float32)  # noqa: E731
        return cls(text(), text(), text(), text(), text(), text(), number(), number(), number(), number(), number())

    def drop(self, rows, outcome: str, details) -> None:
        """Give `outcome` to the rows that have none yet: the first reason found is the one recorded."""
        rows = np.asarray(rows, np.int64)
        still_open = self.outcome[rows] == None  # noqa: E711 (elementwise)
        self.outcome[rows[still_open]] = outcome
        self.detail[rows[still_open]] = np.asarray(details, object)[still_open]

    def open_rows(self) -> np.ndarray:
        return np.flatnonzero(self.outcome == None)  # noqa: E711 (elementwise)


@dataclass
class Extrapolation:
    """For each kept row: its k nearest seed rows, their least-squares weights and the extrapolated text feature."""

    rows: np.ndarray
    neighbor_rows: np.ndarray
    weights: np.ndarray
    text: np.ndarray


LIST_ROWS = 500_000  # crawled images held in inverted lists at once (fp16 codes: 0.5 GB at d = 512)


def _crawl_neighbors(
    vectors: np.ndarray,
    rows: np.ndarray,
    seed_index,
    seed_scores: np.ndarray,
    seed_neighbors: np.ndarray,
    cfg: CurateParams,
    k: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Each of `vectors[rows]`'s k nearest neighbours among them (positions into rows). Exact up to
    exact_index_max; beyond, inverted lists whose centres are the seed images: every crawled image is filed
    under its nearest seed image and probes its nprobe nearest ones, all already known exactly, so lists cost
    no training and a probe scans about nprobe · n / n_seed images. The lists hold LIST_ROWS images at a time;
    each part's neighbours are merged by (similarity, position)."""
    if len(rows) <= cfg.exact_index_max:
        members = vectors[rows]
        return search(build_index(members, cfg.exact_index_max), members, k)
    batches = [np.arange(start, min(len(rows), start + SEARCH_BATCH)) for start in range(0, len(rows), SEARCH_BATCH)]
    scores, neighbors = np.empty((len(rows), 0), np.float32), np.empty((len(rows), 0), np.int64)
    for part in range(0, len(rows), LIST_ROWS):
        lists = lists_over(seed_index)
        for start in range(part, min(len(rows), part + LIST_ROWS), SEARCH_BATCH):
            held = rows[start : min(start + SEARCH_BATCH, part + LIST_ROWS)]
            add_to_lists(lists, vectors[held], seed_neighbors[held, 0])
        found = [
            search_lists(
                lists, vectors[rows[b]], k, seed_neighbors[rows[b], : cfg.nprobe], seed_scores[rows[b], : cfg.nprobe]
            )
            for b in batches
        ]
        del lists
        part_neighbors = np.concatenate([f[1] for f in found])
        scores = np.concatenate([scores, np.concatenate([f[0] for f in found])], axis=1)
        neighbors = np.concatenate([neighbors, np.where(part_neighbors >= 0, part_neighbors + part, -1)], axis=1)
        best = np.lexsort((np.where(neighbors >= 0, neighbors, len(rows)), -scores), axis=-1)[:, :k]
        scores, neighbors = np.take_along_axis(scores, best, 1), np.take_along_axis(neighbors, best, 1)
    return scores, neighbors


def curate_core(
    seed: Seed, crawl: Crawl, cfg: CurateParams, random_seed: int, device: torch.device
) -> tuple[Decisions, Extrapolation, dict]:
    """Decide every crawled image and extrapolate the kept ones; also returns the thresholds used.
    The same inputs give the same outputs bit for bit, whatever the number of threads (filter/index.py)."""
    n = len(crawl.ids)
    d = Decisions.empty(n)
    position = {image_id: row for row, image_id in enumerate(crawl.ids)}
    # Where order matters (which copy a group keeps, k-means' sample), rows go in URL order, not url_id order:
    # url_ids hash the whole URL, so the demo's file:// URLs in another folder would shuffle the rows.
    by_url = np.array(sorted(range(n), key=crawl.urls.__getitem__) if crawl.urls is not None else range(n), np.int64)
    url_rank = np.empty(n, np.int64)
    url_rank[by_url] = np.arange(n)

    # The seed search comes first: its neighbours are scores, extrapolation neighbours and near-copy lists.
    seed_index = build_index(seed.vectors, cfg.exact_index_max, nprobe=cfg.nprobe, seed=random_seed)
    seed_scores, seed_neighbors = search(seed_index, crawl.vectors, max(cfg.seed_k, cfg.k_neighbors, cfg.nprobe))
    d.seed_similarity[:] = seed_scores[:, : cfg.seed_k].mean(axis=1)

    for copy, original in exact_duplicates([crawl.ids[r] for r in by_url], [crawl.digests[r] for r in by_url]).items():
        d.duplicate_of[position[copy]] = original
        d.drop([position[copy]], "duplicate", ["same bytes"])
    candidates = d.open_rows()
    neighbor_scores, neighbor_rows = _crawl_neighbors(
        crawl.vectors, candidates, seed_index, seed_scores, seed_neighbors, cfg
    )
    near = near_duplicates(
        [crawl.ids[r] for r in candidates],
        neighbor_rows,
        neighbor_scores,
        cfg.near_duplicate_similarity,
        [crawl.hashes[r] for r in candidates] if crawl.hashes is not None else None,
        (lambda rows: crawl.read_images(candidates[rows])) if crawl.read_images is not None else None,
        cfg.near_duplicate_hash_distance,
        url_rank[candidates],
    )
    del neighbor_scores, neighbor_rows, seed_scores
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
            similarities = inner_products(crawl.vectors[row : row + 1], seed.test_vectors, matched[row][None])[0]
            best = int(similarities.argmax())
            if similarities[best] >= cfg.leak_similarity:
                test_id = seed.test_ids[matched[row][best]]
                d.leak_of[row], d.leak_similarity[row] = test_id, similarities[best]
                d.drop(
                    [row],
                    "leak",
                    [
                        f"copies seed test image {test_id}: pHash within {cfg.leak_hash_distance} bits, CLIP {similarities[best]:.3f}"
                    ],
                )

    thresholds = {}
    if cfg.cluster_detector:
        thresholds["cluster"] = seed_spread_threshold(seed_index, seed.vectors, cfg.seed_k, cfg.cluster_percentile)
        # Copies and leaks don't shape clusters.
        rows = by_url[d.outcome[by_url] == None]  # noqa: E711 (elementwise)
        labels, centre = cluster_detector(
            crawl.vectors,
            rows,
            [crawl.queries[r] for r in rows],
            seed_index,
            cfg.seed_k,
            cfg.clusters_per_query,
            cfg.min_cluster_size,
            random_seed,
        )
        d.cluster[rows], d.cluster_similarity[rows] = labels, centre
        far = np.flatnonzero(centre < thresholds["cluster"])
        d.drop(
            rows[far],
            "cluster",
            [f"cluster {labels[j]} centre similarity {centre[j]:.3f} < {thresholds['cluster']:.3f}" for j in far],
        )

    has_classes = all(c is not None for c in seed.classes) and len(set(seed.classes)) > 1
    if cfg.class_detector and has_classes:
        predicted, confidence = ClassDetector(seed.vectors, seed.classes, cfg.classifier_c, random_seed).predict(
            crawl.vectors
        )
        d.predicted_class[:], d.class_confidence[:] = predicted, confidence
        query_class = np.asarray(crawl.classes, object)
        wrong = np.flatnonzero((query_class != None) & (predicted != query_class))  # noqa: E711 (elementwise)
        d.drop(
            wrong,
            "class",
            [
                f"looks like class {predicted[r]} ({confidence[r]:.2f}), query is for class {query_class[r]}"
                for r in wrong
            ],
        )
        unsure = np.flatnonzero(confidence < cfg.min_class_confidence)
        d.drop(unsure, "class", [f"class confidence {confidence[r]:.2f} < {cfg.min_class_confidence}" for r in unsure])

    if cfg.distance_detector == "on" or (cfg.distance_detector == "auto" and not has_classes):
        thresholds["distance"] = seed_spread_threshold(seed_index, seed.vectors, cfg.seed_k, cfg.distance_percentile)
        far = np.flatnonzero(d.seed_similarity < thresholds["distance"])
        d.drop(
            far, "distance", [f"seed similarity {d.seed_similarity[r]:.3f} < {thresholds['distance']:.3f}" for r in far]
        )

    kept = d.open_rows()
    d.outcome[kept] = "kept"
    neighbors = seed_neighbors[kept, : cfg.k_neighbors]
    weights, text = extrapolate_batch(
        seed.vectors, seed.caption_features, crawl.vectors, neighbors, cfg.ridge, device, target_rows=kept
    )
    return d, Extrapolation(kept, neighbors, weights, text), thresholds


def _caption_features(paths: Paths, seed_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """One text feature per seed train image (the normalised mean of its captions' features) and its first caption."""
    table, vectors = read_embeddings([paths.embedding_file("seed_captions", "train")])
    rows: dict[str, list[int]] = {}
    for row, image_id in enumerate(table.column("id").to_pylist()):
        rows.setdefault(image_id, []).append(row)
    missing = [i for i in seed_ids if i not in rows]
    if missing:
        raise InputError(
            f"{paths.embedding_file('seed_captions', 'train')}: no caption embedding for seed image {missing[0]} (re-run `dextra embed`)"
        )
    captions = table.column("caption").to_pylist()
    mean = np.stack([vectors[rows[i]].mean(axis=0) for i in seed_ids])
    return mean / np.linalg.norm(mean, axis=1, keepdims=True), [captions[rows[i][0]] for i in seed_ids]


def load_seed(paths: Paths) -> Seed:
    train_info, train_vectors = read_embeddings([paths.embedding_file("seed_images", "train")])
    test_info, test_vectors = read_embeddings([paths.embedding_file("seed_images", "test")])
    ids = train_info.column("id").to_pylist()
    classes = dict(
        zip(
            *(
                read_table(paths.seed_split("train"), columns=["id", "class"]).column(c).to_pylist()
                for c in ("id", "class")
            )
        )
    )
    test = read_table(paths.seed_split("test"), columns=["id", "image"])
    test_images = dict(zip(test.column("id").to_pylist(), test.column("image").to_pylist()))
    test_ids = test_info.column("id").to_pylist()
    caption_features, first_captions = _caption_features(paths, ids)
    return Seed(
        ids,
        train_vectors,
        [classes.get(i) for i in ids],
        caption_features,
        first_captions,
        test_ids,
        test_vectors,
        [test_images[i] for i in test_ids],
    )


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
        raise InputError(
            f"{paths.crawl_status}: {unknown} url_id(s) are in no list under {paths.urls} (re-run `dextra urls` and `dextra fetch`)"
        )
    return joined.sort_by("url_id")


def _read_images(shards: list[Path], ids: list[str], rows: Sequence[int]) -> list[bytes]:
    """The encoded images of crawl rows, one shard at a time: only near-copy candidates need their pictures, and a
    large crawl's images would not fit in memory together."""
    wanted = [ids[r] for r in rows]
    found: dict[str, bytes] = {}
    for shard in shards:
        table = read_table(shard, IMAGE_SCHEMA, columns=["id", "image"], ids=wanted)
        found.update(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    return [found[i] for i in wanted]


def load_crawl(paths: Paths, rows: pa.Table) -> Crawl:
    fetched = set(rows.filter(pc.equal(rows["status"], "ok")).column("url_id").to_pylist())
    shard_paths = shard_files(paths.crawl_shards)
    shards = read_tables(shard_paths, IMAGE_SCHEMA, columns=["id", "sha256"])
    info, vectors = read_embeddings(sorted((paths.embeddings / "crawl_images").glob("*.parquet")))
    position = {i: n for n, i in enumerate(info.column("id").to_pylist())}
    by_id = {i: n for n, i in enumerate(shards.column("id").to_pylist())}
    missing = sorted(fetched - by_id.keys())
    if missing:
        raise InputError(
            f"{paths.crawl_status}: {len(missing)} URL(s) marked ok have no image in {paths.crawl_shards}, e.g. {missing[0]}"
        )
    ids = sorted(fetched)
    unembedded = [i for i in ids if i not in position]
    if unembedded:
        raise InputError(
            f"{paths.embeddings / 'crawl_images'}: no embedding for crawled image {unembedded[0]} (re-run `dextra embed`)"
        )
    meta = {r["url_id"]: r for r in rows.select(["url_id", "url", "query", "class"]).to_pylist()}
    hashes = info.column("phash").to_pylist() if "phash" in info.column_names else None
    digests = shards.column("sha256").to_pylist()
    return Crawl(
        ids=ids,
        vectors=vectors[[position[i] for i in ids]]
        if ids
        else np.zeros((0, vectors.shape[1] if vectors.size else 1), np.float32),
        queries=[meta[i]["query"] for i in ids],
        classes=[meta[i]["class"] for i in ids],
        digests=[digests[by_id[i]] for i in ids],
        hashes=[hashes[position[i]] for i in ids] if hashes is not None else None,
        read_images=functools.partial(_read_images, shard_paths, ids),
        urls=[meta[i]["url"] for i in ids],
    )


def _decision_table(rows: pa.Table, crawl: Crawl, d: Decisions) -> pa.Table:
    """One row per URL: the crawl decisions for fetched URLs, fetch_error / refused for the rest."""
    url_ids = rows.column("url_id").to_pylist()
    position = {image_id: row for row, image_id in enumerate(crawl.ids)}
    at = np.array([position.get(u, -1) for u in url_ids], np.int64)
    fetched = at >= 0
    refused = np.isin(
        rows.column("status").to_numpy(zero_copy_only=False), ["refused", "opt-out"]
    )  # not tried, by rule or by the site's wish
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
    for needed in (
        paths.crawl_status,
        paths.embedding_file("seed_images", "train"),
        paths.embedding_file("seed_images", "test"),
    ):
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
        summary = {
            "outcomes": outcomes,
            "thresholds": thresholds,
            "leak_hash_distance": params.curate.leak_hash_distance,
        }
        write_json(tmp / paths.curate_summary.name, summary)
    return summary
