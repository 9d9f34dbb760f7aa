"""`dextra urls`: every source of the manifest's `sources:` becomes data/urls/<source>.parquet (URL_SCHEMA).
Lists given as `url:` + `sha256:` are downloaded (resumably) into data/urls/downloads/ first; a local source's
archive is unpacked into data/local/<source>/ first (crawl/local.py), and its images are listed as file:// URLs."""

from __future__ import annotations

import shutil

from dextra.crawl.download import download_file
from dextra.crawl.local import list_images, unpack
from dextra.crawl.urls import build_list
from dextra.pipeline.manifest import LocalSource, load_manifest, local_folder
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import URL_SCHEMA, shard_files, write_table


def run(params: Params, paths: Paths) -> dict:
    manifest = load_manifest(params.dataset, paths)
    # Read every source before writing any, so one broken source leaves all lists as they were.
    tables, summary = {}, {}
    for source in manifest.sources:
        if isinstance(source, LocalSource):
            unpacked = (
                unpack(paths.root / source.images, local_folder(source, paths), source) if source.is_archive else {}
            )
            tables[source.name], summary[source.name] = list_images(local_folder(source, paths), source)
            summary[source.name].update(unpacked)
            continue
        if source.url:
            path = download_file(
                source.url, paths.url_download(source.name, source.format), source.sha256, label=source.name
            )
        else:
            path = paths.root / source.path
        files_root = paths.root if "file" in manifest.allowed_schemes else None
        tables[source.name], summary[source.name] = build_list(source, path, files_root)
    for name, table in tables.items():
        write_table(table, paths.url_list(name), URL_SCHEMA)
    removed = [p.stem for p in shard_files(paths.urls) if p.stem not in tables]
    for stem in removed:
        paths.url_list(stem).unlink()
    paths.local_sources.mkdir(parents=True, exist_ok=True)  # a DVC output, even when no source is local
    unpacked = {s.name for s in manifest.sources if isinstance(s, LocalSource) and s.is_archive}
    keep = {
        paths.url_download(s.name, s.format).name for s in manifest.sources if not isinstance(s, LocalSource) and s.url
    }
    # .tmp: writes cut short by a kill; downloads of sources no longer listed; unpacked archives of sources no
    # longer in the manifest (or no longer archives), and unpacks cut short by a kill
    downloads = [
        p
        for p in paths.url_downloads.glob("*")
        if p.name.removesuffix(".json").removesuffix(".part").removesuffix(".bad") not in keep
    ]
    local = [p for p in paths.local_sources.iterdir() if p.name not in unpacked]
    for stale in (*paths.urls.glob(".*.tmp"), *downloads, *local):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    return {"sources": summary, "removed": removed}
