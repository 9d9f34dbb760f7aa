"""`dextra export`: the curated extra set (and the seed splits, with export.include_seed) in the two formats other
trainers read, so a researcher who trains with their own code needs no converter:

- data/export/webdataset/<split>/NNNNN.tar: one sample per image as img2dataset writes it, a 9-digit key with the
  image bytes as stored (.jpg/.png/.webp), its first caption as .txt and every other column as .json (the
  extrapolated text embedding and its neighbours included);
- data/export/hf/: a datasets.DatasetDict (splits extra, train, test) saved with save_to_disk, images as an Image
  feature holding the stored bytes; seed rows have null extrapolation columns.

Each format's folder is written beside its old one and renamed onto it: a killed export leaves the last one whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import webdataset
from tqdm import tqdm

from dextra.crawl.images import image_format
from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_FIELDS, CURATED_SCHEMA, IMAGE_SCHEMA, read_table, shard_files

COLUMNS = [f.name for f in CURATED_SCHEMA]


def image_extension(data: bytes, where: str) -> str:
    """The file extension webdataset decoders expect for these bytes (they pick the decoder by extension)."""
    extension = image_format(data)
    if extension is None:
        raise InputError(f"{where}: image bytes are neither JPEG, PNG, GIF nor WebP")
    return extension


def _splits(params: Params, paths: Paths) -> dict[str, list[pa.Table]]:
    """Per split, its tables in the curated schema (seed tables get null extrapolation columns)."""
    curated = shard_files(paths.curated_shards)
    if not curated:
        raise InputError(f"{paths.curated_shards}: no curated shards (run `dextra curate` first)")
    splits = {"extra": [read_table(path, CURATED_SCHEMA, columns=COLUMNS) for path in curated]}
    if params.export.include_seed:
        for split in ("train", "test"):
            table = read_table(paths.seed_split(split), IMAGE_SCHEMA, columns=[f.name for f in IMAGE_SCHEMA])
            for field in CURATED_FIELDS:
                table = table.append_column(field.with_nullable(True), pa.nulls(len(table), field.type))
            splits[split] = [table]
    return splits


def _rows(tables: list[pa.Table]) -> Iterator[dict]:
    for table in tables:
        yield from table.to_pylist()


def write_webdataset(splits: dict[str, list[pa.Table]], folder: Path, samples_per_shard: int) -> dict[str, int]:
    counts = {}
    for split, tables in splits.items():
        (folder / split).mkdir(parents=True)
        total = sum(len(t) for t in tables)
        pattern = str(folder / split / "%05d.tar")
        # mtime 0: the same curated set gives the same tar bytes on every run.
        with webdataset.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0) as sink:
            for key, row in enumerate(tqdm(_rows(tables), total=total, desc=f"webdataset {split}", unit="image")):
                image = row.pop("image")
                sink.write(
                    {
                        "__key__": f"{key:09d}",
                        image_extension(image, f"{split} image {row['id']}"): image,
                        "txt": row["captions"][0] if row["captions"] else "",
                        "json": row,
                    }
                )
        counts[split] = total
    return counts


def hf_features() -> datasets.Features:
    """The curated schema as datasets features, the image as an Image feature (which keeps the stored bytes)."""
    features = datasets.Features.from_arrow_schema(CURATED_SCHEMA)
    features["image"] = datasets.Image()
    return features


def write_hf(splits: dict[str, list[pa.Table]], folder: Path) -> dict[str, int]:
    features = hf_features()
    parts = {}
    for split, tables in splits.items():
        pieces = []
        for table in tables:
            columns = table.to_pydict()
            columns["image"] = [{"bytes": data, "path": None} for data in columns["image"]]
            pieces.append(datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(split)))
        parts[split] = datasets.concatenate_datasets(pieces)
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return {split: len(dataset) for split, dataset in parts.items()}


def run(params: Params, paths: Paths) -> dict:
    splits = _splits(params, paths)
    summary = {}
    for fmt in params.export.formats:
        with atomic_path(paths.export(fmt)) as tmp:
            if fmt == "webdataset":
                summary[fmt] = write_webdataset(splits, tmp, params.export.samples_per_shard)
            else:
                summary[fmt] = write_hf(splits, tmp)
    return summary
