"""Fetching URL lists with img2dataset: which URLs to fetch (never attempted, or failed transiently fewer than
1 + fetch.transient_retries times), and the guarded download that gives each exactly one status row.

The stage decides what to fetch from its own record (crawl/status.py), not from img2dataset's incremental
mode, which misses rows appended to a finished shard and never retries failures. While img2dataset runs, a
thread commits each shard it finishes, so a run killed at any moment keeps those shards and the next run
fetches only the rest. The guard (crawl/safety.py, crawl/worker.py) and the per-host limits (crawl/polite.py)
run inside img2dataset's workers; the list is interleaved by host so that a shard's threads spread over hosts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dextra.crawl.polite import Politeness, host_of, interleaved
from dextra.crawl.safety import Policy
from dextra.crawl.status import CRAWL_STATUS_SCHEMA, commit
from dextra.crawl.worker import guarded_img2dataset, outcome
from dextra.pipeline.errors import ParamsError
from dextra.pipeline.params import FetchParams
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import URL_SCHEMA, sha256_hex, write_table


def _image_rows(ok: pa.Table, encode_format: str) -> pa.Table:
    """img2dataset's successful rows as IMAGE_SCHEMA rows (plus url_id, query and the original size)."""
    images = ok.column(encode_format)
    return pa.table(
        {
            "id": ok["url_id"],
            "image": images,
            "width": ok["width"],
            "height": ok["height"],
            "captions": [[t] if t and t.strip() else [] for t in ok["caption"].to_pylist()],
            "split": ["extra"] * ok.num_rows,
            "class": ok["class"],
            "source": ok["source"],
            "url": ok["url"],
            "sha256": [sha256_hex(b) for b in images.to_pylist()],
            "url_id": ok["url_id"],
            "query": ok["query"],
            "original_width": ok["original_width"],
            "original_height": ok["original_height"],
        }
    )


class _Committer:
    """Commits each img2dataset shard once its stats file exists (img2dataset writes that file last)."""

    def __init__(self, out: Path, paths: Paths, run_name: str, attempts: dict[str, int], encode_format: str):
        self.out, self.paths, self.run_name, self.attempts, self.encode_format = (
            out,
            paths,
            run_name,
            attempts,
            encode_format,
        )
        self.committed: set[str] = set()
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._poll, name="dextra-commit", daemon=True)

    def _poll(self) -> None:
        try:
            while not self._stop.wait(0.5):
                self.sweep()
        except BaseException as exc:  # re-raised in the main thread by __exit__
            self._error = exc

    def sweep(self) -> None:
        for stats_file in sorted(self.out.glob("*_stats.json")):
            shard = stats_file.name.removesuffix("_stats.json")
            if shard in self.committed:
                continue
            stats = stats_file.read_bytes()
            try:
                json.loads(stats)
            except ValueError:
                continue  # still being written
            self._commit(shard, stats)

    def _commit(self, shard: str, stats: bytes) -> None:
        name = f"{self.run_name}-{shard}"
        table = pq.read_table(self.out / f"{shard}.parquet").sort_by("key")  # completion order -> input order
        rows = []
        for r in table.select(["url_id", "status", "error_message"]).to_pylist():
            status, transient, error = outcome(r["status"], r["error_message"])
            shard_file = f"{name}.parquet" if status == "ok" else None
            rows.append(
                {
                    "url_id": r["url_id"],
                    "status": status,
                    "error": error,
                    "shard": shard_file,
                    "attempts": self.attempts.get(r["url_id"], 0) + 1,
                    "transient": transient,
                }
            )
        images = _image_rows(table.filter(pc.equal(table["status"], "success")), self.encode_format)
        commit(self.paths, name, pa.Table.from_pylist(rows, CRAWL_STATUS_SCHEMA), images, stats)
        self.committed.add(shard)
        self.rows += rows

    def __enter__(self) -> _Committer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if exc_info[0] is None:
            self.sweep()


