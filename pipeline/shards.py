"""The shard schema: the one description of every table the stages pass to each other on disk.

Image shards (seed, crawl, curated) are Parquet, one row per image, with the columns of IMAGE_SCHEMA;
stages may add columns (crawl adds `query`, curate adds the extrapolation and scores) but never drop one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.errors import InputError

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("class", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)
SPLITS = ("train", "test", "extra", "corpus")  # corpus: captioned images the CLIP pretrains on (the demo's)

# Columns curate adds to the extra rows it keeps (docs/architecture.md, "Shard schema").
CURATED_FIELDS = [
    pa.field("text_embedding", pa.list_(pa.float16()), nullable=False),
    pa.field("neighbor_ids", pa.list_(pa.string()), nullable=False),
    pa.field("neighbor_weights", pa.list_(pa.float32()), nullable=False),
    pa.field("neighbor_captions", pa.list_(pa.string()), nullable=False),
]
CURATED_SCHEMA = pa.schema(list(IMAGE_SCHEMA) + CURATED_FIELDS)

# URL lists written by `urls`, read by `fetch`.
URL_SCHEMA = pa.schema(
    [
        pa.field("url_id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("query", pa.string()),
        pa.field("class", pa.string()),
        pa.field("source", pa.string(), nullable=False),
    ]
)

# One row per URL ever attempted by `fetch`.
STATUS_SCHEMA = pa.schema(
    [
        pa.field("url_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | error | refused | opt-out
        pa.field("error", pa.string()),
        pa.field("shard", pa.string()),
    ]
)

# One row per crawled URL, written by `curate`: what happened to it and every score.
DECISION_OUTCOMES = ("kept", "fetch_error", "refused", "duplicate", "leak", "cluster", "class", "distance")
DECISION_SCHEMA = pa.schema(
    [
        pa.field("url_id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("query", pa.string()),
        pa.field("class", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("seed_similarity", pa.float32()),
        pa.field("leak_similarity", pa.float32()),
        pa.field("leak_copy_score", pa.float32()),
        pa.field("leak_of", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("cluster", pa.string()),
        pa.field("cluster_similarity", pa.float32()),
        pa.field("predicted_class", pa.string()),
        pa.field("class_confidence", pa.float32()),
    ]
)


class ShardError(InputError):
    """A shard file that does not follow the schema; the message names the file and the column."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast the schema's columns to their declared types and put them first; extra columns stay, after them."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ShardError(f"{where}: missing column(s) {', '.join(missing)}")
    columns, fields = [], []
    for f in schema:
        column = table.column(f.name)
        try:
            column = column.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ShardError(f"{where}: column {f.name!r} is {column.type}, expected {f.type} ({exc})") from None
        if not f.nullable and column.null_count:
            raise ShardError(f"{where}: column {f.name!r} has {column.null_count} null value(s)")
        columns.append(column)
        fields.append(f)
    for name in table.column_names:
        if name not in schema.names:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema = IMAGE_SCHEMA) -> Path:
    """Validate against `schema` and write atomically (temp file, then rename)."""
    path = Path(path)
    table = conform(table, schema, str(path))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_table(
    path: str | Path,
    schema: pa.Schema = IMAGE_SCHEMA,
    columns: Sequence[str] | None = None,
    ids: Iterable[str] | None = None,
) -> pa.Table:
    """`ids`: only the rows with these ids (pyarrow filters them while reading the file)."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        table = pq.read_table(
            path, columns=list(columns) if columns else None, filters=None if ids is None else [("id", "in", list(ids))]
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from None
    return conform(
        table, pa.schema([f for f in schema if f.name in table.column_names]) if columns else schema, str(path)
    )


def shard_files(folder: str | Path) -> list[Path]:
    """The finished shards of a folder, in a stable order (temporary files are skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def read_tables(
    paths: Iterable[str | Path], schema: pa.Schema = IMAGE_SCHEMA, columns: Sequence[str] | None = None
) -> pa.Table:
    tables = [read_table(p, schema, columns) for p in paths]
    if not tables:
        fields = [f for f in schema if columns is None or f.name in columns]
        return pa.schema(fields).empty_table()
    return pa.concat_tables(tables, promote_options="default")


# Embeddings: one file per input shard, ids beside L2-normalised float16 vectors.
def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


def write_embeddings(path: str | Path, ids: Sequence[str], vectors: np.ndarray, extra: dict | None = None) -> Path:
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ShardError(f"{path}: {len(ids)} ids for embeddings of shape {vectors.shape}")
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    columns = {"id": pa.array(list(ids), pa.string()), "embedding": embedding, **(extra or {})}
    return write_table(pa.table(columns), path, embedding_schema(dim))


def _read_embedding_file(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable embeddings file ({exc})") from None


def read_embeddings(paths: Iterable[str | Path]) -> tuple[pa.Table, np.ndarray]:
    """All rows of the given embedding files: the table without the vectors, and the vectors as float32."""
    tables = [_read_embedding_file(path) for path in paths]
    if not tables:
        return pa.table({"id": pa.array([], pa.string())}), np.zeros((0, 0), np.float32)
    table = pa.concat_tables(tables)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return table.drop_columns(["embedding"]), vectors


def read_embedding_info(paths: Sequence[str | Path]) -> tuple[pa.Table, int]:
    """Every row of the given embedding files without the vectors, and their dimension (0 without files)."""
    if not paths:
        return pa.table({"id": pa.array([], pa.string())}), 0
    names = [n for n in pq.read_schema(paths[0]).names if n != "embedding"]
    dim = pq.read_schema(paths[0]).field("embedding").type.list_size
    return pa.concat_tables([_read_embedding_file(path, names) for path in paths]), dim


def read_embeddings_into(paths: Iterable[str | Path], rows: dict[str, int], out: np.ndarray) -> None:
    """out[rows[id]] = the stored float16 vector of every id in `rows`, one file at a time: `out` may be a
    memory-mapped file, so a crawl's vectors (10 GB at 10M x 512) never need to fit in memory at once."""
    for path in paths:
        table = _read_embedding_file(path, ["id", "embedding"])
        wanted = [(n, rows[i]) for n, i in enumerate(table.column("id").to_pylist()) if i in rows]
        if not wanted:
            continue
        source, target = (np.array(c, np.int64) for c in zip(*wanted))
        column = table.column("embedding").combine_chunks()
        if column.type.list_size != out.shape[1]:
            raise ShardError(f"{path}: embeddings of dimension {column.type.list_size}, others have {out.shape[1]}")
        out[target] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, out.shape[1])[source]
