"""The `curate` stage: which crawled images join the extra set, and the text feature each one trains with.

Every crawled URL gets one decision row with the first reason it was dropped (fetch error, refused, exact
duplicate, leak of a seed test image, too far from the seed set) or `kept`, and every score computed for it.
Kept images get the paper's linear text extrapolation: the ridge least-squares weights that rebuild the image's
CLIP feature from its k nearest seed images, applied to those images' caption features.
"""
from __future__ import annotations

from collections import defaultdict

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

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
    read_embeddings,
    read_table,
    read_tables,
    shard_files,
    write_table,
)


def knn(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search (vectors are L2-normalised, so scores are cosine similarities)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, base.shape[0]))


def seed_similarity_threshold(seed: np.ndarray, k: int, percentile: float) -> float:
    """The seed set's own spread: the given percentile of each seed image's mean similarity to its k nearest others."""
    scores, _ = knn(seed, seed, k + 1)
    return float(np.percentile(scores[:, 1:].mean(axis=1), percentile))


def extrapolate(neighbors: torch.Tensor, target: torch.Tensor, neighbor_texts: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge least squares: w = argmin ||Fᵀw − f||² + ridge·||w||², then s = Sᵀw, L2-normalised.

    neighbors F (n, k, d), target f (n, d), neighbor_texts S (n, k, d) → weights (n, k), text features (n, d).
    """
    gram = neighbors @ neighbors.transpose(1, 2)
    gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(gram, (neighbors @ target.unsqueeze(-1))).squeeze(-1)
    text = torch.nn.functional.normalize((weights.unsqueeze(-1) * neighbor_texts).sum(dim=1), dim=-1)
    return weights, text


def _seed_caption_features(paths: Paths, seed_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """One text feature per seed train image (the normalised mean of its captions' features) and its first caption."""
    table, vectors = read_embeddings([paths.embedding_file("seed_captions", "train")])
    rows: dict[str, list[int]] = defaultdict(list)
    for row, image_id in enumerate(table.column("id").to_pylist()):
        rows[image_id].append(row)
    captions = table.column("caption").to_pylist()
    missing = [i for i in seed_ids if i not in rows]
    if missing:
        raise InputError(f"{paths.embedding_file('seed_captions', 'train')}: no caption embedding for seed image {missing[0]} (re-run `dextra embed`)")
    mean = np.stack([vectors[rows[i]].mean(axis=0) for i in seed_ids])
    return mean / np.linalg.norm(mean, axis=1, keepdims=True), [captions[rows[i][0]] for i in seed_ids]


def _url_rows(paths: Paths) -> pa.Table:
    status = read_table(paths.crawl_status, STATUS_SCHEMA)
    urls = read_tables(sorted(paths.urls.glob("*.parquet")), URL_SCHEMA)
    joined = status.join(urls, "url_id", join_type="left outer")
    unknown = pc.sum(pc.is_null(joined.column("url"))).as_py() or 0
    if unknown:
        raise InputError(f"{paths.crawl_status}: {unknown} url_id(s) are in no list under {paths.urls} (re-run `dextra urls` and `dextra fetch`)")
    return joined.sort_by("url_id")


def decide(params: Params, paths: Paths) -> tuple[pa.Table, dict[str, dict], float]:
    """The decision row of every crawled URL, the extrapolation of each kept one, and the seed-similarity threshold."""
    cfg = params.curate
    rows = _url_rows(paths)
    decision = {u: {"outcome": None, "detail": None, "seed_similarity": None, "leak_similarity": None, "leak_of": None, "duplicate_of": None} for u in rows.column("url_id").to_pylist()}
    for url_id, status, error in zip(*(rows.column(c).to_pylist() for c in ("url_id", "status", "error"))):
        if status != "ok":
            decision[url_id].update(outcome="refused" if status == "refused" else "fetch_error", detail=error)

    crawl = read_tables(shard_files(paths.crawl_shards), IMAGE_SCHEMA, columns=["id", "sha256"])
    embedded, vectors = read_embeddings(sorted((paths.embeddings / "crawl_images").glob("*.parquet")))
    position = {i: n for n, i in enumerate(embedded.column("id").to_pylist())}
    first_with_hash: dict[str, str] = {}
    candidates = []
    for url_id, digest in sorted(zip(crawl.column("id").to_pylist(), crawl.column("sha256").to_pylist())):
        if url_id not in decision or decision[url_id]["outcome"] is not None:
            continue
        if url_id not in position:
            raise InputError(f"{paths.embeddings / 'crawl_images'}: no embedding for crawled image {url_id} (re-run `dextra embed`)")
        if digest in first_with_hash:
            decision[url_id].update(outcome="duplicate", duplicate_of=first_with_hash[digest], detail="same bytes")
            continue
        first_with_hash[digest] = url_id
        candidates.append(url_id)
    candidate_set = set(candidates)
    unfetched = [u for u, d in decision.items() if d["outcome"] is None and u not in candidate_set]
    if unfetched:
        raise InputError(f"{paths.crawl_status}: {len(unfetched)} URL(s) marked ok have no image in {paths.crawl_shards}, e.g. {unfetched[0]}")

    seed_table, seed_vectors = read_embeddings([paths.embedding_file("seed_images", "train")])
    test_table, test_vectors = read_embeddings([paths.embedding_file("seed_images", "test")])
    seed_ids, test_ids = seed_table.column("id").to_pylist(), test_table.column("id").to_pylist()
    query = vectors[[position[u] for u in candidates]] if candidates else np.zeros((0, seed_vectors.shape[1]), np.float32)

    leak_scores, leak_rows = knn(test_vectors, query, 1)
    near_scores, near_rows = knn(seed_vectors, query, max(cfg.distance_k, cfg.k_neighbors))
    threshold = seed_similarity_threshold(seed_vectors, cfg.distance_k, cfg.distance_percentile)
    seed_similarity = near_scores[:, : cfg.distance_k].mean(axis=1)

    kept = []
    for n, url_id in enumerate(candidates):
        d = decision[url_id]
        d.update(seed_similarity=float(seed_similarity[n]), leak_similarity=float(leak_scores[n, 0]), leak_of=test_ids[leak_rows[n, 0]])
        if leak_scores[n, 0] >= cfg.leak_similarity:
            d.update(outcome="leak", detail=f"similarity {leak_scores[n, 0]:.3f} to seed test image {test_ids[leak_rows[n, 0]]}")
        elif seed_similarity[n] < threshold:
            d.update(outcome="distance", detail=f"seed similarity {seed_similarity[n]:.3f} < threshold {threshold:.3f}")
        else:
            d["outcome"] = "kept"
            kept.append(n)

    extrapolated: dict[str, dict] = {}
    if kept:
        caption_features, first_captions = _seed_caption_features(paths, seed_ids)
        device = pick_device(params.device)
        neighbor_rows = near_rows[kept, : cfg.k_neighbors]
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        weights, text = extrapolate(as_tensor(seed_vectors[neighbor_rows]), as_tensor(query[kept]), as_tensor(caption_features[neighbor_rows]), cfg.ridge)
        weights, text = weights.cpu().numpy(), text.cpu().numpy()
        for j, n in enumerate(kept):
            extrapolated[candidates[n]] = {
                "text_embedding": text[j].astype(np.float16).tolist(),
                "neighbor_ids": [seed_ids[r] for r in neighbor_rows[j]],
                "neighbor_weights": weights[j].astype(np.float32).tolist(),
                "neighbor_captions": [first_captions[r] for r in neighbor_rows[j]],
            }

    columns = {name: rows.column(name) for name in ("url_id", "url", "query", "class", "source")}
    for field in DECISION_SCHEMA:
        if field.name not in columns:
            columns[field.name] = pa.array([decision[u][field.name] for u in rows.column("url_id").to_pylist()], field.type)
    return pa.table(columns), extrapolated, threshold


def run(params: Params, paths: Paths) -> dict:
    for needed in (paths.crawl_status, paths.embedding_file("seed_images", "train"), paths.embedding_file("seed_images", "test")):
        if not needed.exists():
            raise InputError(f"{needed}: not found (run the stages before `curate`: dvc repro curate)")
    decisions, extrapolated, threshold = decide(params, paths)
    scores = {u: (s, l) for u, s, l in zip(*(decisions.column(c).to_pylist() for c in ("url_id", "seed_similarity", "leak_similarity")))}
    with atomic_path(paths.curated) as tmp:
        (tmp / paths.curated_shards.name).mkdir(parents=True)
        write_table(decisions, tmp / paths.decisions.name, DECISION_SCHEMA)
        for shard in shard_files(paths.crawl_shards):
            table = read_table(shard)
            keep = [u in extrapolated for u in table.column("id").to_pylist()]
            table = table.filter(pa.array(keep, pa.bool_()))
            ids = table.column("id").to_pylist()
            for field in CURATED_FIELDS:
                table = table.append_column(field, pa.array([extrapolated[u][field.name] for u in ids], field.type))
            table = table.append_column("seed_similarity", pa.array([scores[u][0] for u in ids], pa.float32()))
            table = table.append_column("leak_similarity", pa.array([scores[u][1] for u in ids], pa.float32()))
            write_table(table, tmp / paths.curated_shards.name / shard.name, CURATED_SCHEMA)
        outcomes = {o["values"]: o["counts"] for o in pc.value_counts(decisions.column("outcome")).to_pylist()}
        summary = {"outcomes": outcomes, "seed_similarity_threshold": threshold, "leak_similarity_threshold": params.curate.leak_similarity}
        write_json(tmp / paths.curate_summary.name, summary)
    return summary