def check_distributor(fetch: FetchParams) -> None:
    """img2dataset's ray distributor silently does nothing when ray is missing: refuse up front instead."""
    install = {"pyspark": "pip install -e '.[spark]'", "ray": "pip install -e '.[ray]'"}.get(fetch.distributor)
    if install and importlib.util.find_spec(fetch.distributor) is None:
        raise ParamsError(f"fetch.distributor: {fetch.distributor} is not installed ({install})")
    if fetch.distributor == "pyspark":
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors must import dextra from this environment


def download(
    todo: pa.Table, paths: Paths, run_name: str, attempts: dict[str, int], policy: Policy, fetch: FetchParams
) -> list[dict]:
    """Fetch `todo` with img2dataset through the guard; returns the status rows it committed."""
    paths.crawl_work.mkdir(parents=True, exist_ok=True)
    work = Path(
        tempfile.mkdtemp(prefix=f"{run_name}-", dir=paths.crawl_work)
    )  # unique: a killed run's workers never write here
    todo = todo.take(pa.array(interleaved([host_of(u) for u in todo["url"].to_pylist()]), pa.int64()))
    write_table(todo, work / "input.parquet", URL_SCHEMA)
    politeness = Politeness.from_params(str(work / "hosts"), fetch)
    out = work / "out"
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with (
            _Committer(out, paths, run_name, attempts, fetch.encode_format) as committer,
            guarded_img2dataset(policy, politeness) as download,
        ):
            download(
                url_list=str(work / "input.parquet"),
                output_folder=str(out),
                input_format="parquet",
                url_col="url",
                caption_col="text",
                save_additional_columns=["url_id", "query", "class", "source"],
                output_format="parquet",
                image_size=fetch.image_size,
                resize_mode=fetch.resize_mode,
                resize_only_if_bigger=fetch.resize_only_if_bigger,
                encode_format=fetch.encode_format,
                encode_quality=fetch.encode_quality,
                processes_count=fetch.processes,
                thread_count=fetch.threads,
                timeout=fetch.timeout_s,
                retries=0,  # a transient failure is retried by a later run, not at once
                number_sample_per_shard=fetch.shard_size,
                extract_exif=False,
                compute_hash=None,  # the stage hashes the stored bytes itself
                distributor=fetch.distributor,
                enable_wandb=False,
                user_agent_token=fetch.user_agent_token,
                disallowed_header_directives=list(fetch.opt_out),
            )
    except SystemExit:
        # img2dataset's Ctrl-C handler exits with status 0; DVC would then record a half-done fetch as done.
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, sigint)
    rows = committer.rows
    missing = sorted(set(todo["url_id"].to_pylist()) - {r["url_id"] for r in rows})
    if missing:  # a shard img2dataset gave up on: transient, so a later run tries again
        failed = [
            {
                "url_id": key,
                "status": "error",
                "error": "no result: img2dataset's shard failed (see its output above)",
                "shard": None,
                "attempts": attempts.get(key, 0) + 1,
                "transient": True,
            }
            for key in missing
        ]
        commit(paths, f"{run_name}-unfinished", pa.Table.from_pylist(failed, CRAWL_STATUS_SCHEMA), None, None)
        rows += failed
    return rows


def retryable(status: pa.Table, transient_retries: int) -> pa.ChunkedArray:
    """Rows whose failure was transient and that have been tried at most `transient_retries` times."""
    return pc.and_(status["transient"], pc.less_equal(status["attempts"], transient_retries))


def select(urls: pa.Table, status: pa.Table, transient_retries: int) -> tuple[pa.Table, dict]:
    """The rows to fetch: never attempted, or failed transiently fewer than 1 + transient_retries times.
    In manifest order, a URL in several lists is fetched once, with the text/query/class of the first."""
    attempted = set(status["url_id"].to_pylist())
    retry = set(status.filter(retryable(status, transient_retries))["url_id"].to_pylist())
    seen: set[str] = set()
    keep, new, duplicates = [], 0, 0
    for i, key in enumerate(urls["url_id"].to_pylist()):
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if key not in attempted or key in retry:
            keep.append(i)
            new += key not in attempted
    summary = {"listed": urls.num_rows, "new": new, "retried": len(keep) - new, "duplicates": duplicates}
    return urls.take(pa.array(keep, pa.int64())), summary
