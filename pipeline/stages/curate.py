"""`dextra curate`: read the URL lists, the crawl's status and images and every embedding; decide each crawled URL
(filter/curate.py) and write data/curated/decisions.parquet (one row per URL, with its outcome and every score),
data/curated/shards/ (the kept images with their extrapolated text features) and data/curated/summary.json."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dextra.filter.curate import Crawl, Decisions, SeedSet, curate
from dextra.pipeline.atomic import atomic_path, write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import (
    CURATED_FIELDS,
    CURATED_SCHEMA,
    DECISION_SCHEMA,
    IMAGE_SCHEMA,
    STATUS_SCHEMA,
    URL_SCHEMA,
    read_embedding_info,
    read_embeddings,
    read_embeddings_into,
    read_table,
    read_tables,
    shard_files,
    write_table,
)


def _caption_features(paths: Paths, seed_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """One text feature per seed train image (the normalised mean of its captions' features) and its first caption."""
    table, vectors = read_embeddings([paths.embedding_file("seed_captions", "train")])
    rows: dict[str, list[int]] = {}
    for row, image_id in enumerate(table.column("id").to_pylist()):
        rows.setdefault(image_id, []).append(row)
    missing = [i for i in seed_ids if i not in rows]
    if missing:
        raise InputError(
            f"{paths.embedding_file('seed_captions', 'train')}: no caption embedding for seed image {missing[0]} "
            "(re-run `dextra embed`)"
        )
    captions = table.column("caption").to_pylist()
    mean = np.stack([vectors[rows[i]].mean(axis=0) for i in seed_ids])
    return mean / np.linalg.norm(mean, axis=1, keepdims=True), [captions[rows[i][0]] for i in seed_ids]


def read_seed(paths: Paths) -> SeedSet:
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
    return SeedSet(
        ids,
        train_vectors,
        [classes.get(i) for i in ids],
        caption_features,
        first_captions,
        test_ids,
        test_vectors,
        [test_images[i] for i in test_ids],
    )


def read_url_rows(paths: Paths) -> tuple[pa.Table, int]:
    """Every listed URL fetch attempted, with its status and the list row it came from (the first list's, as fetch
    does), and how many attempted URLs no list names now: they leave the extra set, but their images stay in
    data/crawl for when a list names them again (`dextra prune` deletes them)."""
    status = read_table(paths.crawl_status, STATUS_SCHEMA)
    urls = read_tables(shard_files(paths.urls), URL_SCHEMA)
    first = {}
    for row, url_id in enumerate(urls.column("url_id").to_pylist()):
        first.setdefault(url_id, row)
    urls = urls.take(sorted(first.values()))  # a URL in several lists: the first list's row, as fetch does
    joined = status.join(urls, "url_id", join_type="inner")
    return joined.sort_by("url_id"), status.num_rows - joined.num_rows


def _read_images(shards: list[Path], ids: list[str], rows: Sequence[int]) -> list[bytes]:
    """The encoded images of crawl rows, one shard at a time: only near-copy candidates need their pictures, and a
    large crawl's images would not fit in memory together."""
    wanted = [ids[r] for r in rows]
    found: dict[str, bytes] = {}
    for shard in shards:
        table = read_table(shard, IMAGE_SCHEMA, columns=["id", "image"], ids=wanted)
        found.update(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    return [found[i] for i in wanted]


def read_crawl(paths: Paths, rows: pa.Table, scratch: Path) -> Crawl:
    """The fetched crawled images in url_id order; their vectors (float16, as stored) go into a memory-mapped file
    in `scratch`, filled one embeddings file at a time, so a large crawl's vectors are never in memory together."""
    fetched = set(rows.filter(pc.equal(rows["status"], "ok")).column("url_id").to_pylist())
    shard_paths = shard_files(paths.crawl_shards)
    shards = read_tables(shard_paths, IMAGE_SCHEMA, columns=["id", "sha256"])
    embedding_files = shard_files(paths.embedding_folder("crawl_images"))
    info, dim = read_embedding_info(embedding_files)
    position = {i: n for n, i in enumerate(info.column("id").to_pylist())}
    by_id = {i: n for n, i in enumerate(shards.column("id").to_pylist())}
    missing = sorted(fetched - by_id.keys())
    if missing:
        raise InputError(
            f"{paths.crawl_status}: {len(missing)} URL(s) marked ok have no image in {paths.crawl_shards}, "
            f"e.g. {missing[0]}"
        )
    ids = sorted(fetched)
    unembedded = [i for i in ids if i not in position]
    if unembedded:
        raise InputError(
            f"{paths.embedding_folder('crawl_images')}: no embedding for crawled image {unembedded[0]} "
            "(re-run `dextra embed`)"
        )
    if ids:
        vectors = np.lib.format.open_memmap(scratch / "crawl_vectors.npy", "w+", np.float16, (len(ids), dim))
        read_embeddings_into(embedding_files, {image_id: row for row, image_id in enumerate(ids)}, vectors)
        vectors.flush()
        vectors = np.load(scratch / "crawl_vectors.npy", mmap_mode="r")
    else:
        vectors = np.zeros((0, max(dim, 1)), np.float16)
    meta = {r["url_id"]: r for r in rows.select(["url_id", "url", "query", "class"]).to_pylist()}
    hashes = info.column("phash").to_pylist() if "phash" in info.column_names else None
    digests = shards.column("sha256").to_pylist()
    return Crawl(
        ids=ids,
        vectors=vectors,
        queries=[meta[i]["query"] for i in ids],
        classes=[meta[i]["class"] for i in ids],
        digests=[digests[by_id[i]] for i in ids],
        hashes=[hashes[position[i]] for i in ids] if hashes is not None else None,
        read_images=functools.partial(_read_images, shard_paths, ids),
        urls=[meta[i]["url"] for i in ids],
    )


def decision_table(rows: pa.Table, crawl: Crawl, decisions: Decisions) -> pa.Table:
    """One row per URL: the crawl decisions for fetched URLs, fetch_error / refused for the rest."""
    url_ids = rows.column("url_id").to_pylist()
    position = {image_id: row for row, image_id in enumerate(crawl.ids)}
    at = np.array([position.get(u, -1) for u in url_ids], np.int64)
    fetched = at >= 0
    # not tried, by rule or by the site's wish
    refused = np.isin(rows.column("status").to_numpy(zero_copy_only=False), ["refused", "opt-out"])
    outcome = np.where(refused, "refused", "fetch_error").astype(object)
    detail = np.asarray(rows.column("error").to_pylist(), object)
    outcome[fetched], detail[fetched] = decisions.outcome[at[fetched]], decisions.detail[at[fetched]]
    columns = {name: rows.column(name) for name in ("url_id", "url", "query", "class", "source")}
    columns.update(outcome=pa.array(outcome, pa.string()), detail=pa.array(detail, pa.string()))
    for field in DECISION_SCHEMA:
        if field.name in columns:
            continue
        values = getattr(decisions, field.name)[np.where(fetched, at, 0)]
        if values.dtype == object:
            columns[field.name] = pa.array(np.where(fetched, values, None), field.type)
        else:  # NaN marks a score never computed
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
    rows, unlisted = read_url_rows(paths)
    with atomic_path(paths.curated) as tmp:  # the crawl's vectors are mapped from a file in tmp's folder
        seed, crawl = read_seed(paths), read_crawl(paths, rows, tmp.parent)
        decided, extra, thresholds = curate(
            seed, crawl, params.curate, params.seed, pick_device(params.device), scratch=tmp.parent
        )
        decisions = decision_table(rows, crawl, decided)
        kept_at = {crawl.ids[r]: j for j, r in enumerate(extra.rows)}
        row_of = {image_id: row for row, image_id in enumerate(crawl.ids)}
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
                "neighbor_ids": [[seed.train_ids[s] for s in row] for row in neighbours],
                "neighbor_weights": list(extra.weights[j].astype(np.float32)),
                "neighbor_captions": [[seed.first_captions[s] for s in row] for row in neighbours],
            }
            for field in CURATED_FIELDS:
                table = table.append_column(field, pa.array(values[field.name], field.type))
            for name in ("seed_similarity", "leak_similarity", "cluster_similarity", "class_confidence"):
                scores = getattr(decided, name)[[row_of[u] for u in ids]]
                table = table.append_column(name, pa.array(scores, pa.float32(), mask=np.isnan(scores)))
            write_table(table, tmp / paths.curated_shards.name / shard.name, CURATED_SCHEMA)
        outcomes = {o["values"]: o["counts"] for o in pc.value_counts(decisions.column("outcome")).to_pylist()}
        summary = {
            "outcomes": outcomes,
            "unlisted": unlisted,
            "thresholds": thresholds,
            "leak_copy_score": params.curate.leak_copy_score,
        }
        write_json(tmp / paths.curate_summary.name, summary)
    return summary
