"""`fetch` stage: download, with img2dataset, the image of every URL that has no row in status.parquet yet.

Every URL ends with exactly one status row (ok, error or refused), so a URL is attempted once, ever:
re-running with nothing new fetches nothing and touches no file, and appending to a list fetches only
the appended URLs.

Crash safety: a run writes its image shards (`run<N>-<k>.parquet`) first and status.parquet last, in one
atomic rename. A shard that no status row names was left by a run killed before that rename; the next
run deletes it, and since its URLs still have no status row they are fetched again. The img2dataset
stats of such a run stay under stats/, as a log of the attempt.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..pipeline.atomic import write_bytes
from ..pipeline.manifest import Manifest, load_manifest
from ..pipeline.params import FetchParams, Params
from ..pipeline.paths import Paths
from ..pipeline.shards import (
    STATUS_SCHEMA,
    URL_SCHEMA,
    read_table,
    read_tables,
    sha256_hex,
    shard_files,
    write_table,
)

MAX_URL_LENGTH = 2048
_RUN_FILE = re.compile(r"^run(\d+)-")


def stats_dir(paths: Paths) -> Path:
    return paths.crawl / "stats"


def _work_dir(paths: Paths) -> Path:
    """img2dataset's input and output; only lives during a run."""
    return paths.crawl / ".img2dataset"


def refusal(url: str, manifest: Manifest) -> str | None:
    """Why a URL is not fetched at all, or None. (Host checks are not done here yet.)"""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is {len(url)} characters long (at most {MAX_URL_LENGTH})"
    scheme = urlsplit(url).scheme
    if scheme not in manifest.allowed_schemes:
        allowed = ", ".join(manifest.allowed_schemes)
        return f"scheme {scheme or '(none)'!r} is not allowed by manifest {manifest.name!r} (allowed: {allowed})"
    return None


def _discard_unfinished(paths: Paths, referenced: set[str]) -> None:
    shutil.rmtree(_work_dir(paths), ignore_errors=True)
    for folder in (paths.crawl, paths.crawl_shards, stats_dir(paths)):
        for tmp in folder.glob(".*.tmp"):  # atomic writes cut short by a kill
            shutil.rmtree(tmp, ignore_errors=True)
    for shard in shard_files(paths.crawl_shards):
        if shard.name not in referenced:
            shard.unlink()


def _next_run(paths: Paths) -> int:
    names = [p.name for p in (*paths.crawl_shards.glob("run*"), *stats_dir(paths).glob("run*"))]
    return 1 + max((int(m.group(1)) for m in map(_RUN_FILE.match, names) if m), default=0)


def _download(table: pa.Table, work: Path, fetch: FetchParams) -> Path:
    """Run img2dataset on `table`; returns its output folder (parquet shards and *_stats.json)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations, imported by img2dataset, phones home
    from img2dataset import download

    write_table(table, work / "input.parquet", URL_SCHEMA)
    out = work / "out"
    sigint = signal.getsignal(signal.SIGINT)
    try:
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
            encode_format=fetch.encode_format,
            encode_quality=fetch.encode_quality,
            processes_count=fetch.processes,
            thread_count=fetch.threads,
            timeout=fetch.timeout_s,
            retries=fetch.retries,
            number_sample_per_shard=fetch.shard_size,
            extract_exif=False,
            compute_hash="sha256",
            distributor="multiprocessing",
            enable_wandb=False,
        )
    except SystemExit:
        # img2dataset's Ctrl-C handler exits with status 0; DVC would then record a half-done fetch as done.
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, sigint)
    return out


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


def _collect(out: Path, paths: Paths, run_name: str, encode_format: str) -> list[dict]:
    """Write the run's image shards and stats; return one status row per URL img2dataset reported on."""
    rows = []
    for part in sorted(out.glob("*.parquet")):
        name = f"{run_name}-{part.stem}.parquet"
        table = pq.read_table(part).sort_by("key")  # img2dataset writes in completion order; key is input order
        ok = table.filter(pc.equal(table["status"], "success"))
        if ok.num_rows:
            write_table(_image_rows(ok, encode_format), paths.crawl_shards / name)
        for r in table.select(["url_id", "status", "error_message"]).to_pylist():
            if r["status"] == "success":
                rows.append({"url_id": r["url_id"], "status": "ok", "error": None, "shard": name})
            else:
                message = " ".join(str(r["error_message"]).split())  # OpenCV's messages span lines
                rows.append({"url_id": r["url_id"], "status": "error", "error": f"{r['status']}: {message}", "shard": None})
    for stats in sorted(out.glob("*_stats.json")):
        write_bytes(stats_dir(paths) / f"{run_name}-{stats.name}", stats.read_bytes())
    return rows


def run(params: Params, paths: Paths) -> dict:
    manifest = load_manifest(params.dataset, paths)
    status = read_table(paths.crawl_status, STATUS_SCHEMA) if paths.crawl_status.exists() else STATUS_SCHEMA.empty_table()
    _discard_unfinished(paths, set(status["shard"].drop_null().to_pylist()))

    # In manifest order: a URL in several lists is fetched once, with the text/query/class of the first.
    urls = read_tables([paths.urls / f"{s.name}.parquet" for s in manifest.sources], URL_SCHEMA)
    attempted = set(status["url_id"].to_pylist())
    first: set[str] = set()
    keep, duplicates = [], 0
    for i, key in enumerate(urls["url_id"].to_pylist()):
        if key in first:
            duplicates += 1
            continue
        first.add(key)
        if key not in attempted:
            keep.append(i)
    todo = urls.take(pa.array(keep, pa.int64()))
    summary = {"listed": urls.num_rows, "new": todo.num_rows, "duplicates": duplicates}
    if not todo.num_rows:
        return summary

    new_rows, to_fetch = [], []
    for i, (key, url) in enumerate(zip(todo["url_id"].to_pylist(), todo["url"].to_pylist())):
        reason = refusal(url, manifest)
        if reason:
            new_rows.append({"url_id": key, "status": "refused", "error": reason, "shard": None})
        else:
            to_fetch.append(i)

    if to_fetch:
        summary["run"] = run_name = f"run{_next_run(paths):04d}"
        fetch_table = todo.take(to_fetch)
        out = _download(fetch_table, _work_dir(paths), params.fetch)
        reported = _collect(out, paths, run_name, params.fetch.encode_format)
        missing = set(fetch_table["url_id"].to_pylist()) - {r["url_id"] for r in reported}
        new_rows += reported + [
            {"url_id": key, "status": "error", "error": "no result from img2dataset (its shard failed)", "shard": None}
            for key in sorted(missing)
        ]
    new_status = pa.Table.from_pylist(new_rows, schema=STATUS_SCHEMA)
    write_table(pa.concat_tables([status, new_status]), paths.crawl_status, STATUS_SCHEMA)
    shutil.rmtree(_work_dir(paths), ignore_errors=True)

    outcomes = Counter(r["status"] for r in new_rows)
    errors = Counter(r["error"].split(":")[0] for r in new_rows if r["status"] == "error")
    return {**summary, **{k: outcomes.get(k, 0) for k in ("ok", "error", "refused")}, "errors": dict(errors)}
