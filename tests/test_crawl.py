"""The `urls` and `fetch` stages against a loopback HTTP server: nothing here leaves 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dextra.crawl import fetch, urls
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.params import parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import IMAGE_SCHEMA, STATUS_SCHEMA, URL_SCHEMA, read_table, shard_files

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]


def _encoded(size: tuple[int, int], fmt: str, colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


# path -> (HTTP status, content type, body)
ROUTES = {
    "/good.jpg": (200, "image/jpeg", _encoded((80, 40), "JPEG", "red")),
    "/good.png": (200, "image/png", _encoded((50, 100), "PNG", "blue")),
    "/new1.jpg": (200, "image/jpeg", _encoded((40, 40), "JPEG", "green")),
    "/new2.jpg": (200, "image/jpeg", _encoded((40, 60), "JPEG", "yellow")),
    "/missing.jpg": (404, "text/plain", b"not found"),
    "/boom.jpg": (500, "text/plain", b"server error"),
    "/corrupt.jpg": (200, "image/jpeg", random.Random(0).randbytes(2000)),
    "/page.jpg": (200, "image/jpeg", b"<html><body>not an image</body></html>"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path, _, _ = self.path.partition("?")
        with self.server.lock:
            self.server.requests[self.path] += 1
        code, ctype, body = self.server.routes.get(path, (404, "text/plain", b"no such route"))
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.requests, httpd.lock = dict(ROUTES), Counter(), threading.Lock()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _project(root: Path, sources: list[dict], allowed_schemes: list[str] = ("http", "https")):
    """A repository root with manifests/t.yaml and the params of params.yaml, made small and quick."""
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    manifest = {"name": "t", "seed": {"importer": "demo"}, "sources": sources, "allowed_schemes": list(allowed_schemes)}
    (root / "manifests" / "t.yaml").write_text(yaml.safe_dump(manifest))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["dataset"] = "t"
    raw["fetch"].update(image_size=32, resize_mode="keep_ratio", processes=1, threads=4, timeout_s=5, shard_size=100)
    return parse_params(raw), Paths(root)


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- urls -------------------------------------------------------------------------------------------


def test_normalize_url_and_stable_url_id():
    assert urls.normalize_url("  HTTP://User@Example.COM:8080/Path/A.JPG?Q=1#F \n") == "http://User@example.com:8080/Path/A.JPG?Q=1#F"
    assert urls.normalize_url("file:///tmp/Some.PNG") == "file:///tmp/Some.PNG"
    # url_id is part of the on-disk contract: it must never change between versions
    assert urls.url_id("http://example.com/a.jpg") == hashlib.sha256(b"http://example.com/a.jpg").hexdigest()[:16]
    assert urls.url_id(urls.normalize_url("HTTP://EXAMPLE.com/a.jpg ")) == urls.url_id("http://example.com/a.jpg")


def test_urls_maps_columns_dedupes_and_drops_removed_sources(tmp_path):
    _write_csv(
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
    params, paths = _project(tmp_path, sources)
    summary = urls.run(params, paths)
    assert summary["sources"]["a"] == {"urls": 2, "duplicates": 1, "empty": 1}

    a = read_table(paths.urls / "a.parquet", URL_SCHEMA).to_pylist()
    assert [r["url"] for r in a] == ["http://example.com/1.jpg", "http://example.com/2.jpg"]
    assert a[0] == {
        "url_id": urls.url_id("http://example.com/1.jpg"),
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
    params, paths = _project(tmp_path, sources[:1])
    assert urls.run(params, paths)["removed"] == ["b"]
    assert not (paths.urls / "b.parquet").exists()
    assert read_table(paths.urls / "a.parquet", URL_SCHEMA).equals(before)


def test_urls_missing_list_or_url_column_names_the_file(tmp_path):
    params, paths = _project(tmp_path, [{"name": "a", "path": "lists/nope.csv"}])
    with pytest.raises(InputError, match="nope.csv"):
        urls.run(params, paths)
    _write_csv(tmp_path / "lists" / "nourl.csv", "link,text", ["http://example.com/1.jpg,x"])
    params, paths = _project(tmp_path, [{"name": "a", "path": "lists/nourl.csv"}])
    with pytest.raises(InputError, match=r"nourl\.csv.*'url'"):
        urls.run(params, paths)
    assert not list(paths.urls.glob("*.parquet"))


def test_manifest_and_fetch_params_are_checked_before_any_work(tmp_path):
    params, paths = _project(tmp_path, [{"name": "a", "path": "a.csv"}, {"name": "a", "path": "b.csv"}])
    with pytest.raises(ParamsError, match="unique"):
        urls.run(params, paths)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["fetch"].update(encode_format="png", encode_quality=95)
    with pytest.raises(ParamsError, match="PNG compression"):
        parse_params(raw)


def test_urls_downloads_a_list_and_checks_its_sha256(tmp_path, server):
    body = b"url,text\nhttp://example.com/1.jpg,one\n"
    server.routes["/list.csv"] = (200, "text/csv", body)
    good = hashlib.sha256(body).hexdigest()
    bad = "0" * 64
    params, paths = _project(tmp_path, [{"name": "remote", "url": f"{server.base}/list.csv", "sha256": bad}])
    with pytest.raises(InputError) as caught:
        urls.run(params, paths)
    assert "remote" in str(caught.value) and good in str(caught.value) and bad in str(caught.value)
    assert not list(paths.urls.glob("*.parquet"))
    assert (paths.urls / "downloads" / "remote.csv.bad").read_bytes() == body

    params, paths = _project(tmp_path, [{"name": "remote", "url": f"{server.base}/list.csv", "sha256": good}])
    urls.run(params, paths)
    assert read_table(paths.urls / "remote.parquet", URL_SCHEMA)["url"].to_pylist() == ["http://example.com/1.jpg"]
    assert not (paths.urls / "downloads" / "remote.csv.bad").exists()
    requests_before = server.requests["/list.csv"]
    urls.run(params, paths)  # a cached list with the right hash is not downloaded again
    assert server.requests["/list.csv"] == requests_before


# ---- fetch ------------------------------------------------------------------------------------------

FAILURES = {  # path -> what its error message must say
    "/missing.jpg": "404",
    "/boom.jpg": "500",
    "/corrupt.jpg": "failed_to_resize",
    "/page.jpg": "failed_to_resize",
}


@pytest.fixture(scope="module")
def crawled(tmp_path_factory, server):
    """One urls + fetch run over every kind of URL; what the tests need is read into memory right away."""
    root = tmp_path_factory.mktemp("crawl")
    local = root / "local.jpg"
    local.write_bytes(ROUTES["/good.jpg"][2])
    long_url = f"{server.base}/good.jpg?pad=" + "x" * 2100
    rows = [
        f"{server.base}/good.jpg,a red thing,red,r",
        f"{server.base}/good.png,,blue,b",
        *(f"{server.base}{p},broken,broken,x" for p in FAILURES),
        f"file://{local},a local file,red,r",
        f"{long_url},too long,red,r",
    ]
    _write_csv(root / "lists" / "web.csv", "url,text,query,class", rows)
    _write_csv(root / "lists" / "more.csv", "url,text,query,class", [f"{server.base.upper()}/good.jpg,again,red,r"])
    sources = [{"name": "web", "path": "lists/web.csv"}, {"name": "more", "path": "lists/more.csv"}]
    params, paths = _project(root, sources)
    urls.run(params, paths)
    server.requests.clear()
    summary = fetch.run(params, paths)
    return {
        "root": root,
        "sources": sources,
        "summary": summary,
        "requests": Counter(server.requests),
        "status": read_table(paths.crawl_status, STATUS_SCHEMA).to_pylist(),
        "shards": {p.name: read_table(p, IMAGE_SCHEMA).to_pylist() for p in shard_files(paths.crawl_shards)},
        "url_ids": {r["url"]: r["url_id"] for p in shard_files(paths.urls) for r in read_table(p, URL_SCHEMA).to_pylist()},
        "long_url": long_url,
        "local": local,
        "base": server.base,
    }


def test_fetch_stores_resized_images_with_their_hash(crawled):
    base = crawled["base"]
    rows = [r for shard in crawled["shards"].values() for r in shard]
    by_url = {r["url"]: r for r in rows}
    assert set(by_url) == {f"{base}/good.jpg", f"{base}/good.png"}
    assert crawled["requests"]["/good.jpg"] == 1  # listed twice (case of the host differs), fetched once
    for url, (original, stored) in {"good.jpg": ((80, 40), (64, 32)), "good.png": ((50, 100), (32, 64))}.items():
        row = by_url[f"{base}/{url}"]
        image = Image.open(io.BytesIO(row["image"]))
        image.load()
        assert image.format == "JPEG" and image.size == stored == (row["width"], row["height"])
        assert (row["original_width"], row["original_height"]) == original
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert row["id"] == row["url_id"] == crawled["url_ids"][row["url"]]
        assert row["split"] == "extra" and row["source"] == "web"
    assert by_url[f"{base}/good.jpg"]["captions"] == ["a red thing"]
    assert by_url[f"{base}/good.jpg"]["query"] == "red" and by_url[f"{base}/good.jpg"]["class"] == "r"
    assert by_url[f"{base}/good.png"]["captions"] == []


def test_fetch_writes_one_status_row_per_url(crawled):
    status = {r["url_id"]: r for r in crawled["status"]}
    assert len(status) == len(crawled["status"]) == len(crawled["url_ids"]) == 8  # good.jpg is in both lists
    for path, says in FAILURES.items():
        row = status[crawled["url_ids"][crawled["base"] + path]]
        assert row["status"] == "error" and says in row["error"] and row["shard"] is None
    ok = [r for r in crawled["status"] if r["status"] == "ok"]
    assert {r["shard"] for r in ok} == set(crawled["shards"]) and len(ok) == 2
    assert crawled["summary"] == {
        "listed": 9, "new": 8, "duplicates": 1, "run": "run0001", "ok": 2, "error": 4, "refused": 2,
        "errors": {"failed_to_download": 2, "failed_to_resize": 2},
    }
    assert (crawled["root"] / "data" / "crawl" / "stats" / "run0001-00000_stats.json").exists()


def test_fetch_refuses_disallowed_scheme_and_long_url_without_fetching(crawled):
    status = {r["url_id"]: r for r in crawled["status"]}
    local = status[crawled["url_ids"][f"file://{crawled['local']}"]]
    assert local["status"] == "refused" and "scheme 'file'" in local["error"]
    long = status[crawled["url_ids"][crawled["long_url"]]]
    assert long["status"] == "refused" and "2048" in long["error"]
    assert not [path for path in crawled["requests"] if "pad=" in path]


def test_fetch_again_fetches_only_new_urls(crawled, server):
    root, base = crawled["root"], crawled["base"]
    params, paths = _project(root, crawled["sources"])
    before = _snapshot(paths.crawl)
    server.requests.clear()
    assert fetch.run(params, paths) == {"listed": 9, "new": 0, "duplicates": 1}
    assert _snapshot(paths.crawl) == before and not server.requests

    # a run killed before writing status.parquet left a shard behind: it is discarded, its URLs refetched
    (paths.crawl_shards / "run0002-00000.parquet").write_bytes(b"half a shard")
    with open(root / "lists" / "web.csv", "a") as f:
        f.write(f"{base}/new1.jpg,new one,green,g\n{base}/new2.jpg,new two,yellow,y\n")
    urls.run(params, paths)
    summary = fetch.run(params, paths)
    assert summary["new"] == 2 and summary["ok"] == 2 and summary["run"] == "run0002"
    assert server.requests == Counter({"/new1.jpg": 1, "/new2.jpg": 1})
    after = _snapshot(paths.crawl)
    assert all(after[name] == value for name, value in before.items() if name.startswith("shards/"))
    new_shard = read_table(paths.crawl_shards / "run0002-00000.parquet", IMAGE_SCHEMA)
    assert sorted(new_shard["url"].to_pylist()) == [f"{base}/new1.jpg", f"{base}/new2.jpg"]
    status = read_table(paths.crawl_status, STATUS_SCHEMA)
    assert status.num_rows == 10 and len(set(status["url_id"].to_pylist())) == 10
    assert not (paths.crawl / ".img2dataset").exists()
