"""`dextra export` read back by the libraries other trainers use: webdataset's loader and datasets.load_from_disk
give the same rows and the same image bytes as the curated shards and the seed splits."""

from __future__ import annotations

import json

import datasets
import pytest
import webdataset

from dextra.pipeline.errors import InputError
from dextra.pipeline.params import parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_SCHEMA, IMAGE_SCHEMA, read_table, read_tables, shard_files
from dextra.pipeline.stages import curate, export
from tests.helpers import repo_params_dict
from tests.helpers.curate import EVERY_DETECTOR, build_fixture


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """curate on test_curate's fixture, then export both formats in shards of 2 images."""
    paths, _ = build_fixture(tmp_path_factory.mktemp("export"))
    params = parse_params(repo_params_dict(curate=EVERY_DETECTOR, export={"samples_per_shard": 2}))
    curate.run(params, paths)
    return paths, export.run(params, paths)


def _expected(paths: Paths) -> dict[str, dict[str, dict]]:
    """split -> id -> row, from the pipeline's own shards."""
    extra = read_tables(shard_files(paths.curated_shards), CURATED_SCHEMA).to_pylist()
    seed = {s: read_table(paths.seed_split(s), IMAGE_SCHEMA).to_pylist() for s in ("train", "test")}
    return {split: {row["id"]: row for row in rows} for split, rows in {"extra": extra, **seed}.items()}


def test_webdataset_loader_reads_every_row_and_the_stored_bytes(exported):
    paths, summary = exported
    expected = _expected(paths)
    for split, rows in expected.items():
        tars = sorted((paths.export("webdataset") / split).glob("*.tar"))
        assert len(tars) == -(-len(rows) // 2), f"{split}: 2 images per shard"
        loaded = list(webdataset.WebDataset([str(t) for t in tars], shardshuffle=False))
        assert summary["webdataset"][split] == len(loaded) == len(rows) > 0
        for sample in loaded:
            meta = json.loads(sample["json"])
            row = expected[split][meta["id"]]
            image_key = next(k for k in ("jpg", "png", "webp", "gif") if k in sample)
            assert sample[image_key] == row["image"]
            assert sample["txt"].decode() == row["captions"][0]
            assert meta["captions"] == row["captions"] and meta["sha256"] == row["sha256"]
            if split == "extra":
                assert meta["neighbor_ids"] == row["neighbor_ids"]
                assert meta["text_embedding"] == pytest.approx(row["text_embedding"])
            else:
                assert meta["text_embedding"] is None


def test_datasets_load_from_disk_reads_every_row_and_the_stored_bytes(exported):
    paths, summary = exported
    expected = _expected(paths)
    loaded = datasets.load_from_disk(str(paths.export("hf")))
    assert set(loaded) == set(expected)
    for split, rows in expected.items():
        table = loaded[split].cast_column("image", datasets.Image(decode=False))
        assert summary["hf"][split] == len(table) == len(rows)
        for record in table:
            row = expected[split][record["id"]]
            assert record["image"]["bytes"] == row["image"]
            assert {k: record[k] for k in ("captions", "width", "height", "class", "url", "neighbor_ids")} == {
                k: row.get(k) for k in ("captions", "width", "height", "class", "url", "neighbor_ids")
            }
    first = loaded["extra"][0]  # decoded as PIL, as a trainer sees it
    row = expected["extra"][first["id"]]
    assert first["image"].size == (row["width"], row["height"])


def test_export_needs_curate_first_and_keeps_the_last_export(exported, tmp_path):
    paths, _ = exported
    params = parse_params(repo_params_dict())
    with pytest.raises(InputError, match="no curated shards"):
        export.run(params, Paths(tmp_path))
    before = sorted(p.name for p in (paths.export("webdataset") / "extra").iterdir())
    broken = next(iter(shard_files(paths.curated_shards)))
    saved = broken.read_bytes()
    broken.write_bytes(saved[: len(saved) // 2])
    try:
        with pytest.raises(InputError, match=broken.name):
            export.run(parse_params(repo_params_dict(export={"samples_per_shard": 2})), paths)
    finally:
        broken.write_bytes(saved)
    assert sorted(p.name for p in (paths.export("webdataset") / "extra").iterdir()) == before


def test_image_extension_names_the_format_or_the_row():
    assert export.image_extension(b"\xff\xd8\xff\xe0rest", "x") == "jpg"
    assert export.image_extension(b"RIFF\0\0\0\0WEBPVP8 ", "x") == "webp"
    assert (
        export.image_extension(b"\x89PNG\r\n\x1a\n", "x") == "png" and export.image_extension(b"GIF89a", "x") == "gif"
    )
    with pytest.raises(InputError, match="u2: image bytes are neither"):
        export.image_extension(b"RIFF\0\0\0\0WAVEfmt ", "u2")  # a RIFF file that is not a WebP
    with pytest.raises(InputError, match="extra image u1: image bytes are neither"):
        export.image_extension(b"<html>", "extra image u1")
