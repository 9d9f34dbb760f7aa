"""`dextra prune`: delete from data/crawl every fetched URL that no list under data/urls names any more (its status
row and its image). Curate already leaves such URLs out; their images are kept on disk in case a list names them
again, and this command is how to reclaim the space. Not a DVC stage: run it by hand, then `dvc repro`."""

from __future__ import annotations

from dextra.crawl.status import prune
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import URL_SCHEMA, read_tables, shard_files


def run(params: Params, paths: Paths) -> dict:
    listed = set(read_tables(shard_files(paths.urls), URL_SCHEMA, columns=["url_id"]).column("url_id").to_pylist())
    return prune(paths, listed)
