"""Resumable URL-list downloads (crawl/download.py) against a loopback server that honours or ignores Range."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import pytest

from dextra.crawl.download import download_file
from dextra.pipeline.errors import InputError
from dextra.pipeline.shards import URL_SCHEMA, read_table
from dextra.pipeline.stages import urls
from tests.helpers.web import Web, flaky, project, send, static

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
CHUNK = 1 << 16


class Served:
    """A file served like a static web server (ETag, Range, If-Range); `drop_after` cuts the next response short."""

    def __init__(self, body: bytes, etag: str = '"v1"', honour_range: bool = True):
        self.body, self.etag, self.honour_range = body, etag, honour_range
        self.drop_after: int | None = None
        self.log: list[dict] = []  # per request: its Range and If-Range, the status and the bytes sent

    def __call__(self, h) -> None:
        asked, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        start, status, headers = 0, 200, {"ETag": self.etag, "Content-Type": "text/csv"}
        if asked and self.honour_range and if_range in (None, self.etag):
            start, status = int(asked.split("=")[1].split("-")[0]), 206
            headers["Content-Range"] = f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"
        body = self.body[start:]
        sent = len(body) if self.drop_after is None else min(self.drop_after, len(body))
        self.drop_after = None
        self.log.append({"range": asked, "if_range": if_range, "status": status, "sent": sent})
        send(h, status, body[:sent], headers, length=len(body))  # then the connection closes


@pytest.fixture(scope="module")
def web():
    server = Web()
    yield server
    server.close()


def _body(n: int = 1_000_000) -> bytes:
    return os.urandom(n)


def test_a_dropped_download_resumes_with_only_the_missing_bytes(web, tmp_path):
    body = _body()
    served = web.routes["/resume.csv"] = Served(body)
    served.drop_after = 300_000
    dest = tmp_path / "list.csv"
    digest = hashlib.sha256(body).hexdigest()
    with pytest.raises(InputError, match="source l: cannot download .* after 1 attempts"):  # say, the run was killed
        download_file(f"{web.base}/resume.csv", dest, digest, label="l", attempts=1)
    part = tmp_path / "list.csv.part"
    have = part.stat().st_size
    assert 300_000 - CHUNK <= have <= 300_000 and not dest.exists()
    assert json.loads((tmp_path / "list.csv.part.json").read_text())["validator"] == '"v1"'

    assert download_file(f"{web.base}/resume.csv", dest, digest, label="l") == dest
    assert dest.read_bytes() == body and not part.exists() and not (tmp_path / "list.csv.part.json").exists()
    resumed = served.log[-1]
    assert (resumed["range"], resumed["if_range"], resumed["status"]) == (f"bytes={have}-", '"v1"', 206)
    assert resumed["sent"] == len(body) - have <= len(body) - served.log[0]["sent"] + CHUNK


def test_a_drop_within_one_run_is_resumed_by_its_next_attempt(web, tmp_path):
    body = _body(400_000)
    served = web.routes["/again.csv"] = Served(body)
    served.drop_after = 100_000
    dest = download_file(
        f"{web.base}/again.csv", tmp_path / "l.csv", hashlib.sha256(body).hexdigest(), label="l", backoff_s=0.01
    )
    assert dest.read_bytes() == body
    assert [r["status"] for r in served.log] == [200, 206] and sum(r["sent"] for r in served.log) <= len(body) + CHUNK


@pytest.mark.parametrize("change", ["server ignores Range", "file changed"])
def test_resume_starts_over_when_the_server_ignores_range_or_the_file_changed(web, tmp_path, change):
    old, new = _body(300_000), _body(350_000)
    served = web.routes["/moving.csv"] = Served(old, honour_range=change == "file changed")
    served.drop_after = 120_000
    dest = tmp_path / "l.csv"
    with pytest.raises(InputError):
        download_file(f"{web.base}/moving.csv", dest, hashlib.sha256(old).hexdigest(), label="l", attempts=1)
    expected = old
    if change == "file changed":
        served.body, served.etag, expected = new, '"v2"', new
    download_file(f"{web.base}/moving.csv", dest, hashlib.sha256(expected).hexdigest(), label="l")
    assert dest.read_bytes() == expected  # not the old part with the new file appended
    assert served.log[-1]["status"] == 200 and served.log[-1]["range"] is not None


def test_5xx_and_429_are_retried_honouring_retry_after(web, tmp_path):
    body = b"url\nhttp://example.org/a.jpg\n"
    web.routes["/busy.csv"] = flaky(2, 503, static(body))
    digest = hashlib.sha256(body).hexdigest()
    assert (
        download_file(f"{web.base}/busy.csv", tmp_path / "a.csv", digest, label="a", backoff_s=0.01).read_bytes()
        == body
    )
    assert web.hits["/busy.csv"] == 3

    answers = iter([static(b"slow down", 429, Retry_After="1", Content_Type="text/plain"), static(body)])
    web.routes["/limited.csv"] = lambda h: next(answers)(h)
    started = time.monotonic()
    download_file(f"{web.base}/limited.csv", tmp_path / "b.csv", digest, label="b", backoff_s=0.01)
    assert time.monotonic() - started >= 1.0  # Retry-After, not the 10 ms backoff


def test_permanent_failures_and_exhausted_retries_are_one_clear_error(web, tmp_path):
    web.hits.clear()
    with pytest.raises(
        InputError, match=r"^source gone: http://127\.0\.0\.1:\d+/gone\.csv answered HTTP 404 Not Found$"
    ):
        download_file(f"{web.base}/gone.csv", tmp_path / "g.csv", "0" * 64, label="gone", backoff_s=0.01)
    assert web.hits["/gone.csv"] == 1  # not retried
    web.routes["/down.csv"] = static(b"", 500)
    with pytest.raises(InputError, match=r"cannot download .* after 3 attempts \(HTTP 500"):
        download_file(f"{web.base}/down.csv", tmp_path / "d.csv", "0" * 64, label="down", attempts=3, backoff_s=0.01)
    assert web.hits["/down.csv"] == 3
    with socket.socket() as s:  # a port nobody listens on: connection refused, retried, then reported
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match="after 2 attempts"):
        download_file(
            f"http://127.0.0.1:{port}/x.csv", tmp_path / "x.csv", "0" * 64, label="x", attempts=2, backoff_s=0.01
        )


def test_urls_checks_the_sha256_and_writes_nothing_on_a_mismatch(web, tmp_path):
    body = b"url,text\nhttp://example.com/1.jpg,one\n"
    web.routes["/list.csv"] = static(body, Content_Type="text/csv")
    good, bad = hashlib.sha256(body).hexdigest(), "0" * 64
    params, paths = project(tmp_path, [{"name": "remote", "url": f"{web.base}/list.csv", "sha256": bad}])
    with pytest.raises(InputError) as caught:
        urls.run(params, paths)
    assert str(caught.value) == (
        f"source remote: {web.base}/list.csv has sha256 {good} but the manifest expects {bad} "
        f"(kept as {paths.urls / 'downloads' / 'remote.csv.bad'})"
    )
    assert not list(paths.urls.glob("*.parquet"))
    assert (paths.urls / "downloads" / "remote.csv.bad").read_bytes() == body

    params, paths = project(tmp_path, [{"name": "remote", "url": f"{web.base}/list.csv", "sha256": good}])
    urls.run(params, paths)
    assert read_table(paths.urls / "remote.parquet", URL_SCHEMA)["url"].to_pylist() == ["http://example.com/1.jpg"]
    assert sorted(p.name for p in (paths.urls / "downloads").iterdir()) == ["remote.csv"]
    hits = web.hits["/list.csv"]
    urls.run(params, paths)  # a cached list with the right hash is not downloaded again
    assert web.hits["/list.csv"] == hits
