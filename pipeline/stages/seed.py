"""The `seed` stage: import the manifest's seed set into data/seed/{train,test}.parquet.

The demo is generated here; every other dataset is listed by its importer (pipeline/importers/), then records
without a split get one, the manifest's subset is drawn, and only then are the kept images read and re-encoded.
All of data/seed (both splits, and for the demo its synthetic web) is built in a temporary folder and swapped
in at the end, so a failed import leaves the previous set, or nothing, never part of one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.demo.corpus import corpus_rows
from dextra.pipeline.demo.seed import seed_images
from dextra.pipeline.demo.web import write_web
from dextra.pipeline.errors import InputError
from dextra.pipeline.importers import coco, cub, folder, oxford
from dextra.pipeline.importers.records import Record, load_row, shard_row
from dextra.pipeline.importers.splits import split_unassigned, stratified_split, take_subset
from dextra.pipeline.manifest import Manifest, load_manifest
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import IMAGE_SCHEMA, write_table

# Images whose dataset names no split (a folder CSV without `split`): this share goes to test, stratified by class,
# seeded by params.seed.
DEFAULT_TEST_FRACTION = 0.2

IMPORTERS: dict[str, Callable[..., tuple[list[Record], dict]]] = {
    "folder": folder.read,
    "cub": cub.read,
    "oxford": oxford.read,
    "coco": coco.read,
}


def _table(rows: list[dict]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["id"])
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


def _import_demo(params: Params, paths: Paths, out: Path) -> tuple[list[dict], dict]:
    images = seed_images(params)
    split = stratified_split([s.id for s in images], [s.digit for s in images], params.demo.test_fraction, params.seed)
    rows = [shard_row(s.id, s.png, s.pixels.shape[1::-1], s.captions, split[s.id], s.digit, "demo") for s in images]
    test_ids = {key for key, value in split.items() if value == "test"}
    web = out / paths.demo_web.relative_to(paths.seed)
    kinds = write_web(params, images, test_ids, web)
    return rows + corpus_rows(params), {"web_urls": sum(kinds.values()), "web_kinds": kinds}


def _import_dataset(manifest: Manifest, params: Params, paths: Paths) -> tuple[list[dict], dict]:
    spec = manifest.seed
    root = spec.folder(paths.root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found (seed.path of {paths.manifest(params.dataset)})")
    records, summary = IMPORTERS[spec.importer](spec, root)
    if not records:
        raise InputError(f"{root}: the {spec.importer} importer found no images")
    records = take_subset(split_unassigned(records, DEFAULT_TEST_FRACTION, params.seed), spec.subset)
    rows = [load_row(r, manifest.name) for r in tqdm(records, desc="seed images", unit="img", mininterval=10)]
    return rows, summary


def run(params: Params, paths: Paths) -> dict:
    manifest = load_manifest(params.dataset, paths)
    with atomic_path(paths.seed) as tmp:
        tmp.mkdir()
        if manifest.seed.importer == "demo":
            rows, summary = _import_demo(params, paths, tmp)
        else:
            rows, summary = _import_dataset(manifest, params, paths)
        counts = {}
        for split in ("train", "test", "corpus"):
            chosen = [r for r in rows if r["split"] == split]
            write_table(_table(chosen), tmp / paths.seed_split(split).relative_to(paths.seed))
            counts[split] = len(chosen)
    classes = {r["class"] for r in rows if r["class"] is not None}
    return {"importer": manifest.seed.importer, **counts, "classes": len(classes), **summary}
