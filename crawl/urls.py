"""URL lists: read one source's list, normalise its URLs and give each a stable id (URL_SCHEMA rows).

A URL's id is a hash of its normalised form, so the same image link keeps the same id across lists,
reorderings and re-runs; that is what lets `fetch` fetch only what it has never attempted.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dextra.pipeline.errors import InputError
from dextra.pipeline.manifest import UrlSource
from dextra.pipeline.shards import URL_SCHEMA

_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.DOTALL)


def normalize_url(url: str) -> str:
    """Strip whitespace and lower-case scheme and host; the path and query are case-sensitive, so they stay."""
    url = url.strip()
    match = _AUTHORITY.match(url)
    if not match:
        return url
    scheme, authority, rest = match.groups()
    userinfo, at, host = authority.rpartition("@")
    return f"{scheme.lower()}://{userinfo}{at}{host.lower()}{rest}"


def url_id(normalized_url: str) -> str:
    return hashlib.sha256(normalized_url.encode("utf-8")).hexdigest()[:16]


def _read_list(path: Path, fmt: str) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"{path}: URL list not found")
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False, na_values=[""]
            )
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pq.read_table(path).to_pandas()
    except (ValueError, OSError, pa.ArrowException, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: not a readable {fmt} URL list ({str(exc).splitlines()[0]})") from None


def _strings(frame: pd.DataFrame, column: str | None) -> list[str | None]:
    if column is None or column not in frame.columns:
        return [None] * len(frame)
    return [None if pd.isna(v) else str(v) for v in frame[column]]


def build_list(source: UrlSource, path: Path, files_root: Path | None = None) -> tuple[pa.Table, dict]:
    """The URL_SCHEMA table of one source, duplicates (same normalised URL) and empty URLs dropped. Where the manifest
    allows file:// URLs, `files_root` is the repository root, and a relative reference (images/a.png) names a file
    beside the list: its URL is that file's file:// URL, and its url_id the hash of its path relative to the root, so
    a checkout moved to another folder keeps its ids (a file outside the root is named by its file:// URL)."""
    frame = _read_list(path, source.format)
    columns = source.columns
    if columns.url not in frame.columns:
        raise InputError(f"{path}: no URL column {columns.url!r} (columns: {', '.join(map(str, frame.columns))})")
    texts, queries, classes = (_strings(frame, c) for c in (columns.text, columns.query, columns.class_))
    rows: dict[str, tuple] = {}
    empty = duplicates = 0
    for raw, text, query, cls in zip(_strings(frame, columns.url), texts, queries, classes):
        url = normalize_url(raw or "")
        if not url:
            empty += 1
            continue
        key = url_id(url)
        if files_root is not None and not _AUTHORITY.match(url) and not url.startswith("file:"):
            file = (path.parent / url).resolve()
            url = file.as_uri()
            inside = file.is_relative_to(files_root.resolve())
            key = url_id(file.relative_to(files_root.resolve()).as_posix() if inside else url)
        if key in rows:
            duplicates += 1
            continue
        rows[key] = (url, text, query, cls)
    table = url_table([(key, *row) for key, row in rows.items()], source.name)
    return table, {"urls": len(rows), "duplicates": duplicates, "empty": empty}


def url_table(rows: list[tuple[str, str, str | None, str | None, str | None]], source: str) -> pa.Table:
    """URL_SCHEMA rows of one source from (url_id, url, text, query, class) tuples."""
    columns = list(zip(*rows)) if rows else [()] * 5
    names = ("url_id", "url", "text", "query", "class")
    return pa.table({**dict(zip(names, map(list, columns))), "source": [source] * len(rows)}, schema=URL_SCHEMA)
