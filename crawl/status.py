"""The crawl's record: one row per URL ever attempted, in data/crawl/status.parquet plus a journal.

A run commits each finished img2dataset shard on its own: its image shard (shards/<run>-<shard>.parquet),
its img2dataset stats (stats/), then its status rows (journal/<run>-<shard>.parquet), each by atomic rename;
the journal file is the commit. `consolidate` folds the journal into status.parquet (the later row of a URL
wins, as a transient failure retried later is replaced) and deletes what no committed row names: image
shards and temporary files of a run killed mid-commit, and img2dataset's working folders. So after a kill
at any moment the next run keeps every committed shard and fetches exactly the URLs without a row.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dextra.pipeline.atomic import write_bytes
from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import STATUS_SCHEMA, read_table, shard_files, write_table

# status: ok | error | refused | opt-out. The contract's columns, then how often the URL was tried and
# whether its error was transient (a later run tries it again while attempts <= fetch.transient_retries).
CRAWL_STATUS_SCHEMA = pa.schema(
    list(STATUS_SCHEMA)
    + [pa.field("attempts", pa.int32(), nullable=False), pa.field("transient", pa.bool_(), nullable=False)]
)
_RUN = re.compile(r"^run(\d+)-")


def _run_number(name: str) -> int:
    match = _RUN.match(name)
    return int(match.group(1)) if match else 0


def next_run(paths: Paths) -> str:
    names = [
        p.name
        for folder in (paths.crawl_shards, paths.crawl_stats, paths.crawl_journal)
        if folder.exists()
        for p in folder.iterdir()
    ]
    return f"run{1 + max(map(_run_number, names), default=0):04d}"


@contextlib.contextmanager
def crawl_lock(paths: Paths) -> Iterator[None]:
    """One fetch at a time on data/crawl (say, one left running after its DVC was killed, and a new one)."""
    paths.crawl.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.crawl, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{paths.crawl}: another `dextra fetch` is running on it; wait for it or stop it"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _with_defaults(table: pa.Table) -> pa.Table:
    """Status files written before attempts/transient existed: one attempt, nothing to retry."""
    if "attempts" not in table.column_names:
        table = table.append_column("attempts", pa.array(np.ones(table.num_rows, np.int32)))
    if "transient" not in table.column_names:
        table = table.append_column("transient", pa.array(np.zeros(table.num_rows, bool)))
    return table


def _journal(paths: Paths) -> list[Path]:
    return sorted(shard_files(paths.crawl_journal), key=lambda p: (_run_number(p.name), p.name))


def read_status(paths: Paths) -> pa.Table:
    """Every URL's latest row: status.parquet with the journal applied on top."""
    tables = [_with_defaults(read_table(paths.crawl_status, STATUS_SCHEMA))] if paths.crawl_status.exists() else []
    tables += [read_table(p, CRAWL_STATUS_SCHEMA) for p in _journal(paths)]
    if not tables:
        return CRAWL_STATUS_SCHEMA.empty_table()
    table = pa.concat_tables([t.select(CRAWL_STATUS_SCHEMA.names).cast(CRAWL_STATUS_SCHEMA) for t in tables])
    order = pa.array(np.arange(table.num_rows))
    last = table.append_column("_row", order).group_by("url_id", use_threads=False).aggregate([("_row", "max")])
    return table.take(np.sort(last["_row_max"].to_numpy()))


def commit(paths: Paths, name: str, status: pa.Table, images: pa.Table | None, stats: bytes | None) -> None:
    """Record one finished shard; the journal file, written last, is what makes it count."""
    if images is not None and images.num_rows:
        write_table(images, paths.crawl_shards / f"{name}.parquet")
    if stats is not None:
        write_bytes(paths.crawl_stats / f"{name}_stats.json", stats)
    write_table(status, paths.crawl_journal / f"{name}.parquet", CRAWL_STATUS_SCHEMA)


def consolidate(paths: Paths) -> pa.Table:
    """Fold the journal into status.parquet, delete what no committed row names, and return the status."""
    status = read_status(paths)
    journal = _journal(paths)
    if journal:
        write_table(status, paths.crawl_status, CRAWL_STATUS_SCHEMA)
        for part in journal:
            part.unlink()
    shutil.rmtree(paths.crawl_journal, ignore_errors=True)
    shutil.rmtree(paths.crawl_work, ignore_errors=True)
    for folder in (paths.crawl, paths.crawl_shards, paths.crawl_stats):
        for tmp in folder.glob(".*.tmp"):  # atomic writes cut short by a kill
            shutil.rmtree(tmp, ignore_errors=True)
    named = set(status.filter(pc.equal(status["status"], "ok"))["shard"].to_pylist())
    for shard in shard_files(paths.crawl_shards):
        if shard.name not in named:
            shard.unlink()
    return status


def repair(paths: Paths, status: pa.Table) -> tuple[pa.Table, list[str]]:
    """Image shards that are missing, unreadable (a truncated footer) or hold fewer rows than their status says
    give their URLs back: their status rows go, so the next fetch tries them again as never attempted, and the damaged
    file is deleted. Nothing else is fetched again. Returns the status and one line per repaired shard."""
    expected = Counter(status.filter(pc.equal(status["status"], "ok"))["shard"].to_pylist())
    damaged, lines = set(), []
    for name, rows in sorted(expected.items()):
        path = paths.crawl_shards / name
        try:
            found = pq.ParquetFile(path).metadata.num_rows
            problem = None if found >= rows else f"holds {found} of its {rows} images"
        except FileNotFoundError:
            problem = "is missing"
        except (OSError, pa.ArrowInvalid) as exc:
            problem = f"is unreadable ({str(exc).splitlines()[0]})"
        if problem:
            damaged.add(name)
            path.unlink(missing_ok=True)
            lines.append(f"{path} {problem}: its {rows} URLs will be fetched again")
    if not damaged:
        return status, lines
    status = status.filter(pc.invert(pc.is_in(status["shard"], pa.array(sorted(damaged), pa.string()))))
    write_table(status, paths.crawl_status, CRAWL_STATUS_SCHEMA)
    return status, lines


def prune(paths: Paths, listed: set[str]) -> dict:
    """Forget every attempted URL whose url_id is not in `listed`: its status row, and its image in the shards
    (a shard left empty is deleted; the others are rewritten, so their embeddings are computed again)."""
    with crawl_lock(paths):
        status = consolidate(paths)
        keep = pc.is_in(status["url_id"], pa.array(sorted(listed), pa.string()))
        dropped = set(status.filter(pc.invert(keep))["url_id"].to_pylist())
        if not dropped:
            return {"pruned": 0, "shards_rewritten": 0}
        rewritten = 0
        for shard in shard_files(paths.crawl_shards):
            images = read_table(shard)
            kept = images.filter(pc.invert(pc.is_in(images["id"], pa.array(sorted(dropped), pa.string()))))
            if kept.num_rows == images.num_rows:
                continue
            rewritten += 1
            if kept.num_rows:
                write_table(kept, shard)
            else:
                shard.unlink()
        status = status.filter(keep)
        present = {p.name for p in shard_files(paths.crawl_shards)}
        shard = pc.if_else(pc.is_in(status["shard"], pa.array(sorted(present), pa.string())), status["shard"], None)
        write_table(status.set_column(status.schema.get_field_index("shard"), "shard", shard), paths.crawl_status,
                    CRAWL_STATUS_SCHEMA)  # fmt: skip
    return {"pruned": len(dropped), "shards_rewritten": rewritten}
