"""The loopback web the crawl tests fetch from, and the guard that keeps every test on 127.0.0.1: every name used
resolves locally, and an audit hook (conftest's `loopback_only` fixture, for every test) turns any connect() off
loopback into an error; processes a test starts get the same hook through `loopback_only_env`."""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import yaml
from PIL import Image

from dextra.pipeline.params import parse_params
from dextra.pipeline.paths import Paths
from tests.helpers import REPO

# ---- never off loopback ---------------------------------------------------------------------------------

CONNECTS: list[tuple] = []  # every address this process connected to since the guard went in


def _loopback_only(event: str, args: tuple) -> None:
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = str(args[1][0]).split("%")[0]
        CONNECTS.append(args[1])
        if host != "localhost" and not ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"test guard: refusing a connection off loopback, to {host}")


_guarded = []


def guard_loopback() -> list[tuple]:
    """Turn any connect() of this process off loopback into an error (an audit hook: once in, it stays)."""
    if not _guarded:
        sys.addaudithook(_loopback_only)
        _guarded.append(True)
    return CONNECTS


SITECUSTOMIZE = """import ipaddress, sys
def _loopback_only(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = str(args[1][0]).split("%")[0]
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError("test guard: refusing a connection off loopback, to " + host)
sys.addaudithook(_loopback_only)
"""


def loopback_only_env(folder: Path) -> dict:
    """An environment whose Python processes (a `dextra fetch`, and every worker it spawns) cannot connect off
    loopback."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }


def project(
    root: Path, sources: list[dict], allowed_schemes=("http", "https"), web: Web | None = None, **fetch
) -> tuple:
    """A repository root with manifests/t.yaml and params.yaml (the repository's, small and quick, allowing `web`).
    One loopback server stands for many web hosts here, so fetch.polite's per-host limits are lifted unless a test
    sets them (robots.txt stays on)."""
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    manifest = {"name": "t", "seed": {"importer": "demo"}, "sources": sources, "allowed_schemes": list(allowed_schemes)}
    (root / "manifests" / "t.yaml").write_text(yaml.safe_dump(manifest))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["dataset"] = "t"
    raw["fetch"].update(
        {
            "image_size": 32,
            "processes": 1,
            "threads": 4,
            "timeout_s": 5,
            "shard_size": 100,
            "allow_addresses": [web.allow] if web else [],
            **fetch,
            "polite": {"connections_per_host": 64, "requests_per_second": 0, **fetch.get("polite", {})},
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return parse_params(raw), Paths(root)


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


# ---- the loopback web -----------------------------------------------------------------------------------

Reply = Callable[[BaseHTTPRequestHandler], None]


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict | None = None,
    length: int | None = None,
) -> None:
    handler.send_response(status)
    for name, value in {"Content-Type": "image/jpeg", **(headers or {})}.items():
        handler.send_header(name, value)
    if length is not False:
        handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def static(body: bytes, status: int = 200, **headers) -> Reply:
    return lambda h: send(h, status, body, {k.replace("_", "-"): v for k, v in headers.items()})


def redirect(location: str, status: int = 302) -> Reply:
    return lambda h: send(h, status, b"moved", {"Location": location, "Content-Type": "text/plain"})


def unsized(body: bytes) -> Reply:
    """No Content-Length: the body ends when the connection closes."""
    return lambda h: send(h, 200, body, length=False)


def short(body: bytes, declared: int) -> Reply:
    """Content-Length promises more than is sent, then the connection closes."""
    return lambda h: send(h, 200, body, length=declared)


def drip(body: bytes, every_s: float) -> Reply:
    def reply(h: BaseHTTPRequestHandler) -> None:
        send(h, 200, b"", length=len(body))
        for i in range(len(body)):
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()
            time.sleep(every_s)

    return reply


def flaky(failures: int, status: int, then: Reply) -> Reply:
    """`status` for the first `failures` requests, then `then`."""
    count = Counter()

    def reply(h: BaseHTTPRequestHandler) -> None:
        count["n"] += 1
        if count["n"] <= failures:
            send(h, status, b"try later", {"Content-Type": "text/plain"})
        else:
            then(h)

    return reply


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.partition("?")[0]
        with self.server.lock:
            self.server.hits[path] += 1
            self.server.requests.append((path, dict(self.headers)))
        reply = self.server.routes.get(path, static(b"no such route", 404, Content_Type="text/plain"))
        try:
            reply(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a limit cut the transfer)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connects from img2dataset's threads


class Web:
    """A threaded HTTP server on a loopback address with a table of routes; `allow` is its fetch.allow_addresses
    entry. Servers on other loopback addresses (127.0.0.2, ...) are other hosts to the crawler."""

    def __init__(self, address: str = "127.0.0.1"):
        self.httpd = _Server((address, 0), _Handler)
        self.httpd.routes, self.httpd.hits, self.httpd.requests, self.httpd.lock = {}, Counter(), [], threading.Lock()
        self.port = self.httpd.server_address[1]
        self.base = f"http://{address}:{self.port}"
        self.allow = f"{address}:{self.port}"
        self.routes, self.hits, self.requests = self.httpd.routes, self.httpd.hits, self.httpd.requests
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_bomb(side: int = 20_000) -> bytes:
    """A 1-bit PNG of side x side pixels in a few kB: cv2 would decode it to side² bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + side // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
