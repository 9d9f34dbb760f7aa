"""Hand-built curate inputs: embeddings and images whose every decision and extrapolation has a known answer."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from dextra.filter.dedup import phash
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import STATUS_SCHEMA, URL_SCHEMA, sha256_hex, write_embeddings, write_table

DIM = 16


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def blocks(seed: int, size: int = 48) -> Image.Image:
    """A random 6x6 colour-block picture: distinct pictures get distant pHashes."""
    cells = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.Resampling.NEAREST)


def encode(image: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def copy_of(image: Image.Image) -> Image.Image:
    """Cropped, mirrored, colour-shifted, resized: the transformations a leak survives."""
    w, h = image.size
    shifted = np.clip(np.asarray(image.crop((3, 2, w - 4, h - 1)), np.int16) + [25, -20, 10], 0, 255).astype(np.uint8)
    return ImageOps.mirror(Image.fromarray(shifted)).resize((70, 70), Image.Resampling.BICUBIC)


# Curate params for build_fixture with both detectors on (the distance detector is off: the seed has classes).
EVERY_DETECTOR = {
    "k_neighbors": 3,
    "seed_k": 3,
    "clusters_per_query": 2,
    "min_cluster_size": 3,
    "cluster_percentile": 1,
    "cluster_detector": True,
    "class_detector": True,
    "distance_detector": "auto",
}


def build_fixture(root):
    """Three seed classes; crawled images near their class, of the wrong class, off-topic, copies and errors."""
    paths = Paths(root)
    rng = np.random.default_rng(0)
    centres = unit(np.eye(3, DIM))
    caption_features = unit(np.roll(np.eye(3, DIM), 8, axis=1))

    def image_shard(path, ids, images, split, classes):
        write_table(
            pa.table(
                {
                    "id": ids,
                    "image": images,
                    "width": pa.array([48] * len(ids), pa.int32()),
                    "height": pa.array([48] * len(ids), pa.int32()),
                    "captions": [[f"caption of {i}"] for i in ids],
                    "split": [split] * len(ids),
                    "class": pa.array(classes, pa.string()),
                    "source": ["test"] * len(ids),
                    "url": pa.array([f"http://127.0.0.1/{i}" for i in ids], pa.string()),
                    "sha256": [sha256_hex(b) for b in images],
                    **({"url_id": ids, "query": [f"class {c}" for c in classes]} if split == "extra" else {}),
                }
            ),
            path,
        )

    seed_ids = [f"s{i:02d}" for i in range(30)]
    seed_images = [encode(blocks(100 + i)) for i in range(30)]
    image_shard(paths.seed_split("train"), seed_ids, seed_images, "train", [str(i % 3) for i in range(30)])
    write_embeddings(
        paths.embedding_file("seed_images", "train"),
        seed_ids,
        unit(centres[np.arange(30) % 3] + 0.05 * rng.normal(size=(30, DIM))),
    )
    test_ids = [f"t{i}" for i in range(6)]
    test_pictures = [blocks(200 + i) for i in range(6)]
    image_shard(
        paths.seed_split("test"), test_ids, [encode(p) for p in test_pictures], "test", [str(i % 3) for i in range(6)]
    )
    test_vectors = unit(centres[np.arange(6) % 3] + 0.05 * rng.normal(size=(6, DIM)))
    write_embeddings(paths.embedding_file("seed_images", "test"), test_ids, test_vectors)
    caption_ids = [i for i in seed_ids for _ in range(2)]
    write_embeddings(
        paths.embedding_file("seed_captions", "train"),
        caption_ids,
        unit(caption_features[np.repeat(np.arange(30) % 3, 2)] + 0.01 * rng.normal(size=(60, DIM))),
        extra={"caption": pa.array([f"caption of {i}" for i in caption_ids])},
    )

    near0 = blocks(300)
    crawled = {  # url_id -> (status, class of its query, vector, image)
        "a_near0": ("ok", "0", centres[0], encode(near0)),
        "b_near1": ("ok", "1", centres[1], encode(blocks(301))),
        "c_wrong": ("ok", "2", centres[0], encode(blocks(302))),
        "d_leak": ("ok", "2", test_vectors[2], encode(copy_of(test_pictures[2]), "JPEG", 70)),
        "e_exact": ("ok", "0", centres[0], encode(near0)),
        "f_near": ("ok", "0", centres[0], encode(near0.resize((40, 40)), "JPEG", 80)),
        "g_err": ("error", "0", None, None),
        "h_ref": ("refused", "0", None, None),
        "i_optout": ("opt-out", "0", None, None),
    }
    # Off-topic: a whole cluster of query "class 1" far from every seed image.
    for i in range(6):
        crawled[f"x_off{i}"] = ("ok", "1", np.eye(DIM)[12] + 0.05 * rng.normal(size=DIM), encode(blocks(400 + i)))
    ids = sorted(crawled)
    write_table(
        pa.table(
            {
                "url_id": ids,
                "url": [f"http://127.0.0.1/{i}" for i in ids],
                "text": ids,
                "query": [f"class {crawled[i][1]}" for i in ids],
                "class": [crawled[i][1] for i in ids],
                "source": ["web"] * len(ids),
            }
        ),
        paths.urls / "web.parquet",
        URL_SCHEMA,
    )
    write_table(
        pa.table(
            {
                "url_id": ids,
                "status": [crawled[i][0] for i in ids],
                "error": [None if crawled[i][0] == "ok" else f"{crawled[i][0]} because" for i in ids],
                "shard": ["run0001-00000.parquet" if crawled[i][0] == "ok" else None for i in ids],
            }
        ),
        paths.crawl_status,
        STATUS_SCHEMA,
    )
    ok = [i for i in ids if crawled[i][0] == "ok"]
    images = [crawled[i][3] for i in ok]
    image_shard(paths.crawl_shards / "run0001-00000.parquet", ok, images, "extra", [crawled[i][1] for i in ok])
    vectors = unit(np.stack([crawled[i][2] + 0.01 * rng.normal(size=DIM) for i in ok]))
    write_embeddings(
        paths.embedding_file("crawl_images", "run0001-00000"),
        ok,
        vectors,
        extra={"phash": pa.array([phash(b) for b in images], pa.binary(8))},
    )
    return paths, caption_features
