"""Curate on embeddings built by hand, so every decision and extrapolation has a known answer."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from dextra.filter import curate
from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import (
    CURATED_SCHEMA,
    DECISION_SCHEMA,
    STATUS_SCHEMA,
    URL_SCHEMA,
    read_table,
    sha256_hex,
    write_embeddings,
    write_table,
)

DIM = 16


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_extrapolation_recovers_known_weights():
    # Orthonormal neighbours: (F Fᵀ + λI) = (1 + λ) I, so w = w_true / (1 + λ) exactly.
    k, ridge = 3, 0.1
    neighbors = torch.eye(k, DIM).unsqueeze(0)
    w_true = torch.tensor([[0.5, 0.3, 0.2]])
    target = (w_true.unsqueeze(-1) * neighbors).sum(1)
    texts = torch.eye(k, DIM).roll(5, dims=1).unsqueeze(0)
    weights, text = curate.extrapolate(neighbors, target, texts, ridge)
    torch.testing.assert_close(weights, w_true / (1 + ridge))
    expected = torch.nn.functional.normalize((w_true.unsqueeze(-1) * texts).sum(1), dim=-1)
    torch.testing.assert_close(text, expected)


def test_batched_extrapolation_matches_lstsq_per_image():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(7, 4, DIM)).astype(np.float64)
    f = rng.normal(size=(7, DIM))
    weights, _ = curate.extrapolate(torch.tensor(F), torch.tensor(f), torch.tensor(F), ridge=0.0)
    for i in range(7):
        expected, *_ = np.linalg.lstsq(F[i].T, f[i], rcond=None)
        np.testing.assert_allclose(weights[i].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_seed_threshold_is_the_seed_own_percentile():
    seed = unit(np.random.default_rng(1).normal(size=(50, DIM)))
    low, high = curate.seed_similarity_threshold(seed, 3, 5), curate.seed_similarity_threshold(seed, 3, 95)
    scores, _ = curate.knn(seed, seed, 4)
    own = scores[:, 1:].mean(1)
    assert low == pytest.approx(np.percentile(own, 5)) and low < high


def build_fixture(root, png):
    """Three seed clusters; crawled images that are near a cluster, far from all, a leak, a duplicate, errors."""
    paths = Paths(root)
    rng = np.random.default_rng(0)
    centers = unit(np.eye(3, DIM))
    caption_features = unit(np.roll(np.eye(3, DIM), 8, axis=1))
    seed_ids = [f"s{i}" for i in range(30)]
    seed_vectors = unit(centers[np.arange(30) % 3] + 0.05 * rng.normal(size=(30, DIM)))
    test_ids = [f"t{i}" for i in range(6)]
    test_vectors = unit(centers[np.arange(6) % 3] + 0.05 * rng.normal(size=(6, DIM)))
    write_embeddings(paths.embedding_file("seed_images", "train"), seed_ids, seed_vectors)
    write_embeddings(paths.embedding_file("seed_images", "test"), test_ids, test_vectors)
    caption_ids = [i for i in seed_ids for _ in range(2)]
    write_embeddings(
        paths.embedding_file("seed_captions", "train"), caption_ids,
        unit(caption_features[np.repeat(np.arange(30) % 3, 2)] + 0.01 * rng.normal(size=(60, DIM))),
        extra={"caption": pa.array([f"caption of {i} cluster {int(i[1:]) % 3}" for i in caption_ids])},
    )
    crawled = {  # url_id -> (status, vector, image colour)
        "near0": ("ok", unit(centers[0] + 0.05 * rng.normal(size=DIM)), (255, 0, 0)),
        "near1": ("ok", unit(centers[1] + 0.05 * rng.normal(size=DIM)), (0, 255, 0)),
        "far": ("ok", unit(np.eye(DIM)[12]), (0, 0, 255)),
        "leak": ("ok", test_vectors[2], (9, 9, 9)),
        "zdup": ("ok", unit(centers[0] + 0.05 * rng.normal(size=DIM)), (255, 0, 0)),
        "err": ("error", None, None),
        "ref": ("refused", None, None),
    }
    ids = sorted(crawled)
    write_table(pa.table({
        "url_id": ids, "url": [f"http://127.0.0.1/{i}.png" for i in ids], "text": ids,
        "query": ["q"] * len(ids), "class": [None] * len(ids), "source": ["web"] * len(ids),
    }), paths.urls / "web.parquet", URL_SCHEMA)
    write_table(pa.table({
        "url_id": ids, "status": [crawled[i][0] for i in ids],
        "error": [None if crawled[i][0] == "ok" else f"{crawled[i][0]} because" for i in ids],
        "shard": [None] * len(ids),
    }), paths.crawl_status, STATUS_SCHEMA)
    ok = [i for i in ids if crawled[i][0] == "ok"]
    images = [png(crawled[i][2]) for i in ok]
    write_table(pa.table({
        "id": ok, "image": images, "width": pa.array([16] * len(ok), pa.int32()), "height": pa.array([16] * len(ok), pa.int32()),
        "captions": [[i] for i in ok], "split": ["extra"] * len(ok), "class": pa.array([None] * len(ok), pa.string()),
        "source": ["web"] * len(ok), "url": [f"http://127.0.0.1/{i}.png" for i in ok], "sha256": [sha256_hex(b) for b in images],
        "url_id": ok, "query": ["q"] * len(ok),
    }), paths.crawl_shards / "run0-00000.parquet")
    write_embeddings(paths.embedding_file("crawl_images", "run0-00000"), ok, np.stack([crawled[i][1] for i in ok]))
    return paths, caption_features


def test_decisions_and_extrapolation_on_known_fixture(tmp_path, make_params, png):
    paths, caption_features = build_fixture(tmp_path, png)
    summary = curate.run(make_params(curate={"k_neighbors": 3, "distance_k": 3, "leak_similarity": 0.99}), paths)

    decisions = {r["url_id"]: r for r in read_table(paths.decisions, DECISION_SCHEMA).to_pylist()}
    assert {u: d["outcome"] for u, d in decisions.items()} == {
        "near0": "kept", "near1": "kept", "far": "distance", "leak": "leak",
        "zdup": "duplicate", "err": "fetch_error", "ref": "refused",
    }
    assert decisions["zdup"]["duplicate_of"] == "near0"
    assert decisions["leak"]["leak_of"] == "t2" and decisions["leak"]["leak_similarity"] == pytest.approx(1.0, abs=1e-3)
    assert decisions["err"]["detail"] == "error because"
    assert summary["outcomes"]["kept"] == 2

    kept = read_table(paths.curated_shards / "run0-00000.parquet", CURATED_SCHEMA).to_pylist()
    assert sorted(r["id"] for r in kept) == ["near0", "near1"]
    for row in kept:
        cluster = int(row["id"][-1])
        assert all(int(n[1:]) % 3 == cluster for n in row["neighbor_ids"])
        assert len(row["neighbor_weights"]) == 3 and len(row["neighbor_captions"]) == 3
        # The extrapolated text feature lands on the neighbours' caption feature.
        assert float(np.dot(np.asarray(row["text_embedding"], np.float32), caption_features[cluster])) > 0.95


def test_missing_inputs_name_the_file(tmp_path, make_params, png):
    with pytest.raises(InputError, match="status.parquet: not found"):
        curate.run(make_params(), Paths(tmp_path))
    paths, _ = build_fixture(tmp_path, png)
    paths.embedding_file("crawl_images", "run0-00000").unlink()
    with pytest.raises(InputError, match="no embedding for crawled image"):
        curate.run(make_params(), paths)
    assert not paths.decisions.exists()
