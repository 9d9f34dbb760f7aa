"""The hostile corpus of issue 8 through `dextra fetch` (a real process, its img2dataset workers spawned), twice.

Every URL must end with one status row whose reason a person understands, the run must survive all of them
with a peak RSS (the process and all its workers) under 2 GiB, and the second run must retry exactly the
transient failures. The processes run with an audit hook that refuses any connection off loopback.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from dextra.crawl.status import CRAWL_STATUS_SCHEMA
from dextra.pipeline.shards import IMAGE_SCHEMA, URL_SCHEMA, read_table, shard_files
from dextra.pipeline.stages import fetch, urls
from tests.helpers.web import (
    Web,
    drip,
    encoded,
    flaky,
    loopback_only_env,
    png_bomb,
    project,
    redirect,
    short,
    static,
    unsized,
    write_csv,
)

GIB = 1 << 30
MAX_BYTES = 200_000
RED = encoded(Image.new("RGB", (120, 80), "red"), "JPEG")
NOISE = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)), "JPEG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 40), colour) for colour in ("blue", "yellow", "green")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# path -> (reply, status, reason the row must carry; None for ok)
def corpus(web: Web) -> dict[str, tuple]:
    return {
        "/ok.jpg": (static(RED), "ok", None),
        "/copy.jpg": (static(RED), "ok", None),  # identical bytes under another URL
        "/missing.jpg": (static(b"gone", 404), "error", "HTTP 404: Not Found"),
        "/boom.jpg": (static(b"oops", 500), "error", "HTTP 500: Internal Server Error"),
        "/busy-then-ok.jpg": (flaky(1, 503, static(RED)), "error", "HTTP 503: Service Unavailable"),
        "/drip.jpg": (drip(NOISE, 0.05), "error", "too slow: not finished after fetch.max_seconds (2 s)"),
        "/chain": (redirect("/chain2"), "ok", None),
        "/chain2": (redirect(f"{web.base}/chain3", 301), None, None),
        "/chain3": (redirect("/ok.jpg", 307), None, None),
        "/loop": (redirect("/loop2"), "error", "redirect loop: more than 10 redirects, or one URL 4 times"),
        "/loop2": (redirect("/loop"), None, None),
        "/to-private": (
            redirect("http://10.1.2.3/x.jpg"),
            "refused",
            "refused address: host 10.1.2.3: 10.1.2.3 is a private address",
        ),
        "/to-metadata": (
            redirect("http://169.254.169.254/latest/"),
            "refused",
            "169.254.169.254 is a link-local address",
        ),
        "/to-other-loopback": (
            redirect(f"http://127.0.0.2:{web.port}/ok.jpg"),
            "refused",
            "127.0.0.2 is a loopback address",
        ),
        "/to-file": (
            redirect("file:///etc/passwd"),
            "refused",
            "refused redirect: to file:///etc/passwd (scheme 'file' is not allowed",
        ),
        "/html.jpg": (
            static(b"<!DOCTYPE html><html><body>hello</body></html>"),
            "error",
            "not an image: an HTML or XML page",
        ),
        "/empty.jpg": (static(b""), "error", "empty body (0 bytes)"),
        "/truncated.jpg": (static(NOISE[: len(NOISE) // 2]), "error", "truncated JPEG: no end-of-image marker"),
        "/random.jpg": (static(os.urandom(5000)), "error", "not an image: 5000 bytes of an unknown format"),
        "/bomb.png": (
            static(png_bomb(), Content_Type="image/png"),
            "error",
            "decompression bomb: 400,000,000 pixels is over fetch.max_pixels",
        ),
        "/cmyk.jpg": (static(encoded(Image.new("CMYK", (60, 40), (0, 255, 255, 0)), "JPEG")), "ok", None),
        "/grey16.png": (static(encoded(Image.fromarray(np.full((40, 60), 30_000, np.uint16)), "PNG")), "ok", None),
        "/rgba.png": (static(encoded(Image.new("RGBA", (60, 40), (255, 0, 0, 128)), "PNG")), "ok", None),
        "/anim.gif": (static(_animated_gif(), Content_Type="image/gif"), "ok", None),
        "/huge.jpg": (
            static(b"\xff\xd8" + b"x" * 3 * MAX_BYTES),
            "error",
            "too large: Content-Length 600,002 is over fetch.max_bytes (200,000); not read",
        ),
        "/huge-unsized.jpg": (
            unsized(b"\xff\xd8" + b"x" * 3 * MAX_BYTES),
            "error",
            "too large: body is over fetch.max_bytes (200,000); cut off",
        ),
        "/short.jpg": (
            short(RED[:300], len(RED)),
            "error",
            f"truncated: body ended after 300 of the {len(RED):,} bytes of its Content-Length",
        ),
        "/noai.jpg": (static(RED, X_Robots_Tag="noai"), "opt-out", "opt-out: X-Robots-Tag: noai"),
    }


OTHER_URLS = {  # url -> (status, reason); none of them reaches the server
    "file:///etc/hostname": ("refused", "refused URL: scheme 'file' is not allowed (allowed: http, https)"),
    "ftp://127.0.0.1/x.jpg": ("refused", "refused URL: scheme 'ftp' is not allowed"),
    "data:image/png;base64,iVBORw0KGgo=": ("refused", "refused URL: scheme 'data' is not allowed"),
    "javascript:alert(1)": ("refused", "refused URL: scheme 'javascript' is not allowed"),
    "http://127.0.0.3:{port}/ok.jpg": ("refused", "refused address: host 127.0.0.3: 127.0.0.3 is a loopback address"),
    "http://[::1]:{port}/ok.jpg": ("refused", "::1 is a loopback address"),
    "http://localhost:{other_port}/ok.jpg": (
        "refused",
        "127.0.0.1 is a loopback address (not in fetch.allow_addresses)",
    ),
    "{base}/ok.jpg?" + "x" * 2100: ("refused", "characters long (at most 2048)"),
}
TRANSIENT = {"/boom.jpg", "/busy-then-ok.jpg", "/drip.jpg", "/short.jpg"}


def _run_measured(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """Run `dextra` and sample the memory of it and every process under it, 20 times a second. The sum is of
    proportional set sizes (PSS): summed RSS would count the shared libraries of every worker (img2dataset
    imports torch through webdataset, ~0.5 GB of them) once per process."""
    process = psutil.Popen(
        [sys.executable, "-m", "dextra.pipeline.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            total = 0
            for p in [process, *process.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass  # it just ended
            peak[0] = max(peak[0], total)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate(timeout=300)
    sampler.join()
    return subprocess.CompletedProcess(process.args, process.returncode, out), peak[0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    web = Web()
    routes = corpus(web)
    web.routes.update({path: reply for path, (reply, *_) in routes.items()})
    root = tmp_path_factory.mktemp("hostile")
    listed = {web.base + path: (status, reason) for path, (_, status, reason) in routes.items() if status}
    listed.update({u.format(port=web.port, other_port=web.port + 1, base=web.base): v for u, v in OTHER_URLS.items()})
    rows = [f'"{url}",alt text,q,c' for url in listed] + [f"{web.base}/ok.jpg,the same URL twice,q,c"]
    write_csv(root / "lists" / "hostile.csv", "url,text,query,class", rows)
    params, paths = project(
        root,
        [{"name": "hostile", "path": "lists/hostile.csv"}],
        web=web,
        processes=2,
        threads=8,
        timeout_s=3,
        max_seconds=2,
        max_bytes=MAX_BYTES,
        transient_retries=1,
        shard_size=16,
        polite={"retries": 0},  # a 503 waits for the next run here; retries after a pause: tests/test_crawl_polite.py
    )
    urls.run(params, paths)
    env = loopback_only_env(root / "guard")
    first, peak = _run_measured(["fetch", "--root", str(root), "--params", str(root / "params.yaml")], env)
    first_status = read_table(paths.crawl_status, CRAWL_STATUS_SCHEMA).to_pylist()
    hits_first = dict(web.hits)
    web.hits.clear()
    second = fetch.run(params, paths)  # in this process: the first run above is the one measured
    result = {
        "web": web,
        "listed": listed,
        "first": first,
        "second": second,
        "peak": peak,
        "hits_first": hits_first,
        "hits_second": dict(web.hits),
        "first_status": first_status,
        "params": params,
        "paths": paths,
        "status": read_table(paths.crawl_status, CRAWL_STATUS_SCHEMA).to_pylist(),
        "images": {
            r["url"]: r for p in shard_files(paths.crawl_shards) for r in read_table(p, IMAGE_SCHEMA).to_pylist()
        },
        "ids": {r["url_id"]: r["url"] for r in read_table(paths.urls / "hostile.parquet", URL_SCHEMA).to_pylist()},
    }
    yield result
    web.close()


def test_the_run_survives_and_stays_under_2_gib(hostile):
    assert hostile["first"].returncode == 0, hostile["first"].stdout[-3000:]
    assert hostile["second"]["retried"] == len(TRANSIENT) and hostile["second"]["new"] == 0
    assert 0 < hostile["peak"] < 2 * GIB
    print(f"peak RSS of the hostile fetch (process + workers): {hostile['peak'] / 2**20:.0f} MiB")


def test_every_url_has_one_row_with_a_reason_a_person_understands(hostile):
    rows = {hostile["ids"][r["url_id"]]: r for r in hostile["first_status"]}
    assert len(rows) == len(hostile["first_status"]) == len(hostile["listed"])
    for url, (status, reason) in hostile["listed"].items():
        row = rows[url]
        assert row["status"] == status, (url, row)
        if reason is None:
            assert row["error"] is None and row["shard"]
        else:
            assert row["error"].startswith(reason) or reason in row["error"], (url, row["error"])
        assert row["transient"] == any(url.endswith(path) for path in TRANSIENT), url
    table = hostile["first"].stdout
    assert "outcome     this run  all URLs" in table and "reasons this run:" in table


def test_refused_urls_and_bodies_over_the_limit_are_not_fetched(hostile):
    hits = hostile["hits_first"]
    assert hits["/ok.jpg"] == 2  # listed twice: fetched once; and the end of the redirect chain
    assert not any(path.startswith("/x.jpg") for path in hits)
    for path in ("/to-private", "/to-metadata", "/to-other-loopback", "/to-file", "/bomb.png"):
        assert hits[path] == 1


def test_odd_formats_are_stored_in_the_one_policy(hostile):
    base, images = hostile["web"].base, hostile["images"]
    expected = {
        "/cmyk.jpg": (255, 0, 0),
        "/grey16.png": (117, 117, 117),
        "/rgba.png": (255, 127, 127),
        "/anim.gif": (0, 0, 255),
    }
    for path, colour in expected.items():
        row = images[base + path]
        stored = Image.open(io.BytesIO(row["image"]))
        assert (
            stored.format == "JPEG"
            and stored.mode == ("L" if path == "/grey16.png" else "RGB")
            and min(stored.size) == 32
        )
        assert (row["original_width"], row["original_height"]) == (60, 40)
        mean = np.asarray(stored.convert("RGB"), float).reshape(-1, 3).mean(0)
        assert np.abs(mean - colour).max() < 8, (path, mean)
    assert images[base + "/ok.jpg"]["sha256"] == images[base + "/copy.jpg"]["sha256"]


def test_the_next_run_retries_exactly_the_transient_failures(hostile):
    assert set(hostile["hits_second"]) == TRANSIENT | {"/robots.txt"}  # robots.txt: once per run
    rows = {hostile["ids"][r["url_id"]]: r for r in hostile["status"]}
    base = hostile["web"].base
    assert rows[base + "/busy-then-ok.jpg"]["status"] == "ok" and base + "/busy-then-ok.jpg" in hostile["images"]
    boom = rows[base + "/boom.jpg"]
    assert (boom["status"], boom["attempts"], boom["transient"]) == ("error", 2, True)
    assert rows[base + "/missing.jpg"]["attempts"] == 1
    # fetch.transient_retries is 1: the third run has nothing left to try
    assert fetch.run(hostile["params"], hostile["paths"]) == {
        "listed": len(hostile["listed"]),
        "new": 0,
        "retried": 0,
        "duplicates": 0,
        "repaired": 0,
    }
