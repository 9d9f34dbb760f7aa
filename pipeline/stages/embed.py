"""`dextra embed`: CLIP embeddings of seed images, every seed caption and every crawled image.

One output file per input shard (data/embeddings/<kind>/<shard>.parquet, ids beside L2-normalised float16
vectors; image files also carry each image's perceptual hash). data/embeddings/index.json records the model
fingerprint and each input's sha256, so a re-run embeds only new or changed shards, and a new CLIP model (or output
format) re-embeds everything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from dextra.filter.clip import CHECKPOINT, ClipBundle, load_clip
from dextra.filter.dedup import HASH_BYTES
from dextra.filter.embed import embed_images
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.params import Params
from dextra.pipeline.paths import EMBEDDING_KINDS, Paths
from dextra.pipeline.shards import file_sha256, read_table, shard_files, write_embeddings

FORMAT = 3  # 2: image files carry a `phash` column; 3: index.json records each output's sha256


def _jobs(paths: Paths) -> list[tuple[str, Path, Path]]:
    """(kind, input shard, output file) for everything that should be embedded."""
    jobs = []
    for split in ("train", "test"):
        source = paths.seed_split(split)
        jobs.append(("seed_images", source, paths.embedding_file("seed_images", split)))
        jobs.append(("seed_captions", source, paths.embedding_file("seed_captions", split)))
    for shard in shard_files(paths.crawl_shards):
        jobs.append(("crawl_images", shard, paths.embedding_file("crawl_images", shard.stem)))
    return jobs


def _embed_one(bundle: ClipBundle, kind: str, source: Path, target: Path, params: Params) -> int:
    if kind == "seed_captions":
        table = read_table(source, columns=["id", "captions"])
        ids, captions = [], []
        for image_id, texts in zip(table.column("id").to_pylist(), table.column("captions").to_pylist()):
            ids += [image_id] * len(texts)
            captions += texts
        vectors = bundle.encode_texts(captions, params.embed.batch_size)
        write_embeddings(target, ids, vectors, extra={"caption": captions})
        return len(captions)
    table = read_table(source, columns=["id", "image"])
    vectors, hashes = embed_images(
        bundle, table.column("image").to_pylist(), params.embed.batch_size, params.embed.num_workers
    )
    write_embeddings(
        target, table.column("id").to_pylist(), vectors, extra={"phash": pa.array(hashes, pa.binary(HASH_BYTES))}
    )
    return table.num_rows


def run(params: Params, paths: Paths) -> dict:
    device = pick_device(params.device)
    model_sha = file_sha256(paths.clip / CHECKPOINT) if (paths.clip / CHECKPOINT).exists() else None
    index_path = paths.embeddings_index
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    current = index.get("model") == model_sha and index.get("format") == FORMAT
    done: dict[str, str] = index.get("inputs", {}) if current else {}
    written: dict[str, str] = index.get("outputs", {}) if current else {}

    jobs = _jobs(paths)
    wanted = {str(target.relative_to(paths.embeddings)) for _, _, target in jobs}
    for kind in EMBEDDING_KINDS:  # outputs of shards that are gone, or of another model
        for stale in paths.embedding_folder(kind).glob("*.parquet"):
            rel = str(stale.relative_to(paths.embeddings))
            if rel not in wanted or rel not in done:
                stale.unlink()
                done.pop(rel, None)

    bundle = load_clip(paths.clip, device)
    counts = {kind: 0 for kind in EMBEDDING_KINDS}
    skipped, repaired = 0, 0
    for kind, source, target in tqdm(jobs, desc="embed", unit="shard"):
        rel, source_sha = str(target.relative_to(paths.embeddings)), file_sha256(source)
        if done.get(rel) == source_sha:
            if target.exists() and written.get(rel) == file_sha256(target):
                skipped += 1
                continue
            repaired += 1  # embedded before, but the file is gone or not what was written: embed it again
            problem = "is missing" if not target.exists() else "is not the file embed wrote (damaged)"
            print(f"dextra embed: repaired: {target} {problem}; embedding {source} again", flush=True)
        counts[kind] += _embed_one(bundle, kind, source, target, params)
        done[rel], written[rel] = source_sha, file_sha256(target)
        # after each shard: a killed run keeps its work
        write_json(index_path, {"model": model_sha, "format": FORMAT, "inputs": done, "outputs": written})
    write_json(index_path, {"model": model_sha, "format": FORMAT, "inputs": done, "outputs": written})
    return {"embedded": counts, "shards_skipped": skipped, "repaired": repaired, "dim": bundle.embed_dim}
