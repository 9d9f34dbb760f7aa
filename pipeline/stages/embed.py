"""`dextra embed`: CLIP embeddings of seed images, every seed caption and every crawled image.

One output file per input shard (data/embeddings/<kind>/<shard>.parquet, ids beside L2-normalised float16
vectors; image files also carry each image's perceptual hash). data/embeddings/index.json records the model
fingerprint and each input's sha256, so a re-run embeds only new or changed shards, and a new CLIP model (or output
format) re-embeds everything.
"""

from __future__ import annotations

import json

import torch
from tqdm import tqdm

from dextra.filter.clip import CHECKPOINT
from dextra.filter.embed_workers import ShardJob, WorkerSpec, embed_shards
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.params import Params
from dextra.pipeline.paths import EMBEDDING_KINDS, Paths
from dextra.pipeline.shards import file_sha256, shard_files

FORMAT = 3  # 2: image files carry a `phash` column; 3: index.json records each output's sha256


def _jobs(paths: Paths) -> list[ShardJob]:
    """Everything that should be embedded: both seed splits' images and captions, and every crawl shard."""
    jobs = []
    for split in ("train", "test"):
        source = paths.seed_split(split)
        jobs.append(ShardJob("seed_images", source, paths.embedding_file("seed_images", split)))
        jobs.append(ShardJob("seed_captions", source, paths.embedding_file("seed_captions", split)))
    for shard in shard_files(paths.crawl_shards):
        jobs.append(ShardJob("crawl_images", shard, paths.embedding_file("crawl_images", shard.stem)))
    return jobs


def run(params: Params, paths: Paths) -> dict:
    device = pick_device(params.device)
    model_sha = file_sha256(paths.clip / CHECKPOINT) if (paths.clip / CHECKPOINT).exists() else None
    index_path = paths.embeddings_index
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    current = index.get("model") == model_sha and index.get("format") == FORMAT
    done: dict[str, str] = index.get("inputs", {}) if current else {}
    written: dict[str, str] = index.get("outputs", {}) if current else {}

    jobs = _jobs(paths)
    wanted = {str(job.target.relative_to(paths.embeddings)) for job in jobs}
    for kind in EMBEDDING_KINDS:  # outputs of shards that are gone, or of another model
        for stale in paths.embedding_folder(kind).glob("*.parquet"):
            rel = str(stale.relative_to(paths.embeddings))
            if rel not in wanted or rel not in done:
                stale.unlink()
                done.pop(rel, None)

    counts = {kind: 0 for kind in EMBEDDING_KINDS}
    todo, sources, skipped, repaired = [], {}, 0, 0
    for job in jobs:
        rel, source_sha = str(job.target.relative_to(paths.embeddings)), file_sha256(job.source)
        if done.get(rel) == source_sha:
            if job.target.exists() and written.get(rel) == file_sha256(job.target):
                skipped += 1
                continue
            repaired += 1  # embedded before, but the file is gone or not what was written: embed it again
            problem = "is missing" if not job.target.exists() else "is not the file embed wrote (damaged)"
            print(f"dextra embed: repaired: {job.target} {problem}; embedding {job.source} again", flush=True)
        todo.append(job)
        sources[rel] = source_sha

    workers = params.embed.num_processes
    spec = WorkerSpec(
        paths.clip,
        device.type,
        params.embed.batch_size,
        params.embed.num_workers,
        threads=max(1, torch.get_num_threads() // workers),
    )
    finished = embed_shards(todo, spec, workers, params.embed.distributor)
    for job, count in tqdm(finished, desc="embed", unit="shard", total=len(todo)):
        rel = str(job.target.relative_to(paths.embeddings))
        counts[job.kind] += count
        done[rel], written[rel] = sources[rel], file_sha256(job.target)
        # after each shard: a killed run keeps its work
        write_json(index_path, {"model": model_sha, "format": FORMAT, "inputs": done, "outputs": written})
    write_json(index_path, {"model": model_sha, "format": FORMAT, "inputs": done, "outputs": written})
    return {"embedded": counts, "shards_skipped": skipped, "repaired": repaired, "workers": workers}
