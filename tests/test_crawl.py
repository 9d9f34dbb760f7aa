"""The `urls` and `fetch` stages end to end against a loopback server (tests/test_crawl_safety.py's web)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dextra.crawl.status import CRAWL_STATUS_SCHEMA
from dextra.crawl.urls import normalize_url, url_id
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.params import parse_params
from dextra.pipeline.shards import IMAGE_SCHEMA, STATUS_SCHEMA, URL_SCHEMA, read_table, read_tables, shard_files
from dextra.pipeline.stages import fetch, urls
from tests.helpers import REPO
from tests.helpers.web import Web, encoded, project, static, write_csv

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- urls -------------------------------------------------------------------------------------------


def test_normalize_url_and_stable_url_id():
    assert (
        normalize_url("  HTTP://User@Example.COM:8080/Path/A.JPG?Q=1#F \n")
        == "http://User@example.com:8080/Path/A.JPG?Q=1#F"
    )
    assert normalize_url("file:///tmp/Some.PNG") == "file:///tmp/Some.PNG"
    # url_id is part of the on-disk contract: it must never change between versions
    assert url_id("http://example.com/a.jpg") == hashlib.sha256(b"http://example.com/a.jpg").hexdigest()[:16]
    assert url_id(normalize_url("HTTP://EXAMPLE.com/a.jpg ")) == url_id("http://example.com/a.jpg")


def test_relative_references_name_files_beside_the_list_only_where_files_are_allowed(tmp_path):
    from dextra.crawl.urls import build_list
    from dextra.pipeline.manifest import UrlSource

    source = UrlSource(name="web", path="x")
    for folder in ("one/lists", "two/checkout/lists", "one/more"):
        write_csv(tmp_path / folder / "urls.csv", "url,text", ["images/1.png,one", "http://example.com/2.jpg,two"])
    here = build_list(source, tmp_path / "one/lists/urls.csv", tmp_path / "one")[0]
    moved = build_list(source, tmp_path / "two/checkout/lists/urls.csv", tmp_path / "two/checkout")[0]
    other = build_list(source, tmp_path / "one/more/urls.csv", tmp_path / "one")[0]
    assert here["url"].to_pylist() == [(tmp_path / "one/lists/images/1.png").as_uri(), "http://example.com/2.jpg"]
    assert here["url_id"].to_pylist() == moved["url_id"].to_pylist()  # the same checkout in another folder
    assert here["url_id"].to_pylist() == [url_id("lists/images/1.png"), url_id("http://example.com/2.jpg")]
    assert other["url_id"][0] != here["url_id"][0]  # the same reference beside another list is another file
    plain = build_list(source, tmp_path / "one/lists/urls.csv")[0]  # http(s)-only manifests: nothing is resolved
    assert plain["url"].to_pylist()[0] == "images/1.png"


def test_urls_maps_columns_dedupes_and_drops_removed_sources(tmp_path):
    write_csv(
        tmp_path / "lists" / "a.csv",
        "link,alt,q,label",
        [
            "http://Example.com/1.jpg,one bird,bird,3",
            " HTTP://EXAMPLE.COM/1.jpg ,same link again,bird,3",
            "http://example.com/2.jpg,,bird,3",
            ",no url,bird,3",
        ],
    )
    (tmp_path / "lists" / "b.jsonl").write_text(json.dumps({"url": "http://example.com/3.jpg", "text": "x"}) + "\n")
    sources = [
        {"name": "a", "path": "lists/a.csv", "columns": {"url": "link", "text": "alt", "query": "q", "class": "label"}},
        {"name": "b", "path": "lists/b.jsonl", "format": "jsonl"},
    ]
    params, paths = project(tmp_path, sources)
    summary = urls.run(params, paths)
    assert summary["sources"]["a"] == {"urls": 2, "duplicates": 1, "empty": 1}

    a = read_table(paths.urls / "a.parquet", URL_SCHEMA).to_pylist()
    assert [r["url"] for r in a] == ["http://example.com/1.jpg", "http://example.com/2.jpg"]
    assert a[0] == {
        "url_id": url_id("http://example.com/1.jpg"),
        "url": "http://example.com/1.jpg",
        "text": "one bird",
        "query": "bird",
        "class": "3",
        "source": "a",
    }
    assert a[1]["text"] is None
    b = read_table(paths.urls / "b.parquet", URL_SCHEMA).to_pylist()
    assert b[0]["query"] is None and b[0]["class"] is None and b[0]["text"] == "x"

    before = read_table(paths.urls / "a.parquet", URL_SCHEMA)
    params, paths = project(tmp_path, sources[:1])
    assert urls.run(params, paths)["removed"] == ["b"]
    assert not (paths.urls / "b.parquet").exists()
    assert read_table(paths.urls / "a.parquet", URL_SCHEMA).equals(before)


def test_urls_missing_list_or_url_column_names_the_file(tmp_path):
    params, paths = project(tmp_path, [{"name": "a", "path": "lists/nope.csv"}])
    with pytest.raises(InputError, match="nope.csv"):
        urls.run(params, paths)
    write_csv(tmp_path / "lists" / "nourl.csv", "link,text", ["http://example.com/1.jpg,x"])
    params, paths = project(tmp_path, [{"name": "a", "path": "lists/nourl.csv"}])
    with pytest.raises(InputError, match=r"nourl\.csv.*'url'"):
        urls.run(params, paths)
    assert not list(paths.urls.glob("*.parquet"))


def test_manifest_and_fetch_params_are_checked_before_any_work(tmp_path):
    params, paths = project(tmp_path, [{"name": "a", "path": "a.csv"}, {"name": "a", "path": "b.csv"}])
    with pytest.raises(ParamsError, match="unique"):
        urls.run(params, paths)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["fetch"].update(encode_format="png", encode_quality=95)
    with pytest.raises(ParamsError, match="PNG compression"):
        parse_params(raw)


# ---- fetch ------------------------------------------------------------------------------------------

IMAGES = {
    "/good.jpg": encoded(Image.new("RGB", (80, 40), "red"), "JPEG"),
    "/good.png": encoded(Image.new("RGB", (50, 100), "blue"), "PNG"),
    "/new1.jpg": encoded(Image.new("RGB", (40, 40), "green"), "JPEG"),
    "/new2.jpg": encoded(Image.new("RGB", (40, 60), "yellow"), "JPEG"),
    "/new3.jpg": encoded(Image.new("RGB", (60, 40), "purple"), "JPEG"),
}
FAILURES = {  # path -> (reply, what its error must say)
    "/missing.jpg": (static(b"not found", 404), "HTTP 404: Not Found"),
    "/corrupt.jpg": (static(random.Random(0).randbytes(2000)), "not an image: 2000 bytes of an unknown format"),
    "/page.jpg": (static(b"<html><body>not an image</body></html>"), "not an image: an HTML or XML page"),
}


@pytest.fixture(scope="module")
def web():
    server = Web()
    server.routes.update({path: static(body) for path, body in IMAGES.items()})
    server.routes.update({path: reply for path, (reply, _) in FAILURES.items()})
    yield server
    server.close()


@pytest.fixture(scope="module")
def crawled(tmp_path_factory, web):
    """One urls + fetch run over every kind of URL; what the tests need is read into memory right away."""
    root = tmp_path_factory.mktemp("crawl")
    local = root / "local.jpg"
    local.write_bytes(IMAGES["/good.jpg"])
    long_url = f"{web.base}/good.jpg?pad=" + "x" * 2100
    rows = [
        f"{web.base}/good.jpg,a red thing,red,r",
        f"{web.base}/good.png,,blue,b",
        *(f"{web.base}{p},broken,broken,x" for p in FAILURES),
        f"file://{local},a local file,red,r",
        f"{long_url},too long,red,r",
    ]
    write_csv(root / "lists" / "web.csv", "url,text,query,class", rows)
    write_csv(root / "lists" / "more.csv", "url,text,query,class", [f"{web.base.upper()}/good.jpg,again,red,r"])
    sources = [{"name": "web", "path": "lists/web.csv"}, {"name": "more", "path": "lists/more.csv"}]
    params, paths = project(root, sources, web=web)
    urls.run(params, paths)
    web.hits.clear()
    summary = fetch.run(params, paths)
    return {
        "root": root,
        "sources": sources,
        "summary": summary,
        "hits": Counter(web.hits),
        "status": read_table(paths.crawl_status, CRAWL_STATUS_SCHEMA).to_pylist(),
        "shards": {p.name: read_table(p, IMAGE_SCHEMA).to_pylist() for p in shard_files(paths.crawl_shards)},
        "url_ids": {
            r["url"]: r["url_id"] for p in shard_files(paths.urls) for r in read_table(p, URL_SCHEMA).to_pylist()
        },
        "long_url": long_url,
        "local": local,
    }


def test_fetch_stores_resized_images_with_their_hash(crawled, web):
    rows = [r for shard in crawled["shards"].values() for r in shard]
    by_url = {r["url"]: r for r in rows}
    assert set(by_url) == {f"{web.base}/good.jpg", f"{web.base}/good.png"}
    assert crawled["hits"]["/good.jpg"] == 1  # listed twice (case of the host differs), fetched once
    for url, (original, stored) in {"good.jpg": ((80, 40), (64, 32)), "good.png": ((50, 100), (32, 64))}.items():
        row = by_url[f"{web.base}/{url}"]
        image = Image.open(io.BytesIO(row["image"]))
        image.load()
        assert image.format == "JPEG" and image.size == stored == (row["width"], row["height"])
        assert (row["original_width"], row["original_height"]) == original
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert row["id"] == row["url_id"] == crawled["url_ids"][row["url"]]
        assert row["split"] == "extra" and row["source"] == "web"
    assert by_url[f"{web.base}/good.jpg"]["captions"] == ["a red thing"]
    assert by_url[f"{web.base}/good.jpg"]["query"] == "red" and by_url[f"{web.base}/good.jpg"]["class"] == "r"
    assert by_url[f"{web.base}/good.png"]["captions"] == []


def test_fetch_writes_one_status_row_per_url(crawled, web):
    status = {r["url_id"]: r for r in crawled["status"]}
    assert len(status) == len(crawled["status"]) == len(crawled["url_ids"]) == 7  # good.jpg is in both lists
    for path, (_, says) in FAILURES.items():
        row = status[crawled["url_ids"][web.base + path]]
        assert (row["status"], row["error"], row["shard"], row["transient"]) == ("error", says, None, False)
    ok = [r for r in crawled["status"] if r["status"] == "ok"]
    assert {r["shard"] for r in ok} == set(crawled["shards"]) and len(ok) == 2
    assert all(r["attempts"] == 1 for r in crawled["status"])
    assert crawled["summary"] == {
        "listed": 8,
        "new": 7,
        "retried": 0,
        "duplicates": 1,
        "repaired": 0,
        "run": "run0001",
        "ok": 2,
        "error": 3,
        "refused": 2,
        "opt-out": 0,
        "transient": 0,
        "reasons": {"HTTP 404": 1, "not an image": 2, "refused URL": 2},
    }
    assert (
        json.loads((crawled["root"] / "data" / "crawl" / "stats" / "run0001-00000_stats.json").read_text())["count"]
        == 7
    )
    assert not (crawled["root"] / "data" / "crawl" / "journal").exists()


def test_fetch_refuses_disallowed_scheme_and_long_url_without_fetching(crawled):
    status = {r["url_id"]: r for r in crawled["status"]}
    local = status[crawled["url_ids"][f"file://{crawled['local']}"]]
    assert local["status"] == "refused" and "scheme 'file' is not allowed" in local["error"]
    long = status[crawled["url_ids"][crawled["long_url"]]]
    assert long["status"] == "refused" and "2048" in long["error"]
    assert sum(crawled["hits"].values()) == 5 + 1  # and the site's robots.txt, once


def test_fetch_again_fetches_only_new_urls(crawled, web, capsys):
    root = crawled["root"]
    params, paths = project(root, crawled["sources"], web=web)
    before = _snapshot(paths.crawl)
    web.hits.clear()
    assert fetch.run(params, paths) == {"listed": 8, "new": 0, "retried": 0, "duplicates": 1, "repaired": 0}
    assert _snapshot(paths.crawl) == before and not web.hits

    # a run killed mid-commit left an image shard no status row names: it is discarded, its URLs fetched again
    (paths.crawl_shards / "run0002-00000.parquet").write_bytes(b"half a shard")
    # a row appended to a list, and a new list that also holds an image fetched before
    with open(root / "lists" / "web.csv", "a") as f:
        f.write(f"{web.base}/new1.jpg,new one,green,g\n")
    write_csv(
        root / "lists" / "extra.csv",
        "url,text,query,class",
        [f"{web.base}/new2.jpg,new two,yellow,y", f"{web.base}/good.png,,b,b"],
    )
    params, paths = project(root, [*crawled["sources"], {"name": "extra", "path": "lists/extra.csv"}], web=web)
    urls.run(params, paths)
    capsys.readouterr()
    summary = fetch.run(params, paths)
    assert summary["listed"] == 11 and summary["duplicates"] == 2
    assert summary["new"] == 2 and summary["ok"] == 2 and summary["run"] == "run0002"
    assert web.hits == Counter({"/new1.jpg": 1, "/new2.jpg": 1, "/robots.txt": 1})
    table = capsys.readouterr().out
    assert "2 URLs fetched (2 new, 0 retried)" in table and "  ok                 2         4" in table
    after = _snapshot(paths.crawl)
    assert all(after[name] == value for name, value in before.items() if name.startswith("shards/"))
    new_shard = read_table(paths.crawl_shards / "run0002-00000.parquet", IMAGE_SCHEMA)
    assert sorted(new_shard["url"].to_pylist()) == [f"{web.base}/new1.jpg", f"{web.base}/new2.jpg"]
    status = read_table(paths.crawl_status, STATUS_SCHEMA)
    assert status.num_rows == 9 and len(set(status["url_id"].to_pylist())) == 9
    assert not (paths.crawl_work).exists()


def test_fetch_refuses_other_image_settings_than_the_stored_images(crawled, web):
    root = crawled["root"]
    with open(root / "lists" / "web.csv", "a") as f:
        f.write(f"{web.base}/new3.jpg,new three,green,g\n")
    params, paths = project(root, crawled["sources"], web=web, image_size=48, encode_format="png", encode_quality=6)
    urls.run(params, paths)
    before = _snapshot(paths.crawl)
    web.hits.clear()
    with pytest.raises(
        ParamsError,
        match=(
            r"^fetch\.image_size: 48, but the images in .* were stored with 32; fetch\.encode_format: 'png', .*'jpg'; "
            r"fetch\.encode_quality: 6, .* 95\. .*delete"
        ),
    ):
        fetch.run(params, paths)
    assert _snapshot(paths.crawl) == before and not web.hits
    params, paths = project(root, crawled["sources"], web=web)  # back to the stored settings: the new URL is fetched
    assert fetch.run(params, paths)["ok"] == 1 and web.hits == Counter({"/new3.jpg": 1, "/robots.txt": 1})


def test_a_second_fetch_on_the_same_folder_is_refused(crawled, web):
    from dextra.crawl.status import crawl_lock

    params, paths = project(crawled["root"], crawled["sources"], web=web)
    with crawl_lock(paths):
        with pytest.raises(InputError, match="another `dextra fetch` is running"):
            fetch.run(params, paths)


def test_fetch_params_are_checked(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["fetch"].update(distributor="dask")
    with pytest.raises(ParamsError, match="fetch.distributor"):
        parse_params(raw)
    # where ray is not installed, img2dataset would silently fetch nothing
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    params, paths = project(tmp_path, [], distributor="ray")
    with pytest.raises(ParamsError, match=r"^fetch\.distributor: ray is not installed \(pip install -e '\.\[ray\]'\)$"):
        fetch.run(params, paths)


def test_a_damaged_or_lost_crawl_shard_sends_only_its_urls_back_to_fetch(tmp_path, web, capsys):
    """A shard truncated as a disk error would, and one deleted: the next fetch says what it repaired and fetches
    exactly their URLs again; the other shard is not touched."""
    for i in range(6):
        web.routes[f"/shard{i}.png"] = static(encoded(Image.new("RGB", (30, 30), (40 * i, 80, 120)), "PNG"))
    write_csv(
        tmp_path / "lists" / "web.csv", "url,text,query,class", [f"{web.base}/shard{i}.png,t,q,c" for i in range(6)]
    )
    params, paths = project(tmp_path, [{"name": "web", "path": "lists/web.csv"}], web=web, shard_size=2)
    urls.run(params, paths)
    fetch.run(params, paths)
    shards = shard_files(paths.crawl_shards)
    assert len(shards) == 3
    untouched = shards[2].read_bytes()
    lost = set(read_table(shards[0])["url"].to_pylist()) | set(read_table(shards[1])["url"].to_pylist())
    shards[0].write_bytes(shards[0].read_bytes()[:300])
    shards[1].unlink()
    web.hits.clear()
    capsys.readouterr()
    summary = fetch.run(params, paths)
    out = capsys.readouterr().out
    assert summary["repaired"] == 2 and summary["new"] == 4 and summary["ok"] == 4
    assert "repaired" in out and "is unreadable" in out and "is missing" in out
    assert {f"{web.base}{path}" for path in web.hits} - {f"{web.base}/robots.txt"} == lost
    assert shards[2].read_bytes() == untouched
    status = read_table(paths.crawl_status, STATUS_SCHEMA)
    assert status.num_rows == 6 and set(status["status"].to_pylist()) == {"ok"}
    images = read_tables(shard_files(paths.crawl_shards), IMAGE_SCHEMA)
    assert sorted(images["url"].to_pylist()) == sorted(f"{web.base}/shard{i}.png" for i in range(6))
    assert fetch.run(params, paths)["repaired"] == 0
