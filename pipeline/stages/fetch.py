"""`dextra fetch`: img2dataset downloads every URL that has no status row yet, plus the transient failures
still under fetch.transient_retries, and each URL ends with exactly one row in data/crawl/status.parquet.

The stage decides what to fetch from its own record (crawl/status.py), not from img2dataset's incremental
mode, which misses rows appended to a finished shard and never retries failures. Each finished img2dataset shard
is committed on its own, so a run killed at any moment keeps those shards and the next run fetches only the rest.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from dextra.crawl.fetch import check_distributor, download, retryable, select
from dextra.crawl.safety import Policy
from dextra.crawl.status import consolidate, crawl_lock, next_run, repair
from dextra.pipeline.atomic import write_json
from dextra.pipeline.errors import ParamsError
from dextra.pipeline.manifest import LocalSource, load_manifest, local_folder
from dextra.pipeline.params import FetchParams, Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import URL_SCHEMA, read_tables, shard_files

IMAGE_SETTINGS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality")
OUTCOMES = ("ok", "error", "refused", "opt-out")


def check_image_settings(paths: Paths, fetch: FetchParams) -> None:
    """data/crawl persists and fetched URLs are never fetched again, so a run with other image settings would store
    new images unlike the old ones without a word. Refuse it, naming the setting and both ways on."""
    record = paths.crawl_image_settings
    wanted = {name: getattr(fetch, name) for name in IMAGE_SETTINGS}
    stored = json.loads(record.read_text()) if record.exists() else wanted
    changed = [name for name in IMAGE_SETTINGS if stored.get(name) != wanted[name]]
    if changed and shard_files(paths.crawl_shards):
        raise ParamsError(
            "; ".join(
                f"fetch.{name}: {wanted[name]!r}, but the images in {paths.crawl_shards} were stored with "
                f"{stored.get(name)!r}"
                for name in changed
            )
            + ". Fetched URLs are never fetched again, so only new ones would get the new setting: set it back, "
            f"or delete {paths.crawl} to fetch every URL again"
        )
    write_json(record, wanted)


def _report(summary: dict, rows: list[dict], status: pa.Table, transient_retries: int) -> dict:
    """`summary` with this run's outcomes, which are also printed as a table beside the totals of all runs."""
    this_run = Counter(r["status"] for r in rows)
    reasons = Counter(r["error"].split(": ")[0] for r in rows if r["status"] != "ok")
    total = Counter(status["status"].to_pylist())
    waiting = pc.sum(retryable(status, transient_retries)).as_py() or 0
    lines = [
        f"dextra fetch: {len(rows)} URLs fetched ({summary['new']} new, {summary['retried']} retried)",
        f"  {'outcome':<10}{'this run':>10}{'all URLs':>10}",
    ]
    lines += [f"  {name:<10}{this_run.get(name, 0):>10}{total.get(name, 0):>10}" for name in OUTCOMES]
    lines.append(
        f"  {waiting} transient error(s) will be retried by the next run (fetch.transient_retries: {transient_retries})"
    )
    if reasons:
        lines.append("  reasons this run: " + ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common(10)))
    print("\n".join(lines), flush=True)
    outcomes = {name: this_run.get(name, 0) for name in OUTCOMES}
    return {**summary, **outcomes, "transient": sum(r["transient"] for r in rows), "reasons": dict(reasons)}


def run(params: Params, paths: Paths) -> dict:
    manifest = load_manifest(params.dataset, paths)
    fetch = params.fetch
    local = [local_folder(s, paths) for s in manifest.sources if isinstance(s, LocalSource)]
    policy = Policy.from_params(fetch, manifest, local)
    check_distributor(fetch)
    with crawl_lock(paths):
        status = consolidate(paths)  # what a killed run committed counts; what it left half-done goes
        status, repaired = repair(paths, status)
        for line in repaired:
            print(f"dextra fetch: repaired: {line}", flush=True)
        urls = read_tables([paths.url_list(s.name) for s in manifest.sources], URL_SCHEMA)
        todo, summary = select(urls, status, fetch.transient_retries)
        summary["repaired"] = len(repaired)
        if not todo.num_rows:
            return summary
        check_image_settings(paths, fetch)
        summary["run"] = run_name = next_run(paths)
        attempts = dict(zip(status["url_id"].to_pylist(), status["attempts"].to_pylist()))
        rows = download(todo, paths, run_name, attempts, policy, fetch)
        status = consolidate(paths)
    return _report(summary, rows, status, fetch.transient_retries)
